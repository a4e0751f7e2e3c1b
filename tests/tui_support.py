"""A tiny stand-in project for the dashboard tests: real config files, a real dodo.py with the real
EventReporter, and steps that are plain Python scripts writing real logs, targets and metrics lines.
(The real stages take minutes; these take a second, so the run/stop/reattach flows can be driven.)"""
from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

from stages import io, layout

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
        print(f"[{task}] failed: told to fail", file=log, flush=True)
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


def screen_text(app) -> str:
    """What the terminal shows now, as plain lines (from the app's own SVG export)."""
    import html
    import re

    rows: dict[float, list[tuple[float, str]]] = {}
    for m in re.finditer(r'<text[^>]*x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', app.export_screenshot()):
        rows.setdefault(float(m.group(2)), []).append((float(m.group(1)), html.unescape(m.group(3))))
    return "\n".join("".join(t for _, t in sorted(v)).replace("\xa0", " ") for _, v in sorted(rows.items()))


def dialog_text(app) -> str:
    return "\n".join(str(w.content) for w in app.screen.query("#confirm Static"))


async def confirm(pilot, key: str, *expected: str) -> None:
    """Press `key`, check the question names what it should, and go ahead (tab to the action's button, enter)."""
    from tui.screens.confirm import ConfirmScreen

    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), 10, f"the question after {key}")
    text = dialog_text(pilot.app)
    for part in expected:
        assert part in text, f"{part!r} not in the question:\n{text}"
    await pilot.press("tab", "enter")
    await wait_for(pilot, lambda: not isinstance(pilot.app.screen, ConfirmScreen), 10, "the question to close")


def wait_sync(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)




def table_text(app, selector: str) -> str:
    from textual.widgets import DataTable

    table = app.screen.query_one(selector, DataTable)
    return "\n".join(" ".join(str(c) for c in table.get_row_at(i)) for i in range(table.row_count))


def write_reports(root: Path) -> None:
    io.write_json(root / layout.raw_manifest("alpha"), {"pages": [{"name": "p1"}, {"name": "p2"}]})
    # the shape stages/dedup.py writes: cleaning drops by reason per source and in total, then duplicates
    io.write_json(root / layout.dedup_report(), {
        "cleaning": {"dropped": {"empty": 2, "too_long": 4}, "dropped_examples": {"empty": ["a-17", "a-40"]}},
        "sources": {"alpha": {"in": 126, "dropped": {"empty": 2, "too_long": 4}, "cleaned": {"markup": 9},
                              "exact_dups": 7, "near_dups": 3, "duplicate_clusters": 6, "kept": 110}},
        "total": {"in": 126, "dropped": 6, "exact_dups": 7, "near_dups": 3, "kept": 110, "removed": 16,
                  "duplicate_clusters": 6}})
    io.write_json(root / layout.split_dir("tiny") / "statistics.json",
                  {"examples": 110, "splits": {"train": 90, "val": 10, "test": 10}, "by_source": {}})
    # the shape stages/evaluate.py writes (one adapter, so its matrix is its own split only)
    tasks = {"code_to_description": {"n_examples": 6, "base_ppl": 10.0, "adapter_ppl": 4.0},
             "description_to_code": {"n_examples": 4, "base_ppl": 8.8, "adapter_ppl": 4.6}}
    own = {"n_examples": 10, "base_ppl": 9.5, "adapter_ppl": 4.25, "tasks": tasks,
           "metrics": {"code_to_description": {"kind": "generated", "n": 6, "base": {"exact_match": 0.0},
                                               "adapter": {"exact_match": 0.5}},
                       "description_to_code": {"kind": "choice", "n": 4, "base": {"accuracy": 0.25},
                                               "adapter": {"accuracy": 0.75}}}}
    io.write_json(root / layout.eval_file("tiny"), {
        "adapter": "tiny", **own, "matrix": {"tiny": own}, "regressions": [],
        "safety": {"base": {"n": 5, "passed": 4, "pass_rate": 0.8}, "adapter": {"n": 5, "passed": 5, "pass_rate": 1.0}}})
    rows = [{"kind": "start", "total_steps": 40, "device": "cuda", "dtype": "bf16", "backend": "torch",
             "quantization": "none", "dropped": 2}]
    for step in range(1, 31):
        rows.append({"kind": "train", "step": step, "total_steps": 40, "loss": round(2.5 - step * 0.05, 3),
                     "lr": 3e-4 * min(1, step / 4), "tok_s": 270.0, "eta_s": (40 - step) * 2.0,
                     "elapsed": step * 2.0,
                     "memory": {"rss": 900 << 20, "cuda_allocated": 14 << 30, "cuda_peak": 19 << 30}})
        if step % 10 == 0:
            rows.append({"kind": "val", "step": step, "total_steps": 40, "val_loss": round(2.4 - step * 0.03, 3)})
    io.write_jsonl(root / layout.metrics_file("tiny"), rows)


# --- the fixed scene that the SVG snapshots pin and docs/screens shows (bench/screens.py)
def fixed_memory():
    from tui.messages import MemoryReading

    return MemoryReading(gpus=[("GPU0 NVIDIA H100 80GB HBM3", 21 << 30, 80 << 30)], host_used=6 << 30,
                         host_total=24 << 30)


# the scene's task graph (a dodo of its own: the tests' tiny project keeps its three tasks)
SCENE_DODO_PY = DODO_PY + '''
def task_base_model():
    yield {"name": "smollm2", "actions": step("base_model:smollm2", 0.1, "data/base/smollm2/config.json"),
           "targets": ["data/base/smollm2/config.json"], "uptodate": [True]}

def task_base_gguf():
    yield {"name": "smollm2", "actions": step("base_gguf:smollm2", 0.1, "data/base/smollm2.gguf"),
           "file_dep": ["data/base/smollm2/config.json"], "targets": ["data/base/smollm2.gguf"]}

def task_eval():
    yield {"name": "tiny", "actions": step("eval:tiny", 0.1, "data/eval/tiny.json"),
           "file_dep": ["adapters/tiny/out/lora/adapter_model.safetensors"], "targets": ["data/eval/tiny.json"]}

def task_export():
    yield {"name": "tiny", "actions": step("export:tiny", 0.1, "adapters/tiny/out/tiny-lora.gguf"),
           "file_dep": ["data/base/smollm2.gguf", "adapters/tiny/out/lora/adapter_model.safetensors"],
           "targets": ["adapters/tiny/out/tiny-lora.gguf"]}
'''
SCENE_TASKS = 7

# a `doit run --continue` going on: base_gguf failed, the branch that does not need it goes on
SCENE_EVENTS = [
    {"event": "run_start", "selected": []},
    {"event": "task_uptodate", "task": "base_model:smollm2"},
    {"event": "task_start", "task": "base_gguf:smollm2"},
    {"event": "task_failed", "task": "base_gguf:smollm2",
     "error": ["convert_hf_to_gguf.py not found"]},
    {"event": "task_start", "task": "scrape:alpha"},
    {"event": "task_done", "task": "scrape:alpha"},
    {"event": "task_start", "task": "dedup"},
    {"event": "task_done", "task": "dedup"},
    {"event": "task_start", "task": "train:tiny"},
]
SCENE_TRAIN_LOG = ["train:tiny: device cuda, dtype bf16, backend torch",
                   *(f"train:tiny: [{100 * i / 40:5.1f}%] step {i}/40 loss {2.5 - i * 0.05:.4f} 270.0 tok/s "
                     f"eta {(40 - i) * 2}s" for i in range(1, 31, 3))]

# base vs adapter on one question, as the chat view shows a finished exchange
SCENE_CHAT = {
    "prompt": "What does ICD-10-CM code E11.9 mean?",
    "left": ("E11.9 looks like a medical billing code. It may be related to diabetes, but check an official "
             "code list or ask a clinician for its exact meaning.", 38, 0.62),
    "right": ("E11.9 is Type 2 diabetes mellitus without complications (chapter 4: endocrine, nutritional "
              "and metabolic diseases, E00-E89).", 33, 0.55),
}


def _scene_chat_ready(app) -> bool:
    panes = app.screen.query("ChatPane")
    return all(p.display for p in panes) and all("tok/s" in p.status for p in panes)


SCENE_READY = {
    "pipeline": lambda app: app.running and app.pipeline.task("train:tiny").state == "running"
    and app.screen.selected == "train:tiny" and app.screen._log_task == "train:tiny"
    and len(app.screen.query_one("#log").log_lines) == len(SCENE_TRAIN_LOG) and "train:tiny" in app.screen.progress,
    "training": lambda app: len(app.screen.curves.steps) == 30 and app.screen.memory is not None,
    "data": lambda app: "alpha" in table_text(app, "#data-sources"),
    "eval": lambda app: "tiny" in table_text(app, "#eval-matrix"),
    "chat": _scene_chat_ready,
    "help": lambda app: True,
}


def scene_project(root: Path) -> Path:
    """The tiny project with every report written, as the views' screenshots show it."""
    make_project(root)
    (root / "dodo.py").write_text(textwrap.dedent(SCENE_DODO_PY))
    io.write_text(root / "data" / "base" / "smollm2" / "config.json", "{}\n")
    io.write_text(root / layout.log_file("train:tiny"), "\n".join(SCENE_TRAIN_LOG) + "\n")
    project_env()
    write_reports(root)
    return root


def scene_app(root: Path, view: str):
    from tui.app import MedforgeApp

    return MedforgeApp(root, poll_s=3600, memory_probe=fixed_memory, start_view="pipeline" if view == "help" else view)


async def _scene_run(app, pilot) -> None:
    """The app's own poll result for a run in progress (SCENE_EVENTS), with a fixed pid and start time."""
    from stages.lock import Holder
    from tui.app import _Polled

    class SceneRun(Holder):
        def describe(self) -> str:
            return "doit --continue (pid 4242, started from shell at 09:30:00)"

    await wait_for(pilot, lambda: app._poll_timer is not None, what="the first poll")  # its result is in
    run = SceneRun(pid=4242, started_by="shell", started=0.0, command="doit --continue")
    app.post_message(_Polled(run, True, SCENE_EVENTS, new_run=True))
    await wait_for(pilot, lambda: app.running, what="the scene's run")
    table = app.screen.query_one("#tasks")
    table.move_cursor(row=app.pipeline.names().index("train:tiny"), animate=False)


async def _scene_chat(app, pilot) -> None:
    """Side by side, base and adapter, one finished answer each, through the panes' own messages."""
    from tui.messages import ChatDone, ChatToken

    await pilot.press("ctrl+b")
    screen = app.screen
    for pane_id in ("left", "right"):
        text, tokens, seconds = SCENE_CHAT[pane_id]
        screen.query_one(f"#pane-{pane_id}").begin(SCENE_CHAT["prompt"])
        for i in range(0, len(text), 24):  # streamed in pieces, as the chat process sends them
            screen.post_message(ChatToken(pane_id, text[i:i + 24]))
        screen.post_message(ChatDone(pane_id, tokens, seconds))


SCENE_SETUP = {"pipeline": _scene_run, "chat": _scene_chat}


async def scene_ready(app, pilot, view: str) -> None:
    """Wait until `view` shows all of its data, with nothing blinking, so two captures are identical."""
    await wait_for(pilot, lambda: app.cfg is not None and len(app.pipeline.static) == SCENE_TASKS,
                   what="config and doit")
    if view == "help":
        await pilot.press("question_mark")
    if view in SCENE_SETUP:
        await SCENE_SETUP[view](app, pilot)
    await wait_for(pilot, lambda: SCENE_READY[view](app), what=f"the {view} view's data")
    for widget in app.screen.query("Input"):
        widget.cursor_blink = False
    await pilot.pause(0.2)
