"""Training on a tiny random Llama with the real SmolLM2 tokenizer: masks, the loop, outputs, metrics."""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages import io, layout
from stages.errors import StageError
from tests.models import adapter_config, make_tiny_model, smollm2_tokenizer

FACTS = [("What is the ICD-10-CM code for essential hypertension?", "I10"),
         ("What is the ICD-10-CM code for type 2 diabetes without complications?", "E11.9"),
         ("What is the ICD-10-CM code for asthma, unspecified?", "J45.909"),
         ("What is the ICD-10-CM code for acute bronchitis, unspecified?", "J20.9")]


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a = FACTS[rng.randrange(len(FACTS))]
        out.append({"id": f"r{i}", "task": "code_lookup" if i % 2 else "describe",
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def write_splits(name: str, n_train: int = 32, n_val: int = 8, n_test: int = 8) -> None:
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_test, 3)):
        io.write_jsonl(layout.split_file(name, split), rows(n, seed))


TOML = """
base_model = "{base}"
[lora]
r = 8
alpha = 16
dropout = 0.0
[train]
lr = {lr}
max_steps = {steps}
batch_size = 4
max_length = 128
warmup_ratio = 0.1
{extra}
[eval]
max_examples = 6
"""


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def project(tmp_path, monkeypatch, base, name="coding", steps=30, lr=1e-2, extra=""):
    monkeypatch.chdir(tmp_path)
    write_splits(name)
    return adapter_config(tmp_path, name, TOML.format(base=base, steps=steps, lr=lr, extra=extra))


# --- the loss mask
def test_mask_trains_only_assistant_text_and_end_of_turn():
    from stages.train.format import IGNORE, encode

    tok = smollm2_tokenizer()
    messages = [{"role": "system", "content": "You code diagnoses."},
                {"role": "user", "content": "Code for essential hypertension?"},
                {"role": "assistant", "content": "I10"},
                {"role": "user", "content": "And asthma?"},
                {"role": "assistant", "content": "J45.909 (asthma, unspecified)"}]
    e = encode(tok, messages, max_length=512)
    trained = [t for t, label in zip(e.input_ids, e.labels) if label != IGNORE]
    assert [label for label in e.labels if label != IGNORE] == trained
    assert tok.decode(trained) == "I10<|im_end|>J45.909 (asthma, unspecified)<|im_end|>"
    # the end-of-turn token itself is trained, the newline after it and every header are not
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained.count(im_end) == 2
    assert e.input_ids.count(im_end) == 5
    prompt_text = tok.decode([t for t, label in zip(e.input_ids, e.labels) if label == IGNORE])
    assert "Code for essential hypertension?" in prompt_text and "<|im_start|>assistant" in prompt_text


def test_truncation_keeps_max_length_and_drops_answerless_rows():
    from stages.train.format import encode, encode_rows

    tok = smollm2_tokenizer()
    long_answer = [{"role": "user", "content": "List codes."}, {"role": "assistant", "content": "A00 " * 200}]
    e = encode(tok, long_answer, max_length=40)
    assert len(e.input_ids) == 40 and 0 < e.n_trained < 40
    kept, dropped = encode_rows(tok, [{"messages": long_answer}], max_length=10)  # the prompt alone fills 10
    assert kept == [] and dropped == 1


# --- pure loop parts
def test_cosine_schedule_warms_up_then_decays_to_zero():
    from stages.train.torch_backend import cosine_lr

    lrs = [cosine_lr(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-5


def test_batches_group_similar_lengths_and_cover_every_example():
    from stages.train.torch_backend import length_batches

    lengths = [random.Random(0).randrange(5, 500) for _ in range(64)]
    batches = length_batches(lengths, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(64))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread < 500  # sorted buckets: the spreads telescope to at most the overall range


def test_dtype_override_wins():
    from stages.train.hardware import detect

    assert detect("fp32").dtype == "fp32"
    assert detect("bf16").dtype == "bf16"
    assert detect("auto").dtype in ("bf16", "fp32")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_training_keeps_freed_activations_instead_of_faulting_them_in_every_step(tiny_base):
    """Steps allocate and free the same large tensors (here 480 MB of them): once the CPU model is
    loaded, a later step is served from the heap, not from fresh pages the kernel must zero."""
    code = """if True:
        import resource, sys, torch
        from stages.train import torch_backend
        from stages.train.hardware import Hardware
        if sys.argv[1] != "default":
            torch_backend.load_model(sys.argv[1], "none", Hardware("cpu", "fp32", "test"))
        def step():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            held = [torch.ones(n << 20) for n in (16, 64, 8, 32)]
            del held
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print([step() for _ in range(4)][-1])
    """
    faults = {how: int(subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                                      check=True, cwd=Path(__file__).resolve().parents[1]).stdout)
              for how, arg in (("keep", str(tiny_base)), ("default", "default"))}
    assert faults["default"] > 100_000  # all 120k pages of 4 KiB faulted in again: glibc's default
    assert faults["keep"] < 1_000


# --- a full run on the tiny model
def test_train_tiny_model_learns_and_writes_outputs(tmp_path, monkeypatch, tiny_base, capsys):
    from stages import train

    cfg = project(tmp_path, monkeypatch, tiny_base, steps=30)
    summary = train.run(cfg, "coding")
    last = capsys.readouterr().out.splitlines()[-1]  # the log's summary line, losses as its step lines show them
    assert re.fullmatch(r"train:coding: val loss \d+\.\d{4} -> \d+\.\d{4} \(best \d+\.\d{4} at step \d+, exported\), "
                        r"[\d.]+ trained tok/s -> adapters/coding/out/lora", last), last

    lora = layout.lora_dir("coding")
    assert layout.lora_weights("coding").exists()
    assert json.loads((lora / "adapter_config.json").read_text())["r"] == 8
    assert "<|im_start|>" in (lora / "tokenizer_config.json").read_text() + (
        (lora / "chat_template.jinja").read_text() if (lora / "chat_template.jinja").exists() else "")
    on_disk = io.read_json(lora / "train_summary.json")
    assert on_disk["steps"] == 30 and on_disk["tokens"] > 0 and on_disk["tok_s"] > 0
    assert on_disk["end_val_loss"] < on_disk["start_val_loss"] - 1.0, on_disk
    assert summary["device"] == "cpu" and summary["dtype"] in ("bf16", "fp32")
    assert not list(lora.parent.glob(".lora.*"))  # no temporary folder left behind

    lines = list(io.read_jsonl(layout.metrics_file("coding")))
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("train") == 30
    steps = [line for line in lines if line["kind"] == "train"]
    assert [s["step"] for s in steps] == list(range(1, 31))
    for s in steps:
        assert s["total_steps"] == 30 and s["tokens"] > 0 and s["tok_s"] > 0 and s["eta_s"] >= 0
        assert s["memory"]["rss"] > 0 and 0 < s["lr"] <= 1e-2
    # after the last step only the final validation is left: the ETA is its time at the earlier ones' pace (no
    # more than the longest of them took between the rows around it), not a step's
    took = [v["elapsed"] - before.get("elapsed", 0.0) for before, v in zip(lines, lines[1:]) if v["kind"] == "val"]
    assert len(took) == 6 and 0 <= steps[-1]["eta_s"] <= max(took[:-1]) + 0.05, (steps[-1]["eta_s"], took)
    first, last = sum(s["loss"] for s in steps[:3]) / 3, sum(s["loss"] for s in steps[-3:]) / 3
    assert last < first * 0.7, (first, last)
    vals = [line for line in lines if line["kind"] == "val"]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 30

    # the adapter loads back onto its base with peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(lora))


def test_a_second_run_restarts_the_metrics_stream(tmp_path, monkeypatch, tiny_base):
    from stages import train

    cfg = project(tmp_path, monkeypatch, tiny_base, steps=2)
    train.run(cfg, "coding")
    train.run(cfg, "coding")
    kinds = [line["kind"] for line in io.read_jsonl(layout.metrics_file("coding"))]
    assert kinds.count("start") == 1 and kinds.count("train") == 2


def test_qlora_nf4_on_cpu(tmp_path, monkeypatch, tiny_base):
    from stages import train

    cfg = project(tmp_path, monkeypatch, tiny_base, steps=4, extra='quantization = "nf4"')
    summary = train.run(cfg, "coding")
    assert summary["quantization"] == "nf4" and summary["steps"] == 4
    assert layout.lora_weights("coding").exists()
    # the saved adapter holds only LoRA weights, in a normal float dtype
    from safetensors.torch import load_file
    tensors = load_file(str(layout.lora_weights("coding")))
    assert tensors and all("lora_" in k for k in tensors)
    # eval scores it on the same 4-bit base it was trained on
    from stages import evaluate
    report = evaluate.run(cfg, "coding")
    assert report["quantization"] == "nf4" and report["adapter_ppl"] > 0 and report["base_ppl"] > 0


def test_nf4_base_is_really_4bit(tiny_base):
    from stages.train.hardware import Hardware
    from stages.train.torch_backend import load_model

    import bitsandbytes as bnb
    model = load_model(tiny_base, "nf4", Hardware("cpu", "fp32", "test"))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7
    assert linears[0].weight.quant_type == "nf4"


def test_validation_leaves_the_4bit_layout_training_needs(tiny_base):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight in place at an eval-mode, no-grad forward (our
    validation) into an inference-only layout whose kernel passes no gradient to the layer's input."""
    import torch

    import bitsandbytes as bnb
    from stages.train.hardware import Hardware
    from stages.train.torch_backend import load_model

    model = load_model(tiny_base, "nf4", Hardware("cpu", "fp32", "test"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        model.eval()(ids)  # a validation pass
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)
    model.train()
    hidden = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=hidden).logits.sum().backward()  # the gradient reaches the input through every layer
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_grad_accum_and_epochs_set_the_step_count(tmp_path, monkeypatch, tiny_base):
    from stages import train

    # 32 examples / batch 4 = 8 batches per epoch; 2 epochs, accumulating 2 -> 8 optimizer steps
    cfg = project(tmp_path, monkeypatch, tiny_base, steps=0, extra="epochs = 2\ngrad_accum = 2")
    assert train.run(cfg, "coding")["steps"] == 8


def test_missing_base_model_names_the_key(tmp_path, monkeypatch, tiny_base):
    import shutil

    from stages import train
    from stages.config import ConfigError

    with pytest.raises(ConfigError) as refused:  # refused at load, before any stage runs
        project(tmp_path, monkeypatch, str(tmp_path / "no-such-model"))
    assert len(refused.value.problems) == 1 and "'base_model'" in refused.value.problems[0]
    base = tmp_path / "gone-model"
    shutil.copytree(tiny_base, base)
    cfg = project(tmp_path, monkeypatch, str(base))
    shutil.rmtree(base)  # deleted after the config loaded: the stage names the key too
    with pytest.raises(StageError, match=r"'base_model'.*not found") as err:
        train.run(cfg, "coding")
    assert "\n" not in str(err.value)


def test_unknown_lora_target_names_the_key(tmp_path, monkeypatch, tiny_base):
    from stages import train

    cfg = project(tmp_path, monkeypatch, tiny_base, steps=1)
    bad = cfg.adapters["coding"].lora | {"targets": ["no_such_proj"]}
    object.__setattr__(cfg.adapters["coding"], "lora", bad)
    with pytest.raises(StageError, match=r"lora\.targets"):
        train.run(cfg, "coding")


@pytest.mark.slow
def test_train_real_smollm2_a_few_steps(tmp_path, monkeypatch):
    """The embedded SmolLM2-135M-Instruct trains end to end; prints its measured throughput."""
    from stages import train
    from tests.models import smollm2_base_dir

    cfg = project(tmp_path, monkeypatch, smollm2_base_dir(), steps=4, lr=2e-4)
    summary = train.run(cfg, "coding")
    assert summary["steps"] == 4 and summary["tok_s"] > 0
    assert layout.lora_weights("coding").exists()
    # a pretrained model starts far below the uniform loss (ln 49152 ~ 10.8) on these answers
    assert summary["start_val_loss"] < 8
    print(f"SmolLM2 LoRA: {summary['dtype']} {summary['tok_s']} trained tok/s, "
          f"{summary['input_tok_s']} input tok/s")
