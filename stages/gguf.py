"""The one way to open a GGUF, and native llama.cpp work in a child process.

Every GGUF medforge opens (export verification, `medforge chat`, the dashboard's chat, `medforge
serve`, bench/) goes through `load`, with llama.cpp settings that are safe on the CPU at hand.

Why a setting at all: llama.cpp's CPU backend moves quantized weights into "extra" buffer types
(`use_extra_bufts`): AMX tiles on Intel CPUs with AMX-INT8, repacked blocks elsewhere. A
llama-cpp-python built from its sdist with GCC 12 (Debian 12's) on an AMX CPU decodes every
quantized GGUF (q8_0, q4_k_m, q4_0, q4_1) into SIGSEGV: GCC 12's `_tile_loadconfig` tells the
compiler that `ldtilecfg` reads 8 bytes of the 64-byte tile configuration, so the stores of the
tile rows and columns are dropped as dead, `ldtilecfg` loads stack garbage and faults (seen in gdb:
`ggml_backend_amx_mul_mat` -> `ldtilecfg 0xc0(%rsp)`, with only the palette byte written). Where the
garbage happens to be zeros it does not fault but multiplies with empty tiles. f16 weights never go
to the AMX buffer, which is why f16 GGUFs work. So where the library has its AMX kernels
(`AMX_INT8 = 1` in llama.cpp's system info), extra buffer types are off; everywhere else llama.cpp's
defaults stand (the repacked q4_0 kernels on AVX2/AVX-512 CPUs stay on). `MEDFORGE_LLAMA_EXTRA_BUFTS`
= 1 / 0 overrides (1: a build known good, e.g. by GCC 14; 0: any other crash to rule out).
Measured cost: none where nothing changes; on an AMX CPU the alternative is a crash
(bench/gguf_decode.py prints decode tok/s both ways, each in a child process).

`in_child` runs a function in a fresh Python process: a signal there (SIGSEGV in llama.cpp, an
OOM kill) becomes one StageError line naming what was being done, the GGUF, the CPU and what to
do, instead of a task that dies without a word. Python's fault handler writes the native crash's
Python stack to the task log first.
"""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

from stages.errors import StageError
from stages.quiet import quiet_library_noise

EXTRA_BUFTS_ENV = "MEDFORGE_LLAMA_EXTRA_BUFTS"
LOG_ENV = "MEDFORGE_TASK_LOG"  # set by `python -m stages`: where a child's fault handler writes
# CPU flags that decide which llama.cpp / torch kernels run; named in every crash line
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")

_install_lock = threading.Lock()


# --- the settings
@functools.lru_cache(maxsize=1)
def system_info() -> str:
    """llama.cpp's own description of the kernels compiled in, e.g. "CPU : AVX2 = 1 | AMX_INT8 = 1 | ..."."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace")


def extra_bufts() -> tuple[bool, str]:
    """(use llama.cpp's extra buffer types?, why) — see the module docstring."""
    env = os.environ.get(EXTRA_BUFTS_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1", f"{EXTRA_BUFTS_ENV}={env}"
    if env:
        raise StageError(f"{EXTRA_BUFTS_ENV}={env!r}: expected 1 (on) or 0 (off); fix or unset it")
    if "AMX_INT8 = 1" in system_info():
        return False, "off: this llama.cpp build has AMX kernels, which crash when built by GCC 12"
    return True, "llama.cpp's default"


def install() -> None:
    """Make every `llama_cpp.Llama` of this process load with the safe settings (idempotent).

    Llama() takes no `use_extra_bufts`; it reads llama.cpp's default model parameters, so those are
    the ones set. llama-cpp-python's own server builds its Llama() the same way (`medforge serve`).
    """
    import llama_cpp.llama_cpp as lib

    with _install_lock:
        if getattr(lib.llama_model_default_params, "_medforge", False):
            return
        use, _ = extra_bufts()
        default = lib.llama_model_default_params

        def safe_default_params():
            params = default()
            params.use_extra_bufts = use
            return params

        safe_default_params._medforge = True
        lib.llama_model_default_params = safe_default_params


def load(model: str | Path, lora: str | Path | None = None, *, n_ctx: int = 512, **kwargs):
    """A `llama_cpp.Llama` on `model` (plus a LoRA GGUF), quiet, seeded, with the safe settings.

    Raises StageError naming the file when llama.cpp cannot load it.
    """
    from llama_cpp import Llama

    install()
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("seed", 0)
    try:
        return Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=n_ctx, **kwargs)
    except (ValueError, RuntimeError) as exc:
        what = f"{model}" + (f" + {lora}" if lora else "")
        raise StageError(f"{what}: llama-cpp-python cannot load it ({exc}); rebuild it with doit") from None


# --- the CPU, for error lines and benchmark records
def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_summary() -> str:
    """'<model name> (avx2 avx512f ... amx_int8)': the CPU and the flags that choose kernels."""
    from stages.train.hardware import cpu_flags

    flags = [f for f in CPU_FLAGS if f in cpu_flags()]
    return f"{cpu_model()} ({' '.join(flags) or 'none of ' + '/'.join(CPU_FLAGS)})"


# --- native work in a child process
def _signal_name(code: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(-code).name
    return f"signal {-code}"


def crash_line(doing: str, exitcode: int, advice: str = "") -> str:
    """One line for a child killed by a signal (exitcode < 0): what it was doing, how it died, on which CPU,
    what to do."""
    how = f"{_signal_name(exitcode)}, exit {exitcode}"
    use, why = extra_bufts()
    if not advice:
        advice = (f"set {EXTRA_BUFTS_ENV}=0 and re-run" if use else
                  "rebuild llama-cpp-python with another compiler (pip install --force-reinstall --no-cache-dir "
                  "llama-cpp-python), or export f16 only ([export] merged = [\"f16\"] in adapter.toml)")
    where = "; the task log has the native stack" if os.environ.get(LOG_ENV) else ""
    return (f"llama.cpp crashed ({how}) {doing}, on {cpu_summary()} with llama.cpp extra buffer types "
            f"{'on' if use else 'off'} ({why}); {advice}{where}")


def _child_main(result_fd: int) -> None:
    """The child's side of `in_child`: a pickled (fn, args, kwargs) on stdin, the pickled outcome on result_fd."""
    log = os.environ.get(LOG_ENV)
    if log:
        # the child's own Python stack at a native crash, into the task log its parent tees to
        faulthandler.enable(open(log, "a", encoding="utf-8"), all_threads=False)
    quiet_library_noise()  # before the payload's unpickling imports the libraries
    fn, args, kwargs = pickle.loads(sys.stdin.buffer.read())
    try:
        outcome = ("ok", fn(*args, **kwargs))
    except StageError as exc:
        outcome = ("error", str(exc))
    except BaseException as exc:  # unexpected: its traceback travels as text (not every exception pickles)
        outcome = ("raise", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    sys.stdout.flush()
    with os.fdopen(result_fd, "wb") as out:
        out.write(pickle.dumps(outcome))


def in_child(fn: Callable, *args, doing: str, advice: str = "", **kwargs) -> Any:
    """fn(*args, **kwargs) in a fresh Python process; its result, or its StageError raised here.

    A child killed by a signal raises StageError(crash_line(...)); `doing` says what it was doing
    ("verifying merged-q8_0.gguf (q8_0)"). fn must be importable by name; it, its arguments and its
    result must pickle. The child is a plain `python -c` (not multiprocessing), so whatever script
    called this never runs again in the child. Its output goes where this process's file descriptors go.
    """
    payload = pickle.dumps((fn, args, kwargs))
    read_fd, write_fd = os.pipe()
    # the child imports what this process imports: its sys.path, with `stages` first where this one came from
    paths = [str(Path(__file__).resolve().parents[1])] + [os.path.abspath(p or ".") for p in sys.path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        proc = subprocess.Popen([sys.executable, "-c", f"from stages.gguf import _child_main; _child_main({write_fd})"],
                                stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
    finally:
        os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as result:
            proc.stdin.write(payload)
            proc.stdin.close()
            raw = result.read()
        code = proc.wait()
    except BaseException:  # interrupted here: the child must not outlive its task
        proc.kill()
        proc.wait()
        raise
    if not raw and code < 0:  # killed by a signal before answering
        raise StageError(crash_line(doing, code, advice))
    if not raw:  # a Python error before it could answer (its traceback went to stderr: the task log)
        raise StageError(f"the child process {doing} exited with code {code} before answering; its error is above")
    outcome = pickle.loads(raw)
    if outcome[0] == "ok":
        return outcome[1]
    if outcome[0] == "error":
        raise StageError(outcome[1])
    print(outcome[2], end="", file=sys.stderr)  # the child's traceback, into the task log
    raise RuntimeError(f"{doing}: {outcome[1]}")
