"""Progress of a long stage part: lines in the task log now and then, a live file for the dashboard, gone at the end."""
from __future__ import annotations

from stages import io, layout, progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_part_logs_its_size_then_how_far_it_got_at_most_every_log_interval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    clock = Clock()
    monkeypatch.setattr(progress, "_tracker", progress.Tracker("eval:coding", clock, log_every=30, write_every=1))
    progress.advance(5)  # outside a part: nothing
    assert capsys.readouterr().out == "" and not layout.progress_file("eval:coding").exists()
    with progress.part("perplexity", 600, "rows", "clinical_decision split"):
        for _ in range(20):
            clock.now += 5
            progress.advance(30)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["eval:coding: clinical_decision split, perplexity: 0/600 rows",
                     "eval:coding: clinical_decision split, perplexity: 180/600 rows, 30s, about 1m10s left",
                     "eval:coding: clinical_decision split, perplexity: 360/600 rows, 1m00s, about 40s left",
                     "eval:coding: clinical_decision split, perplexity: 540/600 rows, 1m30s, about 10s left"]
    live = io.read_json(layout.progress_file("eval:coding"))
    assert live == {"what": "perplexity", "scope": "clinical_decision split", "done": 600, "total": 600}
    progress.advance(7)  # the part is over: nothing more counts
    assert io.read_json(layout.progress_file("eval:coding"))["done"] == 600
    progress.stop()
    assert not layout.progress_file("eval:coding").exists()


def test_the_live_file_is_written_at_most_every_write_interval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clock, writes = Clock(), []
    tracker = progress.Tracker("eval:coding", clock, write_every=1)
    monkeypatch.setattr(tracker, "write", lambda now: (writes.append(tracker.done), setattr(tracker, "written", now)))
    monkeypatch.setattr(progress, "_tracker", tracker)
    with progress.part("choice", 100, "options"):
        for _ in range(100):
            clock.now += 0.1
            progress.advance(1)
    assert writes[0] == 0 and writes[-1] == 100 and len(writes) <= 12, writes  # begin, ~once a second, the end


def test_a_killed_runs_file_is_gone_when_the_task_starts_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stale = layout.progress_file("eval:coding")
    io.write_json(stale, {"what": "perplexity", "scope": "", "done": 3, "total": 9})
    progress.start("eval:coding")
    assert not stale.exists()
    progress.stop()
