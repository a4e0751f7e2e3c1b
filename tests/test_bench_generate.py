"""bench/generate.py on a few charts with the embedded SmolLM2: one JSON line, eval's generation gives exactly
transformers' greedy replies in fp32, and the stop rule only ever cuts a reply short."""
from __future__ import annotations

import json

from bench import generate as bench_generate


def test_generate_bench_prints_its_figures_and_baseline_and_agrees_in_fp32(capsys):
    figures = bench_generate.main(["--charts", "3", "--batch", "2", "--max-new-tokens", "40", "--dtype", "fp32",
                                   "--prefill-ab"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0]) == figures
    assert figures["dtype"] == "fp32" and figures["charts"] == 3 and figures["max_new_tokens"] == 40
    assert figures["agree"] == 1.0 and figures["answered_prefix"] == 1.0
    assert figures["tokens"] > 0 and 0 < figures["baseline_row_steps"] <= 3 * 40
    assert figures["prefill_agree"] == 1.0  # prompts prefilled in slices or at once: the same replies
    for key in ("generate_s", "baseline_transformers_generate_s", "answered_s", "speedup", "one_pass_prefill_s"):
        assert figures[key] > 0, key
