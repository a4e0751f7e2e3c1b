"""Resumable checkpoints: one self-contained folder per saved step, written atomically.

  checkpoints/step-00000120/
    adapter.safetensors   the trainable (LoRA) weights at this step
    best.safetensors      the best adapter so far by validation loss (what the export will be)
    optimizer.pt          optimizer state (AdamW moments)
    rng.pt                torch CPU (and CUDA) generator states
    state.json            step, data position (epoch, batch index), best/patience bookkeeping,
                          counters, and the fingerprint of the recipe + data it belongs to

The learning-rate schedule is a pure function of the step, so the step is its whole state.
A folder only gets its final name once complete, so a run killed mid-save leaves the
previous checkpoint as the newest one. Under FSDP (fsdp.py) the weights and optimizer moments are
gathered into whole tensors before they are written, and cut to each rank's part when read back,
so the files are the same whatever the number of processes that wrote them.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

from stages import io

STEP_RE = re.compile(r"^step-(\d{8})$")
# settings that change neither the weights nor the data order: editing them keeps checkpoints valid
RESUME_NEUTRAL = ("eval_every", "patience", "checkpoint_every", "keep_checkpoints", "resume", "lint_examples",
                  "max_truncated", "preset", "backend")


def fingerprint(recipe: dict[str, Any], examples) -> str:
    """What a checkpoint must match to be resumed: the trajectory-relevant recipe and the token data."""
    train = {k: v for k, v in recipe.get("train", {}).items() if k not in RESUME_NEUTRAL}
    return io.content_hash(io.dumps({**recipe, "train": train, "data": data_hash(examples)}))


def data_hash(examples) -> str:
    """sha256 of io.dumps([[input_ids, labels], ...]), fed one example at a time: the same digest (so older
    checkpoints still resume) without the whole JSON in memory (~0.5 GB for ICD-10-CM's 310k examples)."""
    digest = hashlib.sha256(b"[")
    for i, example in enumerate(examples):
        digest.update(b"," if i else b"")
        digest.update(io.dumps([example.input_ids, example.labels]))
    digest.update(b"]")
    return digest.hexdigest()


def trainable_state(model) -> dict[str, Any]:
    """The trainable (LoRA) weights as whole CPU tensors (under FSDP a collective: every rank calls it)."""
    from stages.train import fsdp

    return {n: fsdp.full(p.detach()).to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, weights: dict[str, Any]) -> None:
    import torch

    from stages.train import fsdp

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(fsdp.shard_like(value, params[name]))


def optimizer_state(optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with whole tensors (under FSDP a collective: every rank calls it)."""
    from stages.train import fsdp

    saved = optimizer.state_dict()
    return {**saved, "state": {i: {k: fsdp.full(v) for k, v in s.items()} for i, s in saved["state"].items()}}


def load_optimizer(optimizer, saved: dict[str, Any]) -> None:
    """Restore what optimizer_state saved; a moment shaped like its parameter becomes that parameter's part."""
    import torch

    from stages.train import fsdp

    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict()'s numbering
    saved["state"] = {i: {k: fsdp.shard_like(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape
                          else v for k, v in s.items()} for i, s in saved["state"].items()}
    optimizer.load_state_dict(saved)


def rng_state() -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def steps(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def latest(root: Path) -> Path | None:
    found = steps(root)
    return found[-1] if found else None


def save(root: Path, step: int, *, model, optimizer, state: dict[str, Any], best: dict[str, Any] | None,
         keep: int, write: bool = True) -> Path:
    """Write a checkpoint; under FSDP every rank calls it (gathering is collective) and one has `write`."""
    import torch
    from safetensors.torch import save_file

    target = root / f"step-{step:08d}"
    weights, moments = trainable_state(model), optimizer_state(optimizer)
    if not write:
        return target
    with io.atomic_dir(target) as tmp:
        save_file(weights, str(tmp / "adapter.safetensors"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        torch.save(moments, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        io.write_json(tmp / "state.json", state)
    prune(root, keep)
    return target


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (any backend's), and no half-written one."""
    for old in steps(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)


def load(path: Path, *, model, optimizer) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore weights, optimizer and RNG from `path`; return (state, best weights or None)."""
    import torch
    from safetensors.torch import load_file

    load_trainable(model, load_file(str(path / "adapter.safetensors")))
    load_optimizer(optimizer, torch.load(path / "optimizer.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
    return io.read_json(path / "state.json"), best
