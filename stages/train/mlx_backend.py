"""The MLX side of the training loop (loop.py), with mlx-lm: Apple silicon, and Linux CPU with mlx-cpu.

The loop drives it as it drives the torch backend, so the recipe is the same: the same token ids and answer-only labels (format.py),
the same batches in the same order (packing.BatchStream, bucketed by length: mlx-lm models
take no per-example position ids, so rows are not packed), the same token-weighted loss
across gradient accumulation, AdamW with bias correction and no weight decay, the same
warmup + cosine schedule and gradient clipping, LoRA on the same modules with the same
alpha / r scale. Checkpoints hold everything a resumed run needs (adapter, optimizer moments,
best so far; the loop adds the position in the data). Dropout draws from a key seeded by
(seed, step), so a resumed run draws the same masks.

The result is saved as a peft adapter (the format eval and export read), converted from
mlx-lm's layout: lora_a (in, r) -> lora_A.weight (r, in), lora_b (r, out) -> lora_B.weight
(out, r), and mlx-lm's `scale` set to peft's lora_alpha / r.
"""
from __future__ import annotations

import importlib.util
import platform
import sys
import time
from pathlib import Path
from typing import Any

from stages import io
from stages.errors import StageError
from stages.train.format import IGNORE, Encoded
from stages.train.hardware import BF16_MIN_SPEEDUP, Hardware
from stages.train.loop import MAX_GRAD_NORM

EVAL_BATCH_SIZE = 8
# architectures whose mlx-lm Model is `head(self.model(x))`: the head then runs only on trained
# positions (over a ~50k vocabulary it is a large share of a small model's compute)
HEAD_ON_TRAINED_ONLY = ("llama", "qwen2", "qwen3", "mistral")
CHECKPOINT_SUBDIR = "mlx"  # inside layout.checkpoints_dir: never mixed up with the torch backend's


# --- availability and hardware
def available() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def preferred() -> bool:
    """`train.backend = "auto"` picks MLX on Apple silicon when it is installed."""
    return sys.platform == "darwin" and platform.machine() == "arm64" and available()


def require(where: str) -> None:
    if not available():
        raise StageError(f"{where}: key 'train.backend' = \"mlx\" but mlx/mlx-lm are not installed; "
                         "`pip install mlx mlx-lm` (on Linux also `mlx[cpu]`), or set it to \"torch\"")


def matmul_bf16_speedup(size: int = 512, repeats: int = 10) -> float:
    """fp32 time / bf16 time of a square matmul on MLX's default device, best of `repeats` each.

    The two dtypes alternate, so load from other processes falls on both alike, and the best
    repeat is the one least slowed down.
    """
    import mlx.core as mx

    pairs = {}
    for dtype in (mx.float32, mx.bfloat16):
        a = mx.random.normal((size, size)).astype(dtype)
        b = mx.random.normal((size, size)).astype(dtype)
        mx.eval(a, b, a @ b)  # warm up
        pairs[dtype] = (a, b)
    best = {dtype: float("inf") for dtype in pairs}
    for _ in range(repeats):
        for dtype, (a, b) in pairs.items():
            t0 = time.perf_counter()
            mx.eval(a @ b)
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[mx.float32] / best[mx.bfloat16]


def detect(requested: str = "auto") -> Hardware:
    """MLX device ("mlx-gpu" = Metal, "mlx-cpu") and the dtype the frozen base computes in.

    On Metal, a timed matmul decides, as hardware.detect does for torch. MLX's CPU backend has
    no fast bf16 kernels (its bf16 matmul measures 0.9-1.3x fp32 on the CI machine, too close
    to call under load), so there it is fp32: a noisy measurement must not flip the dtype, and
    with it the recipe a checkpoint can be resumed with, between two runs.
    """
    import mlx.core as mx

    device = "mlx-gpu" if mx.default_device().type == mx.gpu else "mlx-cpu"
    if requested in ("bf16", "fp32"):
        return Hardware(device, requested, f"train.dtype = \"{requested}\"")
    if device == "mlx-cpu":
        return Hardware(device, "fp32", "MLX CPU backend: no fast bf16 matmul")
    speedup = matmul_bf16_speedup()
    if speedup >= BF16_MIN_SPEEDUP:
        return Hardware(device, "bf16", f"MLX bf16 matmul measured {speedup:.1f}x fp32")
    return Hardware(device, "fp32", f"MLX bf16 matmul measured only {speedup:.1f}x fp32")


def memory() -> dict[str, int]:
    """MLX's own allocator figures (bytes), for the metrics stream's `memory` dict."""
    import mlx.core as mx

    return {"mlx_active": int(mx.get_active_memory()), "mlx_peak": int(mx.get_peak_memory())}


# --- model
def lora_module_keys(model, targets: list[str]) -> set[str]:
    """Paths inside a transformer block (e.g. "self_attn.q_proj") whose last name is a target."""
    import mlx.nn as nn

    keys = set()
    for layer in model.layers:
        for path, module in layer.named_modules():
            if path.rsplit(".", 1)[-1] in targets and isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                keys.add(path)
    missing = sorted(set(targets) - {k.rsplit(".", 1)[-1] for k in keys})
    if missing:
        raise StageError(f"adapter.toml key 'lora.targets' {list(targets)}: the base model has no linear layer "
                         f"named {', '.join(missing)}; name modules the base model has (Llama-style: q_proj "
                         "k_proj v_proj o_proj gate_proj up_proj down_proj)")
    return keys


def load_model(base_dir: Path, lora: dict[str, Any], quantization: str, hw: Hardware):
    """The frozen base in the compute dtype (4-bit for QLoRA) with fp32 LoRA layers on every block,
    and the LoRA'd module paths inside a block."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_load_model

    model, _ = mlx_load_model(Path(base_dir))
    model.set_dtype(mx.bfloat16 if hw.dtype == "bf16" else mx.float32)
    if quantization == "nf4":
        # MLX has no nf4; its 4-bit affine quantization (group 64) is the nearest QLoRA base. As with
        # bitsandbytes, only the blocks' linear layers are quantized (embeddings and head stay as they are)
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda path, m: (
            isinstance(m, nn.Linear) and ".layers." in f".{path}" and m.weight.shape[-1] % 64 == 0))
    model.freeze()
    keys = lora_module_keys(model, lora["targets"])
    linear_to_lora_layers(model, len(model.layers), {
        "rank": lora["r"], "scale": lora["alpha"] / lora["r"], "dropout": lora["dropout"], "keys": sorted(keys)})
    return model, sorted(keys)


def adapter_weights(model) -> dict[str, Any]:
    """The trainable LoRA arrays by mlx-lm path (e.g. model.layers.0.self_attn.q_proj.lora_a)."""
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def set_adapter_weights(model, weights: dict[str, Any]) -> None:
    model.load_weights(list(weights.items()), strict=False)


def to_peft(weights: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm LoRA arrays -> peft state dict (numpy fp32), as PeftModel.save_pretrained names them."""
    import mlx.core as mx
    import numpy as np

    out = {}
    for path, array in weights.items():
        module, kind = path.rsplit(".", 1)
        name = {"lora_a": "lora_A", "lora_b": "lora_B"}.get(kind)
        if name is None:
            raise ValueError(f"unexpected trainable parameter {path}")
        out[f"base_model.model.{module}.{name}.weight"] = np.ascontiguousarray(
            np.array(array.astype(mx.float32)).T)
    return out


def save_peft(out_dir: Path, weights: dict[str, Any], lora: dict[str, Any], base_dir: Path, tokenizer) -> None:
    """adapter_model.safetensors + adapter_config.json (+ tokenizer, so the chat template travels)."""
    from safetensors.numpy import save_file

    save_file(to_peft(weights), str(Path(out_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
    # peft's adapter_config.json, written as data: peft (which needs torch) fills every key left out with its
    # default when it loads the adapter, and an MLX run stays free of torch
    io.write_json(Path(out_dir) / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir),
        "r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "target_modules": sorted(lora["targets"]), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "use_dora": False, "modules_to_save": None})
    tokenizer.save_pretrained(str(out_dir))


def save_mlx(folder: Path, weights: dict[str, Any], lora: dict[str, Any], n_layers: int, keys: list[str]) -> None:
    """The same adapter in mlx-lm's own format (`mlx_lm.generate --adapter-path <folder>` on a Mac)."""
    import mlx.core as mx

    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    io.write_json(folder / "adapter_config.json", {
        "fine_tune_type": "lora", "num_layers": n_layers,
        "lora_parameters": {"rank": lora["r"], "scale": lora["alpha"] / lora["r"], "dropout": lora["dropout"],
                            "keys": keys}})


# --- loss
def pad_batch(batch: list[Encoded], pad_id: int):
    """Right-padded inputs (the last position dropped: it predicts nothing) and the trained positions.

    Returns (inputs (B, W-1), rows, cols, targets): the loss reads the output at [rows, cols]
    against `targets`. Indices are computed here, on the host, because MLX has no boolean masking.
    """
    import mlx.core as mx
    import numpy as np

    width = max(len(e.input_ids) for e in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int32)
    labels = np.full((len(batch), width), IGNORE, dtype=np.int64)
    for row, e in enumerate(batch):
        ids[row, :len(e.input_ids)] = e.input_ids
        labels[row, :len(e.labels)] = e.labels
    shifted = labels[:, 1:]
    rows, cols = np.nonzero(shifted != IGNORE)
    return (mx.array(ids[:, :-1]), mx.array(rows.astype(np.int32)), mx.array(cols.astype(np.int32)),
            mx.array(shifted[rows, cols].astype(np.int32)))


def summed_nll(model, inputs, rows, cols, targets):
    """Summed negative log-likelihood of the trained tokens of one padded batch."""
    import mlx.core as mx
    import mlx.nn as nn

    if getattr(model, "model_type", None) in HEAD_ON_TRAINED_ONLY:
        hidden = model.model(inputs)[rows, cols]
        if model.args.tie_word_embeddings:
            logits = model.model.embed_tokens.as_linear(hidden)
        else:
            logits = model.lm_head(hidden)
    else:
        logits = model(inputs)[rows, cols]
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="sum")


def mean_loss(model, examples: list[Encoded], pad_id: int, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Token-weighted mean NLL over `examples`, dropout off; batches sorted by length to pad little."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = pad_batch([examples[i] for i in order[start:start + batch_size]], pad_id)
        total += summed_nll(model, *batch).item()
        tokens += int(batch[3].size)
    model.train(was_training)
    return total / max(1, tokens)


def loss_and_grad_fn(model):
    """(model, *pad_batch(...), step_tokens) -> (loss, LoRA gradients) of one micro-batch."""
    import mlx.nn as nn

    def loss_fn(model, inputs, rows, cols, targets, step_tokens):
        return summed_nll(model, inputs, rows, cols, targets) / step_tokens

    return nn.value_and_grad(model, loss_fn)


def accumulate(model, loss_and_grad, micro: list[list[Encoded]], pad_id: int):
    """Loss and summed gradients of one optimizer step over its micro-batches.

    Every micro-batch divides by the step's trained-token total, not its own, so the sum is
    the token-weighted mean of the whole step: accumulating is the same as one big batch.
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    tokens = sum(e.n_trained for batch in micro for e in batch)
    loss_value, grads = 0.0, None
    for batch in micro:
        value, g = loss_and_grad(model, *pad_batch(batch, pad_id), tokens)
        grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
        mx.eval(value, grads)
        loss_value += value.item()
    return loss_value, grads


# --- checkpoints: <checkpoints_dir>/mlx/step-00000120/{adapter,best,optimizer}.safetensors + state.json
# (checkpoint.py's layout, with MLX arrays; no RNG file: dropout keys are seeded by (seed, step))
def save_checkpoint(folder: Path, step: int, model, optimizer, best: dict[str, Any] | None,
                    state: dict[str, Any], keep: int) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from stages.train import checkpoint

    target = folder / f"step-{step:08d}"
    with io.atomic_dir(target) as tmp:
        mx.save_safetensors(str(tmp / "adapter.safetensors"), adapter_weights(model))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if best is not None:
            mx.save_safetensors(str(tmp / "best.safetensors"), best)
        io.write_json(tmp / "state.json", state)
    checkpoint.prune(folder, keep)
    return target


def load_checkpoint(path: Path, model, optimizer) -> tuple[dict[str, Any], dict[str, Any] | None]:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    set_adapter_weights(model, mx.load(str(path / "adapter.safetensors")))
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    best = mx.load(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
    return io.read_json(path / "state.json"), best


# --- the loop's MLX side (loop.Backend)
class MLXBackend:
    """mlx-lm LoRA layers on an MLX base, one process. Dropout draws from a key seeded by (seed, step), so a
    resumed run draws the same masks without an RNG file."""
    name = "mlx"
    checkpoint_subdir = CHECKPOINT_SUBDIR
    rank, world_size, parallelism, packing = 0, 1, "single", False  # mlx-lm models take no per-example positions

    def __init__(self, base_dir: Path, tokenizer, lora: dict[str, Any], train_cfg: dict[str, Any], hw: Hardware):
        self.base_dir, self.tokenizer, self.lora, self.cfg, self.hw = base_dir, tokenizer, lora, train_cfg, hw
        self.quantization, self.seed = train_cfg["quantization"], train_cfg["seed"]
        self.recipe = {"backend": "mlx", "dtype": hw.dtype}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def load(self, examples: list[Encoded]) -> None:
        import mlx.core as mx
        import mlx.optimizers as optim

        mx.random.seed(self.seed)  # LoRA initialisation
        self.model, self.lora_keys = load_model(self.base_dir, self.lora, self.quantization, self.hw)
        self.model.train()
        self.trainable_params = sum(v.size for v in adapter_weights(self.model).values())
        self.optimizer = optim.AdamW(learning_rate=self.cfg["lr"], betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0,
                                     bias_correction=True)  # as torch.optim.AdamW(weight_decay=0)
        self.loss_and_grad = loss_and_grad_fn(self.model)

    @property
    def description(self) -> str:
        hw = self.hw
        return (f"MLX {hw.device} {hw.dtype} ({hw.reason}), {self.quantization}, {self.trainable_params:,} "
                "trainable params, length-bucketed batches")

    def step(self, micro: list[list[Encoded]], step_tokens: int, lr: float, step: int) -> tuple[float, float]:
        import mlx.core as mx
        import mlx.optimizers as optim

        self.optimizer.learning_rate = lr
        mx.random.seed(self.seed * 1_000_003 + step)  # dropout masks depend on (seed, step) only: resumable
        loss, grads = accumulate(self.model, self.loss_and_grad, micro, self.pad_id)  # one process: its tokens
        grads, grad_norm = optim.clip_grad_norm(grads, MAX_GRAD_NORM)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, grad_norm)
        return loss, grad_norm.item()

    def val_loss(self, examples: list[Encoded]) -> float:
        return mean_loss(self.model, examples, self.pad_id)

    def snapshot(self) -> dict[str, Any]:
        return adapter_weights(self.model)  # MLX arrays are immutable: holding them is a snapshot

    def save_checkpoint(self, folder: Path, step: int, best, state: dict[str, Any], keep: int) -> None:
        save_checkpoint(folder, step, self.model, self.optimizer, best, state, keep)

    def restore_checkpoint(self, path: Path):
        return load_checkpoint(path, self.model, self.optimizer)[1]

    def save_adapter(self, folder: Path | None, best) -> None:
        weights = best if best is not None else adapter_weights(self.model)
        save_peft(folder, weights, self.lora, self.base_dir, self.tokenizer)
        save_mlx(folder / "mlx", weights, self.lora, len(self.model.layers), self.lora_keys)

    def memory(self) -> dict[str, int]:
        return memory()

    def barrier(self) -> None:
        pass

    def agree(self, flag: bool) -> bool:
        return flag
