"""A tiny stand-in project for the dashboard tests: real config files, a real dodo.py with the real
EventReporter, and steps that are plain Python scripts writing real logs, targets and metrics lines.
(The real stages take minutes; these take a second, so the run/stop/reattach flows can be driven.)"""
from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SOURCES_TOML = """
[dedup]
threshold = 0.8

[sources.alpha]
kind = "icd10cm"
adapters = ["tiny"]
[sources.alpha.params]
max_codes = 10
"""

ADAPTER_TOML = """
description = "tiny test adapter"
[train]
max_steps = 12
"""

# one step of the tiny pipeline: log lines (one with markup-like text), metrics rows for train, then the target
STEP_PY = r'''
import sys, time, json, os
from stages import layout, io
task, seconds, target = sys.argv[1], float(sys.argv[2]), sys.argv[3]
log_path = layout.log_file(task)
log_path.parent.mkdir(parents=True, exist_ok=True)
stage, _, name = task.partition(":")
with open(log_path, "w") as log:
    print(f"[{task}] started (pid {os.getpid()})", file=log, flush=True)
    print("[bold]not markup[/bold] stays literal", file=log, flush=True)
    steps = 12 if stage == "train" else 3
    if stage == "train":
        metrics = layout.metrics_file(name)
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_bytes(b"")
        io.append_jsonl(metrics, {"kind": "start", "total_steps": steps, "n_train": 40, "n_val": 5, "dropped": 1,
                                  "device": "cpu", "dtype": "fp32", "backend": "torch", "quantization": "none"})
    for i in range(1, steps + 1):
        time.sleep(seconds / steps)
        print(f"[{task}] step {i}/{steps}", file=log, flush=True)
        if stage == "train":
            io.append_jsonl(metrics, {"kind": "train", "step": i, "total_steps": steps, "loss": 3.0 / i, "lr": 1e-4,
                                      "tok_s": 250.0, "eta_s": (steps - i) * seconds / steps, "elapsed": i * seconds / steps,
                                      "memory": {"rss": 500 << 20}})
            if i % 4 == 0:
                io.append_jsonl(metrics, {"kind": "val", "step": i, "total_steps": steps, "val_loss": 3.2 / i})
    if os.environ.get("TINY_FAIL") == task:
        print(f"[{task}] error: told to fail", file=log, flush=True)
        sys.exit(2)
    if stage == "train":
        io.append_jsonl(metrics, {"kind": "end", "step": steps, "elapsed": seconds, "summary": {}})
    io.write_text(target, f"{task} done\n")
    print(f"[{task}] done", file=log, flush=True)
'''

DODO_PY = '''
import os, sys
from doit.tools import config_changed
from stages import layout
from stages.events import EventReporter

layout.DATA.mkdir(exist_ok=True)
DOIT_CONFIG = {"backend": "sqlite3", "dep_file": str(layout.doit_db()), "verbosity": 2, "reporter": EventReporter}
TRAIN_S = float(os.environ.get("TINY_TRAIN_S", "2"))

def step(task, seconds, target):
    return [[sys.executable, "step.py", task, str(seconds), target]]

def task_scrape():
    yield {"name": "alpha", "actions": step("scrape:alpha", 0.3, "data/raw/alpha.txt"),
           "file_dep": ["inputs/alpha.txt"], "targets": ["data/raw/alpha.txt"]}

def task_dedup():
    return {"actions": step("dedup", 0.3, "data/dedup/kept.jsonl"), "uptodate": [config_changed({"threshold": 0.8})],
            "file_dep": ["data/raw/alpha.txt"], "targets": ["data/dedup/kept.jsonl"]}

def task_train():
    yield {"name": "tiny", "actions": step("train:tiny", TRAIN_S, "adapters/tiny/out/lora/adapter_model.safetensors"),
           "file_dep": ["data/dedup/kept.jsonl"], "targets": ["adapters/tiny/out/lora/adapter_model.safetensors"]}
'''


def make_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sources.toml").write_text(SOURCES_TOML)
    (root / "adapters" / "tiny").mkdir(parents=True, exist_ok=True)
    (root / "adapters" / "tiny" / "adapter.toml").write_text(ADAPTER_TOML)
    (root / "inputs").mkdir(exist_ok=True)
    (root / "inputs" / "alpha.txt").write_text("alpha\n")
    (root / "step.py").write_text(textwrap.dedent(STEP_PY))
    (root / "dodo.py").write_text(textwrap.dedent(DODO_PY))
    (root / "data").mkdir(exist_ok=True)
    return root


def project_env(**extra: str) -> None:
    """Subprocesses (doit, its steps) import `stages` from the repo."""
    os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    os.environ.update(extra)


async def wait_for(pilot, condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.1)


def wait_sync(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


__all__ = ["make_project", "project_env", "wait_for", "wait_sync", "REPO", "sys"]
