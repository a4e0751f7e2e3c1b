"""Typing never starts a run or forgets a task: keys typed into an input stay there, and in a view with no input
focused every action that runs or loses work (run all, run task, forget, stop) only asks, and a sentence can
only cancel the question."""
from __future__ import annotations

import subprocess
import sys

import pytest

from stages import layout, lock
from tui import runner
from tui.app import MedforgeApp
from tui.messages import MemoryReading
from tui.screens.confirm import ConfirmScreen

from tui_support import make_project, project_env, wait_for

pytestmark = pytest.mark.anyio

# every key bound to a printable character, in a sentence: views 1-5, ? help, a r f x on the pipeline,
# [ ] on training; q (quit) last, since in a view it does quit
SENTENCE = "a fox ran [1 2 3 4 5] fast? exit, q"
KEYS = {" ": "space", "?": "question_mark", "[": "left_square_bracket", "]": "right_square_bracket", ",": "comma"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def built(tmp_path, monkeypatch):
    """The tiny project, built once from a shell: everything up to date, so a forget or a run would show."""
    root = make_project(tmp_path / "proj")
    project_env()
    monkeypatch.chdir(root)
    subprocess.run([sys.executable, "-m", "doit"], cwd=root, check=True, capture_output=True,
                   env={**__import__("os").environ, "TINY_TRAIN_S": "0.2"})
    yield root
    if runner.current_run(root) is not None:
        runner.stop(root, grace_s=2)


def untouched(root, events_before: int, db_before: bytes) -> None:
    assert lock.current(root) is None, "a run was started"
    assert (root / layout.events_file()).stat().st_size == events_before, "doit ran"
    assert (root / layout.doit_db()).read_bytes() == db_before, "the dep DB changed (a forget)"
    assert all(t["status"] == "up-to-date" for t in runner.static_status(root)["tasks"])


async def type_text(pilot, text: str) -> None:
    for char in text:
        if not pilot.app.is_running:
            return
        await pilot.press(KEYS.get(char, char))


async def test_a_sentence_typed_anywhere_starts_nothing_and_forgets_nothing(built):
    root = built
    events_before = (root / layout.events_file()).stat().st_size
    db_before = (root / layout.doit_db()).read_bytes()
    asked = []
    app = MedforgeApp(root, poll_s=0.2, memory_probe=lambda: MemoryReading([], 1, 2))
    async with app.run_test(size=(80, 24), message_hook=lambda m: asked.append(m)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
        # into the chat input: every key is text there, none is a command
        await pilot.press("5")
        await wait_for(pilot, lambda: app.screen.query("#chat-input") and app.focused is not None
                       and app.focused.id == "chat-input", what="the chat input focused")
        await type_text(pilot, SENTENCE)
        assert app.focused.id == "chat-input" and app.focused.value == SENTENCE
        assert app.current_mode == "chat" and not isinstance(app.screen, ConfirmScreen)
        await pilot.pause(0.5)
        untouched(root, events_before, db_before)

        # the pipeline view, the task table focused (no input): a, r, f open questions; the sentence's next
        # key (a space, a letter) cancels or is ignored; 1-5 switch views; q at the end quits
        await pilot.press("escape", "1")
        await wait_for(pilot, lambda: app.current_mode == "pipeline" and app.focused is not None
                       and app.focused.id == "tasks", what="the pipeline view, table focused")
        await type_text(pilot, SENTENCE)
    assert not app.is_running  # q quit, as it says
    untouched(root, events_before, db_before)
    questions = [s for s in app._installed_screens.values() if isinstance(s, ConfirmScreen)]
    assert not questions


async def test_run_and_forget_ask_first_and_name_what_they_touch(built):
    root = built
    app = MedforgeApp(root, poll_s=0.2, memory_probe=lambda: MemoryReading([], 1, 2))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="run all asks")
        assert "every task is up to date" in dialog(app)
        await pilot.press("escape")
        await pilot.press("down")  # dedup
        await pilot.press("f")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="forget asks")
        assert "Forget dedup?" in dialog(app) and "what depends on it: train:tiny" in dialog(app)
        await pilot.press("enter")  # Cancel has the focus
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="run task asks")
        assert "Run dedup?" in dialog(app) and "its inputs are up to date" in dialog(app)
        await pilot.press("space", "y", "r")  # neither a space nor a letter answers
        await pilot.pause(0.3)
        assert isinstance(app.screen, ConfirmScreen) and "Run dedup?" in dialog(app)
        await pilot.press("escape")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmScreen)
    assert lock.last(root).command == "doit"  # still the shell's build: the dashboard ran nothing


def dialog(app) -> str:
    return "\n".join(str(w.content) for w in app.screen.query("#confirm Static"))


async def test_home_and_end_go_to_the_first_and_last_task(built):
    app = MedforgeApp(built, poll_s=0.2, memory_probe=lambda: MemoryReading([], 1, 2))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
        await pilot.press("end")
        await wait_for(pilot, lambda: app.screen.selected == "train:tiny", 5, "the last task")
        await pilot.press("home")
        await wait_for(pilot, lambda: app.screen.selected == "scrape:alpha", 5, "the first task")
