"""A task's log is what the user reads to learn what went wrong: library chatter that reads like a failure but is
none stays out of it (stages.__main__.quiet_library_noise), and everything else from the same libraries stays in."""
from __future__ import annotations

import subprocess
import sys

CHILD = r'''
import logging, warnings
from stages.__main__ import quiet_library_noise
quiet_library_noise()
import bitsandbytes  # on an AVX512-BF16 CPU this import itself asks the hub for a kernel and logs the failure
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: Hugging Face Hub is in offline mode.")
log.warning("bitsandbytes: a warning that matters")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("another deprecation", FutureWarning)
'''


def test_the_optional_kernel_miss_and_one_deprecation_stay_out_of_task_logs_and_nothing_else_does():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in done.stderr
    assert "is_gradient_checkpointing" not in done.stderr
    assert "bitsandbytes: a warning that matters" in done.stderr
    assert "another deprecation" in done.stderr
