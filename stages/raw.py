"""data/raw/<source>/, the raw store: what a scrape fetched, page by page, with its cursor and manifest.

At the bottom beside io and layout: the sources write into it (`Source.fetch(store)`) and
stages.scrape drives it, so neither has to import the other for it.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from stages import io

CHECKPOINT = "checkpoint.json"
PAGE_META = "pages.jsonl"  # append-only: retrieval time of each page as it lands
STATUS = "scrape.json"     # the current pass: which fetch block it serves, done or not, when it finished
PASS_PAGES = "pass.txt"    # append-only: names of the pages the current pass has stored


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
        if "/" in name or name.startswith(".") or name in ("", CHECKPOINT, STATUS):
            raise ValueError(f"bad raw page name {name!r}")
        path = self.page_path(name)
        self.touched.append(path)
        if io.write_bytes(path, data) or not self._retrieved().get(name):
            io.append_jsonl(self.folder / PAGE_META, {"page": name, "retrieved_at": now_utc()})
        if name not in self._pass_names():
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / PASS_PAGES, "a", encoding="utf-8") as fh:
                fh.write(name + "\n")
            self._pass_cache.add(name)
        return path

    # --- passes: a network scrape spans processes (killed, resumed); a pass ends when fetch returns
    _pass_cache: set[str] | None = None

    def _pass_names(self) -> set[str]:
        if self._pass_cache is None:
            path = self.folder / PASS_PAGES
            self._pass_cache = set(path.read_text(encoding="utf-8").split()) if path.exists() else set()
        return self._pass_cache

    @property
    def status(self) -> dict[str, Any]:
        path = self.folder / STATUS
        return io.read_json(path) if path.exists() else {}

    def begin(self, block_hash: str) -> bool:
        """Resume the unfinished pass for this fetch block, or start a fresh one; True when resuming."""
        if self.pages_dir.exists():  # a SIGKILL mid-write leaves its temporary file behind
            for tmp in self.pages_dir.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        status = self.status
        if status.get("block") == block_hash and not status.get("done"):
            return True
        (self.folder / CHECKPOINT).unlink(missing_ok=True)
        (self.folder / PASS_PAGES).unlink(missing_ok=True)
        self._pass_cache = set()
        io.write_json(self.folder / STATUS, {"block": block_hash, "done": False, "started_at": now_utc()})
        return False

    def finish(self) -> None:
        io.write_json(self.folder / STATUS, {**self.status, "done": True, "finished_at": now_utc()})

    def pass_pages(self) -> list[Path]:
        names = self._pass_names()
        return [p for p in self.pages() if p.name in names]

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

    def write_manifest(self, source, keep: list[Path] | None = None) -> dict[str, Any]:
        """List the pages (all, or `keep`) with hashes; content-identical reruns leave the file untouched.
        `source`: the source's config (its `name` and `kind`)."""
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
