"""What four of medforge's CPU training-step choices save: one JSON line, each against its baseline in the same run.

One packed batch of NEWS2 conversations (the largest of the first four batches bench/train.py trains), the
LoRA of bench/train.py, steps timed in turn in one process (so load and heat hit every variant alike):

  now                    the trainer as it is
  torch_randint_masks    dropout masks from torch's CPU `randint` (a serial Mersenne Twister), not numpy's
                         PCG64DXSM (stages.train.fused_lora.keep_mask)
  one_call_per_example   one SDPA call per packed example, not padded batches of similar lengths
                         (stages.train.varlen.PAD_SLACK = 0)
  sdpa_attention         torch's SDPA (CPU flash attention) for every batch, not the bf16 scores attention
                         (stages.train.varlen.SCORES_MAX_LEN = 0; the same in fp32, where it is not used)
  padded_scores          bf16 scores attention over padded batches of similar lengths, not one example per
                         call (stages.train.varlen.SCORES_PAD_SLACK = PAD_SLACK; the same in fp32)

Each figure is the best of --steps timed steps (other load only slows a step). The third choice, glibc keeping
freed memory (hardware.keep_freed_memory), is process-wide and cannot be undone within a run: tests/test_train.py
counts its page faults instead.

    python bench/train_step.py [--steps 3] [--dtype auto|bf16|fp32] [--shape smollm2|tiny]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def torch_randint_mask(shape, p: float, device):
    """keep_mask's baseline: the same 16-bit slices of 64-bit words, drawn by torch's own generator."""
    import torch

    from stages.train import fused_lora

    n = 1
    for size in shape:
        n *= size
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    threshold = round(p * fused_lora._KEEP_SCALE) - fused_lora._KEEP_SCALE // 2
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--shape", default="smollm2", choices=("smollm2", "tiny"),
                    help="smollm2: the embedded SmolLM2-135M; tiny: a random tiny model (for tests)")
    args = ap.parse_args(argv)

    import torch

    from bench import train as bench_train
    from stages import gguf
    from stages.train import fused_lora, hardware, torch_backend, varlen
    from stages.train.format import encode_rows
    from stages.train.packing import BatchStream

    hw = hardware.detect(args.dtype)
    with tempfile.TemporaryDirectory(prefix="medforge-bench-") as tmp:
        if args.shape == "tiny":
            base = bench_train.build_random("tiny", Path(tmp) / "base", hw.torch_dtype)
        else:
            from stages.base_model import materialize
            base = materialize("embedded:smollm2-135m-instruct", Path(tmp) / "base")
        tokenizer = torch_backend.load_tokenizer(base)
        torch.manual_seed(0)
        model = torch_backend.add_lora(torch_backend.load_model(base, "none", hw), bench_train.LORA, "none", False)
    model.train()
    examples, _ = encode_rows(tokenizer, bench_train.news2_rows(256), 1024)
    stream = BatchStream(examples, 8, seed=0)
    batch = max((stream.next()[1] for _ in range(4)), key=lambda b: sum(len(e.input_ids) for e in b))
    trained = sum(e.n_trained for e in batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    variants = {"now": {}, "torch_randint_masks": {"keep_mask": torch_randint_mask},
                "one_call_per_example": {"PAD_SLACK": 0.0}, "sdpa_attention": {"SCORES_MAX_LEN": 0},
                "padded_scores": {"SCORES_PAD_SLACK": varlen.PAD_SLACK}}
    owners = {"keep_mask": fused_lora, "PAD_SLACK": varlen, "SCORES_MAX_LEN": varlen, "SCORES_PAD_SLACK": varlen}
    kept = {name: getattr(owners[name], name) for name in owners}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for step in range(args.steps + 1):
            for name, changes in variants.items():
                for key, value in {**kept, **changes}.items():
                    setattr(owners[key], key, value)
                started = time.perf_counter()
                torch_backend.accumulate_gradients(model, [batch], trained, tokenizer.pad_token_id, hw, True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step:  # the first round warms up kernels and allocators
                    times[name].append(time.perf_counter() - started)
    finally:
        for key, value in kept.items():
            setattr(owners[key], key, value)
    best = {name: min(t) for name, t in times.items()}
    result = {
        "bench": "train_step", "cpu": gguf.cpu_model(), "device": hw.device, "dtype": hw.dtype,
        "threads": torch.get_num_threads(), "shape": args.shape,
        "input_tokens": sum(len(e.input_ids) for e in batch), "examples": len(batch), "timed_steps": args.steps,
        **{f"{name}_s": round(t, 3) for name, t in best.items()},
        "numpy_masks_speedup": round(best["torch_randint_masks"] / best["now"], 3),
        "padded_attention_speedup": round(best["one_call_per_example"] / best["now"], 3),
        "scores_attention_speedup": round(best["sdpa_attention"] / best["now"], 3),
        "unpadded_scores_speedup": round(best["padded_scores"] / best["now"], 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
