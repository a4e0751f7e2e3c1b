"""bf16 training: the base is stored in bf16 (no autocast cast of every weight in every forward), the LoRA
weights and AdamW state stay fp32, the fast paths run, and a tiny model still learns. Tiny shapes: CPUs
without bf16 hardware run bf16 ~60x slower than fp32."""
from __future__ import annotations

import contextlib

import pytest

from stages import io, layout
from tests.models import make_tiny_model
from tests.test_train import project


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def test_a_bf16_run_stores_the_base_in_bf16_and_trains_fp32_lora_without_autocast(tiny_base):
    import torch

    from stages.train.hardware import Hardware
    from stages.train.torch_backend import add_lora, compute_context, load_model

    hw = Hardware("cpu", "bf16", "test")
    model = add_lora(load_model(tiny_base, "none", hw), {"r": 4, "alpha": 8, "dropout": 0.1,
                                                          "targets": ["q_proj", "v_proj"]}, "none")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert isinstance(compute_context(model.get_base_model(), hw), contextlib.nullcontext)
    # an fp32 base under bf16 compute (QLoRA's upcast norms and embeddings) still needs autocast
    fp32_base = load_model(tiny_base, "none", Hardware("cpu", "fp32", "test"))
    assert isinstance(compute_context(fp32_base, hw), torch.autocast)


def test_training_in_bf16_lowers_the_loss_and_saves_an_fp32_adapter(tmp_path, monkeypatch, tiny_base):
    import torch
    from safetensors.torch import load_file

    from stages import train

    cfg = project(tmp_path, monkeypatch, tiny_base, steps=20, extra='dtype = "bf16"')
    summary = train.run(cfg, "coding")
    assert summary["dtype"] == "bf16"
    steps = [line for line in io.read_jsonl(layout.metrics_file("coding")) if line["kind"] == "train"]
    first, last = sum(s["loss"] for s in steps[:3]) / 3, sum(s["loss"] for s in steps[-3:]) / 3
    assert last < first * 0.7, (first, last)
    assert summary["end_val_loss"] < summary["start_val_loss"] - 1.0, summary
    tensors = load_file(str(layout.lora_weights("coding")))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
