"""A scored source is one file plus one sources.toml block (issue 17).

The source below exists only in this test: written into a copied project's stages/sources/, named in its
sources.toml, it is scraped, normalized, deduplicated, split, trained on and scored by real doit, and its
own scoring hooks (`tasks`: a generated answer read back, a multiple choice) put its metrics in eval.json.
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.models import make_tiny_model
from tests.pipeline_project import Project

PLUGIN = '''"""parity: is a whole number even or odd? Written by tests/test_source_plugin.py."""
import random

from stages import io
from stages.sources import Key, Source, SourceError, Task

# filler words, so that no two questions look alike to dedup
WORDS = ("amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kelp", "lagoon", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
         "umber", "violet", "willow", "xenon", "yarrow", "zephyr", "acorn", "basalt", "cedar", "dune")


def parity_of(text):
    """The parity an answer states first: "even", "odd" or None."""
    words = [w for w in text.lower().replace(".", " ").split() if w in ("even", "odd")]
    return words[0] if words else None


def score(gold, answer):
    return {"parity_match": float(parity_of(answer) is not None and parity_of(answer) == parity_of(gold))}


def choices(rows):
    return [(i, ["even", "odd"], ["even", "odd"].index(parity_of(row["messages"][-1]["content"])))
            for i, row in enumerate(rows)]


class Parity(Source):
    kind = "parity"
    licence = "MIT"
    origin = "synthetic:test"
    PARAMS = {"count": Key(int, 60, min=1)}
    tasks = {"parity": Task(8, score, choices, rates=frozenset({"parity_match"}))}

    def fetch(self, store):
        store.put("numbers.jsonl", io.jsonl_bytes({"id": f"n{n}", "n": n} for n in range(self.param("count"))))

    def parse(self, page):
        yield from io.read_jsonl(page, "regenerate it", SourceError)

    def examples(self, record):
        n = record["n"]
        label = " ".join(random.Random(n).sample(WORDS, 8))
        yield {"task": "parity", "messages": [
            {"role": "user", "content": f"Item {label}: is {n} even or odd?"},
            {"role": "assistant", "content": f"{'even' if n % 2 == 0 else 'odd'}."}]}


SOURCE = Parity
'''

SOURCES = """
[dedup]
source_priority = ["numbers"]

[sources.numbers]
kind = "parity"
adapters = ["quiz"]
[sources.numbers.params]
count = 60
"""

ADAPTER = """
base_model = "{base}"
[lora]
r = 4
alpha = 8
[train]
max_steps = 1
batch_size = 4
max_length = 64
[eval]
max_examples = 8
max_generate = 2
safety = false
"""


@pytest.mark.slow
def test_a_source_defined_in_one_file_is_scraped_split_trained_and_scored(tmp_path):
    base = make_tiny_model(tmp_path / "tiny-llama")
    (tmp_path / "project").mkdir()
    project = Project(tmp_path / "project", base_model=str(base))
    for name in ("clinical_coding", "clinical_decision"):  # the project's default adapters: not this test's
        shutil.rmtree(project.path(f"adapters/{name}"))
    project.path("stages/sources/parity.py").write_text(PLUGIN)
    project.path("sources.toml").write_text(SOURCES)
    project.path("adapters/quiz").mkdir(parents=True)
    project.path("adapters/quiz/adapter.toml").write_text(ADAPTER.format(base=base))

    executed = project.run("eval:quiz")
    assert {"scrape:numbers", "normalize:numbers", "dedup", "split:quiz", "train:quiz", "eval:quiz"} <= executed
    test_rows = [json.loads(line) for line in project.path("data/splits/quiz/test.jsonl").read_text().splitlines()]
    assert test_rows and {r["task"] for r in test_rows} == {"parity"}

    report = json.loads(project.path("adapters/quiz/out/eval.json").read_text())
    metrics = report["matrix"]["quiz"]["metrics"]
    assert set(metrics) == {"parity", "parity_generated"}  # its choice and its generated answer, by its own hooks
    choice, generated = metrics["parity"], metrics["parity_generated"]
    assert choice["kind"] == "choice" and choice["n"] == min(len(test_rows), 8)  # eval.max_examples
    assert generated["kind"] == "generated" and generated["n"] == 2
    for who in ("base", "adapter"):
        assert 0 <= choice[who]["accuracy"] <= 1
        assert set(generated[who]) == {"parity_match"} and 0 <= generated[who]["parity_match"] <= 1
    assert generated["example"]["gold"] in ("even.", "odd.")
