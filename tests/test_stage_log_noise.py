"""A task's log is what the user reads to learn what went wrong: library chatter that reads like a failure but is
none, and progress bars (each redraw a line in a file), stay out of it (stages.quiet) — in the stage's process, in
the child processes it runs native code in, and in llama.cpp's converter scripts — and everything else from the
same libraries stays in."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NOISE = r'''
import logging, warnings
import bitsandbytes  # on an AVX512-BF16 CPU this import itself asks the hub for a kernel and logs the failure
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: Hugging Face Hub is in offline mode.")
log.warning("bitsandbytes: a warning that matters")
logging.getLogger("kernels._internals.hf_hub").warning(  # with HF_HUB_OFFLINE=1
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in "
    "offline mode.")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("another deprecation", FutureWarning)
from transformers.utils import logging as hf_logging
print("transformers bars:", hf_logging.is_progress_bar_enabled())
'''
QUIET = "from stages.quiet import quiet_library_noise\nquiet_library_noise()\n"  # what every stage does first


def noisy() -> str:
    """Run in stages.gguf.in_child's child by the test below: what a verification child logs and warns."""
    exec(NOISE, {})
    return "answered"


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root), **(env or {})})
    assert done.returncode == 0, done.stderr
    return done


def _assert_quiet(out: str) -> None:
    assert "Failed to load CPU gemm_4bit_forward" not in out and "Skipping publisher trust check" not in out
    assert "is_gradient_checkpointing" not in out
    assert "bitsandbytes: a warning that matters" in out
    assert "another deprecation" in out
    assert "transformers bars: False" in out


def test_the_optional_kernel_miss_and_one_deprecation_stay_out_of_task_logs_and_nothing_else_does():
    done = _run(QUIET + NOISE)
    _assert_quiet(done.stdout + done.stderr)


def test_a_stage_childs_native_work_is_as_quiet_as_the_stage():
    """export verifies GGUFs in a child process (stages.gguf.in_child): its chatter stays out of the log too."""
    done = _run(QUIET + "from stages.gguf import in_child\nfrom tests.test_stage_log_noise import noisy\n"
                "print(in_child(noisy, doing='verifying'))")
    _assert_quiet(done.stdout + done.stderr)
    assert "answered" in done.stdout


def test_the_converters_progress_bars_stay_out_and_their_lines_stay_in(tmp_path):
    """llama.cpp's converter scripts draw tqdm bars while writing a GGUF: in a log each redraw is a line."""
    src = tmp_path / "llama.cpp"
    (src / "gguf-py" / "gguf").mkdir(parents=True)
    (src / "convert_lora_to_gguf.py").write_text("")
    (src / "convert_hf_to_gguf.py").write_text(
        "from tqdm import tqdm\nprint('INFO:hf-to-gguf:Model successfully exported', flush=True)\n"
        "for _ in tqdm(range(3), desc='Writing'):\n    pass\n")
    done = _run(QUIET + "from stages import llamacpp\nllamacpp.run_script('convert_hf_to_gguf.py', [], 'a model')",
                env={"MEDFORGE_LLAMACPP_SRC": str(src)})
    out = done.stdout + done.stderr
    assert "Model successfully exported" in out
    assert "Writing" not in out and "%|" not in out
