"""`python -m stages <stage> [<name>]`: run one pipeline step, as doit's actions do.

Each step runs in its own process (memory comes back when it ends; a kill stops only
it) and tees its output into data/logs/<stage>_<name>.log for the dashboard. Every log
ends with the outcome: `[task] done in Ns`, or `[task] failed: <one line>`. A known
failure prints that one line naming what to fix and exits 2, without a traceback; an
unexpected one keeps its traceback in the log above the line and exits 1; a native
crash writes its Python stack there (faulthandler), and doit's reporter adds the
failure line for a process that died without one (stages.events).
"""
from __future__ import annotations

import faulthandler
import importlib
import os
import sys
import time
import traceback

from stages import layout, progress, registry
from stages.errors import ConfigError, SourceError, StageError, failure_line
from stages.gguf import LOG_ENV
from stages.quiet import quiet_library_noise

class _Tee:
    """Write to the terminal (doit captures it) and to the task's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return False

    def fileno(self):
        return self.stream.fileno()


KNOWN_ERRORS = (ConfigError, SourceError, StageError, FileNotFoundError)  # one line naming the fix, no traceback

def main(argv: list[str]) -> int:
    if not argv or argv[0] not in registry.BY_NAME:
        print(f"usage: python -m stages <{'|'.join(registry.NAMES)}> [<name>]", file=sys.stderr)
        return 2
    stage, args = registry.BY_NAME[argv[0]], argv[1:]
    task = f"{stage.name}:{args[0]}" if stage.named and args else stage.name
    log_path = layout.log_file(task)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("", encoding="utf-8")
    # appending: child processes append to it too (their fault handlers), and nothing may overwrite that
    with open(log_path, "a", encoding="utf-8") as log:
        sys.stdout, sys.stderr = _Tee(sys.__stdout__, log), _Tee(sys.__stderr__, log)
        os.environ[LOG_ENV] = str(log_path)  # child processes' fault handlers write here too (stages.gguf)
        faulthandler.enable(log)
        started = time.time()
        print(f"[{task}] started (pid {os.getpid()})")
        quiet_library_noise()
        progress.start(task)
        try:
            from stages import config
            cfg = config.load()
            getattr(importlib.import_module(stage.module), stage.entry)(cfg, *args)
            print(f"[{task}] done in {time.time() - started:.1f}s")
        except KNOWN_ERRORS as exc:
            print(failure_line(task, exc), file=sys.stderr)
            return 2
        except BaseException as exc:  # a bug or an interrupt: the traceback stays in the log, then the outcome
            traceback.print_exc()
            print(failure_line(task, f"{type(exc).__name__}: {exc}".rstrip(": ")), file=sys.stderr)
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
        finally:  # the log closes next: a flush at exit through a closed tee would exit 120
            progress.stop()
            faulthandler.disable()
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
