"""Block-diagonal causal attention for packed rows, computed one example at a time.

transformers turns restarting position ids into a dense (row, row) boolean mask, and SDPA with a
mask cannot use its fused causal kernel: it scores every pair in the row, most of them across
examples and thrown away (a 1024-token row of three examples does ~3x the attention work it
needs), and repeats the key/value heads for grouped-query attention on top. Here a packed row
is cut where its position ids restart and each example runs through SDPA's fused causal kernel
on its own: the work and memory are the varlen flash-attention ones, on any device.

Examples of about the same length (within PAD_SLACK) go through SDPA together as one batch,
right-padded to the longest: with a causal mask a real query never sees a padded key, and the
padded queries' outputs are dropped, so it is exact; on the AMX Xeon's two cores one call over
8 NEWS2 examples took 48 ms forward and backward per layer against 57 ms for 8 calls (SDPA spreads
batch x heads over the threads; 9 heads alone leave one idle part of the time): a whole bf16
training step 6-8.5 % faster (bench/train_step.py).

On CPU in bf16, each example up to SCORES_MAX_LEN tokens goes alone through `scores_attention`
instead of SDPA: the (query, key) scores as bf16 matmuls, which run on the CPU's bf16 units
(AVX512-BF16, AMX), where torch's CPU flash attention spends its time outside them. On the Zen 5
EPYC, a batch of 8 examples forward and backward: 7 against 17 ms at 150 tokens, 52 against 72 ms
at 450, even at ~600 and slower beyond (the scores grow with the square of the length); in a whole
bf16 step its attention took 1.1 s where SDPA's took 1.9 s (torch.profiler). Alone, not padded: no
padded scores to compute (the step 1.07x faster than padded, bench/train_step.py). In fp32 SDPA is
as fast or faster, and stays.

Registered with transformers as the attention implementation "medforge_varlen". Anything that
is not a packed training row (a 2D padding mask, a KV cache) goes to transformers' own SDPA.
"""
from __future__ import annotations

import weakref

NAME = "medforge_varlen"
PAD_SLACK = 1.15  # a padded batch may hold at most 15 % more positions than its examples
SCORES_MAX_LEN = 512  # CPU bf16: scores_attention up to this many positions, SDPA beyond
SCORES_PAD_SLACK = 0.0  # PAD_SLACK for the scores path: 0, each example alone (padding only adds scores)
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


def padded_groups(sizes: list[int], slack: float) -> list[list[int]]:
    """Indices of `sizes` in groups of similar length: each group padded to its longest holds at most
    `slack` times its real positions. Greedy over the lengths in ascending order."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(sizes)), key=sizes.__getitem__):
        group = groups[-1] if groups else None
        if group is not None and sizes[i] * (len(group) + 1) <= slack * (total + sizes[i]):
            group.append(i)
            total += sizes[i]
        else:
            groups.append([i])
            total = sizes[i]
    return groups


def _scores_function():
    import torch

    class ScoresAttention(torch.autograd.Function):
        """Causal attention over (B, H, L, D) queries and (B, KV, L, D) keys and values (grouped-query: head h
        reads key/value head h // (H / KV), as transformers' repeat_kv) from explicit scores, in the inputs'
        dtype: scores and probabilities (B, H, L, L) kept for backward instead of recomputed. Softmax reduces in
        fp32 (torch's CPU softmax accumulates in fp32 for bf16); the output is (B, L, H, D), as SDPA's callers
        in transformers return it."""

        @staticmethod
        def forward(ctx, q, k, v, scale: float):
            batch, heads, length, dim = q.shape
            per_kv = heads // k.shape[1]
            # the query heads of one key/value head as one (G * L, D) matrix: no repeated keys or values
            qg = q.reshape(batch, k.shape[1], per_kv * length, dim)
            scores = torch.matmul(qg, k.transpose(-1, -2))
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1)
            scores.view(batch, k.shape[1], per_kv, length, length).masked_fill_(future, float("-inf"))
            probs = torch.softmax(scores.mul_(scale), dim=-1)
            out = torch.matmul(probs, v)
            ctx.save_for_backward(qg, k, v, probs, out)
            ctx.scale = scale
            return out.view(batch, heads, length, dim).transpose(1, 2)

        @staticmethod
        def backward(ctx, grad):
            qg, k, v, probs, out = ctx.saved_tensors
            batch, heads, length, dim = grad.shape[0], grad.shape[2], grad.shape[1], grad.shape[3]
            g = grad.transpose(1, 2).reshape(qg.shape)
            # softmax backward: d scores = P * (dP - rowsum(dO * O)); a masked score has P = 0, so no mask here
            delta = (g.float() * out.float()).sum(-1, keepdim=True).to(g.dtype)
            dscores = torch.matmul(g, v.transpose(-1, -2)).sub_(delta).mul_(probs)
            dq = torch.matmul(dscores, k).mul_(ctx.scale)
            dk = torch.matmul(dscores.transpose(-1, -2), qg).mul_(ctx.scale)
            dv = torch.matmul(probs.transpose(-1, -2), g)
            return dq.view(batch, heads, length, dim), dk, dv, None

    return ScoresAttention


_SCORES = None


def scores_attention(q, k, v, scale: float):
    """ScoresAttention.apply: causal attention from explicit bf16 scores, (B, L, H, D) out."""
    global _SCORES
    if _SCORES is None:
        _SCORES = _scores_function()
    return _SCORES.apply(q, k, v, scale)


def scores_path(q, dropout: float) -> bool:
    """Whether examples of q's kind (CPU, bf16, no attention dropout) up to SCORES_MAX_LEN take scores_attention."""
    import torch

    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and not dropout and SCORES_MAX_LEN > 0


def call_groups(sizes: list[int], scores: bool) -> list[list[int]]:
    """The calls one packed row's examples take, each a group of similar lengths (padded_groups): on the scores path
    the examples up to SCORES_MAX_LEN within SCORES_PAD_SLACK (bench/train_step.py's padded_scores variant times
    PAD_SLACK there), the rest within PAD_SLACK."""
    if not scores:
        return padded_groups(sizes, PAD_SLACK)
    out = []
    for keep, slack in ((lambda n: n <= SCORES_MAX_LEN, SCORES_PAD_SLACK), (lambda n: n > SCORES_MAX_LEN, PAD_SLACK)):
        picked = [i for i, n in enumerate(sizes) if keep(n)]
        out += [[picked[j] for j in group] for group in padded_groups([sizes[i] for i in picked], slack)]
    return out


def _causal(module, pieces_q, pieces_k, pieces_v, dropout, scaling, scores: bool):
    """Causal attention over examples of about one length, as one right-padded batch (scores_attention on the
    scores path up to SCORES_MAX_LEN, else SDPA); each example's output (its length, heads, head dim)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sizes = [q.shape[1] for q in pieces_q]
    longest = max(sizes)

    def batch(pieces):
        return torch.stack([F.pad(p, (0, 0, 0, longest - p.shape[1])) for p in pieces])

    if len(sizes) == 1:
        q, k, v = pieces_q[0][None], pieces_k[0][None], pieces_v[0][None]
    else:
        q, k, v = batch(pieces_q), batch(pieces_k), batch(pieces_v)
    if scores and longest <= SCORES_MAX_LEN:
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        out = scores_attention(q, k, v, scale)
    else:
        out = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
    return [o[:n] for o, n in zip(out.unbind(0), sizes)]


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (B, H, T, D), key/value (B, KV, T, D) → output (B, T, H, D), as transformers expects."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = []
    scores = scores_path(query, dropout)
    # unbind and split, not indexing: their backward assembles the gradient once (stack, cat), where
    # each slice's backward would zero-fill and add a whole (B, H, T, D) tensor, once per example
    for (spans, q, k, v) in zip(bounds_for(position_ids, query.shape[0]), query.unbind(0), key.unbind(0),
                                value.unbind(0)):
        sizes = [b - a for a, b in spans]
        qs, ks, vs = q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1)
        pieces = [None] * len(sizes)
        for group in call_groups(sizes, scores):
            outs = _causal(module, [qs[i] for i in group], [ks[i] for i in group], [vs[i] for i in group],
                           dropout, scaling, scores)
            for i, out in zip(group, outs):
                pieces[i] = out
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0))
    return torch.stack(rows), None


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
