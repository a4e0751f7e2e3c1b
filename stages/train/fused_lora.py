"""A faster LoRA branch for peft's Linear layers: one autograd function instead of five modules.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling`: a Bernoulli draw per input element
(torch's CPU bernoulli is as slow as the layer's own matmul), the scaling and the sum as two more
passes over the (tokens x out) output, and `x @ A.T` with a 16-column transposed weight, which
MKL runs several times slower than the same product with A.T made contiguous. Here:

- the dropout mask comes from 16-bit slices of 64-bit random words (four draws per word; on CPU
  from numpy's PCG64DXSM, seeded from torch's generator),
  keeping an element when its slice is at or above p * 65536: p is honoured to 1/65536; it is
  applied as a product with its bytes (uint8: neither a float copy of the mask nor CPU's slow `where`);
- backward keeps x and the 1-byte mask, not the 4-byte masked copy: q, k and v (and gate and
  up) share one x, so a layer saves one input for them instead of five, and backward re-masks it;
- dropout's 1/(1-p) and the LoRA scaling are one scalar, applied inside `addmm_`, which adds the
  branch into the base layer's fresh output in place: no extra pass over the output;
- every product runs on contiguous operands in the layout the backward pass needs.

In bf16 the branch computes in bf16 as peft's does under autocast: in autocast's dtype when it
is on, else in the activations' dtype (a bf16 base with fp32 LoRA weights and optimizer state, as
torch_backend.load_model sets up); the fp32 LoRA weights are cast to it per forward (r x in: tiny)
and their bf16 gradients cast back by autograd. All operands of the branch share one dtype, so the
autograd function itself never mixes dtypes, on any device.

The math is peft's (tests compare outputs and gradients, in fp32 and in bf16). Anything else —
merged or disabled adapters, several adapters, DoRA and other variants — goes through peft's own
forward.
"""
from __future__ import annotations

import types

_KEEP_SCALE = 65536


def keep_mask(shape, p: float, device):
    """Bernoulli(1 - p) as a bool tensor, from four 16-bit slices of each random 64-bit word.

    On CPU the words come from numpy's PCG64DXSM, seeded by one draw from torch's generator (so
    `torch.manual_seed` and a resumed RNG state give the same masks): 2.5x faster than torch's
    CPU `randint` (a serial Mersenne Twister): a bf16 step 2.5-6.5 % faster on the AMX Xeon (bench/train_step.py)."""
    import torch

    n = 1
    for size in shape:
        n *= size
    words = (n + 3) // 4
    if torch.device(device).type == "cpu":
        import numpy as np

        seed = int(torch.randint(0, 2 ** 62, (1,)))
        bits = torch.from_numpy(np.random.PCG64DXSM(seed).random_raw(words).view(np.int64))
    else:
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, (words,), dtype=torch.int64, device=device)
    threshold = round(p * _KEEP_SCALE) - _KEEP_SCALE // 2  # int16 values are uniform on [-32768, 32767]
    return (bits.view(torch.int16)[:n] >= threshold).view(shape)


def masked(x, mask):
    """x with the dropped elements zeroed (mask None: nothing dropped).

    A product with the mask's bytes as uint8 (a free view), not `where`: CPU's `where` is 2-4x slower,
    which under bf16 made the masks cost more than the branch's matmuls; x's dtype wins the promotion."""
    import torch

    return x if mask is None else x * mask.view(torch.uint8)


def _lora_function():
    import torch

    class LoraBranch(torch.autograd.Function):
        """result + c * ((x * mask) @ A.T) @ B.T, with c = scaling / (1 - p), added into `result`."""

        @staticmethod
        def forward(ctx, x, result, weight_a, weight_b, c: float, mask):
            a = masked(x, mask) @ weight_a.t().contiguous()
            # `result` is the base layer's own fresh output, which nothing saved: add into it
            ctx.mark_dirty(result)
            result.addmm_(a, weight_b.t().contiguous(), alpha=c)
            ctx.save_for_backward(x, a, weight_a, weight_b, mask)
            ctx.c = c
            return result

        @staticmethod
        def backward(ctx, grad):
            x, a, weight_a, weight_b, mask = ctx.saved_tensors
            c = ctx.c
            grad_a = (grad @ weight_b).mul_(c)                       # (tokens, r)
            grad_b = (a.t() @ grad).t().mul_(c) if ctx.needs_input_grad[3] else None     # (out, r)
            grad_w_a = (masked(x, mask).t() @ grad_a).t() if ctx.needs_input_grad[2] else None  # (r, in)
            grad_x = masked(grad_a @ weight_a, mask) if ctx.needs_input_grad[0] else None
            return grad_x, grad, grad_w_a, grad_b, None, None

    return LoraBranch


_BRANCH = None


def compute_dtype(x):
    """The dtype the branch runs in: autocast's while it is on (peft's layers would run in it), else x's."""
    import torch

    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _forward(self, x, *args, **kwargs):
    import torch

    adapters = self.active_adapters
    adapter = adapters[0] if len(adapters) == 1 else None
    if (adapter is None or adapter not in self.lora_A or self.disable_adapters or self.merged
            or kwargs.get("adapter_names") is not None or adapter in getattr(self, "lora_variant", {})):
        return self._peft_forward(x, *args, **kwargs)
    dtype = compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1])
    result = self.base_layer(x2, *args, **kwargs)  # on 2D rows: a fresh (tokens, out) tensor, not a view
    result_dtype = result.dtype  # a quantized base can answer in its input's dtype; peft returns that one
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    mask = keep_mask(x2.shape, p, x.device) if p > 0 else None
    global _BRANCH
    if _BRANCH is None:
        _BRANCH = _lora_function()
    # every cast is a no-op where dtypes already agree (fp32 throughout, or bf16 activations and base);
    # autograd casts the gradients of the cast operands back (fp32 LoRA weights get fp32 gradients)
    weight_a, weight_b = self.lora_A[adapter].weight.to(dtype), self.lora_B[adapter].weight.to(dtype)
    out = _BRANCH.apply(x2.to(dtype), result.to(dtype), weight_a, weight_b,
                        float(self.scaling[adapter]) / (1.0 - p), mask)
    return out.view(*x.shape[:-1], out.shape[-1]).to(result_dtype)


def install(model) -> int:
    """Route every plain peft LoRA Linear of `model` through the fused branch; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
