"""The MLX backend (mlx-lm on this Linux CPU via mlx-cpu) on a tiny random Llama with the real SmolLM2 tokenizer:
it learns, its adapter is a real peft adapter with the same logits, the best checkpoint ships, it resumes mid-run
on the same loss curve, and it stops early."""
from __future__ import annotations

import json
import random

import pytest

from stages import io, layout
from stages.errors import StageError
from tests.models import adapter_config, make_tiny_model

pytest.importorskip("mlx_lm")

FACTS = [("What is the ICD-10-CM code for essential hypertension?", "I10"),
         ("What is the ICD-10-CM code for type 2 diabetes without complications?", "E11.9"),
         ("What is the ICD-10-CM code for asthma, unspecified?", "J45.909"),
         ("What is the ICD-10-CM code for acute bronchitis, unspecified?", "J20.9")]

TOML = """
base_model = "{base}"
[lora]
r = 8
alpha = 16
dropout = 0.0
[train]
backend = "mlx"
dtype = "fp32"
lr = {lr}
max_steps = {steps}
batch_size = 4
max_length = 128
warmup_ratio = 0.1
{extra}
"""


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a = FACTS[rng.randrange(len(FACTS))]
        out.append({"id": f"r{i}", "task": "code_lookup",
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def project(root, monkeypatch, base, steps=12, lr=1e-2, extra="", name="coding"):
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(root)
    for split, n, seed in (("train", 24, 1), ("val", 6, 2), ("test", 4, 3)):
        io.write_jsonl(layout.split_file(name, split), rows(n, seed))
    return adapter_config(root, name, TOML.format(base=base, steps=steps, lr=lr, extra=extra))


def metric_lines(kind: str) -> list[dict]:
    return [line for line in io.read_jsonl(layout.metrics_file("coding")) if line["kind"] == kind]


def encoded_val(base):
    from stages.train import format as fmt
    from stages.train.torch_backend import load_tokenizer

    tokenizer = load_tokenizer(base)
    examples, _ = fmt.encode_rows(tokenizer, io.read_jsonl(layout.split_file("coding", "val")), 128)
    return tokenizer, examples


def peft_model(base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(layout.lora_dir("coding")))
    return model.eval()


def torch_val_loss(model, examples) -> float:
    """Token-weighted NLL of the trained tokens, computed independently of both backends."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            keep = labels != -100
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_mlx_trains_and_its_peft_adapter_gives_the_same_logits(tmp_path, monkeypatch, tiny_base):
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm import load as mlx_load

    from stages import train

    cfg = project(tmp_path, monkeypatch, tiny_base, steps=12, extra="eval_every = 3")
    summary = train.run(cfg, "coding")
    assert summary["backend"] == "mlx" and summary["device"].startswith("mlx") and summary["steps_done"] == 12
    assert summary["best_val_loss"] < summary["start_val_loss"] - 1.0, summary

    lora = layout.lora_dir("coding")
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert (lora / "tokenizer_config.json").exists()
    assert io.read_json(lora / "train_summary.json")["best_step"] == summary["best_step"]
    assert not layout.checkpoints_dir("coding").joinpath("mlx").exists()  # finished: checkpoints removed

    # the peft adapter, on the HF base in torch, against mlx-lm's own loader of the same adapter
    hf = peft_model(tiny_base)
    mlx_model, _ = mlx_load(str(tiny_base), adapter_path=str(lora / "mlx"))
    _, val = encoded_val(tiny_base)
    ids = val[0].input_ids
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = np.array(mlx_model(mx.array([ids]))[0])
    assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
    # the adapter moved the logits (a zero adapter would match trivially)
    with torch.no_grad(), hf.disable_adapter():
        plain = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(plain - expected).max() > 0.1

    # what shipped is the best checkpoint: its validation loss, recomputed by torch, is the best one logged
    assert torch_val_loss(hf, val) == pytest.approx(summary["best_val_loss"], abs=1e-3)

    # the metrics stream the dashboard tails, with MLX memory
    steps = metric_lines("train")
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert all(s["memory"]["mlx_peak"] > 0 and s["memory"]["mlx_active"] > 0 and s["tok_s"] > 0 for s in steps)
    assert all(s["grad_norm"] is not None and 0 < s["lr"] <= 1e-2 for s in steps)
    vals = metric_lines("val")
    assert [v["step"] for v in vals] == [0, 3, 6, 9, 12]
    assert min(v["val_loss"] for v in vals) == pytest.approx(summary["best_val_loss"], abs=1e-4)
    start = metric_lines("start")[0]
    assert start["backend"] == "mlx" and start["total_steps"] == 12
    assert metric_lines("end")[0]["summary"]["best_val_loss"] == summary["best_val_loss"]


def test_fast_head_loss_equals_the_full_model_loss(tiny_base):
    import mlx.nn as nn

    from stages.train import format as fmt
    from stages.train import mlx_backend
    from stages.train.hardware import Hardware
    from stages.train.torch_backend import load_tokenizer

    lora = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    model, keys = mlx_backend.load_model(tiny_base, lora, "none", Hardware("mlx-cpu", "fp32", "test"))
    assert keys == ["self_attn.q_proj", "self_attn.v_proj"]
    tokenizer = load_tokenizer(tiny_base)
    examples, _ = fmt.encode_rows(tokenizer, rows(5, 7), 128)
    inputs, r, c, targets = mlx_backend.pad_batch(examples, tokenizer.pad_token_id)
    fast = mlx_backend.summed_nll(model, inputs, r, c, targets).item()
    full = nn.losses.cross_entropy(model(inputs)[r, c], targets, reduction="sum").item()
    assert fast == pytest.approx(full, rel=1e-5)
    assert int(targets.size) == sum(e.n_trained for e in examples)


def test_accumulated_micro_batches_equal_one_big_batch(tiny_base):
    import numpy as np
    from mlx.utils import tree_flatten

    from stages.train import format as fmt
    from stages.train import mlx_backend
    from stages.train.hardware import Hardware
    from stages.train.torch_backend import load_tokenizer

    lora = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "down_proj"]}
    model, _ = mlx_backend.load_model(tiny_base, lora, "none", Hardware("mlx-cpu", "fp32", "test"))
    # lora_b starts at zero, so only lora_b gets gradients at first: move it so both do
    model.update({"model": {"layers": [{"self_attn": {"q_proj": {"lora_b": layer.self_attn.q_proj.lora_b + 0.05}}}
                                       for layer in model.layers]}})
    tokenizer = load_tokenizer(tiny_base)
    # examples of different lengths and trained-token counts: a per-micro-batch mean would differ
    long_rows = [{"messages": [{"role": "user", "content": "List codes."},
                               {"role": "assistant", "content": "I10 E11.9 J45.909 " * k}]} for k in (1, 3, 6)]
    examples, _ = fmt.encode_rows(tokenizer, rows(3, 5) + long_rows, 128)
    step = mlx_backend.loss_and_grad_fn(model)
    one_loss, one = mlx_backend.accumulate(model, step, [examples], tokenizer.pad_token_id)
    acc_loss, acc = mlx_backend.accumulate(model, step, [examples[:1], examples[1:4], examples[4:]],
                                           tokenizer.pad_token_id)
    assert acc_loss == pytest.approx(one_loss, rel=1e-5)
    one, acc = dict(tree_flatten(one)), dict(tree_flatten(acc))
    assert one.keys() == acc.keys() and any(k.endswith("lora_a") for k in one)
    for k in one:
        assert np.allclose(np.array(acc[k]), np.array(one[k]), rtol=1e-4, atol=1e-7), k


def test_killed_run_resumes_on_the_same_loss_curve(tmp_path, monkeypatch, tiny_base):
    from stages import train
    from stages.train.metrics import MetricsStream

    extra = "eval_every = 3\ncheckpoint_every = 3"
    train.run(project(tmp_path / "whole", monkeypatch, tiny_base, steps=10, extra=extra), "coding")
    whole = {s["step"]: s["loss"] for s in metric_lines("train")}
    whole_val = {v["step"]: v["val_loss"] for v in metric_lines("val")}
    whole_weights = (layout.lora_weights("coding")).read_bytes()

    cfg = project(tmp_path / "killed", monkeypatch, tiny_base, steps=10, extra=extra)
    kill_at = random.Random().randint(4, 9)  # any step after the first checkpoint

    class Killed(Exception):
        pass

    real_step = MetricsStream.step

    def dying_step(self, step, *args, **kwargs):
        if step == kill_at:
            raise Killed(step)
        return real_step(self, step, *args, **kwargs)

    monkeypatch.setattr(MetricsStream, "step", dying_step)
    with pytest.raises(Killed):
        train.run(cfg, "coding")
    monkeypatch.setattr(MetricsStream, "step", real_step)
    assert not layout.lora_dir("coding").exists()  # nothing that looks finished
    saved = sorted(p.name for p in (layout.checkpoints_dir("coding") / "mlx").iterdir())
    assert saved and saved[-1] == f"step-{(kill_at - 1) // 3 * 3:08d}"

    summary = train.run(cfg, "coding")
    assert summary["resumed_from"] and summary["steps_done"] == 10
    resumed = metric_lines("train")
    assert [s["step"] for s in resumed] == list(range(1, 11))  # the stream holds one line per step
    assert len(metric_lines("resume")) == 1
    for s in resumed:
        assert s["loss"] == pytest.approx(whole[s["step"]], abs=1e-3), (kill_at, s["step"])
    for v in metric_lines("val"):
        assert v["val_loss"] == pytest.approx(whole_val[v["step"]], abs=1e-3)
    assert summary["best_val_loss"] == pytest.approx(min(whole_val.values()), abs=1e-3)

    from safetensors.numpy import load, load_file
    a, b = load(whole_weights), load_file(str(layout.lora_weights("coding")))
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]).max() < 1e-4 for k in a)


def test_early_stopping_keeps_the_best_adapter(tmp_path, monkeypatch, tiny_base):
    from safetensors.numpy import load_file

    from stages import train

    # lr = 1e-30 (0 is refused at load): updates far below the loss's fp32 resolution, so validation never
    # improves on the start, and patience 2 at every 2 steps stops after step 4
    cfg = project(tmp_path, monkeypatch, tiny_base, steps=20, lr=1e-30, extra="eval_every = 2\npatience = 2")
    summary = train.run(cfg, "coding")
    assert summary["stopped_early"] and summary["steps_done"] == 4 and summary["best_step"] == 0
    assert [v["step"] for v in metric_lines("val")] == [0, 2, 4]
    assert metric_lines("end")[0]["step"] == 4
    weights = load_file(str(layout.lora_weights("coding")))
    assert all(not w.any() for k, w in weights.items() if "lora_B" in k)  # the start (best) adapter


def test_qlora_recipe_trains_on_a_4bit_mlx_base(tmp_path, monkeypatch, tiny_base):
    import mlx.nn as nn

    from stages import train
    from stages.train import mlx_backend
    from stages.train.hardware import Hardware

    lora = {"r": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q_proj", "down_proj"]}
    model, _ = mlx_backend.load_model(tiny_base, lora, "nf4", Hardware("mlx-cpu", "fp32", "test"))
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.linear, nn.QuantizedLinear) and q_proj.linear.bits == 4
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # like bitsandbytes: embeddings stay unquantized

    cfg = project(tmp_path, monkeypatch, tiny_base, steps=3, extra='quantization = "nf4"')
    summary = train.run(cfg, "coding")
    assert summary["quantization"] == "nf4" and summary["steps_done"] == 3
    peft_model(tiny_base)  # loads onto the base with peft


def test_backend_choice(monkeypatch):
    from stages.train import mlx_backend, resolve_backend

    assert resolve_backend("mlx", "x.toml") == "mlx"
    assert resolve_backend("torch", "x.toml") == "torch"
    monkeypatch.setattr(mlx_backend, "preferred", lambda: True)
    assert resolve_backend("auto", "x.toml") == "mlx"
    monkeypatch.setattr(mlx_backend, "preferred", lambda: False)
    assert resolve_backend("auto", "x.toml") == "torch"
    monkeypatch.setattr(mlx_backend, "available", lambda: False)
    with pytest.raises(StageError, match=r"x\.toml: key 'train\.backend' = \"mlx\".*not installed"):
        resolve_backend("mlx", "x.toml")


def test_unknown_lora_target_names_the_key(tmp_path, monkeypatch, tiny_base):
    from stages import train

    cfg = project(tmp_path, monkeypatch, tiny_base, steps=1)
    bad = cfg.adapters["coding"].lora | {"targets": ["q_proj", "no_such_proj"]}
    object.__setattr__(cfg.adapters["coding"], "lora", bad)
    with pytest.raises(StageError, match=r"lora\.targets.*no_such_proj") as err:
        train.run(cfg, "coding")
    assert "\n" not in str(err.value)


def test_torch_and_mlx_follow_the_same_sequence_on_one_recipe(tmp_path, monkeypatch, tiny_base):
    """One loop drives both backends: the same steps, learning rates, trained tokens, validations and checkpoints."""
    from stages import train
    from stages.train import mlx_backend, torch_backend

    checkpoints = []
    for cls in (torch_backend.TorchBackend, mlx_backend.MLXBackend):
        def record(self, folder, step, *args, _real=cls.save_checkpoint, **kwargs):
            checkpoints.append((self.name, step))
            return _real(self, folder, step, *args, **kwargs)
        monkeypatch.setattr(cls, "save_checkpoint", record)
    seen = {}
    for backend in ("torch", "mlx"):
        project(tmp_path / backend, monkeypatch, tiny_base)  # the splits
        text = TOML.format(base=tiny_base, steps=6, lr=1e-2, extra="eval_every = 2\ncheckpoint_every = 2\ngrad_accum = 2")
        cfg = adapter_config(tmp_path / backend, "coding", text.replace('backend = "mlx"', f'backend = "{backend}"'))
        summary = train.run(cfg, "coding")
        assert summary["backend"] == backend
        seen[backend] = {
            "train": [(r["step"], r["epoch"], r["lr"], r["tokens"]) for r in metric_lines("train")],
            "val": [v["step"] for v in metric_lines("val")],
            "checkpoints": [step for name, step in checkpoints if name == backend],
            "end": metric_lines("end")[0]["step"],
            "summary": {k: summary[k] for k in ("steps", "steps_done", "epochs_seen", "tokens", "stopped_early")}}
    assert seen["torch"] == seen["mlx"]
    assert seen["mlx"]["val"] == [0, 2, 4, 6] and seen["mlx"]["checkpoints"] == [2, 4]


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # as on a Mac with only mlx installed: any `import torch` fails
from stages import train
from tests.models import adapter_config
train.run(adapter_config(".", "coding", open("recipe.toml").read()), "coding")
print("torch" in sys.modules and sys.modules["torch"] is not None)
"""


def test_an_mlx_run_needs_no_torch(tmp_path, monkeypatch, tiny_base):
    """With torch unimportable, MLX training runs to the end and writes its metrics, TensorBoard curves and a
    peft adapter (loaded here with peft, which does need torch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    project(tmp_path, monkeypatch, tiny_base, steps=3)
    (tmp_path / "recipe.toml").write_text(TOML.format(base=tiny_base, steps=3, lr=1e-2, extra=""))
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", TORCH_FREE], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo)}, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("False"), run.stdout[-2000:] + run.stderr[-3000:]
    assert [r["step"] for r in metric_lines("train")] == [1, 2, 3]
    events = EventAccumulator(str(layout.tensorboard_dir("coding")))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3] and events.Scalars("val/loss")
    from peft import PeftConfig
    config = PeftConfig.from_pretrained(str(layout.lora_dir("coding")))
    assert config.r == 8 and config.lora_alpha == 16 and config.peft_type == "LORA"
