"""What train and lint read: the base model folder, its tokenizer, a split's rows.

A module of its own beneath the package: encoded, torch_backend and lint use these, and the
package (the stage) imports them, so none of them has to import the package back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from stages import io, layout
from stages.errors import StageError


def base_folder(spec: str, where: str) -> Path:
    """The base model folder, with a one-line fix when it is not there."""
    path = layout.base_dir(spec)
    if not (path / "config.json").exists():
        how = ("point it at a Hugging Face model folder" if layout.is_local_model(spec)
               else "run `doit base_model` first")
        raise StageError(f"{where}: key 'base_model' = \"{spec}\": {path}/config.json not found; {how}")
    return path


def load_tokenizer(base_dir: Path):
    """The base model's tokenizer, the one every backend formats with; it must have a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if not tokenizer.chat_template:
        raise StageError(f"{base_dir}: the tokenizer has no chat template; use a chat/instruct base model "
                         "(adapter.toml key 'base_model')")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def iter_split(adapter: str, split: str) -> Iterator[dict[str, Any]]:
    """The split's rows, read as they are used (fails now, not on first use, when the file is missing)."""
    path = layout.split_file(adapter, split)
    if not path.exists():
        raise StageError(f"{path} is missing; run `doit split:{adapter}` first")
    return io.read_jsonl(path)


def read_split(adapter: str, split: str) -> list[dict[str, Any]]:
    return list(iter_split(adapter, split))
