"""scrape:<source> — fetch a source's raw pages into data/raw/<source>/.

Raw pages are stored as they arrive, one atomic file each, with a checkpoint of the
cursor, so a killed scrape resumes where it stopped. The task's target is the
manifest, written last: it lists every page with its hash and retrieval time.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from stages import io, layout
from stages.config import Config, SourceConfig
from stages.sources import make

CHECKPOINT = "checkpoint.json"
PAGE_META = "pages.jsonl"  # append-only: retrieval time of each page as it lands


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


class RawStore:
    """data/raw/<source>/: pages under pages/, a cursor checkpoint, and the manifest."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.pages_dir = self.folder / "pages"
        self.touched: list[Path] = []  # pages written or confirmed during this run

    def page_path(self, name: str) -> Path:
        return self.pages_dir / name

    def has(self, name: str) -> bool:
        return self.page_path(name).exists()

    def put(self, name: str, data: bytes) -> Path:
        """Store one raw page atomically (unchanged content keeps its file and retrieval time)."""
        path = self.page_path(name)
        self.touched.append(path)
        if io.write_bytes(path, data) or not self._retrieved().get(name):
            io.append_jsonl(self.folder / PAGE_META, {"page": name, "retrieved_at": now_utc()})
        return path

    def pages(self) -> list[Path]:
        if not self.pages_dir.exists():
            return []
        return sorted(p for p in self.pages_dir.iterdir() if p.is_file() and not p.name.startswith("."))

    @property
    def checkpoint(self) -> dict[str, Any]:
        path = self.folder / CHECKPOINT
        return io.read_json(path) if path.exists() else {}

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        io.write_json(self.folder / CHECKPOINT, state)

    def _retrieved(self) -> dict[str, str]:
        path = self.folder / PAGE_META
        if not path.exists():
            return {}
        return {row["page"]: row["retrieved_at"] for row in io.read_jsonl(path)}

    def write_manifest(self, source: SourceConfig, keep: list[Path] | None = None) -> dict[str, Any]:
        """List the pages (all, or `keep`) with hashes; content-identical reruns leave the file untouched."""
        retrieved = self._retrieved()
        pages = keep if keep is not None else self.pages()
        manifest = {
            "source": source.name,
            "kind": source.kind,
            "pages": [{"name": p.name, "sha256": io.file_hash(p), "bytes": p.stat().st_size,
                       "retrieved_at": retrieved.get(p.name, "")} for p in pages],
        }
        io.write_json(self.folder / "manifest.json", manifest)
        return manifest


def run(cfg: Config, source_name: str) -> dict[str, Any]:
    source_cfg = cfg.sources[source_name]
    source = make(source_cfg.name, source_cfg.kind, source_cfg.params)
    store = RawStore(layout.raw_dir(source_cfg.name))
    source.fetch(store)
    # An offline source regenerates all its pages each run: pages it no longer writes
    # (parameters changed) must not linger. A network source keeps pages of earlier runs.
    manifest = store.write_manifest(source_cfg, keep=None if source.network else store.touched)
    print(f"scrape:{source_name}: {len(manifest['pages'])} raw page(s) in {store.folder}")
    return manifest
