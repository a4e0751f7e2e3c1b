"""bench/train_step.py end to end on a tiny random model: one JSON line, every variant timed, and the modules it
patches for its baselines restored afterwards."""
from __future__ import annotations

from bench import train_step


def test_train_step_bench_times_each_variant_against_now_and_restores_the_trainer(capsys):
    from stages.train import fused_lora, varlen

    mask, slack, scores, scores_slack = (fused_lora.keep_mask, varlen.PAD_SLACK, varlen.SCORES_MAX_LEN,
                                         varlen.SCORES_PAD_SLACK)
    figures = train_step.main(["--shape", "tiny", "--steps", "1", "--dtype", "fp32"])
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line
    assert figures["dtype"] == "fp32" and figures["examples"] == 8 and figures["input_tokens"] > 0
    for key in ("now_s", "torch_randint_masks_s", "one_call_per_example_s", "sdpa_attention_s", "padded_scores_s",
                "numpy_masks_speedup", "padded_attention_speedup", "scores_attention_speedup",
                "unpadded_scores_speedup"):
        assert figures[key] > 0
    assert fused_lora.keep_mask is mask and varlen.PAD_SLACK == slack and varlen.SCORES_MAX_LEN == scores
    assert varlen.SCORES_PAD_SLACK == scores_slack
