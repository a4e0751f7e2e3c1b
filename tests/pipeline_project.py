"""A throwaway medforge project in a temp folder, run by real doit, observed through its event stream.

The project gets its own copy of dodo.py and the `stages` package, so a test can edit
stage code (the "code change" rule) without touching the repository.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]


def sources_toml(news2_count: int = 60, icd_codes: int = 60) -> str:
    return f"""
[dedup]
source_priority = ["icd10cm", "news2"]

[sources.icd10cm]
kind = "icd10cm"
adapters = ["clinical_coding"]
[sources.icd10cm.params]
max_codes = {icd_codes}
seed = 13

[sources.news2]
kind = "news2"
adapters = ["clinical_decision"]
[sources.news2.params]
count = {news2_count}
seed = 7
"""


def adapter_toml(base_model: str, lr: float = 3e-4, max_steps: int = 2, merged: str = '["q8_0"]') -> str:
    return f"""
base_model = "{base_model}"
[lora]
r = 4
alpha = 8
[train]
lr = {lr}
max_steps = {max_steps}
batch_size = 4
max_length = 512
[eval]
max_examples = 8
max_generate = 2     # generated answers per task and split: greedy decoding is the slow part on a CPU
[export]
merged = {merged}
"""


class Project:
    def __init__(self, root: Path, base_model: str, **adapter_kw):
        self.root = root
        shutil.copy(REPO / "dodo.py", root / "dodo.py")
        shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
        (root / "sources.toml").write_text(sources_toml())
        for name in ("clinical_coding", "clinical_decision"):
            (root / "adapters" / name).mkdir(parents=True, exist_ok=True)
            (root / "adapters" / name / "adapter.toml").write_text(adapter_toml(base_model, **adapter_kw))
        self.runs = 0

    def env(self) -> dict[str, str]:
        # the copied `stages` must win over the installed one, in doit and in every action
        return {**os.environ, "PYTHONPATH": str(self.root)}

    def doit(self, *args: str, check: bool = True, timeout: int = 1200,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "doit", *args], cwd=self.root, env={**self.env(), **(env or {})},
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def events(self) -> list[dict]:
        path = self.root / "data" / "events.jsonl"
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()] if path.exists() else []

    def run(self, *args: str) -> set[str]:
        """Run doit and return the names of the tasks it executed (from the event stream)."""
        before = len(self.events())
        self.doit(*args)
        return {e["task"] for e in self.events()[before:] if e["event"] == "task_start"}

    def edit(self, relpath: str, old: str, new: str) -> None:
        path = self.root / relpath
        text = path.read_text()
        assert old in text, f"{old!r} not in {relpath}"
        path.write_text(text.replace(old, new, 1))

    def path(self, relpath: str) -> Path:
        return self.root / relpath
