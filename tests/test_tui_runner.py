"""Detached runs, doit's static view and file tailing: the parts of the dashboard that need no screen."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import io, layout
from tui import runner
from tui.state import PipelineState
from tui.tail import Follower, tail_lines

from tui_support import REPO, make_project, project_env, wait_sync


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = make_project(tmp_path / "proj")
    project_env()
    monkeypatch.setenv("TINY_TRAIN_S", "2")
    yield root
    if runner.current_run(root) is not None:
        runner.stop(root, grace_s=2)


def events(root: Path) -> list[dict]:
    path = root / layout.events_file()
    return list(io.read_jsonl(path)) if path.exists() else []


def test_tail_reads_only_the_end_of_a_huge_log(tmp_path):
    path = tmp_path / "big.log"
    line = b"x" * 99 + b"\n"
    with open(path, "wb") as fh:
        for _ in range(40):
            fh.write(line * 10_000)  # 40 MB
        fh.write(b"second to last\nlast\npartial")
    started = time.perf_counter()
    lines, offset = tail_lines(path, 2)
    assert time.perf_counter() - started < 0.5
    assert lines == ["second to last", "last"]
    follower = Follower(path, offset)  # the partial line arrives once it is complete
    assert follower.read_new() == []
    with open(path, "ab") as fh:
        fh.write(b" line\nnext")
    assert follower.read_new() == [b"partial line"]
    path.write_bytes(b"rewritten\n")  # a re-run truncates its log: start over
    assert follower.read_new() == [b"rewritten"]
    assert follower.restarted



def test_a_progress_bar_in_a_log_shows_as_its_last_drawing(tmp_path):
    """base_model's log as transformers writes it: a tqdm bar redrawn with carriage returns. The log view showed
    every redraw as a line of its own (the pane's eight lines were all progress); a terminal shows the last one."""
    path = tmp_path / "base_model.log"
    bar = "\r".join(f"Converting and de-quantizing GGUF tensors...: {p:3d}%|" + "#" * (p // 10)
                     for p in (0, 18, 51, 100))
    path.write_bytes(f"[base_model] started\n\r{bar}\nbase_model: done\r\n[base_model] done in 21.6s\n".encode())
    lines, offset = tail_lines(path, 10)
    assert lines == ["[base_model] started", "Converting and de-quantizing GGUF tensors...: 100%|##########",
                     "base_model: done", "[base_model] done in 21.6s"]
    follower = Follower(path, 0)
    assert [b.decode() for b in follower.read_new()] == lines
    with open(path, "ab") as fh:  # a bar still drawing is a partial line: it shows once its line ends
        fh.write(b"Writing:  21%\rWriting:  79%")
    assert follower.read_new() == []
    with open(path, "ab") as fh:
        fh.write(b"\rWriting: 100%\n")
    assert follower.read_new() == [b"Writing: 100%"]

def test_static_status_says_why_each_task_runs(project):
    status = runner.static_status(project)
    rows = {t["name"]: t for t in status["tasks"]}
    assert set(rows) == {"scrape:alpha", "dedup", "train:tiny"}
    assert all(t["status"] == "run" for t in rows.values())
    assert rows["scrape:alpha"]["reason"] == "never run"
    assert rows["dedup"]["reason"] == "never run; waits for scrape:alpha"
    assert rows["train:tiny"]["task_dep"] == ["dedup"]

    runner.start(project, [])
    wait_sync(lambda: runner.current_run(project) is None, 60, "the run to finish")
    rows = {t["name"]: t for t in runner.static_status(project)["tasks"]}
    assert all(t["status"] == "up-to-date" for t in rows.values()), rows

    (project / "inputs" / "alpha.txt").write_text("alpha changed\n")
    print(runner.forget(project, ["train:tiny"]))
    rows = {t["name"]: t for t in runner.static_status(project)["tasks"]}
    assert rows["scrape:alpha"]["status"] == "run"
    assert "changed inputs/alpha.txt" in rows["scrape:alpha"]["reason"]
    assert rows["dedup"]["status"] == "up-to-date"
    assert rows["train:tiny"]["status"] == "run"
    # doit calls dedup up to date, but scrape:alpha runs first and may change what dedup reads: not "up to date"
    state = PipelineState()
    state.apply_static(runner.static_status(project))
    assert (state.task("dedup").state, state.task("dedup").reason) == ("may run", "checked again after scrape:alpha")


def test_a_task_downstream_of_one_that_runs_may_run_until_doit_has_checked_it():
    """Up to date in doit's view, but reading a task that will run (or ran in the run going now): "may run", with
    the task it waits on; once the run has checked it, what the run said; a failed upstream changes nothing."""
    state = PipelineState()
    state.apply_static({"tasks": [
        {"name": "scrape:alpha", "status": "run", "reason": "changed inputs/alpha.txt", "task_dep": []},
        {"name": "scrape:beta", "status": "up-to-date", "task_dep": []},
        {"name": "dedup", "status": "up-to-date", "task_dep": ["scrape:alpha", "scrape:beta"]},
        {"name": "train:tiny", "status": "up-to-date", "task_dep": ["dedup"]}]})
    view = {n: (state.task(n).state, state.task(n).reason) for n in state.names()}
    assert view == {"scrape:alpha": ("will run", "changed inputs/alpha.txt"), "scrape:beta": ("up to date", ""),
                    "dedup": ("may run", "checked again after scrape:alpha"),
                    "train:tiny": ("may run", "checked again after dedup")}
    assert state.counts() == {"will run": 1, "up to date": 1, "may run": 2}

    state.run_active = True
    state.apply_events([{"event": "run_start"}, {"event": "task_start", "task": "scrape:alpha"},
                        {"event": "task_done", "task": "scrape:alpha"}])
    assert state.task("dedup").state == "may run"  # done in this run: what reads it is checked next
    state.apply_events([{"event": "task_uptodate", "task": "dedup"}])
    assert state.task("dedup").state == "up to date" and state.task("train:tiny").state == "up to date"

    state.apply_events([{"event": "run_start"}, {"event": "task_failed", "task": "scrape:alpha", "error": ["x"]}])
    assert state.task("dedup").state == "up to date"  # doit runs nothing after a failed dependency


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_one_run_at_a_time_and_stop(project, monkeypatch, sigint):
    """Stop saves doit's state, also when the dashboard itself was started with SIGINT ignored (nohup, `&`)."""
    import signal

    monkeypatch.setenv("TINY_TRAIN_S", "60")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    try:
        record = runner.start(project, ["train:tiny"])  # the run inherits this process's SIGINT disposition
    finally:
        signal.signal(signal.SIGINT, previous)
    assert runner.current_run(project) == record
    with pytest.raises(runner.RunBusy, match=f"pid {record.pid}, started from dashboard"):
        runner.start(project, [])
    with pytest.raises(runner.RunBusy):
        runner.forget(project, ["dedup"])
    wait_sync(lambda: any(e.get("task") == "train:tiny" and e["event"] == "task_start" for e in events(project)),
              30, "training to start")
    message = runner.stop(project, grace_s=10)
    assert "stopped" in message
    assert runner.current_run(project) is None
    evs = [e for e in events(project) if e.get("pid") == record.pid]
    assert [e["event"] for e in evs][0] == "run_start"
    assert evs[-1]["event"] == "run_end"  # SIGINT lets doit finish cleanly (and save its dep DB)
    state = PipelineState()
    state.apply_events(evs)
    assert state.task("scrape:alpha").state == "done"
    assert state.task("train:tiny").state == "failed"


def test_a_run_outlives_the_process_that_started_it(project, monkeypatch):
    monkeypatch.setenv("TINY_TRAIN_S", "6")
    starter = ("import sys; from pathlib import Path; from tui import runner; "
               "r = runner.start(Path(sys.argv[1]), ['train:tiny']); print(r.pid)")
    done = subprocess.run([sys.executable, "-c", starter, str(project)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    pid = int(done.stdout.strip())
    record = runner.current_run(project)  # found again through the run lock by another process
    assert record is not None and record.pid == pid
    assert os.getpgid(pid) == pid  # its own process group and session: a terminal hangup does not reach it
    assert os.getsid(pid) == pid
    wait_sync(lambda: runner.current_run(project) is None, 60, "the run to finish")
    assert (project / "adapters/tiny/out/lora/adapter_model.safetensors").exists()
    assert events(project)[-1]["event"] == "run_end"


def test_the_dashboard_stops_a_run_started_from_a_script(project):
    """doit started by a script (its process group is the script's): stop reaches doit and its task's process."""
    import psutil

    env = {**os.environ, "TINY_TRAIN_S": "60", "CI": "", "MEDFORGE_RUN_BY": ""}  # a shell run, even in CI
    run = subprocess.Popen([sys.executable, "-m", "doit"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_sync(lambda: any(e.get("task") == "train:tiny" and e["event"] == "task_start" for e in events(project)),
                  30, "training to start")
        holder = runner.current_run(project)
        assert holder.pid == run.pid and holder.started_by == "shell" and os.getpgid(run.pid) != run.pid
        step = psutil.Process(run.pid).children(recursive=True)
        assert step
        assert "stopped" in runner.stop(project, grace_s=30)
        assert run.wait(10) is not None and runner.current_run(project) is None
        wait_sync(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in step), 10,
                  "the task's process to end too")
        wait_sync(lambda: events(project)[-1]["event"] == "run_end", 10,  # SIGINT first: doit ended cleanly
                  "doit's run_end (its last events can land after its process is gone, under load)")
    finally:
        if run.poll() is None:
            run.kill()


def test_a_scrapes_reason_to_run_is_said_in_words(tmp_path, monkeypatch):
    """doit names a failed uptodate check by its function ("not up to date: config_changed, uptodate"); the scrape's
    freshness check says why in words, and that explains the config_changed beside it."""
    from doit.tools import config_changed

    from stages import scrape
    from stages.config import SourceConfig
    from tui.doit_status import reason_line

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDFORGE_OFFLINE", raising=False)
    check = scrape.Current(SourceConfig(name="pm", kind="pubmed", enabled=True, adapters=[], refresh="30d",
                                        mode="live", params={}, raw_block={}))
    assert check() is False
    block = config_changed({"term": "x"})
    assert reason_line({"uptodate_false": [(block, [], {}), (check, [], {})]}) == "never scraped"
    assert reason_line({"uptodate_false": [(block, [], {})]}) == "config changed"
