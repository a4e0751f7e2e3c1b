"""What the safe llama.cpp settings of stages.gguf cost: decode tokens/s per export type, one JSON line.

For each GGUF type medforge exports (f16, q8_0, q4_k_m, and q4_0, whose repacked kernels are the
ones extra buffer types speed up on AVX2/AVX-512 CPUs), greedy decoding of --tokens tokens after a
short prompt, each run in its own child process (stages.gguf.in_child), alternating:

  loader      the one loader's settings on this machine (`extra_bufts` says which)
  llama_cpp   llama.cpp's defaults (extra buffer types on): the baseline, or the crash it causes

A child that dies is recorded as "crashed (SIGSEGV)" instead of a rate. `cost` = 1 - loader /
llama_cpp per type where both ran (best of --repeats each; other load only slows a run). Where
the loader changes nothing, both rows run the same settings and the cost is noise.

--python PATH adds a third row, `other`: the loader's settings under another interpreter's
llama-cpp-python (e.g. a venv installed from a wheelhouse built with GGML_NATIVE=OFF), in the
same alternation, and `other_cost` = 1 - other / loader: what that build costs, from one run.

The model is the embedded SmolLM2-135M-Instruct: the project's base GGUF when built (doit
base_gguf), else converted into a temp folder by llama.cpp's converter; quantized there.

    python bench/gguf_decode.py [--tokens 64] [--repeats 3] [--types f16,q8_0,q4_k_m,q4_0] [--python PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEC = "embedded:smollm2-135m-instruct"
PROMPT = "The patient presents with"


def decode_tok_s(path: Path, tokens: int) -> float:
    """Runs in the child: load through the one loader (with the environment's setting), time greedy decoding."""
    from stages import gguf

    llm = gguf.load(path, n_ctx=256)
    try:
        llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)  # warm-up
        llm.reset()
        started = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0)
        return out["usage"]["completion_tokens"] / (time.perf_counter() - started)
    finally:
        llm.close()


def base_f16(work: Path) -> Path:
    from stages import layout, llamacpp
    from stages.base_model import materialize

    own = REPO / layout.base_gguf(SPEC)
    if own.exists():
        return own
    out = work / "base-f16.gguf"
    llamacpp.convert_hf(materialize(SPEC, work / "hf"), out, "f16")
    return out


def run_once(path: Path, tokens: int, extra_bufts: str | None) -> float | str:
    import gguf_decode  # this file by its module name (bench/ is on sys.path): the child imports it, not __main__

    from stages import gguf
    from stages.errors import StageError

    saved = os.environ.pop(gguf.EXTRA_BUFTS_ENV, None)
    if extra_bufts is not None:
        os.environ[gguf.EXTRA_BUFTS_ENV] = extra_bufts
    try:
        return round(gguf.in_child(gguf_decode.decode_tok_s, path, tokens, doing=f"decoding {path.name}"), 1)
    except StageError as exc:
        crash = re.search(r"crashed \((\w+)", str(exc))
        return f"crashed ({crash.group(1)})" if crash else str(exc)
    finally:
        os.environ.pop(gguf.EXTRA_BUFTS_ENV, None)
        if saved is not None:
            os.environ[gguf.EXTRA_BUFTS_ENV] = saved


def run_other(python: str, path: Path, tokens: int) -> float | str:
    """One decode under another interpreter: this script's --child mode there, in its own process."""
    import subprocess

    done = subprocess.run([python, __file__, "--child", str(path), str(tokens)], capture_output=True, text=True)
    if done.returncode:
        return f"failed ({done.returncode}): {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
    last = (done.stdout.strip().splitlines() or [""])[-1]
    try:
        return round(float(last), 1)
    except ValueError:  # run_once's "crashed (SIGSEGV)"
        return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", default="f16,q8_0,q4_k_m,q4_0")
    parser.add_argument("--python", help="another interpreter whose llama-cpp-python build to time too")
    parser.add_argument("--child", nargs=2, metavar=("GGUF", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # under --python's interpreter: its llama-cpp-python, this checkout's loader
        print(run_once(Path(args.child[0]), int(args.child[1]), None))
        return

    from importlib import metadata

    from stages import gguf, llamacpp

    types = args.types.split(",")
    use, why = gguf.extra_bufts()
    with tempfile.TemporaryDirectory(prefix="medforge-bench-gguf-") as tmp:
        work = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):  # the converter's and quantizer's account: stdout is one JSON line
            f16 = base_f16(work)
        paths = {"f16": f16}
        for quant in types:
            if quant != "f16":
                paths[quant] = work / f"{quant}.gguf"
                llamacpp.quantize(f16, paths[quant], quant)
        results: dict[str, dict] = {}
        for quant in types:
            runs = {"loader": [], "llama_cpp": []} | ({"other": []} if args.python else {})
            for _ in range(args.repeats):
                runs["loader"].append(run_once(paths[quant], args.tokens, None))
                runs["llama_cpp"].append(run_once(paths[quant], args.tokens, "1"))
                if args.python:
                    runs["other"].append(run_other(args.python, paths[quant], args.tokens))
            row = {}
            for name, values in runs.items():
                rates = [v for v in values if isinstance(v, float)]
                row[name] = max(rates) if len(rates) == len(values) else next(v for v in values if isinstance(v, str))
            if isinstance(row["loader"], float) and isinstance(row["llama_cpp"], float):
                row["cost"] = round(1 - row["loader"] / row["llama_cpp"], 3)
            if isinstance(row.get("other"), float) and isinstance(row["loader"], float):
                row["other_cost"] = round(1 - row["other"] / row["loader"], 3)
            results[quant] = row
    print(json.dumps({"metric": "decode_tok_s", "cpu": gguf.cpu_summary(), "loadavg": os.getloadavg()[0],
                      "llama_cpp_python": metadata.version("llama-cpp-python"),
                      **({"other_python": args.python} if args.python else {}),
                      "extra_bufts": {"loader": use, "why": why}, "tokens": args.tokens, "repeats": args.repeats,
                      "results": results}))


if __name__ == "__main__":
    main()
