"""`medforge serve`: every exported adapter behind one OpenAI-compatible endpoint, on one base in memory.

    medforge serve [--host 127.0.0.1] [--port 8000] [--adapters a,b] [--n-ctx 2048] [--max-loaded 8]

One HTTP server (llama-cpp-python's own OpenAI routes: /v1/chat/completions with streaming,
/v1/completions, /v1/models) where the request's `model` picks what answers:

  base                the base GGUF (data/gguf/<base>/base-f16.gguf)
  <adapter>           the adapter's LoRA GGUF applied on that same base: the base is loaded once and
                      LoRA GGUFs beside it (llama_adapter_lora_init, a few MB each), at most
                      --max-loaded of them at a time, the least recently used freed first and
                      loaded again (from the page cache, in milliseconds) when next asked for
  <adapter>:<quant>   the adapter's merged GGUF (merged-q8_0.gguf, ...): a full model, loaded on first
                      use, at most MAX_MERGED at a time
  base:<slug>         the base of adapters trained on another base than the project's default one

Each adapter answers with its own chat template (the tokenizer saved beside its LoRA, else the
GGUF's) and its own stop tokens (its Modelfile's `PARAMETER stop` and its end-of-sequence token),
in chat completions and in plain /v1/completions alike (added to the request's own `stop`). Every
GGUF opens through the one loader, stages.gguf, with its safe llama.cpp settings.

Concurrency: one llama.cpp context per base, and requests take turns on it (llama-cpp-python's
server holds its model lock for a whole request, streaming included). Before each request the
context's LoRA set is made the request's (llama_set_adapters_lora; a LoRA reloads only if it was
evicted) and its KV cache is cleared, so a request never sees another adapter's weights or keys and
values, and gives the tokens that model gives loaded alone. An evicted LoRA is freed between
requests, never during one: only the next request's model lookup evicts, and the previous request
is over by then (the server's model lock). Two CPU cores gain nothing from decoding two
requests at once, and one context costs one KV cache instead of one per adapter: a second context
on SmolLM2-135M at n_ctx 2048 adds 47.6 MiB resident (its KV cache and compute buffers), an adapter
10.5 MiB: its LoRA's tensors (1.01x the file) and 1.06 MiB of llama.cpp graph metadata, which llama.cpp
sizes for every loaded LoRA applied at once (bench/serve_memory.py; README, "Use an export"). That
1.13x per loaded adapter is why --max-loaded bounds the loaded set: resident memory then stays
under base + K x (LoRA + 10 %) + a fixed overhead however many adapters are served.

Binds 127.0.0.1 by default. Any other address needs MEDFORGE_API_KEY (clients send it as the
bearer token, as the `openai` client's api_key); without it the server refuses to start.

The old single-model form stays: `medforge serve --adapter NAME` (the adapter's verified export)
or llama_cpp.server's own arguments (`--model`, `--lora_path`, `--chat_format`, ...), run with the
same safe settings.
"""
from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from stages.chat import API_KEY_ENV, BASE_ID  # noqa: F401 (also read from here)
from stages.errors import StageError

MAX_MERGED = 1
MAX_LOADED = 8  # LoRAs loaded at a time (--max-loaded; 0: no limit)
N_CTX = 2048
LEGACY_ARGS = ("--model", "--config_file", "--lora_path")


# --- what is served
@dataclass
class Entry:
    """One `model` id: kind "base", "lora" (path: the LoRA GGUF on `base`) or "merged" (path: a full GGUF)."""
    id: str
    kind: str
    base: Path  # the base GGUF (for "merged", the base it was trained on)
    path: Path | None = None
    adapter: str | None = None
    template: str | None = None  # chat template; None: the GGUF's own
    eos: str | None = None
    bos: str | None = None
    stops: list[str] = field(default_factory=list)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse a non-loopback address without an API key (one line)."""
    if not is_loopback(host) and not api_key:
        raise StageError(f"refusing to serve on {host}: it is not a loopback address and {API_KEY_ENV} is not set; "
                         f"set {API_KEY_ENV} (clients send it as their bearer API key) or bind 127.0.0.1")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def adapter_template(adapter: str) -> tuple[str | None, str | None, str | None]:
    """(chat template, eos, bos) of the tokenizer training saved beside the LoRA; Nones where it has none."""
    from stages import layout

    folder = layout.lora_dir(adapter)
    config: dict = {}
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    template = config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    if not isinstance(template, str):
        template = None
    return template, _token_text(config.get("eos_token")), _token_text(config.get("bos_token"))


def modelfile_stops(adapter: str) -> list[str]:
    """The stop tokens the export wrote into the adapter's Ollama Modelfile."""
    from stages import layout

    try:
        text = layout.modelfile(adapter).read_text(encoding="utf-8")
    except OSError:
        return []
    return [m.group(1) for m in re.finditer(r'^PARAMETER stop "(.*)"$', text, re.M)]


def catalog(cfg, adapters: list[str] | None = None) -> list[Entry]:
    """Every model id `medforge serve` answers for: the base(s), each adapter's LoRA GGUF and merged GGUFs.

    adapters None: every adapter with an export (the others are skipped); named adapters must have one.
    """
    from stages import chat, layout
    from stages.config import QUANT_TYPES

    named = adapters is not None
    names = list(adapters) if named else sorted(cfg.adapters)
    default_base = chat.base_spec(cfg, None)
    entries: list[Entry] = []
    bases: dict[str, Entry] = {}

    def base_entry(spec: str) -> Entry:
        if spec not in bases:
            path = layout.base_gguf(spec)
            if not path.exists():
                raise StageError(f"{path}: base GGUF not found; build it with `doit base_gguf:{layout.slug(spec)}`")
            ident = BASE_ID if spec == default_base else f"{BASE_ID}:{layout.slug(spec)}"
            bases[spec] = Entry(ident, "base", path, path)
            entries.append(bases[spec])
        return bases[spec]

    if not names or not named or any(cfg.adapter(n).base_model == default_base for n in names):
        if layout.base_gguf(default_base).exists() or named:
            base_entry(default_base)
    for name in names:
        spec = cfg.adapter(name).base_model
        lora = layout.lora_gguf(name)
        merged = [(q, layout.merged_gguf(name, q)) for q in QUANT_TYPES if layout.merged_gguf(name, q).exists()]
        if not lora.exists() and not merged:
            if named:
                raise StageError(f"{lora}: adapter '{name}' has no export yet; build it with `doit export:{name}`")
            continue
        template, eos, bos = adapter_template(name)
        stops = modelfile_stops(name)
        if lora.exists():
            entries.append(Entry(name, "lora", base_entry(spec).base, lora, name, template, eos, bos, stops))
        for quant, path in merged:
            entries.append(Entry(chat.merged_id(name, quant), "merged", layout.base_gguf(spec), path, name,
                                 None, None, None, stops))
    if not entries:
        raise StageError(f"{layout.base_gguf(default_base)}: nothing to serve: no base GGUF and no exported adapter; "
                         f"build them with `doit`")
    return entries


# --- the models behind the ids
class Models:
    """llama-cpp-python's server calls this (under its model lock) for each request's `model`.

    It returns the Llama that answers, set up for that id: the base's one context with exactly the
    id's LoRA applied and an empty KV cache, and the id's chat handler. At most `max_loaded` LoRAs
    (0: all) are loaded at once, least recently used evicted.
    """

    def __init__(self, entries: list[Entry], n_ctx: int = N_CTX, max_loaded: int = MAX_LOADED):
        import llama_cpp.llama_cpp as lib

        from stages import gguf

        self.lib = lib
        self.n_ctx = n_ctx
        self.max_loaded = max_loaded
        self.entries: dict[str, Entry] = {e.id: e for e in entries}
        self.bases: dict[Path, object] = {}
        self.loras: OrderedDict[str, object] = OrderedDict()  # id -> llama_adapter_lora pointer, LRU first
        self.reloads = 0  # LoRAs loaded again after an eviction
        self.active: dict[Path, str | None] = {}  # base GGUF -> the id whose LoRA its context has
        self.merged: OrderedDict[str, object] = OrderedDict()
        self.handlers: dict[str, object] = {}
        self.stops: dict[str, tuple[list[str], list[int]]] = {}
        self.lock = threading.Lock()  # the server serializes already; direct callers (tests, bench) too
        for entry in entries:
            if entry.kind == "merged":
                continue
            if entry.base not in self.bases:
                self.bases[entry.base] = gguf.load(entry.base, n_ctx=n_ctx)
                self.active[entry.base] = None
            if entry.kind == "lora":
                # every LoRA is loaded once here, so a broken file stops the server at start rather than
                # failing its first request; those past max_loaded are freed again as the next ones load
                self._load(entry)
        self.reloads = 0

    def _load(self, entry: Entry):
        """`entry`'s LoRA handle, most recently used; loaded (after evicting the least recently used
        beyond max_loaded) if it is not."""
        handle = self.loras.get(entry.id)
        if handle is None:
            while self.max_loaded and len(self.loras) >= self.max_loaded:
                self._evict(next(iter(self.loras)))
            llm = self.bases[entry.base]
            handle = self.lib.llama_adapter_lora_init(llm._model.model, str(entry.path).encode("utf-8"))
            if not handle:
                raise StageError(f"{entry.path}: llama.cpp cannot load this LoRA GGUF on {entry.base}; "
                                 f"rebuild it with `doit export:{entry.adapter}`")
            self.loras[entry.id] = handle
            self.reloads += 1
        self.loras.move_to_end(entry.id)
        return handle

    def _evict(self, ident: str) -> None:
        """Free `ident`'s LoRA. Called only between requests (under the model lock, before the next one
        runs), so no decode uses it; the context is first taken off it, as llama.cpp's context keeps a
        pointer to its LoRAs and would otherwise apply a freed one."""
        base = self.entries[ident].base
        if self.active[base] == ident:
            rc = self.lib.llama_set_adapters_lora(self.bases[base]._ctx.ctx, None, 0, None)
            if rc:
                raise RuntimeError(f"llama.cpp could not take the LoRA of '{ident}' off its context (code {rc})")
            self.active[base] = None
        # also drops it from the model's LoRA list, which llama.cpp sizes its graph buffers by
        self.lib.llama_adapter_lora_free(self.loras.pop(ident))

    def __iter__(self):
        return iter(self.entries)

    def _entry(self, model: str | None) -> Entry:
        from fastapi import HTTPException

        if not model:
            model = BASE_ID if BASE_ID in self.entries else next(iter(self.entries))
        entry = self.entries.get(model)
        if entry is None:
            raise HTTPException(status_code=404, detail=f"model '{model}' is not served here; served: "
                                f"{', '.join(self.entries)}")
        return entry

    @staticmethod
    def _token(llm, i: int) -> str:
        return llm._model.token_get_text(i) if i >= 0 else ""

    def _stops(self, entry: Entry, llm) -> tuple[list[str], list[int]]:
        """`entry`'s stop strings (its Modelfile's stops and its end-of-sequence token) and the token ids of
        those that are one token: llama-cpp-python detokenizes special tokens to nothing, so a stop such as
        <|im_end|> is only seen by its id."""
        if entry.id not in self.stops:
            stops = list(dict.fromkeys([*entry.stops, entry.eos or self._token(llm, llm.token_eos())]))
            stop_ids = []
            for stop in stops:
                ids = llm.tokenize(stop.encode("utf-8"), add_bos=False, special=True)
                if len(ids) == 1:
                    stop_ids.append(ids[0])
            self.stops[entry.id] = (stops, stop_ids)
        return self.stops[entry.id]

    def completion_stops(self, model: str | None):
        """(stop strings, stopping criteria or None) of `model` for /v1/completions, where no chat handler
        brings them: the same stops its chat completions use. Called right after __call__ (model lock held)."""
        import llama_cpp

        entry = self._entry(model)
        llm = self.merged[entry.id] if entry.kind == "merged" else self.bases[entry.base]
        stops, stop_ids = self._stops(entry, llm)
        if not stop_ids:
            return stops, None

        # the chat formatter's own test (Jinja2ChatFormatter): the last token evaluated is a stop token
        def stop_on_last_token(tokens, logits) -> bool:
            return tokens[-1] in stop_ids

        return stops, llama_cpp.StoppingCriteriaList([stop_on_last_token])

    def _handler(self, entry: Entry, llm):
        """The chat handler of `entry`: its template (else the GGUF's), its end-of-turn and its stop tokens."""
        handler = self.handlers.get(entry.id)
        if handler is not None:
            return handler
        from llama_cpp import llama_chat_format as fmt

        template = entry.template or llm.metadata.get("tokenizer.chat_template")
        if template is None:
            self.handlers[entry.id] = None
            return None

        eos = entry.eos or self._token(llm, llm.token_eos())
        bos = entry.bos or self._token(llm, llm.token_bos())
        stops, stop_ids = self._stops(entry, llm)
        base_formatter = fmt.Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos,
                                                 stop_token_ids=stop_ids or None)

        def formatter(**kwargs):
            response = base_formatter(**kwargs)
            response.stop = stops
            return response

        handler = self.handlers[entry.id] = fmt.chat_formatter_to_chat_completion_handler(formatter)
        return handler

    def _merged(self, entry: Entry):
        from stages import gguf

        llm = self.merged.get(entry.id)
        if llm is None:
            while len(self.merged) >= MAX_MERGED:
                self.merged.popitem(last=False)[1].close()
            llm = self.merged[entry.id] = gguf.load(entry.path, n_ctx=self.n_ctx)
        self.merged.move_to_end(entry.id)
        return llm

    def _activate(self, entry: Entry):
        """The base's context with exactly this entry's LoRA (none for the base) and an empty KV cache."""
        lib = self.lib
        llm = self.bases[entry.base]
        want = entry.id if entry.kind == "lora" else None
        handle = self._load(entry) if want else None  # before the check: loading may evict the active one
        if self.active[entry.base] != want:
            if want is None:
                rc = lib.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
            else:
                adapters = (lib.llama_adapter_lora_p_ctypes * 1)(handle)
                scales = (ctypes.c_float * 1)(1.0)
                rc = lib.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales)
            if rc:
                raise RuntimeError(f"llama.cpp could not set the LoRA of '{entry.id}' (code {rc})")
            self.active[entry.base] = want
        return llm

    def __call__(self, model: str | None = None):
        with self.lock:
            entry = self._entry(model)
            llm = self._merged(entry) if entry.kind == "merged" else self._activate(entry)
            handler = self._handler(entry, llm)
            llm.chat_handler = handler  # None: llama-cpp-python's chat_format for the GGUF
            free_last_sampler(llm)
            # every request starts from an empty KV cache: no other adapter's keys and values, and the
            # same tokens as the model loaded alone (no prompt-prefix reuse across requests)
            llm.reset()
            return llm

    def close(self) -> None:
        for llm in self.merged.values():
            llm.close()
        for base, llm in self.bases.items():
            self.lib.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
            for ident, handle in list(self.loras.items()):
                if self.entries[ident].base == base:
                    self.lib.llama_adapter_lora_free(handle)
                    del self.loras[ident]
            llm.close()


def free_last_sampler(llm) -> None:
    """Free the llama.cpp sampler chain of `llm`'s last generation, whose request is over.

    llama-cpp-python (0.3.36) builds a new chain for every generation (Llama.generate), and llama.cpp
    gives each chain a buffer of one llama_token_data (12 bytes) per vocabulary token: 576 KiB for
    SmolLM2's 49,152 tokens. The Python object that frees it is in a reference cycle (its ExitStack's
    callback holds it), so only Python's cycle collector frees it, and its full collections are rare:
    resident memory grew 0.57 MiB with every request, whatever its model. Freed here, before the next
    request builds its own, one chain per loaded model stays.
    """
    sampler = getattr(llm, "_sampler", None)
    if sampler is not None:
        sampler.close()
        llm._sampler = None


class NoRepeatPenaltyByDefault:
    """ASGI middleware: a completion request that names no `repeat_penalty` gets 1.0 (none).

    OpenAI's API has no repeat penalty, and llama-cpp-python's server applies 1.1 unless told, so an
    `openai` client asking for temperature 0 would not get the model's greedy tokens.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("completions"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and "repeat_penalty" not in data:
            data["repeat_penalty"] = 1.0
            body = json.dumps(data).encode("utf-8")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fixed_mmap_threshold(size: int = 128 * 1024) -> bool:
    """Keep glibc from raising its mmap threshold as large blocks are freed (True where it applied).

    llama.cpp re-reserves its compute buffers whenever a context's LoRA set changes. With glibc's
    dynamic threshold, the first free of such a buffer raises the threshold, later ones come from
    the heap and fragment it: resident memory grew ~4 MiB with the first request of every adapter
    (SmolLM2-135M, r=16: 13.4 MiB per 9.3 MiB LoRA). A fixed threshold (glibc's own default, 128
    KiB) sends them back to mmap, returned to the system when freed: the growth stops after the first.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):  # not glibc: nothing to do
        return False


def completions_with_model_stops(routes, models: Models) -> None:
    """Give /v1/completions each model's own stops, as its chat completions have them.

    Chat completions get an adapter's stops from its chat handler; a plain completion goes straight to
    the model with only the request's `stop`. llama-cpp-python's two completion routes pass the request's
    keyword arguments through `prepare_request_resources` (after it picks the model) before decoding,
    streaming or not: wrapped, it adds the model's stop strings and its stop-token test there.
    """
    from llama_cpp.server.types import CreateCompletionRequest

    original = getattr(routes.prepare_request_resources, "__wrapped__", routes.prepare_request_resources)

    def prepare(body, llama_proxy, body_model, kwargs):
        llama = original(body, llama_proxy, body_model, kwargs)
        if isinstance(body, CreateCompletionRequest) and llama_proxy is models:
            stops, criteria = models.completion_stops(body_model)
            asked = kwargs.get("stop") or []
            asked = [asked] if isinstance(asked, str) else list(asked)
            kwargs["stop"] = list(dict.fromkeys([*asked, *stops]))
            if criteria is not None:
                kwargs["stopping_criteria"] = criteria
        return llama

    prepare.__wrapped__ = original
    routes.prepare_request_resources = prepare


def build_app(models: Models, api_key: str | None, host: str = "127.0.0.1", port: int = 8000):
    """A FastAPI app with llama-cpp-python's OpenAI routes over `models`."""
    import llama_cpp.server.app as routes
    from fastapi import Depends, FastAPI
    from fastapi.middleware import Middleware
    from llama_cpp.server.settings import ServerSettings
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    # interrupt_requests off: a waiting request must not cut the stream being served (it waits its turn)
    routes.set_server_settings(ServerSettings(host=host, port=port, api_key=api_key, interrupt_requests=False))
    routes._llama_proxy = models
    completions_with_model_stops(routes, models)
    app = FastAPI(title="medforge serve", middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))])

    @app.get("/v1/models", dependencies=[Depends(routes.authenticate)])  # before the router's: this one answers
    def list_models() -> dict:
        """llama_cpp.server's list, plus each model's `context_length` (as OpenRouter's API names it), which
        `medforge chat --url` and the dashboard fit a long conversation to."""
        return {"object": "list", "data": [{"id": ident, "object": "model", "owned_by": "me", "permissions": [],
                                            "context_length": models.n_ctx} for ident in models]}

    app.include_router(routes.router)
    app.add_middleware(NoRepeatPenaltyByDefault)
    return app


def serve(cfg, host: str = "127.0.0.1", port: int = 8000, adapters: list[str] | None = None,
          n_ctx: int = N_CTX, max_loaded: int = MAX_LOADED) -> int:
    import uvicorn

    from stages import gguf

    api_key = os.environ.get(API_KEY_ENV) or None
    check_bind(host, api_key)
    fixed_mmap_threshold()
    gguf.install()
    entries = catalog(cfg, adapters)
    models = Models(entries, n_ctx=n_ctx, max_loaded=max_loaded)
    app = build_app(models, api_key, host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"medforge serve: http://{shown}:{port}/v1 models: {', '.join(e.id for e in entries)}"
          f"{' (API key required)' if api_key else ''}", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        models.close()
    return 0


# --- the command
def adapter_args(adapter: str) -> list[str]:
    """llama_cpp.server arguments that serve `adapter`'s verified export (see export.serve_command)."""
    from stages import config, export, layout

    cfg = config.load()
    cfg.adapter(adapter)
    if not layout.verify_file(adapter).exists():
        raise StageError(f"{layout.verify_file(adapter)}: no verified export of '{adapter}' yet; "
                         f"build it first (`doit export:{adapter}`)")
    return export.serve_args(cfg, adapter)


def legacy(argv: list[str]) -> int:
    """One model through llama_cpp.server itself (its own arguments), with the safe llama.cpp settings."""
    from stages import gguf

    if argv[:1] == ["--adapter"] and len(argv) >= 2:
        argv = adapter_args(argv[1]) + argv[2:]
    host = argv[argv.index("--host") + 1] if "--host" in argv[:-1] else "localhost"
    api_key = argv[argv.index("--api_key") + 1] if "--api_key" in argv[:-1] else None
    check_bind(host, api_key or os.environ.get(API_KEY_ENV))
    if api_key is None and os.environ.get(API_KEY_ENV):
        argv = [*argv, "--api_key", os.environ[API_KEY_ENV]]
    gguf.install()  # before the server builds its Llama()
    import llama_cpp.server.__main__ as server

    sys.argv = ["medforge serve", *argv]
    server.main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medforge serve", description=(
        "One OpenAI-compatible server for the base model and every exported adapter (model: base, <adapter>, "
        "<adapter>:<quant>), the base loaded once. The old single-model form: --adapter NAME, or "
        "llama_cpp.server's own arguments (--model ...)."))
    parser.add_argument("--host", default="127.0.0.1",
                        help=f"address to bind (127.0.0.1); any non-loopback address needs {API_KEY_ENV}")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--adapters", default=None,
                        help="comma-separated adapter names (default: every adapter with an export; '' the base alone)")
    parser.add_argument("--n-ctx", type=int, default=N_CTX, help=f"context length per request ({N_CTX})")
    parser.add_argument("--max-loaded", type=int, default=MAX_LOADED, metavar="K",
                        help=f"LoRA adapters loaded at a time, least recently used freed and reloaded when asked "
                             f"again ({MAX_LOADED}; 0: all)")
    return parser


def main(argv: list[str]) -> int:
    if argv[:1] == ["--adapter"] or any(a.split("=")[0] in LEGACY_ARGS for a in argv):
        return legacy(argv)
    from stages import config

    args = build_parser().parse_args(argv)
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()] if args.adapters is not None else None
    if args.max_loaded < 0:
        raise StageError(f"--max-loaded {args.max_loaded}: must be 0 (no limit) or more")
    return serve(config.load(), args.host, args.port, adapters, args.n_ctx, args.max_loaded)
