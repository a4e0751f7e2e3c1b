"""fetch() of the remaining network sources against the local fake API: pages, checkpoint, records."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from stages import http
from stages.scrape import RawStore
from stages.sources import SourceError, make, openfda
from tests.fakeapi import FIXTURES, SYNTHETIC, FakeApi


@pytest.fixture(scope="module")
def fake():
    with FakeApi(records=30, scale=10) as server:
        server.se_quota = 10_000
        yield server


def fetch(fake, tmp_path, kind, api, **params):
    source = make(kind, kind, {"base_url": fake.url(api), "rate": 30, "backoff": 0.02, "lock_dir": str(tmp_path / "l"), **params})
    store = RawStore(tmp_path / kind)
    source.fetch(store)
    return source, store, [r for p in store.pages() for r in source.parse(p)]


def usage_file(tmp_path, api):
    return next((tmp_path / "l").glob(f"{api}-*.usage.json"))


def next_day(tmp_path, api):
    """Pretend the UTC day of the stored usage is over."""
    path = usage_file(tmp_path, api)
    path.write_text(json.dumps({**json.loads(path.read_text()), "day": "2000-01-01"}))


def test_dailymed_listing_then_spls(fake, tmp_path):
    listing = json.loads((SYNTHETIC / "synthetic_dailymed_spls.json").read_text())
    fake.inject("dailymed", "html200", "truncated")
    _, store, recs = fetch(fake, tmp_path, "dailymed", "dailymed", page_size=2, max_labels=3)
    first = json.loads(store.page_path("spls-00001.json").read_bytes())
    assert first["data"] == listing["data"] and first["metadata"].keys() == listing["metadata"].keys()
    setids = [r["setid"] for r in listing["data"]] + ["22222222-0000-4000-8000-000000000000"]
    assert [p.name for p in store.pages()] == sorted([f"spl-{s}.xml" for s in setids] + ["spls-00001.json", "spls-00002.json"])
    assert [r["id"] for r in recs] == sorted(setids)  # the first listed setid is the real SPL, served as recorded
    assert store.checkpoint["pending"] == [] and recs[0]["sections"]["indications"].startswith("Uses")


def test_rxnorm_names_then_allrelated(fake, tmp_path):
    fake.inject("rxnav", "503")
    _, store, recs = fetch(fake, tmp_path, "rxnorm", "rxnav", names=["lisinopril", "nosuchdrug"], related_per_name=2)
    assert [p.name for p in store.pages()] == ["allrelated-314076.json", "allrelated-314077.json",
                                               "drugs-lisinopril.json", "drugs-nosuchdrug.json"]
    assert {r["id"] for r in recs} == {"drugs:lisinopril", "allrelated:314076", "allrelated:314077"}


def test_stackexchange_questions_then_answers(fake, tmp_path):
    fake.inject("stackexchange", "se-throttle")
    _, store, recs = fetch(fake, tmp_path, "stackexchange", "stackexchange", page_size=2)
    assert [p.name for p in store.pages()] == ["answers-00001.json", "questions-00001.json", "questions-00002.json"]
    assert [r["id"] for r in recs] == ["1000", "1001"] and store.checkpoint["done"]


def test_stackexchange_real_wrappers_through_client_and_parser(tmp_path):
    recorded = [FIXTURES / "stackexchange" / n for n in ("test_users_associated.json", "test_stackoverflow_exists.json")]
    with FakeApi(scale=10) as fake:
        fake.se_replay = recorded  # questions pages 1 and 2 are the recorded wrappers, byte for byte
        fake.inject("stackexchange", "se-backoff")  # page 1 also asks for `backoff: 1`
        _, store, recs = fetch(fake, tmp_path, "stackexchange", "stackexchange", max_pages=0)
        times = [r["t"] for r in fake.requests("stackexchange")]
    assert [p.name for p in store.pages()] == ["questions-00001.json", "questions-00002.json"]  # has_more: true, then false
    assert store.page_path("questions-00002.json").read_bytes() == recorded[1].read_bytes()
    assert len(times) == 2 and times[1] - times[0] >= 0.95  # the backoff held the next call back
    assert json.loads(usage_file(tmp_path, "stackexchange").read_text())["quota_remaining"] == 9997  # the last wrapper's
    assert recs == [] and store.checkpoint["done"]  # user and site items are no questions: parsed, none kept


def test_stackexchange_quota_runs_out_then_resumes_next_day(tmp_path):
    with FakeApi(scale=10) as fake:
        fake.se_quota = 3
        with pytest.raises(http.QuotaExhausted, match=r"quota_remaining 0.*midnight UTC.*STACKEXCHANGE_KEY"):
            fetch(fake, tmp_path, "stackexchange", "stackexchange", page_size=1)
        wrappers = [r["status"] for r in fake.requests("stackexchange")]
        assert wrappers == [200, 200, 200]  # quota_remaining 2, 1, 0: the client stops before a refused call
        with pytest.raises(http.QuotaExhausted):  # a resumed run the same day sends nothing
            fetch(fake, tmp_path, "stackexchange", "stackexchange", page_size=1)
        assert len(fake.requests("stackexchange")) == 3
        next_day(tmp_path, "stackexchange")
        fake.se_quota = 100
        _, store, recs = fetch(fake, tmp_path, "stackexchange", "stackexchange", page_size=1)
    assert [r["id"] for r in recs] == ["1000", "1001"] and store.checkpoint["done"]


def test_openfda_daily_limit_is_counted_across_resumed_runs(fake, tmp_path):
    assert http.Client("x", "openfda", {}, env={}, dotenv="/nonexistent", lock_dir=tmp_path).daily_limit == 1000
    assert http.Client("x", "stackexchange", {}, env={}, dotenv="/nonexistent", lock_dir=tmp_path).daily_limit == 300
    before = len(fake.requests("openfda"))
    for _ in range(2):  # the second run, the same day, stops before sending anything
        with pytest.raises(http.QuotaExhausted, match="3 requests sent today.*without a key is 3.*resumes"):
            fetch(fake, tmp_path, "openfda", "openfda", limit=4, max_records=0, daily_limit=3)
    assert len(fake.requests("openfda")) - before == 3
    next_day(tmp_path, "openfda")  # a new UTC day: the count starts again, and the scrape resumes where it stopped
    _, store, recs = fetch(fake, tmp_path, "openfda", "openfda", limit=4, max_records=0, daily_limit=5)
    assert len({r["id"] for r in recs}) == len(recs) == 30 and len(fake.requests("openfda")) - before == 8
    assert json.loads(usage_file(tmp_path, "openfda").read_text())["requests"] == 5


def test_openfda_pages_past_the_skip_cap_with_search_after(tmp_path, monkeypatch):
    monkeypatch.setattr(openfda, "SKIP_MAX", 8)  # the server refuses skip > 8, as the real one refuses > 25,000
    with FakeApi(records=30, scale=10, openfda_skip_max=8) as fake:
        _, store, recs = fetch(fake, tmp_path, "openfda", "openfda", limit=4, max_records=0)
        sent = [r["query"] for r in fake.requests("openfda")]
    assert len({r["id"] for r in recs}) == len(recs) == 30  # 18 of them lie past the skip cap
    assert "skip" not in sent[0] and "search_after" not in sent[0]  # page 1: plain paging, from the start
    assert all(q["search_after"] and q["skip"] == "0" for q in sent[1:])  # then the Link header's cursor
    assert store.checkpoint["done"] and "api_key" not in json.dumps(store.checkpoint)


def test_openfda_without_link_pages_by_skip_and_says_where_the_cap_stops_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(openfda, "SKIP_MAX", 8)
    with FakeApi(records=10, scale=10, openfda_link=False, openfda_skip_max=8) as fake:
        _, _, recs = fetch(fake, tmp_path / "all", "openfda", "openfda", limit=4, max_records=0)
        assert [r["query"].get("skip", "0") for r in fake.requests("openfda")] == ["0", "4", "8"]
    assert len({r["id"] for r in recs}) == 10 and "warning" not in capsys.readouterr().out
    with FakeApi(records=30, scale=10, openfda_link=False, openfda_skip_max=8) as fake:
        _, store, recs = fetch(fake, tmp_path / "capped", "openfda", "openfda", limit=4, max_records=0)
        assert max(int(r["query"].get("skip", 0)) for r in fake.requests("openfda")) == 8  # no refused skip
    warning = capsys.readouterr().out
    assert len(recs) == 12 and store.checkpoint["done"]
    assert "openfda: warning" in warning and "12 of 30 records" in warning and "params.search" in warning


def test_openfda_404_not_found_is_no_results_not_a_failure(fake, tmp_path):
    _, store, recs = fetch(fake, tmp_path, "openfda", "openfda", search="brand_name:NOMATCH")
    answered = [r["status"] for r in fake.requests("openfda") if "NOMATCH" in r["query"].get("search", "")]
    assert answered == [404] and recs == [] and store.pages() == [] and store.checkpoint["done"]
    source = make("odd", "openfda", {"base_url": fake.url("nosuchapi"), "lock_dir": str(tmp_path / "l")})
    with pytest.raises(SourceError, match=r"odd: openFDA answered 404 \(no error code\)"):  # any other 404 is an error
        source.fetch(RawStore(tmp_path / "odd"))


def test_fda_guidance_index_then_pdf(fake, tmp_path):
    fake.inject("fda", "html200")  # a maintenance page instead of the PDF is retried
    _, store, recs = fetch(fake, tmp_path, "fda_guidance", "fda", index_path="guidance.json", status="Final")
    assert [p.name for p in store.pages()] == ["doc-120958.pdf", "index.json"]
    assert recs[0]["title"].startswith("Guidance for Industry: Voluntary Labeling") and "help food" in recs[0]["text"]


def test_medlineplus_discovers_latest_file(fake, tmp_path):
    _, store, recs = fetch(fake, tmp_path, "medlineplus", "medlineplus")
    assert [p.name for p in store.pages()] == ["mplus_topics_2024-03-05.xml"] and len(recs) == 2


def test_pubmed_splits_over_cap_ranges_and_survives_expired_webenv(tmp_path):
    with FakeApi(records=40, scale=10, pubmed_cap=15) as fake:
        source = make("pubmed", "pubmed", {"base_url": fake.url("ncbi"), "rate": 30, "term": "x", "batch": 10,
                                           "mindate": "2020/01/01", "maxdate": "2020/12/31", "query_cap": 15,
                                           "lock_dir": str(tmp_path / "l")})
        store = RawStore(tmp_path / "pm")
        fake.webenvs.clear()
        original = fake._api_ncbi

        def forgetful(rest, q):  # the history server forgets every WebEnv: efetch must POST the ids
            fake.webenvs.clear() if rest == "efetch.fcgi" else None
            return original(rest, q)
        fake._api_ncbi = forgetful
        source.fetch(store)
        recs = [r for p in store.pages() for r in source.parse(p)]
        assert len({r["id"] for r in recs}) == len(recs) == 40
        assert any(r["method"] == "POST" for r in fake.requests("ncbi"))
        counts = [int(r["query"].get("retmax", 0)) for r in fake.requests("ncbi") if r["path"] == "esearch.fcgi"]
        assert max(counts) <= 15  # every range fits under the cap


def test_pubmed_single_day_over_the_cap_is_not_cut_silently(tmp_path, capsys):
    with FakeApi(records=12, scale=10, pubmed_cap=5) as fake:
        fake.pubmed = [(pmid, dt.date(2020, 3, 1), xml) for pmid, _, xml in fake.pubmed]  # all on one day
        _, _, recs = fetch(fake, tmp_path, "pubmed", "ncbi", term="x", mindate="2020/03/01", maxdate="2020/03/02",
                           query_cap=5, batch=5)
    assert len(recs) == 5
    out = capsys.readouterr().out
    assert "pubmed: warning: 2020/03/01 alone has 12 hits, over esearch's 5 cap" in out and "params.term" in out


def test_hf_qa_from_a_local_copy_through_datasets(tmp_path):
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "synthetic_medmcqa.jsonl"
    source = make("mcq", "hf_qa", {"dataset": "medmcqa", "path": str(path), "chunk": 2})
    assert source.network is False
    store = RawStore(tmp_path / "mcq")
    source.fetch(store)
    assert [p.name for p in store.pages()] == ["rows-00000.jsonl", "rows-00001.jsonl"]
    assert len([r for p in store.pages() for r in source.parse(p)]) == 2
