"""train:<adapter> — a LoRA (or QLoRA) adapter on the adapter's train split.

Reads data/splits/<adapter>/{train,val}.jsonl and the base model folder; writes
adapters/<adapter>/out/lora/ (peft adapter + tokenizer + train_summary.json, atomically)
and streams adapters/<adapter>/out/metrics.jsonl while it runs.

Modules: format (chat template -> ids + loss mask), hardware (device/dtype), metrics
(the JSONL stream), torch_backend (the loop). Another backend plugs in at `BACKENDS`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages import io, layout
from stages.errors import StageError

BACKENDS = ("torch",)  # "mlx" comes later; "auto" resolves among these


def resolve_backend(requested: str, where: str) -> str:
    if requested in ("auto", "torch"):
        return "torch"
    raise StageError(f"{where}: key 'train.backend' = \"{requested}\" is not available yet; "
                     "set it to \"torch\" or \"auto\"")


def base_folder(spec: str, where: str) -> Path:
    """The base model folder, with a one-line fix when it is not there."""
    path = layout.base_dir(spec)
    if not (path / "config.json").exists():
        how = ("point it at a Hugging Face model folder" if layout.is_local_model(spec)
               else "run `doit base_model` first")
        raise StageError(f"{where}: key 'base_model' = \"{spec}\": {path}/config.json not found; {how}")
    return path


def read_split(adapter: str, split: str) -> list[dict[str, Any]]:
    path = layout.split_file(adapter, split)
    if not path.exists():
        raise StageError(f"{path} is missing; run `doit split:{adapter}` first")
    return list(io.read_jsonl(path))


def run(cfg, adapter_name: str) -> dict[str, Any]:
    from stages.train import format as fmt
    from stages.train import hardware
    from stages.train.metrics import MetricsStream

    a = cfg.adapters[adapter_name]
    where = str(layout.adapter_toml(adapter_name))
    backend = resolve_backend(a.train["backend"], where)
    base_dir = base_folder(a.base_model, where)
    train_rows, val_rows = read_split(adapter_name, "train"), read_split(adapter_name, "val")
    if not train_rows:
        raise StageError(f"{layout.split_file(adapter_name, 'train')} has no examples; check the adapter's "
                         f"sources in sources.toml and 'data.tasks' in {where}")

    from stages.train import torch_backend
    tokenizer = torch_backend.load_tokenizer(base_dir)
    max_length = a.train["max_length"]
    train_examples, dropped = fmt.encode_rows(tokenizer, train_rows, max_length)
    val_examples, _ = fmt.encode_rows(tokenizer, val_rows, max_length)
    if not train_examples:
        raise StageError(f"{where}: every training example lost its answer to truncation at "
                         f"'train.max_length' = {max_length}; raise it")
    print(f"train:{adapter_name}: mask check (trained text in [[ ]]):\n{fmt.describe(tokenizer, train_examples[0])}")

    hw = hardware.detect(a.train["dtype"])
    metrics = MetricsStream(layout.metrics_file(adapter_name), hw.device)
    with io.atomic_dir(layout.lora_dir(adapter_name)) as tmp:
        summary = torch_backend.train(
            name=adapter_name, base_model=a.base_model, lora=a.lora, train_cfg={**a.train, "backend": backend},
            base_dir=base_dir, tokenizer=tokenizer, train_examples=train_examples, val_examples=val_examples, dropped=dropped,
            hw=hw, metrics=metrics, out_dir=tmp)
        io.write_json(tmp / "train_summary.json", summary)
    print(f"train:{adapter_name}: val loss {summary['start_val_loss']} -> {summary['end_val_loss']}, "
          f"{summary['tok_s']} trained tok/s -> {layout.lora_dir(adapter_name)}")
    return summary
