"""The training loop, once for every backend (mlx-lm's tuner/trainer.py is the model).

The loop owns the recipe: a linear warmup then cosine decay of the learning rate, batches from
packing.BatchStream accumulated over `grad_accum` micro-batches (the step's loss is the mean over its
trained tokens), validation at the start, every `eval_every` steps and at the end, the best adapter by
validation loss (the one saved), early stopping after `patience` validations without a new best,
checkpoints every `checkpoint_every` steps that a killed run resumes from on the same trajectory, the
metrics stream and the summary. A backend (torch_backend, mlx_backend) is the small object it calls:
it knows its framework, devices and processes; the loop knows none of them.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

from stages import io
from stages.train import checkpoint
from stages.train.format import Encoded
from stages.train.hardware import Hardware
from stages.train.metrics import Progress, run_summary
from stages.train.packing import BatchStream

VAL_TIMES = 4            # with eval_every = 0: validation this many times during training, plus at the start
VAL_MAX_EXAMPLES = 200   # enough for a stable loss without dominating CPU runs ...
VAL_TOKENS = 24_000      # ... or fewer, once this many trained tokens: long answers (a NEWS2 chart's, ~170 tokens)
#                          give as stable a loss from fewer rows (145 of 200), and each pass costs what its rows hold
MAX_GRAD_NORM = 1.0      # both backends clip the step's gradient to this norm


def validation_set(examples: list[Encoded]) -> list[Encoded]:
    """The first VAL_MAX_EXAMPLES examples, fewer where VAL_TOKENS trained tokens come sooner."""
    out, tokens = [], 0
    for example in examples[:VAL_MAX_EXAMPLES]:
        if tokens >= VAL_TOKENS:
            break
        out.append(example)
        tokens += example.n_trained
    return out


def pending_validations(done: int, steps: int, every: int) -> int:
    """The validations still to run once step `done` is taken (its own included): every `every` steps and the last."""
    return steps // every - (done - 1) // every + (1 if steps % every else 0)


def total_steps(n_batches: int, grad_accum: int, epochs: int, max_steps: int) -> int:
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * n_batches / grad_accum))


def cosine_lr(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Backend(Protocol):
    """What the loop calls. Every process of a multi-process run runs the loop; rank 0 logs and writes files,
    and the calls marked collective are made by every rank, in the same order."""
    name: str                # "torch" | "mlx": `backend` in the start line and the summary
    hw: Hardware
    rank: int                # this process, 0 when alone
    world_size: int
    parallelism: str         # "single" | "ddp" | "fsdp"
    packing: bool            # examples packed into rows (else bucketed by length)
    recipe: dict[str, Any]   # what the backend adds to the checkpoint fingerprint
    checkpoint_subdir: str   # its checkpoints' folder inside the checkpoint folder ("" for the folder itself)
    trainable_params: int    # set by load
    description: str         # the start log line's account of device, dtype, quantization and batches

    def load(self, examples: list[Encoded]) -> None: ...
    def step(self, micro: list[list[Encoded]], step_tokens: int, lr: float, step: int) -> tuple[float, float]:
        """Forward, backward and optimizer update over one step's micro-batches (this rank's share), each
        micro-batch's summed loss divided by `step_tokens` (all ranks'); returns (step loss, gradient norm)."""
    def val_loss(self, examples: list[Encoded]) -> float: ...   # token-weighted mean NLL (collective)
    def snapshot(self) -> Any: ...                                # the trainable weights now (collective)
    def save_checkpoint(self, folder: Path, step: int, best: Any, state: dict[str, Any], keep: int) -> None:
        """Write folder/step-NNNNNNNN (state.json holds `state`) and keep the newest `keep` (collective)."""
    def restore_checkpoint(self, path: Path) -> Any: ...        # weights, optimizer, RNG; returns the best weights
    def save_adapter(self, folder: Path | None, best: Any) -> None:
        """Save `best` (or the weights now, without one) as the adapter in `folder`; None on ranks that
        do not write (collective)."""
    def memory(self) -> dict[str, int]: ...                      # the run's memory figures for the summary
    def barrier(self) -> None: ...
    def agree(self, flag: bool) -> bool: ...                     # rank 0's decision, on every rank


def resumable(folder: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint of this recipe and data, or None."""
    for path in reversed(checkpoint.steps(folder)):
        if io.read_json(path / "state.json").get("fingerprint") == fingerprint:
            return path
    return None


def train(backend: Backend, *, name: str, base_model: str, lora: dict[str, Any], train_cfg: dict[str, Any],
          train_examples: list[Encoded], val_examples: list[Encoded], dropped: int, metrics, out_dir: Path,
          checkpoint_dir: Path | None = None, log=print) -> dict[str, Any]:
    """Train `backend`'s adapter on `train_examples`; write the best one atomically into `out_dir`; return the
    summary (also in `out_dir`/train_summary.json and the stream's end line)."""
    main = backend.rank == 0
    say = log if main else (lambda *_: None)
    hw = backend.hw
    backend.load(train_examples)

    seed, batch_size, accum = train_cfg["seed"], train_cfg["batch_size"], train_cfg["grad_accum"]
    stream = BatchStream(train_examples, batch_size, seed, backend.rank, backend.world_size)
    steps = total_steps(stream.batches_per_epoch, accum, train_cfg["epochs"], train_cfg["max_steps"])
    warmup = math.ceil(train_cfg["warmup_ratio"] * steps)
    eval_every = train_cfg.get("eval_every") or max(1, steps // VAL_TIMES)
    checkpoint_every = train_cfg.get("checkpoint_every") or eval_every
    patience = train_cfg.get("patience", 0)
    val_examples = validation_set(val_examples)
    fingerprint = checkpoint.fingerprint({**backend.recipe, "base_model": base_model, "lora": lora,
                                          "train": train_cfg}, train_examples)

    state: dict[str, Any] = {"step": 0, "epoch": 1, "best_val_loss": None, "best_step": None, "bad_evals": 0,
                             "start_val_loss": None, "end_val_loss": None, "stopped_early": False,
                             "tokens": 0, "input_tokens": 0, "train_seconds": 0.0}
    best = None
    folder = Path(checkpoint_dir) / backend.checkpoint_subdir if checkpoint_dir is not None else None
    resume = folder is not None and train_cfg.get("resume", True)
    resumed_from = resumable(folder, fingerprint) if resume else None
    if resumed_from is not None:
        best = backend.restore_checkpoint(resumed_from)
        saved = io.read_json(resumed_from / "state.json")
        state.update(saved["loop"])
        stream = BatchStream(train_examples, batch_size, seed, backend.rank, backend.world_size, **saved["data"])
    elif folder is not None and main:
        if resume and checkpoint.steps(folder):
            say(f"train:{name}: checkpoints in {folder} belong to another recipe or data; starting over")
        shutil.rmtree(folder, ignore_errors=True)
    backend.barrier()

    if main:
        if resumed_from is not None:
            metrics.resume(state["step"], str(resumed_from))
            say(f"train:{name}: resuming at step {state['step']}/{steps} from {resumed_from}")
        else:
            metrics.start(total_steps=steps, n_train=len(train_examples), n_val=len(val_examples), dropped=dropped,
                          device=hw.device, dtype=hw.dtype, dtype_reason=hw.reason, backend=backend.name,
                          quantization=train_cfg["quantization"], trainable_params=backend.trainable_params,
                          packing=backend.packing, world_size=backend.world_size, parallelism=backend.parallelism,
                          eval_every=eval_every, patience=patience)
    say(f"train:{name}: {len(train_examples)} examples ({dropped} dropped), {steps} steps, {backend.description}")

    validations = {"runs": 0, "seconds": 0.0}  # their pace, for the ETA: a validation can cost several steps

    def validate(step: int) -> None:
        nonlocal best
        if not val_examples:
            return
        t0 = time.perf_counter()
        loss = backend.val_loss(val_examples)
        validations["runs"] += 1
        validations["seconds"] += time.perf_counter() - t0
        state["end_val_loss"] = loss
        if state["start_val_loss"] is None:
            state["start_val_loss"] = loss
        if state["best_val_loss"] is None or loss < state["best_val_loss"]:
            state.update(best_val_loss=loss, best_step=step, bad_evals=0)
            best = backend.snapshot()
        else:
            state["bad_evals"] += 1
        if main:
            metrics.val(step, steps, loss, state["best_val_loss"], state["best_step"])
            say(f"train:{name}: step {step}/{steps} val_loss {loss:.4f} (best {state['best_val_loss']:.4f} "
                f"at step {state['best_step']})")

    if resumed_from is None:
        validate(0)
    progress = Progress(name, steps, initial=state["step"]) if main else None
    timed_seconds, timed_steps = 0.0, 0  # this process's steps: a resumed run's ETA
    while state["step"] < steps:
        step = state["step"]
        lr = cosine_lr(step, steps, warmup, train_cfg["lr"])
        t0 = time.perf_counter()
        micro = [stream.next() for _ in range(accum)]  # (epoch, this rank's share, the whole global batch)
        epoch = micro[-1][0]
        tokens = sum(e.n_trained for _, _, whole in micro for e in whole)  # all ranks': the loss denominator
        input_tokens = sum(len(e.input_ids) for _, _, whole in micro for e in whole)
        loss, grad_norm = backend.step([mine for _, mine, _ in micro], tokens, lr, step)
        step_seconds = time.perf_counter() - t0
        timed_seconds, timed_steps = timed_seconds + step_seconds, timed_steps + 1
        done = step + 1
        state.update(step=done, epoch=epoch)
        state["train_seconds"] += step_seconds
        state["tokens"] += tokens
        state["input_tokens"] += input_tokens
        if main:
            pending = pending_validations(done, steps, eval_every) if val_examples else 0
            row = metrics.step(done, steps, loss, lr, tokens, input_tokens, step_seconds, timed_seconds, epoch,
                               grad_norm=grad_norm, steps_timed=timed_steps,
                               pending_seconds=pending * validations["seconds"] / max(1, validations["runs"]))
            progress.update(done, loss, row["tok_s"], row["eta_s"])
        if done % eval_every == 0 or done == steps:
            validate(done)
            if patience and state["bad_evals"] >= patience and done < steps:
                state["stopped_early"] = True
        state["stopped_early"] = backend.agree(state["stopped_early"])
        if state["stopped_early"]:
            say(f"train:{name}: early stop at step {done}: {patience} validations without a new best")
            break
        if folder is not None and done % checkpoint_every == 0 and done < steps:
            backend.save_checkpoint(folder, done, best, keep=train_cfg.get("keep_checkpoints", 2),
                                    state={"fingerprint": fingerprint, "loop": state, "data": stream.position()})
            backend.barrier()
    if progress is not None:
        progress.close()

    summary = run_summary(
        state=state, hw=hw, adapter=name, base_model=base_model, backend=backend.name,
        quantization=train_cfg["quantization"], steps=steps, n_train=len(train_examples), n_val=len(val_examples),
        dropped=dropped, resumed_from=str(resumed_from) if resumed_from else None, packing=backend.packing,
        world_size=backend.world_size, parallelism=backend.parallelism, trainable_params=backend.trainable_params,
        memory=backend.memory(), lora=lora, train=train_cfg)
    with io.atomic_dir(out_dir) if main else contextlib.nullcontext() as tmp:
        backend.save_adapter(tmp, best)  # the exported adapter is the best one by validation loss
        if tmp is not None:
            io.write_json(tmp / "train_summary.json", summary)
    if main:
        metrics.end(state["step"], summary)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # finished: the adapter is out
    backend.barrier()
    return summary
