"""No silent data loss (issue 14): a scrape is finished only when it holds everything the API said it had.

Against the local fault-injecting server: an API error inside a 200, an empty page with no next cursor while
the announced total says more remain, a cursor the server repeats, a corrupt gzip body, a redirect loop and
JSON of the wrong shape. Each is retried to the good answer when it passes, else fails with one line; an
error body is never stored as a page and an unfinished pass is never marked done.
"""
from __future__ import annotations

import json

import pytest

from stages import http
from stages.scrape import RawStore
from stages.sources import SourceError, make
from tests.fakeapi import FakeApi
from tests.pipeline_project import Project, sources_toml


@pytest.fixture()
def fake():
    with FakeApi(records=30, scale=20) as server:
        server.se_quota = 10_000
        yield server


def fetch(fake, tmp_path, kind, api, **params):
    """One fetch of `kind` into tmp_path/kind; returns (store, records). A second call resumes the same store."""
    source = make(kind, kind, {"base_url": fake.url(api), "rate": 50, "backoff": 0.01, "retries": 3,
                               "lock_dir": str(tmp_path / "locks"), **params})
    store = RawStore(tmp_path / kind)
    source.fetch(store)
    return store, [r for p in store.pages() for r in source.parse(p)]


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    return message


PAGED = [  # (kind, api, params): every paged network source whose API states what "all" means
    ("clinicaltrials", "clinicaltrials", {"page_size": 7, "max_records": 0}),
    ("openfda", "openfda", {"limit": 7, "max_records": 0}),
]


# --- 1. silent data loss: an error in a 200, an empty page with more promised
@pytest.mark.parametrize("kind, api, params", PAGED)
@pytest.mark.parametrize("fault", ["error200", "empty-end", "array200", "null200"])
def test_a_bad_page_once_is_retried_and_the_scrape_holds_every_record(fake, tmp_path, kind, api, params, fault):
    fake.inject(api, "ok", fault)  # page 2 of 5
    store, recs = fetch(fake, tmp_path, kind, api, **params)
    assert len({r["id"] for r in recs}) == len(recs) == 30
    assert [r["fault"] for r in fake.requests(api)][:3] == ["ok", fault, None]
    assert len(store.pages()) == 5 and store.checkpoint["done"]
    assert not any(b'"error"' in p.read_bytes()[:200] for p in store.pages())  # no error body stored as a page


@pytest.mark.parametrize("kind, api, params", PAGED)
@pytest.mark.parametrize("fault", ["error200", "empty-end"])
def test_a_bad_page_that_persists_fails_in_one_line_and_the_rerun_completes(fake, tmp_path, kind, api, params, fault):
    fake.inject(api, "ok", "ok")
    fake.stick(api, fault)  # from page 3 on, every answer is bad
    with pytest.raises(SourceError) as err:
        fetch(fake, tmp_path, kind, api, **params)
    message = one_line(err.value)
    assert kind in message and "4 attempts" in message and "checkpoint" in message
    if fault == "empty-end":
        assert "14 of the 30 records" in message  # the shortfall is named
    else:
        assert "SERVER_ERROR" in message  # the API's own error
    store = RawStore(tmp_path / kind)
    assert len(store.pages()) == 2 and not store.checkpoint.get("done")  # the bad answer was not stored
    fake.unstick(api)
    store, recs = fetch(fake, tmp_path, kind, api, **params)  # resumes at page 3
    assert len({r["id"] for r in recs}) == len(recs) == 30 and store.checkpoint["done"]
    assert len(fake.requests(api)) == 2 + 4 + 3


def test_stackexchange_empty_page_that_says_has_more_is_not_the_end(fake, tmp_path):
    fake.inject("stackexchange", "ok", "ok", "array200")
    store, recs = fetch(fake, tmp_path, "stackexchange", "stackexchange", page_size=1)
    assert [r["id"] for r in recs] == ["1000", "1001"] and store.checkpoint["done"]
    fake.stick("stackexchange", "error200")  # internal_error in a 200: retried, then one line, nothing stored
    with pytest.raises(SourceError, match="internal_error") as err:
        fetch(fake, tmp_path / "again", "stackexchange", "stackexchange", page_size=1)
    one_line(err.value)
    assert RawStore(tmp_path / "again" / "stackexchange").pages() == []


def test_dailymed_listing_that_ends_short_is_retried(fake, tmp_path):
    fake.inject("dailymed", "ok", "ok", "ok", "empty-end")  # listing page 1, its 2 SPLs, then listing page 2: empty, "no next page"
    store, recs = fetch(fake, tmp_path, "dailymed", "dailymed", page_size=2, max_labels=0)
    assert len(recs) == len(fake.spl_rows) and store.checkpoint["listing_done"]


def test_pubmed_error_inside_a_200_is_retried_not_stored(tmp_path):
    with FakeApi(records=12, scale=20) as fake:
        original = fake._api_ncbi

        def forgetful(rest, q):  # the history server forgets every WebEnv: efetch POSTs the stored ids
            fake.webenvs.clear() if rest == "efetch.fcgi" else None
            return original(rest, q)
        fake._api_ncbi = forgetful
        fake.inject("ncbi", "ok", "ok", "ok", "error200")  # esearch x2, efetch (expired), then the POST: <ERROR> in a 200
        store, recs = fetch(fake, tmp_path, "pubmed", "ncbi", term="x", mindate="2020/01/01", maxdate="2020/12/31",
                            batch=5)
    assert len({r["id"] for r in recs}) == len(recs) == 12
    assert not any(b"<ERROR>" in p.read_bytes() for p in store.pages())


# --- 7. secrets echoed by an API never reach the raw store
ECHOING = [  # (kind, api, params, env): an API key (and NCBI's contact email) that the answers echo back
    ("openfda", "openfda", {"limit": 7, "max_records": 0}, {"OPENFDA_API_KEY": "KEY-s3cr3t-0penfda"}),
    ("pubmed", "ncbi", {"term": "x", "mindate": "2020/01/01", "maxdate": "2020/12/31", "batch": 5},
     {"NCBI_API_KEY": "ncbi-s3cr3t-k3y", "MEDFORGE_EMAIL": "me+medforge@example.org"}),
]


@pytest.mark.parametrize("kind, api, params, env", ECHOING)
def test_secrets_an_api_echoes_are_scrubbed_before_a_page_is_stored(fake, tmp_path, monkeypatch, kind, api, params,
                                                                     env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fake.stick(api, "echo")
    store, recs = fetch(fake, tmp_path, kind, api, **params)
    assert len({r["id"] for r in recs}) == len(recs) == 30
    sent = fake.requests(api)
    assert all(r["fault"] == "echo" for r in sent) and any(r["query"].get("api_key") for r in sent)  # it was sent
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"request" in stored and (b"api_key=%2A%2A%2A" in stored or b"api_key=***" in stored)  # echoed, scrubbed
    for value in env.values():
        for form in {value, value.replace("@", "%40"), value.replace("+", "%2B").replace("@", "%40")}:
            assert form.encode() not in stored, f"{form} stored under data/raw"


# --- 5. endless paging
@pytest.mark.parametrize("kind, api, params", PAGED)
def test_a_repeated_cursor_stops_the_scrape_with_one_line(fake, tmp_path, kind, api, params):
    fake.repeat_cursor.add(api)
    with pytest.raises(SourceError) as err:
        fetch(fake, tmp_path, kind, api, **params)
    message = one_line(err.value)
    assert "same next-page cursor" in message and kind in message
    assert len(fake.requests(api)) <= 3  # not 2,104
    assert not RawStore(tmp_path / kind).checkpoint.get("done")


# --- 4. transport faults: one line, never a traceback
@pytest.mark.parametrize("fault", ["gzip-corrupt", "redirect-loop"])
def test_corrupt_gzip_and_redirect_loop(fake, tmp_path, fault):
    if fault == "gzip-corrupt":
        fake.inject("openfda", fault)  # once: retried to the good answer
        store, recs = fetch(fake, tmp_path, "openfda", "openfda", limit=10, max_records=0)
        assert len(recs) == 30 and store.checkpoint["done"]
    fake.stick("openfda", fault)
    with pytest.raises(http.HttpError) as err:
        fetch(fake, tmp_path / "stuck", "openfda", "openfda", limit=10, max_records=0)
    message = one_line(err.value)
    assert ("corrupt" in message) if fault == "gzip-corrupt" else ("redirect loop" in message and "base_url" in message)
    assert len(fake.requests("openfda")) < 60  # a redirect loop is not retried hop after hop


# --- the whole pipeline: a bad answer fails the task in one line, no traceback, and is never "up to date"
def test_doit_never_finishes_a_short_scrape(tmp_path):
    with FakeApi(records=12, scale=20) as fake:
        project = Project(tmp_path, base_model="embedded:smollm2-135m-instruct")
        (tmp_path / "sources.toml").write_text(sources_toml(news2_count=20, icd_codes=20) + f"""
[sources.trials]
kind = "clinicaltrials"
adapters = ["clinical_decision"]
[sources.trials.params]
page_size = 5
max_records = 0
base_url = "{fake.url('clinicaltrials')}"
rate = 20
backoff = 0.01
retries = 2
""")
        tasks = ("scrape:trials", "normalize:trials")
        fake.inject("clinicaltrials", "ok")
        fake.stick("clinicaltrials", "empty-end")
        for _ in range(2):  # failed, and still failing: never "up to date" with 5 of 12 records
            result = project.doit(*tasks, check=False)
            assert result.returncode != 0
            output = result.stdout + result.stderr
            assert "Traceback" not in output
            failed = [line for line in output.splitlines() if "[scrape:trials] failed:" in line]
            assert len(failed) == 1 and "5 of the 12 records" in failed[0], output[-3000:]
            assert not project.path("data/raw/trials/manifest.json").exists()
            log = project.path("data/logs/scrape_trials.log").read_text()
            assert "Traceback" not in log and log.rstrip().splitlines()[-1].strip() == failed[0].strip()
        fake.unstick("clinicaltrials")
        assert project.run(*tasks) == set(tasks)
        rows = [json.loads(r) for r in project.path("data/examples/trials.jsonl").read_text().splitlines()]
        assert len({r["provenance"]["source_id"] for r in rows}) == 12  # every study the server had
        assert project.run(*tasks) == set()


@pytest.mark.parametrize("kind, api, params, body", [
    ("rxnorm", "rxnav", {"names": ["lisinopril"]}, b'{"drugGroup": {"conceptGroup": ["SCD"]}}'),
    ("fda_guidance", "fda", {"index_path": "guidance.json"}, b'[["not", "a", "row"]]'),
])
def test_nested_json_of_the_wrong_shape_is_one_line(fake, tmp_path, kind, api, params, body):
    fake._route = lambda api_, rest, q: (200, {"Content-Type": "application/json"}, body)
    with pytest.raises(SourceError, match="unexpected shape") as err:
        fetch(fake, tmp_path, kind, api, **params)
    one_line(err.value)
    assert RawStore(tmp_path / kind).pages() == []
