"""Pipeline view: every task grouped by stage, its state and doit's reason, and the selected task's log."""
from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.worker import get_current_worker
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from stages import layout
from tui.messages import LogLines, PipelineChanged, RunStateChanged, TaskProgress
from tui.state import LOOK, duration
from tui.tail import Follower, tail_lines
from tui.widgets.task_log import TaskLog
from tui.widgets.topbar import TopBar

LOG_LINES = 1000  # lines kept on screen; the file itself is only tailed


class TaskTable(DataTable):
    """The task table: Home and End go to the first and last task (a row table's own Home scrolls sideways)."""
    BINDINGS = [Binding("home", "first_task", "First task", show=False),
                Binding("end", "last_task", "Last task", show=False)]

    def action_first_task(self) -> None:
        self.move_cursor(row=0)

    def action_last_task(self) -> None:
        self.move_cursor(row=self.row_count - 1)


class PipelineScreen(Screen):
    BINDINGS = [
        Binding("a", "run_all", "Run all"),
        Binding("r", "run_selected", "Run task"),
        Binding("f", "forget_selected", "Forget"),
        Binding("x", "stop_run", "Stop"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.selected: str | None = None
        self.progress: dict[str, tuple[str, int, int, float | None, str]] = {}  # running task -> TaskProgress
        self._running_tasks: list[str] = []
        self._log_task: str | None = None
        self._log_follower: Follower | None = None
        self._log_timer = None

    def compose(self) -> ComposeResult:
        yield TopBar("pipeline")
        yield Static(id="pipeline-summary")
        yield TaskTable(id="tasks", cursor_type="row", zebra_stripes=False)
        yield Static(id="log-title")
        yield TaskLog(id="log", max_lines=LOG_LINES)
        yield Footer()

    def on_mount(self) -> None:
        self._widths: tuple[int, ...] = ()
        self.render_tasks()
        self.set_interval(1.0, self._tick)  # a running task's elapsed time
        self.query_one("#tasks").focus()
        self.schedule_log(0)

    def on_screen_resume(self) -> None:
        self.render_tasks()
        self.query_one(TopBar).show_run(self.app.running, self.app.run_summary())

    @on(PipelineChanged)
    def _pipeline_changed(self) -> None:
        self.render_tasks()

    def on_resize(self) -> None:
        self.render_tasks()

    def _tick(self) -> None:
        if self.app.pipeline.running_tasks():
            self.render_tasks()

    def _fit_columns(self, table: DataTable, rows) -> None:
        """Column widths from the terminal's width and the names shown: the why column (doit's reason, a
        failure's one line) gets what the others leave. Rebuilt only when they change."""
        widths = column_widths(self.size.width, rows)
        if widths != self._widths:
            self._widths = widths
            table.clear(columns=True)
            for key, width in zip(COLUMNS, widths):
                table.add_column(key, key=key, width=width)

    @on(RunStateChanged)
    def _run_state(self, msg: RunStateChanged) -> None:
        self.query_one(TopBar).show_run(msg.running, msg.summary)

    def render_tasks(self) -> None:
        state = self.app.pipeline
        table = self.query_one("#tasks", DataTable)
        rows = state.rows()
        counts = state.counts()
        summary = Text()
        if state.static_error:
            summary.append(f"doit: {state.static_error}", style="bold red")
        elif self.app.config_error:
            summary.append(f"config: {self.app.config_error}", style="bold red")
        elif not rows:
            summary.append("reading the task graph from doit…", style="dim")
        else:
            for name in ("running", "failed", "will run", "may run", "done", "up to date"):
                if counts.get(name):
                    symbol, style = LOOK[name]
                    summary.append(f"{symbol} {counts[name]} {name}   ", style=style)
        box = self.query_one("#pipeline-summary", Static)
        box.set_class(bool(state.static_error or self.app.config_error), "error")
        box.update(summary)

        self._fit_columns(table, rows)
        self._running_tasks = [row.name for row in rows if row.state == "running"]
        cells = {}
        last_stage = None
        now = time.time()
        for row in rows:
            symbol, style = LOOK.get(row.state, LOOK["unknown"])
            why = row.reason
            if row.state == "running":
                what, done, total, eta, scope = self.progress.get(row.name) or ("", 0, 0, None, "")
                # how far and how long to go first: at 80 columns this cell is ~30 characters
                parts = [f"{what} {done}/{total}" if what else "", f"eta {duration(eta)}" if eta is not None else "",
                         f"for {duration(now - state.began[row.name])}" if row.name in state.began else "",
                         scope, why]
                why = " · ".join(p for p in parts if p)
            cells[row.name] = {
                "stage": Text(row.stage if row.stage != last_stage else "", style="bold", overflow="ellipsis"),
                "task": Text(row.item or row.stage, overflow="ellipsis"),
                "state": Text(f"{symbol} {row.state}", style=style),
                "why": Text(why, style="dim" if row.state == "up to date" else ("red" if row.state == "failed" else ""),
                            overflow="ellipsis"),
            }
            last_stage = row.stage
        names = list(cells)
        if names == [key.value for key in table.rows]:
            # same tasks: update in place, so the cursor (which may have just moved) stays where the user put it
            for name, values in cells.items():
                for column, value in values.items():
                    table.update_cell(name, column, value)
            return
        keep = self._row_under_cursor(table) or self.selected
        table.clear()
        for name, values in cells.items():
            table.add_row(*values.values(), key=name)
        if keep in names:
            table.move_cursor(row=names.index(keep), animate=False)
        elif names:
            self.selected = names[0]
            self.schedule_log(0)

    @staticmethod
    def _row_under_cursor(table: DataTable) -> str | None:
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @on(DataTable.RowHighlighted, "#tasks")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value != self.selected:
            self.selected = event.row_key.value
            self.schedule_log(0)

    # --- the selected task's log: tailed, then followed; one poll at a time
    def schedule_log(self, delay: float) -> None:
        if self._log_timer is not None:
            self._log_timer.stop()
        self._log_timer = self.set_timer(max(delay, 0.01), self.poll_log)  # textual timers need a delay > 0

    @work(thread=True, exclusive=True, group="log", exit_on_error=False)
    def poll_log(self) -> None:
        try:
            self._read_log()
            self._read_progress()
            self.app.poll_ok("task log")
        except Exception as exc:  # said once; the next round tries again (a failed first look starts over)
            self.app.poll_failed("task log", exc)
        finally:
            if not get_current_worker().is_cancelled:
                self.app.call_from_thread(self.schedule_log, 0.5)

    def _read_progress(self) -> None:
        """A running training's step/total and ETA, from the last row of its metrics stream; another running
        task's current part (what, done/total, what it is part of), from its progress file."""
        import orjson

        progress = {}
        for name in self._running_tasks:  # set on the UI thread: the pipeline state is not read from here
            stage, _, adapter = name.partition(":")
            if stage != "train":
                try:
                    part = orjson.loads((self.app.root / layout.progress_file(name)).read_bytes())
                except (OSError, orjson.JSONDecodeError):  # none (yet), or gone as the task ends
                    continue
                if part.get("what"):
                    progress[name] = (str(part["what"]), int(part["done"]), int(part["total"]), None,
                                      str(part.get("scope", "")))
                continue
            lines, _ = tail_lines(self.app.root / layout.metrics_file(adapter), 20)
            for line in reversed(lines):
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if row.get("kind") == "train" and row.get("step") and row.get("total_steps"):
                    progress[name] = ("step", int(row["step"]), int(row["total_steps"]), row.get("eta_s"), "")
                    break
        if progress != self.progress:
            self.post_message(TaskProgress(progress))

    @on(TaskProgress)
    def _progress(self, msg: TaskProgress) -> None:
        self.progress = msg.progress
        self.render_tasks()

    def _read_log(self) -> None:
        task = self.selected
        if task is None:
            return
        root: Path = self.app.root
        path = root / layout.log_file(task)
        if task != self._log_task:
            lines, offset = tail_lines(path, LOG_LINES)
            self._log_task, self._log_follower = task, Follower(path, offset)
            self.post_message(LogLines(task, lines, reset=True))
        else:
            new = [b.decode("utf-8", "replace") for b in self._log_follower.read_new()]
            if new:
                self.post_message(LogLines(task, new, reset=False))

    @on(LogLines)
    def _log_lines(self, msg: LogLines) -> None:
        if msg.task != self.selected:
            return
        log = self.query_one("#log", TaskLog)
        title = self.query_one("#log-title", Static)
        path = layout.log_file(msg.task)
        if msg.reset:
            log.clear()
            title.update(Text(f"log · {msg.task} · {path}" if msg.lines else f"log · {msg.task} · no log yet ({path})",
                              style="bold"))
        log.write_lines(msg.lines)  # plain text, wrapped at the width: nothing in a log line is read as markup

    # --- actions: each asks first, naming what will run or be lost; none starts while a run is going
    def _busy(self, what: str) -> bool:
        if self.app.running:
            run = self.app.doit_run
            self.app.notify(f"a run is in progress: {run.describe() if run else 'doit'}; {what}", markup=False,
                            severity="warning")
            return True
        return False

    def _confirm(self, question: str, details: list[str], action: str, then) -> None:
        from tui.screens.confirm import ConfirmScreen

        self.app.push_screen(ConfirmScreen(question, details, action), lambda yes: then() if yes else None)

    def action_run_all(self) -> None:
        if self._busy("nothing started"):
            return
        state = self.app.pipeline
        rows = state.rows()
        todo = [row.name for row in rows if row.state not in ("up to date", "may run")]
        maybe = [row.name for row in rows if row.state == "may run"]
        details = [f"doit will run {len(todo)} task(s): {_some(todo)}" if todo
                   else "every task is up to date: doit will check them and run nothing",
                   *([f"and {len(maybe)} more if what they read changes: {_some(maybe)}"] if maybe else []),
                   "It runs detached: quitting the dashboard does not stop it."]
        self._confirm("Run all tasks?", details, "Run all", lambda: self.app.start_run([]))

    def action_run_selected(self) -> None:
        task = self.selected
        if not task or self._busy("nothing started"):
            return
        state = self.app.pipeline
        first = state.upstream(task)
        details = [f"first what it needs: {_some(first)}" if first else "its inputs are up to date",
                   "It runs detached: quitting the dashboard does not stop it."]
        self._confirm(f"Run {task}?", details, f"Run {task}", lambda: self.app.start_run([task]))

    def action_forget_selected(self) -> None:
        task = self.selected
        if not task or self._busy("forget it once the run has finished"):
            return
        state = self.app.pipeline
        took = state.took.get(task)
        after = state.downstream(task)
        details = ["doit throws away its record: the next run runs it again"
                   + (f" (it took {duration(took)} last time)" if took else ""),
                   f"and then what depends on it: {_some(after)}" if after else "nothing depends on it"]
        self._confirm(f"Forget {task}?", details, f"Forget {task}", lambda: self.app.forget_tasks([task]))

    def action_stop_run(self) -> None:
        if not self.app.running:
            self.app.notify("nothing is running", markup=False)
            return
        state = self.app.pipeline
        run = self.app.doit_run
        now = time.time()
        going = [f"{name} (running for {duration(now - state.began[name])})" if name in state.began else name
                 for name in state.running_tasks()]
        details = [f"running now: {', '.join(going)}; its work so far is lost" if going else "",
                   "tasks already done are kept"]
        self._confirm(f"Stop {run.describe()}?", [d for d in details if d], "Stop the run", self.app.stop_run)


COLUMNS = ("stage", "task", "state", "why")


def column_widths(width: int, rows) -> tuple[int, ...]:
    """stage, task, state and why for a table `width` cells wide (each column pads 1 a side; 2 for a
    scrollbar): names as long as the longest, the task's at most a quarter, why the rest."""
    room = max(width - 2 * len(COLUMNS) - 2, 40)
    stage = min(max((len(r.stage) for r in rows), default=5), 13)
    state = max((len(r.state) + 2 for r in rows), default=10)
    task = min(max((len(r.item or r.stage) for r in rows), default=4), max(room // 4, 10))
    return stage, task, state, max(room - stage - task - state, 10)


def _some(names: list[str], shown: int = 6) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
