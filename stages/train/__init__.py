"""train:<adapter> — a LoRA (or QLoRA) adapter on the adapter's train split.

Reads data/splits/<adapter>/{train,val}.jsonl and the base model folder; writes
adapters/<adapter>/out/lora/ (peft adapter + tokenizer + train_summary.json, atomically)
and streams adapters/<adapter>/out/metrics.jsonl while it runs.

Modules: inputs (base folder, tokenizer, split rows), format (chat template -> ids + loss mask),
hardware (device/dtype), metrics (the JSONL stream, TensorBoard, progress), packing (batches), checkpoint (resume),
loop (the one training loop), torch_backend and mlx_backend (what the loop calls: loop.Backend),
distributed and fsdp (torch's multi-process), lint (the mask/template checks).
Another backend implements loop.Backend and plugs in at `BACKENDS` and the dispatch in `run`.
"""
from __future__ import annotations

import contextlib
from typing import Any

from stages import io, layout
from stages.errors import StageError
from stages.train.inputs import base_folder, iter_split, load_tokenizer, read_split  # noqa: F401 (the stage's API)

BACKENDS = ("torch", "mlx")  # "auto": mlx on Apple silicon when it is installed, torch otherwise


def resolve_backend(requested: str, where: str) -> str:
    from stages.train import mlx_backend  # light: mlx itself is imported only when training

    if requested == "mlx":
        mlx_backend.require(where)
        return "mlx"
    if requested == "auto" and mlx_backend.preferred():
        return "mlx"
    if requested in ("auto", "torch"):
        return "torch"
    raise StageError(f"{where}: key 'train.backend' = \"{requested}\" is not available yet; "
                     "set it to \"torch\" or \"auto\"")


def run(cfg, adapter_name: str) -> dict[str, Any]:
    """Read and encode the splits once, then hand them to the recipe's backend (same inputs, same outputs)."""
    from stages.train import format as fmt
    from stages.train import loop
    from stages.train.distributed import launched_rank
    from stages.train.encoded import encode_split
    from stages.train.metrics import MetricsStream

    a = cfg.adapters[adapter_name]
    where = str(layout.adapter_toml(adapter_name))
    backend = resolve_backend(a.train["backend"], where)
    base_dir = base_folder(a.base_model, where)
    val_rows = contextlib.closing(iter_split(adapter_name, "val"))
    tokenizer = load_tokenizer(base_dir)
    max_length = a.train["max_length"]
    encoded = encode_split(tokenizer, base_dir, adapter_name, "train", max_length)  # cached: lint encoded it
    if not encoded:
        raise StageError(f"{layout.split_file(adapter_name, 'train')} has no examples; check the adapter's "
                         f"sources in sources.toml and 'data.tasks' in {where}")
    train_examples = [example for example, _ in encoded if example.n_trained]
    dropped = len(encoded) - len(train_examples)
    # the loop validates on the first VAL_MAX_EXAMPLES examples only: encode no more val rows than that
    with val_rows as rows:
        val_examples, _ = fmt.encode_rows(tokenizer, rows, max_length, limit=loop.VAL_MAX_EXAMPLES)
    if not train_examples:
        raise StageError(f"{where}: every training example lost its answer to truncation at "
                         f"'train.max_length' = {max_length}; raise it")
    say = print if launched_rank() == 0 else (lambda *_: None)  # one log, not one per process
    say(f"train:{adapter_name}: mask check (trained text in [[ ]]):\n{fmt.describe(tokenizer, train_examples[0])}")

    train_cfg = {**a.train, "backend": backend}
    if backend == "mlx":
        from stages.train import mlx_backend
        hw = mlx_backend.detect(a.train["dtype"])
        engine = mlx_backend.MLXBackend(base_dir, tokenizer, a.lora, train_cfg, hw)
    else:
        from stages.train import distributed, hardware, torch_backend
        hw = hardware.detect(a.train["dtype"])
        if distributed.launched_world_size() == 1:
            import torch
            gpus = torch.cuda.device_count() if hw.device == "cuda" else 1
            if gpus > 1 or a.train["nnodes"] > 1:
                return relaunch(adapter_name, gpus, a.train, where)
        engine = torch_backend.TorchBackend(base_dir, tokenizer, a.lora, train_cfg, hw)
    metrics = MetricsStream(layout.metrics_file(adapter_name), hw.device, layout.tensorboard_dir(adapter_name))
    summary = loop.train(
        engine, name=adapter_name, base_model=a.base_model, lora=a.lora, train_cfg=train_cfg,
        train_examples=train_examples, val_examples=val_examples, dropped=dropped, metrics=metrics,
        out_dir=layout.lora_dir(adapter_name), checkpoint_dir=layout.checkpoints_dir(adapter_name))
    loss = {k: "–" if summary[k] is None else f"{summary[k]:.4f}" for k in ("start_val_loss", "end_val_loss",
                                                                         "best_val_loss")}
    say(f"train:{adapter_name}: val loss {loss['start_val_loss']} -> {loss['end_val_loss']} "
        f"(best {loss['best_val_loss']} at step {summary['best_step']}, exported), "
        f"{summary['tok_s']} trained tok/s -> {layout.lora_dir(adapter_name)}")
    return summary


def relaunch(adapter_name: str, gpus: int, train_cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """More than one GPU, or more than one machine: run this stage again as one process per GPU on this node
    (torchrun, as `accelerate launch` does) and return what rank 0 wrote. The processes train data-parallel,
    or with an nf4 base shard it with FSDP (torch_backend decides)."""
    import os
    import subprocess
    import tempfile

    from stages.train import distributed

    nnodes, master = train_cfg["nnodes"], train_cfg["master"]
    if nnodes > 1 and not master:
        raise StageError(f"{where}: 'train.nnodes' = {nnodes} needs 'train.master' = \"host:port\", an address "
                         "of node 0 that the other nodes can reach and a free port there")
    node = distributed.node_rank(nnodes)
    span = f"node {node} of {nnodes} (master {master}), " if nnodes > 1 else ""
    print(f"train:{adapter_name}: {span}{gpus} process(es) here: relaunching under torchrun "
          "(data-parallel; FSDP for nf4)")
    with tempfile.TemporaryDirectory(prefix="medforge-torchrun-") as tmp:  # torchrun's torchelastic_* folders
        code = subprocess.run(distributed.launch_command(gpus, nnodes, master, node),
                              env={**os.environ, "TMPDIR": tmp}).returncode  # land here, and go with it
    if code != 0:
        raise StageError(f"train:{adapter_name}: the multi-process run failed (its log is above); "
                         + ("check that every node runs the same commit and data and reaches train.master"
                            if nnodes > 1 else "set CUDA_VISIBLE_DEVICES to one GPU to train in a single process"))
    summary = layout.lora_dir(adapter_name) / "train_summary.json"
    if node != 0 and not summary.exists():  # rank 0 writes on node 0; a shared filesystem would show it here too
        print(f"train:{adapter_name}: node {node} done; node 0 wrote the adapter and its checkpoints")
        return {"node": node}
    return io.read_json(summary)
