"""The dedup stage (`doit dedup`) and `medforge dedup IN.jsonl --out OUT.jsonl`.

The stage cleans each enabled source, fingerprints what cleaning kept (cached per source,
keyed by the content hash of its examples file and every knob that changes the result, so a
change to one source re-hashes only that source), clusters all fingerprints together and keeps
one example per cluster (source_priority, then the richer text).

Outputs: data/dedup/kept.jsonl (kept examples, each with a `cluster` key: the source record it
came from, so every question about one record lands in one split) and data/dedup/report.json.
`medforge dedup` runs the same fingerprints and clusters on any JSONL.

Engines (`[dedup] engine`): "local" computes everything in this process; "ray" computes fingerprints
and LSH buckets as tasks on a Ray cluster (stages/dedup/ray_engine.py) and verifies and clusters here,
with the same result.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import orjson

from stages import clean, io, layout
from stages.dedup.lsh import decide
from stages.dedup.minhash import SIGNATURE_VERSION, Fingerprints, fingerprint
from stages.errors import StageError

REPORT_CLUSTERS = 10


def example_text(row: dict[str, Any]) -> str:
    """What two examples are compared on: `text`, or the user and assistant turns of `messages`."""
    if isinstance(row.get("text"), str):
        return row["text"]
    messages = row.get("messages")
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", "")) for m in messages
                         if isinstance(m, dict) and m.get("role") in ("user", "assistant"))
    raise ValueError("has neither a 'text' string nor a 'messages' list")


@dataclass
class _Row:
    """What dedup keeps in memory per example; the examples themselves are streamed from their files."""
    source: str
    id: str
    cluster: str


@dataclass
class _Source:
    """One source after cleaning and fingerprinting (from its cache when nothing it depends on changed)."""
    name: str
    kind: str
    path: Path
    reasons: list[str]       # per example in the file: "" = kept by cleaning, else the drop reason
    changes: dict[str, int]  # what cleaning changed (markup, boilerplate lines, contacts, unicode)
    fp: Fingerprints         # of the examples cleaning kept, in file order
    cached: bool


def _cache_key(path: Path, settings: dict, clean_settings: dict, counter_key: str) -> str:
    knobs = io.dumps({"clean": clean_settings, "counter": counter_key, "num_perm": settings["num_perm"],
                      "shingle_words": settings["shingle_words"]})
    return f"v{SIGNATURE_VERSION}:c{clean.CLEAN_VERSION}:{io.content_hash(knobs)[:16]}:{io.file_hash(path)}"


def _load_cache(cache: Path, key: str) -> tuple[list[str], dict, Fingerprints] | None:
    data = io.read_arrays(cache, key)
    if data is None:
        return None  # none yet, unreadable or stale: recompute
    try:
        fp = Fingerprints([bytes(d) for d in data["digests"]], data["signatures"], data["quality"],
                          data["shingles"], data["offsets"])
        reasons = [str(r) for r in data["reasons"]]
        changes = orjson.loads(data["changes"].tobytes())
    except (KeyError, ValueError):
        return None  # an older cache's layout: recompute
    if len(fp) != sum(1 for r in reasons if not r):
        return None
    return reasons, changes, fp


def _prepare(source, settings: dict, clean_settings: dict, counter: clean.TokenCounter, counter_key: str,
             fingerprinter: Callable[..., Fingerprints] = fingerprint) -> _Source:
    """Clean and fingerprint one source, or take both from its cache when its file and settings are unchanged.
    `fingerprinter`: minhash.fingerprint or an engine's equivalent (the same result, so the same cache)."""
    path = layout.examples_file(source.name)
    key = _cache_key(path, settings, clean_settings, counter_key)
    cache = layout.dedup_cache(source.name)
    hit = _load_cache(cache, key)
    if hit is not None:
        return _Source(source.name, source.kind, path, hit[0], hit[1], hit[2], True)
    cleaned, why, changes = clean.clean_rows(io.read_jsonl(path), source.kind, clean_settings, counter)
    reasons = [r or "" for r in why]
    fp = fingerprinter((example_text(row) for row, r in zip(cleaned, reasons) if not r),
                       settings["num_perm"], settings["shingle_words"])
    digests = np.array(fp.digests, dtype="S16") if fp.digests else np.zeros(0, dtype="S16")
    io.write_arrays(cache, key, digests=digests, signatures=fp.signatures, quality=fp.quality, shingles=fp.shingles,
                    offsets=fp.offsets, reasons=np.array(reasons, dtype=str),
                    changes=np.frombuffer(io.dumps(changes), dtype=np.uint8))
    return _Source(source.name, source.kind, path, reasons, changes, fp, False)


def _rank(priority: list[str], rows: list[_Row], fp: Fingerprints) -> list[tuple]:
    order = {name: i for i, name in enumerate(priority)}
    return [(order.get(row.source, len(order)), row.source if row.source not in order else "", -int(q), row.id)
            for row, q in zip(rows, fp.quality)]


def _cluster_key(row: dict) -> str:
    """What split keeps together: a record's examples, or a group of records its source names (local_files)."""
    prov = row.get("provenance") or {}
    if prov.get("source") and prov.get("group"):
        return f"{prov['source']}:group:{prov['group']}"
    if prov.get("source") and prov.get("source_id"):
        return f"{prov['source']}:{prov['source_id']}"
    return str(row["id"])


def _preview(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def tokenizer_spec(cfg) -> str:
    """The base model whose tokenizer measures lengths: the adapters' (the first, when they differ)."""
    from stages.config import DEFAULT_BASE_MODEL

    bases = cfg.base_models()
    return bases[0] if bases else DEFAULT_BASE_MODEL


def counter_identity(counter: clean.TokenCounter) -> str:
    if counter.kind != "tokenizer":
        return f"estimate:{clean.CLEAN_VERSION}"
    return f"tokenizer:{io.file_hash(layout.base_dir(counter.spec) / 'tokenizer.json')}"


@contextlib.contextmanager
def _engine(settings: dict) -> Iterator[Any]:
    """The configured engine for one run: None (local) or a connected ray_engine.RayEngine."""
    if settings["engine"] != "ray":
        yield None
        return
    try:
        from stages.dedup.ray_engine import RayEngine
    except ImportError as exc:
        raise StageError(f"dedup: dedup.engine = \"ray\" in sources.toml needs Ray ({exc}); "
                         f"pip install -e '.[ray]', or set dedup.engine = \"local\"") from None
    with RayEngine(settings["address"]) as engine:
        print(f"dedup: engine {engine.describe()}")
        yield engine


def run(cfg) -> dict[str, Any]:
    settings = cfg.dedup
    with _engine(settings) as engine:
        return _run(cfg, settings, engine)


def _run(cfg, settings: dict, engine) -> dict[str, Any]:
    started = time.time()
    clean_settings = cfg.clean or {}
    num_perm, shingle_words, threshold = settings["num_perm"], settings["shingle_words"], settings["threshold"]
    counter = clean.token_counter(tokenizer_spec(cfg))
    counter_key = counter_identity(counter)
    prepared: list[_Source] = []
    for source in cfg.enabled_sources():
        if not layout.examples_file(source.name).exists():
            raise StageError(f"dedup: {layout.examples_file(source.name)} is missing; "
                             f"run `doit normalize:{source.name}` first")
        prepared.append(_prepare(source, settings, clean_settings, counter, counter_key,
                                 engine.fingerprint if engine else fingerprint))
    rows: list[_Row] = []
    per_source: dict[str, dict[str, Any]] = {}
    drop_examples: dict[str, list[str]] = {}
    for src in prepared:
        for row, reason in zip(io.read_jsonl(src.path), src.reasons):
            if reason:
                examples = drop_examples.setdefault(reason, [])
                if len(examples) < 5:
                    examples.append(str(row.get("id")))
            else:
                rows.append(_Row(src.name, str(row["id"]), _cluster_key(row)))
        dropped = Counter(r for r in src.reasons if r)
        per_source[src.name] = {"in": len(src.reasons), "dropped": dict(sorted(dropped.items())),
                                "cleaned": dict(sorted(src.changes.items())), "exact_dups": 0, "near_dups": 0,
                                "duplicate_clusters": 0, "kept": 0,
                                "signatures": "cached" if src.cached else "computed"}
    fp = Fingerprints.concat([src.fp for src in prepared], num_perm)
    lsh_stats: dict[str, Any] = {}
    decision = decide(fp, threshold, _rank(settings["source_priority"], rows, fp),
                      engine.candidate_pairs if engine else None, lsh_stats)
    for i, row in enumerate(rows):
        stats = per_source[row.source]
        stats["kept" if decision.keep[i] else "exact_dups" if decision.exact[i] else "near_dups"] += 1
    members: dict[int, list[int]] = {}
    for i, root in enumerate(decision.roots):
        members.setdefault(int(root), []).append(i)
    multi = sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), rows[m[0]].id))
    for m in multi:
        per_source[rows[int(decision.keeper[m[0]])].source]["duplicate_clusters"] += 1
    shown = {i for m in multi[:REPORT_CLUSTERS] for i in m[:5]}
    previews: dict[int, str] = {}
    cleaner = clean.Cleaner(clean_settings.get("strip_markup", True), clean_settings.get("boilerplate", []))

    def kept_rows() -> Iterator[dict]:
        i = 0
        for src in prepared:
            scrub = src.kind in clean_settings.get("scrub_contacts", [])
            for row, reason in zip(io.read_jsonl(src.path), src.reasons):
                if reason:
                    continue
                if i in shown or decision.keep[i]:
                    row = cleaner.row(row, scrub)  # the same transform that was fingerprinted
                if i in shown:
                    previews[i] = _preview(example_text(row))
                if decision.keep[i]:
                    yield {**row, "cluster": rows[i].cluster}
                i += 1

    io.write_jsonl(layout.dedup_file(), kept_rows())
    kept = int(decision.keep.sum())
    total_in = sum(s["in"] for s in per_source.values())
    dropped_total = Counter()
    for stats in per_source.values():
        dropped_total.update(stats["dropped"])
    report = {
        "settings": {"threshold": threshold, "num_perm": num_perm, "shingle_words": shingle_words,
                     "source_priority": settings["source_priority"], "engine": settings["engine"]},
        "cleaning": {"tokens": counter.describe(), "settings": clean_settings,
                     "dropped": dict(sorted(dropped_total.items())),
                     "dropped_examples": dict(sorted(drop_examples.items()))},
        "lsh": lsh_stats,
        "sources": per_source,
        "total": {"in": total_in, "dropped": sum(dropped_total.values()),
                  "exact_dups": int(decision.exact.sum()), "near_dups": int(decision.near.sum()),
                  "kept": kept, "removed": total_in - kept, "duplicate_clusters": len(multi)},
        "largest_clusters": [{
            "size": len(m),
            "kept": rows[int(decision.keeper[m[0]])].id,
            "members": [{"id": rows[i].id, "source": rows[i].source, "text": previews[i]} for i in m[:5]],
        } for m in multi[:REPORT_CLUSTERS]],
        "seconds": round(time.time() - started, 2),
    }
    io.write_json(layout.dedup_report(), report)
    print(f"dedup: tokens counted with {counter.kind} ({counter.spec})")
    for name, stats in per_source.items():
        drops = ", ".join(f"{n} {why}" for why, n in stats["dropped"].items()) or "none"
        print(f"dedup: {name}: {stats['in']} in, dropped by cleaning: {drops}; {stats['exact_dups']} exact + "
              f"{stats['near_dups']} near duplicates removed, {stats['kept']} kept (signatures {stats['signatures']})")
    print(f"dedup: {kept} of {total_in} kept -> {layout.dedup_file()} ({report['seconds']}s)")
    return report


# --- `medforge dedup IN.jsonl --out OUT.jsonl`
def dedup_command(args) -> int:
    started = time.time()
    if not 0.0 < args.threshold < 1.0:
        raise StageError(f"--threshold must be between 0 and 1 (got {args.threshold}); fix it")
    path = Path(args.input)
    if not path.exists():
        raise StageError(f"{path}: file not found; give a JSONL file with 'text' or 'messages' per line")
    records = 0  # non-blank lines, each one record

    def texts() -> Iterator[str]:  # streamed: only the fingerprints stay in memory, never the file
        nonlocal records
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise StageError(f"{path}:{lineno}: not valid JSON ({exc}); fix or delete the line") from None
                del line
                try:
                    text = example_text(record)
                except (ValueError, AttributeError, TypeError) as exc:
                    raise StageError(f"{path}:{lineno}: the record {exc}; every line needs 'text' or "
                                     f"'messages'") from None
                del record
                records += 1
                yield text

    from stages.config import DEDUP_SCHEMA

    fp = fingerprint(texts(), DEDUP_SCHEMA["num_perm"][1], DEDUP_SCHEMA["shingle_words"][1])
    # the keeper: the richest text, then the earliest line
    decision = decide(fp, args.threshold, [(-int(q), i) for i, q in enumerate(fp.quality)])

    def kept_lines() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            kept = iter(decision.keep)
            for line in fh:
                if line.strip() and next(kept):
                    yield line if line.endswith(b"\n") else line + b"\n"

    io.write_chunks(args.out, kept_lines())
    sizes = np.bincount(decision.roots, minlength=records) if records else np.zeros(0, np.int64)
    result = {"kept": int(decision.keep.sum()), "removed": int((~decision.keep).sum()),
              "clusters": int((sizes > 1).sum()), "seconds": round(time.time() - started, 3)}
    sys.stdout.write(io.dumps(result).decode() + "\n")
    return 0
