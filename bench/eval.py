"""What eval's shared passes save: seconds of eval's forward passes, each against its baseline, one JSON line.

On real test rows of the two default domains (ICD-10-CM codes from the embedded database, seeded NEWS2 charts),
with the embedded SmolLM2-135M-Instruct in the dtype training would pick on this machine (stages.train.hardware):

  perplexity + cloze   eval's one pass (stages.evaluate: greedy tokens read from the perplexity pass's logits)
                       vs the baseline, a perplexity pass and then a cloze pass of its own (evaluate.cloze_guesses)
  choice               a question's options as one row sharing its prompt (evaluate.shared_prompt_nll)
                       vs the baseline, every option a row of its own (torch_backend.nll_by_example)
  batches              the perplexity pass in batches of EVAL_BATCH_TOKENS padded tokens (packing.budget_batches)
                       vs the baseline, batches of 8 rows (what eval did before)
  shared start         the perplexity pass with each batch's shared start (the chat template's system prompt and
                       turn marker) run once (torch_backend.shared_start) vs the baseline, every row from its
                       first token
  greedy               the greedy token of 1,000 positions' logits over the vocabulary: max vs argmax

Each figure is the best of --repeats (other load only slows a run); `agree` is the share of cloze hits and choice
answers (per-example NLL within 1e-4, greedy tokens) on which the two ways agree (1.0 in fp32; in bf16 a
different batching can move a near-tie; greedy tokens must agree exactly).

    python bench/eval.py [--codes 300] [--charts 100] [--repeats 2] [--dtype auto|bf16|fp32]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEC = "embedded:smollm2-135m-instruct"


def test_rows(codes: int, charts: int) -> list[dict]:
    from stages.sources import icd10cm, news2

    coding = icd10cm.Icd10cmSource("icd10cm", {})
    records = icd10cm.build_records(icd10cm.load_codes(icd10cm.database_path()), codes, 13, "bench")
    rows = [ex for r in records for ex in coding.examples(r)]
    wards = news2.News2Source("news2", {})
    rows += [ex for i in range(charts) for ex in wards.examples(news2.generate_patient(7, i))]
    return [{**row, "id": f"row{i}"} for i, row in enumerate(rows)]


def best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", type=int, default=300, help="ICD-10-CM codes (4 questions each)")
    ap.add_argument("--charts", type=int, default=100, help="NEWS2 charts (2 questions each)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="as train.dtype")
    args = ap.parse_args()

    from stages import evaluate, gguf
    from stages.base_model import materialize
    from stages.train import format as fmt
    from stages.train import hardware, torch_backend

    with tempfile.TemporaryDirectory() as tmp:
        base_dir = materialize(SPEC, Path(tmp) / "hf")
        tokenizer = torch_backend.load_tokenizer(base_dir)
        hw = hardware.detect(args.dtype)
        model = torch_backend.load_model(base_dir, "none", hw)
    rows = test_rows(args.codes, args.charts)
    encoded = {row: e for row, (e, _) in enumerate(fmt.encode_stream(tokenizer, rows, args.max_length))
               if e.n_trained}
    examples = list(encoded.values())
    items = evaluate.task_items(tokenizer, rows)
    pad = tokenizer.pad_token_id

    class Apart:  # what eval's Judge does with a cloze item the pass cannot serve (cut at max_length)
        def cloze(self, cloze):
            hits = evaluate.cloze_hits(model, cloze, hw)
            return hits, hits

    def with_cloze():
        passed = torch_backend.nll_by_example(model, examples, pad, hw, guesses=True)
        return evaluate.cloze_from_pass(Apart(), items.cloze, list(encoded), examples, passed, passed)[0]

    one_s, hits = best(with_cloze, args.repeats)
    ppl_s, _ = best(lambda: torch_backend.nll_by_example(model, examples, pad, hw), args.repeats)
    cloze_s, own = best(lambda: evaluate.cloze_hits(model, items.cloze, hw), args.repeats)
    shared_s, shared = best(lambda: evaluate.shared_prompt_nll(model, items.choice_examples, hw), args.repeats)
    apart_s, apart = best(lambda: torch_backend.nll_by_example(model, items.choice_examples, pad, hw), args.repeats)

    def by_rows(n: int):  # the baseline: sorted by length, n rows a batch; results in input order
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        out = [None] * len(examples)
        for start in range(0, len(order), n):
            idx = order[start:start + n]
            for i, p in zip(idx, torch_backend.nll_by_example(model, [examples[i] for i in idx], pad, hw,
                                                              batch_tokens=10 ** 9)):
                out[i] = p
        return out

    budget_s, budget = best(lambda: torch_backend.nll_by_example(model, examples, pad, hw), args.repeats)
    rows8_s, rows8 = best(lambda: by_rows(8), args.repeats)

    def whole_rows():  # the baseline: no shared start, every row from its first token
        real, torch_backend.shared_prefix = torch_backend.shared_prefix, lambda batch: 0
        try:
            return torch_backend.nll_by_example(model, examples, pad, hw)
        finally:
            torch_backend.shared_prefix = real

    whole_s, whole = best(whole_rows, args.repeats)
    greedy = bench_greedy(args.repeats)

    def answers(nll):
        return [max(range(len(s)), key=s.__getitem__) for s in evaluate.group_loglik(items.choices, nll)]

    print(json.dumps({
        "bench": "eval", "cpu": gguf.cpu_model(), "device": hw.device, "dtype": hw.dtype,
        "rows": len(rows), "cloze_items": len(items.cloze), "choice_questions": len(items.choices),
        "option_rows": len(items.choice_examples),
        "perplexity_with_cloze_s": round(one_s, 2), "baseline_perplexity_then_cloze_s": round(ppl_s + cloze_s, 2),
        "cloze_speedup": round((ppl_s + cloze_s) / one_s, 2),
        "cloze_agree": round(sum(a == b for a, b in zip(hits, own)) / max(1, len(own)), 4),
        "choice_shared_prompt_s": round(shared_s, 2), "baseline_choice_per_option_s": round(apart_s, 2),
        "choice_speedup": round(apart_s / shared_s, 2),
        "choice_agree": round(sum(a == b for a, b in zip(answers(shared), answers(apart))) / max(1, len(items.choices)), 4),
        "batch_tokens": torch_backend.EVAL_BATCH_TOKENS, "perplexity_token_budget_s": round(budget_s, 2),
        "baseline_perplexity_8_rows_s": round(rows8_s, 2), "batches_speedup": round(rows8_s / budget_s, 2),
        "batches_agree": agree(budget, rows8),
        "perplexity_shared_start_s": round(budget_s, 2), "baseline_perplexity_whole_rows_s": round(whole_s, 2),
        "shared_start_speedup": round(whole_s / budget_s, 2), "shared_start_agree": agree(budget, whole),
        "shared_start_max_rel_diff": float(f"{max_rel(budget, whole):.2g}"),
        **greedy,
    }))


def agree(got: list[tuple], want: list[tuple]) -> float:
    """The share of examples whose summed NLL is within 1e-4 (relative) and whose token count is the same."""
    return round(sum(abs(x[0] - y[0]) <= 1e-4 * max(1.0, abs(y[0])) and x[1] == y[1]
                     for x, y in zip(got, want)) / max(1, len(want)), 4)


def max_rel(got: list[tuple], want: list[tuple]) -> float:
    return max((abs(x[0] - y[0]) / max(1.0, abs(y[0])) for x, y in zip(got, want)), default=0.0)


def bench_greedy(repeats: int) -> dict:
    import torch

    from stages.train import torch_backend

    logits = torch.randn(1000, 49152, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, values in (("fp32", logits), ("bf16", logits.bfloat16())):
        max_s, picked = best(lambda: torch_backend.greedy(values), max(3, repeats))
        argmax_s, expected = best(lambda: values.argmax(-1), max(3, repeats))
        out[f"greedy_{name}_speedup"] = round(argmax_s / max_s, 2)
        out[f"greedy_{name}_agree"] = float(torch.equal(picked, expected))
    return out


if __name__ == "__main__":
    main()
