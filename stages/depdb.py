"""doit's dependency DB (data/.doit.sqlite) from before stage-code deps were relative paths.

doit keys a task's state by each file dep's path as dodo.py names it. The stages' code deps were once absolute
(`/old/root/stages/split.py`), so a project moved, renamed or mounted at another path looked changed everywhere and
rebuilt from scratch. They are relative now (registry.where); `relocate` rewrites a DB written before that, so its
first run after the update re-runs nothing that is up to date.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from stages import lock, registry


def code_files() -> set[str]:
    """Every .py under stages/, as registry names code deps now."""
    return {str(registry.where() / p.relative_to(registry.CODE)) for p in registry.CODE.rglob("*.py")}


def relocated(path: str, code: set[str]) -> str:
    """An absolute `<any root>/stages/<file>` as `stages/<file>` where that is one of the stages' `code` files (nothing
    under stages/ is itself named stages); any other path, a user's file too, as it is."""
    if path.startswith("/") and "/stages/" in path:
        named = str(registry.where() / path.rsplit("/stages/", 1)[1])
        return named if named in code else path
    return path


def relocate(db: Path) -> int:
    """Rewrite the DB's absolute stage-code keys (and each task's `deps:` list) as registry names them now; returns
    how many tasks changed. Nothing while a run holds the lock (it writes its own DB when it ends), nor where
    registry names stages/ absolutely (an installed package outside the project: nothing to rewrite to)."""
    if registry.where().is_absolute() or not db.exists() or lock.current() is not None:
        return 0
    changed = 0
    con = sqlite3.connect(db)
    try:
        with con:
            try:
                rows = con.execute("select task_id, task_data from doit").fetchall()
            except sqlite3.DatabaseError:  # not doit's (or damaged): doit itself says so, with the fix
                return 0
            code = code_files()
            for task, text in rows:
                data = json.loads(text)
                new = {relocated(key, code): value for key, value in data.items()}
                if "deps:" in new:
                    new["deps:"] = [relocated(path, code) for path in new["deps:"]]
                if new != data:
                    con.execute("update doit set task_data = ? where task_id = ?", (json.dumps(new), task))
                    changed += 1
    finally:
        con.close()
    return changed
