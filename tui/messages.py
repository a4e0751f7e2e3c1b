"""Typed messages from workers to widgets: every slow call reports back through one of these."""
from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class PipelineChanged(Message):
    """The pipeline state (static and/or live) changed; screens re-read `app.pipeline`."""


@dataclass
class RunStateChanged(Message):
    """A run started, ended or was found again; `running` tells which."""
    running: bool
    summary: str


@dataclass
class Notice(Message):
    """A one-line result or error of an action (start, stop, forget) for the user."""
    text: str
    error: bool = False


@dataclass
class LogLines(Message):
    """New lines of the selected task's log; `reset` when they replace what is shown."""
    task: str
    lines: list[str]
    reset: bool


@dataclass
class TaskProgress(Message):
    """How far running tasks have got, per task: (what, done, total, ETA in seconds or None, scope) — training's
    step from its metrics stream, another stage's current part from its progress file (stages.progress)."""
    progress: dict[str, tuple[str, int, int, float | None, str]]


@dataclass
class MetricsRows(Message):
    """New training-metric rows for one adapter; `reset` when they replace earlier ones."""
    adapter: str
    rows: list[dict]
    reset: bool


@dataclass
class MemoryReading(Message):
    """GPU memory per device (NVML), host RAM; `gpus` is empty where no NVIDIA GPU is seen."""
    gpus: list[tuple[str, int, int]]    # (name, used bytes, total bytes)
    host_used: int
    host_total: int


@dataclass
class ReportLoaded(Message):
    """A finished stage's report (data or eval view) was read; `data` is what the view renders."""
    kind: str
    data: dict


@dataclass
class ChatToken(Message):
    pane: str
    text: str


@dataclass
class ChatDone(Message):
    pane: str
    tokens: int
    seconds: float
    error: str = ""
    stopped: bool = False
    note: str = ""  # what the model did not see (earlier turns left out to fit its context)
