"""scrape:<source> — fetch a source's raw pages into data/raw/<source>/.

Raw pages are stored as they arrive, one atomic file each, with a checkpoint of the
cursor, so a killed scrape resumes where it stopped. The task's target is the
manifest, written last: it lists every page with its hash and retrieval time.
A network source downloads again only when its sources.toml block changed or its
refresh is due; any other re-run (a code change) re-lists the finished pass, and
mirror mode or `doit offline=1` builds from the pages already there.
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


def block_hash(source_cfg: SourceConfig) -> str:
    return io.content_hash(io.dumps(fetch_block(source_cfg)))


def input_files(source_cfg: SourceConfig) -> list[str]:
    """The user's files this source reads (paths, globs, DrugBank XML, a local dataset), for the scrape's file_dep:
    doit hashes their content, so editing, adding or removing one re-runs this source and what its output changes."""
    try:
        return [str(p) for p in make(source_cfg.name, source_cfg.kind, source_cfg.params).inputs()]
    except SourceError:  # an unknown kind: the scrape itself reports it in one line
        return []


def is_current(source_cfg: SourceConfig, now: dt.datetime | None = None) -> bool:
    """data/raw/<source>/ holds a finished scrape of this very block, not yet due for refresh.

    Only then is a re-run of the task (a code change) a re-parse: nothing is downloaded again.
    """
    status = RawStore(layout.raw_dir(source_cfg.name)).status
    if not status.get("done") or status.get("block") != block_hash(source_cfg):
        return False
    if source_cfg.refresh == "never":
        return True
    now = now or dt.datetime.now(dt.timezone.utc)
    age_days = (now - dt.datetime.fromisoformat(status["finished_at"])).total_seconds() / 86400
    return age_days < int(source_cfg.refresh[:-1])


def current(source_cfg: SourceConfig):
    """A doit `uptodate` check: False (scrape) when the raw pages are not a finished, fresh pass of this block.

    Mirror mode and offline runs (`doit offline=1`) never fetch, so they are never due: they
    rebuild from data/raw/ only when the block or the code changed.
    """
    def uptodate(task=None, values=None) -> bool:
        from stages.http import offline_requested

        return source_cfg.mode == "mirror" or offline_requested() or is_current(source_cfg)
    return uptodate


def build_from_raw(store: RawStore, source_cfg: SourceConfig, offline: bool) -> dict[str, Any]:
    """Mirror mode, or an offline run: list the raw pages already in data/raw/<source>/; fetch nothing."""
    name = source_cfg.name
    pages = store.pages()
    listed = store.folder / "manifest.json"
    if offline and not (pages and listed.exists()):
        raise SourceError(f"source '{name}' needs the network but this run is offline (offline=1 or MEDFORGE_OFFLINE=1) "
                          f"and data/raw/{name}/ holds no finished scrape; copy that folder from a connected machine "
                          f"and set mode = \"mirror\" in [sources.{name}] of sources.toml, or set enabled = false to skip it")
    if not pages:
        raise SourceError(f"source '{name}' is in mirror mode but {store.pages_dir} holds no raw pages; copy "
                          f"data/raw/{name}/ from a machine that scraped it (README.md, section \"Sources\"), "
                          f"or set mode = \"live\"")
    if offline and store.status.get("block") != block_hash(source_cfg):
        print(f"scrape:{name}: warning: offline, so building from the last finished scrape in {store.folder}, made "
              f"before [sources.{name}] changed; the next online run scrapes it again")
    if listed.exists():  # the (mirrored) manifest says which pages make the finished pass
        names = {p["name"] for p in io.read_json(listed).get("pages", [])}
        missing = names - {p.name for p in pages}
        if missing:
            raise SourceError(f"source '{name}': mirror is incomplete, {len(missing)} page(s) of "
                              f"{listed} are missing (e.g. {sorted(missing)[0]}); copy the whole folder again")
        return store.write_manifest(source_cfg, keep=[p for p in pages if p.name in names])
    return store.write_manifest(source_cfg)


def run(cfg: Config, source_name: str) -> dict[str, Any]:
    source_cfg = cfg.sources[source_name]
    source = make(source_cfg.name, source_cfg.kind, source_cfg.params)
    store = RawStore(layout.raw_dir(source_cfg.name))
    block = block_hash(source_cfg)
    if source.network:
        from stages.http import offline_requested

        offline = source_cfg.mode == "live" and offline_requested()
        if source_cfg.mode == "mirror" or offline:
            manifest = build_from_raw(store, source_cfg, offline)
            print(f"scrape:{source_name}: {'offline' if offline else 'mirror mode'}, "
                  f"{len(manifest['pages'])} raw page(s) in {store.folder}")
            return manifest
        if is_current(source_cfg):  # the code changed, not the block: re-parse what is there
            manifest = store.write_manifest(source_cfg, keep=store.pass_pages())
            print(f"scrape:{source_name}: the finished scrape of this block is not due for refresh; nothing downloaded, "
                  f"{len(manifest['pages'])} raw page(s) in {store.folder}")
            return manifest
        if store.begin(block):
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
        io.write_json(store.folder / STATUS, {"block": block, "done": True, "finished_at": now_utc()})
    print(f"scrape:{source_name}: {len(manifest['pages'])} raw page(s) in {store.folder}")
    return manifest
