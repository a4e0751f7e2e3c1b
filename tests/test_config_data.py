"""The data-quality keys: [dedup] engine/address, [clean], and the adapter's [data] routing keys."""
from pathlib import Path

import pytest

from stages import config
from tests.test_config import problems  # noqa: F401  (one helper for every config test)
from tests.test_config import project as config_project

SOURCES = """
[sources.news2]
kind = "news2"
adapters = ["decide"]
"""


def project(tmp_path: Path, sources: str = SOURCES, adapter: str = "") -> Path:
    return config_project(tmp_path, sources=sources, adapter=adapter)


def test_defaults(tmp_path):
    cfg = config.load(project(tmp_path))
    assert cfg.dedup["engine"] == "local" and cfg.dedup["address"] == ""
    assert cfg.clean == {"min_tokens": 4, "max_tokens": 8192, "strip_markup": True, "boilerplate": [],
                         "scrub_contacts": ["stackexchange"]}
    data = cfg.adapters["decide"].data
    assert data["sources"] == [] and data["keywords"] == [] and data["exclude_keywords"] == []
    assert data["frozen_test"] == ""


def test_valid_keys_load(tmp_path):
    sources = ('[dedup]\nengine = "ray"\naddress = "10.0.0.2:6379"\n'
               '[clean]\nmin_tokens = 0\nmax_tokens = 512\nboilerplate = ["^Sponsored"]\nscrub_contacts = []\n'
               + SOURCES + '[sources.codes]\nkind = "icd10cm"\n')
    (tmp_path / "frozen").mkdir()
    (tmp_path / "frozen" / "test.jsonl").write_text('{"id": "a"}\n')  # a frozen_test must exist (checked at load)
    cfg = config.load(project(tmp_path, sources, '[data]\nsources = ["codes"]\nkeywords = ["sepsis", "septic shock"]\n'
                                                 'frozen_test = "frozen/test.jsonl"\n'))
    assert cfg.dedup["engine"] == "ray" and cfg.dedup["address"] == "10.0.0.2:6379" and cfg.clean["max_tokens"] == 512
    # data.sources routes a source that does not list the adapter
    assert [s.name for s in cfg.sources_for("decide")] == ["news2", "codes"]


@pytest.mark.parametrize("sources, expected", [
    ('[dedup]\nengine = "cassandra"\n' + SOURCES, "sources.toml: key 'dedup.engine' must be one of local, ray"),
    ('[dedup]\naddress = "localhost"\n' + SOURCES, "key 'dedup.address' must look like host:6379"),
    ('[dedup]\nbackend = "redis"\n' + SOURCES, "key 'dedup.backend' must be removed with the Redis backend: use engine"),
    ('[dedup]\nnum_perm = 8\n' + SOURCES, "key 'dedup.num_perm' must be at least 16"),
    ('[clean]\nmin_tokens = -1\n' + SOURCES, "key 'clean.min_tokens' must be 0 or more"),
    ('[clean]\nmin_tokens = 50\nmax_tokens = 10\n' + SOURCES, "key 'clean.max_tokens' must be at least 1 and at least"),
    ('[clean]\nmax_tokens = "many"\n' + SOURCES, "key 'clean.max_tokens' must be an integer"),
    ('[clean]\nboilerplate = ["(unclosed"]\n' + SOURCES, "key 'clean.boilerplate' holds '(unclosed', not a valid"),
    ('[clean]\nscrub_contacts = ["reddit"]\n' + SOURCES, "key 'clean.scrub_contacts' names 'reddit', not a source kind"),
    ('[clean]\nstrip_html = true\n' + SOURCES, "unknown key 'clean.strip_html'"),
    ('clean = 3\n' + SOURCES, "'clean' must be a table"),
])
def test_sources_toml_errors(tmp_path, sources, expected):
    found = problems(project(tmp_path, sources))
    assert any(expected in line for line in found), found


@pytest.mark.parametrize("adapter, expected", [
    ('[data]\nsources = ["nope"]\n', "adapters/decide/adapter.toml: key 'data.sources' names 'nope', which is not"),
    ('[data]\nkeywords = "sepsis"\n', "key 'data.keywords' must be a list"),
    ('[data]\nkeywords = ["sepsis", " "]\n', "key 'data.keywords' holds an empty string"),
    ('[data]\nexclude_keywords = [3]\n', "key 'data.exclude_keywords' must be a list of strings (got 3 in it)"),
    ('[data]\nfrozen_test = true\n', "key 'data.frozen_test' must be a string"),
    ('[data]\nmax_examples = -5\n', "key 'data.max_examples' must be 0 (all) or more"),
    ('[data]\nkeyword = ["x"]\n', "unknown key 'data.keyword'"),
])
def test_adapter_data_errors(tmp_path, adapter, expected):
    found = problems(project(tmp_path, adapter=adapter))
    assert any(expected in line for line in found), found


# --- the repository's own defaults and their documentation
REPO = Path(__file__).resolve().parents[1]


def test_default_pipeline_runs_the_full_icd10cm_source():
    cfg = config.load(REPO)
    icd = cfg.sources["icd10cm"]
    assert icd.enabled and icd.adapters == ["clinical_coding"]
    assert icd.params.get("max_codes", 0) == 0  # every code; max_codes stays an optional cap
    from stages.sources.icd10cm import Icd10cmSource

    assert Icd10cmSource("icd10cm", icd.params).param("max_codes", 0, int) == 0


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_configuration_documents_every_data_quality_key():
    section = _section((REPO / "README.md").read_text(encoding="utf-8"), "Configuration")
    for key in config.DEDUP_SCHEMA:
        assert f"`[dedup] {key}`" in section or f"`{key}`" in section, f"[dedup] {key}"
    for key in config.CLEAN_SCHEMA:
        assert f"`[clean] {key}`" in section or f"`{key}`" in section, f"[clean] {key}"
    for key in config.DATA_SCHEMA:
        assert f"`data.{key}`" in section, f"data.{key}"
    assert "medforge dedup IN.jsonl --out OUT.jsonl" in section and "`id`" in section
    for reason in ("invalid", "empty", "echo", "too_short", "too_long"):
        assert f"`{reason}`" in section


def test_runtime_dependencies_cover_bulk_minhash_and_the_ray_engine():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip(): d for d in deps}
    assert "redis" not in names                          # the Redis backend is gone
    extras = project["optional-dependencies"]
    assert any(d.startswith("ray") for d in extras["ray"]) and any(d.startswith("ray") for d in extras["test"])
    assert names["datasketch"].startswith("datasketch>=2.0")  # MinHash.bulk(scheme=...) in bench/dedup.py
