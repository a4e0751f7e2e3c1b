"""Local inputs are dependencies (issue 14): the content of every file a source reads from the user's disk
decides whether its scrape is up to date. Real doit on a temp project, tasks counted from data/events.jsonl."""
from __future__ import annotations

import json
import os

from stages import scrape
from stages.config import SourceConfig
from tests.pipeline_project import Project, sources_toml

TASKS = ("scrape", "normalize")  # every source's: icd10cm and news2 must stay put
CHAIN = {"scrape:mine", "normalize:mine"}


def qa(question: str, answer: str) -> str:
    return json.dumps({"instruction": question, "output": answer}) + "\n"


def answers(project: Project) -> list[str]:
    rows = [json.loads(line) for line in project.path("data/examples/mine.jsonl").read_text().splitlines()]
    return sorted(r["messages"][-1]["content"] for r in rows)


def test_editing_adding_and_removing_a_local_file_reruns_that_source_alone(tmp_path):
    project = Project(tmp_path, base_model="embedded:smollm2-135m-instruct")
    (tmp_path / "sources.toml").write_text(sources_toml(news2_count=20, icd_codes=20) + """
[sources.mine]
kind = "local_files"
adapters = ["clinical_decision"]
[sources.mine.params]
paths = ["notes/*.jsonl"]
""")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.jsonl").write_text(qa("What is A?", "A is the first answer.") + qa("What is B?", "B answer."))
    first = project.run(*TASKS)
    assert CHAIN <= first and "scrape:icd10cm" in first
    assert answers(project) == ["A is the first answer.", "B answer."]
    assert project.run(*TASKS) == set()

    (notes / "a.jsonl").write_text(qa("What is A?", "A, edited.") + qa("What is B?", "B answer."))  # edit
    assert project.run(*TASKS) == CHAIN
    assert answers(project) == ["A, edited.", "B answer."]

    (notes / "c.jsonl").write_text(qa("What is C?", "C, a new file."))  # add
    assert project.run(*TASKS) == CHAIN
    assert answers(project) == ["A, edited.", "B answer.", "C, a new file."]

    (notes / "a.jsonl").unlink()  # remove
    assert project.run(*TASKS) == CHAIN
    assert answers(project) == ["C, a new file."]

    stat = (notes / "c.jsonl").stat()  # touched, content unchanged: nothing to do
    os.utime(notes / "c.jsonl", (stat.st_atime + 5, stat.st_mtime + 5))
    assert project.run(*TASKS) == set()


def test_drugbank_xml_and_a_local_dataset_are_inputs(tmp_path):
    xml = tmp_path / "full_database.xml"
    xml.write_text("<drugbank/>")
    folder = tmp_path / "medqa_copy"
    (folder / "train").mkdir(parents=True)
    (folder / "dataset_dict.json").write_text("{}")
    (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"x")

    def cfg(kind, **params):
        return SourceConfig(name=kind, kind=kind, enabled=True, adapters=[], refresh="never", mode="live",
                            params=params, raw_block={})
    assert scrape.input_files(cfg("drugbank", path=str(xml))) == [str(xml)]
    assert scrape.input_files(cfg("drugbank", path=str(tmp_path / "missing.xml"))) == []  # fetch says what is missing
    assert scrape.input_files(cfg("hf_qa", dataset="medqa", path=str(folder))) == [
        str(folder / "dataset_dict.json"), str(folder / "train" / "data-00000-of-00001.arrow")]
    assert scrape.input_files(cfg("hf_qa", dataset="medqa")) == []  # the hub: no file of the user's
    assert scrape.input_files(cfg("local_files", paths=[str(tmp_path / "*.xml")])) == []  # not a readable suffix
    assert scrape.input_files(cfg("pubmed", term="x")) == []


def test_a_moved_project_reads_its_local_files_into_the_same_example_ids(tmp_path):
    """Rows without an id of their own are named after their file's copy: a project moved, renamed or mounted
    elsewhere must give them the same ids when it reads its files again, or their clusters would be placed anew
    (a test item of before could land in train)."""
    (tmp_path / "here").mkdir()
    project = Project(tmp_path / "here", base_model="embedded:smollm2-135m-instruct")
    (project.root / "sources.toml").write_text(sources_toml(news2_count=20, icd_codes=20) + """
[sources.mine]
kind = "local_files"
adapters = ["clinical_decision"]
[sources.mine.params]
paths = ["notes/*.jsonl"]
""")
    (project.root / "notes").mkdir()
    (project.root / "notes" / "a.jsonl").write_text(qa("What is A?", "A is the first answer.") + qa("Why B?", "B."))

    def ids() -> list[str]:
        return [json.loads(line)["id"] for line in project.path("data/examples/mine.jsonl").read_text().splitlines()]

    assert CHAIN <= project.run("scrape:mine", "normalize:mine")
    before = ids()
    project.root = project.root.rename(tmp_path / "elsewhere")
    assert CHAIN <= project.run("--always-execute", "scrape:mine", "normalize:mine")  # read again, there
    assert ids() == before and len(before) == 2
