"""`python -m tui.chat_worker`: the chat pane's model runs here, in its own process.

Generation in a thread of the dashboard's process competes with the UI for the GIL and
decodes ~30% slower; in a process of its own it decodes as fast as bare llama-cpp-python.
Protocol, JSON lines: requests on stdin
  {"op": "chat", "id", "model": adapter|null, "messages", "max_tokens", "temperature"}
  {"op": "stop", "id"}
and replies on stdout
  {"id", "text"}                                  batched pieces, about five a second
  {"id", "done": true, "tokens", "decode_s", "stopped", "note"}   note: "" or what was left out to fit the context
  {"id", "error"}                                 one line naming the file or doit task to fix it
It exits when stdin closes (the dashboard quit). Models stay loaded between requests.
With MEDFORGE_SERVER_URL set (`medforge --url http://host:port`), a running `medforge serve`
answers instead and nothing loads here.
"""
from __future__ import annotations

import sys
import threading
import time

import orjson

# each batch is one repaint of the dashboard (~6 ms of CPU): at 10 a second that took ~5% from
# the decoder on a busy 2-core machine (bench/tui.py), at 5 a second it still reads as a stream
FLUSH_S = 0.2


def main() -> int:
    import os

    from stages import config
    from stages.chat import URL_ENV, stream_chat

    cfg = config.load(".")
    url = os.environ.get(URL_ENV) or None
    out = sys.stdout.buffer
    out_lock = threading.Lock()
    stops: dict[str, threading.Event] = {}

    def send(row: dict) -> None:
        with out_lock:
            out.write(orjson.dumps(row) + b"\n")
            out.flush()

    def answer(req: dict) -> None:
        rid, stop = req["id"], stops[req["id"]]
        tokens, first, last_post, pending, notes = 0, None, 0.0, [], []
        try:
            for piece in stream_chat(cfg, req.get("model"), req["messages"], max_tokens=req.get("max_tokens", 256),
                                     temperature=req.get("temperature", 0.0), stop=stop, url=url, notes=notes):
                now = time.perf_counter()
                first = first or now
                tokens += 1
                pending.append(piece)
                if now - last_post >= FLUSH_S:
                    send({"id": rid, "text": "".join(pending)})
                    pending, last_post = [], now
            if pending:
                send({"id": rid, "text": "".join(pending)})
            send({"id": rid, "done": True, "tokens": tokens, "stopped": stop.is_set(), "note": "; ".join(notes),
                  "decode_s": time.perf_counter() - first if first else 0.0})
        except Exception as exc:  # a missing model or a load failure: reported, the worker stays up
            if pending:
                send({"id": rid, "text": "".join(pending)})
            send({"id": rid, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
        finally:
            stops.pop(rid, None)

    for line in sys.stdin.buffer:
        try:
            req = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if req.get("op") == "stop":
            if req.get("id") in stops:
                stops[req["id"]].set()
        elif req.get("op") == "chat":
            stops[req["id"]] = threading.Event()
            threading.Thread(target=answer, args=(req,), daemon=True).start()
    for event in list(stops.values()):  # the dashboard is gone: stop generating
        event.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
