"""Every source parser on the REAL recorded responses in ../shared/fixtures (see PROVENANCE.md),
and on the documented-shape tests/fixtures/synthetic_* where no real capture exists."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.scrape import RawStore
from stages.sources import SourceError, make
from stages.sources._xml import UnsafeXml, iter_elements

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SYN = Path(__file__).resolve().parent / "fixtures"


def parsed(kind, path, **params):
    source = make(kind, kind, params)
    recs = list(source.parse(Path(path)))
    return source, recs


def tasks(source, record):
    ex = list(source.examples(record))
    for e in ex:
        assert e["messages"][-1]["role"] == "assistant" and e["messages"][-1]["content"].strip()
    assert len({e["task"] for e in ex}) == len(ex)  # normalize keys examples by (record, task)
    return [e["task"] for e in ex]


def test_pubmed_efetch_real():
    source, recs = parsed("pubmed", REAL / "pubmed/pubmed2.xml")
    assert [r["id"] for r in recs] == ["11748933", "11700088"]
    cryo = recs[0]
    assert cryo["journal"] == "Cryobiology" and cryo["year"] == "2001"
    assert "(P < 0.001)" in cryo["abstract"][0]["text"]  # entities decoded, inline text kept
    assert {"term": "Cryopreservation", "major": False, "qualifiers": ["methods"]} in cryo["mesh"]
    assert tasks(source, cryo) == ["pubmed_title", "pubmed_mesh"]
    _, recs1 = parsed("pubmed", REAL / "pubmed/pubmed1.xml")
    assert [r["id"] for r in recs1] == ["12091962", "9997"] and recs1[0]["abstract"] == []
    assert list(source.examples(recs1[0])) == []  # no abstract, no examples


def test_pubmed_structured_abstract_keeps_labels(tmp_path):
    text = (REAL / "pubmed/pubmed2.xml").read_text()
    text = text.replace("<AbstractText>This study subdivides", '<AbstractText Label="OBJECTIVE" NlmCategory="OBJECTIVE">'
                        "We studied <i>D. puntazzo</i> sperm.</AbstractText><AbstractText Label=\"CONCLUSIONS\" "
                        'NlmCategory="CONCLUSIONS">This study subdivides', 1)
    page = tmp_path / "synthetic_structured.xml"
    page.write_text(text)
    source, recs = parsed("pubmed", page)
    labels = [s["label"] for s in recs[0]["abstract"]]
    assert labels == ["OBJECTIVE", "CONCLUSIONS"] and recs[0]["abstract"][0]["text"] == "We studied D. puntazzo sperm."
    conclusion = next(e for e in source.examples(recs[0]) if e["task"] == "pubmed_conclusion")
    assert "OBJECTIVE: We studied" in conclusion["messages"][0]["content"]
    assert conclusion["messages"][1]["content"].startswith("This study subdivides")


@pytest.mark.parametrize("name, count, n_ids, webenv, errors", [
    ("esearch1.xml", 63, 20, None, []), ("esearch2.xml", 42249, 100, "MCID_6927d6e7fee3e90f880ec190", []),
    ("esearch3.xml", 2651, 6, None, []), ("esearch8.xml", 0, 0, None, ["abcXYZ"]),
    ("esearch_4c7a563ff5.json", 40362, 100, None, ["p.E1317Q"]), ("esearch_2ebc125ce8.json", 3, 3, None, []),
    ("esearch_a7c2c7880e.json", 1, 1, None, [])])
def test_esearch_real(name, count, n_ids, webenv, errors):
    from stages.sources.pubmed import parse_esearch

    got = parse_esearch((REAL / "pubmed" / name).read_bytes())
    assert (got["count"], len(got["ids"]), got["webenv"], got["errors"]) == (count, n_ids, webenv, errors)


def test_openfda_label_and_event_real():
    source, labels = parsed("openfda", REAL / "openfda/aspirin.json")
    assert labels[0]["id"] == "0025eb89-590c-4451-8a06-b129686cf75a" and labels[0]["generic_name"] == "ASPIRIN"
    assert "openfda_label_indications" in tasks(source, labels[0])
    _, events = parsed("openfda", REAL / "openfda/event_50242-051-death.json")
    ev = events[0]
    assert ev["id"] == "10003633" and ev["serious"] and ev["criteria"] == ["death"]
    assert ev["reactions"] == ["Nephrogenic systemic fibrosis"] and ev["sex"] == "male" and ev["age"].endswith("years")
    assert tasks(source, ev) == ["openfda_event_reactions", "openfda_event_seriousness"]
    _, sudafed = parsed("openfda", REAL / "openfda/sudafed.json")
    assert len(sudafed) == 1
    for empty in ("empty.json", "404.json", "500.json", "not_found_404.json", "faers_count_pembrolizumab_reaction_20260811.json"):
        assert parsed("openfda", REAL / "openfda" / empty)[1] == []  # errors, count queries, id-less rows: no records


def test_clinicaltrials_real_pages_and_single_study():
    source, page1 = parsed("clinicaltrials", REAL / "clinicaltrials/search_phelan_limit5_20260811.json")
    _, page2 = parsed("clinicaltrials", REAL / "clinicaltrials/search_phelan_next_20260811.json")
    assert len(page1) == len(page2) == 5 and page1[0]["id"] == "NCT02710084"
    assert page1[0]["conditions"] == ["Phelan-McDermid Syndrome"] and page1[0]["interventions"] == ["Oxytocin", "Saline"]
    _, (one,) = parsed("clinicaltrials", REAL / "clinicaltrials/get_nct06382129_20260811.json")
    inc, exc = one["criteria"]["inclusion"], one["criteria"]["exclusion"]
    assert inc[0] == "Inclusion Criteria:" and exc[0] == "Exclusion Criteria:"  # each part keeps its heading
    assert len(inc) == 1 + 12 and len(exc) == 1 + 26 and inc[2] == "2. Age ≥18 years old;"  # numbered items stay numbered
    assert "\\<" not in " ".join(inc + exc) and "11. Urine protein ≤2+ or < 1000mg/24h;" in inc
    assert tasks(source, one) == ["clinicaltrials_summary", "clinicaltrials_eligibility", "clinicaltrials_design"]


def test_dailymed_spl_real_and_listing_synthetic():
    source, (label,) = parsed("dailymed", REAL / "spl/cough.xml")
    assert label["id"] == "00f66f25-3469-4c16-9baf-fba21e9628bd" and label["name"] == "TRIAMINIC Childrens Night Time Cold and Cough"
    assert set(label["sections"]) >= {"indications", "dosage", "warnings", "boxed_warning", "active_ingredient", "purpose"}
    assert label["sections"]["boxed_warning"].startswith("TAMPER-EVIDENT FEATURE")
    assert "dailymed_indications" in tasks(source, label)
    assert parsed("dailymed", SYN / "synthetic_dailymed_spls.json")[1] == []  # listing: setids, no records


def test_fda_guidance_index_real_and_pdf(tmp_path):
    from stages.sources.fda_guidance import index_rows
    from tests.fakeapi import tiny_pdf

    rows = index_rows(json.loads((REAL / "fda_guidance/search-for-guidance-sample.json").read_text()))
    assert len(rows) == 4 and [r["media"] for r in rows] == [None, None, None, "120958"]
    assert rows[3]["status"] == "Final" and rows[3]["title"].startswith("Guidance for Industry: Voluntary Labeling")
    shutil.copy(REAL / "fda_guidance/search-for-guidance-sample.json", tmp_path / "index.json")
    (tmp_path / "doc-120958.pdf").write_bytes(tiny_pdf(["Guidance for Industry", "I. Introduction",
                                                         "This guidance helps manufacturers label foods."]))
    source, (doc,) = parsed("fda_guidance", tmp_path / "doc-120958.pdf")
    assert doc["title"] == rows[3]["title"] and doc["issued"] == rows[3]["issued"]
    assert "label foods" in doc["text"]
    assert tasks(source, doc) == ["fda_guidance_scope", "fda_guidance_facts"]


def test_stackexchange_wrapper_real_and_questions_synthetic(tmp_path):
    for name in ("test_users_associated.json", "test_stackoverflow_exists.json"):  # real wrappers, through the parser
        shutil.copy(REAL / "stackexchange" / name, tmp_path / "questions-00009.json")
        assert parsed("stackexchange", tmp_path / "questions-00009.json")[1] == []  # users and sites: no questions
    (tmp_path / "questions-00009.json").unlink()
    shutil.copy(SYN / "synthetic_stackexchange_questions.json", tmp_path / "questions-00001.json")
    shutil.copy(SYN / "synthetic_stackexchange_answers.json", tmp_path / "answers-00001.json")
    source, recs = parsed("stackexchange", tmp_path / "questions-00001.json")
    assert [r["id"] for r in recs] == ["1000", "1001"]  # 1002 has no answer
    assert recs[0]["accepted"] and recs[0]["answer"].startswith("NSAIDs such as ibuprofen inhibit COX-1")
    assert not recs[1]["accepted"] and recs[1]["score"] == 22  # top-voted when none is accepted
    assert tasks(source, recs[0]) == ["stackexchange_answer", "stackexchange_tags"]
    assert parsed("stackexchange", tmp_path / "answers-00001.json")[1] == []


def test_rxnorm_synthetic():
    source, (drugs,) = parsed("rxnorm", SYN / "synthetic_rxnav_drugs.json")
    assert drugs["id"] == "drugs:lisinopril" and tasks(source, drugs) == ["rxnorm_products", "rxnorm_brand_generic"]
    _, (rel,) = parsed("rxnorm", SYN / "synthetic_rxnav_allrelated.json")
    assert rel["related"]["BN"] == ["Prinivil", "Zestril"] and rel["name"] == "lisinopril 10 MG Oral Tablet"


def test_medlineplus_synthetic():
    source, recs = parsed("medlineplus", SYN / "synthetic_medlineplus_topics.xml")
    assert [r["id"] for r in recs] == ["17", "4"]  # English only by default
    assert "- Wheezing" in recs[0]["summary"] and "<" not in recs[0]["summary"]
    assert [r["id"] for r in parsed("medlineplus", SYN / "synthetic_medlineplus_topics.xml", language="Spanish")[1]] == ["1717"]
    assert tasks(source, recs[0]) == ["medlineplus_explain", "medlineplus_synonyms", "medlineplus_body_system"]


def test_drugbank_streams_a_multi_mb_file_in_constant_memory(tmp_path):
    import re
    import tracemalloc

    text = (SYN / "synthetic_drugbank.xml").read_text()
    head, drug = text[:text.index("<drug ")], re.search(r"<drug .*?\n</drug>\n", text, re.S).group(0)

    def stream(drugs: int) -> tuple[int, int]:
        """Write a DrugBank-shaped file of `drugs` drugs; fetch it into pages and parse them: (file size, peak bytes)."""
        big = tmp_path / f"full_database_{drugs}.xml"
        with open(big, "w", encoding="utf-8") as fh:
            fh.write(head)
            for i in range(drugs):
                fh.write(drug.replace("DB00722", f"DB{i:05d}"))
            fh.write("</drugbank>\n")
        source = make("db", "drugbank", {"path": str(big), "chunk": 25})
        store = RawStore(tmp_path / f"raw{drugs}")
        tracemalloc.start()
        try:
            source.fetch(store)
            assert sum(1 for page in store.pages() for _ in source.parse(page)) == drugs
            return big.stat().st_size, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, small_peak = stream(600)
    size, peak = stream(2400)
    assert size > 4_500_000 and size > 3.9 * small
    assert peak < size / 4 and peak < 1.2 * small_peak, f"peak {peak:,} B on {size:,} B, {small_peak:,} B on {small:,} B"


def test_drugbank_streams_and_refuses_entities(tmp_path):
    source = make("db", "drugbank", {"path": str(SYN / "synthetic_drugbank.xml"), "chunk": 1})
    store = RawStore(tmp_path / "raw")
    source.fetch(store)
    recs = [r for p in store.pages() for r in source.parse(p)]
    assert [r["id"] for r in recs] == ["DB00722", "DB00331"] and recs[0]["interactions"][1]["name"] == "Spironolactone"
    assert "drugbank_interactions" in tasks(source, recs[0])
    bomb = tmp_path / "bomb.xml"
    bomb.write_text('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
                    "<drugbank><drug><name>&b;</name></drug></drugbank>")
    xxe = tmp_path / "xxe.xml"
    xxe.write_text('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><drugbank><drug>&x;</drug></drugbank>')
    for evil in (bomb, xxe):
        with pytest.raises(UnsafeXml, match="refused"):
            list(source.parse(evil))
    with pytest.raises(SourceError, match="truncated"):
        list(iter_elements(b"<drugbank><drug><name>x</name>", {"drug"}))


@pytest.mark.parametrize("dataset, task", [("medmcqa", "medmcqa_mcq"), ("medqa", "medqa_mcq"), ("pubmedqa", "pubmedqa_decision")])
def test_hf_qa_synthetic_rows(dataset, task):
    source, recs = parsed("hf_qa", SYN / f"synthetic_{dataset}.jsonl", dataset=dataset)
    assert recs and all(tasks(source, r) == [task] for r in recs)
    if dataset == "medmcqa":
        assert len(recs) == 2  # the row without an answer key (cop = -1) is dropped
        assert "C. Atrophy" in list(source.examples(recs[0]))[0]["messages"][1]["content"]


def test_local_files_forms(tmp_path):
    rows = [{"instruction": "Define tachycardia.", "input": "", "output": "A heart rate above 100/min."},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            {"unrelated": 1}]
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "mine.csv").write_text("instruction,input,output\nWhat is BP?,,Blood pressure.\n")
    source = make("loc", "local_files", {"paths": [str(tmp_path / "mine.*")], "licence": "CC-BY-4.0"})
    store = RawStore(tmp_path / "raw")
    source.fetch(store)
    recs = [r for p in store.pages() for r in source.parse(p)]
    assert len(recs) == 4 and source.licence == "CC-BY-4.0"
    assert [{"role": "user", "content": "What is BP?"}, {"role": "assistant", "content": "Blood pressure."}] in \
        [r["messages"] for r in recs]
    assert [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}] in [r["messages"] for r in recs]


def minimal_pdf(path: Path, paragraphs: list[str]) -> Path:
    """A real PDF written by pypdf: one page of Helvetica text per paragraph."""
    from pypdf import PdfWriter
    from pypdf.generic import ContentStream, DictionaryObject, NameObject

    writer = PdfWriter()
    for para in paragraphs:
        page = writer.add_blank_page(612, 792)
        font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        content = ContentStream(None, writer)
        content.set_data(b"BT /F1 9 Tf 20 760 Td (" + para.encode("latin-1") + b") Tj ET")
        page.replace_contents(content)
    with open(path, "wb") as fh:
        writer.write(fh)
    return path


PARAGRAPHS = ["Hypertension. " + "Blood pressure above 140/90 mmHg on repeated readings defines hypertension. " * 4,
              "Lifestyle first. " + "Salt reduction, weight loss and exercise lower blood pressure by several mmHg. " * 4]


def test_local_files_pdf_becomes_passages(tmp_path):
    minimal_pdf(tmp_path / "notes.pdf", PARAGRAPHS)
    source = make("loc", "local_files", {"paths": [str(tmp_path / "*.pdf")], "chunk_chars": 400, "task": "notes"})
    store = RawStore(tmp_path / "raw")
    source.fetch(store)
    (page,) = store.pages()
    recs = list(source.parse(page))
    assert [r["passage"].split(".")[0] for r in recs] == ["Hypertension", "Lifestyle first"]
    assert all(len(r["passage"]) > 200 for r in recs) and recs[0]["document"] == page.name
    (example,) = source.examples(recs[0])
    assert example["task"] == "notes_continue" and "140/90" in example["messages"][0]["content"] + example["messages"][1]["content"]


def test_parse_command_works_for_every_new_kind(tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    shutil.copy(SYN / "synthetic_stackexchange_questions.json", pages / "questions-00001.json")  # a temp copy, not the repo
    shutil.copy(SYN / "synthetic_stackexchange_answers.json", pages / "answers-00001.json")
    shutil.copy(REAL / "fda_guidance/search-for-guidance-sample.json", pages / "index.json")
    from tests.fakeapi import tiny_pdf
    (pages / "doc-120958.pdf").write_bytes(tiny_pdf(["Guidance for Industry", "I. Introduction",
                                                     "This guidance helps manufacturers label foods."]))
    (pages / "mine.jsonl").write_text(json.dumps({"instruction": "Define tachycardia.", "output": "A heart rate above 100/min."}))
    cases = {"pubmed": REAL / "pubmed/pubmed2.xml", "openfda": REAL / "openfda/aspirin.json",
             "clinicaltrials": REAL / "clinicaltrials/get_nct06382129_20260811.json", "dailymed": REAL / "spl/cough.xml",
             "rxnorm": SYN / "synthetic_rxnav_drugs.json", "medlineplus": SYN / "synthetic_medlineplus_topics.xml",
             "drugbank": SYN / "synthetic_drugbank.xml", "hf_qa": SYN / "synthetic_medmcqa.jsonl",
             "stackexchange": pages / "questions-00001.json", "fda_guidance": pages / "doc-120958.pdf",
             "local_files": minimal_pdf(pages / "notes.pdf", PARAGRAPHS)}
    root = Path(__file__).resolve().parents[1]
    for kind, path in cases.items():
        out = subprocess.run([sys.executable, "-c", "import sys; from stages.cli import main; sys.exit(main(sys.argv[1:]))",
                              "parse", kind, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             env={**__import__("os").environ, "PYTHONPATH": str(root) + ":" + ":".join(sys.path)})
        assert out.returncode == 0, (kind, out.stderr)
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        assert lines and all(x["source"] == kind and x["provenance"]["kind"] == kind for x in lines), kind
