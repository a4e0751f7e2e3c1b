"""Parsers keep everything a real response says (issue 15).

Every recorded response in ../shared/fixtures goes through its parser: each text node of a parsed
section (SPL section titles and text at every depth, the ClinicalTrials.gov text fields the parser
claims, every PubMed abstract section) must reach the examples, and no Markdown escape, HTML tag or
entity may survive in any example. Where no real capture shows a case, tests/fixtures/synthetic_*
follow the API's documented shape.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from stages.sources import SourceError, make
from stages.sources.dailymed import SECTIONS

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SYN = Path(__file__).resolve().parent / "fixtures"
V3 = "{urn:hl7-org:v3}"

MARKDOWN_ESCAPE = re.compile(r"\\[!-/:-@\[-`{-~]")
HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,30}|#\d{1,7}|#x[0-9A-Fa-f]{1,6});")
EMPHASIS = re.compile(r"\*\*\S|\S\*\*|(?<![\w\\])_[^_\s][^_\n]*_(?!\w)")


def alnum(text: str) -> str:
    """Letters and digits only, case-folded: what must survive any rendering of a text."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def examples_of(kind: str, page: Path, **params) -> list[dict]:
    source = make(kind, kind, params)
    return [e for record in source.parse(page) for e in source.examples(record)]


def content(examples: list[dict]) -> str:
    return "\n".join(m["content"] for e in examples for m in e["messages"])


def assert_clean(examples: list[dict], where: str) -> None:
    for e in examples:
        for m in e["messages"]:
            text = m["content"]
            for name, pattern in (("Markdown escape", MARKDOWN_ESCAPE), ("HTML tag", HTML_TAG), ("entity", ENTITY),
                                  ("Markdown emphasis", EMPHASIS)):
                found = pattern.search(text)
                assert not found, f"{where}: {name} {found.group()!r} survives in {e['task']}: ...{text[max(0, found.start() - 60):found.end() + 60]}..."


def assert_kept(pieces: list[str], text: str, where: str) -> None:
    kept = alnum(text)
    lost = [p for p in pieces if alnum(p) and alnum(p) not in kept]
    assert not lost, f"{where}: {len(lost)} text node(s) dropped, e.g. {lost[:3]}"


# --- every recorded response: parsed cleanly, or refused in one line naming the file
NOT_PARSED = {"PROVENANCE.md", "biomcp-capture-receipts.json"}
KIND = {"pubmed": "pubmed", "openfda": "openfda", "spl": "dailymed", "clinicaltrials": "clinicaltrials",
        "rxnorm": "rxnorm", "drugbank": "drugbank", "fda_guidance": "fda_guidance", "stackexchange": "stackexchange"}
# what each refusal must say: PubMed answers other than EFetch are not article pages
REFUSED = {"pubmed/esearch1.xml": "ESearch", "pubmed/esearch2.xml": "ESearch", "pubmed/esearch3.xml": "ESearch",
           "pubmed/esearch8.xml": "ESearch", "pubmed/esearch_2ebc125ce8.json": "ESearch result",
           "pubmed/esearch_4c7a563ff5.json": "ESearch result", "pubmed/esearch_a7c2c7880e.json": "ESearch result",
           "pubmed/ratelimit_error.json": "API rate limit exceeded"}
FIXTURES = sorted(str(p.relative_to(REAL)) for p in REAL.rglob("*") if p.is_file() and p.name not in NOT_PARSED)


def page_for(rel: str, tmp_path: Path) -> Path:
    """The file as the pipeline would name it (Stack Exchange pages are questions-*.json, the guidance index index.json)."""
    src = REAL / rel
    names = {"stackexchange": "questions-00001.json", "fda_guidance": "index.json"}
    if rel.split("/")[0] in names:
        return Path(shutil.copy(src, tmp_path / names[rel.split("/")[0]]))
    return src


def test_fixture_list_is_complete():
    assert len(FIXTURES) >= 36 and {f.split("/")[0] for f in FIXTURES} == set(KIND)


@pytest.mark.parametrize("rel", FIXTURES)
def test_every_real_fixture_parses_cleanly_or_is_refused_in_one_line(rel, tmp_path):
    page = page_for(rel, tmp_path)
    kind = KIND[rel.split("/")[0]]
    if rel in REFUSED:
        with pytest.raises(SourceError) as err:
            examples_of(kind, page)
        message = str(err.value)
        assert "\n" not in message and str(page) in message and REFUSED[rel] in message and "EFetch" in message
        return
    examples = examples_of(kind, page)
    assert_clean(examples, rel)


def spl_nodes(section: ET.Element, top: bool) -> list[str]:
    """Every text node of a section's title and narrative, at every depth of its subsections."""
    nodes = []
    title = section.find(V3 + "title")
    if title is not None:
        texts = list(title.itertext())
        if top and texts:  # the answer's own heading loses its number ("6 ADVERSE REACTIONS")
            texts[0] = re.sub(r"^\s*\d{1,2}(?:\.\d{1,2})*\.?\s+", "", texts[0])
        nodes += texts
    text = section.find(V3 + "text")
    if text is not None:
        nodes += list(text.itertext())
    for component in section.findall(V3 + "component"):
        sub = component.find(V3 + "section")
        if sub is not None:
            nodes += spl_nodes(sub, False)
    return nodes


def labelled(section: ET.Element):
    code = section.find(V3 + "code")
    if code is not None and code.get("code") in SECTIONS:
        yield section
        return
    for component in section.findall(V3 + "component"):
        sub = component.find(V3 + "section")
        if sub is not None:
            yield from labelled(sub)


@pytest.mark.parametrize("rel", [f for f in FIXTURES if f.startswith("spl/")])
def test_spl_every_section_text_and_title_at_every_depth_reaches_the_examples(rel):
    examples = examples_of("dailymed", REAL / rel)
    by_task = {e["task"]: e["messages"][-1]["content"] for e in examples}
    root = ET.parse(REAL / rel).getroot()
    checked = 0
    for component in root.find(V3 + "component").find(V3 + "structuredBody").findall(V3 + "component"):
        for section in labelled(component.find(V3 + "section")):
            task = "dailymed_" + SECTIONS[section.find(V3 + "code").get("code")][0]
            nodes = [n for n in spl_nodes(section, True) if n.strip()]
            if nodes:
                assert task in by_task, f"{rel}: {task} missing"
                assert_kept(nodes, by_task[task], f"{rel} {task}")
                checked += len(nodes)
    assert checked > 10


@pytest.mark.parametrize("rel", [f for f in FIXTURES if f.startswith("clinicaltrials/")])
def test_clinicaltrials_every_claimed_text_field_reaches_the_examples(rel):
    doc = json.loads((REAL / rel).read_text())
    source = make("clinicaltrials", "clinicaltrials", {})
    records = {r["id"]: r for r in source.parse(REAL / rel)}
    for study in doc.get("studies") or [doc]:
        proto = study["protocolSection"]
        nct = proto["identificationModule"]["nctId"]
        examples = list(source.examples(records[nct]))
        text = content(examples)
        fields = [proto["identificationModule"].get("briefTitle", ""),
                  (proto.get("descriptionModule") or {}).get("briefSummary", ""),
                  (proto.get("eligibilityModule") or {}).get("eligibilityCriteria", "")]
        # line by line, list markers aside (Markdown renumbers nothing here, but a marker is not content)
        lines = [re.sub(r"^\s*(?:[-*+]|\d+[.)])\s+", "", line) for field in fields for line in field.splitlines()]
        assert_kept([x for x in lines if x.strip()], text, f"{rel} {nct}")
        if (proto.get("eligibilityModule") or {}).get("eligibilityCriteria"):
            assert "clinicaltrials_eligibility" in [e["task"] for e in examples], f"{rel} {nct}: no eligibility example"


@pytest.mark.parametrize("rel", ["pubmed/pubmed1.xml", "pubmed/pubmed2.xml"])
def test_pubmed_every_abstract_section_reaches_the_examples(rel):
    source = make("pubmed", "pubmed", {})
    records = {r["id"]: r for r in source.parse(REAL / rel)}
    root = ET.parse(REAL / rel).getroot()
    checked = 0
    for article in root.iter("PubmedArticle"):
        pmid = article.find("MedlineCitation/PMID").text
        nodes = [n for node in article.iter("AbstractText") for n in node.itertext() if n.strip()]
        if nodes:
            assert_kept(nodes, content(list(source.examples(records[pmid]))), f"{rel} {pmid}")
            checked += len(nodes)
    assert checked


# --- the cases the issue names
def test_spl_deep_subsections_and_titles_are_kept():
    (viagra,) = make("dailymed", "dailymed", {}).parse(REAL / "spl/viagra_rx_0b0be196_v20.xml")
    adverse = viagra["sections"]["adverse_reactions"]
    assert adverse.startswith("ADVERSE REACTIONS\n")  # the heading, its number gone
    trials = adverse[adverse.index("\n6.1 Clinical Trials Experience\n"):adverse.index("\n6.2 Postmarketing Experience\n")]
    assert len(trials) > 4400  # the per-trial subsections and both tables under 6.1
    assert "\nHeadache | 16% | 21% | 28% | 7%\n" in trials  # a table row, readable
    interactions = viagra["sections"]["interactions"]
    assert all(f"\n7.{i}" in interactions for i in range(1, 6)) and "Ritonavir" in interactions


def test_spl_otc_subsection_headings_label_their_lists():
    (cough,) = make("dailymed", "dailymed", {}).parse(REAL / "spl/cough.xml")
    warnings = cough["sections"]["warnings"].splitlines()
    ask = warnings.index("Ask a doctor before use if the child has")
    assert warnings[ask + 1] == "- heart disease • high blood pressure • thyroid disease"
    stop = warnings.index("Stop use and ask a doctor if")
    assert warnings[stop + 1] == "- nervousness, dizziness or sleeplessness occurs"
    assert "dailymed_do_not_use" not in {t for t in cough["sections"]}  # inside Warnings, not a second example
    assert "Do not use" in warnings and cough["sections"]["boxed_warning"].startswith("TAMPER-EVIDENT FEATURE")


def test_spl_five_titled_levels():
    (alyacen,) = make("dailymed", "dailymed", {}).parse(REAL / "spl/alyacen_rx_5c02b4d3_v7.xml")
    warnings = alyacen["sections"]["warnings"]
    order = ["1. Thromboembolic Disorders and Other Vascular Problems", "a. Myocardial Infarction", "e. Persistence of risk"]
    assert [warnings.index(x) for x in order] == sorted(warnings.index(x) for x in order)


def test_clinicaltrials_markdown_rendered_and_eligibility_variants():
    source = make("clinicaltrials", "clinicaltrials", {})
    (study,) = source.parse(SYN / "synthetic_ctgov_markdown_study.json")
    assert study["title"] == "Dose *Finding* of Drug X in Adults >= 65"
    assert study["summary"] == ("This phase 2 study tests Drug X [an oral anticoagulant] in adults:\n- with atrial "
                                "fibrillation\n- aged >= 65 years\nDoses are titrated to an INR of 2*3 < 4.")
    criteria = study["criteria"]
    assert criteria["preamble"] == ["Participants are screened over 2 weeks."]  # text before the first heading
    assert criteria["inclusion"] == ["INCLUSION CRITERIA:", "- Age >= 65 years", "- Atrial fibrillation on ECG, either:",
                                     "  - paroxysmal, or", "  - persistent", "- Signed informed consent"]
    assert criteria["exclusion"] == ["EXCLUSION CRITERIA:", "1. Active bleeding", "2. Creatinine clearance < 30 mL/min"]
    answer = next(e for e in source.examples(study) if e["task"] == "clinicaltrials_eligibility")["messages"][1]["content"]
    assert answer.startswith("Participants are screened over 2 weeks.\nINCLUSION CRITERIA:\n") and answer.endswith("Age: 65 Years.")

    (key,) = source.parse(REAL / "clinicaltrials/aact_study_NCT02210780.json")
    assert key["criteria"]["inclusion"][0] == "Key Inclusion Criteria:" and key["criteria"]["exclusion"][0] == "Key Exclusion Criteria:"
    assert "[Eichenfeld 2004]" in key["criteria"]["inclusion"][1] and "2. Patients needing >10 mg" in key["criteria"]["exclusion"][2]
    (lower,) = source.parse(REAL / "clinicaltrials/aact_study_NCT03630471.json")
    assert lower["criteria"]["inclusion"][:2] == ["Eligibility criteria:", "For adolescent participants:"]
    assert lower["criteria"]["exclusion"][0] == "Exclusion criteria:"
    (nested,) = source.parse(REAL / "clinicaltrials/aact_studies_NCT06388018.json")
    inc = nested["criteria"]["inclusion"]
    cohort = inc.index("  - Cohort A1:")
    assert inc[cohort + 1].startswith("    - Stage IA (not confined to polyp), grade 3, pN0")  # sub-items stay under theirs


def test_pubmed_inequalities_and_sub_superscripts_keep_their_meaning():
    source = make("pubmed", "pubmed", {})
    (rec,) = source.parse(SYN / "synthetic_pubmed_efetch_markup.xml")
    text = {s["label"]: s["text"] for s in rec["abstract"]}
    assert rec["title"] == "Serum CO2 and in vivo outcomes in adults aged ≥65 years."
    assert text["METHODS"] == "We enrolled adults aged ≥65 years with platelets ≤150 × 10^9/L."
    assert "(p_trend = 0.01; OR_Q3 1.4, 95% CI 1.1-1.8; HbA_1c unchanged)" in text["RESULTS"]
    assert text["CONCLUSIONS"] == "Low CO2 marks risk at ≤22 mmol/L."
    assert_clean(list(source.examples(rec)), "synthetic pubmed")


def test_pubmed_parse_command_on_an_esearch_answer_says_what_it_is(tmp_path):
    root = Path(__file__).resolve().parents[1]
    page = REAL / "pubmed/esearch_4c7a563ff5.json"
    out = subprocess.run([sys.executable, "-c", "import sys; from stages.cli import main; sys.exit(main(sys.argv[1:]))",
                          "parse", "pubmed", str(page)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "PYTHONPATH": str(root) + ":" + ":".join(sys.path)})
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert str(page) in out.stderr and "ESearch" in out.stderr and "well-formed" not in out.stderr


def test_openfda_section_numbers_go_and_text_ages_do_not_crash():
    source = make("openfda", "openfda", {})
    (label,) = source.parse(SYN / "synthetic_openfda_label_plr.json")
    answers = {e["task"]: e["messages"][1]["content"] for e in source.examples(label)}
    assert answers["openfda_label_indications"] == "According to the FDA label: INDICATIONS AND USAGE VIAGRA is indicated for the treatment of erectile dysfunction."
    assert answers["openfda_label_warnings"].startswith("According to the FDA label: WARNINGS AND PRECAUTIONS 5.1 Cardiovascular")
    assert answers["openfda_label_adverse_reactions"].startswith("According to the FDA label: ADVERSE REACTIONS The most")
    unknown, known = source.parse(SYN / "synthetic_openfda_event_text_age.json")
    assert unknown["age"] == "" and unknown["sex"] == "female" and known["age"] == "45 years"
    assert "female" in list(source.examples(unknown))[0]["messages"][0]["content"]


def test_rxnav_ids_come_from_the_request_when_the_answer_leaves_them_out(tmp_path):
    source = make("rxnorm", "rxnorm", {})
    drugs = Path(shutil.copy(SYN / "synthetic_rxnav_drugs_name_null.json", tmp_path / "drugs-metformin.json"))
    (rec,) = source.parse(drugs)
    assert rec["id"] == "drugs:metformin" and rec["query"] == "metformin" and len(rec["products"]) == 3
    assert "rxnorm_products" in [e["task"] for e in source.examples(rec)]
    related = Path(shutil.copy(SYN / "synthetic_rxnav_allrelated_rxcui_empty.json", tmp_path / "allrelated-861007.json"))
    (rel,) = source.parse(related)
    assert rel["id"] == "allrelated:861007" and rel["name"] == "metformin hydrochloride 500 MG Oral Tablet"
    assert rel["related"]["BN"] == ["Glucophage"]
    for unnamed in (SYN / "synthetic_rxnav_drugs_name_null.json", SYN / "synthetic_rxnav_allrelated_rxcui_empty.json"):
        with pytest.raises(SourceError, match="rename it after"):
            list(source.parse(unnamed))  # nothing in the answer or the name says what was asked
    (real,) = source.parse(REAL / "rxnorm/allrelated_866350_pillfill.json")
    assert real["id"] == "allrelated:866350" and real["related"]["IN"] == ["Ketotifen"]


def test_drugbank_markdown_lists_kept_and_reference_markers_gone(tmp_path):
    source = make("db", "drugbank", {})
    (rec,) = source.parse(SYN / "synthetic_drugbank_markdown.xml")
    assert rec["indication"] == ("Metformin is indicated:\n"
                                 "- as an adjunct to diet and exercise to improve glycemic control in adults with type 2 "
                                 "diabetes mellitus,\n- in pediatric patients 10 years and older with type 2 diabetes.\n"
                                 "It is not indicated for type 1 diabetes.")
    assert rec["mechanism_of_action"].splitlines()[1:] == ["1. it activates AMP-activated protein kinase (AMPK),",
                                                           "2. it reduces intestinal glucose absorption."]
    assert rec["description"] == "Metformin is a biguanide used to treat type 2 diabetes."
    assert rec["toxicity"] == "Overdose may cause lactic acidosis (lactate >5 mmol/L)."
    assert rec["interactions"][0]["description"].startswith("The risk or severity of hyperglycemia")
    assert_clean(list(source.examples(rec)), "synthetic drugbank")


# --- wrong-shaped input: one line naming the file and what was expected
WRONG = [("pubmed", "page.xml", "<eSearchResult><Count>1</Count></eSearchResult>", "EFetch"),
         ("pubmed", "page.xml", "<html><body>Service unavailable</body></html>", "PubmedArticleSet"),
         ("openfda", "page.json", "[1, 2]", "openFDA answer"),
         ("openfda", "page.json", '{"results": {"a": 1}}', "expected a list"),
         ("clinicaltrials", "page.json", '{"study": {}}', "ClinicalTrials.gov v2"),
         ("dailymed", "page.xml", "<html/>", "SPL document"),
         ("dailymed", "page.json", '{"items": []}', "spls.json listing"),
         ("rxnorm", "page.json", '{"idGroup": {}}', "RxNav answer"),
         ("drugbank", "page.xml", "<html/>", "DrugBank XML"),
         ("medlineplus", "page.xml", "<html/>", "health topics"),
         ("clinicaltrials", "page.json", "{not json", "not valid JSON")]


@pytest.mark.parametrize("kind, name, body, expected", WRONG)
def test_wrong_shaped_input_is_one_clear_line(kind, name, body, expected, tmp_path):
    page = tmp_path / name
    page.write_text(body)
    with pytest.raises(SourceError) as err:
        list(make(kind, kind, {}).parse(page))
    message = str(err.value)
    assert "\n" not in message and str(page) in message and expected in message
