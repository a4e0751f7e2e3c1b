"""The one GGUF loader (stages.gguf): safe llama.cpp settings on the CPU at hand, and native work in a
child process whose crash is one clear line.

On a CPU with AMX and a llama-cpp-python built by GCC 12, llama.cpp's AMX kernels fault on every
quantized GGUF (see stages.gguf); these tests decode f16, q8_0 and q4_k_m there through the loader.
The model's widths are multiples of 256 so that q8_0 and q4_k tensors qualify for those kernels.
"""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest

from stages import gguf, llamacpp
from stages.errors import StageError
from tests.models import make_tiny_model, session_tempdir

PROMPT = "The patient presents with"


@pytest.fixture(scope="module")
def ggufs() -> dict[str, Path]:
    """f16, q8_0 and q4_k_m GGUFs of one tiny random Llama, by llama.cpp's own converter and quantizer."""
    root = session_tempdir("medforge-gguf-loader-")
    base = make_tiny_model(root / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=2)
    out = {"f16": root / "f16.gguf"}
    llamacpp.convert_hf(base, out["f16"], "f16")
    for quant in ("q8_0", "q4_k_m"):
        out[quant] = root / f"{quant}.gguf"
        llamacpp.quantize(out["f16"], out[quant], quant)
    return out


def decode(path: Path, n_tokens: int = 8) -> dict:
    """Runs in the child: load through the one loader, score the prompt, generate greedily."""
    llm = gguf.load(path, n_ctx=128)
    try:
        tokens = llm.tokenize(PROMPT.encode())
        llm.eval(tokens)
        last = [float(x) for x in llm.scores[llm.n_tokens - 1]]
        llm.reset()
        out = llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.0)
        return {"finite": all(math.isfinite(x) for x in last), "generated": out["usage"]["completion_tokens"],
                "pid": os.getpid()}
    finally:
        llm.close()


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_the_one_loader_decodes_every_export_type_in_a_child(ggufs, quant):
    result = gguf.in_child(decode, ggufs[quant], doing=f"decoding {quant}")
    assert result["pid"] != os.getpid()
    assert result["finite"] and result["generated"] == 8


def test_extra_buffer_types_are_off_exactly_where_llama_cpp_has_amx_kernels(monkeypatch):
    monkeypatch.delenv(gguf.EXTRA_BUFTS_ENV, raising=False)
    use, why = gguf.extra_bufts()
    assert use == ("AMX_INT8 = 1" not in gguf.system_info()), why
    for value, want in (("0", False), ("1", True)):
        monkeypatch.setenv(gguf.EXTRA_BUFTS_ENV, value)
        assert gguf.extra_bufts() == (want, f"{gguf.EXTRA_BUFTS_ENV}={value}")
    monkeypatch.setenv(gguf.EXTRA_BUFTS_ENV, "yes")
    with pytest.raises(StageError, match=f"{gguf.EXTRA_BUFTS_ENV}='yes': expected 1 .* or 0"):
        gguf.extra_bufts()


def loaded_setting() -> bool:
    """Runs in the child: what llama.cpp's model parameters say once the loader is installed."""
    import llama_cpp.llama_cpp as lib

    gguf.install()
    return bool(lib.llama_model_default_params().use_extra_bufts)


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_setting_reaches_llama_cpp(monkeypatch, value):
    monkeypatch.setenv(gguf.EXTRA_BUFTS_ENV, value)
    assert gguf.in_child(loaded_setting, doing="reading the setting") is (value == "1")


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)  # a real invalid read in native code: SIGSEGV


def raise_stage_error() -> None:
    raise StageError("x.gguf: told to fail")


def test_a_child_killed_by_a_signal_is_one_line_naming_what_it_did(monkeypatch):
    monkeypatch.delenv(gguf.LOG_ENV, raising=False)
    with pytest.raises(StageError) as info:
        gguf.in_child(segfault, doing="decoding merged-q8_0.gguf (q8_0)")
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"llama.cpp crashed (SIGSEGV, exit -{int(signal.SIGSEGV)}) decoding merged-q8_0.gguf (q8_0), "
                           f"on {gguf.cpu_model()}")
    assert "extra buffer types" in line and ("set " in line or "rebuild llama-cpp-python" in line)


def test_a_childs_stage_error_and_result_come_back(monkeypatch):
    with pytest.raises(StageError, match="^x.gguf: told to fail$"):
        gguf.in_child(raise_stage_error, doing="testing")
    assert gguf.in_child(math.fsum, [0.1] * 10, doing="adding") == 1.0


def test_a_native_crash_writes_its_python_stack_to_the_task_log(monkeypatch, tmp_path):
    log = tmp_path / "task.log"
    log.write_text("[export:x] started\n")
    monkeypatch.setenv(gguf.LOG_ENV, str(log))
    with pytest.raises(StageError, match="the task log has the native stack"):
        gguf.in_child(segfault, doing="decoding")
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text and "in segfault" in text


def exit_without_answer() -> None:
    os._exit(3)


def test_a_child_that_exits_without_answering_is_not_called_a_crash():
    with pytest.raises(StageError, match="^the child process testing exited with code 3 before answering"):
        gguf.in_child(exit_without_answer, doing="testing")
