"""A failed task says why where the user looks: its one-line reason in the table at 80x24 (the why column gets the
width the names leave), the same line at the end of its log, and the header; also in a dashboard opened after."""
from __future__ import annotations

import pytest

from stages import layout
from tui import runner
from tui.app import MedforgeApp
from tui.messages import MemoryReading

from tui_support import confirm, make_project, project_env, screen_text, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = make_project(tmp_path / "proj")
    project_env()
    monkeypatch.setenv("TINY_FAIL", "dedup")  # step.py: dedup ends its log with "[dedup] failed: told to fail", exit 2
    monkeypatch.chdir(root)
    yield root
    if runner.current_run(root) is not None:
        runner.stop(root, grace_s=2)


def make_app(root):
    return MedforgeApp(root, poll_s=0.2, memory_probe=lambda: MemoryReading([], 1, 2))


async def test_a_failed_task_shows_its_reason_in_the_table_the_log_and_the_header(project):
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
        await confirm(pilot, "a")
        await wait_for(pilot, lambda: app.pipeline.task("dedup").state == "failed" and not app.running, 30,
                       "dedup to fail and the run to end")
        await pilot.press("down")  # dedup's log
        await wait_for(pilot, lambda: app.screen._log_task == "dedup" and app.screen.query_one("#log").log_lines,
                       what="dedup's log")
        await pilot.pause(0.3)
        shown = screen_text(app)
        row = next(line for line in shown.splitlines() if "✗ failed" in line)
        assert "told to fail" in row, shown
        assert "last run failed: dedup" in shown.splitlines()[0], shown
        assert app.screen.query_one("#log").log_lines[-1] == "[dedup] failed: told to fail"
    assert (project / layout.log_file("dedup")).read_text().splitlines()[-1] == "[dedup] failed: told to fail"

    app = make_app(project)  # opened after the failed run: it says so, not "never run"
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.pipeline.task("dedup").state == "failed" and app.pipeline.static, 20,
                       "the last run's failure")
        await pilot.pause(0.3)
        shown = screen_text(app)
        assert "told to fail" in next(line for line in shown.splitlines() if "✗ failed" in line), shown
        assert "last run failed: dedup" in shown.splitlines()[0], shown
        assert app.pipeline.task("scrape:alpha").state == "up to date"  # the DB's word for what finished



async def test_the_header_names_a_failed_task_at_80_columns_however_long_its_name(project, monkeypatch):
    """Reproduced by a user: a failed `base_model:<hub id>` task left "last run failed:" in the 80-column header and
    nothing after it: the bar wrapped its text and the name went to a second line, out of sight. It is cut with an
    ellipsis now, its start kept."""
    long = "huggingfacetb_smollm2-360m-instruct"
    dodo = project / "dodo.py"
    dodo.write_text(dodo.read_text().replace('"name": "alpha"', f'"name": "{long}"')
                    .replace('step("scrape:alpha"', f'step("scrape:{long}"'))
    monkeypatch.setenv("TINY_FAIL", f"scrape:{long}")
    app = make_app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: len(app.pipeline.static) == 3, what="doit's static status")
        await confirm(pilot, "a")
        await wait_for(pilot, lambda: app.run_summary().startswith("last run failed"), 30, "the run to fail")
        await pilot.pause(0.3)
        header = screen_text(app).splitlines()[0]
        assert f"last run failed: scrape:{long[:10]}" in header and header.rstrip().endswith("…"), header
