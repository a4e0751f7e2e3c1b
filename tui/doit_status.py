"""`python -m tui.doit_status`: doit's static view of every task, as one JSON object on stdout.

For each task: will it run (and doit's reasons, in one short line) or is it up to date, plus
its task deps. Run by the dashboard in a subprocess from the project folder, so dodo.py and
doit's loader never load into the app; read-only (doit's dep DB is never written; dodo.py's load may rename an
older DB's code paths once, stages.depdb, which changes no task's state).
"""
from __future__ import annotations

import sys
from pathlib import Path

import orjson
from doit.cmd_base import DodoTaskLoader, DoitCmdBase
from doit.doit_cmd import DoitMain

from stages import layout


def _short(path: str) -> str:
    named = layout.as_named(path)
    return "/".join(named.parts[-2:]) if named.is_absolute() else str(named)  # outside the project: stages/x.py


def _some(paths, verb: str) -> str:
    paths = sorted(_short(p) for p in paths)
    more = f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""
    return f"{verb} {paths[0]}{more}"


def reason_line(reasons: dict) -> str:
    """doit's reasons, most telling first: what is missing upstream, config, changed inputs, missing outputs."""
    parts = []
    if reasons.get("missing_file_dep"):
        parts.append(_some(reasons["missing_file_dep"], "waits for"))
    if reasons.get("uptodate_false"):
        # a check that says why (the scrape's freshness: stages.scrape.Current) says it in words; that explains a
        # config_changed beside it (the same block); else config_changed is an object its class names, a plain
        # function names itself
        checks = [utd for utd, _, _ in reasons["uptodate_false"]]
        said = [utd.why for utd in checks if getattr(utd, "why", "")]
        names = sorted({getattr(utd, "__name__", None) or type(utd).__name__ for utd in checks
                        if not getattr(utd, "why", "")})
        if said:
            parts += said
        else:
            parts.append("config changed" if names == ["config_changed"] else "not up to date: " + ", ".join(names))
    if reasons.get("changed_file_dep"):
        parts.append(_some(reasons["changed_file_dep"], "changed"))
    if reasons.get("added_file_dep"):
        parts.append(_some(reasons["added_file_dep"], "new input"))
    if reasons.get("removed_file_dep"):
        parts.append(_some(reasons["removed_file_dep"], "input removed:"))
    if reasons.get("checker_changed"):
        parts.append("file checker changed")
    if reasons.get("missing_target"):
        parts.append(_some(reasons["missing_target"], "no"))
    if reasons.get("has_no_dependencies"):
        parts.append("no dependencies: always runs")
    return "; ".join(parts) or "will run"


class MedforgeStatus(DoitCmdBase):
    name = "medforge-status"
    doc_purpose = "print every task's status and reasons as JSON (for the dashboard)"
    doc_usage = ""
    doc_description = None
    cmd_options = ()

    def _execute(self, pos_args=None):
        tasks = {t.name: t for t in self.task_list}
        producer = {target: t.name for t in self.task_list for target in t.targets}
        saved = getattr(self.dep_manager, "_get", None)  # the backend lookup doit's own status check uses
        out = []
        for task in self.task_list:
            if task.has_subtask or not task.actions:  # group tasks (`train` = every train:<x>)
                continue
            status = self.dep_manager.get_status(task, tasks, get_log=True)
            row = {"name": task.name, "status": status.status,
                   "task_dep": sorted({producer[f] for f in task.file_dep if f in producer}
                                      | {d for d in task.task_dep if d in tasks and not tasks[d].has_subtask}),
                   "targets": list(task.targets)}
            never_run = saved is not None and saved(task.name, "checker:") is None
            if status.status == "error":
                # a missing input: fine when an upstream task makes it (it runs first), an error otherwise
                missing = [f for f in task.file_dep if not Path(f).exists()]
                if missing and all(f in producer for f in missing):
                    row["status"] = "run"
                    makers = sorted({producer[f] for f in missing})
                    row["reason"] = ("never run; " if never_run else "") + "waits for " + ", ".join(makers)
                else:
                    row["reason"] = f"cannot run: {getattr(status, 'error_reason', '') or 'missing input'}; " \
                                    "no task makes it"
            elif status.status == "run":
                row["reason"] = "never run" if never_run else reason_line(status.reasons)
            out.append(row)
        inputs = sorted({f for t in self.task_list for f in t.file_dep})  # the dashboard watches these for edits
        sys.stdout.buffer.write(orjson.dumps({"tasks": out, "inputs": inputs}) + b"\n")
        return 0


class _Main(DoitMain):
    DOIT_CMDS = DoitMain.DOIT_CMDS + (MedforgeStatus,)


if __name__ == "__main__":
    sys.exit(_Main(DodoTaskLoader()).run(["medforge-status"]))
