"""Block-diagonal causal attention for packed rows, computed one example at a time.

transformers turns restarting position ids into a dense (row, row) boolean mask, and SDPA with a
mask cannot use its fused causal kernel: it scores every pair in the row, most of them across
examples and thrown away (a 1024-token row of three examples does ~3x the attention work it
needs), and repeats the key/value heads for grouped-query attention on top. Here a packed row
is cut where its position ids restart and each example runs through SDPA's fused causal kernel
on its own: the work and memory are the varlen flash-attention ones, on any device.

Registered with transformers as the attention implementation "medforge_varlen". Anything that
is not a packed training row (a 2D padding mask, a KV cache) goes to transformers' own SDPA.
"""
from __future__ import annotations

import weakref

NAME = "medforge_varlen"
_last_bounds: tuple = (lambda: None, -1, [])  # (weak ref to position_ids, its version, its bounds)


def segment_bounds(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) spans over which position ids count up by one."""
    import torch

    starts = torch.diff(position_ids, dim=-1) != 1
    bounds = []
    width = position_ids.shape[-1]
    for row in starts.tolist():
        cuts = [0] + [t + 1 for t, cut in enumerate(row) if cut] + [width]
        bounds.append(list(zip(cuts[:-1], cuts[1:])))
    return bounds


def bounds_for(position_ids, batch: int) -> list[list[tuple[int, int]]]:
    """segment_bounds, computed once per forward: every layer gets the same position_ids tensor, and
    reading it back to the host is a device sync on CUDA."""
    global _last_bounds
    seen, version, bounds = _last_bounds
    if seen() is not position_ids or version != position_ids._version or len(bounds) != batch:
        bounds = segment_bounds(position_ids.expand(batch, -1))
        _last_bounds = (weakref.ref(position_ids), position_ids._version, bounds)
    return bounds


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (B, H, T, D), key/value (B, KV, T, D) → output (B, T, H, D), as transformers expects."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = []
    # unbind and split, not indexing: their backward assembles the gradient once (stack, cat), where
    # each slice's backward would zero-fill and add a whole (B, H, T, D) tensor, once per example
    for (spans, q, k, v) in zip(bounds_for(position_ids, query.shape[0]), query.unbind(0), key.unbind(0),
                                value.unbind(0)):
        sizes = [b - a for a, b in spans]
        pieces = [sdpa_attention_forward(module, qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), None,
                                         dropout=dropout, scaling=scaling, is_causal=True)[0]
                  for qs, ks, vs in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def mask(**kwargs):
    """No mask for packed rows (attention() cuts them); transformers' SDPA mask for everything else."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"]:
        return None
    return sdpa_mask(**kwargs)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
    return NAME
