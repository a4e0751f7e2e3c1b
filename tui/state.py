"""The pipeline as the dashboard shows it: doit's static view overlaid with the live event stream.

Pure data (no Textual, no I/O): workers feed it doit's status JSON and event rows; widgets read rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from stages.progress import duration  # noqa: F401 (the views import it from here)
from stages.registry import NAMES

STAGE_ORDER = NAMES  # dodo.py's graph, upstream first

UP_TO_DATE, WILL_RUN, RUNNING, DONE, FAILED = "up to date", "will run", "running", "done", "failed"
# up to date now, but a task it reads from will run first: doit checks it again then, and runs it if its inputs changed
MAY_RUN = "may run"
# state -> (symbol, style) for the table; styles are applied to plain Text, never parsed as markup
LOOK = {
    UP_TO_DATE: ("✓", "green"),
    WILL_RUN: ("•", "yellow"),
    MAY_RUN: ("◦", "yellow"),
    RUNNING: ("▶", "bold cyan"),
    DONE: ("✔", "bold green"),
    FAILED: ("✗", "bold red"),
    "unknown": ("?", "dim"),
}


def split_name(task: str) -> tuple[str, str]:
    stage, _, item = task.partition(":")
    return stage, item


def stage_rank(task: str) -> tuple[int, str]:
    stage, item = split_name(task)
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage, item)


@dataclass
class TaskView:
    name: str
    stage: str
    item: str
    state: str
    reason: str
    deps: list[str]


class PipelineState:
    def __init__(self) -> None:
        self.static: dict[str, dict] = {}   # name -> {"status", "reason", "task_dep", ...} from doit
        self.live: dict[str, tuple[str, str]] = {}  # name -> (state, detail) from this run's events
        self.began: dict[str, float] = {}  # name -> when its task_start event came (the event's time)
        self.took: dict[str, float] = {}   # name -> seconds its last run took (of the runs seen)
        self._run_active = False
        self._pending: set[str] | None = None  # tasks whose outputs may still change (see pending())
        self.run_summary = ""
        self.static_error = ""

    @property
    def run_active(self) -> bool:
        return self._run_active

    @run_active.setter
    def run_active(self, value: bool) -> None:
        self._run_active, self._pending = value, None

    def apply_static(self, status: dict) -> None:
        """doit's DB after a run is the truth for what is up to date; of that run's events only
        the failures stay (the DB does not keep why a task failed)."""
        self.static = {t["name"]: t for t in status.get("tasks", [])}
        self.static_error = ""
        self._pending = None
        if not self.run_active:
            self.live = {name: live for name, live in self.live.items() if live[0] == FAILED}

    def apply_events(self, events: list[dict]) -> bool:
        """Fold event rows in; True when something visible changed."""
        self._pending = None
        changed = False
        for ev in events:
            kind, task = ev.get("event"), ev.get("task")
            if kind == "run_start":
                self.live, self.began = {}, {}
                self.run_summary = "running " + (" ".join(ev.get("selected") or []) or "all tasks")
            elif kind == "task_start":
                self.live[task] = (RUNNING, "")
                if ev.get("t"):
                    self.began[task] = float(ev["t"])
            elif kind == "task_done":
                self.live[task] = (DONE, "")
                if task in self.began and ev.get("t"):
                    self.took[task] = float(ev["t"]) - self.began[task]
            elif kind == "task_failed":
                self.live[task] = (FAILED, " ".join(ev.get("error") or []))
            elif kind == "task_uptodate":
                self.live[task] = (UP_TO_DATE, "")
            elif kind == "run_end":
                failures = ev.get("failures") or []
                self.run_summary = f"last run failed: {', '.join(failures)}" if failures else "last run finished"
                # a task still marked running when the run ended was interrupted
                for name, (state, _) in list(self.live.items()):
                    if state == RUNNING:
                        self.live[name] = (FAILED, "interrupted")
            else:
                continue
            changed = True
        return changed

    def run_died(self) -> None:
        """The run's process is gone without a run_end (killed hard): nothing is running any more."""
        self._pending = None
        for name, (state, _) in list(self.live.items()):
            if state == RUNNING:
                self.live[name] = (FAILED, "the run was killed")
        if self.run_summary.startswith("running"):
            self.run_summary = "last run was killed before it finished"

    def running_tasks(self) -> list[str]:
        return [name for name, (state, _) in self.live.items() if state == RUNNING]

    def _own(self, name: str) -> tuple[str, str]:
        """A task's state and reason from this run's events, else from doit's static view."""
        static = self.static.get(name, {})
        if name in self.live and not (self.live[name][0] == FAILED and static.get("status") == "up-to-date"):
            return self.live[name]
        if static:
            return (UP_TO_DATE if static.get("status") == "up-to-date" else WILL_RUN), static.get("reason", "")
        return "unknown", ""

    def pending(self) -> set[str]:
        """Tasks whose outputs may still change: those that will run or are running, those done in the run going
        now (what reads them is checked after them), and, through them, up-to-date tasks that read them."""
        if self._pending is None:
            pending: set[str] = set()
            grew = True
            while grew:  # names are in graph order, so one pass nearly always does
                grew = False
                for name in self.names():
                    if name in pending:
                        continue
                    state, _ = self._own(name)
                    deps = self.static.get(name, {}).get("task_dep", [])
                    if (state in (WILL_RUN, RUNNING) or (state == DONE and self._run_active)
                            or (state == UP_TO_DATE and name not in self.live and pending.intersection(deps))):
                        pending.add(name)
                        grew = True
            self._pending = pending
        return self._pending

    def task(self, name: str) -> TaskView:
        static = self.static.get(name, {})
        state, reason = self._own(name)
        deps = list(static.get("task_dep", []))
        if state == UP_TO_DATE and name not in self.live:
            first = [d for d in self.names() if d in self.pending() and d in deps]
            if first:
                more = f" (+{len(first) - 1} more)" if len(first) > 1 else ""
                state, reason = MAY_RUN, f"checked again after {first[0]}{more}"
        stage, item = split_name(name)
        return TaskView(name=name, stage=stage, item=item, state=state, reason=reason, deps=deps)

    def upstream(self, name: str) -> list[str]:
        """What `doit run <name>` runs before it: its dependencies that are not up to date, in graph order."""
        seen: set[str] = set()
        todo = list(self.task(name).deps)
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(self.task(dep).deps)
        return [n for n in self.names() if n in seen and self.task(n).state != UP_TO_DATE]

    def downstream(self, name: str) -> list[str]:
        """Every task that depends on `name`, directly or not, in graph order."""
        found: set[str] = set()
        grew = True
        while grew:
            grew = False
            for other in self.names():
                if other not in found and (name in self.task(other).deps or found & set(self.task(other).deps)):
                    found.add(other)
                    grew = True
        return [n for n in self.names() if n in found]

    def names(self) -> list[str]:
        # once doit's view is known it names the tasks; live-only names are tasks of a stale graph
        names = set(self.static) if self.static else set(self.live)
        return sorted(names, key=stage_rank)

    def rows(self) -> list[TaskView]:
        return [self.task(n) for n in self.names()]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows():
            out[row.state] = out.get(row.state, 0) + 1
        return out


class TrainingCurves:
    """One adapter's metrics stream (stages/train/metrics.py) folded into what the training view shows."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start: dict = {}
        self.last: dict = {}
        self.end: dict = {}
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.lr: list[float] = []
        self.val_steps: list[int] = []
        self.val_loss: list[float] = []

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            kind = row.get("kind")
            if kind == "start":
                self.reset()
                self.start = row
            elif kind == "train" and isinstance(row.get("step"), int):
                self.last = row
                self.steps.append(row["step"])
                self.loss.append(float(row.get("loss") or 0.0))
                self.lr.append(float(row.get("lr") or 0.0))
            elif kind == "val" and row.get("val_loss") is not None:
                self.val_steps.append(int(row.get("step", 0)))
                self.val_loss.append(float(row["val_loss"]))
            elif kind == "end":
                self.end = row

    @property
    def total_steps(self) -> int | None:
        return self.last.get("total_steps") or self.start.get("total_steps")

    def best_val(self) -> tuple[float, int] | None:
        if not self.val_loss:
            return None
        i = min(range(len(self.val_loss)), key=self.val_loss.__getitem__)
        return self.val_loss[i], self.val_steps[i]
