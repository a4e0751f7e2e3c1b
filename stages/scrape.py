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
from typing import Any

from stages import io, layout
from stages.config import Config, SourceConfig
from stages.errors import SourceError
from stages.http import offline_requested
from stages.raw import CHECKPOINT, STATUS, RawStore, now_utc  # noqa: F401 (RawStore, STATUS: also read from here)
from stages.sources import make


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


def staleness(source_cfg: SourceConfig, now: dt.datetime | None = None) -> str:
    """Why data/raw/<source>/ is not a finished scrape of this very block that is not yet due for refresh, in a few
    words for `doit`'s reason line; "" when it is (then a re-run of the task, a code change, is a re-parse: nothing
    is downloaded again)."""
    status = RawStore(layout.raw_dir(source_cfg.name)).status
    if not status.get("done"):
        return "the last scrape did not finish" if status.get("started_at") else "never scraped"
    if status.get("block") != block_hash(source_cfg):
        return f"[sources.{source_cfg.name}] changed since the last scrape"
    if source_cfg.refresh == "never":
        return ""
    now = now or dt.datetime.now(dt.timezone.utc)
    age_days = (now - dt.datetime.fromisoformat(status["finished_at"])).total_seconds() / 86400
    due = int(source_cfg.refresh[:-1])
    return f"refresh due: scraped {age_days:.0f} days ago (refresh = \"{source_cfg.refresh}\")" if age_days >= due else ""


def is_current(source_cfg: SourceConfig, now: dt.datetime | None = None) -> bool:
    return not staleness(source_cfg, now)


class Current:
    """A doit `uptodate` check: False (scrape) when the raw pages are not a finished, fresh pass of this block;
    `why` then says which (the dashboard's reason line).

    Mirror mode and offline runs (`doit offline=1`) never fetch, so they are never due: they
    rebuild from data/raw/ only when the block or the code changed.
    """

    def __init__(self, source_cfg: SourceConfig):
        self.source_cfg, self.why = source_cfg, ""

    def __call__(self, task=None, values=None) -> bool:
        fetches = self.source_cfg.mode != "mirror" and not offline_requested()
        self.why = staleness(self.source_cfg) if fetches else ""
        return not self.why


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
