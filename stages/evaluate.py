"""eval:<adapter> — answer perplexity of the base model vs base + adapter on the test split.

Perplexity is over the answer tokens only (the same mask as training: assistant content
plus its end-of-turn marker), exp(total NLL / total tokens). Both numbers come from the
same loaded base (quantized the same way as in training); the base score is taken with
the adapter disabled. Output: adapters/<adapter>/out/eval.json
  {"adapter", "base_model", "quantization", "device", "dtype", "n_examples", "n_tokens",
   "base_ppl", "adapter_ppl", "base_loss", "adapter_loss", "tasks": {task: {n_examples, n_tokens,
   base_ppl, adapter_ppl}}, "dropped"}
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from stages import io, layout
from stages.errors import StageError


def perplexity_report(examples, base_nll: list[tuple[float, int]], adapter_nll: list[tuple[float, int]]) -> dict:
    """Overall and per-task perplexities from per-example (summed NLL, token count) pairs."""
    def ppl(pairs):  # (perplexity, mean loss)
        tokens = sum(c for _, c in pairs)
        if not tokens:
            return None, None
        loss = sum(s for s, _ in pairs) / tokens
        return math.exp(loss), loss

    by_task: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_task[e.task or "unknown"].append(i)
    tasks = {}
    for task, idx in sorted(by_task.items()):
        b, a = [base_nll[i] for i in idx], [adapter_nll[i] for i in idx]
        tasks[task] = {"n_examples": len(idx), "n_tokens": sum(c for _, c in b),
                       "base_ppl": ppl(b)[0], "adapter_ppl": ppl(a)[0]}
    base_ppl, base_loss = ppl(base_nll)
    adapter_ppl, adapter_loss = ppl(adapter_nll)
    return {"n_examples": len(examples), "n_tokens": sum(c for _, c in base_nll),
            "base_ppl": base_ppl, "adapter_ppl": adapter_ppl, "base_loss": base_loss,
            "adapter_loss": adapter_loss, "tasks": tasks}


def run(cfg, adapter_name: str) -> dict[str, Any]:
    from peft import PeftModel

    from stages.train import base_folder, read_split
    from stages.train import format as fmt
    from stages.train import hardware, torch_backend

    a = cfg.adapters[adapter_name]
    where = str(layout.adapter_toml(adapter_name))
    lora_dir = layout.lora_dir(adapter_name)
    if not layout.lora_weights(adapter_name).exists():
        raise StageError(f"{layout.lora_weights(adapter_name)} is missing; run `doit train:{adapter_name}` first")
    base_dir = base_folder(a.base_model, where)
    rows = read_split(adapter_name, "test")
    limit = a.eval["max_examples"]
    rows = rows[:limit] if limit > 0 else rows
    tokenizer = torch_backend.load_tokenizer(base_dir)
    examples, dropped = fmt.encode_rows(tokenizer, rows, a.train["max_length"])
    if not examples:
        raise StageError(f"{layout.split_file(adapter_name, 'test')} has no usable examples; "
                         f"check the split (or 'train.max_length' in {where})")

    hw = hardware.detect(a.train["dtype"])
    quantization = a.train["quantization"]
    model = PeftModel.from_pretrained(torch_backend.load_model(base_dir, quantization, hw), str(lora_dir))
    pad_id = tokenizer.pad_token_id
    adapter_nll = torch_backend.nll_by_example(model, examples, pad_id, hw)
    with model.disable_adapter():
        base_nll = torch_backend.nll_by_example(model, examples, pad_id, hw)

    report = {"adapter": adapter_name, "base_model": a.base_model, "quantization": quantization,
              "device": hw.device, "dtype": hw.dtype, "dropped": dropped,
              **perplexity_report(examples, base_nll, adapter_nll)}
    io.write_json(layout.eval_file(adapter_name), report)
    print(f"eval:{adapter_name}: {report['n_examples']} examples, {report['n_tokens']} answer tokens: "
          f"ppl base {report['base_ppl']:.3f} -> adapter {report['adapter_ppl']:.3f}")
    return report
