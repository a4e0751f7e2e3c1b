"""Where every stage reads and writes: one place for path rules.

All paths are relative to the project root (the folder holding sources.toml), which
is the working directory of doit and of every stage it runs.
"""
from __future__ import annotations

import re
from pathlib import Path

DATA = Path("data")
ADAPTERS = Path("adapters")
SPLITS = ("train", "val", "test")


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]+", "_", text).strip("_").lower()


def as_named(path: str | Path) -> Path:
    """`path` as the project names it: relative to its root (the working directory) when inside it, absolute
    otherwise. What persists under such a name (doit's state, a file's raw copy) survives the project moving."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve())
    except ValueError:
        return resolved


# --- base models
def base_dir(spec: str) -> Path:
    """The Hugging Face folder for a base model spec.

    `embedded:<name>` and hub ids are materialized under data/base/; a local folder is used as is.
    """
    if is_local_model(spec):
        return Path(spec).expanduser()
    return DATA / "base" / slug(spec)


def is_local_model(spec: str) -> bool:
    """A path (absolute, ./, ../ or ~) names a local folder; anything else is embedded:<name> or a hub id."""
    return spec.startswith(("/", "./", "../", "~"))


def base_weights(spec: str) -> Path:
    return base_dir(spec) / "model.safetensors"


def base_gguf(spec: str) -> Path:
    """One f16 GGUF of the base serves every adapter's LoRA GGUF."""
    return DATA / "gguf" / slug(spec) / "base-f16.gguf"


# --- sources
def raw_dir(source: str) -> Path:
    return DATA / "raw" / source


def raw_manifest(source: str) -> Path:
    return raw_dir(source) / "manifest.json"


def examples_file(source: str) -> Path:
    return DATA / "examples" / f"{source}.jsonl"


def normalize_report(source: str) -> Path:
    """What normalize:<source> made and what it passed over: {"examples", "skipped": {reason: {"count", "first"}}}."""
    return DATA / "examples" / f"{source}.report.json"


# --- dedup and splits
def dedup_dir() -> Path:
    return DATA / "dedup"


def dedup_file() -> Path:
    return dedup_dir() / "kept.jsonl"


def dedup_report() -> Path:
    return dedup_dir() / "report.json"


def dedup_cache(source: str) -> Path:
    """A source's MinHash fingerprints, reused while its examples file is unchanged."""
    return dedup_dir() / "signatures" / f"{source}.npz"


def split_dir(adapter: str) -> Path:
    return DATA / "splits" / adapter


def split_file(adapter: str, split: str) -> Path:
    return split_dir(adapter) / f"{split}.jsonl"


def split_files(adapter: str) -> list[Path]:
    return [split_file(adapter, s) for s in SPLITS]


EXPORT_FORMATS = ("alpaca", "sharegpt")


def split_export_file(adapter: str, fmt: str, split: str) -> Path:
    """The same split in another chat format (alpaca, sharegpt), for other trainers."""
    return split_dir(adapter) / fmt / f"{split}.jsonl"


def split_statistics(adapter: str) -> Path:
    return split_dir(adapter) / "statistics.json"


def dataset_card(adapter: str) -> Path:
    return split_dir(adapter) / "README.md"


def split_ledger(adapter: str) -> Path:
    """Which split every cluster was placed in, so a later run never moves one."""
    return split_dir(adapter) / "assignments.json"


def token_count_cache(tokenizer_hash: str) -> Path:
    return DATA / "cache" / f"tokens-{tokenizer_hash[:16]}.npz"


def eval_base_cache(key: str) -> Path:
    """The base model's figures for one eval computation (stages.evaluate.Judge), by a digest of all it depends on."""
    return DATA / "cache" / "eval_base" / f"{key}.json"


def encoded_cache(adapter: str, split: str) -> Path:
    """A split's token ids and loss labels, shared by lint and train (stages/train/encoded.py)."""
    return DATA / "cache" / "encoded" / adapter / f"{split}.npz"


# --- adapters (trained outputs sit beside adapter.toml, under out/, git-ignored)
def adapter_toml(adapter: str) -> Path:
    return ADAPTERS / adapter / "adapter.toml"


def out_dir(adapter: str) -> Path:
    return ADAPTERS / adapter / "out"


def lora_dir(adapter: str) -> Path:
    return out_dir(adapter) / "lora"


def lora_weights(adapter: str) -> Path:
    return lora_dir(adapter) / "adapter_model.safetensors"


def metrics_file(adapter: str) -> Path:
    """Live JSON lines while training (the dashboard tails it); complete once train finishes."""
    return out_dir(adapter) / "metrics.jsonl"


def checkpoints_dir(adapter: str) -> Path:
    """Resumable training checkpoints (one self-contained folder per saved step), removed when training ends."""
    return out_dir(adapter) / "checkpoints"


def tensorboard_dir(adapter: str) -> Path:
    return out_dir(adapter) / "tensorboard"


def lint_report(adapter: str) -> Path:
    """What `lint:<adapter>` checked: a few rendered examples with trained tokens marked, and the counts."""
    return out_dir(adapter) / "lint.txt"


def eval_file(adapter: str) -> Path:
    return out_dir(adapter) / "eval.json"


def gguf_dir(adapter: str) -> Path:
    return out_dir(adapter) / "gguf"


def verify_file(adapter: str) -> Path:
    """The export's verification figures (HF+peft vs each GGUF); written only when every check passed."""
    return gguf_dir(adapter) / "verify.json"


def modelfile(adapter: str) -> Path:
    """Ollama Modelfile for the verified export (`ollama create <name> -f <it>`)."""
    return gguf_dir(adapter) / "Modelfile"


def report_file(adapter: str) -> Path:
    return ADAPTERS / adapter / "report.md"


def report_plot(adapter: str, name: str) -> Path:
    """PNG plots that report.md links to (beside it, so the links work wherever it is read)."""
    return ADAPTERS / adapter / "report" / f"{name}.png"


def matrix_file() -> Path:
    """One eval matrix across every adapter."""
    return ADAPTERS / "README.md"


def lora_gguf(adapter: str) -> Path:
    return out_dir(adapter) / "gguf" / "lora-f16.gguf"


def merged_gguf(adapter: str, quant: str) -> Path:
    return out_dir(adapter) / "gguf" / f"merged-{quant}.gguf"


# --- logs and events
def log_file(task: str) -> Path:
    return DATA / "logs" / f"{slug(task.replace(':', '_'))}.log"


def progress_file(task: str) -> Path:
    """A running task's progress (stages/progress.py): what part it is in and how far, for the dashboard."""
    return DATA / "progress" / f"{slug(task.replace(':', '_'))}.json"


def events_file() -> Path:
    return DATA / "events.jsonl"


def doit_db() -> Path:
    return DATA / ".doit.sqlite"


def run_lock() -> Path:
    """The project's run lock (stages/lock.py): who runs doit now, or ran it last."""
    return DATA / "run.lock"


def run_log() -> Path:
    """doit's own console output for the current/last detached run."""
    return DATA / "logs" / "run.log"
