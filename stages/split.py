"""split:<adapter> — route kept examples to one adapter, cut train/val/test, export, describe.

Routing: the sources whose `adapters` list names the adapter plus those its `data.sources`
names; then `data.tasks` (task kinds), `data.keywords` (at least one must occur, as a whole
word or phrase, case-insensitive) and `data.exclude_keywords` (none may occur); capped at
`data.max_examples` when > 0 (by a stable hash rank, so the cap keeps whole clusters and
mostly the same ones as data grows). A record can feed any number of adapters.

Splits are 80/10/10 per (source, task) stratum, at the level of clusters. An example's
`cluster` key is set by dedup to its source record (`<source>:<source_id>`), or to the group its
source puts records in (`<source>:group:<group>`: a local file row's `group`), so every
question made from one ICD code, one patient or one group lands in one split. Near-duplicates need no
key of their own: dedup keeps one example per near-duplicate cluster (Jaccard >= its
threshold) and drops the rest, so no near-copy of a test question is left to sit in train.

Placement (see `assign`) is remembered in data/splits/<adapter>/assignments.json: a cluster
placed once keeps its split for good, so adding data never moves an existing record. Only
new clusters are placed, each into the split its strata lack most, which keeps every
stratum, small ones included, within about one cluster of its 80/10/10 share. With
`data.frozen_test` (a JSONL such as an earlier test.jsonl, or a list of ids/cluster keys),
exactly those clusters form the test split and new data only joins train and val.

Outputs in data/splits/<adapter>/: train/val/test.jsonl (messages), alpaca/ and sharegpt/
copies, statistics.json, a dataset card README.md and assignments.json. Files are rewritten
only when their content changes, which is what keeps an unchanged adapter from retraining.

Decontamination (stages.decontaminate): before writing, train and val lose every example that
copies an item of a test set eval scores (this adapter's test split and every other adapter's,
worked out here by `scored_items`): 13-gram overlap on the question, MinHash on the whole example.
Each dropped id, its reason and the test item it copies go to statistics.json
(`decontamination`) and the dataset card; clusters keep their placements in the ledger.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from stages import decontaminate, io, layout
from stages.errors import StageError

SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}
FROZEN_SHARES = {"train": 0.8 / 0.9, "val": 0.1 / 0.9}  # with a frozen test set, new clusters join train or val
MIN_FOR_ALL_SPLITS = 10  # examples from which an adapter gets at least one cluster in every split
KEEP_FIELDS = ("id", "source", "task", "messages", "provenance", "cluster")


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a key (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def assign(rows: list[dict], earlier: dict[str, str] | None = None,
           shares: dict[str, float] = SHARES) -> dict[str, str]:
    """Split name per cluster of `rows` (each with `cluster`, `source`, `task`).

    Why not a hash of the cluster alone: that is stable but stratified only in expectation
    (a 20-record stratum has no test example 12 % of the time), and no rule that depends on
    the cluster alone can do better, while any rule that looks at the rest of the data can
    move a record when data is added. So placements are remembered (`earlier`, the ledger):
    - a cluster in `earlier` keeps its split (when that split is in `shares`); it is never moved;
    - new clusters are placed one at a time in the order of a stable hash of their key, each
      into the split with the largest shortfall against its quota, summed over the strata its
      examples belong to: `share * stratum size (with this cluster) - examples already there`,
      divided by the stratum's size so that a small stratum outweighs a large one. On a
      single stratum this is a largest-deficit apportionment: at every prefix each split is
      within one cluster of its share (80/10/10 of 20 one-example clusters is 16/2/2);
    - from MIN_FOR_ALL_SPLITS examples, a split left empty takes the next new cluster (train,
      then val, then test), so no split stays empty once there are clusters enough for all;
    - a cluster is never divided: with fewer clusters than splits some splits stay empty, and
      an example that joins a cluster placed earlier (a new task for an old record) follows it.
    The result is a function of the data and the ledger; from an empty ledger, of the data.
    """
    earlier = earlier or {}
    names = [s for s in layout.SPLITS if shares.get(s, 0) > 0]
    strata_of: dict[str, Counter] = defaultdict(Counter)  # cluster -> (source, task) -> examples
    for row in rows:
        strata_of[row["cluster"]][(row["source"], row["task"])] += 1
    where = {c: earlier[c] for c in strata_of if earlier.get(c) in names}
    total: Counter = Counter()   # examples per stratum in this data
    size: Counter = Counter()    # of them, placed so far
    placed = {s: Counter() for s in names}  # per split: examples per stratum placed there
    overall = Counter()
    for c, strata in strata_of.items():
        total.update(strata)
        if c in where:
            size.update(strata)
            placed[where[c]].update(strata)
            overall[where[c]] += sum(strata.values())
    fill = len(rows) >= MIN_FOR_ALL_SPLITS
    for c in sorted((c for c in strata_of if c not in where), key=lambda c: (unit_hash(c), c)):
        strata = list(strata_of[c].items())
        empty = next((s for s in names if not overall[s]), None) if fill else None
        best, best_score = names[0], None
        for s in names:  # in order, so a tie goes to train, then val
            share, there = shares[s], placed[s]
            score = (s == empty, sum(m * (share * (size[k] + m) - there[k]) / total[k] for k, m in strata))
            if best_score is None or score > best_score:
                best, best_score = s, score
        where[c] = best
        for k, m in strata:
            size[k] += m
            placed[best][k] += m
            overall[best] += m
    return where


def load_ledger(adapter_name: str) -> dict[str, str]:
    """cluster -> split of every cluster earlier runs placed.

    Without a readable ledger (first run, or a project split by an older medforge), the
    clusters in the existing split files, so upgrading moves nothing either.
    """
    path = layout.split_ledger(adapter_name)
    if path.exists():
        try:
            doc = io.read_json(path)
            return {str(c): name for name, clusters in doc["splits"].items() if name in layout.SPLITS
                    for c in clusters}
        except (ValueError, KeyError, TypeError, AttributeError):
            print(f"split:{adapter_name}: warning: {path} is unreadable; taking placements from the split files")
    ledger: dict[str, str] = {}
    for name in layout.SPLITS:
        part = layout.split_file(adapter_name, name)
        try:
            for row in io.read_jsonl(part) if part.exists() else ():
                if isinstance(row, dict) and row.get("cluster"):
                    ledger.setdefault(str(row["cluster"]), name)
        except ValueError:
            continue
    return ledger


def save_ledger(adapter_name: str, ledger: dict[str, str]) -> None:
    splits = {name: sorted(c for c, s in ledger.items() if s == name) for name in layout.SPLITS}
    io.write_json(layout.split_ledger(adapter_name), {
        "note": "cluster placements; a cluster listed here keeps its split when data is added (delete to re-place)",
        "splits": splits})


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


def placements(cfg, adapter_name: str, rows: list[dict], earlier: dict[str, str]
               ) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Split per cluster of the adapter's (routed, capped) rows, and what its frozen test set matched.

    A function of the rows, the adapter's data block and its ledger alone, so another adapter's
    split stage works out the same test split (see `scored_items`) whether this one has run yet or
    not: a ledger only ever gains the placements that this function makes from it."""
    adapter = cfg.adapters[adapter_name]
    if not adapter.data.get("frozen_test"):
        return assign(rows, earlier), None
    frozen = load_frozen(adapter_name, adapter.data["frozen_test"])
    test_clusters = {r["cluster"] for r in rows if r["cluster"] in frozen or str(r["id"]) in frozen}
    where = assign([r for r in rows if r["cluster"] not in test_clusters], earlier, FROZEN_SHARES)
    where.update(dict.fromkeys(test_clusters, "test"))
    present = {r["cluster"] for r in rows} | {str(r["id"]) for r in rows}
    missing = len({k for k in frozen if k not in present})
    return where, {"file": adapter.data["frozen_test"], "clusters": len(test_clusters), "missing": missing}


def scored_label(cfg, adapter_name: str, row: dict) -> str:
    """How a dropped example's reason names the test set it copies: `<adapter>/test`, or the benchmark
    (MedQA, MedMCQA, PubMedQA through an hf_qa source) and the test split it is scored in."""
    source = cfg.sources.get(row.get("source"))
    if source is not None and source.kind == "hf_qa":
        return f"{source.params.get('dataset', source.name)} ({adapter_name}/test)"
    return f"{adapter_name}/test"


def scored_items(cfg, adapter_name: str, own_test: list[dict]) -> list[decontaminate.ScoredItem]:
    """Every test set eval scores: this adapter's test split and every other adapter's (the eval matrix).

    Another adapter's test split is worked out here from the dedup output, its config and its ledger
    (read, never written), the way its own split stage places it: reading its test.jsonl instead
    would make every split task depend on every other, a cycle in the doit graph."""
    items = [decontaminate.ScoredItem(scored_label(cfg, adapter_name, r), r) for r in own_test]
    for name in sorted(n for n in cfg.adapters if n != adapter_name):
        try:
            rows, _ = route(cfg, name)
            rows = _cap(rows, cfg.adapters[name].data.get("max_examples", 0))
            where, _ = placements(cfg, name, rows, load_ledger(name))
        except StageError as exc:
            print(f"split:{adapter_name}: warning: not checked against {name}'s test split, which cannot be "
                  f"worked out: {exc}")
            continue
        items += [decontaminate.ScoredItem(scored_label(cfg, name, r), r) for r in rows if where[r["cluster"]] == "test"]
    return items


def decontaminate_splits(cfg, adapter_name: str, by_split: dict[str, list[dict]]) -> dict[str, Any]:
    """Drop from train and val (what the adapter learns from and picks its checkpoint on) every example
    that copies an item of a test set eval scores; returns the statistics' `decontamination` entry."""
    tests = scored_items(cfg, adapter_name, by_split["test"])
    learned = [*by_split["train"], *by_split["val"]]
    kept, dropped = decontaminate.check(learned, tests, cfg.dedup)
    gone = {d["id"] for d in dropped}
    split_of = {str(r["id"]): name for name in ("train", "val") for r in by_split[name]}
    for d in dropped:
        d["split"] = split_of[d["id"]]
    checked = {name: len(by_split[name]) for name in ("train", "val")}
    for name in ("train", "val"):
        by_split[name] = [r for r in by_split[name] if str(r["id"]) not in gone]
    if dropped:
        reasons = Counter(d["reason"] for d in dropped)
        print(f"split:{adapter_name}: decontamination dropped {len(dropped)} example(s) from train/val: "
              + "; ".join(f"{n} {why}" for why, n in sorted(reasons.items())))
    return decontaminate.summary(dropped, checked, tests, cfg.dedup)


def run(cfg, adapter_name: str) -> dict[str, Any]:
    rows, routing = route(cfg, adapter_name)
    adapter = cfg.adapters[adapter_name]
    max_examples = adapter.data.get("max_examples", 0)
    rows = _cap(rows, max_examples)
    earlier = load_ledger(adapter_name)
    where, frozen_info = placements(cfg, adapter_name, rows, earlier)
    if frozen_info and frozen_info["missing"]:
        print(f"split:{adapter_name}: warning: {frozen_info['missing']} frozen test entries are no longer in the data")
    names = [where[row["cluster"]] for row in rows]
    new = sum(1 for c, name in where.items() if earlier.get(c) != name)
    empty = [name for name in layout.SPLITS if name not in set(names)]
    if empty and rows:
        print(f"split:{adapter_name}: warning: {', '.join(empty)} empty: {len(where)} cluster(s) in "
              f"{len(rows)} example(s), and a cluster is never divided across splits")
    save_ledger(adapter_name, {**earlier, **where})
    by_split: dict[str, list[dict]] = {name: [] for name in layout.SPLITS}
    for row, name in zip(rows, names):
        by_split[name].append(row)
    clean_report = decontaminate_splits(cfg, adapter_name, by_split)
    changed = [name for name, part in by_split.items() if io.write_jsonl(layout.split_file(adapter_name, name), part)]
    for fmt, convert in EXPORTS.items():
        for name, part in by_split.items():
            io.write_jsonl(layout.split_export_file(adapter_name, fmt, name), (convert(r) for r in part))
    stats = statistics(adapter_name, routing["sources"], adapter.data.get("tasks") or [], max_examples, by_split)
    stats["routing"] = {"data": adapter.data, "turned_away": routing["turned_away"]}
    stats["frozen_test"] = frozen_info
    stats["decontamination"] = clean_report
    stats["upstream"] = upstream(routing["sources"])
    stats["token_lengths"] = token_lengths(adapter, by_split)
    io.write_json(layout.split_statistics(adapter_name), stats)
    io.write_text(layout.dataset_card(adapter_name), dataset_card(adapter, stats, by_split))
    counts = ", ".join(f"{name} {len(part)}" for name, part in by_split.items())
    print(f"split:{adapter_name}: {len(rows)} example(s): {counts}; {new} cluster(s) placed now, "
          f"{len(where) - new} kept where earlier runs put them"
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
    from stages.clean import REASONS

    dropped = Counter(dict.fromkeys(REASONS, 0))  # every reason, so a zero reads as checked rather than missing
    for stats in per.values():
        dropped.update(stats.get("dropped", {}))
    return {
        "records_in": sum(s.get("in", 0) for s in per.values()),
        "dropped": {why: dropped[why] for why in [*REASONS, *sorted(set(dropped) - set(REASONS))]},
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
def decontamination_section(report: dict[str, Any]) -> list[str]:
    """The card's account of what decontamination dropped: counts per reason and a few ids to check."""
    if not report:
        return []
    sets = ", ".join(f"{label} ({n})" for label, n in report["test_items"].items()) or "none"
    settings = report["settings"]
    lines = ["## Decontamination", "",
             f"Train and val ({report['checked']['train']} and {report['checked']['val']} examples) were checked "
             f"against every test set eval scores: {sets} items. Dropped: a question holding at least "
             f"{settings['min_share']:.0%} of a test question's {settings['ngram']}-grams (lowercased, punctuation "
             f"stripped; a shorter question as a whole), or a near-duplicate of a whole test example (MinHash, "
             f"Jaccard >= {settings['threshold']}). {report['dropped_total']} example(s) dropped.", ""]
    if report["dropped"]:
        lines += [_table(["reason", "examples"], [[why, n] for why, n in report["dropped"].items()]), ""]
        shown: dict[str, list[dict]] = defaultdict(list)
        for d in report["dropped_examples"]:
            if len(shown[d["reason"]]) < decontaminate.SHOWN:
                shown[d["reason"]].append(d)
        lines += ["A few of them (`statistics.json` lists every one):", "",
                  _table(["dropped", "from", "copies test item", "reason"],
                         [[d["id"], d["split"], d["test_id"], d["reason"]] for part in shown.values() for d in part]), ""]
    return lines


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
        "Splits are 80/10/10 within each source and task, cut by cluster: a cluster is one source record (one "
        "code, one patient), so all questions about it share a split. Dedup kept one example of every group of "
        f"near-duplicates (Jaccard >= {up.get('dedup_threshold', 0.8)}), so no near-copy of a test example is in "
        "train or val. Placements are kept in `assignments.json`: adding data never moves an existing example."
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
        *decontamination_section(stats.get("decontamination") or {}),
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
        "licence, retrieval time) and `cluster` (its source record, `<source>:<source_id>`, or its group, "
        "`<source>:group:<group>`). `alpaca/` and "
        "`sharegpt/` hold the same splits in those formats.", "",
    ]
    return "\n".join(parts)
