"""Eval cadence, best checkpoint, early stopping, and resume after a real SIGKILL (tiny real model)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import io, layout
from tests.models import adapter_config, make_tiny_model
from tests.test_train import write_splits

REPO = Path(__file__).resolve().parents[1]
TOML = """
base_model = "{base}"
[lora]
r = 8
alpha = 16
dropout = 0.1
[train]
lr = 1e-2
max_steps = {steps}
batch_size = 4
grad_accum = 2
max_length = 128
warmup_ratio = 0.1
eval_every = 6
checkpoint_every = 2
{extra}
"""
RUNNER = """
import os, sys
from pathlib import Path
os.chdir(sys.argv[1])
from stages import train
from tests.models import adapter_config
cfg = adapter_config(".", "coding", Path("recipe.toml").read_text())
train.run(cfg, "coding")
"""


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def make_project(root: Path, base: Path, steps: int = 24, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.toml").write_text(TOML.format(base=base, steps=steps, extra=extra))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_splits("coding", n_train=40)
    finally:
        os.chdir(cwd)
    return root


def start(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(root)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def metrics(root: Path) -> list[dict]:
    path = root / layout.metrics_file("coding")
    return list(io.read_jsonl(path)) if path.exists() else []


def losses(root: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(root) if r["kind"] == "train"}


def test_killed_run_resumes_on_the_same_loss_curve(tmp_path, tiny_base):
    whole = make_project(tmp_path / "whole", tiny_base)
    proc = start(whole)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out

    resumed = make_project(tmp_path / "resumed", tiny_base)
    kill_after = random.randint(3, 20)
    print(f"killing after step {kill_after}")
    proc = start(resumed)
    deadline = time.monotonic() + 600
    while max(losses(resumed), default=0) < kill_after:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = resumed / layout.checkpoints_dir("coding")
    assert checkpoints.is_dir() and not (resumed / layout.lora_dir("coding")).exists()

    proc = start(resumed)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    rows = metrics(resumed)
    resume = [r for r in rows if r["kind"] == "resume"]
    assert len(resume) == 1 and 2 <= resume[0]["step"] <= kill_after, resume
    assert "resuming at step" in out
    a, b = losses(whole), losses(resumed)
    assert sorted(b) == list(range(1, 25)) == sorted(a)
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-3, [(s, a[s], b[s]) for s in a]
    val_a = [(r["step"], r["val_loss"]) for r in metrics(whole) if r["kind"] == "val"]
    val_b = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "val"]
    assert [s for s, _ in val_a] == [s for s, _ in val_b] == [0, 6, 12, 18, 24]
    assert all(abs(x - y) <= 1e-3 for (_, x), (_, y) in zip(val_a, val_b))
    # finished: the adapter is out, the checkpoints are gone, TensorBoard has the run
    assert (resumed / layout.lora_weights("coding")).exists() and not checkpoints.exists()
    assert list((resumed / layout.tensorboard_dir("coding")).glob("events.out.tfevents.*"))


def test_exported_adapter_is_the_best_and_patience_stops(tmp_path, monkeypatch, tiny_base):
    """lr so high that validation gets worse after an early best: the best is exported, the run stops early."""
    from stages import train

    monkeypatch.chdir(tmp_path)
    write_splits("coding")
    text = TOML.format(base=tiny_base, steps=40, extra="patience = 2").replace("lr = 1e-2", "lr = 0.3").replace(
        "eval_every = 6", "eval_every = 2")
    cfg = adapter_config(tmp_path, "coding", text)
    summary = train.run(cfg, "coding")
    vals = [r for r in metrics(tmp_path) if r["kind"] == "val"]
    best = min(vals, key=lambda r: r["val_loss"])
    assert summary["best_step"] == best["step"] and summary["best_val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert summary["stopped_early"] and summary["steps_done"] < 40
    assert vals[-1]["step"] == summary["steps_done"] == best["step"] + 2 * 2  # two evals without a new best
    # the saved adapter scores the best validation loss, not the last one
    from stages.train import fused_lora, torch_backend
    from stages.train.format import encode_rows
    from stages.train.hardware import Hardware
    from peft import PeftModel
    tok = torch_backend.load_tokenizer(tiny_base)
    val, _ = encode_rows(tok, io.read_jsonl(layout.split_file("coding", "val")), 128)
    hw = Hardware("cpu", summary["dtype"], "test")  # scored as training scored it: in bf16 a bf16 base, fused LoRA
    model = PeftModel.from_pretrained(torch_backend.load_model(tiny_base, "none", hw), str(layout.lora_dir("coding")))
    fused_lora.install(model)
    assert torch_backend.mean_loss(model, val, tok.pad_token_id, hw) == pytest.approx(summary["best_val_loss"], abs=1e-4)
    assert summary["best_val_loss"] < summary["end_val_loss"]


def test_checkpoints_of_another_recipe_are_not_resumed(tmp_path, monkeypatch, tiny_base):
    from stages import train
    from stages.train import checkpoint

    monkeypatch.chdir(tmp_path)
    write_splits("coding")
    stale = layout.checkpoints_dir("coding") / "step-00000004"
    stale.mkdir(parents=True)
    io.write_json(stale / "state.json", {"fingerprint": "another recipe"})
    assert checkpoint.latest(layout.checkpoints_dir("coding")) == stale
    cfg = adapter_config(tmp_path, "coding", TOML.format(base=tiny_base, steps=3, extra=""))
    summary = train.run(cfg, "coding")
    assert summary["resumed_from"] is None and summary["steps_done"] == 3
    kinds = [r["kind"] for r in metrics(tmp_path)]
    assert "resume" not in kinds and kinds.count("train") == 3


def test_data_hash_is_the_digest_of_the_whole_json_fed_one_example_at_a_time():
    """Streaming the examples into the hash must not change it: checkpoints written before still resume."""
    from stages import io
    from stages.train.checkpoint import data_hash
    from stages.train.format import IGNORE, Encoded

    for examples in ([], [Encoded([1, 2, 3], [IGNORE, 2, 3])],
                     [Encoded([5, 6], [IGNORE, 6], "a"), Encoded([], []), Encoded([7], [7], "b")]):
        assert data_hash(examples) == io.content_hash(io.dumps([[e.input_ids, e.labels] for e in examples]))
    assert data_hash([Encoded([1, 2], [IGNORE, 2])]) != data_hash([Encoded([1, 2], [1, 2])])
