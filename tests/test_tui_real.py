"""The dashboard driving the REAL pipeline: the real dodo.py and stages on a tiny random Llama.

One project is shared by the module (building it is most of the time): the tmux test runs
everything from a real terminal; the reattach test then retrains one adapter for long enough
to quit the app in the middle, and finds the run again.
CI must install tmux (apt-get install -y tmux); without it the tmux test fails rather than hide.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid

import orjson
import pytest

from stages import layout
from tests.models import make_tiny_model
from tests.pipeline_project import Project
from tui import runner
from tui.app import MedforgeApp
from tui.messages import MemoryReading

from tui_support import confirm, wait_for, wait_sync

pytestmark = pytest.mark.slow

BUILD_S = 1500  # the whole graph on 2 busy cores: scrape, normalize, dedup, split, train, eval, export
FIXED_MEMORY = MemoryReading(gpus=[], host_used=6 << 30, host_total=24 << 30)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    proj = Project(tmp_path_factory.mktemp("real-project"), base_model=str(model))
    yield proj
    if runner.current_run(proj.root) is not None:
        runner.stop(proj.root, grace_s=5)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def task_states(screen: str) -> dict[str, str]:
    """The pipeline table as shown: {"train:clinical_coding": "done", ...}; the stage is named on a group's first row."""
    states, stage = {}, None
    for line in screen.splitlines():
        m = re.match(r"^ ?(\S+)?\s+(\S+)\s+[✓•▶✔✗?]\s+(will run|running|done|failed|up to date)\b", line)
        if m:
            stage = m.group(1) or stage
            name = stage if m.group(2) == stage else f"{stage}:{m.group(2)}"
            states[name] = m.group(3)
    return states


def on_screen(screen, condition, timeout: float, what: str) -> None:
    """wait_sync on what the terminal shows; a timeout shows the screen it ended on."""
    try:
        wait_sync(lambda: condition(screen()), timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the screen:\n{screen()}") from None


def test_dashboard_in_tmux_runs_the_real_pipeline(project):
    assert shutil.which("tmux"), "tmux is not installed: apt-get install -y tmux"
    session = f"medforge-real-{uuid.uuid4().hex[:8]}"
    # the project's copy of stages/ first, as Project.doit runs it; the size is the window's, not LINES/COLUMNS
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "48", "-c", str(project.root),
         f"env -u LINES -u COLUMNS PYTHONPATH={project.root} {sys.executable} -m stages.cli")
    try:
        screen = lambda: tmux("capture-pane", "-p", "-t", session)
        wanted = {"dedup", "train:clinical_coding", "train:clinical_decision", "export:clinical_coding",
                  "export:clinical_decision"}
        on_screen(screen, lambda text: wanted <= set(task_states(text)), 180, "the pipeline view with doit's plan")
        text = screen()
        before = task_states(text)
        assert set(before.values()) == {"will run"}, text
        assert f"• {len(before)} will run" in text, text  # every task is on screen

        tmux("send-keys", "-t", session, "a")
        wait_sync(lambda: "Run all tasks?" in screen(), 10, "the question")
        tmux("send-keys", "-t", session, "Tab", "Enter")
        seen: dict[str, set[str]] = {}

        def finished() -> bool:
            states = task_states(screen())
            for name, state in states.items():
                seen.setdefault(name, set()).add(state)
            assert "failed" not in states.values(), screen()
            return len(states) == len(before) and set(states.values()) == {"done"}

        on_screen(screen, lambda text: finished(), BUILD_S, "every task done on screen")
        # states changed on screen as the run went: tasks were seen running, not only before and after
        assert any("running" in states for states in seen.values()), seen
        assert "last run finished" in screen()
        for adapter in ("clinical_coding", "clinical_decision"):
            assert (project.root / layout.lora_weights(adapter)).stat().st_size > 0
            assert (project.root / layout.lora_gguf(adapter)).stat().st_size > 0

        # open the training task's log: move down the table until its log is the one shown
        for _ in range(len(before)):
            if "log · train:clinical_coding" in screen():
                break
            tmux("send-keys", "-t", session, "Down")
            time.sleep(0.3)
        on_screen(screen, lambda text: "[train:clinical_coding] done" in text, 30, "the training log's last line")

        tmux("send-keys", "-t", session, "q")
        gone = lambda: subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0
        wait_sync(gone, 15, "the app to quit (its tmux window closes)")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.anyio
async def test_quitting_leaves_real_training_going_and_reopening_finds_it(project, monkeypatch):
    # long enough to outlive the app's quit and the reopening: the test stops it once it is seen again
    project.edit("adapters/clinical_coding/adapter.toml", "max_steps = 2", "max_steps = 20000")
    monkeypatch.setenv("PYTHONPATH", str(project.root))  # doit and its stages use the project's copy
    monkeypatch.chdir(project.root)
    metrics = project.root / layout.metrics_file("clinical_coding")

    app = MedforgeApp(project.root, poll_s=0.3, memory_probe=lambda: FIXED_MEMORY)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: "train:clinical_coding" in app.pipeline.static, 120, "doit's plan")
        assert app.pipeline.static["train:clinical_coding"]["status"] == "run"
        # select the task and run it (with whatever it depends on)
        table = app.screen.query_one("#tasks")
        names = [r.name for r in app.pipeline.rows()]
        # the plan is in the app; its repaint of the table follows in a message: move on the rows it will show
        await wait_for(pilot, lambda: [key.value for key in table.rows] == names, what="the table to show the plan")
        table.move_cursor(row=names.index("train:clinical_coding"), animate=False)
        await wait_for(pilot, lambda: app.screen.selected == "train:clinical_coding", what="selection")
        await confirm(pilot, "r")
        await wait_for(pilot, lambda: app.pipeline.task("train:clinical_coding").state == "running", BUILD_S,
                       "training to start")
        await pilot.press("q")
    record = runner.current_run(project.root)
    assert record is not None, "quitting the dashboard stopped the run"

    def rows() -> list[dict]:  # this run's metrics (the stream starts over with a "start" row)
        found = [orjson.loads(line) for line in metrics.read_bytes().splitlines()] if metrics.exists() else []
        return found if found and found[0].get("total_steps") == 20000 else []

    def steps() -> int:
        return sum(1 for row in rows() if row.get("kind") == "train")

    wait_sync(lambda: steps() > 0, 300, "the new training run's first steps")
    before = steps()
    wait_sync(lambda: steps() > before, 120, "training to go on with the app closed")
    assert runner.current_run(project.root).pid == record.pid

    app = MedforgeApp(project.root, poll_s=0.3, memory_probe=lambda: FIXED_MEMORY)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.running and app.pipeline.task("train:clinical_coding").state == "running",
                       30, "the reopened app to reattach to the run")
        assert record.describe() in app.run_summary()
        await pilot.press("2")
        await wait_for(pilot, lambda: app.screen.adapter == "clinical_coding" and app.screen.curves.steps, 30,
                       "the live training curves")
        seen = app.screen.curves.steps[-1]
        await wait_for(pilot, lambda: app.screen.curves.steps[-1] > seen, 60, "the curves to keep moving")
        assert app.screen.curves.total_steps == 20000
        await pilot.press("1")
        await confirm(pilot, "x", "Stop doit run train:clinical_coding", "running now: train:clinical_coding")
        # done watching: stopped rather than waited for
        await wait_for(pilot, lambda: not app.running, 60, "the stop")
