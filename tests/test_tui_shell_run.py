"""A run started from a shell, seen by a dashboard opened during it (a real tmux at 80x24): the header names the
running task within 5 s, `a` says a run is in progress and starts nothing, and the table's states are the ones
`doit list --status` and doit's DB give, once the run has ended."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

from stages import lock
from tui import runner
from tui_support import REPO, make_project, wait_sync

DOIT_LETTER = {"U": "up to date", "R": "will run"}  # `doit list --status`: U up to date, R will run


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def shown_states(screen: str) -> dict[str, str]:
    """The pipeline table as shown (stage named on a group's first row): {"train:tiny": "running", ...}."""
    import re

    states, stage = {}, None
    for line in screen.splitlines():
        m = re.match(r"^ ?(\S+)?\s+(\S+)\s+[✓•▶✔✗?]\s+(will run|running|done|failed|up to date)\b", line)
        if m:
            stage = m.group(1) or stage
            states[stage if m.group(2) == stage else f"{stage}:{m.group(2)}"] = m.group(3)
    return states


def doit_says(root, env) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "doit", "list", "--all", "--status"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {name: DOIT_LETTER[letter] for letter, name, *_ in rows if ":" in name or name == "dedup"}


def test_a_shell_run_is_seen_by_a_dashboard_opened_during_it(tmp_path):
    assert shutil.which("tmux"), "tmux is not installed: apt-get install -y tmux"
    root = make_project(tmp_path / "proj")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TINY_TRAIN_S": "12"}
    shell_run = subprocess.Popen([sys.executable, "-m", "doit"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    session = f"medforge-test-{uuid.uuid4().hex[:8]}"
    try:
        wait_sync(lambda: (root / "data" / "logs" / "train_tiny.log").exists(), 30, "the shell run's training")
        before = doit_says(root, env)  # the DB as the run found it: doit writes it when the run ends
        tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", "-c", str(root),
             f"env -u LINES -u COLUMNS PYTHONPATH={REPO} {sys.executable} -m stages.cli")
        screen = lambda: tmux("capture-pane", "-p", "-t", session)
        opened = time.monotonic()
        wait_sync(lambda: "running train:tiny" in screen().splitlines()[0], 5, "the header to name the running task")
        print(f"header named the running task {time.monotonic() - opened:.1f} s after the app started")
        wait_sync(lambda: shown_states(screen()).get("train:tiny") == "running", 5, "the table")
        shown = shown_states(screen())
        assert shown["scrape:alpha"] == shown["dedup"] == "done", shown  # from the run's events, before the app opened
        assert before == {"scrape:alpha": "will run", "dedup": "will run", "train:tiny": "will run"}

        tmux("send-keys", "-t", session, "a")
        wait_sync(lambda: "a run is in progress" in screen(), 5, "the busy notice")
        assert "Run all tasks?" not in screen()
        assert lock.current(root).pid == shell_run.pid  # still the shell's run, and only it

        assert shell_run.wait(60) == 0
        after = doit_says(root, env)
        assert set(after.values()) == {"up to date"}
        wait_sync(lambda: shown_states(screen()) == after, 15, "the table to show what doit says")
        db = {t["name"]: t["status"] for t in runner.static_status(root)["tasks"]}
        assert db == {name: "up-to-date" for name in after}
        assert "last run finished" in screen().splitlines()[0]
        tmux("send-keys", "-t", session, "q")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        if shell_run.poll() is None:
            shell_run.kill()
