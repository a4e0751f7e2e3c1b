"""One run at a time, wherever it starts (stages/lock.py): real doit runs, from a shell and from the dashboard's
runner, against the local fake API (its requests counted there)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stages import io, layout, lock
from tests.fakeapi import FakeApi
from tests.pipeline_project import Project, sources_toml
from tui import runner

SCRAPE = "scrape:labels"


@pytest.fixture()
def project(tmp_path):
    """A project whose one openFDA source takes a few seconds to scrape (3 pages at 2 requests/s)."""
    with FakeApi(records=12, scale=20) as fake:
        project = Project(tmp_path, base_model="embedded:smollm2-135m-instruct")
        (tmp_path / "sources.toml").write_text(sources_toml(news2_count=20, icd_codes=20) + f"""
[sources.labels]
kind = "openfda"
adapters = ["clinical_decision"]
[sources.labels.params]
endpoint = "drug/label"
limit = 4
max_records = 0
base_url = "{fake.url('openfda')}"
rate = 1.5
""")
        yield project, fake
        held = lock.current(project.root)
        if held is not None:
            os.kill(held.pid, signal.SIGKILL)


def start_shell_run(project: Project, *tasks: str, env: dict | None = None) -> subprocess.Popen:
    # a shell run even when the suite itself runs in CI (CI=true there would make it a "ci" run)
    env = {**project.env(), "CI": "", lock.STARTED_BY_ENV: "", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "doit", *tasks], cwd=project.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not any(e["event"] == "task_start" and e.get("pid") == proc.pid for e in project.events()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the first run did not start its task"
        time.sleep(0.05)
    return proc


def refused(result: subprocess.CompletedProcess, holder_pid: int, started_by: str) -> str:
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback
    line = lines[0]
    assert line.startswith("medforge: another run is going:") and f"pid {holder_pid}" in line
    assert f"started from {started_by}" in line, line
    return line


def test_shell_and_shell_the_second_refuses_and_nothing_is_downloaded_twice(project):
    project, fake = project
    first = start_shell_run(project, SCRAPE)
    holder = lock.current(project.root)
    assert holder is not None and holder.pid == first.pid and holder.started_by == "shell"
    assert holder.command == f"doit {SCRAPE}"

    second = project.doit(SCRAPE, check=False)
    refused(second, first.pid, "shell")
    # commands that change doit's DB are refused beside a run (it would undo them); read-only ones never wait
    for command in ("forget", "clean"):
        busy = project.doit(command, SCRAPE, check=False)
        assert busy.returncode != 0 and (busy.stdout + busy.stderr).strip().splitlines() == [
            f"medforge: not now: {holder.describe()} is going; doit {command} once it has finished "
            f"(or stop it: kill -INT {first.pid}, or x in the dashboard)"]
    assert project.doit("list", "--status").returncode == 0
    assert "status     : run" in project.doit("info", SCRAPE, check=False).stdout  # (exit 1: not up to date)

    assert first.wait(60) == 0, first.stdout.read()
    assert len(fake.requests("openfda")) == 3  # one pass: the refused run asked nothing
    starts = [e for e in project.events() if e["event"] == "task_start"]
    assert [e["task"] for e in starts] == [SCRAPE] and {e["pid"] for e in project.events()} == {first.pid}
    assert lock.current(project.root) is None
    assert project.run(SCRAPE) == set()  # the lock is free again, and the scrape is up to date


def test_shell_run_refuses_the_dashboard_and_the_dashboard_sees_it(project):
    project, fake = project
    first = start_shell_run(project, SCRAPE, env={"CI": "true"})
    with pytest.raises(runner.RunBusy, match=rf"pid {first.pid}, started from ci"):
        runner.start(project.root, [SCRAPE])
    assert runner.current_run(project.root).pid == first.pid
    with pytest.raises(runner.RunBusy):
        runner.forget(project.root, [SCRAPE])
    assert first.wait(60) == 0
    assert len(fake.requests("openfda")) == 3


def test_dashboard_run_refuses_a_shell_run(project):
    project, fake = project
    holder = runner.start(project.root, [SCRAPE])
    assert holder.started_by == "dashboard" and holder.command == f"doit run {SCRAPE}"
    second = project.doit(SCRAPE, check=False)
    refused(second, holder.pid, "dashboard")
    deadline = time.monotonic() + 60
    while runner.current_run(project.root) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len(fake.requests("openfda")) == 3
    # the lock's record outlives the run: where its events begin, for a dashboard opened later
    last = lock.last(project.root)
    assert last.pid == holder.pid
    events = list(io.read_jsonl(project.root / layout.events_file()))
    assert [e["event"] for e in events if e["pid"] == last.pid][-1] == "run_end"


def test_a_stale_lock_is_taken_over(project):
    """A run killed hard (kill -9) holds nothing: the next run takes the lock and finishes the work."""
    project, fake = project
    first = start_shell_run(project, SCRAPE)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    stale = lock.last(project.root)
    assert stale.pid == first.pid and lock.current(project.root) is None
    assert SCRAPE in project.run(SCRAPE)
    assert lock.last(project.root).pid != first.pid
    # a lock file naming a pid that is long gone (another machine's crash, a reboot) is taken over too
    (project.root / layout.run_lock()).write_text('{"pid": 999999, "started_by": "shell", "started": 0, '
                                                  '"command": "doit", "events_offset": 0}')
    assert project.doit("list").returncode == 0
    project.doit(SCRAPE)
    assert lock.last(project.root).pid != 999999


def test_readers_never_make_a_run_refuse(tmp_path):
    """The dashboard probes the lock every second: a run starting during a probe still takes it."""
    probes = subprocess.Popen([sys.executable, "-c", "import sys, time; from stages import lock\n"
                               "end = time.time() + 10\nwhile time.time() < end: lock.current(sys.argv[1])",
                               str(tmp_path)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        time.sleep(1.0)
        for _ in range(50):
            holder = lock.acquire(tmp_path)
            assert holder.pid == os.getpid()
            assert lock.current(tmp_path) == holder
            os.close(lock._held)  # let go: the next round takes it again
            lock._held = None
        assert probes.poll() is None
    finally:
        probes.kill()
