"""Offline, an enabled network source fails with one line naming it and the fix; `doit --continue` builds the rest.

Offline either way: the API cannot be reached, or the user says so with `doit offline=1` and the source
has no finished scrape in data/raw/ to build from (with one, see tests/test_scrape_doit.py).
"""
from __future__ import annotations


import pytest

from tests.pipeline_project import Project, sources_toml
from tests.ports import free_port


@pytest.mark.parametrize("args, marker", [((), "cannot reach"), (("offline=1",), "this run is offline")])
def test_offline_network_source_fails_in_one_line_and_the_rest_still_builds(tmp_path, args, marker):
    project = Project(tmp_path, base_model="embedded:smollm2-135m-instruct")
    (tmp_path / "sources.toml").write_text(sources_toml(news2_count=20, icd_codes=20) + f"""
[sources.pubmed]
kind = "pubmed"
adapters = ["clinical_decision"]
[sources.pubmed.params]
term = "sepsis"
base_url = "http://127.0.0.1:{free_port()}/entrez/eutils"
backoff = 0.05
""")
    result = project.doit("--continue", *args, "scrape", "normalize", check=False)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if marker in line]
    assert lines, result.stderr[-3000:]
    assert "source 'pubmed'" in lines[0] and 'mode = "mirror"' in lines[0] and "enabled = false" in lines[0]
    # everything that does not depend on pubmed was built
    for source in ("news2", "icd10cm"):
        assert (tmp_path / "data" / "examples" / f"{source}.jsonl").stat().st_size > 0
    assert not (tmp_path / "data" / "raw" / "pubmed" / "manifest.json").exists()  # nothing looks done
