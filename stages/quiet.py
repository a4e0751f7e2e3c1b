"""Library chatter kept out of task logs: a task's log is what the user reads to learn what went wrong, and lines
that read like a failure but are none, or a progress bar's every redraw, bury what matters.

Every stage process calls `quiet_library_noise()` before its work (stages.__main__), and so does every child
process it starts for native code (stages.gguf.in_child); llama.cpp's converter scripts inherit the environment.
"""
from __future__ import annotations

import logging
import os
import warnings

# bitsandbytes, imported through peft, asks the Hugging Face hub for an optional CPU 4-bit kernel on every CPU with
# AVX512-BF16 and logs "Failed to load ..." when it cannot have it (offline, or the kernel repository is not
# trusted) — and with HF_HUB_OFFLINE=1 the `kernels` package says it skips that kernel's trust check; medforge never
# relies on that kernel. transformers warns that a name peft calls is deprecated. None of it says anything a user
# can act on.
QUIET = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
         ("kernels._internals.hf_hub",
          "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"))
QUIET_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)
# progress bars: in a log file each redraw is a line (transformers' "Loading weights", the converters' "Writing:
# 21%"); a task's stdout is never a terminal (stages.__main__._Tee), so no bar there is seen as one
NO_BARS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def quiet_library_noise() -> None:
    """Before the libraries are imported: transformers reads its progress-bar switch at import."""
    for name, value in NO_BARS.items():
        os.environ.setdefault(name, value)
    for logger, start in QUIET:
        logging.getLogger(logger).addFilter(lambda record, start=start: not record.getMessage().startswith(start))
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
