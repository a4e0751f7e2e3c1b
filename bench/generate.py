"""What eval's generation saves: seconds to answer the same NEWS2 charts greedily, against transformers' `generate`,
one JSON line.

On seeded NEWS2 charts (the `news2_score` prompt of eval's test rows) with the embedded SmolLM2-135M-Instruct in
the dtype training would pick on this machine (stages.train.hardware):

  generate             stages.evaluate.generate: batches as large as GEN_KV_BYTES holds, prefilled in slices of
                       EVAL_BATCH_TOKENS, each reply leaving the batch as it ends (end of turn or the token limit)
  baseline             transformers' greedy `generate` in batches of --batch charts, left-padded: every row runs to
                       the end of its batch's longest reply
  answered             stages.evaluate.generate with the task's stop rule too (news2.answered: the aggregate and
                       the band stated), what eval runs

`agree` is the share of charts whose reply is the same both ways (1.0 expected in fp32: the same greedy tokens);
`answered_prefix` the share of stopped replies that are the start of the unstopped one. `tokens` counts the
replies' tokens, `baseline_row_steps` the rows x steps the baseline computed.

With --prefill-ab, also `one_pass_prefill_s`: stages.evaluate.generate with each batch's prompts prefilled in one
pass (what it did before the slices), and `prefill_agree`, the share of replies the same both ways.

    python bench/generate.py [--charts 64] [--batch 64] [--max-new-tokens 300] [--dtype auto|bf16|fp32]
                             [--prefill-ab]
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
TASK = "news2_score"


def conversations(charts: int) -> list[list[dict]]:
    from stages.sources import news2

    wards = news2.News2Source("news2", {})
    rows = [ex for i in range(charts) for ex in wards.examples(news2.generate_patient(7, i))]
    return [row["messages"][:-1] for row in rows if row["task"] == TASK]


def baseline(model, tokenizer, chats: list[list[dict]], batch: int, max_new_tokens: int, hw, eot: int):
    """transformers' greedy `generate`, `batch` conversations at a time: (replies, rows x steps computed)."""
    import torch

    tokenizer.padding_side = "left"
    replies, row_steps = [], 0
    for start in range(0, len(chats), batch):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in chats[start:start + batch]]
        enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(hw.device_index)
        with torch.no_grad(), hw.autocast():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot,
                                 pad_token_id=tokenizer.pad_token_id)
        made = out[:, enc["input_ids"].shape[1]:]
        row_steps += made.shape[0] * made.shape[1]
        replies += [r.strip() for r in tokenizer.batch_decode(made, skip_special_tokens=True)]
    return replies, row_steps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--charts", type=int, default=64, help="NEWS2 charts (one news2_score prompt each)")
    ap.add_argument("--batch", type=int, default=64, help="the baseline's rows per `generate` call")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's own (eval's limit)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="as train.dtype")
    ap.add_argument("--prefill-ab", action="store_true", help="also time the prompts prefilled in one pass")
    args = ap.parse_args(argv)

    import torch

    from stages import evaluate, gguf
    from stages.base_model import materialize
    from stages.sources import scored_tasks
    from stages.train import hardware, torch_backend

    task = scored_tasks()[TASK]
    limit = args.max_new_tokens or task.max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = materialize(SPEC, Path(tmp) / "hf")
        tokenizer = torch_backend.load_tokenizer(base_dir)
        hw = hardware.detect(args.dtype)
        model = torch_backend.load_model(base_dir, "none", hw).eval()
    eot = evaluate.end_of_turn_id(tokenizer)
    chats = conversations(args.charts)

    def timed(fn):
        started = time.perf_counter()
        out = fn()
        return time.perf_counter() - started, out

    ours_s, ours = timed(lambda: evaluate.generate(model, tokenizer, chats, limit, hw, eot))
    base_s, (theirs, row_steps) = timed(lambda: baseline(model, tokenizer, chats, args.batch, limit, hw, eot))
    stop_s, stopped = timed(lambda: evaluate.generate(model, tokenizer, chats, limit, hw, eot, task.answered))
    tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in ours)
    figures = {
        "bench": "generate", "cpu": gguf.cpu_model(), "device": hw.device, "dtype": hw.dtype,
        "threads": torch.get_num_threads(), "task": TASK, "charts": len(chats), "max_new_tokens": limit,
        "tokens": tokens, "generate_s": round(ours_s, 2), "baseline_batch": args.batch,
        "baseline_transformers_generate_s": round(base_s, 2), "baseline_row_steps": row_steps,
        "speedup": round(base_s / ours_s, 2),
        "agree": round(sum(a == b for a, b in zip(ours, theirs)) / max(1, len(chats)), 4),
        "answered_s": round(stop_s, 2),
        "answered_prefix": round(sum(w.startswith(s) for s, w in zip(stopped, ours)) / max(1, len(chats)), 4),
    }
    if args.prefill_ab:
        sliced = evaluate.EVAL_BATCH_TOKENS
        evaluate.EVAL_BATCH_TOKENS = 1 << 40  # a slice holds every prompt of the batch
        try:
            one_s, one = timed(lambda: evaluate.generate(model, tokenizer, chats, limit, hw, eot))
        finally:
            evaluate.EVAL_BATCH_TOKENS = sliced
        figures.update(one_pass_prefill_s=round(one_s, 2),
                       prefill_agree=round(sum(a == b for a, b in zip(ours, one)) / max(1, len(chats)), 4))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
