"""bench/eval.py end to end on a few real rows: one JSON line, and in fp32 eval's shared passes give exactly the
baseline's answers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_eval_bench_prints_its_figures_and_baselines_and_agrees_in_fp32():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "eval.py"), "--codes", "3", "--charts", "2",
                          "--repeats", "1", "--dtype", "fp32"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["dtype"] == "fp32" and figures["rows"] == 3 * 4 + 2 * 2
    assert figures["cloze_items"] > 0 and figures["choice_questions"] > 0
    assert figures["cloze_agree"] == figures["choice_agree"] == figures["batches_agree"] == 1.0
    assert figures["shared_start_agree"] == 1.0
    for key in ("perplexity_with_cloze_s", "baseline_perplexity_then_cloze_s", "choice_shared_prompt_s",
                "baseline_choice_per_option_s", "perplexity_token_budget_s", "baseline_perplexity_8_rows_s",
                "perplexity_shared_start_s", "baseline_perplexity_whole_rows_s",
                "greedy_fp32_speedup", "greedy_bf16_speedup"):
        assert figures[key] > 0, key
    assert figures["greedy_fp32_agree"] == figures["greedy_bf16_agree"] == 1.0  # max for argmax: the same tokens
