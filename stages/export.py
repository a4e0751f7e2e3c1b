"""base_gguf:<base> and export:<adapter> — GGUF files for llama.cpp, Ollama and LM Studio.

Conversion and quantization are llama.cpp's own (stages.llamacpp: the converter scripts
vendored in the installed llama-cpp-python's sdist, and `llama_model_quantize`), never a
converter of ours.

  run_base(cfg, spec)     layout.base_dir(spec) (HF folder)  -> layout.base_gguf(spec), f16
  run(cfg, adapter)       layout.lora_dir(adapter) (peft)    -> layout.lora_gguf(adapter), f16 LoRA GGUF
                                                                 applied on the base GGUF at load time
                          base + LoRA merged (merge_and_unload) -> layout.merged_gguf(adapter, q) for
                                                                 each q in [export] merged

Every GGUF is written to a temporary sibling, loaded in llama-cpp-python and made to
generate (`check_gguf`), and only then renamed into place: a target that exists loads.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from stages import io, layout
from stages.errors import StageError
from stages import llamacpp

CHECK_PROMPT = "The patient presents with"


def _need(path: Path, what: str, task: str) -> None:
    if not path.exists():
        raise StageError(f"{path}: {what} not found; build it first (`doit {task}`)")


def _base_task(spec: str) -> str:
    return f"base_model:{layout.slug(spec)}"


def check_gguf(model_path: Path, lora_path: Path | None = None, n_tokens: int = 4) -> list[float]:
    """Load a GGUF (plus a LoRA GGUF) in llama-cpp-python, generate a few tokens; return the prompt's last logits.

    Raises StageError when it does not load, or its logits are not finite.
    """
    import math

    from llama_cpp import Llama

    what = f"{model_path}" + (f" + {lora_path}" if lora_path else "")
    try:
        llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                    n_ctx=256, n_batch=64, verbose=False, seed=0)
    except (ValueError, RuntimeError) as exc:
        raise StageError(f"{what}: llama-cpp-python cannot load it ({exc}); re-run the export") from None
    try:
        tokens = llm.tokenize(CHECK_PROMPT.encode())
        llm.eval(tokens)
        logits = [float(x) for x in llm.scores[llm.n_tokens - 1]]
        if not all(math.isfinite(x) for x in logits):
            raise StageError(f"{what}: non-finite logits from llama.cpp; the export is broken, re-run it")
        llm.reset()
        llm.create_completion(CHECK_PROMPT, max_tokens=n_tokens, temperature=0.0)
    finally:
        llm.close()
    return logits


def run_base(cfg, spec: str) -> Path:
    src = layout.base_dir(spec)
    _need(src / "config.json", "base model folder", _base_task(spec))
    target = layout.base_gguf(spec)
    with io.atomic_path(target) as tmp:
        llamacpp.convert_hf(src, tmp, "f16")
        check_gguf(tmp)
    print(f"base_gguf: {src} -> {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    return target


def _tokenizer_source(adapter_name: str, base_dir: Path) -> Path:
    """Training saves the tokenizer it used beside the LoRA; older runs may not have."""
    lora = layout.lora_dir(adapter_name)
    return lora if (lora / "tokenizer_config.json").exists() else base_dir


def merge_lora(base_dir: Path, lora_dir: Path, out: Path, tokenizer_dir: Path) -> None:
    """Base + LoRA folded into plain weights (fp32 on CPU), saved as an HF folder with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))


def export_lora(adapter_name: str, base_dir: Path, base_gguf: Path) -> Path:
    target = layout.lora_gguf(adapter_name)
    with io.atomic_path(target) as tmp:
        llamacpp.convert_lora(layout.lora_dir(adapter_name), base_dir, tmp, "f16")
        check_gguf(base_gguf, lora_path=tmp)
    print(f"export:{adapter_name}: LoRA -> {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    return target


def export_merged(adapter_name: str, base_dir: Path, quants: list[str]) -> list[Path]:
    if not quants:
        return []
    out_dir = layout.out_dir(adapter_name)
    targets = []
    # big temporaries beside the targets: same disk, and removed even when a step fails
    with tempfile.TemporaryDirectory(prefix=".merge.", dir=out_dir) as tmp:
        merged_dir, f16 = Path(tmp) / "hf", Path(tmp) / "merged-f16.gguf"
        merge_lora(base_dir, layout.lora_dir(adapter_name), merged_dir, _tokenizer_source(adapter_name, base_dir))
        if any(q != "bf16" for q in quants):
            llamacpp.convert_hf(merged_dir, f16, "f16")
        # f16 last: its file is moved into place, after the quantizations have read it
        for quant in sorted(quants, key=lambda q: q == "f16"):
            target = layout.merged_gguf(adapter_name, quant)
            with io.atomic_path(target) as out:
                if quant == "f16":
                    f16.replace(out)
                elif quant == "bf16":
                    # straight from the fp32 merge: going through f16 would lose range for nothing
                    llamacpp.convert_hf(merged_dir, out, "bf16")
                else:
                    llamacpp.quantize(f16, out, quant)
                check_gguf(out)
            print(f"export:{adapter_name}: merged {quant} -> {target} ({target.stat().st_size / 2**20:.1f} MiB)")
            targets.append(target)
    return targets


def run(cfg, adapter_name: str) -> list[Path]:
    if adapter_name not in cfg.adapters:
        raise StageError(f"adapters/{adapter_name}/adapter.toml not found; known adapters: "
                         f"{', '.join(sorted(cfg.adapters)) or 'none'}")
    a = cfg.adapters[adapter_name]
    base_dir = layout.base_dir(a.base_model)
    _need(base_dir / "config.json", "base model folder", _base_task(a.base_model))
    _need(layout.lora_weights(adapter_name), "trained LoRA adapter", f"train:{adapter_name}")
    base_gguf = layout.base_gguf(a.base_model)
    _need(base_gguf, "base GGUF", f"base_gguf:{layout.slug(a.base_model)}")
    return [export_lora(adapter_name, base_dir, base_gguf)] + export_merged(adapter_name, base_dir,
                                                                             list(a.export["merged"]))
