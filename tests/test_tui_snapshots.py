"""SVG snapshots of every view at 80x24 and 160x48, from fixed data (no clocks, fixed memory reading).

Update after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update
"""
from __future__ import annotations

import pytest

from tui.app import MedforgeApp
from tui.messages import MemoryReading

from test_tui_app import table_text, write_reports
from tui_support import make_project, project_env, wait_for

FIXED_MEMORY = MemoryReading(gpus=[("GPU0 NVIDIA H100 80GB HBM3", 21 << 30, 80 << 30)],
                             host_used=6 << 30, host_total=24 << 30)


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = make_project(tmp_path / "proj")
    project_env()
    write_reports(root)
    monkeypatch.chdir(root)
    return root


READY = {
    "pipeline": lambda app: len(app.pipeline.static) == 3 and app.screen.selected == "scrape:alpha"
    and app.screen._log_task == "scrape:alpha",
    "training": lambda app: len(app.screen.curves.steps) == 30 and app.screen.memory is not None,
    "data": lambda app: "alpha" in table_text(app, "#data-sources"),
    "eval": lambda app: "tiny" in table_text(app, "#eval-matrix"),
    "chat": lambda app: app.cfg is not None,
    "help": lambda app: True,
}


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("view", list(READY))
def test_view_snapshot(view, size, project, snap_compare):
    app = MedforgeApp(project, poll_s=3600, memory_probe=lambda: FIXED_MEMORY,
                      start_view="pipeline" if view == "help" else view)

    async def ready(pilot):
        await wait_for(pilot, lambda: app.cfg is not None and len(app.pipeline.static) == 3, what="config and doit")
        if view == "help":
            await pilot.press("question_mark")
        await wait_for(pilot, lambda: READY[view](app), what=f"the {view} view's data")
        for widget in app.screen.query("Input, TextArea"):
            widget.cursor_blink = False
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=ready)
