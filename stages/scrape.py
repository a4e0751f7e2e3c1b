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
from stages.sources import SourceError, make

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


def fetch_block(source_cfg: SourceConfig) -> dict[str, Any]:
    """What a scrape depends on (dodo.py's config_changed uses the same block)."""
    return {"kind": source_cfg.kind, "mode": source_cfg.mode, "params": source_cfg.params}


def mirror_manifest(store: RawStore, source_cfg: SourceConfig) -> dict[str, Any]:
    """mode = "mirror": data/raw/<source>/ was copied from a connected machine; fetch nothing."""
    pages = store.pages()
    if not pages:
        raise SourceError(f"source '{source_cfg.name}' is in mirror mode but {store.pages_dir} holds no raw pages; "
                          f"copy data/raw/{source_cfg.name}/ from a machine that scraped it (see docs/SOURCES.md), "
                          f"or set mode = \"live\"")
    listed = store.folder / "manifest.json"
    if listed.exists():  # the mirrored manifest says which pages make the finished pass
        names = {p["name"] for p in io.read_json(listed).get("pages", [])}
        missing = names - {p.name for p in pages}
        if missing:
            raise SourceError(f"source '{source_cfg.name}': mirror is incomplete, {len(missing)} page(s) of "
                              f"{listed} are missing (e.g. {sorted(missing)[0]}); copy the whole folder again")
        return store.write_manifest(source_cfg, keep=[p for p in pages if p.name in names])
    return store.write_manifest(source_cfg)


def run(cfg: Config, source_name: str) -> dict[str, Any]:
    source_cfg = cfg.sources[source_name]
    source = make(source_cfg.name, source_cfg.kind, source_cfg.params)
    store = RawStore(layout.raw_dir(source_cfg.name))
    if source.network and source_cfg.mode == "mirror":
        manifest = mirror_manifest(store, source_cfg)
        print(f"scrape:{source_name}: mirror mode, {len(manifest['pages'])} raw page(s) in {store.folder}")
        return manifest
    if source.network:
        from stages.http import offline_requested

        if offline_requested():
            raise SourceError(f"source '{source_name}' needs the network but this run is offline (MEDFORGE_OFFLINE); "
                              f"set mode = \"mirror\" in [sources.{source_name}] of sources.toml to build from "
                              f"data/raw/{source_name}/, or enabled = false to skip it")
        resumed = store.begin(io.content_hash(io.dumps(fetch_block(source_cfg))))
        if resumed:
            print(f"scrape:{source_name}: resuming the unfinished scrape from {store.folder / CHECKPOINT}")
    source.fetch(store)
    # An offline source regenerates all its pages each run: pages it no longer writes
    # (parameters changed) must not linger. A network source lists the pages of its last
    # complete pass (however many processes it took); older pages stay on disk, unlisted.
    if source.network:
        manifest = store.write_manifest(source_cfg, keep=store.pass_pages())
        store.finish()
    else:
        manifest = store.write_manifest(source_cfg, keep=store.touched)
        io.write_json(store.folder / STATUS, {"done": True, "finished_at": now_utc()})
    print(f"scrape:{source_name}: {len(manifest['pages'])} raw page(s) in {store.folder}")
    return manifest


def refresh_age_days(source_cfg: SourceConfig, now: dt.datetime | None = None) -> float | None:
    """Days since the source's last complete scrape, or None if it never finished one."""
    status_path = layout.raw_dir(source_cfg.name) / STATUS
    if not status_path.exists():
        return None
    finished = io.read_json(status_path).get("finished_at")
    if not finished:
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    return (now - dt.datetime.fromisoformat(finished)).total_seconds() / 86400


def refresh_due(source_cfg: SourceConfig):
    """A doit `uptodate` check: False (re-scrape) once `refresh = "<N>d"` days have passed.

    `refresh = "never"`, a mirror, and an offline source are never due by age; changes to
    the block are config_changed's job, a missing manifest is doit's.
    """
    def uptodate(task=None, values=None) -> bool:
        if source_cfg.refresh == "never" or source_cfg.mode == "mirror":
            return True
        days = int(source_cfg.refresh[:-1])
        age = refresh_age_days(source_cfg)
        return age is not None and age < days
    return uptodate
