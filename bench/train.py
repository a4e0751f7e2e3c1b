"""LoRA training throughput: medforge against the users' recipe and TRL, same data, model and dtype, one run.

Data: NEWS2 conversations from the project's own generator (stages/sources/news2.py), rendered
with the base tokenizer's chat template. Model (`--shape`):

- smollm2 (default): the embedded SmolLM2-135M-Instruct (or `--base DIR`).
- llama-3.1-8b: a randomly initialised LlamaForCausalLM with Llama-3.1-8B's dimensions (hidden
  4096, 32 layers, 32 query / 8 key-value heads, MLP 14336, untied head, RoPE theta 500000 with
  llama3 scaling), except the vocabulary: the data is tokenized with the embedded SmolLM2
  tokenizer, so the vocabulary is its 49,152 tokens, not Llama's 128,256 (7.4B parameters, not
  8.0B; the embedding and output head, and the head's FLOPs, are 2.6x smaller than real Llama's).
- tiny: the same architecture at 2 layers, hidden 64 (tests run the whole bench on CPU with it).

A random model is built with a fixed seed, on the GPU when there is one, in the run's dtype, and
saved with the SmolLM2 tokenizer as a Hugging Face folder in a temp dir that all three trainers
load. Random weights train as fast as trained ones: throughput depends on shapes only.

All three train the same LoRA (r=16 on q,k,v,o,gate,up,down; dropout 0.05) with AdamW, in the
dtype `--dtype` names or, with auto, `stages.train.hardware.detect()` picks for this machine (fp32
autocast-free or bf16; the JSON line's `dtype`). In bf16 medforge stores the frozen base in bf16
(`torch_backend.load_model`; LoRA weights and AdamW state fp32); the two baselines load it in fp32
and train with the Trainer's `bf16=True` (autocast), as their recipes do. Gradient checkpointing
is off unless `--gradient-checkpointing` turns it on for all three (TRL's
own default is on: the bench sets it explicitly). `--quantization nf4` is QLoRA for all three:
4-bit NF4 base with double quantization and the run's dtype as compute dtype; medforge loads it
with its own `torch_backend.load_model` / `add_lora`, the other two as users do
(`BitsAndBytesConfig` + peft's `prepare_model_for_kbit_training`, then `get_peft_model`).

- medforge: `torch_backend` — packed rows (block-diagonal attention), output head only where
  a token is trained, loss on assistant tokens incl. <|im_end|>.
- users_recipe: HF `Trainer`, every example tokenized with padding="max_length" to 2048 and
  labels = input_ids (prompt and padding trained too).
- trl_packing: TRL `SFTTrainer` with packing=True (BFD, padding-free positions) on a
  prompt/completion dataset, so it trains on the same completion tokens as medforge.
The two baselines use SDPA attention, or flash_attention_2 when medforge uses it (CUDA with
flash-attn installed); `medforge_attention` / `baseline_attention` record which. medforge trains
last: on Linux CPUs its loader tells glibc's malloc to keep freed memory for the whole process
(`hardware.keep_freed_memory`), which speeds the baselines up too (TRL's packing trained at 108
tok/s after it in one bf16 run on the AMX Xeon, 66-67 before it), while users' scripts run with
glibc's defaults.

Throughput counts trained non-pad tokens per second over timed optimizer steps (the first step
of each is a warm-up and not timed; on CUDA each step is timed between device synchronizations):
medforge and TRL train the completion tokens; the users' recipe trains every real token.
`*_input_tok_s` count every non-pad token processed.

`*_peak_gib`, per trainer, from just before it loads its model until it has trained (the previous
trainer's model is freed first, so no two models are held at once): on CUDA
`torch.cuda.max_memory_allocated()` (tensors only, not the allocator's cache), its base weights
included; on Linux CPUs the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) above the resident set at the start, after glibc's `malloc_trim` has handed
back what the previous trainer freed (without it, a later trainer reuses that memory uncounted and
looks several GiB lighter than the first); null elsewhere. `peak_memory`
says which; `held_before_trainers_gib` (CUDA) is the most still allocated as a trainer started.

`mfu` = medforge's model FLOPs per second / this machine's matmul peak for the run's dtype
(`peak_matmul_gflop_s`, timed in that dtype; the best of square matmuls timed in this run before
each trainer and after the last, on the training device:
8192-wide on CUDA, 2048 on CPU; load from other processes only lowers a timing, so the best is
the peak, and a busy moment cannot inflate the MFU).
Model FLOPs of a LoRA step, per processed token: forward 2*N of the frozen body + backward 2*N
(input gradients; frozen weights need no weight gradients) + 6*N of the LoRA weights + causal
attention over each example's own context (forward 4*d*ctx per layer, backward twice that); the
output head (2*V*d forward, 2*V*d backward) only at trained positions, which is all medforge
computes there. With nf4 the frozen body still counts 2*N per pass (its weights are dequantized
and multiplied in the compute dtype); gradient checkpointing's recomputed forward does not count.

    python bench/train.py [--steps 4] [--examples 256] [--base DIR] [--shape smollm2|llama-3.1-8b|tiny]
                          [--quantization none|nf4] [--gradient-checkpointing] [--dtype auto|bf16|fp32]
    python bench/train.py --shape llama-3.1-8b --quantization nf4 --steps 10   # CUDA: the 8B QLoRA run
"""
from __future__ import annotations

import argparse
import gc
import importlib
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
CKPT_KWARGS = {"use_reentrant": False}  # as torch_backend.add_lora
SHAPES = {  # LlamaConfig fields; the vocabulary is the SmolLM2 tokenizer's (see the docstring)
    "llama-3.1-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 14336, "max_position_embeddings": 131072,
                     "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 224, "max_position_embeddings": 4096, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5},
}


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


# --- the model
def shape_config(shape: str, tokenizer):
    """The LlamaConfig of a random `shape` (SHAPES) over `tokenizer`'s vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])


def build_random(shape: str, folder: Path, dtype) -> Path:
    """Save a seeded random model of `shape` in `dtype` with the SmolLM2 tokenizer as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.base_model import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # init on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(shape_config(shape, tokenizer), dtype=dtype)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    del model
    free()
    return folder


def parameter_count(base_dir: Path) -> int:
    """Parameters of the base model (counted on the meta device: no weights are made)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))
    return sum(p.numel() for p in model.parameters())


# --- the machine
def free() -> None:
    """Drop unreachable models (trainers hold reference cycles) and return their memory: GPU memory to the
    driver, freed heap to the OS (glibc keeps it otherwise, and the next trainer's RSS growth would hide it)."""
    import ctypes
    import ctypes.util

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def memory_mark(device: str) -> int | None:
    """Free what is unreachable, reset the peak counter; the bytes in use now (None: not measurable)."""
    import torch

    free()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        return _status_bytes("VmRSS")
    except OSError:
        return None


def memory_peak_gib(device: str, start: int | None) -> float | None:
    """Since `memory_mark`: CUDA peak allocated, or CPU peak resident-set growth; GiB (see the docstring)."""
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    if start is None:
        return None
    try:
        return round((_status_bytes("VmHWM") - start) / 2 ** 30, 3)
    except OSError:
        return None


def matmul_peak(dtype, device: str = "cpu", size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` timings of square matmuls in `dtype` on `device` (other load only
    slows it, so the best is the peak). On CUDA each timing covers 10 matmuls between synchronizations."""
    import torch

    size = size or (8192 if device == "cuda" else 2048)
    inner = 10 if device == "cuda" else 1
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del a, b
    free()
    return 2 * size ** 3 * inner / best


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


# --- the trainers
def bench_medforge(base_dir, tokenizer, rows, hw, steps: int, batch_size: int, max_length: int,
                   quantization: str, checkpointing: bool) -> dict:
    import torch

    from stages.train import torch_backend
    from stages.train.format import encode_rows
    from stages.train.packing import BatchStream

    examples, _ = encode_rows(tokenizer, rows, max_length)
    torch.manual_seed(0)
    model = torch_backend.add_lora(torch_backend.load_model(base_dir, quantization, hw), LORA, quantization,
                                   checkpointing)
    model.train()
    attention = model.config._attn_implementation
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    stream = BatchStream(examples, batch_size, seed=0)
    trained = inputs = 0
    flops = seconds = 0.0
    n_lora = sum(p.numel() for p in params)
    for step in range(steps + 1):
        _, batch, _ = stream.next()
        tokens = sum(e.n_trained for e in batch)
        sync(hw.device)
        t0 = time.perf_counter()
        torch_backend.accumulate_gradients(model, [batch], tokens, tokenizer.pad_token_id, hw, True)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(hw.device)
        took = time.perf_counter() - t0
        if step:  # the first step warms up kernels and allocators
            seconds += took
            trained += tokens
            inputs += sum(len(e.input_ids) for e in batch)
            flops += step_flops(model.config, n_lora, [len(e.input_ids) for e in batch], tokens)
    del model, optimizer, params
    return {"tok_s": trained / seconds, "input_tok_s": inputs / seconds, "flops_s": flops / seconds,
            "seconds": seconds, "trained_tokens": trained, "attention": attention}


class _Timer:
    """A TrainerCallback (built lazily) timing optimizer steps after the first."""

    def __new__(cls, device: str):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self.t0 = 0.0

            def on_step_begin(self, args, state, control, **kw):
                sync(device)
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync(device)
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


def hf_args(out: str, steps: int, batch_size: int, hw, checkpointing: bool, **extra):
    return dict(output_dir=out, max_steps=steps + 1, per_device_train_batch_size=batch_size, learning_rate=1e-4,
                weight_decay=0.0, logging_steps=10 ** 6, save_strategy="no", report_to=[], disable_tqdm=True,
                use_cpu=hw.device == "cpu", bf16=hw.dtype == "bf16", dataloader_num_workers=0, seed=0,
                max_grad_norm=1.0, optim="adamw_torch", gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs=dict(CKPT_KWARGS), **extra)


def peft_model(base_dir, hw, quantization: str, checkpointing: bool, attention: str):
    """The users' way: from_pretrained (4-bit via BitsAndBytesConfig for nf4), prepare_model_for_kbit_training, LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    kwargs = {"dtype": hw.torch_dtype if attention == "flash_attention_2" else torch.float32,
              "attn_implementation": attention}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=hw.torch_dtype)
        kwargs["device_map"] = {"": hw.device_index}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    model.config.use_cache = False
    if quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=dict(CKPT_KWARGS))
    else:
        model.to(hw.device)
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def summarize(timer, counts) -> dict:
    # step i consumed batch i; drop the warm-up step
    times = timer.times[1:]
    used = counts[1:len(timer.times)]
    seconds = sum(times)
    trained, inputs = sum(c[0] for c in used), sum(c[1] for c in used)
    return {"tok_s": trained / seconds, "input_tok_s": inputs / seconds, "seconds": seconds, "trained_tokens": trained}


def bench_users_recipe(base_dir, tokenizer, rows, hw, steps: int, batch_size: int, tmp: str,
                       quantization: str, checkpointing: bool, attention: str) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    def tokenize(row):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        enc = tokenizer(text, padding="max_length", truncation=True, max_length=USERS_LENGTH)
        enc["labels"] = list(enc["input_ids"])
        return enc

    data = Dataset.from_list(rows).map(tokenize, remove_columns=["messages", "task"])
    collate, counts = counting(default_data_collator, lambda b: (int(b["attention_mask"].sum()),) * 2)
    timer = _Timer(hw.device)
    trainer = Trainer(model=peft_model(base_dir, hw, quantization, checkpointing, attention),
                      args=TrainingArguments(**hf_args(tmp, steps, batch_size, hw, checkpointing)),
                      train_dataset=data, data_collator=collate, callbacks=[timer])
    trainer.train()
    del trainer
    return summarize(timer, counts)


def bench_trl(base_dir, tokenizer, rows, hw, steps: int, batch_size: int, tmp: str,
              quantization: str, checkpointing: bool, attention: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def split(row):
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return {"prompt": prompt, "completion": full[len(prompt):].rstrip()}

    data = Dataset.from_list(rows).map(split, remove_columns=["messages", "task"])
    args = SFTConfig(**hf_args(tmp, steps, batch_size, hw, checkpointing, packing=True, max_length=USERS_LENGTH,
                                completion_only_loss=True))
    trainer = SFTTrainer(model=peft_model(base_dir, hw, quantization, checkpointing, attention), args=args,
                         train_dataset=data, processing_class=tokenizer)
    key = "completion_mask" if "completion_mask" in trainer.train_dataset.column_names else None

    def tokens(b):
        inputs = int(b["input_ids"].numel() if "attention_mask" not in b else b["attention_mask"].sum())
        return int((b["labels"][:, 1:] != -100).sum()), inputs

    trainer.data_collator, counts = counting(trainer.data_collator, tokens)
    timer = _Timer(hw.device)
    trainer.add_callback(timer)
    trainer.train()
    del trainer
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
    parser.add_argument("--shape", default="smollm2", choices=("smollm2", *SHAPES),
                        help="smollm2: the embedded SmolLM2-135M (or --base); others: a random model of that shape")
    parser.add_argument("--base", type=Path, default=None, help="HF base model folder (--shape smollm2 only; "
                                                                "default: embedded SmolLM2)")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4"), help="nf4: QLoRA for all three")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for all three (default: off)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    args = parser.parse_args(argv)
    if args.base is not None and args.shape != "smollm2":
        parser.error("--base goes with --shape smollm2 only")

    import tempfile

    from transformers.utils import logging as hf_logging

    from stages.train import hardware

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hw = hardware.detect(args.dtype)
    with tempfile.TemporaryDirectory(prefix="medforge-bench-") as tmp:
        if args.shape != "smollm2":
            args.base = build_random(args.shape, Path(tmp) / "base", hw.torch_dtype)
        elif args.base is None:
            from stages.base_model import materialize
            args.base = materialize("embedded:smollm2-135m-instruct", Path(tmp) / "base")
        return run(args, hw, tmp)


def run(args, hw, tmp: str) -> dict:
    import torch

    from stages.train import torch_backend

    tokenizer = torch_backend.load_tokenizer(args.base)
    rows = news2_rows(args.examples)
    quant, ckpt = args.quantization, args.gradient_checkpointing
    for module in ("datasets", "peft", "trl", *(("bitsandbytes",) if quant == "nf4" else ())):
        importlib.import_module(module)  # before any peak is marked: no trainer's peak counts an import
    matmul_best = 0.0  # timed before every trainer and after the last: a busy moment only lowers one timing
    results, peaks, held = {}, {}, []
    attention = "flash_attention_2" if torch_backend.attention_implementation(hw.device) == "flash_attention_2" \
        else "sdpa"
    # medforge last: on CPU its loader sets glibc's malloc to keep freed memory, process-wide
    # (hardware.keep_freed_memory); the baselines run with glibc's defaults, as users' scripts do
    for name in ("users_recipe", "trl_packing", "medforge"):
        matmul_best = max(matmul_best, matmul_peak(hw.torch_dtype, hw.device))
        start = memory_mark(hw.device)  # frees the previous trainer's model first
        if hw.device == "cuda":
            held.append(start)
        if name == "medforge":
            results[name] = bench_medforge(args.base, tokenizer, rows, hw, args.steps, args.batch_size,
                                           args.pack_length, quant, ckpt)
        elif name == "users_recipe":
            results[name] = bench_users_recipe(args.base, tokenizer, rows, hw, args.steps, args.hf_batch_size,
                                               tmp + "/users", quant, ckpt, attention)
        else:
            results[name] = bench_trl(args.base, tokenizer, rows, hw, args.steps, args.hf_batch_size,
                                      tmp + "/trl", quant, ckpt, attention)
        peaks[name] = memory_peak_gib(hw.device, start)
    free()
    peak = max(matmul_best, matmul_peak(hw.torch_dtype, hw.device))
    ours, users, trl = results["medforge"], results["users_recipe"], results["trl_packing"]
    result = {
        "medforge_tok_s": round(ours["tok_s"], 1), "users_recipe_tok_s": round(users["tok_s"], 1),
        "trl_packing_tok_s": round(trl["tok_s"], 1),
        "medforge_input_tok_s": round(ours["input_tok_s"], 1), "users_recipe_input_tok_s": round(users["input_tok_s"], 1),
        "trl_packing_input_tok_s": round(trl["input_tok_s"], 1),
        "speedup_vs_users_recipe": round(ours["tok_s"] / users["tok_s"], 2),
        "speedup_vs_trl_packing": round(ours["tok_s"] / trl["tok_s"], 2),
        "mfu": round(ours["flops_s"] / peak, 3), "model_gflop_s": round(ours["flops_s"] / 1e9, 1),
        "peak_matmul_gflop_s": round(peak / 1e9, 1),
        **{f"{name}_peak_gib": peaks[name] for name in results},
        "peak_memory": ("cuda max_memory_allocated" if hw.device == "cuda" else
                        "cpu peak RSS growth" if peaks["medforge"] is not None else "not measured"),
        "held_before_trainers_gib": round(max(held) / 2 ** 30, 2) if held else None,
        "shape": args.shape, "quantization": quant, "gradient_checkpointing": ckpt,
        "medforge_attention": ours["attention"], "baseline_attention": attention,
        "model_params_m": round(parameter_count(args.base) / 1e6, 1), "vocab_size": len(tokenizer),
        "dtype": hw.dtype, "dtype_reason": hw.reason, "device": hw.device,
        "device_name": torch.cuda.get_device_name() if hw.device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "model": str(args.base) if args.shape == "smollm2" else f"random {args.shape}",
        "examples": len(rows), "timed_steps": args.steps,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
