"""The live metrics stream of a training run: one JSON object per line in metrics.jsonl.

The dashboard tails this file while training runs. Line kinds:
  {"kind": "start", "total_steps", "n_train", "n_val", "dropped", "device", "dtype", "dtype_reason",
   "backend", "quantization", "trainable_params", "time", ...}
  {"kind": "resume", "step", "checkpoint", "time"}   (a resumed run; earlier lines up to `step` are kept)
  {"kind": "train", "step", "total_steps", "epoch", "loss", "lr", "grad_norm", "tokens", "tok_s", "input_tok_s",
   "elapsed", "eta_s", "memory": {"rss", "rss_peak", ["cuda_allocated", "cuda_peak"], ["mps_allocated", "mps_driver"], ["mlx_active", "mlx_peak"]}}
  {"kind": "val", "step", "total_steps", "val_loss", "best_val_loss", "best_step", "elapsed"}
  {"kind": "end", "step", "elapsed", "summary": {...}}
`tokens` and `tok_s` count trained (assistant) tokens; `input_tok_s` counts every non-pad token.
Memory is in bytes. The same scalars go to TensorBoard event files when a folder is given.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from stages import io

PROGRESS_SECONDS = 30.0  # headless: a plain progress line at least this often


def peak_rss() -> int:
    """This process's peak resident memory in bytes. On Linux from VmHWM: ru_maxrss also counts the parent's
    resident set at the fork, so a child of a big process (pytest, the dashboard) reported the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak if sys.platform == "darwin" else peak * 1024


def memory(device: str) -> dict[str, int]:
    import psutil

    out = {"rss": psutil.Process().memory_info().rss, "rss_peak": peak_rss()}
    if device == "cuda":
        import torch
        out["cuda_allocated"] = torch.cuda.memory_allocated()
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    elif device == "mps":
        import torch
        out["mps_allocated"] = torch.mps.current_allocated_memory()
        out["mps_driver"] = torch.mps.driver_allocated_memory()
    elif device.startswith("mlx"):  # the MLX backend's "mlx-cpu" / "mlx-gpu": its allocator's own figures
        import mlx.core as mx
        out.update(mlx_active=int(mx.get_active_memory()), mlx_peak=int(mx.get_peak_memory()))
    return out


class Progress:
    """A progress bar on a terminal; headless (a log file, doit, ssh without a tty), plain periodic lines."""

    def __init__(self, name: str, total: int, initial: int = 0, stream=None, every_s: float = PROGRESS_SECONDS):
        self.name, self.total, self.stream, self.every_s = name, total, stream or sys.stderr, every_s
        self.bar = None
        self.last_line = 0.0
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=f"train:{name}", file=self.stream, dynamic_ncols=True)

    def update(self, step: int, loss: float, tok_s: float | None, eta_s: float | None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=tok_s)
            return
        now = time.monotonic()
        if step in (1, self.total) or now - self.last_line >= self.every_s:
            self.last_line = now
            pct = 100.0 * step / max(1, self.total)
            eta = f"{eta_s:.0f}s" if eta_s is not None else "?"
            print(f"train:{self.name}: [{pct:5.1f}%] step {step}/{self.total} loss {loss:.4f} "
                  f"{tok_s} tok/s eta {eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Scalars:
    """TensorBoard event files written through the tensorboard package itself: torch's SummaryWriter wraps the same
    EventFileWriter, and going direct keeps an MLX run free of torch. `purge_step`: a resumed run's first step, so
    TensorBoard drops what the interrupted run logged from there on (SummaryWriter's purge_step)."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(folder))
        if purge_step is not None:
            self.writer.add_event(Event(step=purge_step, wall_time=time.time(),
                                        session_log=SessionLog(status=SessionLog.START)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.writer.add_event(Event(wall_time=time.time(), step=step,
                                    summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsStream:
    """Appends one line per event. `start()` begins a fresh file; `resume(step)` keeps lines up to `step`."""

    def __init__(self, path: str | Path, device: str, tensorboard: str | Path | None = None):
        self.path = Path(path)
        self.device = device
        self.tb_dir = Path(tensorboard) if tensorboard else None
        self.tb = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.offset = 0.0  # elapsed seconds carried over from the run a resume continues

    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.started

    def _tensorboard(self, purge_step: int | None = None):
        if self.tb_dir is None:
            return None
        self.tb = Scalars(self.tb_dir, purge_step=purge_step)
        return self.tb

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        row = {"kind": kind, **fields}
        io.append_jsonl(self.path, row)
        return row

    def start(self, **fields: Any) -> dict[str, Any]:
        self.path.write_bytes(b"")
        if self.tb_dir is not None:
            shutil.rmtree(self.tb_dir, ignore_errors=True)  # a fresh run: no curves from the last one
            self._tensorboard()
        return self.write("start", time=time.time(), **fields)

    def resume(self, step: int, checkpoint: str) -> dict[str, Any]:
        """Keep what the interrupted run logged up to `step`, then note the resume."""
        kept = []
        if self.path.exists():
            for row in io.read_jsonl(self.path):
                if row.get("kind") in ("start", "resume") or (
                        row.get("kind") in ("train", "val") and row.get("step", 0) <= step):
                    kept.append(row)
        io.write_jsonl(self.path, kept)
        done = [r for r in kept if r.get("kind") in ("train", "val") and r.get("step") == step]
        self.offset = max((r.get("elapsed") or 0.0 for r in done), default=0.0)
        self._tensorboard(purge_step=step + 1)
        return self.write("resume", step=step, checkpoint=checkpoint, time=time.time())

    def step(self, step: int, total_steps: int, loss: float, lr: float, tokens: int, input_tokens: int,
             step_seconds: float, train_seconds: float, epoch: int, grad_norm: float | None = None,
             steps_timed: int | None = None, pending_seconds: float = 0.0) -> dict[str, Any]:
        """The ETA: the steps left at the pace of the last `steps_timed` ones (`train_seconds`, validation excluded),
        plus `pending_seconds`, what the validations still to come will take at theirs."""
        timed = steps_timed if steps_timed is not None else step
        eta = train_seconds / timed * (total_steps - step) + pending_seconds if timed else None
        row = self.write("train", step=step, total_steps=total_steps, epoch=epoch, loss=round(loss, 5), lr=lr,
                         grad_norm=round(grad_norm, 5) if grad_norm is not None else None,
                         tokens=tokens, tok_s=round(tokens / step_seconds, 2) if step_seconds else None,
                         input_tok_s=round(input_tokens / step_seconds, 2) if step_seconds else None,
                         elapsed=round(self.elapsed(), 3), eta_s=round(eta, 1) if eta is not None else None,
                         memory=memory(self.device))
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tok_s"):
                if row[key] is not None:
                    self.tb.add_scalar(f"train/{key}", row[key], step)
        return row

    def val(self, step: int, total_steps: int, val_loss: float, best_val_loss: float | None = None,
            best_step: int | None = None) -> dict[str, Any]:
        if self.tb is not None:
            self.tb.add_scalar("val/loss", val_loss, step)
            self.tb.flush()
        return self.write("val", step=step, total_steps=total_steps, val_loss=round(val_loss, 5),
                          best_val_loss=round(best_val_loss, 5) if best_val_loss is not None else None,
                          best_step=best_step, elapsed=round(self.elapsed(), 3))

    def end(self, step: int, summary: dict[str, Any]) -> dict[str, Any]:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        return self.write("end", step=step, elapsed=round(self.elapsed(), 3), summary=summary)


def run_summary(*, state: dict[str, Any], hw, **fields: Any) -> dict[str, Any]:
    """train_summary.json, the same for every backend: the loop's state plus what the backend adds."""
    seconds = state["train_seconds"]
    return {
        **fields, "device": hw.device, "dtype": hw.dtype, "dtype_reason": hw.reason,
        "steps_done": state["step"], "epochs_seen": state["epoch"],
        "start_val_loss": state["start_val_loss"], "end_val_loss": state["end_val_loss"],
        "best_val_loss": state["best_val_loss"], "best_step": state["best_step"], "stopped_early": state["stopped_early"],
        "tokens": state["tokens"], "input_tokens": state["input_tokens"], "train_seconds": round(seconds, 3),
        "tok_s": round(state["tokens"] / seconds, 2) if seconds else None,
        "input_tok_s": round(state["input_tokens"] / seconds, 2) if seconds else None,
    }
