"""Packing keeps examples apart, and gradient accumulation equals one big batch (tiny real model)."""
from __future__ import annotations

import pytest

from tests.models import make_tiny_model, smollm2_tokenizer
from tests.test_train import rows


@pytest.fixture(scope="module", params=["sdpa", "varlen"])
def setup(tmp_path_factory, request):
    """The tiny model under transformers' SDPA (a block mask) and under the trainer's own per-example attention."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.train.format import encode

    base = make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")
    tok = smollm2_tokenizer()
    # different lengths: multi-turn conversations of 1-3 question/answer pairs
    data = rows(12, seed=5)
    examples = []
    for i in range(0, 12, 2):
        turns = data[i]["messages"] + (data[i + 1]["messages"] if i % 4 == 0 else [])
        examples.append(encode(tok, turns, max_length=256))
    from stages.train import varlen
    attention = varlen.register() if request.param == "varlen" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation=attention, use_cache=True)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; give every LoRA weight a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok, examples


def test_packed_rows_give_each_example_its_unpacked_loss(setup):
    from stages.train.hardware import Hardware
    from stages.train.packing import collate_packed, pack_rows
    from stages.train.torch_backend import nll_by_example, token_nll

    model, tok, examples = setup
    hw = Hardware("cpu", "fp32", "test")
    model.eval()
    alone = nll_by_example(model, examples, tok.pad_token_id, hw, batch_tokens=1)
    lengths = [len(e.input_ids) for e in examples]
    max_length = 3 * max(lengths)
    assert len(pack_rows(lengths, max_length)) <= len(examples) / 3  # really packed, several per row
    import torch
    with torch.no_grad():
        packed = collate_packed(examples, tok.pad_token_id, "cpu", max_length)
        nll, count = token_nll(model, packed, hw)
    assert count.tolist() == [c for _, c in alone]
    expected = torch.tensor([s for s, _ in alone])
    assert (nll - expected).abs().max().item() < 1e-3  # summed over ~30 tokens each: fp32 noise only

    # the control: the same rows with positions running on across examples let them attend to each other
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    with torch.no_grad():
        leaked, _ = token_nll(model, leaky, hw)
    assert (leaked - expected).abs().max().item() > 1e-2


def test_packed_padding_is_its_own_segment_and_untrained():
    from stages.train.format import IGNORE, Encoded
    from stages.train.packing import collate_packed

    batch = [Encoded([1, 2, 3], [IGNORE, 2, 3]), Encoded([4, 5], [4, 5]), Encoded([6, 7, 8, 9], [IGNORE] * 3 + [9])]
    out = collate_packed(batch, pad_id=0, device="cpu", max_length=5)
    assert out["input_ids"].shape == (2, 5)
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert out["segments"].tolist() == [[2, 2, 2, 2, -1], [0, 0, 0, 1, 1]]
    # an example's first token is never a target (unpacked, nothing precedes it)
    assert out["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 9, IGNORE], [IGNORE, 2, 3, IGNORE, 5]]


@pytest.mark.parametrize("packing", [True, False])
def test_accumulated_micro_batches_equal_one_big_batch(setup, packing):
    from stages.train.hardware import Hardware
    from stages.train.torch_backend import accumulate_gradients

    model, tok, examples = setup
    hw = Hardware("cpu", "fp32", "test")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = sum(e.n_trained for e in examples)

    def grads(micro):
        for p in params:
            p.grad = None
        loss = accumulate_gradients(model, micro, tokens, tok.pad_token_id, hw, packing)
        return loss, [p.grad.clone() for p in params]

    big_loss, big = grads([examples])
    # unequal micro-batches: 1 + 2 + 3 examples with different trained-token counts
    acc_loss, acc = grads([examples[:1], examples[1:3], examples[3:]])
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    for a, b in zip(acc, big):
        assert (a - b).abs().max().item() <= 1e-6 + 1e-4 * b.abs().max().item()

    # the control: averaging each micro-batch's own mean (the common mistake) is a different gradient
    import torch
    for p in params:
        p.grad = None
    for micro in (examples[:1], examples[1:3], examples[3:]):
        accumulate_gradients(model, [micro], sum(e.n_trained for e in micro) * 3, tok.pad_token_id, hw, packing)
    naive = [p.grad.clone() for p in params]
    assert max((a - b).abs().max().item() for a, b in zip(naive, big)) > 1e-4 * max(b.abs().max().item() for b in big)
    del torch


def test_gradient_checkpointing_trains_the_same_curve(tmp_path, monkeypatch):
    """Recomputing activations in backward saves memory and changes nothing else."""
    from stages import io, layout, train
    from tests.models import adapter_config
    from tests.test_train import TOML, write_splits

    base = make_tiny_model(tmp_path / "base")
    curves = []
    for flag in ("false", "true"):
        root = tmp_path / flag
        root.mkdir()
        monkeypatch.chdir(root)
        write_splits("coding")
        cfg = adapter_config(root, "coding", TOML.format(base=base, steps=3, lr=1e-2,
                                                         extra=f"gradient_checkpointing = {flag}"))
        train.run(cfg, "coding")
        curves.append([r["loss"] for r in io.read_jsonl(layout.metrics_file("coding")) if r["kind"] == "train"])
    assert len(curves[0]) == 3 and curves[0] == pytest.approx(curves[1], abs=1e-4)


def test_examples_batched_with_padding_give_the_loss_and_gradients_of_one_call_each(setup, monkeypatch):
    """The trainer's attention runs examples of similar length as one right-padded batch: exact."""
    from stages.train import varlen
    from stages.train.hardware import Hardware
    from stages.train.packing import collate_packed
    from stages.train.torch_backend import token_nll

    model, tok, examples = setup
    if model.config._attn_implementation != varlen.NAME:
        pytest.skip("the trainer's own attention only")
    lengths = [len(e.input_ids) for e in examples]
    packed = collate_packed(examples, tok.pad_token_id, "cpu", sum(lengths))  # one row, lengths 2x apart
    assert max(lengths) > 1.5 * min(lengths)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    results = []
    for slack in (0.0, 100.0):  # one SDPA call per example; all examples in one padded batch
        monkeypatch.setattr(varlen, "PAD_SLACK", slack)
        for p in params:
            p.grad = None
        nll, _ = token_nll(model, packed, Hardware("cpu", "fp32", "test"))
        nll.sum().backward()
        results.append((nll.detach(), [p.grad.clone() for p in params]))
    (one_by_one, grads_one), (padded, grads_padded) = results
    assert (one_by_one - padded).abs().max().item() < 1e-4
    for a, b in zip(grads_one, grads_padded):
        assert (a - b).abs().max().item() <= 1e-6 + 1e-4 * a.abs().max().item()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scores_attention_is_causal_grouped_query_attention(dtype):
    """Against an fp32 SDPA reference, forward and backward: exact in fp32; in bf16 no further off than SDPA itself
    run in bf16 (9 query heads on 3 key/value heads, SmolLM2's grouping)."""
    import torch
    import torch.nn.functional as F

    from stages.train import varlen

    torch.manual_seed(3)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    q, k, v = (torch.randn(2, heads, 45, 64) for heads in (9, 3, 3))
    grad = torch.randn(2, 45, 9, 64)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.125).transpose(1, 2)

    reference = run(sdpa, torch.float64)
    ours = run(lambda q, k, v: varlen.scores_attention(q, k, v, 0.125), dt)
    if dtype == "fp32":
        for a, b in zip(ours, reference):
            assert (a - b).abs().max().item() < 1e-5
    else:
        theirs = run(sdpa, dt)
        for a, b, ref in zip(ours, theirs, reference):
            assert (a - ref).abs().max().item() <= 2 * (b - ref).abs().max().item() + 1e-3


def test_in_bf16_on_cpu_short_examples_take_the_scores_path_one_call_each(tmp_path, monkeypatch):
    """A packed bf16 row on CPU: every example up to SCORES_MAX_LEN in a call of its own to scores_attention, the
    loss and gradients those of SDPA's padded batches within bf16 rounding; past SCORES_MAX_LEN, SDPA as before."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.train import varlen
    from stages.train.format import encode
    from stages.train.hardware import Hardware
    from stages.train.packing import collate_packed
    from stages.train.torch_backend import token_nll

    tok = smollm2_tokenizer()
    data = rows(8, seed=9)
    examples = [encode(tok, data[i]["messages"] + data[i + 1]["messages"] * (i % 4 == 0), max_length=256)
                for i in range(0, 8, 2)]
    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(tmp_path / "base")),
                                                 attn_implementation=varlen.register(), dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    packed = collate_packed(examples, tok.pad_token_id, "cpu", sum(len(e.input_ids) for e in examples))
    calls = []
    real = varlen.scores_attention
    monkeypatch.setattr(varlen, "scores_attention", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    results = []
    for limit in (512, 0):  # the scores path; SDPA for every example
        monkeypatch.setattr(varlen, "SCORES_MAX_LEN", limit)
        for p in params:
            p.grad = None
        nll, _ = token_nll(model, packed, Hardware("cpu", "bf16", "test"))
        nll.sum().backward()
        results.append((nll.detach().float(), [p.grad.float().clone() for p in params]))
        if limit:
            assert calls == [1] * len(examples) * model.config.num_hidden_layers  # one example per call
    assert len(calls) == len(examples) * model.config.num_hidden_layers  # none once the limit is 0
    (scores, grads_scores), (sdpa, grads_sdpa) = results
    assert (scores - sdpa).abs().max().item() <= 0.02 * sdpa.abs().max().item()
    for a, b in zip(grads_scores, grads_sdpa):
        assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()


def test_scores_path_takes_each_short_example_alone_and_pads_the_long_ones():
    from stages.train import varlen

    sizes = [100, 600, 90, 700, 650, 300]
    assert varlen.call_groups(sizes, scores=False) == varlen.padded_groups(sizes, varlen.PAD_SLACK)
    assert sorted(varlen.call_groups(sizes, scores=True)) == [[0], [1, 4, 3], [2], [5]]  # the order of calls is free


def test_similar_lengths_share_a_padded_batch():
    from stages.train.varlen import padded_groups

    assert padded_groups([400, 120, 410, 100, 405], 1.15) == [[3, 1], [0, 4, 2]]
    assert padded_groups([100, 300], 1.15) == [[0], [1]]  # padding 100 to 300 would double its work
    assert padded_groups([7, 9], 0.0) == [[0], [1]]


def test_packed_rows_are_cut_where_positions_restart():
    import torch

    from stages.train.varlen import segment_bounds

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 1]])
    assert segment_bounds(positions) == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 7), (7, 9)]]


def test_the_trainer_attention_generates_like_sdpa(tmp_path):
    # the evaluator loads models through the trainer's loader: padded batches and the KV cache take transformers' path
    import torch
    from transformers import AutoModelForCausalLM

    from stages.train import varlen

    base = make_tiny_model(tmp_path / "base")
    tok = smollm2_tokenizer()
    tok.padding_side = "left"
    prompts = tok(["Code for type 2 diabetes?", "NEWS2 for RR 24, SpO2 93%, pulse 112?"], return_tensors="pt",
                  padding=True)
    outputs = []
    for attention in ("sdpa", varlen.register()):
        model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation=attention).eval()
        with torch.no_grad():
            outputs.append(model.generate(**prompts, max_new_tokens=8, do_sample=False,
                                          pad_token_id=tok.pad_token_id))
    assert torch.equal(outputs[0], outputs[1])


def test_packed_rows_are_cut_once_per_forward_not_once_per_layer(setup, monkeypatch):
    import torch

    from stages.train import varlen
    from stages.train.hardware import Hardware
    from stages.train.packing import collate_packed
    from stages.train.torch_backend import token_nll

    model, tok, examples = setup
    if model.config._attn_implementation != varlen.NAME:
        pytest.skip("the trainer's own attention only")
    calls = []
    real = varlen.segment_bounds
    monkeypatch.setattr(varlen, "segment_bounds", lambda p: calls.append(1) or real(p))
    packed = collate_packed(examples, tok.pad_token_id, "cpu", 3 * max(len(e.input_ids) for e in examples))
    with torch.no_grad():
        token_nll(model, packed, Hardware("cpu", "fp32", "test"))
    assert model.config.num_hidden_layers > 1 and len(calls) == 1


def test_scoring_batches_fill_a_token_budget_in_length_order():
    from stages.train.packing import budget_batches

    lengths = [90, 300, 100, 95, 2500, 280, 110, 290]
    batches = budget_batches(lengths, 600)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every example once
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # in length order: each batch pads little
    for b in batches:  # within budget (rows x longest), or one example alone
        assert len(b) * max(lengths[i] for i in b) <= 600 or len(b) == 1
    assert [len(b) for b in batches] == [4, 2, 1, 1]  # short rows many to a batch, long ones few, 2500 alone
    assert budget_batches(lengths, 1) == [[i] for i in sorted(range(8), key=lengths.__getitem__)]
    assert budget_batches([], 600) == []


def test_a_scoring_batch_s_shared_start_runs_once_and_scores_as_one_pass_would(setup):
    """Eval's and validation's rows all begin with the chat template's system prompt and turn marker: a padded
    batch runs those tokens once and every row continues from their keys and values. Losses and greedy tokens are
    those of each example scored alone; the decoder saw the shared start once and each row only after it."""
    from stages.train.hardware import Hardware
    from stages.train.packing import SHARED_PREFIX_MIN, shared_prefix
    from stages.train.torch_backend import nll_by_example

    model, tok, examples = setup
    hw = Hardware("cpu", "fp32", "test")
    prefix = shared_prefix(examples)
    assert prefix >= SHARED_PREFIX_MIN and len({tuple(e.input_ids[:prefix]) for e in examples}) == 1
    seen = []
    hook = model.get_base_model().get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        together = nll_by_example(model, examples, tok.pad_token_id, hw, batch_tokens=10 ** 6, guesses=True)
    finally:
        hook.remove()
    width = max(len(e.input_ids) for e in examples)
    assert seen == [(1, prefix), (len(examples), width - prefix)]
    alone = nll_by_example(model, examples, tok.pad_token_id, hw, batch_tokens=1, guesses=True)  # no sharing
    assert [c for _, c, _ in together] == [c for _, c, _ in alone]
    assert max(abs(a[0] - b[0]) for a, b in zip(together, alone)) < 1e-3  # fp32 noise over ~30 tokens
    assert [g for *_, g in together] == [g for *_, g in alone]


def test_a_shared_start_stops_before_anything_trained_or_different():
    from stages.train.format import IGNORE, Encoded
    from stages.train.packing import shared_prefix

    start = list(range(100, 120))

    def example(rest: list[int], trained_from: int) -> Encoded:
        ids = start + rest
        return Encoded(ids, [IGNORE] * trained_from + ids[trained_from:])

    a, b = example([1, 2, 3, 4, 5, 6], 23), example([1, 2, 9, 9, 9, 9], 24)
    assert shared_prefix([a, b]) == 22                     # 22 shared tokens, then they differ
    assert shared_prefix([a, example([1, 2, 3, 4, 5, 6], 15)]) == 14  # the token before the first trained one
    assert shared_prefix([a]) == 0                         # alone: nothing to share
    assert shared_prefix([a, Encoded(start[:5] + [7] * 10, [IGNORE] * 10 + [7] * 5)]) == 0  # under the minimum
