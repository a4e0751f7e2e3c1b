"""normalize:<source> — raw pages -> records -> instruction examples with provenance.

Output: data/examples/<source>.jsonl, one example per line:
  {"id", "source", "task", "messages": [{"role", "content"}, ...],
   "provenance": {"source", "kind", "source_id", "origin", "licence", "retrieved_at"}}
and data/examples/<source>.report.json: how many examples, and the malformed rows the parser
passed over, counted by reason with where the first few were (also printed in the task log).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from stages import io, layout
from stages.config import Config, SourceConfig
from stages.sources import Source, SourceError, make


def examples_from_pages(source: Source, kind: str, manifest: dict[str, Any], raw_dir: Path,
                        page_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    seen: set[str] = set()
    page_dir = page_dir or raw_dir / "pages"
    for page in manifest["pages"]:
        path = page_dir / page["name"]
        for record in source.parse(path):
            provenance = {
                "source": source.name, "kind": kind, "source_id": str(record["id"]),
                "origin": record.get("origin", source.origin), "licence": source.licence,
                "retrieved_at": page["retrieved_at"],
            }
            if record.get("group") is not None:  # records the source says belong together (split keeps them so)
                provenance["group"] = str(record["group"])
            for example in source.examples(record):
                example_id = f"{source.name}:{record['id']}:{example['task']}"
                if example_id in seen:  # a record repeated across pages keeps its first copy
                    continue
                seen.add(example_id)
                yield {"id": example_id, "source": source.name, "task": example["task"],
                       "messages": example["messages"], "provenance": provenance}


def run(cfg: Config, source_name: str) -> int:
    source_cfg: SourceConfig = cfg.sources[source_name]
    manifest_path = layout.raw_manifest(source_name)
    if not manifest_path.exists():
        raise SourceError(f"normalize:{source_name}: {manifest_path} is missing; run `doit scrape:{source_name}` first")
    source = make(source_cfg.name, source_cfg.kind, source_cfg.params)
    rows = list(examples_from_pages(source, source_cfg.kind, io.read_json(manifest_path), layout.raw_dir(source_name)))
    if not rows and source.skipped:  # every row malformed: a wrong file or setting, not an empty source
        raise SourceError(f"normalize:{source_name}: no usable record, every row was malformed: "
                          f"{skipped_line(source.skipped)}; check [sources.{source_name}] in sources.toml")
    changed = io.write_jsonl(layout.examples_file(source_name), rows)
    io.write_json(layout.normalize_report(source_name), {"source": source_name, "examples": len(rows),
                                                         "skipped": source.skipped})
    print(f"normalize:{source_name}: {len(rows)} example(s) -> {layout.examples_file(source_name)}"
          f"{'' if changed else ' (unchanged)'}")
    if source.skipped:
        print(f"normalize:{source_name}: {skipped_line(source.skipped)} (counts in {layout.normalize_report(source_name)})")
    return len(rows)


def skipped_line(skipped: dict[str, dict[str, Any]]) -> str:
    """'skipped 3 malformed row(s): not valid JSON 2 (notes/a.jsonl:4, ...), ...', most frequent reason first."""
    total = sum(e["count"] for e in skipped.values())
    parts = [f"{reason} {e['count']} ({', '.join(e['first'][:3])}{', ...' if e['count'] > 3 else ''})"
             for reason, e in sorted(skipped.items(), key=lambda kv: (-kv[1]["count"], kv[0]))]
    return f"skipped {total} malformed row(s): " + "; ".join(parts)


def parse_command(args) -> int:
    """`medforge parse <source> <file>`: the records (as normalized examples) one raw file yields."""
    import sys

    from stages import config
    from stages.sources import KINDS

    try:
        cfg = config.load()
        source_cfg = cfg.sources.get(args.source)
    except Exception:  # parsing a file needs no valid project config when given a kind
        source_cfg = None
    if source_cfg is None and args.source not in KINDS:
        raise SourceError(f"'{args.source}' is neither a source in sources.toml nor a source kind "
                          f"({', '.join(KINDS)}); name one of them")
    name, kind, params = ((source_cfg.name, source_cfg.kind, source_cfg.params) if source_cfg
                          else (args.source, args.source, {}))
    source = make(name, kind, params)
    path = Path(args.file)
    if not path.exists():
        raise SourceError(f"{path}: file not found; give a raw response file")
    manifest = {"pages": [{"name": path.name, "retrieved_at": ""}]}
    for row in examples_from_pages(source, kind, manifest, path.parent, page_dir=path.parent):
        sys.stdout.buffer.write(io.dumps(row) + b"\n")
    if source.skipped:  # on stderr: stdout stays the examples
        sys.stdout.flush()
        print(f"medforge parse: {skipped_line(source.skipped)}", file=sys.stderr)
    return 0
