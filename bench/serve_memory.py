"""What `medforge serve` costs in memory per adapter, against one process per adapter: one JSON line.

On the embedded SmolLM2-135M-Instruct (its f16 base GGUF) with --adapters random LoRA GGUFs at the
default recipe's shape (r=16 on every projection: ~9.4 MiB each), each measured in a fresh server
process, after one chat request to every model it serves (weights touched, compute buffers made):

  base        `medforge serve --adapters ''`: the base alone
  one         `medforge serve --adapters a1`: the base + one LoRA
  all         `medforge serve --max-loaded 0` with all --adapters, every LoRA loaded, then ROUNDS more
              rounds of requests to every model (rss_all_rounds_mib: flat where requests leave nothing behind)
  bounded     `medforge serve --max-loaded K` with all --adapters (N > K): ROUNDS rounds over every model
              in turn, LRU's worst case, where every adapter request frees a LoRA and reloads another
              (rss_k_rounds_mib, against bound_k_mib: the bound of K adapters)
  baseline    one `medforge serve --model base-f16.gguf --lora_path <lora>` process per adapter (what
              serving each export alone took before): the sum of their resident memory

Resident memory is the server process's RSS (psutil); also once started (before any request), which
splits an adapter's cost into loading its LoRA (slope_loaded_mib) and what its first request adds
(slope_graph_mib: llama.cpp's graph metadata, sized for every loaded LoRA at once; see the README). The bound asserted, from the issue:
  rss(N adapters) <= rss(base) + N x (LoRA GGUF size x 1.1) + OVERHEAD_MIB
for N = 1 and N = all (every LoRA loaded), and with N replaced by K for the bounded run, which with
K < N is tighter than the issue's bound for N; the exit status is 1 where one does not hold (the JSON
line says which). Also the reload latency: serve's switch between two adapters (Models.__call__) with
both loaded and with one (each switch reloads the other's LoRA GGUF, from the page cache), in this
process, and the median adapter request end to end (8 tokens) in the all-loaded and bounded runs.

The project (base HF folder, GGUFs, LoRAs) is built once into ~/.cache/medforge/bench-serve/.

Measured 2026-12-05 on "Intel(R) Xeon(R) Processor" (lscpu; 2 cores, KVM, AMX: llama.cpp extra buffer
types off), f16 base 258 MiB, LoRA 9.34 MiB: base alone 398.9 MiB; 1 adapter 410.2-410.4; 4 adapters
441.8 (bound 472.0); 8 adapters 484.0 (bound 513.1), and 484.0-484.2 over 5 more rounds of requests;
one process per adapter 446 MiB each (1,786 for 4, 3,572 for 8: 4.0x and 7.4x). Each more adapter
costs 10.52-10.54 MiB (1.13x its file): 9.46-9.47 loading it (1.01x) and 1.06 of llama.cpp graph
metadata. The bound's 1.1x plus 32 MiB holds to about 125 adapters of this size (each is 0.25 MiB
over 1.1x), and per adapter from r=22 on (a 12.3 MiB file). Before serve freed each request's
sampler chain, the server also grew 0.57 MiB per request until Python's cycle collector ran (4
adapters: 10.6-10.9 MiB each, growing with rounds); before it fixed glibc's mmap threshold, 13.4 MiB.

With --adapters 12 --max-loaded 8 (same day and CPU): 12 all loaded 526.9 MiB (526.9-527.2 over 5
rounds; 10.61 MiB, 1.14x, per loaded adapter; bound 554.2); at most 8 loaded, 469.1 once started and
484.3-484.5 over 5 rounds asking all 12 in turn, every adapter request reloading a LoRA: as 8 loaded,
within the bound of 8 (513.1 MiB), 11x less than 12 separate processes (5,357 MiB). The reload: serve's
switch takes 4.5 ms (median of 20) where it reloads a 9.34 MiB LoRA GGUF from the page cache, 0.0 ms
where both are loaded (llama.cpp defers the graph re-reserve to the decode, the same in both). The
median requests (8 tokens) were 7.6 s all loaded and 1.0 s bounded: noise from the pipeline running
beside the bench on these 2 cores (loaded in one process the two took 5-16 s alike), not the reloads.

    python bench/serve_memory.py [--adapters 12] [--max-loaded 8]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEC = "embedded:smollm2-135m-instruct"
OVERHEAD_MIB = 32.0  # fixed: a LoRA graph's larger compute buffer, allocator slack, the set's bookkeeping
R = 16
ROUNDS = 5
MIB = 2 ** 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(root: Path, args: list[str], models: list[str], rounds: int = 1) -> tuple[float, list[float], list[float]]:
    """Start a server process with `args`, ask every model one short chat `rounds` times; its RSS in MiB
    once started (every GGUF loaded, no request yet) and after each round, and each request's seconds."""
    import httpx
    import psutil

    from tests.serve_project import stop

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MEDFORGE_API_KEY", None)
    log = tempfile.TemporaryFile()  # not a pipe: llama.cpp's chatter would fill it and stall the server
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "serve", *args, "--port", str(port)], cwd=root,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"server {args} exited: {log.read()[-2000:].decode(errors='replace')}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"server {args} did not start")
            time.sleep(0.5)
        started = psutil.Process(proc.pid).memory_info().rss / MIB
        rss, seconds = [], []
        for _ in range(rounds):
            for model in models:
                start = time.perf_counter()
                reply = httpx.post(f"{url}/chat/completions", timeout=300, json={
                    "model": model, "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "RR 24, SpO2 93%, HR 112, alert, 38.4 C. NEWS2?"}]})
                reply.raise_for_status()
                seconds.append(time.perf_counter() - start)
            time.sleep(0.5)
            rss.append(psutil.Process(proc.pid).memory_info().rss / MIB)
        return started, rss, seconds
    finally:
        stop(proc, log)


def project(n: int) -> tuple[Path, list[str]]:
    from stages import base_model
    from tests.serve_project import build

    cache = Path.home() / ".cache" / "medforge" / "bench-serve"
    hf = cache / "smollm2-hf"
    if not (hf / "config.json").exists():
        base_model.materialize(SPEC, hf)
    names = [f"a{i}" for i in range(1, n + 1)]
    build(cache, hf, names, r=R, scale=0.02)
    return cache, names


def reload_ms(root: Path, names: list[str], times: int = 20) -> tuple[float, float]:
    """Median milliseconds of serve's model switch between two adapters (Models.__call__: set the context's
    LoRA, clear its KV cache), with both loaded (--max-loaded 0) and with one (--max-loaded 1: every switch
    frees one LoRA and loads the other's GGUF again, from the page cache). In this process, on the real code."""
    import statistics

    from stages import config, gguf
    from stages.serve import Models, catalog

    gguf.install()
    medians = []
    for max_loaded in (0, 1):
        models = Models(catalog(config.load(root), names[:2]), n_ctx=512, max_loaded=max_loaded)
        try:
            spent = []
            for i in range(times):
                start = time.perf_counter()
                models(names[i % 2])
                spent.append(time.perf_counter() - start)
            assert max_loaded == 0 or models.reloads == times, models.reloads
            medians.append(statistics.median(spent) * 1000)
        finally:
            models.close()
    return medians[0], medians[1]


def main() -> int:
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=12)
    parser.add_argument("--max-loaded", type=int, default=8, help="K of the bounded run (medforge serve's default)")
    args = parser.parse_args()
    from stages import gguf, layout

    root, names = project(args.adapters)
    old = os.getcwd()
    os.chdir(root)
    try:
        base = next(Path("data/gguf").glob("*/base-f16.gguf")).resolve()
        loras = [layout.lora_gguf(n).resolve() for n in names]
        switch_ms, switch_reload_ms = reload_ms(root, names)
    finally:
        os.chdir(old)
    lora_mib = [p.stat().st_size / MIB for p in loras]
    rss_base = run_server(root, ["--adapters", ""], ["base"])[1][0]
    started_one, (rss_one,), _ = run_server(root, ["--adapters", names[0]], ["base", names[0]])
    # every LoRA loaded (--max-loaded 0): what one more loaded adapter costs. ROUNDS rounds over every model:
    # what a long-running server does, each request switching the LoRA
    all_args = ["--adapters", ",".join(names)]
    started_all, rss_rounds, seconds_all = run_server(root, [*all_args, "--max-loaded", "0"], ["base", *names],
                                                      rounds=ROUNDS)
    rss_all = rss_rounds[0]
    # at most K loaded: asking the N > K adapters round-robin is LRU's worst case, every request reloads a LoRA
    k = args.max_loaded
    started_k, rss_k_rounds, seconds_k = run_server(root, [*all_args, "--max-loaded", str(k)], ["base", *names],
                                                    rounds=ROUNDS)
    separate = [run_server(root, ["--model", str(base), "--lora_path", str(lora), "--chat_format",
                                  "chat_template.default", "--host", "127.0.0.1"], [None])[1][0]
                for lora in loras]
    more = max(1, len(names) - 1)
    slope = (rss_all - rss_one) / more
    load_slope = (started_all - started_one) / more
    bound_one = rss_base + 1.1 * lora_mib[0] + OVERHEAD_MIB
    bound_all = rss_base + 1.1 * sum(lora_mib) + OVERHEAD_MIB
    loaded = len(names) if k == 0 else min(k, len(names))
    # with at most K loaded, the bound of K adapters holds for N of them: within the bound for every N
    bound_k = rss_base + 1.1 * sum(lora_mib[:loaded]) + OVERHEAD_MIB
    per_round = len(names) + 1  # each round asks the base first, then every adapter

    def lora_request_s(seconds: list[float]) -> float:
        return round(statistics.median(t for i, t in enumerate(seconds) if i % per_round), 3)

    record = {
        "bench": "serve_memory", "cpu": gguf.cpu_summary(), "base_gguf_mib": round(base.stat().st_size / MIB, 1),
        "adapters": len(names), "lora_gguf_mib": round(lora_mib[0], 2),
        "rss_base_mib": round(rss_base, 1), "rss_one_mib": round(rss_one, 1), "rss_all_mib": round(rss_all, 1),
        "per_adapter_mib": round((rss_all - rss_base) / len(names), 2),
        # the marginal cost of one more adapter, against its file: above 1.1 the bound holds only while N x the
        # excess stays under OVERHEAD_MIB
        "slope_mib": round(slope, 2), "slope_over_lora": round(slope / lora_mib[0], 2),
        # of which: loading the LoRA (its tensors), and llama.cpp's graph metadata, made at the first LoRA
        # request and sized for every loaded LoRA applied at once (see the README)
        "slope_loaded_mib": round(load_slope, 2), "slope_graph_mib": round(slope - load_slope, 2),
        # after each round of requests to every model: flat where no request leaves memory behind
        "rss_all_rounds_mib": [round(x, 1) for x in rss_rounds],
        "bound_one_mib": round(bound_one, 1), "bound_all_mib": round(bound_all, 1), "overhead_mib": OVERHEAD_MIB,
        "baseline_separate_mib": round(sum(separate), 1), "baseline_per_process_mib": [round(x, 1) for x in separate],
        "baseline_over_all": round(sum(separate) / rss_all, 2),
        # the bounded run: --max-loaded K with all N adapters
        "max_loaded": k, "rss_k_started_mib": round(started_k, 1), "rss_k_rounds_mib": [round(x, 1) for x in rss_k_rounds],
        "bound_k_mib": round(bound_k, 1), "baseline_over_k": round(sum(separate) / max(rss_k_rounds), 2),
        # reloading an evicted LoRA: serve's switch between two adapters, both loaded and one (each switch
        # reloads), and the median LoRA request end to end (8 tokens) with all loaded and with K
        "switch_ms": round(switch_ms, 2), "switch_reload_ms": round(switch_reload_ms, 2),
        "request_all_loaded_s": lora_request_s(seconds_all), "request_k_loaded_s": lora_request_s(seconds_k),
        "met": rss_one <= bound_one and max(rss_rounds) <= bound_all and max(rss_k_rounds) <= bound_k,
    }
    print(json.dumps(record), flush=True)
    return 0 if record["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
