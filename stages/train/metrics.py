"""The live metrics stream of a training run: one JSON object per line in metrics.jsonl.

The dashboard tails this file while training runs. Line kinds:
  {"kind": "start", "total_steps", "n_train", "n_val", "dropped", "device", "dtype", "dtype_reason",
   "backend", "quantization", "trainable_params", "time"}
  {"kind": "train", "step", "total_steps", "epoch", "loss", "lr", "tokens", "tok_s", "input_tok_s",
   "elapsed", "eta_s", "memory": {"rss", ["cuda_allocated", "cuda_peak"], ["mps_allocated"]}}
  {"kind": "val", "step", "total_steps", "val_loss", "elapsed"}
  {"kind": "end", "step", "elapsed", "summary": {...}}
`tokens` and `tok_s` count trained (assistant) tokens; `input_tok_s` counts every non-pad token.
Memory is in bytes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stages import io


def memory(device: str) -> dict[str, int]:
    import psutil
    import torch

    out = {"rss": psutil.Process().memory_info().rss}
    if device == "cuda":
        out["cuda_allocated"] = torch.cuda.memory_allocated()
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    elif device == "mps":
        out["mps_allocated"] = torch.mps.current_allocated_memory()
    return out


class MetricsStream:
    """Truncates the file when created, then appends one line per event."""

    def __init__(self, path: str | Path, device: str):
        self.path = Path(path)
        self.device = device
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        row = {"kind": kind, **fields}
        io.append_jsonl(self.path, row)
        return row

    def start(self, **fields: Any) -> dict[str, Any]:
        return self.write("start", time=time.time(), **fields)

    def step(self, step: int, total_steps: int, loss: float, lr: float, tokens: int, input_tokens: int,
             step_seconds: float, train_seconds: float, epoch: int) -> dict[str, Any]:
        """`train_seconds` is time spent in optimizer steps so far (excludes validation), for the ETA."""
        eta = train_seconds / step * (total_steps - step) if step else None
        return self.write("train", step=step, total_steps=total_steps, epoch=epoch, loss=round(loss, 5), lr=lr,
                          tokens=tokens, tok_s=round(tokens / step_seconds, 2) if step_seconds else None,
                          input_tok_s=round(input_tokens / step_seconds, 2) if step_seconds else None,
                          elapsed=round(self.elapsed(), 3), eta_s=round(eta, 1) if eta is not None else None,
                          memory=memory(self.device))

    def val(self, step: int, total_steps: int, val_loss: float) -> dict[str, Any]:
        return self.write("val", step=step, total_steps=total_steps, val_loss=round(val_loss, 5),
                          elapsed=round(self.elapsed(), 3))

    def end(self, step: int, summary: dict[str, Any]) -> dict[str, Any]:
        return self.write("end", step=step, elapsed=round(self.elapsed(), 3), summary=summary)
