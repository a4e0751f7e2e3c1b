"""doit's rules for a network scrape, on real doit against the local fake API (requests counted there):
a code change re-parses data/raw/ without downloading; the sources.toml block or a due refresh re-scrapes;
`doit offline=1` builds from data/raw/ even when a refresh is due."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from tests.fakeapi import FakeApi
from tests.pipeline_project import Project, sources_toml

TASKS = ("scrape:labels", "normalize:labels")


@pytest.fixture()
def scraped(tmp_path):
    """A project with one openFDA source, scraped once online: (project, fake API)."""
    with FakeApi(records=12, scale=20) as fake:
        project = Project(tmp_path, base_model="embedded:smollm2-135m-instruct")
        (tmp_path / "sources.toml").write_text(sources_toml(news2_count=20, icd_codes=20) + f"""
[sources.labels]
kind = "openfda"
adapters = ["clinical_decision"]
refresh = "30d"
[sources.labels.params]
endpoint = "drug/label"
limit = 4
max_records = 0
base_url = "{fake.url('openfda')}"
rate = 20
backoff = 0.02
""")
        assert project.run(*TASKS) == set(TASKS)
        assert len(fake.requests("openfda")) == 3
        yield project, fake


def examples(project: Project) -> str:
    return project.path("data/examples/labels.jsonl").read_text()


def test_code_change_reparses_without_downloading_and_block_change_rescrapes(scraped):
    project, fake = scraped
    assert "indicated for?" in examples(project)
    project.edit("stages/sources/openfda.py", '"What is {name} indicated for?"', '"What is {name} used for?"')
    assert project.run(*TASKS) == set(TASKS)
    assert len(fake.requests("openfda")) == 3  # parsed again from data/raw/, nothing downloaded
    assert "used for?" in examples(project) and "indicated for?" not in examples(project)

    project.edit("stages/scrape.py", '"""', '"""\n# a harmless edit\n')
    assert "scrape:labels" in project.run(*TASKS) and len(fake.requests("openfda")) == 3

    project.edit("sources.toml", "limit = 4", "limit = 6")  # the block changed: a new scrape
    assert "scrape:labels" in project.run(*TASKS)
    assert len(fake.requests("openfda")) == 3 + 2
    assert project.run(*TASKS) == set()


def test_offline_builds_from_raw_when_refresh_is_due_and_online_rescrapes(scraped):
    project, fake = scraped
    status = project.path("data/raw/labels/scrape.json")
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=31)).replace(microsecond=0).isoformat()
    status.write_text(json.dumps({**json.loads(status.read_text()), "finished_at": old}))  # the refresh is due

    assert project.run("offline=1", *TASKS) == set()  # offline, a due refresh is no reason to run
    project.edit("stages/sources/openfda.py", '"What is {name} indicated for?"', '"What is {name} used for?"')
    result = project.doit("offline=1", *TASKS)
    assert "scrape:labels: offline, 3 raw page(s)" in result.stdout
    assert len(fake.requests("openfda")) == 3 and "used for?" in examples(project)

    assert "scrape:labels" in project.run(*TASKS)  # online again: the due refresh scrapes
    assert len(fake.requests("openfda")) == 6
    assert project.run(*TASKS) == set()
