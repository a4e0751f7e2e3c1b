"""Bad local files (issue 14, items 4 and 7): a file in the wrong encoding, a .json that is not JSON, a CSV that
cannot be read is one line naming the user's file (as sources.toml's paths name it, never the copy under
data/raw/), the line and the fix; a malformed row of an otherwise good file (a broken JSONL line, a CSV row with
the wrong number of columns, a row with no usable messages) is skipped and counted by reason in the task log and in
data/examples/<source>.report.json; a file none of whose rows is usable fails. Real files, real doit."""
from __future__ import annotations

import json

import pytest

from stages.scrape import RawStore
from stages.sources import SourceError, make
from tests.pipeline_project import Project, sources_toml

LATIN1_CSV = "instruction,input,output\nWhat is a fever?,,A raised body temperature.\n" \
             "Qu'est-ce que la fièvre ?,,Une température élevée.\n"


def qa(question: str, answer: str) -> str:
    return json.dumps({"instruction": question, "output": answer}) + "\n"


def project_with(tmp_path, params: str) -> Project:
    project = Project(tmp_path, base_model="embedded:smollm2-135m-instruct")
    (tmp_path / "sources.toml").write_text(sources_toml(news2_count=20, icd_codes=20) + f"""
[sources.mine]
kind = "local_files"
adapters = ["clinical_decision"]
[sources.mine.params]
{params}
""")
    (tmp_path / "notes").mkdir()
    return project


def failure(project: Project, task: str) -> str:
    """Run `doit <task>`: it must fail with one line and no traceback; that line, as the task log ends with it."""
    result = project.doit(task, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    log = project.path(f"data/logs/{task.replace(':', '_')}.log").read_text().strip().splitlines()
    assert log[-1].startswith(f"[{task}] failed: "), log
    assert "Traceback" not in "\n".join(log)
    line = log[-1].removeprefix(f"[{task}] failed: ")
    assert line in result.stdout + result.stderr
    assert "data/raw" not in line  # the user's file, not the copy
    return line


def test_a_latin1_csv_is_one_line_naming_the_users_file_and_the_encoding_param_reads_it(tmp_path):
    project = project_with(tmp_path, 'paths = ["notes/*.csv"]')
    (tmp_path / "notes" / "clinic.csv").write_bytes(LATIN1_CSV.encode("latin-1"))
    line = failure(project, "scrape:mine")
    assert line == ("notes/clinic.csv: line 3 is not UTF-8 text (byte 0xe8); save the file as UTF-8, or set "
                    "sources.mine.params.encoding to the encoding it is in (e.g. \"cp1252\" or \"latin-1\")")

    project.edit("sources.toml", 'paths = ["notes/*.csv"]', 'paths = ["notes/*.csv"]\nencoding = "latin-1"')
    assert project.run("normalize:mine") == {"scrape:mine", "normalize:mine"}
    rows = [json.loads(x) for x in project.path("data/examples/mine.jsonl").read_text().splitlines()]
    assert sorted(r["messages"][1]["content"] for r in rows) == ["A raised body temperature.", "Une température élevée."]
    report = json.loads(project.path("data/examples/mine.report.json").read_text())
    assert report == {"source": "mine", "examples": 2, "skipped": {}}

    project.edit("sources.toml", 'encoding = "latin-1"', 'encoding = "latin-9000"')  # refused at load
    result = project.doit("normalize:mine", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    assert "sources.mine.params.encoding" in result.stdout + result.stderr


def test_malformed_rows_are_skipped_and_counted_in_the_log_and_the_report(tmp_path):
    project = project_with(tmp_path, 'paths = ["notes/*.jsonl", "notes/*.csv"]')
    notes = tmp_path / "notes"
    (notes / "qa.jsonl").write_text(qa("What is A?", "Answer A.") + '{"instruction": "What is B?", "output": \n'
                                    + qa("What is C?", "Answer C.") + json.dumps({"question": "no form"}) + "\n"
                                    + "[1, 2]\n" + json.dumps({"messages": [{"role": "user", "content": "Q?"}]}) + "\n")
    (notes / "more.csv").write_text("instruction,input,output\nWhat is D?,,Answer D.\nWhat is E?,,Answer E.,extra\n"
                                    "\nWhat is F?\n")
    assert project.run("normalize:mine") == {"scrape:mine", "normalize:mine"}
    rows = [json.loads(x) for x in project.path("data/examples/mine.jsonl").read_text().splitlines()]
    assert sorted(r["messages"][-1]["content"] for r in rows) == ["Answer A.", "Answer C.", "Answer D."]

    report = json.loads(project.path("data/examples/mine.report.json").read_text())
    assert report["examples"] == 3
    assert report["skipped"] == {
        "not valid JSON": {"count": 1, "first": ["notes/qa.jsonl:2"]},
        "no instruction and output, conversations or messages": {"count": 1, "first": ["notes/qa.jsonl:4"]},
        "not a JSON object": {"count": 1, "first": ["notes/qa.jsonl:5"]},
        "no assistant answer": {"count": 1, "first": ["notes/qa.jsonl:6"]},
        "wrong number of columns": {"count": 2, "first": ["notes/more.csv:3", "notes/more.csv:5"]},
    }
    log = project.path("data/logs/normalize_mine.log").read_text()
    assert ("normalize:mine: skipped 6 malformed row(s): wrong number of columns 2 (notes/more.csv:3, "
            "notes/more.csv:5); no assistant answer 1 (notes/qa.jsonl:6);") in log
    assert "not valid JSON 1 (notes/qa.jsonl:2)" in log and "data/examples/mine.report.json" in log
    assert log.strip().splitlines()[-1].startswith("[normalize:mine] done")


def test_a_file_with_no_usable_row_fails_naming_it(tmp_path):
    project = project_with(tmp_path, 'paths = ["notes/*.jsonl"]')
    (tmp_path / "notes" / "good.jsonl").write_text(qa("What is A?", "Answer A."))
    (tmp_path / "notes" / "wrong.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n{oops\n")
    line = failure(project, "normalize:mine")
    assert line.startswith("notes/wrong.jsonl: none of its 2 row(s) is usable (first: notes/wrong.jsonl:1: no "
                           "instruction and output, conversations or messages); write rows as alpaca")


# --- the same rules without doit (fast): a source on files in a temp folder

def parsed(tmp_path, files: dict[str, bytes], **params):
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    source = make("mine", "local_files", {"paths": [str(folder / "*")], **params})
    store = RawStore(tmp_path / "raw")
    source.fetch(store)
    return source, [r for page in store.pages() for r in source.parse(page)]


@pytest.mark.parametrize("name, data, expected", [
    ("bad.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": ]', "bad.json: not valid JSON (unexpected"),
    ("obj.json", b'{"rows": []}', "obj.json: a JSON dict, not a list of rows"),
    ("cp1252.jsonl", '{"instruction": "What is \u201cfever\u201d?", "output": "Heat."}\n'.encode("cp1252"), "cp1252.jsonl: line 1 is not UTF-8 text (byte 0x93)"),
    ("big.csv", b"instruction,output\n\"" + b"x" * 200_000 + b"\",y\n", "big.csv:2: not readable as CSV (field larger"),
])
def test_file_level_faults_name_the_users_file(tmp_path, name, data, expected):
    with pytest.raises(SourceError) as err:
        parsed(tmp_path, {name: data})
    message = str(err.value)
    assert message.startswith(str(tmp_path / "in" / expected.split(":")[0])) and expected.split(":", 1)[1] in message
    assert "\n" not in message and str(tmp_path / "raw") not in message


def test_a_bom_and_a_declared_encoding_are_read(tmp_path):
    source, recs = parsed(tmp_path, {"bom.jsonl": b"\xef\xbb\xbf" + qa("Q1?", "A1.").encode(),
                                     "w.csv": "instruction,output\n“Fièvre”?,Chaleur.\n".encode("cp1252")},
                          encoding="cp1252")
    assert sorted(r["messages"][1]["content"] for r in recs) == ["A1.", "Chaleur."]
    assert not source.skipped


def test_wrong_types_in_a_row_are_skipped_not_junk(tmp_path):
    rows = [{"instruction": ["a", "list"], "output": "x"}, {"instruction": "Q?", "output": {"an": "object"}},
            {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "A"}]},
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "three"}]}]
    source, recs = parsed(tmp_path, {"t.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()})
    assert [r["messages"] for r in recs] == [[{"role": "user", "content": "3"}, {"role": "assistant", "content": "three"}]]
    assert {k: v["count"] for k, v in source.skipped.items()} == {
        "an instruction, input or output that is not text": 2, "a message whose content is not text": 1}


def test_hf_qa_local_copy_faults_are_one_line(tmp_path):
    good = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}
    bad_line = tmp_path / "medmcqa.jsonl"
    bad_line.write_text(json.dumps(good) + "\n{broken\n")
    latin = tmp_path / "medmcqa.csv"
    latin.write_bytes("question,opa,opb,opc,opd,cop\nFièvre?,a,b,c,d,1\n".encode("latin-1"))
    for path, expected in ((bad_line, f"{bad_line}:2: not valid JSON ("),
                           (latin, f"{latin}: line 2 is not UTF-8 text (byte 0xe8); save the file as UTF-8")):
        source = make("qa", "hf_qa", {"dataset": "medmcqa", "path": str(path)})
        with pytest.raises(SourceError) as err:
            source.fetch(RawStore(tmp_path / "raw"))
        assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_hf_qa_rows_without_an_answer_key_are_counted(tmp_path):
    source = make("qa", "hf_qa", {"dataset": "medmcqa"})
    row = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}
    page = tmp_path / "rows-00000.jsonl"
    page.write_text("".join(json.dumps({**row, "cop": cop}) + "\n" for cop in (1, -1, -1)) + "nope\n")
    assert len(list(source.parse(page))) == 1
    assert {k: v["count"] for k, v in source.skipped.items()} == {"no answer key (cop 0-3)": 2, "not valid JSON": 1}


def test_a_source_none_of_whose_rows_is_usable_fails_in_normalize(tmp_path):
    """A test split has no answer key: every row skipped is a wrong setting, not an empty source."""
    project = Project(tmp_path, base_model="embedded:smollm2-135m-instruct")
    rows = tmp_path / "medmcqa_test.jsonl"
    rows.write_text("".join(json.dumps({"question": f"Q{i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
                                        "cop": -1}) + "\n" for i in range(3)))
    (tmp_path / "sources.toml").write_text(sources_toml(news2_count=20, icd_codes=20) + f"""
[sources.mcq]
kind = "hf_qa"
adapters = ["clinical_decision"]
[sources.mcq.params]
dataset = "medmcqa"
path = "{rows.name}"
""")
    line = failure(project, "normalize:mcq")
    assert line.startswith("normalize:mcq: no usable record, every row was malformed: skipped 3 malformed row(s): "
                           "no answer key (cop 0-3) 3 (medmcqa_test.jsonl row 1, medmcqa_test.jsonl row 2, "
                           "medmcqa_test.jsonl row 3)")
    assert "check [sources.mcq] in sources.toml" in line


def test_a_broken_drugbank_xml_is_one_line_naming_the_users_file(tmp_path):
    xml = tmp_path / "full_database.xml"
    xml.write_bytes('<drugbank xmlns="http://www.drugbank.ca"><drug><name>Fièvre</name></drug>'.encode("latin-1"))
    source = make("db", "drugbank", {"path": str(xml)})
    with pytest.raises(SourceError) as err:
        source.fetch(RawStore(tmp_path / "raw"))
    assert str(err.value).startswith(f"{xml}: not well-formed XML (not well-formed (invalid token): line 1, column ")
    assert "\n" not in str(err.value) and str(tmp_path / "raw") not in str(err.value)
    xml.write_bytes(b'<drugbank xmlns="http://www.drugbank.ca"><drug><name>A</name>')
    with pytest.raises(SourceError, match=rf"^{xml}: truncated XML \(no element found: line 1, column \d+\); re-download it$"):
        source.fetch(RawStore(tmp_path / "raw"))


def test_drugs_without_an_id_are_counted(tmp_path):
    page = tmp_path / "drugs-00000.xml"
    page.write_text('<drugbank xmlns="http://www.drugbank.ca"><drug><name>No id</name></drug>'
                    '<drug><drugbank-id primary="true">DB1</drugbank-id><name>Has id</name>'
                    '<indication>For tests.</indication></drug></drugbank>')
    source = make("db", "drugbank", {})
    assert [r["id"] for r in source.parse(page)] == ["DB1"]
    assert source.skipped == {"a <drug> without drugbank-id or name": {"count": 1, "first": [f"{page} drug 1"]}}
