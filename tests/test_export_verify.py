"""Export verification: GGUF vs transformers+peft logits, chat template, end-of-turn; Modelfile; llama.cpp server.

Slow tests share the exported tiny project (tests/gguf_project.py); broken exports are copies of its files.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from stages import export, io, layout
from stages.errors import StageError
from tests.gguf_project import ADAPTER, UNTRAINED, exported_project
from tests.models import smollm2_tokenizer
from tests.ports import free_port


@pytest.fixture()
def project(monkeypatch):
    from stages import config

    root = exported_project()
    monkeypatch.chdir(root)
    return config.load(root)


def _conversations():
    return export.conversations_for(ADAPTER, 3)


def _verify(cfg, candidate: export.Candidate) -> dict:
    base = Path(cfg.adapters[ADAPTER].base_model)
    lora = layout.lora_dir(ADAPTER) if candidate.kind in ("lora", "q8_0") else None
    figures = export.verify(base, lora, smollm2_tokenizer(), _conversations(), [candidate], export.BOUNDS)
    return figures[candidate.label]


# --- pure parts
def test_compare_logits_counts_agreement_and_kl():
    ref = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    assert export.compare_logits(ref, ref + 5.0) == (2, pytest.approx(0.0, abs=1e-12), 2)  # softmax is shift-free
    got = np.array([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]])
    agree, kl, n = export.compare_logits(ref, got)
    p = np.exp(ref[0]) / np.exp(ref[0]).sum()
    q = np.exp(got[0]) / np.exp(got[0]).sum()
    assert (agree, n) == (1, 2) and kl == pytest.approx(float((p * np.log(p / q)).sum()))


def test_a_flipped_near_tie_still_agrees_but_a_real_flip_does_not():
    # half-precision rounding reorders tokens the reference itself barely tells apart
    ref = np.array([[2.0, 1.99, 0.0], [2.0, 1.0, 0.0]])
    got = np.array([[1.99, 2.0, 0.0], [1.0, 2.0, 0.0]])
    agree, _, n = export.compare_logits(ref, got)
    assert (agree, n) == (1, 2)  # the 0.01-nat tie agrees, the 1-nat flip does not


def test_recipe_bounds_override_the_measured_defaults():
    bounds = export.bounds_for({"max_kl": {"q8_0": 0.05}, "min_top1": {"lora": 0.9}})
    assert bounds["q8_0"] == {"min_top1": export.BOUNDS["q8_0"]["min_top1"], "max_kl": 0.05}
    assert bounds["lora"]["min_top1"] == 0.9 and bounds["f16"] == export.BOUNDS["f16"]
    # f16 may flip a near-tie (99.7 % top-1 on the real SmolLM2); its KL bound stays tight
    assert export.BOUNDS["f16"]["min_top1"] >= 0.99 and export.BOUNDS["f16"]["max_kl"] <= 1e-4


def test_ollama_template_reproduces_the_training_rendering():
    tokenizer = smollm2_tokenizer()
    parts = export.ollama_template(tokenizer)
    assert parts["suffix"] == "<|im_end|>\n" and parts["user"] == "<|im_start|>user\n"
    assert parts["generation"] == "<|im_start|>assistant\n"
    assert parts["default_system"].startswith("You are a helpful AI assistant named SmolLM")
    for messages in _sample_conversations():
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert export.render_parts(parts, messages) == want
    text = export.modelfile_text("demo", parts, export.stop_tokens(tokenizer), "FROM ./merged-q8_0.gguf")
    assert 'PARAMETER stop "<|im_end|>"' in text and "FROM ./merged-q8_0.gguf" in text
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ end }}' in text
    assert f'SYSTEM """{parts["default_system"]}"""' in text


def test_a_template_without_per_message_structure_is_refused():
    tokenizer = smollm2_tokenizer()
    tokenizer.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(StageError, match="Modelfile by hand"):
        export.ollama_template(tokenizer)


def _sample_conversations():
    return [[{"role": "user", "content": "Score NEWS2: RR 24."}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "J18.9?"},
             {"role": "assistant", "content": "Pneumonia."}, {"role": "user", "content": "Billable?"}]]


# --- the exported tiny project
@pytest.mark.slow
def test_export_writes_verified_figures_and_a_modelfile(project):
    report = io.read_json(layout.verify_file(ADAPTER))
    figures = report["gguf"]
    assert set(figures) == {"lora-f16.gguf", "merged-q8_0.gguf"}
    assert all(f["passed"] and not f["problems"] for f in figures.values())
    lora = figures["lora-f16.gguf"]
    assert lora["top1"] >= 0.99 and lora["kl"] < 1e-4 and lora["positions"] > 100
    assert figures["merged-q8_0.gguf"]["kl"] < export.BOUNDS["q8_0"]["max_kl"]
    modelfile = layout.modelfile(ADAPTER).read_text()
    assert modelfile.splitlines()[2] == "FROM ./merged-q8_0.gguf"
    assert (layout.gguf_dir(ADAPTER) / "merged-q8_0.gguf").is_file()
    assert report["serve"] == f"medforge serve --adapters {ADAPTER}"  # the one server for every adapter


@pytest.mark.slow
def test_wrong_chat_template_fails_verification(project, tmp_path):
    broken = tmp_path / "wrong-template.gguf"
    # plain ChatML without the default system prompt: what a guessed "chatml" format renders
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(layout.merged_gguf(ADAPTER, "q8_0")),
                    str(broken), "--chat-template", chatml, "--force"], check=True, capture_output=True)
    f = _verify(project, export.Candidate("q8_0", broken))
    assert not f["passed"]
    assert any("chat template renders other prompt tokens than training from token" in p for p in f["problems"])
    assert f["kl"] < export.BOUNDS["q8_0"]["max_kl"]  # the weights are fine: only the template is wrong
    with pytest.raises(StageError, match=r"wrong-template\.gguf: its chat template"):
        export.gate({"wrong-template.gguf": f}, "export:demo", "adapters/demo/adapter.toml")


@pytest.mark.slow
def test_generation_must_stop_at_the_training_end_of_turn(project):
    from stages import gguf

    tokenizer = smollm2_tokenizer()
    llm = gguf.load(layout.merged_gguf(ADAPTER, "q8_0"), n_ctx=64)
    try:
        prompt = llm.tokenize(b"Hello", add_bos=False)
        assert export.stop_check(llm, prompt, tokenizer.convert_tokens_to_ids("<|im_end|>")) is None
        # a template whose turns end with an ordinary token: llama.cpp would generate past the turn
        word = tokenizer("Hello", add_special_tokens=False)["input_ids"][0]
        assert "not an end-of-generation token" in export.stop_check(llm, prompt, word)
    finally:
        llm.close()


def _perturb(src: Path, dst: Path, tensor: str = "blk.0.ffn_down.weight", scale: float = 4.0) -> None:
    from gguf import GGUFReader

    shutil.copy(src, dst)
    reader = GGUFReader(str(dst), "r+")
    (t,) = [t for t in reader.tensors if t.name == tensor]
    t.data[...] = t.data * scale
    t.data.flush() if hasattr(t.data, "flush") else None
    del reader


@pytest.mark.slow
def test_perturbed_tensor_fails_verification(project, tmp_path):
    base_gguf = layout.base_gguf(project.adapters[ADAPTER].base_model)
    broken = tmp_path / "base-f16.gguf"
    _perturb(base_gguf, broken)
    f = _verify(project, export.Candidate("lora", broken, layout.lora_gguf(ADAPTER)))
    assert not f["passed"] and f["kl"] > 100 * export.BOUNDS["lora"]["max_kl"], f
    assert any(p.startswith("mean KL") for p in f["problems"])
    ok = _verify(project, export.Candidate("lora", base_gguf, layout.lora_gguf(ADAPTER)))
    assert ok["passed"], ok  # the same check on the untouched files passes


@pytest.mark.slow
def test_a_failed_export_names_the_figures_and_leaves_no_target(project, tmp_path, monkeypatch):
    from stages import config

    root = tmp_path / "copy"
    shutil.copytree(exported_project(), root, symlinks=True)
    monkeypatch.chdir(root)
    cfg = config.load(root)
    real = export.build_merged

    def perturbed(*args, **kwargs):  # the quantizer "breaks" a tensor
        out = real(*args, **kwargs)
        for path in out.values():
            tmp = path.with_suffix(".orig")
            path.replace(tmp)
            _perturb(tmp, path, scale=-3.0)
        return out

    monkeypatch.setattr(export, "build_merged", perturbed)
    with pytest.raises(StageError) as err:
        export.run(cfg, ADAPTER)
    message = str(err.value)
    assert "\n" not in message and "merged-q8_0.gguf" in message and "mean KL" in message
    assert "lora-f16.gguf" not in message  # the LoRA GGUF itself was fine
    for path in (layout.lora_gguf(ADAPTER), layout.merged_gguf(ADAPTER, "q8_0"), layout.verify_file(ADAPTER),
                 layout.modelfile(ADAPTER)):
        assert not path.exists(), path
    assert not list(layout.out_dir(ADAPTER).glob(".export.*"))


@pytest.mark.slow
def test_medforge_serve_answers_from_the_verified_export(project):
    port = free_port()
    cmd = export.serve_command(project, ADAPTER, port=port)
    assert cmd[1:5] == ["-m", "stages.cli", "serve", "--model"]  # `medforge serve`: the safe llama.cpp settings
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "medforge serve did not start"
            time.sleep(0.5)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Score NEWS2 for RR 24, SpO2 93, HR 115."}],
            "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length") and reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.mark.slow
def test_serve_adapter_stands_for_its_verified_export(project):
    from stages.serve import adapter_args

    args = adapter_args(ADAPTER)
    assert args[:2] == ["--model", str(layout.merged_gguf(ADAPTER, "q8_0"))]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(StageError, match="no verified export of 'untrained' yet; build it first"):
        adapter_args(UNTRAINED)
    with pytest.raises(StageError, match="adapters/nope/adapter.toml not found"):
        adapter_args("nope")


def test_recipe_bounds_are_validated(tmp_path):
    from stages.config import ConfigError
    from tests.models import adapter_config

    cfg = adapter_config(tmp_path, "ok", "[export]\nmerged = [\"q4_k_m\"]\n[export.max_kl]\nq4_k_m = 0.2\n")
    assert export.bounds_for(cfg.adapters["ok"].export)["q4_k_m"]["max_kl"] == 0.2
    with pytest.raises(ConfigError) as err:
        adapter_config(tmp_path, "bad", "[export.max_kl]\nq3_x = 0.1\n[export.min_top1]\nf16 = \"all\"\n")
    assert any("export.max_kl.q3_x" in p for p in err.value.problems)
    assert any("export.min_top1.f16" in p for p in err.value.problems)


# --- task scores: the exported GGUFs answer eval's choice and cloze items
def _hf_peft(cfg):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.adapters[ADAPTER].base_model, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(layout.lora_dir(ADAPTER))).eval()


def _task_rows() -> list[dict]:
    from tests.test_evaluate_metrics import icd10_rows, news2_rows

    return icd10_rows() + news2_rows(2)


@pytest.mark.slow
def test_gguf_log_likelihoods_with_a_shared_prompt_equal_a_fresh_context_and_transformers(project):
    """Options of one question share its prompt in llama.cpp's context: each scores as in a fresh context
    and as transformers + peft does (the f16 LoRA GGUF; f16 rounding only)."""
    from stages import evaluate, gguf
    from stages.train import torch_backend
    from stages.train.hardware import Hardware

    tokenizer, rows = smollm2_tokenizer(), _task_rows()
    examples = evaluate.task_items(tokenizer, rows).choice_examples
    assert len(examples) > 10 and examples[0].input_ids[:20] == examples[1].input_ids[:20]
    llm = gguf.load(layout.base_gguf(project.adapters[ADAPTER].base_model), layout.lora_gguf(ADAPTER),
                    n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True)
    try:
        shared = export.gguf_nll(llm, examples)
        fresh = []
        for e in examples:
            llm.reset()
            fresh += export.gguf_nll(llm, [e])
    finally:
        llm.close()
    assert [c for _, c in shared] == [c for _, c in fresh] and all(c > 0 for _, c in shared)
    assert [s for s, _ in shared] == pytest.approx([s for s, _ in fresh], rel=1e-4, abs=1e-3)
    want = torch_backend.nll_by_example(_hf_peft(project), examples, tokenizer.pad_token_id,
                                        Hardware("cpu", "fp32", "test"))
    assert [s for s, _ in shared] == pytest.approx([s for s, _ in want], rel=2e-2, abs=2e-2)



@pytest.mark.slow
def test_logits_at_chosen_positions_are_llama_cpp_s_own(project):
    """Logits computed only where wanted, in chunks, after a kept prefix: llama.cpp's logits at every position."""
    from stages import gguf
    from tests.test_export import gguf_logits

    model, lora = layout.base_gguf(project.adapters[ADAPTER].base_model), layout.lora_gguf(ADAPTER)
    ids = smollm2_tokenizer()("Aggregate NEWS2 score: 7. Clinical risk: high. Urgent response.")["input_ids"]
    every = gguf_logits(model, lora, ids)
    llm = gguf.load(model, lora, n_ctx=128, n_batch=4, n_ubatch=4)  # chunks of 4 tokens
    try:
        wanted = [1, 2, 7, len(ids) - 2]
        np.testing.assert_allclose(export.gguf_logits_at(llm, ids, wanted), every[wanted], rtol=1e-4, atol=1e-4)
        other = ids[:6] + ids[2:5]  # shares 6 tokens with what the context holds: those are kept
        got = export.gguf_logits_at(llm, other, [6, 7])
        np.testing.assert_allclose(got, gguf_logits(model, lora, other)[[6, 7]], rtol=1e-4, atol=1e-4)
    finally:
        llm.close()


@pytest.mark.slow
def test_each_gguf_answers_the_eval_items_and_pairs_with_transformers_by_row_id(project):
    from stages import evaluate
    from stages.train import torch_backend
    from stages.train.hardware import Hardware

    tokenizer, rows = smollm2_tokenizer(), _task_rows()
    base = Path(project.adapters[ADAPTER].base_model)
    candidates = [export.Candidate("lora", layout.base_gguf(str(base)), layout.lora_gguf(ADAPTER)),
                  export.Candidate("q8_0", layout.merged_gguf(ADAPTER, "q8_0"))]
    figures = export.verify(base, layout.lora_dir(ADAPTER), tokenizer, _conversations(), candidates,
                            export.BOUNDS, task_rows=rows)
    model, hw = _hf_peft(project), Hardware("cpu", "fp32", "test")
    items = evaluate.task_items(tokenizer, rows)
    hf = evaluate.item_scores(rows, items, torch_backend.nll_by_example(model, items.choice_examples,
                                                                        tokenizer.pad_token_id, hw),
                              evaluate.cloze_hits(model, items.cloze, hw))
    assert set(hf) == {"icd10_code", "icd10_billable", "icd10_parent_cloze", "icd10_describe_cloze",
                       "news2_score_cloze", "news2_response_cloze"}
    for label in ("lora-f16.gguf", "merged-q8_0.gguf"):
        tasks = figures[label]["tasks"]
        assert set(tasks) == set(hf)
        for key, scored in hf.items():
            got = tasks[key]
            assert got["items"]["id"] == scored["ids"] and got["n"] == len(scored["values"]) > 0
            values = evaluate.rows_of(got["items"]["values"])
            assert got["metrics"] == evaluate.mean_metrics(values)
            if label == "lora-f16.gguf":  # f16 of the same weights: the same answers, near-ties aside
                same = sum(v == w for v, w in zip(values, scored["values"]))
                assert same >= 0.8 * len(values), (key, values, scored["values"])


def test_each_gguf_answers_export_task_examples_of_the_rows_eval_scores(project):
    """`export.task_examples` caps the rows each GGUF answers: a subset of eval's sample by the same hash rank (so
    every item pairs with eval's by row id), in file order; 0 = all of eval's."""
    from stages import evaluate, io
    from tests.test_evaluate_metrics import icd10_split

    test = layout.split_file(ADAPTER, "test")
    assert not test.exists()  # the other tests verify on fixed prompts: the split is removed again below
    rows = [{**row, "id": f"row{i}"} for i, row in enumerate(_task_rows() * 3)] + icd10_split(40)
    io.write_jsonl(test, rows)
    try:
        _task_examples(project, evaluate.spread_sample(rows, project.adapters[ADAPTER].eval["max_examples"]), rows)
    finally:
        test.unlink()


def _task_examples(project, eval_rows: list[dict], split: list[dict]) -> None:
    import dataclasses

    from stages import evaluate

    def question(q):
        return q["task"], q["options"], q["gold"]

    a = project.adapters[ADAPTER]
    assert len(eval_rows) > 2
    asked = {eval_rows[q["index"]]["id"]: question(q) for q in evaluate.choices_for(eval_rows, split)}
    for k, n in ((2, 2), (len(eval_rows) // 3, len(eval_rows) // 3), (0, len(eval_rows)), (10_000, len(eval_rows))):
        recipe = dataclasses.replace(a, export={**a.export, "task_examples": k})
        rows, choices = export.scored_rows(dataclasses.replace(project, adapters={**project.adapters, ADAPTER: recipe}),
                                           ADAPTER)
        ids = {r["id"] for r in rows}
        assert len(rows) == n and rows == [r for r in eval_rows if r["id"] in ids]
        # asked what eval asks them (distractors from the whole split): the same options for the same row id
        assert choices and all(asked[rows[q["index"]]["id"]] == question(q) for q in choices)
