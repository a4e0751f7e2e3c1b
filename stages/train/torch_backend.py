"""The PyTorch side of the training loop (loop.py): a LoRA/QLoRA on a transformers base.

Examples are packed into rows with per-example position ids (no attention across examples,
see packing.py) or bucketed by length; each micro-batch's summed loss is divided by the trained
tokens of the whole step (token-weighted across grad accumulation and across data-parallel ranks);
AdamW (paged on CUDA). Checkpoints are checkpoint.py's. Several processes train data-parallel
(distributed.py); with a 4-bit base they shard it with FSDP (fsdp.py). `TorchBackend` is what
loop.train calls; the schedule, validation, early stopping and checkpoint cadence are the loop's.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from stages import progress
from stages.errors import StageError
from stages.train import checkpoint, distributed, fsdp, fused_lora, head_loss  # noqa: F401 (API)
from stages.train.format import IGNORE, Encoded
from stages.train.hardware import Hardware
from stages.train.inputs import load_tokenizer  # noqa: F401 (API)
from stages.train.loop import MAX_GRAD_NORM, VAL_MAX_EXAMPLES, cosine_lr, total_steps  # noqa: F401 (API)
from stages.train.packing import BatchStream, collate, collate_packed, length_batches  # noqa: F401 (API)
from stages.train.packing import EVAL_BATCH_TOKENS, budget_batches, shared_prefix



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

    from stages.train.hardware import keep_freed_memory

    hf_logging.disable_progress_bar()  # bars flood the task log the dashboard shows
    if hw.device == "cpu":
        keep_freed_memory()  # CPU activations live in malloc's heap: keep it between steps
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


def greedy(logits):
    """The index of each row's largest logit, the first among equals: `argmax`'s answer, from `max` over the last
    dim, which on CPU runs 2-2.5x faster than `argmax` over a 49k vocabulary (bench/eval.py, AMX Xeon)."""
    return logits.max(-1).indices


def trained_nll(base, inputs: dict[str, Any], keep, targets, guesses: bool = False):
    """The decoder, then the output head and the NLL of `targets` only at the positions `keep` marks. With
    `guesses` (no gradient: eval), also the greedy token there, from the same logits."""
    import torch.nn.functional as F

    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # a cache disables packed masks
    hidden, head = hidden[:, :-1][keep], base.get_output_embeddings()
    if guesses:
        logits = head(hidden).float()
        return F.cross_entropy(logits, targets, reduction="none"), greedy(logits)
    if head_loss.applies(head):  # frozen head: one logits tensor, its gradient made in place (head_loss.py)
        return head_loss.head_nll(head, hidden, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def shared_start(base, inputs: dict[str, Any], prefix: int) -> dict[str, Any]:
    """The decoder inputs for a padded batch whose rows all begin with the same `prefix` tokens (a chat template's
    system prompt and turn marker): those run once, in a row of their own, and every row continues from their keys
    and values. The rest of each row attends to them as it would in one pass: the same numbers, a prefix's compute
    saved per row."""
    from transformers import DynamicCache

    ids, decoder = inputs["input_ids"], base.get_decoder()
    name = cache_kwarg(decoder)
    cache = DynamicCache()
    decoder(input_ids=ids[:1, :prefix], use_cache=True, **{name: cache})
    cache.batch_repeat_interleave(ids.shape[0])
    return {"input_ids": ids[:, prefix:], "attention_mask": inputs["attention_mask"], name: cache}


def cache_kwarg(module) -> str:
    """What `module`'s forward (a peft model's: its base model's) calls its key/value cache argument: "cache"
    (transformers 5.x), "past_key_values" (4.x)."""
    import inspect

    module = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def token_nll(model, batch: dict[str, Any], hw: Hardware, guesses: bool = False, prefix: int = 0):
    """Summed negative log-likelihood of the trained tokens and their counts, per row (per example
    for a packed batch, indexed like the examples it was packed from). With `guesses`, also the model's
    greedy token at every trained position, in row-major order (unpacked batches only). With `prefix` (a padded
    batch, no gradient: packing.shared_prefix), the rows' shared untrained start runs once (shared_start).

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
        if prefix:  # nothing up to the prefix's last token is trained: its hidden states predict nothing kept
            nll = forward(shared_start(base, inputs, prefix), keep[:, prefix:], targets[keep], guesses=guesses)
        else:
            nll = forward(inputs, keep, targets[keep], guesses=guesses)
    if guesses:
        nll, greedy = nll
    if "segments" in batch:
        owners = batch["segments"][:, 1:][keep]
        n = int(batch["segments"].max().item()) + 1
    else:
        owners = keep.nonzero()[:, 0]
        n = targets.shape[0]
    per = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, owners, nll)
    counts = torch.zeros(n, dtype=torch.long, device=nll.device).index_add(0, owners, torch.ones_like(owners))
    if guesses:
        return per, counts, greedy
    return per, counts


def nll_by_example(model, examples: list[Encoded], pad_id: int, hw: Hardware,
                   batch_tokens: int = EVAL_BATCH_TOKENS, guesses: bool = False) -> list[tuple]:
    """(summed NLL, trained tokens) per example, in input order; batches of similar length, up to `batch_tokens`
    padded tokens each (packing.budget_batches), the start their rows share run once (shared_start).
    With `guesses`, (summed NLL, trained tokens, [the model's greedy token at each trained position, in order])."""
    import torch

    was_training = model.training
    model.eval()
    out: list[tuple] = [(0.0, 0)] * len(examples)
    # a batch's shared start runs once (shared_start), where it is proven equal to one pass (tests, bench/eval.py):
    # SDPA and the trainer's attention; not flash-attention-2 with a right-padded cache (no GPU has run it yet), nor
    # FSDP, whose forwards are collective: the ranks' batches differ, their calls must not
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    share = not hasattr(base, trained_nll.__name__) and base.config._attn_implementation != "flash_attention_2"
    with torch.no_grad():
        for idx in budget_batches([len(e.input_ids) for e in examples], batch_tokens):
            batch = [examples[i] for i in idx]
            prefix = shared_prefix(batch) if share else 0
            nll, count, *guessed = token_nll(model, collate(batch, pad_id, hw.device_index), hw, guesses, prefix)
            counts = count.tolist()
            if guesses:
                flat, at = guessed[0].tolist(), 0
                for i, s, c in zip(idx, nll.tolist(), counts):
                    out[i] = (s, c, flat[at:at + c])
                    at += c
            else:
                for i, s, c in zip(idx, nll.tolist(), counts):
                    out[i] = (s, c)
            progress.advance(len(idx))
    model.train(was_training)
    return out


def mean_loss(model, examples: list[Encoded], pad_id: int, hw: Hardware,
              world: distributed.World = distributed.World()) -> float:
    """Token-weighted mean NLL; with several ranks each scores its share and the sums are combined."""
    mine = examples[world.rank::world.size]
    pairs = nll_by_example(model, mine, pad_id, hw)
    if world.fsdp:  # forwards are collective: as many as the rank with the most batches runs, the extra ones thrown away
        def batches(share):
            return len(budget_batches([len(e.input_ids) for e in share], EVAL_BATCH_TOKENS))

        idle = max(batches(examples[r::world.size]) for r in range(world.size)) - batches(mine)
        nll_by_example(model, examples[:1] * idle, pad_id, hw, batch_tokens=1)  # one row per batch
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


# --- the loop's torch side (loop.Backend)
class TorchBackend:
    """peft LoRA (or QLoRA) on a transformers base; several processes train data-parallel, or shard an nf4
    base with FSDP (distributed.py, fsdp.py), all inside these calls."""
    name = "torch"
    checkpoint_subdir = ""  # the checkpoint folder itself (checkpoint.py's layout)

    def __init__(self, base_dir: Path, tokenizer, lora: dict[str, Any], train_cfg: dict[str, Any], hw: Hardware):
        self.base_dir, self.tokenizer, self.lora, self.cfg, self.hw = base_dir, tokenizer, lora, train_cfg, hw
        self.quantization = train_cfg["quantization"]
        self.world = distributed.init(hw.device, shard_base=self.quantization == "nf4")
        self.rank, self.world_size, self.parallelism = self.world.rank, self.world.size, self.world.parallelism
        self.packing = train_cfg.get("packing", True)
        self.recipe = {"world": self.world.size}  # each rank's share of a batch depends on it
        self.pad_id = tokenizer.pad_token_id

    def load(self, examples: list[Encoded]) -> None:
        import torch

        torch.manual_seed(self.cfg["seed"])
        self.model = add_lora(load_model(self.base_dir, self.quantization, self.hw, sharded=self.world.fsdp),
                              self.lora, self.quantization, self.cfg.get("gradient_checkpointing", False))
        if self.world.fsdp:
            fsdp.shard(self.model, trained_nll)  # before the optimizer: it swaps the parameters for their shards
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.trainable)
        self.optimizer = make_optimizer(self.trainable, self.cfg["lr"], self.cfg.get("optimizer", "auto"),
                                        self.hw.device, sharded=self.world.fsdp)
        # FSDP: a rank with no examples in a micro-batch still runs the collective forward, on this, weighted 0
        self.filler = [min(examples, key=lambda e: len(e.input_ids))] if self.world.fsdp else None

    @property
    def description(self) -> str:
        hw = self.hw
        return (f"{hw.device} {hw.dtype} ({hw.reason}), {self.quantization}, {self.trainable_params:,} trainable "
                f"params, {'packed' if self.packing else 'length-bucketed'} batches, {self.world.size} process(es)"
                f"{' (FSDP: the base is sharded across them)' if self.world.fsdp else ''}")

    def step(self, micro: list[list[Encoded]], step_tokens: int, lr: float, step: int) -> tuple[float, float]:
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = accumulate_gradients(self.model, micro, step_tokens, self.pad_id, self.hw, self.packing, self.filler)
        distributed.sum_gradients(self.trainable, self.world)
        loss = distributed.all_sum([loss], self.world)[0]
        grad_norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def val_loss(self, examples: list[Encoded]) -> float:
        return mean_loss(self.model, examples, self.pad_id, self.hw, self.world)

    def snapshot(self) -> dict[str, Any]:
        return checkpoint.trainable_state(self.model)

    def save_checkpoint(self, folder: Path, step: int, best, state: dict[str, Any], keep: int) -> None:
        if self.world.main or self.world.fsdp:  # FSDP: every rank gathers its shards, rank 0 writes
            checkpoint.save(folder, step, model=self.model, optimizer=self.optimizer, best=best, keep=keep,
                            write=self.world.main, state=state)

    def restore_checkpoint(self, path: Path):
        return checkpoint.load(path, model=self.model, optimizer=self.optimizer)[1]

    def save_adapter(self, folder: Path | None, best) -> None:
        if best is not None:
            checkpoint.load_trainable(self.model, best)
        weights = checkpoint.trainable_state(self.model) if self.world.fsdp else None  # gathered from every shard
        if folder is not None:
            self.model.save_pretrained(str(folder), state_dict=weights)
            self.tokenizer.save_pretrained(str(folder))  # the chat template travels with the adapter

    def memory(self) -> dict[str, int]:
        from stages.train.metrics import memory
        return memory(self.hw.device)

    def barrier(self) -> None:
        distributed.barrier(self.world)

    def agree(self, flag: bool) -> bool:
        return distributed.broadcast_flag(flag, self.world)
