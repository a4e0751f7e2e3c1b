"""Two real processes (torchrun, gloo on CPU) train the same trajectory as one process with their global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_train_resume import REPO, RUNNER, losses, make_project

TOML_EXTRA = "packing = true"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from tests.models import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def run(root, nproc: int) -> str:
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launch, str(runner), str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_two_process_data_parallel_matches_one_process(tmp_path, tiny_base):
    from stages import io, layout

    # dropout 0: each rank draws its own dropout masks, which one process would draw differently
    two = make_project(tmp_path / "two", tiny_base, steps=6, extra=TOML_EXTRA)
    one = make_project(tmp_path / "one", tiny_base, steps=6, extra=TOML_EXTRA)
    for root, batch in ((two, 2), (one, 4)):
        text = (root / "recipe.toml").read_text().replace("dropout = 0.1", "dropout = 0.0")
        (root / "recipe.toml").write_text(text.replace("batch_size = 4", f"batch_size = {batch}"))
    run(two, 2)
    run(one, 1)
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    summary = io.read_json(two / layout.lora_dir("coding") / "train_summary.json")
    assert summary["world_size"] == 2 and summary["steps_done"] == 6
