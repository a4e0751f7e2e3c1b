"""A throwaway project with a tiny base, a peft LoRA and every GGUF export built, once per test session.

Shared by test_export.py and test_chat.py. Paths under it follow stages.layout, relative
to `root`: chdir there (monkeypatch.chdir) before calling stages that resolve them.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

from tests.models import make_tiny_model, smollm2_tokenizer

ADAPTER = "demo"
UNTRAINED = "untrained"   # an adapter with no LoRA yet
SOURCES_TOML = f"""
[sources.news2]
kind = "news2"
adapters = ["{ADAPTER}", "{UNTRAINED}"]
[sources.news2.params]
count = 10
"""


def adapter_toml(base: Path, merged: str = '["q8_0"]') -> str:
    return f'base_model = "{base}"\n[lora]\nr = 4\nalpha = 8\n[export]\nmerged = {merged}\n'


def make_lora(base: Path, out: Path, seed: int = 1, scale: float = 0.6, r: int = 4, base_tokenizer: bool = False
              ) -> None:
    """A peft LoRA on every linear layer, with non-zero B matrices so it changes the logits; saved with the
    SmolLM2 tokenizer, or with the base folder's own (`base_tokenizer`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # lora_A's init draws from the global generator
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out))
    if base_tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    else:
        smollm2_tokenizer().save_pretrained(str(out))


def write_project(root: Path) -> Path:
    """sources.toml + adapters/{demo,untrained}/adapter.toml on a tiny base at root/base; returns the base."""
    base = make_tiny_model(root / "base")
    (root / "sources.toml").write_text(SOURCES_TOML)
    for name in (ADAPTER, UNTRAINED):
        (root / "adapters" / name).mkdir(parents=True, exist_ok=True)
        (root / "adapters" / name / "adapter.toml").write_text(adapter_toml(base))
    return base


@functools.lru_cache(maxsize=1)
def exported_project() -> Path:
    """Project root with base GGUF, demo's LoRA GGUF and merged q8_0 GGUF built by the real stages."""
    from stages import config, export, layout

    root = Path(tempfile.mkdtemp(prefix="medforge-gguf-project-"))
    atexit.register(shutil.rmtree, root, True)
    base = write_project(root)
    old = os.getcwd()
    os.chdir(root)
    try:
        make_lora(base, layout.lora_dir(ADAPTER))
        cfg = config.load(root)
        export.run_base(cfg, str(base))
        export.run(cfg, ADAPTER)
    finally:
        os.chdir(old)
    return root
