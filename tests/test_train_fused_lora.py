"""The fused LoRA branch computes peft's LoRA: same outputs and gradients, dropout at its rate."""
from __future__ import annotations

import contextlib
import functools

import pytest

from tests.models import make_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(base, dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; make every branch count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.item(), grads


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def test_without_dropout_outputs_and_gradients_equal_peft(base):
    import torch

    from stages.train import fused_lora

    model = lora_model(base, 0.0)
    model.train()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    expected_loss, expected = loss_and_grads(model, ids)
    assert fused_lora.install(model) == 2 * len(TARGETS)  # the tiny model has two layers
    loss, grads = loss_and_grads(model, ids)
    assert abs(loss - expected_loss) < 1e-5
    assert grads.keys() == expected.keys()
    for name in grads:
        assert torch.allclose(grads[name], expected[name], atol=1e-5, rtol=1e-4), name


def test_with_dropout_it_is_peft_under_the_same_mask(base, monkeypatch):
    """peft's dropout with a given mask (x * mask / (1 - p)) against the fused branch with that mask."""
    import torch

    from stages.train import fused_lora

    p = 0.25
    model = lora_model(base, p)
    model.train()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    masks: list = []

    def recorded(shape, p_, device):
        masks.append(torch.rand(shape, generator=torch.Generator().manual_seed(len(masks))) >= p_)
        return masks[-1]

    replay = iter(range(10 ** 6))

    class Replay(torch.nn.Module):  # peft's dropout module, replaying the recorded masks in call order
        def forward(self, x):
            mask = masks[next(replay)]
            return x * mask.view(x.shape) / (1 - p)

    monkeypatch.setattr(fused_lora, "keep_mask", recorded)
    fused_lora.install(model)
    loss, grads = loss_and_grads(model, ids)
    assert len(masks) == 2 * len(TARGETS)
    for module in model.modules():
        if hasattr(module, "_peft_forward"):
            module.forward = module._peft_forward
            module.lora_dropout["default"] = Replay()
    expected_loss, expected = loss_and_grads(model, ids)
    assert abs(loss - expected_loss) < 1e-5
    for name in grads:
        assert torch.allclose(grads[name], expected[name], atol=1e-5, rtol=1e-4), name


def test_keep_mask_drops_at_the_configured_rate():
    import torch

    from stages.train.fused_lora import keep_mask

    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.5):
        mask = keep_mask((1000, 1000), p, "cpu")
        assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
        assert abs((1 - mask.float().mean().item()) - p) < 0.002
    a, b = keep_mask((64, 64), 0.5, "cpu"), keep_mask((64, 64), 0.5, "cpu")
    assert not torch.equal(a, b)  # fresh draws every call
    torch.manual_seed(3)
    c = keep_mask((7, 5), 0.3, "cpu")
    torch.manual_seed(3)
    assert torch.equal(c, keep_mask((7, 5), 0.3, "cpu"))  # seeded like everything else (exact resume)


def test_eval_mode_and_merged_adapters_still_match(base):
    import torch

    from stages.train import fused_lora

    model = lora_model(base, 0.1)
    model.eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        fused_lora.install(model)
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
        model.merge_adapter()  # merged: peft's own forward
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward over a training forward of the decoder
    (the layers LoRA is in; the output head's logits would swamp them), weights aside."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.get_base_model().get_decoder()(input_ids=ids)
    return sum(storages.values())


def test_with_dropout_it_keeps_far_less_for_backward_than_peft(base):
    """peft keeps a masked fp32 copy of the input per LoRA branch; the fused branch keeps the input
    (one for q, k and v, one for gate and up) and a 1-byte mask."""
    import torch

    from stages.train import fused_lora

    model = lora_model(base, 0.1)
    model.train()
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(5))
    peft_bytes = saved_bytes(model, ids)
    fused_lora.install(model)
    fused_bytes = saved_bytes(model, ids)
    assert fused_bytes < 0.8 * peft_bytes, (fused_bytes, peft_bytes)


def close_at_bf16(got, expected, tolerance: float = 3e-2) -> bool:
    """Equal at bf16 precision: the difference is small against the tensor's own size (a norm ratio, as an
    elementwise tolerance fails on the near-zero elements that bf16 rounds most)."""
    return (got.float() - expected.float()).norm().item() <= tolerance * expected.float().norm().item()


@pytest.mark.parametrize("setup", ["bf16 base", "autocast over fp32 base"])
def test_under_bf16_outputs_and_gradients_equal_peft(base, setup):
    """bf16 as the trainer runs it (a bf16 base, fp32 LoRA weights: no autocast) and as QLoRA's fp32 parts
    run it (autocast): the fused branch computes in bf16 and must stay peft's LoRA at bf16 precision."""
    import torch

    from stages.train import fused_lora

    model = lora_model(base, 0.0)
    if setup == "bf16 base":  # the base in bf16, LoRA in fp32 as peft keeps it over a half-precision base
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        context = contextlib.nullcontext
    else:
        context = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.train()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(6))
    with context():
        expected_loss, expected = loss_and_grads(model, ids)
        fused_lora.install(model)
        loss, grads = loss_and_grads(model, ids)
    assert abs(loss - expected_loss) < 2e-2 * abs(expected_loss)
    for name in grads:
        assert grads[name].dtype == torch.float32, name  # fp32 gradients for the fp32 LoRA weights and AdamW
        assert close_at_bf16(grads[name], expected[name]), name


def test_under_bf16_the_fused_branch_runs_not_peft(base):
    """The fused branch no longer falls back to peft for bf16 activations or under autocast."""
    import torch

    from stages.train import fused_lora

    model = lora_model(base, 0.1)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    fused_lora.install(model)
    model.train()
    peft_calls = []
    for module in model.modules():
        if hasattr(module, "_peft_forward"):
            real = module._peft_forward
            module._peft_forward = lambda *a, real=real, **k: peft_calls.append(1) or real(*a, **k)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(7))
    for context in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        with context:
            model(input_ids=ids).logits.float().sum().backward()
    assert peft_calls == []
