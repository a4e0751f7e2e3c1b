"""split on real files in a temp project: routing, stable cluster-level splits, never-empty splits, errors."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from stages import clean, config, dedup, io, layout, split
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


@pytest.mark.parametrize("records, tasks", [(10, ("only",)), (5, ("a", "b")), (12, ("a",)), (3, tuple("abcd"))])
def test_no_split_is_empty_from_ten_examples(project, records, tasks):
    for offset in range(0, 200, 20):  # many different hash draws
        io.write_jsonl(layout.dedup_file(), kept(range(offset, offset + records), tasks=tasks))
        split.run(config.load(), "decide")
        sizes = {name: len(part) for name, part in read_splits("decide").items()}
        assert all(sizes.values()), sizes
        assert sum(sizes.values()) == records * len(tasks)


def test_a_cluster_is_never_divided_and_a_tiny_set_grows_without_moves(project, capsys):
    """Fewer clusters than splits: splits stay empty (with a warning) rather than a cluster being cut up."""
    history: dict[str, str] = {}
    for records in (1, 2, 3, 4, 7, 15, 40):
        io.write_jsonl(layout.dedup_file(), kept(range(records), tasks=tuple("abcdefghij")))
        split.run(config.load(), "decide")
        where = {r["id"]: name for name, part in read_splits("decide").items() for r in part}
        assert all(where[i] == name for i, name in history.items())  # nothing placed before ever moves
        clusters: dict[str, set] = {}
        for i, name in where.items():
            clusters.setdefault(i.rsplit(":", 1)[0], set()).add(name)
        assert all(len(names) == 1 for names in clusters.values())  # each cluster whole, in one split
        history = where
        if records == 1:
            assert set(where.values()) == {"train"}
            assert "val, test empty: 1 cluster(s) in 10 example(s)" in capsys.readouterr().out
        if records >= 3:
            assert set(where.values()) == {"train", "val", "test"}


def test_a_small_stratum_gets_its_share_and_keeps_it_as_data_grows(tmp_path, monkeypatch):
    """A 20-record source and a 20-record task beside large strata: 16/2/2 each, and nothing moves later."""
    # decide alone: with coding there, its test split's codes records would leave decide's train (decontamination)
    monkeypatch.chdir(make_project(tmp_path, sources=SOURCES.replace('adapters = ["coding"]', "adapters = []"),
                                   decide_data='[data]\nsources = ["codes"]\n'))
    (tmp_path / "adapters" / "coding" / "adapter.toml").unlink()

    def data(big: int, small: int) -> list[dict]:
        rows = kept(range(big)) + kept(range(small), source="codes", tasks=("describe",))
        # a rare task in every 20th record, which also feeds the large strata: a small stratum sharing clusters
        # (an example joining a cluster placed earlier follows its cluster, so growth adds it with new records)
        return rows + kept(range(0, big, 20), tasks=("rare",))

    def per_stratum(splits: dict[str, list[dict]]) -> dict[str, Counter]:
        counts: dict[str, Counter] = {}
        for name, part in splits.items():
            for r in part:
                counts.setdefault(f"{r['source']}/{r['task']}", Counter())[name] += 1
        return counts

    for seed in range(5):  # different cluster keys, so different hash orders
        io.write_jsonl(layout.dedup_file(), [{**r, "cluster": f"{r['cluster']}#{seed}"} for r in data(400, 20)])
        layout.split_ledger("decide").unlink(missing_ok=True)
        for p in layout.split_files("decide"):
            p.unlink(missing_ok=True)
        split.run(config.load(), "decide")
        counts = per_stratum(read_splits("decide"))
        assert counts["codes/describe"] == Counter(train=16, val=2, test=2)
        assert counts["vitals/rare"] == Counter(train=16, val=2, test=2)
        for stratum in ("vitals/score", "vitals/response"):
            assert abs(counts[stratum]["val"] - 40) <= 2 and abs(counts[stratum]["test"] - 40) <= 2
    before = {r["id"]: name for name, part in read_splits("decide").items() for r in part}
    for big, small in ((403, 21), (700, 35), (1000, 50)):
        io.write_jsonl(layout.dedup_file(), [{**r, "cluster": f"{r['cluster']}#4"} for r in data(big, small)])
        split.run(config.load(), "decide")
        after = {r["id"]: name for name, part in read_splits("decide").items() for r in part}
        assert all(after[i] == name for i, name in before.items())  # no existing record moved
        before = after
        counts = per_stratum(read_splits("decide"))
        for stratum, c in counts.items():
            n = sum(c.values())
            for name, share in split.SHARES.items():
                assert abs(c[name] - share * n) <= 1.5, (stratum, c)


def test_placements_survive_a_lost_ledger_and_an_upgrade(project):
    """Without assignments.json (deleted, or splits made by an older medforge) the split files are the record."""
    io.write_jsonl(layout.dedup_file(), kept(range(200)))
    split.run(config.load(), "decide")
    ledger = layout.split_ledger("decide")
    saved = io.read_json(ledger)
    assert sum(len(c) for c in saved["splits"].values()) == 200
    # an older layout: clusters placed by some other rule, no ledger
    old = {name: [r for r in kept(range(200)) if split.unit_hash(r["cluster"]) < 0.3] if name == "test" else []
           for name in layout.SPLITS}
    old["train"] = [r for r in kept(range(200)) if split.unit_hash(r["cluster"]) >= 0.3]
    for name, part in old.items():
        io.write_jsonl(layout.split_file("decide", name), part)
    ledger.unlink()
    io.write_jsonl(layout.dedup_file(), kept(range(300)))
    split.run(config.load(), "decide")
    after = {r["id"]: name for name, part in read_splits("decide").items() for r in part}
    assert all(after[r["id"]] == name for name, part in old.items() for r in part)
    # the new clusters went where the strata lacked most: 30 % in test already, so none joined it
    new = {after[r["id"]] for r in kept(range(200, 300))}
    assert "test" not in new and "val" in new
    # a record that leaves the data and comes back returns to its split
    io.write_jsonl(layout.dedup_file(), kept(range(100, 300)))
    split.run(config.load(), "decide")
    io.write_jsonl(layout.dedup_file(), kept(range(300)))
    split.run(config.load(), "decide")
    assert {r["id"]: name for name, part in read_splits("decide").items() for r in part} == after


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
    # refused at load, before scrape, normalize and dedup run (issue 14)
    with pytest.raises(config.ConfigError, match=r"adapters/decide/adapter.toml: key 'data.sources': no enabled source "
                                                 r"feeds adapter 'decide'.*sources.toml"):
        config.load()


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


# --- routing by keywords and extra sources; a record feeding several adapters
def test_keyword_rules_and_a_record_in_two_adapters(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path, decide_data='[data]\nsources = ["codes"]\nkeywords = ["septic shock", '
                                                       '"sepsis"]\nexclude_keywords = ["neonatal"]\n'))
    rows = kept(range(30), source="codes", tasks=("describe",))
    for r in rows[:12]:
        r["messages"][1]["content"] = "Sepsis, unspecified organism" if r["cluster"] != "codes:r3" else \
            "Neonatal sepsis"
    rows[20]["messages"][0]["content"] = "What is SEPTIC\nshock?"
    rows[21]["messages"][0]["content"] = "What is aseptic meningitis?"  # not a whole-word match
    io.write_jsonl(layout.dedup_file(), rows + kept(range(40)))
    stats = split.run(config.load(), "decide")
    # routed here: in a split file, or dropped from train/val as a copy of coding's test split (the same record)
    decontaminated = {d["id"]: d["reason"] for d in stats["decontamination"]["dropped_examples"]}
    decide_ids = {r["id"] for part in read_splits("decide").values() for r in part} | set(decontaminated)
    codes_in_decide = {i for i in decide_ids if i.startswith("codes:")}
    assert codes_in_decide == {r["id"] for r in rows[:12] if r["cluster"] != "codes:r3"} | {rows[20]["id"]}
    assert stats["routing"]["turned_away"] == {"exclude_keywords": 1, "keywords": 17 + 80}
    coding_stats = split.run(config.load(), "coding")
    coding = read_splits("coding")
    coding_ids = {r["id"] for part in coding.values() for r in part}
    coding_test = {r["id"] for r in coding["test"]}
    assert all(why == "near-duplicate (MinHash) of coding/test" and i in coding_test for i, why in decontaminated.items())
    coding_ids |= {d["id"] for d in coding_stats["decontamination"]["dropped_examples"]}
    assert codes_in_decide < coding_ids  # the same records also feed the coding adapter


def test_keywords_that_match_nothing_name_the_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path, decide_data='[data]\nkeywords = ["zebra"]\n'))
    io.write_jsonl(layout.dedup_file(), kept(range(20)))
    with pytest.raises(StageError, match=r"data.keywords.*adapters/decide/adapter.toml"):
        split.run(config.load(), "decide")


# --- frozen test set
def test_frozen_test_set_stays_fixed_as_data_grows(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path))
    io.write_jsonl(layout.dedup_file(), kept(range(300)))
    split.run(config.load(), "decide")
    before = read_splits("decide")
    frozen = tmp_path / "frozen" / "test.jsonl"
    frozen.parent.mkdir()
    frozen.write_bytes(layout.split_file("decide", "test").read_bytes())
    (tmp_path / "adapters" / "decide" / "adapter.toml").write_text('[data]\nfrozen_test = "frozen/test.jsonl"\n')
    io.write_jsonl(layout.dedup_file(), kept(range(900)))
    stats = split.run(config.load(), "decide")
    after = read_splits("decide")
    assert after["test"] == before["test"]  # byte for byte the same test set
    assert stats["frozen_test"] == {"file": "frozen/test.jsonl", "clusters": len({r["cluster"] for r in before["test"]}),
                                    "missing": 0}
    where = {r["id"]: name for name, part in after.items() for r in part}
    assert all(where[r["id"]] == name for name, part in before.items() for r in part)  # nothing moved
    assert 0.85 < len(after["train"]) / (len(after["train"]) + len(after["val"])) < 0.93
    # a list of ids works too; a missing file is a clear error
    (tmp_path / "ids.txt").write_text("# frozen\nvitals:r1:score\n")
    (tmp_path / "adapters" / "decide" / "adapter.toml").write_text('[data]\nfrozen_test = "ids.txt"\n')
    split.run(config.load(), "decide")
    assert {r["cluster"] for r in read_splits("decide")["test"]} == {"vitals:r1"}
    (tmp_path / "adapters" / "decide" / "adapter.toml").write_text('[data]\nfrozen_test = "gone.jsonl"\n')
    with pytest.raises(config.ConfigError, match=r"adapters/decide/adapter.toml: key 'data.frozen_test' names gone.jsonl, "
                                                 r"which does not exist"):  # refused at load, before any stage runs
        config.load()
    (tmp_path / "gone.jsonl").write_text("")  # there at load, gone by the time the split reads it: the split says so
    cfg = config.load()
    (tmp_path / "gone.jsonl").unlink()
    with pytest.raises(StageError, match=r"data.frozen_test.*adapters/decide/adapter.toml.*gone.jsonl"):
        split.run(cfg, "decide")


# --- stratification
def test_every_source_and_task_stratum_is_split_80_10_10(project):
    rows = kept(range(1500)) + kept(range(1500), source="codes", tasks=("describe",))
    (project / "sources.toml").write_text(SOURCES.replace('adapters = ["coding"]', 'adapters = ["coding", "decide"]'))
    io.write_jsonl(layout.dedup_file(), rows)
    stats = split.run(config.load(), "decide")
    assert set(stats["strata"]) == {"vitals/score", "vitals/response", "codes/describe"}
    for shares in stats["strata"].values():  # one example per cluster and stratum: within one example of 80/10/10
        assert abs(shares["train"] - 0.8) <= 1 / 1500 and abs(shares["val"] - 0.1) <= 1 / 1500


# --- exports, statistics, dataset card
def test_outputs_load_with_datasets_and_are_described(project):
    datasets = pytest.importorskip("datasets")
    examples = [{**r, "provenance": {"source": "vitals", "kind": "news2", "source_id": r["cluster"].split(":")[1],
                                     "origin": "generator", "licence": "MIT (synthetic)", "retrieved_at": ""}}
                for r in kept(range(60))]
    examples[0]["messages"].insert(0, {"role": "system", "content": "You are a ward nurse."})
    io.write_jsonl(layout.examples_file("vitals"), examples)
    io.write_jsonl(layout.examples_file("codes"), [])
    cfg = config.load()
    dedup.run(cfg)
    stats = split.run(cfg, "decide")
    folder = layout.split_dir("decide")
    sizes = stats["splits"]
    loaded = datasets.load_dataset("json", data_files={s: str(layout.split_file("decide", s)) for s in sizes},
                                   cache_dir=str(project / "hf_cache"))
    assert {s: loaded[s].num_rows for s in sizes} == sizes
    assert loaded["train"][0]["messages"][0]["role"] in ("system", "user")
    for fmt in layout.EXPORT_FORMATS:
        files = {s: str(layout.split_export_file("decide", fmt, s)) for s in sizes}
        part = datasets.load_dataset("json", data_files=files, cache_dir=str(project / "hf_cache"))
        assert {s: part[s].num_rows for s in sizes} == sizes
    alpaca = {r["id"]: r for s in sizes for r in io.read_jsonl(layout.split_export_file("decide", "alpaca", s))}
    first = alpaca[examples[0]["id"]]
    assert first["system"] == "You are a ward nurse." and first["instruction"].startswith("question 0")
    assert first["output"] == "answer" and first["history"] == []
    sharegpt = {r["id"]: r for s in sizes for r in io.read_jsonl(layout.split_export_file("decide", "sharegpt", s))}
    assert [t["from"] for t in sharegpt[examples[0]["id"]]["conversations"]] == ["system", "human", "gpt"]
    saved = io.read_json(layout.split_statistics("decide"))
    assert saved["upstream"]["records_in"] == 120 and saved["upstream"]["dropped"] == dict.fromkeys(clean.REASONS, 0)
    assert saved["token_lengths"]["counter"] == "word-estimate"
    histogram = saved["token_lengths"]["histogram"]
    assert sum(b["examples"] for b in histogram) == 120 and histogram[0]["tokens"] == "0-31"
    card = (folder / "README.md").read_text()
    assert "| dropped: echo | 0 |" in card and "| dropped: too_long | 0 |" in card
    assert "`cluster` (its source record, `<source>:<source_id>`, or its group" in card
    assert card.startswith("---\n") and "config_name: sharegpt" in card and "path: alpaca/train.jsonl" in card
    assert "MIT (synthetic)" in card and f"| train | {sizes['train']} |" in card and "load_dataset" in card


def test_rows_of_one_group_in_a_users_file_land_in_one_split(tmp_path, monkeypatch):
    """A local file's rows sharing a `group` (paraphrases of one question) are one cluster: scrape, normalize, dedup
    and split keep them together; rows without a group are split one by one, as before."""
    from stages import normalize, scrape

    monkeypatch.chdir(make_project(tmp_path, sources="""
[sources.mine]
kind = "local_files"
adapters = ["decide", "coding"]
[sources.mine.params]
paths = ["notes/*.jsonl"]
"""))
    forms = ["Expand the abbreviation {a}.", "What does {a} stand for in a chart note?", "Spell out {a}, please."]
    rows = [{"id": f"{a}-{i}", "group": a, "instruction": form.format(a=a), "output": f"{a} is term number {n}."}
            for n, a in enumerate(f"AB{n:02d}" for n in range(40)) for i, form in enumerate(forms)]
    rows += [{"id": f"solo-{n}", "instruction": f"Loose question {n} about ward {n * 7}?", "output": f"Answer {n}."}
             for n in range(20)]
    (tmp_path / "notes").mkdir()
    io.write_jsonl(tmp_path / "notes" / "qa.jsonl", rows)
    cfg = config.load()
    scrape.run(cfg, "mine")
    normalize.run(cfg, "mine")
    dedup.run(cfg)
    split.run(cfg, "decide")
    where: dict[str, set[str]] = {}
    for name, part in read_splits("decide").items():
        for r in part:
            record = r["id"].split(":")[1]  # mine:AB07-2:local -> AB07 (its group), mine:solo-3:local -> solo-3
            where.setdefault(record.split("-")[0] if record.startswith("AB") else record, set()).add(name)
    assert len(where) == 40 + 20 and all(len(splits) == 1 for splits in where.values()), where
    assert {s for key, splits in where.items() if key.startswith("AB") for s in splits} == {"train", "val", "test"}
    assert read_splits("decide")["train"][0]["cluster"].startswith("mine:")
