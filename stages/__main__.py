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

from stages import layout
from stages.errors import failure_line
from stages.gguf import LOG_ENV

# stage -> (module, takes a name?)
STAGES = {
    "base_model": ("stages.base_model", True),
    "base_gguf": ("stages.export", True),
    "scrape": ("stages.scrape", True),
    "normalize": ("stages.normalize", True),
    "dedup": ("stages.dedup", False),
    "split": ("stages.split", True),
    "train": ("stages.train", True),
    "lint": ("stages.train.lint", True),
    "eval": ("stages.evaluate", True),
    "export": ("stages.export", True),
    "report": ("stages.report", True),
    "report_matrix": ("stages.report", False),
}
# stages whose module offers several entry points name theirs here
ENTRY = {"base_gguf": "run_base", "export": "run", "report_matrix": "run_matrix"}


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


def known_errors() -> tuple[type[BaseException], ...]:
    from stages.config import ConfigError
    from stages.sources import SourceError
    from stages.errors import StageError
    return (ConfigError, SourceError, StageError, FileNotFoundError)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m stages <{'|'.join(STAGES)}> [<name>]", file=sys.stderr)
        return 2
    stage, args = argv[0], argv[1:]
    module_name, named = STAGES[stage]
    task = f"{stage}:{args[0]}" if named and args else stage
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
        try:
            from stages import config
            cfg = config.load()
            module = importlib.import_module(module_name)
            getattr(module, ENTRY.get(stage, "run"))(cfg, *args)
            print(f"[{task}] done in {time.time() - started:.1f}s")
        except known_errors() as exc:
            print(failure_line(task, exc), file=sys.stderr)
            return 2
        except BaseException as exc:  # a bug or an interrupt: the traceback stays in the log, then the outcome
            traceback.print_exc()
            print(failure_line(task, f"{type(exc).__name__}: {exc}".rstrip(": ")), file=sys.stderr)
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
        finally:  # the log closes next: a flush at exit through a closed tee would exit 120
            faulthandler.disable()
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
