"""Decontamination: training examples that copy a scored test item are dropped, with a reason, and counted.

The core (stages.decontaminate.check) on hand-made items; the split stage with two adapters sharing a
source; and the real graph (`doit split`) with exact and near copies of test items planted in a source.
"""
from __future__ import annotations

import orjson
import pytest

from stages import config, decontaminate, io, layout, split
from stages.decontaminate import ScoredItem

SETTINGS = {"threshold": 0.8, "num_perm": 128, "shingle_words": 5}
QUESTION = ("A 54-year-old man with crushing central chest pain radiating to the left arm for forty minutes, "
            "sweating and nauseated, has ST elevation in leads II, III and aVF. Which artery is most likely occluded?")
ANSWER = "B. The right coronary artery, which supplies the inferior wall in most people (right-dominant circulation)."


def example(i: str, question: str, answer: str = "An answer.") -> dict:
    return {"id": i, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def words(n: int, seed: int) -> str:
    """n words no other call shares a 13-gram with (a distinct vocabulary per seed)."""
    return " ".join(f"w{seed}x{k}" for k in range(n))


def run_check(train: list[dict], tests: list[dict]) -> tuple[list[str], dict[str, tuple[str, str]]]:
    kept, dropped = decontaminate.check(train, [ScoredItem("qa/test", t) for t in tests], SETTINGS)
    return [r["id"] for r in kept], {d["id"]: (d["reason"], d["test_id"]) for d in dropped}


# --- the core
def test_exact_and_near_copies_are_dropped_with_their_reason_and_clean_items_kept():
    test = example("t1", QUESTION, ANSWER)
    train = [
        example("exact", QUESTION, ANSWER),
        example("shouting", QUESTION.upper().replace(",", ""), ANSWER.upper()),  # normalization: case, punctuation
        example("one_word_changed", QUESTION.replace("forty", "thirty"), ANSWER),  # a near copy: MinHash
        example("reworded_answer", QUESTION, "Right coronary artery (inferior STEMI)."),  # the question copied
        example("embedded", "Exam practice. " + QUESTION + " Explain briefly.", "RCA."),
        example("clean", "Which ECG leads look at the lateral wall of the heart?", "I, aVL, V5 and V6."),
        # an answer shared alone is no copy: templated sources give different questions one answer
        example("same_answer_other_question", "Which artery is blocked in an inferior myocardial infarction?", ANSWER),
    ]
    kept, dropped = run_check(train, [test])
    assert kept == ["clean", "same_answer_other_question"]
    near, overlap = "near-duplicate (MinHash) of qa/test", "13-gram overlap with qa/test"
    assert dropped == {"exact": (near, "t1"), "shouting": (near, "t1"), "one_word_changed": (near, "t1"),
                       "reworded_answer": (overlap, "t1"), "embedded": (overlap, "t1")}


def test_a_short_question_matches_on_its_whole_text():
    tests = [example("t1", "Is ICD-10-CM code A00.1 billable?", "Yes.")]
    train = [example("copy", "is icd-10-cm code a00.1 billable", "It is billable: valid on a claim."),
             example("in_a_longer_prompt", "Quick one. Is ICD-10-CM code A00.1 billable? Thanks", "yes"),
             example("another_code", "Is ICD-10-CM code A00.9 billable?", "Yes."),
             example("part_of_it", "Is ICD-10-CM code A00.1", "It is a code.")]
    kept, dropped = run_check(train, tests)
    assert set(dropped) == {"copy", "in_a_longer_prompt"} and kept == ["another_code", "part_of_it"]


def test_sharing_one_13_gram_or_template_text_is_not_a_copy():
    template = "Calculate the early warning score for this ward patient and give the clinical risk and response."
    tests = [example("t1", f"{template} {words(30, 0)}")]
    train = [example(f"same_template_{i}", f"{template} {words(30, i + 1)}") for i in range(decontaminate.MAX_DF + 1)]
    half = words(30, 0).split()[:15]  # 15 of the test question's 30 own words: 3 of its 18 non-template 13-grams
    train.append(example("shares_a_little", " ".join(half + words(30, 99).split())))
    train.append(example("copy", f"{template} {words(30, 0)}", "A reworded answer."))
    kept, dropped = run_check(train, tests)
    assert list(dropped) == ["copy"] and len(kept) == decontaminate.MAX_DF + 2


def test_each_dropped_example_names_the_test_set_it_copies_and_the_summary_counts_them():
    tests = [ScoredItem("coding/test", example("c1", QUESTION, ANSWER)),
             ScoredItem("medqa (qa/test)", example("m1", "Which nerve supplies the diaphragm? " + words(20, 5), "C3-5."))]
    train = [example("a", QUESTION, ANSWER), example("b", "Which nerve supplies the diaphragm? " + words(20, 5), words(20, 7)),
             example("c", "Something else entirely, with words of its own: " + words(20, 6))]
    kept, dropped = decontaminate.check(train, tests, SETTINGS)
    assert [r["id"] for r in kept] == ["c"]
    for d in dropped:
        d["split"] = "train"
    report = decontaminate.summary(dropped, {"train": 3, "val": 0}, tests, SETTINGS)
    assert report["dropped"] == {"near-duplicate (MinHash) of coding/test": 1, "13-gram overlap with medqa (qa/test)": 1}
    assert report["dropped_total"] == 2 and report["test_items"] == {"coding/test": 1, "medqa (qa/test)": 1}
    assert [(d["id"], d["test_id"]) for d in report["dropped_examples"]] == [("a", "c1"), ("b", "m1")]
    assert report["settings"]["ngram"] == 13 and report["settings"]["threshold"] == 0.8


def test_nothing_to_check_against_keeps_everything():
    train = [example("a", QUESTION, ANSWER)]
    assert decontaminate.check(train, [], SETTINGS) == (train, [])
    assert decontaminate.check([], [ScoredItem("qa/test", train[0])], SETTINGS) == ([], [])


# --- the split stage: every adapter's test split, without reading another split's files
SOURCES = """
[sources.shared]
kind = "news2"
adapters = ["one", "two"]
"""


def row(i: int) -> dict:
    text = f"Patient {i} ({'even' if i % 2 == 0 else 'odd'}): " + words(20, i)
    return {"id": f"shared:p{i}:score", "source": "shared", "task": "score", "cluster": f"shared:p{i}",
            "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": f"Score {i}."}],
            "provenance": {"source": "shared", "source_id": f"p{i}"}}


@pytest.fixture
def two_adapters(tmp_path, monkeypatch):
    (tmp_path / "sources.toml").write_text(SOURCES)
    for name, data in (("one", ""), ("two", '[data]\nkeywords = ["even"]\n')):  # other rows: other placements
        (tmp_path / "adapters" / name).mkdir(parents=True)
        (tmp_path / "adapters" / name / "adapter.toml").write_text(data)
    monkeypatch.chdir(tmp_path)
    io.write_jsonl(layout.dedup_file(), [row(i) for i in range(200)])
    return tmp_path


def test_a_source_feeding_two_adapters_trains_neither_on_the_others_test_split(two_adapters):
    # split:two runs first: split:one works out two's test split from the data and two's ledger alike
    for order in (("two", "one"), ("one", "two")):
        for name in order:
            layout.split_ledger(name).unlink(missing_ok=True)
        stats = {name: split.run(config.load(), name) for name in order}
        files = {name: {part: {r["id"] for r in io.read_jsonl(layout.split_file(name, part))} for part in layout.SPLITS}
                 for name in order}
        for name, other in (("one", "two"), ("two", "one")):
            learned = files[name]["train"] | files[name]["val"]
            assert not learned & files[other]["test"]  # nothing of the other's test split is learned
            report = stats[name]["decontamination"]
            dropped = {d["id"] for d in report["dropped_examples"]}
            assert dropped and dropped <= files[other]["test"] - files[name]["test"]
            assert report["dropped"] == {f"near-duplicate (MinHash) of {other}/test": len(dropped)}
            assert report["test_items"] == {f"{name}/test": len(files[name]["test"]),
                                            f"{other}/test": len(files[other]["test"])}
            assert stats[name]["splits"]["train"] + stats[name]["splits"]["val"] + len(dropped) == \
                report["checked"]["train"] + report["checked"]["val"]
            card = (layout.split_dir(name) / "README.md").read_text()
            assert "## Decontamination" in card and f"| near-duplicate (MinHash) of {other}/test | {len(dropped)} |" in card
            assert report["dropped_examples"][0]["id"] in card  # a few ids, for a person to check


def test_a_benchmark_item_is_named_by_its_benchmark(two_adapters):
    (two_adapters / "sources.toml").write_text(SOURCES + '\n[sources.exam]\nkind = "hf_qa"\nadapters = ["one"]\n'
                                               '[sources.exam.params]\ndataset = "medqa"\n')
    cfg = config.load()
    assert split.scored_label(cfg, "one", {"source": "exam"}) == "medqa (one/test)"
    assert split.scored_label(cfg, "one", {"source": "shared"}) == "one/test"


# --- the real graph: copies planted in a training source
def test_planted_copies_of_test_items_are_dropped_and_counted(tmp_path):
    from tests.models import make_tiny_model
    from tests.pipeline_project import Project

    (tmp_path / "project").mkdir()
    project = Project(tmp_path / "project", base_model=str(make_tiny_model(tmp_path / "tiny")))
    project.doit("split")
    tests = {a: list(io.read_jsonl(project.path(f"data/splits/{a}/test.jsonl")))
             for a in ("clinical_coding", "clinical_decision")}
    planted, copies = [], {}
    for adapter, rows in tests.items():
        for k, t in enumerate(rows[:6]):
            question, answer = t["messages"][-2]["content"], t["messages"][-1]["content"]
            variants = {"exact": (question, answer), "reworded": (question, f"In short: {answer.split('.')[0]}."),
                        "embedded": (f"Practice question. {question} Answer briefly.", "See the chart.")}
            kind = list(variants)[k % 3]
            copies[f"{adapter}:{k}"] = (kind, t["id"], adapter)
            q, a = variants[kind]
            planted.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                            "id": f"{adapter}:{k}"})
    clean = [{"messages": [{"role": "user", "content": f"Name a first-line treatment for condition number {i}, "
                                                      f"a question of its own."},
                           {"role": "assistant", "content": f"Treatment {i}."}]} for i in range(12)]
    (project.root / "plant.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in planted + clean))
    with open(project.root / "sources.toml", "a") as fh:
        fh.write('\n[sources.plant]\nkind = "local_files"\nadapters = ["clinical_coding", "clinical_decision"]\n'
                 '[sources.plant.params]\npaths = ["plant.jsonl"]\nformat = "messages"\n')
    project.doit("split")

    kept = [r for r in io.read_jsonl(project.path("data/dedup/kept.jsonl")) if r["source"] == "plant"]
    report = io.read_json(project.path("data/dedup/report.json"))["sources"]["plant"]
    assert report["exact_dups"] == sum(1 for kind, _, _ in copies.values() if kind == "exact")  # dedup's share
    texts = {r["messages"][0]["content"]: r for r in kept}
    learned_copies = 0
    ledgers = ("clinical_coding", "clinical_decision")
    for adapter in ledgers:
        stats = io.read_json(project.path(f"data/splits/{adapter}/statistics.json"))["decontamination"]
        dropped = {d["id"]: d for d in stats["dropped_examples"]}
        learned = {r["id"] for part in ("train", "val")
                   for r in io.read_jsonl(project.path(f"data/splits/{adapter}/{part}.jsonl"))}
        ledger = io.read_json(project.path(f"data/splits/{adapter}/assignments.json"))["splits"]
        where = {c: name for name, clusters in ledger.items() for c in clusters}
        for p in planted + clean:
            row = texts.get(p["messages"][0]["content"])
            if row is None or where[row["cluster"]] == "test":
                continue  # an exact copy (dedup kept the original) or placed in the test split itself
            if p in clean:
                assert row["id"] in learned and row["id"] not in dropped
                continue
            kind, test_id, test_adapter = copies[p["id"]]
            assert row["id"] not in learned
            # a copy of the test item; or of itself, where the other adapter placed this very row in its test split
            assert (dropped[row["id"]]["test_id"], dropped[row["id"]]["reason"]) in {
                (test_id, f"13-gram overlap with {test_adapter}/test"),
                *((row["id"], f"near-duplicate (MinHash) of {other}/test") for other in ledgers if other != adapter)}
            learned_copies += 1
        assert stats["dropped_total"] == len(dropped) == sum(stats["dropped"].values())
        card = project.path(f"data/splits/{adapter}/README.md").read_text()
        assert "## Decontamination" in card and f"{stats['dropped_total']} example(s) dropped" in card
    assert learned_copies >= 4  # copies that reached train or val, every one dropped
    from tui.reports import data_report  # the dashboard's data view counts them too

    shown = data_report(project.root, ["plant"], list(ledgers))["drops"]
    for adapter in ledgers:
        counts = io.read_json(project.path(f"data/splits/{adapter}/statistics.json"))["decontamination"]["dropped"]
        assert {d["reason"]: d["count"] for d in shown if d["where"] == f"split · {adapter}"} == counts


def test_another_adapter_that_cannot_be_split_is_named_and_skipped(two_adapters, capsys):
    (two_adapters / "adapters" / "two" / "adapter.toml").write_text('[data]\nkeywords = ["zebra"]\n')
    stats = split.run(config.load(), "one")
    assert "split:one: warning: not checked against two's test split" in capsys.readouterr().out
    assert stats["decontamination"]["test_items"] == {"one/test": stats["splits"]["test"]}
    assert stats["decontamination"]["dropped_total"] == 0


def test_a_change_to_another_adapter_s_routing_re_runs_every_split(tmp_path):
    """split:X checks X's train against Y's test split, so Y's routing is one of X's inputs: "up to date" for
    split:X must not survive a change to Y's data block."""
    from tests.models import make_tiny_model
    from tests.pipeline_project import Project

    (tmp_path / "project").mkdir()
    project = Project(tmp_path / "project", base_model=str(make_tiny_model(tmp_path / "tiny")))
    project.doit("split")
    assert "-- split:clinical_coding" in project.doit("split").stdout  # "--": up to date
    with open(project.root / "adapters" / "clinical_decision" / "adapter.toml", "a") as fh:
        fh.write('[data]\nexclude_keywords = ["zebra"]\n')
    out = project.doit("split").stdout
    assert ".  split:clinical_coding" in out and ".  split:clinical_decision" in out, out
