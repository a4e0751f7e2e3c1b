"""SVG snapshots of every view at 80x24 and 160x48, from fixed data (no clocks, fixed memory reading).

The scene is tui_support's, shared with bench/screens.py (which refreshes docs/screens/).
Update after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update
"""
from __future__ import annotations

import pytest

from tui_support import SCENE_READY, scene_app, scene_project, scene_ready


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = scene_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("view", list(SCENE_READY))
def test_view_snapshot(view, size, project, snap_compare):
    app = scene_app(project, view)

    async def ready(pilot):
        await scene_ready(app, pilot, view)

    assert snap_compare(app, terminal_size=size, run_before=ready)
