"""Refresh the README's screenshots: docs/screens/<view>.svg at 80x24 and <view>-160x48.svg, one per view.

With --project DIR (the way docs/screens is made): the dashboard opened on a real project, as a user would
open it — doit's dep DB, the run lock, data/events.jsonl, the task logs, the metrics stream and the reports
that project's own run wrote; a run going there is shown going (the running task selected, its log, training
live). The chat view asks the project's base model a real question (and, side by side, the first adapter with
a trained LoRA). Nothing in DIR is written: the app only reads, and no bytecode is cached there.

Without --project: the fixed scene the SVG snapshot tests pin (tests/tui_support.py), for a quick look.

Usage: python bench/screens.py --project /path/to/project [--sizes 80x24,160x48] [--out docs/screens] [view ...]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # nothing cached into a project the screenshots only read
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # nor by the subprocesses (doit's status, the chat process)

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from stages import io, layout  # noqa: E402
from tui_support import SCENE_READY, scene_app, scene_project, scene_ready, table_text  # noqa: E402

VIEWS = list(SCENE_READY)  # pipeline, training, data, eval, chat, help
QUESTION = "What does ICD-10-CM code E11.9 mean?"
CHAT_TOKENS = 96


async def _until(pilot, condition, timeout: float) -> bool:
    """Wait for `condition` up to `timeout` s; False if it never held (a real project may lack that data)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except Exception:  # a widget not mounted yet
            pass
        await pilot.pause(0.2)
    return False


def _trained(root: Path, app) -> list[str]:
    names = sorted(app.cfg.adapters) if app.cfg is not None else []
    return [n for n in names if (root / layout.lora_weights(n)).exists()]  # what chat needs, GGUF or not


async def project_ready(app, pilot, root: Path, view: str) -> list[str]:
    """Wait until `view` shows what the project has; returns what it lacked (said on stdout)."""
    lacking = []
    await _until(pilot, lambda: app.cfg is not None and app.pipeline.static and app._poll_timer is not None, 120)
    if view == "help":
        await pilot.press("question_mark")
    elif view == "pipeline":
        screen = app.screen
        names = app.pipeline.names()
        pick = (app.pipeline.running_tasks() or [r.name for r in app.pipeline.rows() if r.state == "failed"]
                or names[:1])
        if pick:
            screen.query_one("#tasks").move_cursor(row=names.index(pick[0]), animate=False)
            await _until(pilot, lambda: screen._log_task == pick[0], 20)
            if pick[0].startswith("train:") and app.running:
                await _until(pilot, lambda: pick[0] in screen.progress, 10)
    elif view == "training":
        shows_curves = lambda: app.screen.curves.steps and app.screen.memory is not None  # noqa: E731
        if not await _until(pilot, shows_curves, 15):
            # the task training now has no steps yet: show an adapter that has them ("]"), if one does
            for _ in range(len(app.cfg.adapters) - 1 if app.cfg is not None else 0):
                await pilot.press("right_square_bracket")
                if await _until(pilot, shows_curves, 10):
                    lacking.append(f"the adapter training now has no steps yet: {app.screen.adapter} shown")
                    break
            else:
                lacking.append("no training metrics yet")
    elif view == "data":
        if not await _until(pilot, lambda: table_text(app, "#data-sources").strip(), 20):
            lacking.append("no data reports yet")
    elif view == "eval":
        if not await _until(pilot, lambda: table_text(app, "#eval-matrix").strip(), 20):
            lacking.append("no eval.json yet")
    elif view == "chat":
        from tui.screens import chat

        chat.MAX_TOKENS = CHAT_TOKENS
        trained = _trained(root, app)
        if trained:  # base and adapter side by side: ctrl+n to the adapter, ctrl+b
            while app.screen.model != trained[0]:
                await pilot.press("ctrl+n")
            await pilot.press("ctrl+b")
        else:
            lacking.append("no trained adapter yet: the base model alone")
        app.screen.query_one("#chat-input").value = QUESTION
        await pilot.press("enter")
        panes = [p for p in app.screen.query("ChatPane") if p.display]
        if not await _until(pilot, lambda: all("tokens" in p.status or p.status == "error" for p in panes), 300):
            lacking.append("the chat answer did not finish in 300 s")
        await pilot.press("escape")  # out of the input: the footer shows the view's keys
    for widget in app.screen.query("Input"):
        widget.cursor_blink = False
    await pilot.pause(1.0)
    return lacking


async def capture_project(root: Path, view: str, size: tuple[int, int]) -> tuple[str, list[str]]:
    from tui.app import MedforgeApp

    app = MedforgeApp(root, poll_s=1.0, start_view="pipeline" if view == "help" else view)
    async with app.run_test(size=size) as pilot:
        lacking = await project_ready(app, pilot, root, view)
        return app.export_screenshot(title=f"medforge · {view}"), lacking


async def capture_scene(root: Path, view: str, size: tuple[int, int]) -> tuple[str, list[str]]:
    app = scene_app(root, view)
    async with app.run_test(size=size) as pilot:
        await scene_ready(app, pilot, view)
        return app.export_screenshot(title=f"medforge · {view}"), []


def _size(text: str) -> tuple[int, int]:
    cols, rows = (int(n) for n in text.lower().split("x"))
    return cols, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("views", nargs="*", default=VIEWS, help=f"any of {', '.join(VIEWS)}")
    parser.add_argument("--project", type=Path, help="a project folder whose real files the views show")
    parser.add_argument("--sizes", default="80x24,160x48",
                        help="COLSxROWS,...: the first is <view>.svg, the others <view>-COLSxROWS.svg")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screens")
    args = parser.parse_args()
    unknown = set(args.views) - set(VIEWS)
    if unknown:
        parser.error(f"unknown view(s): {', '.join(sorted(unknown))}")
    sizes = [_size(s) for s in args.sizes.split(",")]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medforge-screens-") as tmp:
        if args.project is not None:
            root = args.project.resolve()
            if not (root / "dodo.py").is_file():
                parser.error(f"{root}: no dodo.py here; --project takes a medforge project folder")
            os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"]
                                                    if os.environ.get("PYTHONPATH") else "")
            capture = capture_project
        else:
            root = scene_project(Path(tmp) / "proj")
            capture = capture_scene
        os.chdir(root)  # stages resolve paths against the working directory
        for view in args.views:
            for i, (cols, rows) in enumerate(sizes):
                svg, lacking = asyncio.run(capture(root, view, (cols, rows)))
                path = out / (f"{view}.svg" if i == 0 else f"{view}-{cols}x{rows}.svg")
                io.write_text(path, svg)
                print(f"wrote {path} ({cols}x{rows})" + (f": {'; '.join(lacking)}" if lacking else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
