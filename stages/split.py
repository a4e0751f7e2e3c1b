"""split:<adapter> — route kept examples to one adapter and cut train/val/test.

Routing: the sources whose `adapters` list names the adapter, filtered by its
`data.tasks` when given, capped at `data.max_examples` when > 0 (by a stable hash
rank, so the cap keeps whole clusters and mostly the same ones as data grows).

Splits are 80/10/10 by a stable hash of each example's `cluster` key (set by dedup):
a record never changes split when other data is added, and a whole cluster lands in
one split. Files are rewritten only when their content changes, which is what keeps
an unchanged adapter from retraining.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Any

from stages import io, layout
from stages.errors import StageError

FRACTIONS = (("train", 0.8), ("val", 0.9), ("test", 1.0))  # cumulative upper bounds
MIN_FOR_ALL_SPLITS = 10
KEEP_FIELDS = ("id", "source", "task", "messages", "provenance", "cluster")


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a key (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_of(key: str) -> str:
    u = unit_hash(key)
    return next(name for name, upper in FRACTIONS if u < upper)


def _interval(split: str) -> tuple[float, float]:
    lower = 0.0
    for name, upper in FRACTIONS:
        if name == split:
            return lower, upper
        lower = upper
    raise KeyError(split)


def _distance(u: float, split: str) -> float:
    lower, upper = _interval(split)
    return 0.0 if lower <= u < upper else min(abs(u - lower), abs(u - upper))


def assign(keys: list[str]) -> list[str]:
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
    where = {g: split_of(g) for g in groups}
    if len(keys) >= MIN_FOR_ALL_SPLITS:
        size = Counter(keys)
        for target, _ in FRACTIONS:
            totals = Counter()
            for g in groups:
                totals[where[g]] += size[g]
            if totals[target]:
                continue
            holding = Counter(where[g] for g in groups)
            donors = [s for s in holding if holding[s] >= 2]  # a split never gives away its last group
            donor = max(donors, key=lambda s: (totals[s], s))
            movable = [g for g in groups if where[g] == donor]
            pick = min(movable, key=lambda g: (_distance(unit_hash(g), target), g))
            where[pick] = target
    return [where[k] for k in keys]


def _cap(rows: list[dict], max_examples: int) -> list[dict]:
    if max_examples <= 0 or len(rows) <= max_examples:
        return rows
    ranked = sorted(range(len(rows)), key=lambda i: (unit_hash(rows[i]["cluster"]), str(rows[i]["id"])))
    chosen = set(ranked[:max_examples])
    return [row for i, row in enumerate(rows) if i in chosen]


def run(cfg, adapter_name: str) -> dict[str, Any]:
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
    tasks = adapter.data.get("tasks") or []
    max_examples = adapter.data.get("max_examples", 0)
    rows = []
    seen_tasks = set()
    for row in io.read_jsonl(kept):
        if row.get("source") not in sources:
            continue
        seen_tasks.add(row.get("task"))
        if not tasks or row.get("task") in tasks:
            rows.append({k: row[k] for k in KEEP_FIELDS if k in row})
    if not rows:
        if tasks:
            raise StageError(f"split:{adapter_name}: none of data.tasks ({', '.join(tasks)}) in "
                             f"adapters/{adapter_name}/adapter.toml is produced by its sources in sources.toml "
                             f"({', '.join(sources)}; they produce: {', '.join(sorted(map(str, seen_tasks))) or 'nothing'})"
                             f"; fix data.tasks or the sources' `adapters`")
        raise StageError(f"split:{adapter_name}: its sources in sources.toml ({', '.join(sources)}) yielded no "
                         f"examples after dedup; check those sources' params and run `doit normalize`")
    unknown = sorted(set(tasks) - seen_tasks)
    if unknown:
        print(f"split:{adapter_name}: warning: data.tasks names {', '.join(unknown)}, which no source produces")
    for row in rows:
        row.setdefault("cluster", str(row["id"]))
    rows = _cap(rows, max_examples)
    names = assign([row["cluster"] for row in rows])
    by_split: dict[str, list[dict]] = {name: [] for name, _ in FRACTIONS}
    for row, name in zip(rows, names):
        by_split[name].append(row)
    changed = [name for name, part in by_split.items() if io.write_jsonl(layout.split_file(adapter_name, name), part)]
    stats = statistics(adapter_name, sources, tasks, max_examples, by_split)
    io.write_json(layout.split_dir(adapter_name) / "statistics.json", stats)
    counts = ", ".join(f"{name} {len(part)}" for name, part in by_split.items())
    print(f"split:{adapter_name}: {len(rows)} example(s): {counts}"
          f"{' (rewritten: ' + ', '.join(changed) + ')' if changed else ' (unchanged)'}")
    return stats


def statistics(adapter: str, sources: list[str], tasks: list[str], max_examples: int,
               by_split: dict[str, list[dict]]) -> dict[str, Any]:
    per_source: dict[str, Counter] = defaultdict(Counter)
    per_task: dict[str, Counter] = defaultdict(Counter)
    for name, part in by_split.items():
        for row in part:
            per_source[row["source"]][name] += 1
            per_task[row["task"]][name] += 1
    return {
        "adapter": adapter, "sources": sources, "tasks": tasks, "max_examples": max_examples,
        "examples": sum(len(p) for p in by_split.values()),
        "splits": {name: len(part) for name, part in by_split.items()},
        "clusters": {name: len({row["cluster"] for row in part}) for name, part in by_split.items()},
        "by_source": {s: dict(c) for s, c in sorted(per_source.items())},
        "by_task": {t: dict(c) for t, c in sorted(per_task.items())},
    }
