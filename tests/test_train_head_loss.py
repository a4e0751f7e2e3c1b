"""The in-place head loss is cross-entropy over the head's logits: same NLL, same gradients."""
from __future__ import annotations

import pytest


def reference(hidden, weight, targets):
    import torch.nn.functional as F

    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")


def inputs(rows: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(32, 1000, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1000, 32, generator=g))
    head.weight.requires_grad_(False)
    hidden = torch.randn(rows, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 1000, (rows,), generator=g)
    return head, hidden, targets


@pytest.mark.parametrize("rows", [1, 63, 64, 200])  # chunk edges: fewer, exactly, more than CHUNK_ROWS
def test_nll_and_hidden_gradient_equal_cross_entropy(rows):
    import torch

    from stages.train.head_loss import applies, head_nll

    head, hidden, targets = inputs(rows)
    assert applies(head)
    upstream = torch.rand(rows, generator=torch.Generator().manual_seed(1))  # per-token weights, not just a sum
    expected = reference(hidden, head.weight, targets)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)
    nll = head_nll(head, hidden, targets)
    (grad,) = torch.autograd.grad((nll * upstream).sum(), hidden)
    assert nll.dtype == torch.float32
    assert torch.allclose(nll, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_under_bf16_autocast_it_matches_cross_entropy_at_bf16_precision():
    import torch

    from stages.train.head_loss import head_nll

    head, hidden, targets = inputs(100, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(hidden, head.weight, targets)
        nll = head_nll(head, hidden, targets)
    (expected_grad,) = torch.autograd.grad(expected.sum(), hidden)
    (grad,) = torch.autograd.grad(nll.sum(), hidden)
    assert nll.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.allclose(nll, expected, atol=1e-3, rtol=1e-3)
    assert torch.allclose(grad, expected_grad, atol=2e-2, rtol=2e-2)


def test_without_gradients_it_only_scores():
    import torch

    from stages.train.head_loss import head_nll

    head, hidden, targets = inputs(10, seed=3)
    with torch.no_grad():
        nll = head_nll(head, hidden, targets)
    assert not nll.requires_grad
    assert torch.allclose(nll, reference(hidden, head.weight, targets).detach(), atol=1e-5)


def test_a_trained_or_biased_head_is_not_its_case():
    import torch

    from stages.train.head_loss import applies

    assert not applies(torch.nn.Linear(4, 8, bias=True).requires_grad_(False))
    assert not applies(torch.nn.Linear(4, 8, bias=False))  # weight requires grad: the head is being trained
    assert not applies(torch.nn.Embedding(8, 4))


def test_with_a_bf16_head_and_bf16_hidden_states_it_matches_cross_entropy_at_bf16_precision():
    """The trainer's bf16 path: a base stored in bf16, no autocast. NLL stays fp32, the hidden-state
    gradient comes back in bf16 like the hidden states."""
    import torch

    from stages.train.head_loss import head_nll

    head, hidden, targets = inputs(100, seed=4)
    head.to(torch.bfloat16)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_(True)
    upstream = torch.rand(100, generator=torch.Generator().manual_seed(5))
    expected = reference(hidden.float(), head.weight.float(), targets)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)
    nll = head_nll(head, hidden, targets)
    (grad,) = torch.autograd.grad((nll * upstream).sum(), hidden)
    assert nll.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.allclose(nll, expected, atol=5e-2, rtol=2e-2)
    assert (grad.float() - expected_grad.float()).norm() <= 3e-2 * expected_grad.float().norm()
