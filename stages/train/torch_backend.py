"""The PyTorch LoRA/QLoRA trainer: small enough to read in one sitting.

Examples are packed into rows with per-example position ids (no attention across examples,
see packing.py) or bucketed by length; the loss of an optimizer step is the mean over its
trained tokens (token-weighted across grad accumulation and across data-parallel ranks);
AdamW (paged on CUDA) with a cosine schedule after a linear warmup. Validation at the start,
every `eval_every` steps and at the end keeps the best adapter, which is the one saved;
`patience` validations without a new best stop the run. Checkpoints (checkpoint.py) let a
killed run resume mid-epoch on the same trajectory. Several processes train data-parallel
(distributed.py); with a 4-bit base they shard it with FSDP (fsdp.py).
"""
from __future__ import annotations

import functools
import math
import shutil
import time
from pathlib import Path
from typing import Any

from stages import io
from stages.errors import StageError
from stages.train import checkpoint, distributed, fsdp, fused_lora, head_loss
from stages.train.metrics import run_summary
from stages.train.format import IGNORE, Encoded
from stages.train.hardware import Hardware
from stages.train.packing import BatchStream, collate, collate_packed, length_batches  # noqa: F401 (API)

VAL_TIMES = 4            # with eval_every = 0: validation this many times during training, plus at the start
VAL_MAX_EXAMPLES = 200   # enough for a stable loss without dominating CPU runs
EVAL_BATCH_SIZE = 8
MAX_GRAD_NORM = 1.0


def total_steps(n_batches: int, grad_accum: int, epochs: int, max_steps: int) -> int:
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * n_batches / grad_accum))


def cosine_lr(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- model
def attention_implementation(device: str) -> str:
    """Varlen flash attention for packed rows on CUDA when installed; SDPA per packed example otherwise."""
    if device == "cuda":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    from stages.train import varlen
    return varlen.register()


def load_model(base_dir: Path, quantization: str, hw: Hardware, sharded: bool = False):
    """The frozen base model: its weights in the compute dtype (fp32, or bf16: stored so, not cast by
    autocast in every forward), or 4-bit nf4 for QLoRA (its other weights fp32, computing under autocast).
    peft keeps the LoRA weights, and so the optimizer state, in fp32 over a bf16 base (add_lora).
    `sharded`: for FSDP, which shards floating-point tensors only (fsdp.py)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bars flood the task log the dashboard shows
    kwargs: dict[str, Any] = {"dtype": hw.torch_dtype, "attn_implementation": attention_implementation(hw.device)}
    if quantization == "nf4" and kwargs["attn_implementation"] != "flash_attention_2":
        kwargs["dtype"] = torch.float32  # as before bf16 bases: QLoRA's non-4-bit weights fp32 (flash attention: half)
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=hw.torch_dtype, **({"bnb_4bit_quant_storage": hw.torch_dtype} if sharded else {}))
        kwargs["device_map"] = {"": hw.device_index}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    if quantization != "nf4":
        model.to(hw.device_index)
    else:
        keep_4bit_layout(model)
    model.config.use_cache = False
    return model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for inference on CPUs with AVX512-BF16.

    Its Linear4bit, in eval mode with an input that needs no gradient (our validation), rewrites the
    weight in place into a CPU-only layout and marks its quant state so; the next training forward then
    takes the inference kernel, which passes no gradient to the layer's input, and under FSDP the next
    all-gather brings back the plain layout under the mark: loss curves drift (two FSDP processes 0.75
    nats off one process by step 6 on an AMX Xeon). Training needs one layout throughout."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if not tokenizer.chat_template:
        raise StageError(f"{base_dir}: the tokenizer has no chat template; use a chat/instruct base model "
                         "(adapter.toml key 'base_model')")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_lora(model, lora: dict[str, Any], quantization: str, gradient_checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs and LoRA
    if quantization == "nf4":
        # norms/embeddings to fp32 for stable training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["targets"]), bias="none", task_type="CAUSAL_LM")
    try:  # over a bf16 base peft makes the LoRA weights fp32 (autocast_adapter_dtype): fp32 updates and AdamW state
        model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:  # e.g. a target module the architecture does not have
        raise StageError(f"adapter.toml key 'lora.targets' {lora['targets']}: {exc}; name modules the base "
                         "model has (Llama-style: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)") from None
    fused_lora.install(model)  # peft's math, fewer passes over memory (see fused_lora.py)
    return model


def make_optimizer(params, lr: float, kind: str, device: str, where: str = "adapter.toml", sharded: bool = False):
    import torch

    if kind == "auto":
        kind = "paged_adamw" if device == "cuda" and not sharded else "adamw"
    if kind == "paged_adamw":
        if device != "cuda":
            raise StageError(f"{where}: key 'train.optimizer' = \"paged_adamw\" needs a CUDA GPU (this run is on "
                             f"{device}); set it to \"adamw\" or \"auto\"")
        if sharded:  # its kernels take plain tensors, not FSDP's DTensor shards
            raise StageError(f"{where}: key 'train.optimizer' = \"paged_adamw\" does not work with nf4 on several "
                             "GPUs (FSDP); set it to \"adamw\" or \"auto\"")
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# --- losses
def compute_context(base, hw: Hardware):
    """Autocast for a base with fp32 weights under bf16 compute (nf4: prepare_model_for_kbit_training
    upcasts its norms and embeddings); a base stored in the compute dtype runs as it is, without
    autocast's cast of every weight in every forward (its embeddings' dtype tells which)."""
    import contextlib

    if base.get_input_embeddings().weight.dtype == hw.torch_dtype:
        return contextlib.nullcontext()
    return hw.autocast()


def trained_nll(base, inputs: dict[str, Any], keep, targets):
    """The decoder, then the output head and the NLL of `targets` only at the positions `keep` marks."""
    import torch.nn.functional as F

    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # a cache disables packed masks
    hidden, head = hidden[:, :-1][keep], base.get_output_embeddings()
    if head_loss.applies(head):  # frozen head: one logits tensor, its gradient made in place (head_loss.py)
        return head_loss.head_nll(head, hidden, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def token_nll(model, batch: dict[str, Any], hw: Hardware):
    """Summed negative log-likelihood of the trained tokens and their counts, per row (per example
    for a packed batch, indexed like the examples it was packed from).

    The output head runs only where a token is trained: over a 49k vocabulary it is a fifth
    of a small model's compute per position, and prompt positions need no logits.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers live inside it
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:  # packed: restarting positions and no 2D mask give the block-diagonal mask
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    # under FSDP the base has it as a method that gathers its sharded root first (fsdp.shard)
    forward = getattr(base, trained_nll.__name__, None) or functools.partial(trained_nll, base)
    with compute_context(base, hw):
        nll = forward(inputs, keep, targets[keep])
    if "segments" in batch:
        owners = batch["segments"][:, 1:][keep]
        n = int(batch["segments"].max().item()) + 1
    else:
        owners = keep.nonzero()[:, 0]
        n = targets.shape[0]
    per = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, owners, nll)
    counts = torch.zeros(n, dtype=torch.long, device=nll.device).index_add(0, owners, torch.ones_like(owners))
    return per, counts


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
            nll, count = token_nll(model, collate([examples[i] for i in idx], pad_id, hw.device_index), hw)
            for i, s, c in zip(idx, nll.tolist(), count.tolist()):
                out[i] = (s, c)
    model.train(was_training)
    return out


def mean_loss(model, examples: list[Encoded], pad_id: int, hw: Hardware,
              world: distributed.World = distributed.World()) -> float:
    """Token-weighted mean NLL; with several ranks each scores its share and the sums are combined."""
    mine = examples[world.rank::world.size]
    pairs = nll_by_example(model, mine, pad_id, hw)
    if world.fsdp:  # forwards are collective: as many as rank 0 (the largest share) runs, the extra ones thrown away
        idle = math.ceil(len(examples[::world.size]) / EVAL_BATCH_SIZE) - math.ceil(len(mine) / EVAL_BATCH_SIZE)
        nll_by_example(model, examples[:1] * idle, pad_id, hw, batch_size=1)
    total, tokens = distributed.all_sum([sum(s for s, _ in pairs), float(sum(c for _, c in pairs))], world)
    return total / max(1.0, tokens)


def accumulate_gradients(model, micro: list[list[Encoded]], step_tokens: int, pad_id: int, hw: Hardware,
                         packing: bool, filler: list[Encoded] | None = None) -> float:
    """Backward over the micro-batches of one optimizer step; returns this rank's share of the loss.

    Each micro-batch's summed NLL is divided by `step_tokens`, the trained tokens of the whole
    step (all micro-batches, all ranks), so the accumulated gradient is that of one big batch.
    A rank's share of a short final batch can be empty: it is skipped, or, with `filler` (FSDP,
    whose forward and backward are collective), the filler runs with weight 0.
    """
    loss_value = 0.0
    for batch in micro:
        weight = 1.0
        if not batch:
            if filler is None:
                continue
            batch, weight = filler, 0.0
        # packed: the whole micro-batch in one row, so no position is padding; the attention (varlen flash,
        # or SDPA per example) never looks across examples, whatever the row's length
        collated = (collate_packed(batch, pad_id, hw.device_index, sum(len(e.input_ids) for e in batch))
                    if packing else collate(batch, pad_id, hw.device_index))
        nll, _ = token_nll(model, collated, hw)
        loss = nll.sum() * (weight / step_tokens)
        loss.backward()
        loss_value += loss.item()
    return loss_value


# --- the loop
def train(*, name: str, base_model: str, lora: dict[str, Any], train_cfg: dict[str, Any], base_dir: Path, tokenizer,
          train_examples: list[Encoded], val_examples: list[Encoded], dropped: int, hw: Hardware,
          metrics, out_dir: Path, checkpoint_dir: Path | None = None, log=print) -> dict[str, Any]:
    """Train a LoRA on `train_examples`; write the best adapter atomically into `out_dir`; return the summary."""
    import torch

    from stages.train.metrics import Progress

    quantization = train_cfg["quantization"]
    world = distributed.init(hw.device, shard_base=quantization == "nf4")
    seed = train_cfg["seed"]
    torch.manual_seed(seed)
    model = add_lora(load_model(base_dir, quantization, hw, sharded=world.fsdp), lora, quantization,
                     train_cfg.get("gradient_checkpointing", False))
    if world.fsdp:
        fsdp.shard(model, trained_nll)  # before the optimizer: it swaps the parameters for their shards
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    pad_id = tokenizer.pad_token_id
    packing = train_cfg.get("packing", True)

    batch_size, accum = train_cfg["batch_size"], train_cfg["grad_accum"]
    stream = BatchStream(train_examples, batch_size, seed, world.rank, world.size)
    steps = total_steps(stream.batches_per_epoch, accum, train_cfg["epochs"], train_cfg["max_steps"])
    warmup = math.ceil(train_cfg["warmup_ratio"] * steps)
    eval_every = train_cfg.get("eval_every") or max(1, steps // VAL_TIMES)
    checkpoint_every = train_cfg.get("checkpoint_every") or eval_every
    patience = train_cfg.get("patience", 0)
    val_examples = val_examples[:VAL_MAX_EXAMPLES]
    base_lr = train_cfg["lr"]
    optimizer = make_optimizer(trainable, cosine_lr(0, steps, warmup, base_lr), train_cfg.get("optimizer", "auto"),
                               hw.device, sharded=world.fsdp)
    filler = [min(train_examples, key=lambda e: len(e.input_ids))] if world.fsdp else None
    fingerprint = checkpoint.fingerprint({"base_model": base_model, "lora": lora, "train": train_cfg,
                                          "world": world.size}, train_examples)

    state: dict[str, Any] = {"step": 0, "epoch": 1, "best_val_loss": None, "best_step": None, "bad_evals": 0,
                             "start_val_loss": None, "end_val_loss": None, "stopped_early": False,
                             "tokens": 0, "input_tokens": 0, "train_seconds": 0.0}
    best: dict[str, Any] | None = None
    resumed_from = None
    latest = checkpoint.latest(checkpoint_dir) if checkpoint_dir and train_cfg.get("resume", True) else None
    if latest is not None:
        if io.read_json(latest / "state.json").get("fingerprint") == fingerprint:
            saved, best = checkpoint.load(latest, model=model, optimizer=optimizer)
            state.update(saved["loop"])
            stream = BatchStream(train_examples, batch_size, seed, world.rank, world.size, **saved["data"])
            resumed_from = latest
        elif world.main:
            log(f"train:{name}: checkpoints in {checkpoint_dir} belong to another recipe or data; starting over")
    if world.main and checkpoint_dir is not None and resumed_from is None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    distributed.barrier(world)

    if world.main:
        if resumed_from is not None:
            metrics.resume(state["step"], str(resumed_from))
            log(f"train:{name}: resuming at step {state['step']}/{steps} from {resumed_from}")
        else:
            metrics.start(total_steps=steps, n_train=len(train_examples), n_val=len(val_examples), dropped=dropped,
                          device=hw.device, dtype=hw.dtype, dtype_reason=hw.reason, backend="torch",
                          quantization=quantization, trainable_params=n_trainable, packing=packing,
                          world_size=world.size, parallelism=world.parallelism, eval_every=eval_every,
                          patience=patience)
        log(f"train:{name}: {len(train_examples)} examples ({dropped} dropped), {steps} steps, "
            f"{hw.device} {hw.dtype} ({hw.reason}), {quantization}, {n_trainable:,} trainable params, "
            f"{'packed' if packing else 'length-bucketed'} batches, {world.size} process(es)"
            f"{' (FSDP: the base is sharded across them)' if world.fsdp else ''}")

    def validate(step: int) -> None:
        nonlocal best
        if not val_examples:
            return
        loss = mean_loss(model, val_examples, pad_id, hw, world)
        state["end_val_loss"] = loss
        if state["start_val_loss"] is None:
            state["start_val_loss"] = loss
        if state["best_val_loss"] is None or loss < state["best_val_loss"]:
            state.update(best_val_loss=loss, best_step=step, bad_evals=0)
            best = checkpoint.trainable_state(model)
        else:
            state["bad_evals"] += 1
        if world.main:
            metrics.val(step, steps, loss, state["best_val_loss"], state["best_step"])
            log(f"train:{name}: step {step}/{steps} val_loss {loss:.4f} (best {state['best_val_loss']:.4f} "
                f"at step {state['best_step']})")

    if resumed_from is None:
        validate(0)
    progress = Progress(name, steps, initial=state["step"]) if world.main else None
    while state["step"] < steps:
        step = state["step"]
        lr = cosine_lr(step, steps, warmup, base_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        micro = [stream.next() for _ in range(accum)]
        epoch = micro[-1][0]
        tokens = sum(e.n_trained for _, _, whole in micro for e in whole)  # all ranks': the loss denominator
        input_tokens = sum(len(e.input_ids) for _, _, whole in micro for e in whole)
        loss_value = accumulate_gradients(model, [mine for _, mine, _ in micro], tokens, pad_id, hw, packing,
                                          filler)
        distributed.sum_gradients(trainable, world)
        loss_value = distributed.all_sum([loss_value], world)[0]
        grad_norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds = time.perf_counter() - t0
        state.update(step=step + 1, epoch=epoch)
        state["train_seconds"] += step_seconds
        state["tokens"] += tokens
        state["input_tokens"] += input_tokens
        done = step + 1
        if world.main:
            row = metrics.step(done, steps, loss_value, lr, tokens, input_tokens, step_seconds,
                               state["train_seconds"], epoch, grad_norm=grad_norm)
            progress.update(done, loss_value, row["tok_s"], row["eta_s"])
        if done % eval_every == 0 or done == steps:
            validate(done)
            if patience and state["bad_evals"] >= patience and done < steps:
                state["stopped_early"] = True
        state["stopped_early"] = distributed.broadcast_flag(state["stopped_early"], world)
        if state["stopped_early"]:
            if world.main:
                log(f"train:{name}: early stop at step {done}: {patience} validations without a new best")
            break
        if checkpoint_dir is not None and done % checkpoint_every == 0 and done < steps:
            if world.main or world.fsdp:  # FSDP: every rank gathers its shards, rank 0 writes
                checkpoint.save(checkpoint_dir, done, model=model, optimizer=optimizer, best=best,
                                keep=train_cfg.get("keep_checkpoints", 2), write=world.main,
                                state={"fingerprint": fingerprint, "loop": state, "data": stream.position()})
            distributed.barrier(world)
    if progress is not None:
        progress.close()

    if best is not None:  # the exported adapter is the best one by validation loss
        checkpoint.load_trainable(model, best)
    summary = run_summary(
        state=state, hw=hw, adapter=name, base_model=base_model, backend="torch", quantization=quantization,
        steps=steps, n_train=len(train_examples), n_val=len(val_examples), dropped=dropped,
        resumed_from=str(resumed_from) if resumed_from else None, packing=packing, world_size=world.size,
        parallelism=world.parallelism, trainable_params=n_trainable, lora=lora, train=train_cfg)
    weights = checkpoint.trainable_state(model) if world.fsdp else None  # FSDP: gathered from every rank's shard
    if world.main:
        with io.atomic_dir(out_dir) as tmp:
            model.save_pretrained(str(tmp), state_dict=weights)
            tokenizer.save_pretrained(str(tmp))  # the chat template travels with the adapter
            io.write_json(tmp / "train_summary.json", summary)
        metrics.end(state["step"], summary)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: the adapter is out
    distributed.barrier(world)
    return summary
