"""split on real files in a temp project: routing, stable cluster-level splits, never-empty splits, errors."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from stages import config, dedup, io, layout, split
from stages.errors import StageError

SOURCES = """
[dedup]
source_priority = ["codes", "vitals"]

[sources.codes]
kind = "icd10cm"
adapters = ["coding"]

[sources.vitals]
kind = "news2"
adapters = ["decide"]
"""


def make_project(root: Path, sources: str = SOURCES, decide_data: str = "") -> Path:
    (root / "sources.toml").write_text(sources)
    for name in ("coding", "decide"):
        (root / "adapters" / name).mkdir(parents=True, exist_ok=True)
    (root / "adapters" / "coding" / "adapter.toml").write_text("")
    (root / "adapters" / "decide" / "adapter.toml").write_text(decide_data)
    return root


def row(source: str, record: int, task: str) -> dict:
    return {"id": f"{source}:r{record}:{task}", "source": source, "task": task, "cluster": f"{source}:r{record}",
            "messages": [{"role": "user", "content": f"question {record} {task}"},
                         {"role": "assistant", "content": "answer"}],
            "provenance": {"source": source, "source_id": f"r{record}"}, "extra": "dropped"}


def kept(records: range, source: str = "vitals", tasks=("score", "response")) -> list[dict]:
    return [row(source, r, t) for r in records for t in tasks]


def read_splits(adapter: str) -> dict[str, list[dict]]:
    return {name: list(io.read_jsonl(layout.split_file(adapter, name))) for name in layout.SPLITS}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path))
    return tmp_path


def test_routes_sources_and_splits_whole_clusters_80_10_10(project):
    io.write_jsonl(layout.dedup_file(), kept(range(1000)) + kept(range(50), source="codes", tasks=("describe",)))
    stats = split.run(config.load(), "decide")
    splits = read_splits("decide")
    everything = [r for part in splits.values() for r in part]
    assert len(everything) == 2000 and {r["source"] for r in everything} == {"vitals"}
    assert set(everything[0]) == {"id", "source", "task", "messages", "provenance", "cluster"}
    where = {}
    for name, part in splits.items():
        for r in part:
            assert where.setdefault(r["cluster"], name) == name  # a cluster never spans splits
    shares = {name: len(part) / 2000 for name, part in splits.items()}
    assert 0.76 < shares["train"] < 0.84 and 0.07 < shares["val"] < 0.13 and 0.07 < shares["test"] < 0.13
    assert stats["splits"] == {name: len(part) for name, part in splits.items()}
    assert stats["by_task"]["score"]["train"] + stats["by_task"]["response"]["train"] == len(splits["train"])
    assert io.read_json(layout.split_dir("decide") / "statistics.json") == stats


def test_adding_data_never_moves_a_record_and_unchanged_files_stay_untouched(project):
    cfg = config.load()
    io.write_jsonl(layout.dedup_file(), kept(range(300)))
    split.run(cfg, "decide")
    before = {r["id"]: name for name, part in read_splits("decide").items() for r in part}
    stamps = {p: p.stat().st_mtime_ns for p in layout.split_files("decide")}
    split.run(cfg, "decide")  # same input: not one file rewritten
    assert {p: p.stat().st_mtime_ns for p in layout.split_files("decide")} == stamps
    io.write_jsonl(layout.dedup_file(), kept(range(600)) + kept(range(50), source="codes", tasks=("describe",)))
    split.run(cfg, "decide")
    after = {r["id"]: name for name, part in read_splits("decide").items() for r in part}
    assert all(after[i] == name for i, name in before.items())
    assert len(after) == 1200
    # the other adapter's sources did not change its split
    split.run(cfg, "coding")
    coding = {p: p.read_bytes() for p in layout.split_files("coding")}
    io.write_jsonl(layout.dedup_file(), kept(range(700)) + kept(range(50), source="codes", tasks=("describe",)))
    split.run(cfg, "coding")
    assert {p: p.read_bytes() for p in layout.split_files("coding")} == coding


@pytest.mark.parametrize("records, tasks", [(10, ("only",)), (5, ("a", "b")), (12, ("a",)), (1, tuple("abcdefghij"))])
def test_no_split_is_empty_from_ten_examples(project, records, tasks):
    for offset in range(0, 200, 20):  # many different hash draws
        io.write_jsonl(layout.dedup_file(), kept(range(offset, offset + records), tasks=tasks))
        split.run(config.load(), "decide")
        sizes = {name: len(part) for name, part in read_splits("decide").items()}
        assert all(sizes.values()), sizes
        assert sum(sizes.values()) == records * len(tasks)


def test_task_filter_and_deterministic_cap(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path, decide_data='[data]\ntasks = ["score"]\nmax_examples = 150\n'))
    io.write_jsonl(layout.dedup_file(), kept(range(400)))
    split.run(config.load(), "decide")
    first = read_splits("decide")
    rows = [r for part in first.values() for r in part]
    assert len(rows) == 150 and {r["task"] for r in rows} == {"score"}
    split.run(config.load(), "decide")
    assert read_splits("decide") == first


def test_no_examples_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path, decide_data='[data]\ntasks = ["nonexistent"]\n'))
    io.write_jsonl(layout.dedup_file(), kept(range(20)))
    with pytest.raises(StageError, match=r"decide.*adapters/decide/adapter.toml.*sources.toml"):
        split.run(config.load(), "decide")
    io.write_jsonl(layout.dedup_file(), kept(range(20), source="codes"))
    (tmp_path / "adapters" / "decide" / "adapter.toml").write_text("")
    with pytest.raises(StageError, match=r"decide.*sources.toml"):
        split.run(config.load(), "decide")


def test_adapter_without_sources_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path, sources=SOURCES.replace('adapters = ["decide"]', "adapters = []")))
    io.write_jsonl(layout.dedup_file(), kept(range(20)))
    with pytest.raises(StageError, match=r"sources.toml.*'decide'"):
        split.run(config.load(), "decide")


def test_dedup_then_split_leaves_no_near_duplicate_across_splits(project):
    """End to end through both stages: templated texts with near-duplicates among them."""
    rng = random.Random(5)
    words = [f"w{i}" for i in range(300)]
    examples, texts = [], []
    for i in range(400):
        if i % 4 == 3:  # a near copy of an earlier text: one word changed
            text = texts[rng.randrange(len(texts))].split()
            text[rng.randrange(len(text))] = "changed"
            text = " ".join(text)
        else:
            text = " ".join(rng.choice(words) for _ in range(80))
        texts.append(text)
        examples.append({"id": f"vitals:p{i}:score", "source": "vitals", "task": "score",
                         "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}],
                         "provenance": {"source": "vitals", "source_id": f"p{i}"}})
    io.write_jsonl(layout.examples_file("vitals"), examples)
    io.write_jsonl(layout.examples_file("codes"), [])
    cfg = config.load()
    report = dedup.run(cfg)
    assert report["sources"]["vitals"]["near_dups"] >= 90
    split.run(cfg, "decide")
    parts = {name: [dedup.example_text(r) for r in part] for name, part in read_splits("decide").items()}
    assert Counter({k: len(v) for k, v in parts.items()}) and all(parts.values())
    for a_name, b_name in (("train", "val"), ("train", "test"), ("val", "test")):
        for a in parts[a_name]:
            for b in parts[b_name]:
                sa, sb = _shingles(a), _shingles(b)
                assert len(sa & sb) / len(sa | sb) < 0.8


def _shingles(text: str, n: int = 5) -> set:
    words = dedup.WORD_RE.findall(dedup.normalize_text(text))
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}
