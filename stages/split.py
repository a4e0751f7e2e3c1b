"""split:<adapter> — route kept examples to one adapter, cut train/val/test, export, describe.

Routing: the sources whose `adapters` list names the adapter plus those its `data.sources`
names; then `data.tasks` (task kinds), `data.keywords` (at least one must occur, as a whole
word or phrase, case-insensitive) and `data.exclude_keywords` (none may occur); capped at
`data.max_examples` when > 0 (by a stable hash rank, so the cap keeps whole clusters and
mostly the same ones as data grows). A record can feed any number of adapters.

Splits are 80/10/10 by a stable hash of each example's `cluster` key (set by dedup: the
source record, joined with its near-duplicates' records): a whole cluster lands in one split,
so no near-copy of a test question sits in train, and a record never changes split when data
is added. Because the hash ignores source and task, every (source, task) stratum is split
80/10/10 in expectation; statistics.json shows each stratum's shares. With `data.frozen_test`
(a JSONL such as an earlier test.jsonl, or a list of ids/cluster keys), exactly those clusters
form the test split and new data only joins train and val.

Outputs in data/splits/<adapter>/: train/val/test.jsonl (messages), alpaca/ and sharegpt/
copies, statistics.json and a dataset card README.md. Files are rewritten only when their
content changes, which is what keeps an unchanged adapter from retraining.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from stages import io, layout
from stages.errors import StageError

FRACTIONS = (("train", 0.8), ("val", 0.9), ("test", 1.0))  # cumulative upper bounds
MIN_FOR_ALL_SPLITS = 10
KEEP_FIELDS = ("id", "source", "task", "messages", "provenance", "cluster")


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a key (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


TRAIN_VAL = (("train", 0.8), ("val", 0.9), ("val", 1.0))  # with a frozen test set: see split_of


def split_of(key: str, fractions=FRACTIONS) -> str:
    u = unit_hash(key)
    name = next(name for name, upper in fractions if u < upper)
    if fractions is TRAIN_VAL and u >= 0.9:
        # would have been test: train or val by a second hash, 8:1, so train/val keep their 80:10 ratio
        # and every cluster that was in train or val before the test set was frozen stays put
        return "train" if unit_hash(key + "#frozen") < 8 / 9 else "val"
    return name


def _interval(split: str, fractions=FRACTIONS) -> tuple[float, float]:
    lower = 0.0
    for name, upper in fractions:
        if name == split:
            return lower, upper
        lower = upper
    raise KeyError(split)


def _distance(u: float, split: str, fractions=FRACTIONS) -> float:
    lower, upper = _interval(split, fractions)
    return 0.0 if lower <= u < upper else min(abs(u - lower), abs(u - upper))


def assign(keys: list[str], fractions=FRACTIONS) -> list[str]:
    """Split name per example, from its group key; no split stays empty when there are >= 10 examples.

    Only a small set can leave a split empty by chance: the group whose hash lies nearest
    that split's range moves there (from the largest split). With fewer than three groups
    the groups cannot fill three splits, so examples are split one by one.
    """
    groups = list(dict.fromkeys(keys))
    if len(keys) >= MIN_FOR_ALL_SPLITS and len(groups) < 3:
        print(f"split: only {len(groups)} cluster(s) for {len(keys)} examples: splitting examples one by one")
        keys = [f"{key}#{i}" for i, key in enumerate(keys)]
        groups = list(keys)
    where = {g: split_of(g, fractions) for g in groups}
    if len(keys) >= MIN_FOR_ALL_SPLITS:
        size = Counter(keys)
        for target in dict.fromkeys(name for name, _ in fractions):
            totals = Counter()
            for g in groups:
                totals[where[g]] += size[g]
            if totals[target]:
                continue
            holding = Counter(where[g] for g in groups)
            donors = [s for s in holding if holding[s] >= 2]  # a split never gives away its last group
            donor = max(donors, key=lambda s: (totals[s], s))
            movable = [g for g in groups if where[g] == donor]
            pick = min(movable, key=lambda g: (_distance(unit_hash(g), target, fractions), g))
            where[pick] = target
    return [where[k] for k in keys]


def _cap(rows: list[dict], max_examples: int) -> list[dict]:
    if max_examples <= 0 or len(rows) <= max_examples:
        return rows
    ranked = sorted(range(len(rows)), key=lambda i: (unit_hash(rows[i]["cluster"]), str(rows[i]["id"])))
    chosen = set(ranked[:max_examples])
    return [row for i, row in enumerate(rows) if i in chosen]


def keyword_pattern(words: list[str]) -> re.Pattern | None:
    """Whole words or phrases, case-insensitive; spaces in a phrase match any whitespace."""
    if not words:
        return None
    alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.I)


def _content(row: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in row.get("messages") or []
                     if isinstance(m, dict) and m.get("role") in ("user", "assistant"))


def load_frozen(adapter_name: str, path_text: str) -> set[str]:
    """Cluster keys and ids of the frozen test set: a JSONL of examples (their `cluster`, else `id`) or one per line."""
    path = Path(path_text).expanduser()
    if not path.exists():
        raise StageError(f"split:{adapter_name}: data.frozen_test in adapters/{adapter_name}/adapter.toml names "
                         f"{path}, which does not exist; copy a test.jsonl there or clear the key")
    keys: set[str] = set()
    if path.suffix == ".jsonl":
        try:
            for row in io.read_jsonl(path):
                key = row.get("cluster") or row.get("id") if isinstance(row, dict) else None
                if key:
                    keys.add(str(key))
        except ValueError as exc:
            raise StageError(f"split:{adapter_name}: data.frozen_test: {exc}") from None
    else:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    if not keys:
        raise StageError(f"split:{adapter_name}: data.frozen_test file {path} lists no example; "
                         f"give a JSONL with `cluster` or `id` per line, or a list of ids")
    return keys


def route(cfg, adapter_name: str) -> tuple[list[dict], dict[str, Any]]:
    """The kept examples this adapter takes, and how many each rule turned away."""
    adapter = cfg.adapters.get(adapter_name)
    if adapter is None:
        raise StageError(f"split: no adapter '{adapter_name}' (known: {', '.join(cfg.adapters)}); "
                         f"create adapters/{adapter_name}/adapter.toml")
    sources = [s.name for s in cfg.sources_for(adapter_name)]
    if not sources:
        raise StageError(f"split:{adapter_name}: no enabled source in sources.toml lists '{adapter_name}' in its "
                         f"`adapters`; add it to a [sources.<name>] block")
    kept = layout.dedup_file()
    if not kept.exists():
        raise StageError(f"split:{adapter_name}: {kept} is missing; run `doit dedup` first")
    data = adapter.data
    tasks = data.get("tasks") or []
    include, exclude = keyword_pattern(data.get("keywords", [])), keyword_pattern(data.get("exclude_keywords", []))
    rows, seen_tasks, turned_away = [], set(), Counter()
    for row in io.read_jsonl(kept):
        if row.get("source") not in sources:
            continue
        seen_tasks.add(row.get("task"))
        if tasks and row.get("task") not in tasks:
            turned_away["task"] += 1
        elif include is not None and not include.search(_content(row)):
            turned_away["keywords"] += 1
        elif exclude is not None and exclude.search(_content(row)):
            turned_away["exclude_keywords"] += 1
        else:
            rows.append({k: row[k] for k in KEEP_FIELDS if k in row})
    if not rows:
        if tasks and not seen_tasks & set(tasks):
            raise StageError(f"split:{adapter_name}: none of data.tasks ({', '.join(tasks)}) in "
                             f"adapters/{adapter_name}/adapter.toml is produced by its sources in sources.toml "
                             f"({', '.join(sources)}; they produce: {', '.join(sorted(map(str, seen_tasks))) or 'nothing'})"
                             f"; fix data.tasks or the sources' `adapters`")
        if seen_tasks:
            raise StageError(f"split:{adapter_name}: data.keywords / data.exclude_keywords in "
                             f"adapters/{adapter_name}/adapter.toml leave no example of its sources "
                             f"({', '.join(sources)}); loosen them")
        raise StageError(f"split:{adapter_name}: its sources in sources.toml ({', '.join(sources)}) yielded no "
                         f"examples after dedup; check those sources' params and run `doit normalize`")
    unknown = sorted(set(tasks) - seen_tasks)
    if unknown:
        print(f"split:{adapter_name}: warning: data.tasks names {', '.join(unknown)}, which no source produces")
    for row in rows:
        row.setdefault("cluster", str(row["id"]))
    return rows, {"sources": sources, "turned_away": dict(sorted(turned_away.items()))}


def run(cfg, adapter_name: str) -> dict[str, Any]:
    rows, routing = route(cfg, adapter_name)
    adapter = cfg.adapters[adapter_name]
    max_examples = adapter.data.get("max_examples", 0)
    rows = _cap(rows, max_examples)
    frozen_info = None
    if adapter.data.get("frozen_test"):
        frozen = load_frozen(adapter_name, adapter.data["frozen_test"])
        test_clusters = {r["cluster"] for r in rows if r["cluster"] in frozen or str(r["id"]) in frozen}
        rest = [r for r in rows if r["cluster"] not in test_clusters]
        where = dict(zip((r["cluster"] for r in rest), assign([r["cluster"] for r in rest], TRAIN_VAL)))
        names = ["test" if r["cluster"] in test_clusters else where[r["cluster"]] for r in rows]
        present = {r["cluster"] for r in rows} | {str(r["id"]) for r in rows}
        missing = len({k for k in frozen if k not in present})
        frozen_info = {"file": adapter.data["frozen_test"], "clusters": len(test_clusters), "missing": missing}
        if missing:
            print(f"split:{adapter_name}: warning: {missing} frozen test entries are no longer in the data")
    else:
        names = assign([row["cluster"] for row in rows])
    by_split: dict[str, list[dict]] = {name: [] for name, _ in FRACTIONS}
    for row, name in zip(rows, names):
        by_split[name].append(row)
    changed = [name for name, part in by_split.items() if io.write_jsonl(layout.split_file(adapter_name, name), part)]
    for fmt, convert in EXPORTS.items():
        for name, part in by_split.items():
            io.write_jsonl(layout.split_export_file(adapter_name, fmt, name), (convert(r) for r in part))
    stats = statistics(adapter_name, routing["sources"], adapter.data.get("tasks") or [], max_examples, by_split)
    stats["routing"] = {"data": adapter.data, "turned_away": routing["turned_away"]}
    stats["frozen_test"] = frozen_info
    stats["upstream"] = upstream(routing["sources"])
    stats["token_lengths"] = token_lengths(adapter, by_split)
    io.write_json(layout.split_statistics(adapter_name), stats)
    io.write_text(layout.dataset_card(adapter_name), dataset_card(adapter, stats, by_split))
    counts = ", ".join(f"{name} {len(part)}" for name, part in by_split.items())
    print(f"split:{adapter_name}: {len(rows)} example(s): {counts}"
          f"{' (rewritten: ' + ', '.join(changed) + ')' if changed else ' (unchanged)'}")
    return stats


def statistics(adapter: str, sources: list[str], tasks: list[str], max_examples: int,
               by_split: dict[str, list[dict]]) -> dict[str, Any]:
    per_source: dict[str, Counter] = defaultdict(Counter)
    per_task: dict[str, Counter] = defaultdict(Counter)
    per_stratum: dict[str, Counter] = defaultdict(Counter)
    for name, part in by_split.items():
        for row in part:
            per_source[row["source"]][name] += 1
            per_task[row["task"]][name] += 1
            per_stratum[f"{row['source']}/{row['task']}"][name] += 1
    return {
        "adapter": adapter, "sources": sources, "tasks": tasks, "max_examples": max_examples,
        "examples": sum(len(p) for p in by_split.values()),
        "splits": {name: len(part) for name, part in by_split.items()},
        "clusters": {name: len({row["cluster"] for row in part}) for name, part in by_split.items()},
        "by_source": {s: dict(c) for s, c in sorted(per_source.items())},
        "by_task": {t: dict(c) for t, c in sorted(per_task.items())},
        "strata": {k: {name: round(c[name] / sum(c.values()), 4) for name in by_split}
                   for k, c in sorted(per_stratum.items())},
    }


def upstream(sources: list[str]) -> dict[str, Any]:
    """What cleaning dropped (by reason) and dedup removed in this adapter's sources, from dedup's report."""
    path = layout.dedup_report()
    if not path.exists():
        return {}
    report = io.read_json(path)
    per = {name: report.get("sources", {}).get(name) for name in sources}
    per = {name: stats for name, stats in per.items() if stats}
    dropped = Counter()
    for stats in per.values():
        dropped.update(stats.get("dropped", {}))
    return {
        "records_in": sum(s.get("in", 0) for s in per.values()),
        "dropped": dict(sorted(dropped.items())),
        "exact_duplicates": sum(s.get("exact_dups", 0) for s in per.values()),
        "near_duplicates": sum(s.get("near_dups", 0) for s in per.values()),
        "duplicate_clusters": sum(s.get("duplicate_clusters", 0) for s in per.values()),
        "kept_after_dedup": sum(s.get("kept", 0) for s in per.values()),
        "tokens": report.get("cleaning", {}).get("tokens"),
        "dedup_threshold": report.get("settings", {}).get("threshold"),
    }


HISTOGRAM_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def token_lengths(adapter, by_split: dict[str, list[dict]]) -> dict[str, Any]:
    """Token-length histogram of the examples' message contents, with the adapter's base tokenizer."""
    from stages import clean

    counter = clean.token_counter(adapter.base_model)
    lengths = {name: counter.count([clean.example_content(r) for r in part]) for name, part in by_split.items()}
    every = sorted(n for part in lengths.values() for n in part)
    bins = []  # a list, so the bins keep their order in the (key-sorted) JSON
    for low, high in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:] + (None,)):
        label = f"{low}-{high - 1}" if high else f"{low}+"
        bins.append({"tokens": label, "examples": sum(1 for n in every if n >= low and (high is None or n < high))})
    max_length = adapter.train.get("max_length", 0)
    return {
        **counter.describe(), "histogram": bins,
        "p50": every[len(every) // 2] if every else 0, "p95": every[int(len(every) * 0.95)] if every else 0,
        "max": every[-1] if every else 0, "mean": round(sum(every) / len(every), 1) if every else 0,
        "train_max_length": max_length,
        "over_train_max_length": sum(1 for n in every if n > max_length) if max_length else 0,
        "note": "content tokens only; the chat template adds a few per turn",
    }


# --- other chat formats
def _turns(row: dict) -> tuple[str, list[tuple[str, str]]]:
    system, pairs, pending = "", [], None
    for m in row.get("messages") or []:
        role, content = m.get("role"), str(m.get("content", ""))
        if role == "system":
            system = content
        elif role == "user":
            pending = content
        elif role == "assistant" and pending is not None:
            pairs.append((pending, content))
            pending = None
    return system, pairs


def to_alpaca(row: dict) -> dict:
    """instruction/input/output, with `system` and earlier turns in `history` (LLaMA-Factory's alpaca)."""
    system, pairs = _turns(row)
    last = pairs[-1] if pairs else ("", "")
    return {"instruction": last[0], "input": "", "output": last[1], "system": system,
            "history": [list(p) for p in pairs[:-1]], "id": row["id"], "source": row["source"], "task": row["task"]}


def to_sharegpt(row: dict) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names.get(m.get("role"), str(m.get("role"))), "value": str(m.get("content", ""))}
                              for m in row.get("messages") or []],
            "id": row["id"], "source": row["source"], "task": row["task"]}


EXPORTS = {"alpaca": to_alpaca, "sharegpt": to_sharegpt}


# --- the dataset card
def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_card(adapter, stats: dict[str, Any], by_split: dict[str, list[dict]]) -> str:
    """A Hugging Face style README.md: YAML header (loadable configs), then what is inside and how it was made."""
    licences: dict[str, set[str]] = defaultdict(set)
    origins: dict[str, set[str]] = defaultdict(set)
    for part in by_split.values():
        for row in part:
            prov = row.get("provenance") or {}
            licences[row["source"]].add(str(prov.get("licence", "unknown")))
            origins[row["source"]].add(str(prov.get("origin", "")))
    n = stats["examples"]
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "100K<n<1M"
    configs = ["configs:"]
    for name, prefix in (("messages", ""), ("alpaca", "alpaca/"), ("sharegpt", "sharegpt/")):
        configs.append(f"- config_name: {name}" + ("\n  default: true" if name == "messages" else ""))
        configs.append("  data_files:")
        configs += [f"  - split: {s}\n    path: {prefix}{s}.jsonl" for s in by_split]
    up = stats.get("upstream") or {}
    tokens = stats["token_lengths"]
    splits = list(by_split)
    parts = [
        "---", "license: other", "language:", "- en", "task_categories:", "- text-generation",
        "- question-answering", f"size_categories:\n- {size}", f"pretty_name: medforge {adapter.name}",
        *configs, "---", "",
        f"# medforge — {adapter.name}", "",
        adapter.description or "Instruction examples built by medforge from public medical sources.", "",
        "Built by the medforge pipeline (`doit split:" + adapter.name + "`); regenerated, do not edit by hand. "
        "For research and education: not medical advice and not validated for clinical use.", "",
        "## Sources and licences", "",
        _table(["source", "examples", "licence", "origin"],
               [[s, sum(stats["by_source"].get(s, {}).values()), "; ".join(sorted(licences[s])),
                 "; ".join(sorted(o for o in origins[s] if o))] for s in sorted(licences)]), "",
        "## Splits", "",
        _table(["split", "examples", "clusters"], [[s, stats["splits"][s], stats["clusters"][s]] for s in splits]), "",
        _table(["task"] + splits, [[t] + [c.get(s, 0) for s in splits] for t, c in stats["by_task"].items()]), "",
        "Splits are cut by a stable hash of each example's cluster (its source record, joined with every near-"
        f"duplicate at Jaccard >= {up.get('dedup_threshold', 0.8)}), so no near-copy of a test example is in train "
        "or val, and adding data never moves an existing example."
        + (f" The test split is frozen ({stats['frozen_test']['file']})." if stats.get("frozen_test") else ""), "",
        "## Cleaning and deduplication", "",
        _table(["step", "examples"], [["records in (its sources)", up.get("records_in", "?")]]
               + [[f"dropped: {why}", k] for why, k in (up.get("dropped") or {}).items()]
               + [["exact duplicates removed", up.get("exact_duplicates", "?")],
                  ["near duplicates removed", up.get("near_duplicates", "?")],
                  ["duplicate clusters", up.get("duplicate_clusters", "?")],
                  ["kept after dedup", up.get("kept_after_dedup", "?")]]
               + [[f"not routed here ({why})", k] for why, k in stats["routing"]["turned_away"].items()]
               + [["in this dataset", n]]), "",
        "## Token lengths", "",
        f"Counted with {'the base tokenizer of ' + tokens['base_model'] if tokens['counter'] == 'tokenizer' else 'a word-based estimate (' + tokens.get('note', '') + ')'}"
        f": median {tokens['p50']}, 95th percentile {tokens['p95']}, max {tokens['max']}"
        + (f"; {tokens['over_train_max_length']} above train.max_length = {tokens['train_max_length']}"
           if tokens["train_max_length"] else "") + ".", "",
        _table(["tokens", "examples"], [[b["tokens"], b["examples"]] for b in tokens["histogram"]]), "",
        "## Load", "",
        "```python",
        "from datasets import load_dataset",
        f"ds = load_dataset(\"json\", data_files={{s: f\"data/splits/{adapter.name}/{{s}}.jsonl\" for s in "
        f"{splits!r}}})",
        "```", "",
        "Each line: `id`, `source`, `task`, `messages` (role/content), `provenance` (source, record id, origin, "
        "licence, retrieval time) and `cluster`. `alpaca/` and `sharegpt/` hold the same splits in those formats.", "",
    ]
    return "\n".join(parts)
