"""Tiny real models and adapter configs for tests.

`make_tiny_model(path)` writes a randomly initialised 2-layer Llama with the real SmolLM2
tokenizer and chat template as a local Hugging Face folder, in a few seconds. Point an
adapter.toml `base_model` at its absolute path to run training, eval or export on it.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 2048}


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer_dir() -> Path:
    """The embedded SmolLM2 tokenizer (from the GGUF), saved once per test session."""
    from stages.base_model import embedded_tokenizer

    folder = session_tempdir("medforge-smollm2-tok-")
    embedded_tokenizer().save_pretrained(str(folder))
    return folder


def smollm2_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))


def make_tiny_model(path: str | Path, seed: int = 0, **shape) -> Path:
    """A random tiny Llama with the SmolLM2 tokenizer (TINY, with `shape` fields laid over it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **{**TINY, **shape})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # tied embeddings at the default 0.02 scale cap every logit near 1, so no adapter could
        # make any token likely; at 0.2 a LoRA on the layers can fit a small dataset in seconds
        model.get_input_embeddings().weight.mul_(10)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def adapter_config(root: str | Path, name: str, toml_text: str):
    """Write adapters/<name>/adapter.toml under `root` and return a Config holding just that adapter.

    Stages resolve paths relative to the working directory: chdir to `root` before running them.
    """
    from stages import config, io

    root = Path(root)
    path = root / "adapters" / name / "adapter.toml"
    # atomically: every rank of a multi-process run writes it and reads it back, and a plain write truncates the
    # file under another rank's read (which then saw no base_model and failed one run in a few)
    io.write_text(path, toml_text)
    problems: list[str] = []
    adapter = config.load_adapter(root, path, problems)
    if problems:
        raise config.ConfigError(problems)
    return config.Config(root=root, sources={}, adapters={name: adapter}, dedup={})


@functools.lru_cache(maxsize=1)
def smollm2_base_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct materialized as an HF folder, once per test session (slow tests)."""
    from stages.base_model import materialize

    return materialize("embedded:smollm2-135m-instruct", session_tempdir("medforge-smollm2-") / "base")


def session_tempdir(prefix: str) -> Path:
    """A temp folder removed when the test session ends (the SmolLM2 copy alone is ~500 MB)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, True)
    return folder
