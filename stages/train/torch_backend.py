"""The PyTorch LoRA/QLoRA trainer: small enough to read in one sitting.

Examples are bucketed by length (padded to the batch's longest, not to max_length), the
loss is the mean over trained tokens of an optimizer step (token-weighted across grad
accumulation), AdamW with a cosine schedule after a linear warmup, validation loss at
the start, every `total_steps // VAL_TIMES` steps and at the end.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

from stages.errors import StageError
from stages.train.format import IGNORE, Encoded
from stages.train.hardware import Hardware

VAL_TIMES = 4            # validation runs this many times during training, plus at the start
VAL_MAX_EXAMPLES = 200   # enough for a stable loss without dominating CPU runs
EVAL_BATCH_SIZE = 8


# --- data: bucketing and padding
def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar-length examples, in random order (lengths sorted, then chunked)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def micro_batches(examples: list[Encoded], batch_size: int, seed: int) -> Iterator[tuple[int, list[Encoded]]]:
    """(epoch, batch) forever, reshuffled every epoch."""
    rng = random.Random(seed)
    lengths = [len(e.input_ids) for e in examples]
    epoch = 0
    while True:
        epoch += 1
        for batch in length_batches(lengths, batch_size, rng):
            yield epoch, [examples[i] for i in batch]


def collate(batch: list[Encoded], pad_id: int, device: str) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def total_steps(n_batches: int, grad_accum: int, epochs: int, max_steps: int) -> int:
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * n_batches / grad_accum))


def cosine_lr(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- model
def load_model(base_dir: Path, quantization: str, hw: Hardware):
    """The frozen base model: fp32 weights (autocast gives bf16 compute), or 4-bit nf4 for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bars flood the task log the dashboard shows
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=hw.torch_dtype)
        kwargs["device_map"] = {"": hw.device}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    if quantization != "nf4":
        model.to(hw.device)
    model.config.use_cache = False
    return model


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if not tokenizer.chat_template:
        raise StageError(f"{base_dir}: the tokenizer has no chat template; use a chat/instruct base model "
                         "(adapter.toml key 'base_model')")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_nll(model, batch: dict[str, Any], hw: Hardware):
    """Per-row summed negative log-likelihood of the trained tokens, and per-row token counts.

    The output head runs only where a token is trained: over a 49k vocabulary it is a fifth
    of a small model's compute per position, and prompt positions need no logits.
    """
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers live inside it
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    with hw.autocast():
        hidden = base.get_decoder()(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    nll = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    per_row = torch.zeros(targets.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return per_row, keep.sum(dim=1)


def nll_by_example(model, examples: list[Encoded], pad_id: int, hw: Hardware,
                   batch_size: int = EVAL_BATCH_SIZE) -> list[tuple[float, int]]:
    """(summed NLL, trained tokens) per example, in input order; batches sorted by length to pad little."""
    import torch

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            nll, count = token_nll(model, collate([examples[i] for i in idx], pad_id, hw.device), hw)
            for i, s, c in zip(idx, nll.tolist(), count.tolist()):
                out[i] = (s, c)
    model.train(was_training)
    return out


def mean_loss(model, examples: list[Encoded], pad_id: int, hw: Hardware) -> float:
    pairs = nll_by_example(model, examples, pad_id, hw)
    tokens = sum(c for _, c in pairs)
    return sum(s for s, _ in pairs) / max(1, tokens)


def add_lora(model, lora: dict[str, Any], quantization: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantization == "nf4":
        # norms/embeddings to fp32 for stable training; checkpointing off: these models fit, speed matters
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["targets"]), bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target module the architecture does not have
        raise StageError(f"adapter.toml key 'lora.targets' {lora['targets']}: {exc}; name modules the base "
                         "model has (Llama-style: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)") from None


# --- the loop
def train(*, name: str, base_model: str, lora: dict[str, Any], train_cfg: dict[str, Any], base_dir: Path, tokenizer,
          train_examples: list[Encoded], val_examples: list[Encoded], dropped: int, hw: Hardware,
          metrics, out_dir: Path, log=print) -> dict[str, Any]:
    """Train a LoRA on `train_examples`, save the adapter into `out_dir`; return the summary."""
    import torch

    torch.manual_seed(train_cfg["seed"])
    quantization = train_cfg["quantization"]
    model = add_lora(load_model(base_dir, quantization, hw), lora, quantization)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    pad_id = tokenizer.pad_token_id

    batch_size, accum = train_cfg["batch_size"], train_cfg["grad_accum"]
    n_batches = math.ceil(len(train_examples) / batch_size)
    steps = total_steps(n_batches, accum, train_cfg["epochs"], train_cfg["max_steps"])
    warmup = math.ceil(train_cfg["warmup_ratio"] * steps)
    val_every = max(1, steps // VAL_TIMES)
    val_examples = val_examples[:VAL_MAX_EXAMPLES]
    base_lr = train_cfg["lr"]
    optimizer = torch.optim.AdamW(trainable, lr=cosine_lr(0, steps, warmup, base_lr), weight_decay=0.0)

    metrics.start(total_steps=steps, n_train=len(train_examples), n_val=len(val_examples), dropped=dropped,
                  device=hw.device, dtype=hw.dtype, dtype_reason=hw.reason, backend="torch",
                  quantization=quantization, trainable_params=n_trainable)
    log(f"train:{name}: {len(train_examples)} examples ({dropped} dropped), {steps} steps, "
        f"{hw.device} {hw.dtype} ({hw.reason}), {quantization}, {n_trainable:,} trainable params")

    def validate(step: int) -> float | None:
        if not val_examples:
            return None
        loss = mean_loss(model, val_examples, pad_id, hw)
        metrics.val(step, steps, loss)
        log(f"train:{name}: step {step}/{steps} val_loss {loss:.4f}")
        return loss

    start_val = end_val = validate(0)
    stream = micro_batches(train_examples, batch_size, train_cfg["seed"])
    tokens_total = input_tokens_total = 0
    train_seconds = 0.0
    for step in range(steps):
        lr = cosine_lr(step, steps, warmup, base_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(accum)]
        epoch = micro[-1][0]
        tokens = sum(e.n_trained for _, b in micro for e in b)
        input_tokens = sum(len(e.input_ids) for _, b in micro for e in b)
        loss_value = 0.0
        for _, batch in micro:
            nll, _ = token_nll(model, collate(batch, pad_id, hw.device), hw)
            loss = nll.sum() / tokens  # token-weighted over the whole optimizer step
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds = time.perf_counter() - t0
        train_seconds += step_seconds
        tokens_total += tokens
        input_tokens_total += input_tokens
        row = metrics.step(step + 1, steps, loss_value, lr, tokens, input_tokens, step_seconds, train_seconds, epoch)
        log(f"train:{name}: step {step + 1}/{steps} loss {loss_value:.4f} lr {lr:.2e} "
            f"{row['tok_s']} tok/s eta {row['eta_s']}s")
        if (step + 1) % val_every == 0 or step + 1 == steps:
            end_val = validate(step + 1)

    summary = {
        "adapter": name, "base_model": base_model, "backend": "torch",
        "device": hw.device, "dtype": hw.dtype, "dtype_reason": hw.reason,
        "quantization": quantization, "steps": steps, "epochs_seen": epoch if steps else 0,
        "n_train": len(train_examples), "n_val": len(val_examples), "dropped": dropped,
        "start_val_loss": start_val, "end_val_loss": end_val,
        "tokens": tokens_total, "input_tokens": input_tokens_total, "train_seconds": round(train_seconds, 3),
        "tok_s": round(tokens_total / train_seconds, 2) if train_seconds else None,
        "input_tok_s": round(input_tokens_total / train_seconds, 2) if train_seconds else None,
        "trainable_params": n_trainable, "lora": lora, "train": train_cfg,
    }
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))  # the chat template travels with the adapter
    metrics.end(steps, summary)
    return summary
