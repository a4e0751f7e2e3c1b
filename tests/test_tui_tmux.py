"""The real app in a real terminal (tmux): open it, run the tiny pipeline, read the screen, quit.

CI must install tmux (apt-get install -y tmux); without it this test fails rather than hide.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import uuid

from tui import runner
from tui_support import REPO, make_project, wait_sync


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def test_dashboard_in_tmux_runs_the_pipeline(tmp_path):
    assert shutil.which("tmux"), "tmux is not installed: apt-get install -y tmux"
    project = make_project(tmp_path / "proj")
    session = f"medforge-test-{uuid.uuid4().hex[:8]}"
    env = f"PYTHONPATH={REPO} TINY_TRAIN_S=2"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", "-c", str(project),
         f"env -u LINES -u COLUMNS {env} {sys.executable} -m stages.cli")  # the size is the window's
    try:
        screen = lambda: tmux("capture-pane", "-p", "-t", session)
        wait_sync(lambda: "never run; waits for scrape:alpha" in screen(), 30, "the pipeline view")
        tmux("send-keys", "-t", session, "a")
        wait_sync(lambda: "Run all tasks?" in screen(), 10, "the question")
        tmux("send-keys", "-t", session, "Tab", "Enter")
        wait_sync(lambda: screen().count("✔ done") == 3, 60, "all tasks done on screen")
        # doit exits (writing its dep DB) a moment after its last task: the header says so once it has
        wait_sync(lambda: "last run finished" in screen(), 30, "the run reported finished")
        tmux("send-keys", "-t", session, "2")
        wait_sync(lambda: "12/12 (100%)" in screen(), 15, "the training view")
        tmux("send-keys", "-t", session, "q")
        gone = lambda: subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0
        wait_sync(gone, 15, "the app to quit (its tmux window closes)")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        if runner.current_run(project) is not None:
            runner.stop(project, grace_s=2)
