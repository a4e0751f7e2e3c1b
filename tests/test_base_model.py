"""base_model: the embedded SmolLM2 GGUF becomes a Hugging Face folder that transformers, peft and mlx-lm load."""
from __future__ import annotations

import json

import pytest

from stages.base_model import materialize
from stages.errors import StageError
from tests.models import smollm2_base_dir

SPEC = "embedded:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_base_dir()


@pytest.mark.slow
def test_embedded_smollm2_folder_loads_in_transformers_peft_and_mlx(smollm2):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (smollm2 / name).exists(), name
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])  # the dequantized weights still make sense
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert peft_model.get_nb_trainable_parameters()[0] > 0

    import mlx_lm
    mlx_model, mlx_tok = mlx_lm.load(str(smollm2))
    text = mlx_lm.generate(mlx_model, mlx_tok, prompt="The capital of France is", max_tokens=3)
    assert "Paris" in text


def test_hub_id_offline_fails_in_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError) as err:
        materialize("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "hub")
    message = str(err.value)
    assert "\n" not in message and "base_model" in message and "embedded:smollm2-135m-instruct" in message
    assert not (tmp_path / "hub").exists()  # nothing half-written


def test_unknown_embedded_name_lists_the_known_ones(tmp_path):
    with pytest.raises(StageError, match="embedded:smollm2-135m-instruct"):
        materialize("embedded:gpt-17", tmp_path / "x")
