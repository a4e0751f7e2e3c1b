"""The output head and cross-entropy with the head's gradient done in place, in the forward pass.

Over SmolLM2's 49k vocabulary the logits of 2k trained tokens are 0.4 GB in fp32, and
`cross_entropy` makes three more tensors that size (log-softmax, a zeroed gradient, the softmax
gradient), each a fresh allocation the kernel must page in. Here the logits tensor is the only
one: row chunks small enough to stay in cache get their log-sum-exp, then become softmax minus
one-hot in place, and one matmul with the head weight turns them into the gradient for the
hidden states. A token's NLL gradient is that row times the NLL's own upstream gradient (a
scalar per token), so backward only scales it.

Only for a frozen head without bias (LoRA never trains the head); `token_nll` uses the plain
head and `cross_entropy` otherwise.
"""
from __future__ import annotations

CHUNK_ROWS = 64  # x 49k vocabulary x 4 bytes = 12.6 MB: in cache while its row is reduced and rewritten


def applies(head) -> bool:
    import torch

    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def _function():
    import torch

    class HeadNLL(torch.autograd.Function):
        """nll[i] = logsumexp(h[i] @ W.T) - (h[i] @ W.T)[target[i]], fp32 reductions."""

        @staticmethod
        def forward(ctx, hidden, weight, targets):
            logits = hidden @ weight.t()  # under autocast: in its dtype; the reductions below are fp32
            nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
            want_grad = ctx.needs_input_grad[0]
            for start in range(0, len(targets), CHUNK_ROWS):
                chunk = slice(start, start + CHUNK_ROWS)
                block = logits[chunk].float()  # a view when the logits are fp32
                lse = torch.logsumexp(block, dim=-1)
                picked = (torch.arange(len(block), device=block.device), targets[chunk])  # each row's target
                nll[chunk] = lse - block[picked]
                if want_grad:  # d nll / d logits = softmax - one-hot
                    block.sub_(lse[:, None]).exp_()
                    block[picked] -= 1.0
                    if block.dtype != logits.dtype:  # half-precision logits: .float() was a copy
                        logits[chunk] = block
            if want_grad:
                ctx.save_for_backward(logits @ weight)
            del logits
            return nll

        @staticmethod
        def backward(ctx, grad_nll):
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_nll[:, None].to(grad_hidden.dtype), None, None

    return HeadNLL


_HEAD_NLL = None


def head_nll(head, hidden, targets):
    """Per-token NLL of `targets` under `head(hidden)` (rows of hidden: trained positions only)."""
    global _HEAD_NLL
    if _HEAD_NLL is None:
        _HEAD_NLL = _function()
    return _HEAD_NLL.apply(hidden, head.weight, targets)
