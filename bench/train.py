"""LoRA training throughput: medforge against the users' recipe and TRL, same data, model and dtype, one run.

Data: NEWS2 conversations from the project's own generator (stages/sources/news2.py), rendered
with the base tokenizer's chat template. Model: the embedded SmolLM2-135M-Instruct (or --base).
All three train the same LoRA (r=16 on q,k,v,o,gate,up,down; dropout 0.05) with AdamW, in the
dtype `stages.train.hardware.detect()` picks for this machine (fp32 autocast-free or bf16).

- medforge: `torch_backend` — packed rows (block-diagonal attention), output head only where
  a token is trained, loss on assistant tokens incl. <|im_end|>.
- users_recipe: HF `Trainer`, every example tokenized with padding="max_length" to 2048 and
  labels = input_ids (prompt and padding trained too).
- trl_packing: TRL `SFTTrainer` with packing=True (BFD, padding-free positions) on a
  prompt/completion dataset, so it trains on the same completion tokens as medforge.

Throughput counts trained non-pad tokens per second over timed optimizer steps (the first step
of each is a warm-up and not timed): medforge and TRL train the completion tokens; the users'
recipe trains every real token. `*_input_tok_s` count every non-pad token processed.

`mfu` = medforge's model FLOPs per second / this machine's matmul peak for the dtype (a square
matmul timed in this run). Model FLOPs of a LoRA step, per processed token: forward 2*N of the
frozen body + backward 2*N (input gradients; frozen weights need no weight gradients) + 6*N of
the LoRA weights + causal attention over each example's own context (forward 4*d*ctx per layer,
backward twice that); the output head (2*V*d forward, 2*V*d backward) only at trained positions,
which is all medforge computes there.

    python bench/train.py [--steps 4] [--examples 256] [--base DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
USERS_LENGTH = 2048


def news2_rows(n: int) -> list[dict]:
    from stages.sources import make
    from stages.sources.news2 import generate_patient

    source = make("news2", "news2", {})
    rows = []
    for i in range(n):
        for example in source.examples(generate_patient(0, i)):
            rows.append({"messages": example["messages"], "task": example["task"]})
            if len(rows) == n:
                return rows
    return rows


def matmul_peak(dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square matmuls (other load only slows it, so the best is the peak)."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def step_flops(config, n_lora: int, lengths: list[int], trained: int) -> float:
    """Model FLOPs of one LoRA optimizer step over examples of `lengths` with `trained` trained tokens."""
    d, layers = config.hidden_size, config.num_hidden_layers
    inter, heads, kv = config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = d // heads
    body = layers * (d * d * 2 + 2 * d * kv * head_dim + 3 * d * inter)  # q,o + k,v + gate,up,down
    tokens = sum(lengths)
    linear = (2 + 2) * body * tokens + 6 * n_lora * tokens
    # causal attention: token t attends t+1 positions; QK^T and AV are 2*d FLOPs each per pair
    pairs = sum(n * (n + 1) / 2 for n in lengths)
    attention = 3 * layers * 4 * d * pairs  # forward + backward (twice the forward)
    head = 4 * config.vocab_size * d * trained
    return linear + attention + head


def bench_medforge(base_dir, tokenizer, rows, hw, steps: int, batch_size: int, max_length: int) -> dict:
    import torch

    from stages.train import torch_backend
    from stages.train.format import encode_rows
    from stages.train.packing import BatchStream

    examples, _ = encode_rows(tokenizer, rows, max_length)
    torch.manual_seed(0)
    model = torch_backend.add_lora(torch_backend.load_model(base_dir, "none", hw), LORA, "none")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    stream = BatchStream(examples, batch_size, seed=0)
    trained = inputs = 0
    flops = seconds = 0.0
    n_lora = sum(p.numel() for p in params)
    for step in range(steps + 1):
        _, batch, _ = stream.next()
        tokens = sum(e.n_trained for e in batch)
        t0 = time.perf_counter()
        torch_backend.accumulate_gradients(model, [batch], tokens, tokenizer.pad_token_id, hw, True)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        took = time.perf_counter() - t0
        if step:  # the first step warms up kernels and allocators
            seconds += took
            trained += tokens
            inputs += sum(len(e.input_ids) for e in batch)
            flops += step_flops(model.config, n_lora, [len(e.input_ids) for e in batch], tokens)
    del model, optimizer
    return {"tok_s": trained / seconds, "input_tok_s": inputs / seconds, "flops_s": flops / seconds,
            "seconds": seconds, "trained_tokens": trained}


class _Timer:
    """A TrainerCallback (built lazily) timing optimizer steps after the first."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self.t0 = 0.0

            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.perf_counter() - self.t0)

        return Timer()


def counting(collator, key_fn):
    """Wrap a data collator to record the tokens each batch trains (batches are consumed in order)."""
    counts: list[tuple[int, int]] = []

    def collate(features):
        batch = collator(features)
        counts.append(key_fn(batch))
        return batch

    return collate, counts


def hf_args(out: str, steps: int, batch_size: int, hw, **extra):
    return dict(output_dir=out, max_steps=steps + 1, per_device_train_batch_size=batch_size, learning_rate=1e-4,
                weight_decay=0.0, logging_steps=10 ** 6, save_strategy="no", report_to=[], disable_tqdm=True,
                use_cpu=hw.device == "cpu", bf16=hw.dtype == "bf16", dataloader_num_workers=0, seed=0,
                max_grad_norm=1.0, optim="adamw_torch", **extra)


def peft_model(base_dir, hw):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model.to(hw.device), config)


def summarize(timer, counts) -> dict:
    # step i consumed batch i; drop the warm-up step
    times = timer.times[1:]
    used = counts[1:len(timer.times)]
    seconds = sum(times)
    trained, inputs = sum(c[0] for c in used), sum(c[1] for c in used)
    return {"tok_s": trained / seconds, "input_tok_s": inputs / seconds, "seconds": seconds, "trained_tokens": trained}


def bench_users_recipe(base_dir, tokenizer, rows, hw, steps: int, batch_size: int, tmp: str) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    def tokenize(row):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        enc = tokenizer(text, padding="max_length", truncation=True, max_length=USERS_LENGTH)
        enc["labels"] = list(enc["input_ids"])
        return enc

    data = Dataset.from_list(rows).map(tokenize, remove_columns=["messages", "task"])
    collate, counts = counting(default_data_collator, lambda b: (int(b["attention_mask"].sum()),) * 2)
    timer = _Timer()
    trainer = Trainer(model=peft_model(base_dir, hw), args=TrainingArguments(**hf_args(tmp, steps, batch_size, hw)),
                      train_dataset=data, data_collator=collate, callbacks=[timer])
    trainer.train()
    return summarize(timer, counts)


def bench_trl(base_dir, tokenizer, rows, hw, steps: int, batch_size: int, tmp: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def split(row):
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return {"prompt": prompt, "completion": full[len(prompt):].rstrip()}

    data = Dataset.from_list(rows).map(split, remove_columns=["messages", "task"])
    args = SFTConfig(**hf_args(tmp, steps, batch_size, hw, packing=True, max_length=USERS_LENGTH,
                                completion_only_loss=True))
    trainer = SFTTrainer(model=peft_model(base_dir, hw), args=args, train_dataset=data, processing_class=tokenizer)
    key = "completion_mask" if "completion_mask" in trainer.train_dataset.column_names else None

    def tokens(b):
        inputs = int(b["input_ids"].numel() if "attention_mask" not in b else b["attention_mask"].sum())
        return int((b["labels"][:, 1:] != -100).sum()), inputs

    trainer.data_collator, counts = counting(trainer.data_collator, tokens)
    timer = _Timer()
    trainer.add_callback(timer)
    trainer.train()
    out = summarize(timer, counts)
    out["completion_mask"] = key is not None
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per trainer (plus one warm-up)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="medforge examples per step (packed)")
    parser.add_argument("--pack-length", type=int, default=1024, help="medforge: longest example kept (each step packs its examples into one row)")
    parser.add_argument("--hf-batch-size", type=int, default=1, help="2048-token rows per step for HF/TRL")
    parser.add_argument("--base", type=Path, default=None, help="HF base model folder (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    args = parser.parse_args(argv)

    import tempfile

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="medforge-bench-") as tmp:
        if args.base is None:
            from stages.base_model import materialize
            args.base = materialize("embedded:smollm2-135m-instruct", Path(tmp) / "base")
        return run(args, tmp)


def run(args, tmp: str) -> dict:
    import torch

    from stages.train import hardware, torch_backend

    hw = hardware.detect(args.dtype)
    tokenizer = torch_backend.load_tokenizer(args.base)
    rows = news2_rows(args.examples)
    peak = matmul_peak(hw.torch_dtype)
    ours = bench_medforge(args.base, tokenizer, rows, hw, args.steps, args.batch_size, args.pack_length)
    users = bench_users_recipe(args.base, tokenizer, rows, hw, args.steps, args.hf_batch_size, tmp + "/users")
    trl = bench_trl(args.base, tokenizer, rows, hw, args.steps, args.hf_batch_size, tmp + "/trl")
    peak = max(peak, matmul_peak(hw.torch_dtype))  # measured again after: the best is the machine's peak
    result = {
        "medforge_tok_s": round(ours["tok_s"], 1), "users_recipe_tok_s": round(users["tok_s"], 1),
        "trl_packing_tok_s": round(trl["tok_s"], 1),
        "medforge_input_tok_s": round(ours["input_tok_s"], 1), "users_recipe_input_tok_s": round(users["input_tok_s"], 1),
        "trl_packing_input_tok_s": round(trl["input_tok_s"], 1),
        "speedup_vs_users_recipe": round(ours["tok_s"] / users["tok_s"], 2),
        "speedup_vs_trl_packing": round(ours["tok_s"] / trl["tok_s"], 2),
        "mfu": round(ours["flops_s"] / peak, 3), "model_gflop_s": round(ours["flops_s"] / 1e9, 1),
        "peak_matmul_gflop_s": round(peak / 1e9, 1),
        "dtype": hw.dtype, "dtype_reason": hw.reason, "device": hw.device, "threads": torch.get_num_threads(),
        "model": str(args.base), "examples": len(rows), "timed_steps": args.steps,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
