"""bench/train.py: the Llama-3.1-8B shape it builds, and the whole QLoRA bench on a tiny random model on CPU."""
from __future__ import annotations

import gc

import pytest

from bench import train as bench_train
from tests.models import smollm2_tokenizer


def test_llama_31_8b_shape_config():
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = bench_train.shape_config("llama-3.1-8b", tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == (4096, 32, 32, 8, 14336)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta, **config.rope_scaling}
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3"
    assert config.vocab_size == len(tokenizer) == 49152  # the data's tokenizer, not Llama's 128k
    assert not config.tie_word_embeddings and config.pad_token_id == tokenizer.pad_token_id
    with torch.device("meta"):  # no weights are made
        n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert 7.3e9 < n < 7.5e9  # 8.03B less (128256 - 49152) * 4096 * 2 of embedding and head


@pytest.mark.slow
def test_tiny_qlora_bench_on_cpu(monkeypatch, capsys):
    from transformers import PreTrainedModel

    live = []
    mark = bench_train.memory_mark

    def counting_mark(device):
        start = mark(device)  # frees first: then no earlier trainer's model may be left
        live.append(sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()))
        return start

    monkeypatch.setattr(bench_train, "memory_mark", counting_mark)
    result = bench_train.main(["--shape", "tiny", "--quantization", "nf4", "--steps", "1", "--examples", "16"])

    assert live == [0, 0, 0]
    for key in ("medforge_tok_s", "users_recipe_tok_s", "trl_packing_tok_s", "mfu", "model_gflop_s",
                "peak_matmul_gflop_s", "speedup_vs_users_recipe", "speedup_vs_trl_packing"):
        assert result[key] > 0, key
    for key in ("medforge_peak_gib", "users_recipe_peak_gib", "trl_packing_peak_gib"):
        assert key in result and (result[key] is None or result[key] >= 0), key
    assert result["peak_memory"] in ("cpu peak RSS growth", "not measured")
    assert result["quantization"] == "nf4" and result["shape"] == "tiny" and result["gradient_checkpointing"] is False
    assert result["device"] == "cpu" and result["device_name"] is None and result["medforge_attention"]
    assert result["vocab_size"] == 49152 and 0 < result["model_params_m"] < 10
    assert '"quantization": "nf4"' in capsys.readouterr().out  # the one JSON line
