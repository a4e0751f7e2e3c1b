"""Read what finished stages wrote (manifests, dedup report, split statistics, metrics, eval) into
plain dicts for the data and eval views. Pure file reading, called from worker threads; missing
files are simply absent rows, since any stage may not have run yet."""
from __future__ import annotations

from pathlib import Path

import orjson

from stages import io, layout


def _json(path: Path) -> dict | None:
    try:
        data = io.read_json(path)
        return data if isinstance(data, dict) else None
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def _count_lines(path: Path) -> int | None:
    try:
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return None


def _first_json_line(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            return orjson.loads(fh.readline())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


# stages/clean.py's drop reasons, as the data view names them
CLEAN_REASONS = {
    "invalid": "invalid row (no messages or text)",
    "empty": "empty question or answer",
    "echo": "answer repeats the question",
    "too_short": "too short (< clean.min_tokens)",
    "too_long": "too long (> clean.max_tokens)",
}


def clean_reason(reason: str) -> str:
    return CLEAN_REASONS.get(reason, reason.replace("_", " "))


def data_report(root: Path, sources: list[str], adapters: list[str]) -> dict:
    dedup = _json(root / layout.dedup_report()) or {}
    dedup_sources = dedup.get("sources", {})
    rows = []
    for name in sources:
        manifest = _json(root / layout.raw_manifest(name))
        d = dedup_sources.get(name, {})
        examples = d.get("in")
        if examples is None:
            examples = _count_lines(root / layout.examples_file(name))
        cleaning = d.get("dropped") if isinstance(d.get("dropped"), dict) else None
        rows.append({"source": name, "pages": len(manifest["pages"]) if manifest else None, "examples": examples,
                     "cleaned_out": sum(cleaning.values()) if cleaning is not None else None,
                     "exact_dups": d.get("exact_dups"), "near_dups": d.get("near_dups"), "kept": d.get("kept"),
                     "clean_drops": cleaning or {}})
    drops = []
    for r in rows:  # cleaning first (it runs first), most frequent reason first
        for reason, count in sorted(r["clean_drops"].items(), key=lambda kv: (-kv[1], kv[0])):
            if count:
                drops.append({"where": f"clean · {r['source']}", "reason": clean_reason(reason), "count": count})
        for key, reason in (("exact_dups", "exact duplicate"), ("near_dups", "near duplicate")):
            if r[key]:
                drops.append({"where": f"dedup · {r['source']}", "reason": reason, "count": r[key]})
    splits = []
    for name in adapters:
        stats = _json(root / layout.split_dir(name) / "statistics.json")
        start = _first_json_line(root / layout.metrics_file(name))
        if stats:
            splits.append({"adapter": name, "examples": stats.get("examples"), **stats.get("splits", {}),
                           "by_source": stats.get("by_source", {})})
            # copies of a scored test item dropped from train/val (stages/decontaminate.py); the ids are in the card
            decontaminated = (stats.get("decontamination") or {}).get("dropped") or {}
            for reason, count in sorted(decontaminated.items(), key=lambda kv: (-kv[1], kv[0])):
                drops.append({"where": f"split · {name}", "reason": reason, "count": count})
        if start and start.get("kind") == "start" and start.get("dropped"):
            drops.append({"where": f"train · {name}", "reason": "no answer tokens left after max_length",
                          "count": start["dropped"]})
        ev = _json(root / layout.eval_file(name))
        if ev and ev.get("dropped"):
            drops.append({"where": f"eval · {name}", "reason": "no answer tokens left after max_length",
                          "count": ev["dropped"]})
    cleaning = (dedup.get("cleaning") or {}).get("dropped")
    return {"sources": rows, "dedup_total": dedup.get("total"), "clean_total": cleaning if isinstance(cleaning, dict)
            else None, "drops": drops, "splits": splits}


def eval_report(root: Path, adapters: list[str]) -> dict:
    return {"adapters": {name: rep for name in adapters if (rep := _json(root / layout.eval_file(name)))}}
