"""The one training loop (stages/train/loop.py) knows no framework: a fake backend defined here, pure
Python and numpy with a fixed loss curve, is driven by the real loop through the real metrics stream, and
the loop's schedule, accumulation, validation, early stopping, checkpoints, resume and summary show."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stages import io
from stages.train import checkpoint, loop
from stages.train.format import IGNORE, Encoded
from stages.train.hardware import Hardware
from stages.train.metrics import MetricsStream


class Killed(Exception):
    pass


class FakeBackend:
    """loop.Backend with one weight vector that each step moves by its learning rate. The validation loss
    is `val_curve[steps done]`, so the test decides when the run improves."""
    name = "fake"
    hw = Hardware("cpu", "fp32", "a fake")
    rank, world_size, parallelism, packing = 0, 1, "single", False
    recipe = {"backend": "fake"}
    checkpoint_subdir = "fake"
    description = "a fake backend"

    def __init__(self, val_curve: dict[int, float], kill_at: int | None = None, val_seconds: float = 0.0):
        self.val_curve, self.kill_at, self.val_seconds = val_curve, kill_at, val_seconds
        self.steps: list[dict] = []    # what each step() was given
        self.val_at: list[int] = []    # steps done at each val_loss()
        self.saved: dict | None = None

    def load(self, examples):
        self.weights, self.done = np.zeros(3), 0
        self.trainable_params = self.weights.size

    def step(self, micro, step_tokens, lr, step):
        if step + 1 == self.kill_at:
            raise Killed(step)
        self.steps.append({"step": step, "lr": lr, "micro": micro, "step_tokens": step_tokens})
        self.weights = self.weights + lr
        self.done = step + 1
        return 10.0 / (1 + step), 0.5

    def val_loss(self, examples):
        self.val_at.append(self.done)
        time.sleep(self.val_seconds)
        return self.val_curve[self.done]

    def snapshot(self):
        return self.weights.copy()

    def save_checkpoint(self, folder, step, best, state, keep):
        with io.atomic_dir(folder / f"step-{step:08d}") as tmp:
            np.save(tmp / "weights.npy", self.weights)
            if best is not None:
                np.save(tmp / "best.npy", best)
            io.write_json(tmp / "state.json", state)
        for old in checkpoint.steps(folder)[:-keep]:
            shutil.rmtree(old)

    def restore_checkpoint(self, path):
        self.weights = np.load(path / "weights.npy")
        self.done = io.read_json(path / "state.json")["loop"]["step"]
        return np.load(path / "best.npy") if (path / "best.npy").exists() else None

    def save_adapter(self, folder, best):
        self.saved = {"best": best, "weights": self.weights.copy()}
        np.save(folder / "adapter.npy", best if best is not None else self.weights)

    def memory(self):
        return {"fake_peak": 42}

    def barrier(self):
        pass

    def agree(self, flag):
        return flag


def examples(n: int = 24) -> list[Encoded]:
    """Examples of different lengths and trained-token counts (example i trains i % 5 + 1 tokens)."""
    return [Encoded(list(range(4 + i)), [IGNORE] * (3 + i - i % 5) + list(range(i % 5 + 1)), f"t{i}")
            for i in range(n)]


RECIPE = {"seed": 0, "lr": 1.0, "batch_size": 2, "grad_accum": 3, "epochs": 1, "max_steps": 12, "warmup_ratio": 0.25,
          "eval_every": 3, "checkpoint_every": 2, "keep_checkpoints": 2, "patience": 0, "quantization": "none"}
IMPROVING = {s: 5.0 - 0.1 * s for s in range(0, 31)}


def run(root: Path, backend: FakeBackend, **recipe) -> dict:
    return loop.train(backend, name="fake", base_model="fake-base", lora={"r": 1}, train_cfg={**RECIPE, **recipe},
                      train_examples=examples(), val_examples=examples(6), dropped=1,
                      metrics=MetricsStream(root / "metrics.jsonl", "cpu"), out_dir=root / "lora",
                      checkpoint_dir=root / "checkpoints", log=lambda *_: None)


def lines(root: Path, kind: str) -> list[dict]:
    return [r for r in io.read_jsonl(root / "metrics.jsonl") if r["kind"] == kind]


def test_schedule_accumulation_validation_and_summary(tmp_path):
    backend = FakeBackend(IMPROVING)
    summary = run(tmp_path, backend)

    # warmup: 25% of 12 steps = 3 linear steps to the full rate, then a cosine decay toward 0
    lrs = [s["lr"] for s in backend.steps]
    assert lrs[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 8 / 9)))
    assert lrs == [r["lr"] for r in lines(tmp_path, "train")]
    # accumulation: each step gets grad_accum micro-batches of batch_size, and the step's trained tokens
    assert all([len(b) for b in s["micro"]] == [2, 2, 2] for s in backend.steps)
    assert all(s["step_tokens"] == sum(e.n_trained for b in s["micro"] for e in b) for s in backend.steps)
    seen = [e.task for s in backend.steps[:4] for b in s["micro"] for e in b]  # 24 examples: one epoch in 4 steps
    assert sorted(seen) == sorted(e.task for e in examples())
    # validation: at the start, every eval_every steps and at the end
    assert backend.val_at == [0, 3, 6, 9, 12] == [r["step"] for r in lines(tmp_path, "val")]

    train_rows = lines(tmp_path, "train")
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert [r["loss"] for r in train_rows] == pytest.approx([10.0 / (1 + s) for s in range(12)], abs=1e-5)
    assert all(r["grad_norm"] == 0.5 and r["total_steps"] == 12 for r in train_rows) and train_rows[-1]["eta_s"] == 0
    start = lines(tmp_path, "start")[0]
    assert start["backend"] == "fake" and start["total_steps"] == 12 and start["n_train"] == 24
    assert start["n_val"] == 6 and start["dropped"] == 1 and start["eval_every"] == 3 and start["trainable_params"] == 3

    tokens = sum(s["step_tokens"] for s in backend.steps)
    assert summary["backend"] == "fake" and summary["steps"] == summary["steps_done"] == 12
    assert summary["start_val_loss"] == 5.0 and summary["end_val_loss"] == summary["best_val_loss"] == pytest.approx(3.8)
    assert summary["best_step"] == 12 and not summary["stopped_early"] and summary["resumed_from"] is None
    assert summary["tokens"] == tokens and summary["epochs_seen"] == 3 and summary["memory"] == {"fake_peak": 42}
    assert summary["trainable_params"] == 3 and summary["train"]["lr"] == 1.0
    assert io.read_json(tmp_path / "lora" / "train_summary.json") == summary
    assert lines(tmp_path, "end")[0]["summary"] == summary
    # finished: the best (here the last) weights are the adapter, and the checkpoints are gone
    assert np.allclose(np.load(tmp_path / "lora" / "adapter.npy"), sum(lrs))
    assert not (tmp_path / "checkpoints" / "fake").exists()


def test_the_eta_counts_the_validations_still_to_come(tmp_path):
    """Steps are instant here and each validation takes 0.2 s: the ETA is the validations left (at steps 3, 6, 9
    and 12 of 12, a step's own included) at their measured pace, not "0 s" while a fifth of the run is ahead."""
    run(tmp_path, FakeBackend(IMPROVING, val_seconds=0.2))
    eta = {r["step"]: r["eta_s"] for r in lines(tmp_path, "train")}
    assert [loop.pending_validations(d, 12, 3) for d in (1, 3, 4, 11, 12)] == [4, 4, 3, 1, 1]
    assert 0.75 <= eta[1] <= 1.2 and 0.55 <= eta[4] <= 0.9 and 0.15 <= eta[12] <= 0.4
    assert [loop.pending_validations(d, 10, 4) for d in (1, 4, 5, 9, 10)] == [3, 3, 2, 1, 1]  # 4, 8 and the last


def test_patience_stops_and_the_best_weights_are_saved(tmp_path):
    curve = {0: 5.0, 3: 4.0, 6: 3.0, 9: 3.5, 12: 3.6, 15: 1.0}
    backend = FakeBackend(curve)
    summary = run(tmp_path, backend, max_steps=30, patience=2)
    assert backend.val_at == [0, 3, 6, 9, 12]  # two validations without a new best after step 6: stop
    assert summary["stopped_early"] and summary["steps_done"] == 12 and len(backend.steps) == 12
    assert summary["best_step"] == 6 and summary["best_val_loss"] == 3.0 and summary["end_val_loss"] == 3.6
    at_6 = sum(s["lr"] for s in backend.steps[:6])
    assert np.allclose(backend.saved["best"], at_6) and not np.allclose(backend.saved["weights"], at_6)
    assert np.allclose(np.load(tmp_path / "lora" / "adapter.npy"), at_6)
    assert lines(tmp_path, "end")[0]["step"] == 12


def test_checkpoint_cadence_and_a_killed_run_resumes_on_the_same_schedule(tmp_path):
    whole = FakeBackend(IMPROVING)
    whole_summary = run(tmp_path / "whole", whole)

    root = tmp_path / "killed"
    with pytest.raises(Killed):
        run(root, FakeBackend(IMPROVING, kill_at=8))  # dies in step 8, after the step-6 checkpoint
    folder = root / "checkpoints" / "fake"
    assert [p.name for p in checkpoint.steps(folder)] == ["step-00000004", "step-00000006"]  # every 2, keep 2
    assert [r["step"] for r in lines(root, "train")] == list(range(1, 8))

    again = FakeBackend(IMPROVING)
    summary = run(root, again)
    assert [s["step"] for s in again.steps] == list(range(6, 12))  # continues after the checkpoint's step
    assert [s["lr"] for s in again.steps] == [s["lr"] for s in whole.steps[6:]]
    assert [[e.task for b in s["micro"] for e in b] for s in again.steps] == \
        [[e.task for b in s["micro"] for e in b] for s in whole.steps[6:]]  # the same data position
    assert again.val_at == [9, 12]
    resumed = lines(root, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] == 6
    assert [r["step"] for r in lines(root, "train")] == list(range(1, 13))  # step 7 once, not twice
    assert [(r["step"], r["val_loss"]) for r in lines(root, "val")] == \
        [(r["step"], r["val_loss"]) for r in lines(tmp_path / "whole", "val")]
    assert summary["resumed_from"] == str(folder / "step-00000006")
    for key in ("steps_done", "tokens", "best_step", "best_val_loss", "start_val_loss", "end_val_loss", "epochs_seen"):
        assert summary[key] == whole_summary[key], key
    assert np.allclose(np.load(root / "lora" / "adapter.npy"), np.load(tmp_path / "whole" / "lora" / "adapter.npy"))
    assert not folder.exists()


def test_checkpoints_of_another_recipe_are_not_resumed(tmp_path):
    with pytest.raises(Killed):
        run(tmp_path, FakeBackend(IMPROVING, kill_at=5))
    backend = FakeBackend(IMPROVING)
    summary = run(tmp_path, backend, lr=0.5)  # another trajectory: its fingerprint differs
    assert summary["resumed_from"] is None and [s["step"] for s in backend.steps] == list(range(12))
    assert not lines(tmp_path, "resume")


def test_peak_memory_is_the_training_process_own_not_its_parent(tmp_path):
    """A training started by a big process (the dashboard, pytest) reports its own peak resident memory:
    ru_maxrss would count the parent's resident set at the fork."""
    held = bytearray(1 << 30)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: 1 GiB resident here
    code = "from stages.train.metrics import peak_rss; print(peak_rss())"
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parents[1], env={**os.environ}).stdout)
    assert 1 << 20 < peak < 512 << 20, f"{peak >> 20} MiB"


def test_validation_stops_at_its_row_limit_or_once_it_holds_enough_trained_tokens(monkeypatch):
    """Long answers (a NEWS2 chart's) give a stable validation loss from fewer rows: the set is the first rows up to
    VAL_MAX_EXAMPLES, or up to the row that brings VAL_TOKENS trained tokens, whichever comes first."""
    def rows(n, trained):
        return [Encoded([1] * (trained + 3), [IGNORE] * 3 + [1] * trained) for _ in range(n)]

    monkeypatch.setattr(loop, "VAL_MAX_EXAMPLES", 10)
    monkeypatch.setattr(loop, "VAL_TOKENS", 100)
    assert len(loop.validation_set(rows(30, 5))) == 10          # short answers: the row limit
    assert len(loop.validation_set(rows(30, 30))) == 4          # long ones: 30, 60, 90, then 120 >= 100
    assert len(loop.validation_set(rows(3, 30))) == 3           # a small split: all of it
    assert loop.validation_set(rows(0, 30)) == []
