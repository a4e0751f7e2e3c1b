"""FSDP-QLoRA: with a 4-bit (nf4) base and several processes, each rank keeps 1/N of the frozen base.

Data parallelism (distributed.py) keeps a whole replica of the base on every GPU. With nf4 (a base
chosen 4-bit to fit at all) torch FSDP2 `fully_shard` shards it instead, as `accelerate launch`
does for FSDP-QLoRA: each decoder layer is one unit, gathered just before its forward (and again
for its backward) and freed after; the causal LM itself is the root unit (embeddings, final norm,
output head). What it takes:

- bitsandbytes packs 4-bit weights into uint8, which FSDP does not shard; load_model stores the
  same bytes as the compute dtype instead (`bnb_4bit_quant_storage`).
- FSDP reduces the LoRA gradients itself (reduce-scatter), so distributed.sum_gradients stands
  aside; FSDP is told to SUM them, not average: the loss is already divided by the whole step's tokens.
- Every forward and backward is collective, so all ranks run as many (torch_backend gives a rank
  with no examples in a batch a throwaway one).
- Parameters and optimizer state become DTensor shards: `full` gathers one back into a whole
  tensor, `shard_like` cuts a whole tensor to this rank's part, so checkpoints and the exported
  adapter are the very files one process writes.

Each rank loads the whole 4-bit base onto its device before sharding it (as accelerate does for
4-bit weights): loading needs the 4-bit base to fit one GPU; training then holds 1/N of it.
NCCL on CUDA; gloo on CPU, where the tests run two processes.
"""
from __future__ import annotations

import types

from stages.errors import StageError


def shard(model, forward) -> None:
    """Shard the base of the peft `model` in place: one FSDP unit per decoder layer, the causal LM as root.

    `forward(base, ...)` becomes a method of the base registered with FSDP, so that calling it
    gathers the root's parameters as calling the module itself would (the trainer runs the decoder
    and the output head separately, never the module's own forward).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    base = model.get_base_model()
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise StageError(f"adapter.toml key 'base_model': {type(base).__name__} has no decoder `layers` to shard "
                         "for nf4 on several GPUs; set CUDA_VISIBLE_DEVICES to one GPU or "
                         "'train.quantization' = \"none\"")
    for module in base.modules():
        # bitsandbytes repacks a 4-bit weight in place for CPU inference; here that weight is FSDP's gathered copy
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    units = [*layers, base]  # children first: the root takes only what no layer holds
    for unit in units:
        fully_shard(unit)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # a sum over ranks, as distributed.sum_gradients does
        unit.set_force_sum_reduction_for_comms(True)  # as a plain SUM: gloo has no PREMUL_SUM
    setattr(base, forward.__name__, types.MethodType(forward, base))
    register_fsdp_forward_method(base, forward.__name__)


def full(tensor):
    """The whole tensor behind an FSDP shard (collective: every rank must ask, in the same order)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value, param):
    """This rank's part of the whole tensor `value`, laid out like `param` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value.to(param.device, param.dtype)
    value = value.to(param.device_mesh.device_type, param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
