"""fetch() of the remaining network sources against the local fake API: pages, checkpoint, records."""
from __future__ import annotations

import pytest

from stages.scrape import RawStore
from stages.sources import make
from tests.fakeapi import FakeApi


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


def test_dailymed_listing_then_spls(fake, tmp_path):
    fake.inject("dailymed", "html200", "truncated")
    _, store, recs = fetch(fake, tmp_path, "dailymed", "dailymed", page_size=2, max_labels=3)
    names = [p.name for p in store.pages()]
    assert names[:2] == ["spl-22222222-0000-4000-8000-000000000000.xml", "spl-22222222-0000-4000-8000-000000000001.xml"]
    assert sum(n.startswith("spls-") for n in names) == 2 and len(recs) == 3
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


def test_hf_qa_from_a_local_copy_through_datasets(tmp_path):
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "synthetic_medmcqa.jsonl"
    source = make("mcq", "hf_qa", {"dataset": "medmcqa", "path": str(path), "chunk": 2})
    assert source.network is False
    store = RawStore(tmp_path / "mcq")
    source.fetch(store)
    assert [p.name for p in store.pages()] == ["rows-00000.jsonl", "rows-00001.jsonl"]
    assert len([r for p in store.pages() for r in source.parse(p)]) == 2
