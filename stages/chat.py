"""`medforge chat` and the streaming chat API the dashboard's chat pane uses.

Which model answers, for an adapter (or the base model when adapter is None):
  1. the base GGUF + the adapter's LoRA GGUF (layout.base_gguf, layout.lora_gguf), through
     llama-cpp-python with the chat template embedded in the GGUF;
  2. else the adapter's best merged GGUF (layout.merged_gguf, f16 first, then finer quants);
  3. else (stream_chat only) transformers + peft on the HF base folder and layout.lora_dir,
     so a freshly trained adapter can be tried before `doit export:<adapter>` ran.
`<adapter>:<quant>` (as `medforge serve` names it) is that merged GGUF alone: what Ollama and
llama.cpp users run.
`medforge chat` insists on GGUF exports and names the doit task that builds a missing one.

API:
    from stages.chat import stream_chat
    for piece in stream_chat(cfg, "clinical_decision", [{"role": "user", "content": "..."}],
                             max_tokens=256, temperature=0.0, stop=event):
        ...   # text pieces as they are generated

  - cfg: stages.config.Config; paths resolve against the working directory (the project root).
  - messages: OpenAI-style [{"role": "system"|"user"|"assistant", "content": str}, ...].
  - stop: a threading.Event; once set, generation ends after the current token.
  - Loaded models are cached per process (ChatModel.get); at most MAX_LOADED stay loaded.
    Calls on one model are serialized by its lock, so stream from one thread per model.
  - Raises StageError when nothing to answer with exists (message names the file and doit task).
  - A conversation longer than the model's context (N_CTX for a GGUF) loses its oldest turns, system messages
    and the last question kept (`fit_turns`); `notes`, a list, gets a sentence saying how many were left out.
    A last question that alone does not fit is a StageError. Through `url` the same, by the server's context.
  - url: a running `medforge serve` (http://host:port, with or without /v1) answers instead of a model
    loaded here (`model` = the adapter's name, or "base"); MEDFORGE_API_KEY, when set, is sent as its
    bearer key. `medforge chat --url` and `medforge --url` (the dashboard) set it; MEDFORGE_SERVER_URL too.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stages import layout
from stages.config import DEFAULT_BASE_MODEL, QUANT_TYPES
from stages.errors import StageError

MAX_LOADED = 2
N_CTX = 2048
TURN_TOKENS = 8  # a message's markers in a chat template (ChatML: `<|im_start|>user\n` ... `<|im_end|>\n`)
TEMPLATE_TOKENS = 64  # the template's own text around the turns (a default system prompt)
URL_ENV = "MEDFORGE_SERVER_URL"  # a running `medforge serve` for `medforge chat` and the dashboard
# what client and server agree on; here, beneath stages.serve (which builds on this module), not in it
API_KEY_ENV = "MEDFORGE_API_KEY"  # the bearer token both send/require when set
BASE_ID = "base"  # the model id of the bare base model


@dataclass(frozen=True)
class ModelChoice:
    """What answers: kind is "gguf" (model + optional LoRA GGUF) or "hf" (base folder + optional peft folder)."""
    kind: str
    model: Path
    lora: Path | None = None

    def describe(self) -> str:
        return f"{self.model}" + (f" + {self.lora}" if self.lora else "")


def base_spec(cfg, adapter: str | None) -> str:
    """The base model an adapter was trained on; with no adapter, the project's (default) base."""
    if adapter is not None:
        return cfg.adapter(split_id(adapter)[0]).base_model
    bases = cfg.base_models()
    if len(bases) == 1 or (bases and DEFAULT_BASE_MODEL not in bases):
        return bases[0]
    return DEFAULT_BASE_MODEL


def choose_model(cfg, adapter: str | None, allow_hf: bool = False) -> ModelChoice:
    """The best available model for `adapter` (see the module docstring); StageError when none exists."""
    spec = base_spec(cfg, adapter)
    base_gguf = layout.base_gguf(spec)
    base_task = f"base_gguf:{layout.slug(spec)}"
    if adapter is None:
        if base_gguf.exists():
            return ModelChoice("gguf", base_gguf)
        hf = layout.base_dir(spec)
        if allow_hf and (hf / "config.json").exists():
            return ModelChoice("hf", hf)
        raise StageError(f"{base_gguf}: base GGUF not found; build it with `doit {base_task}`")
    adapter, quant = split_id(adapter)
    if quant is not None:
        return merged_choice(cfg, adapter, quant)
    lora_gguf = layout.lora_gguf(adapter)
    if lora_gguf.exists() and base_gguf.exists():
        return ModelChoice("gguf", base_gguf, lora_gguf)
    for quant in QUANT_TYPES:
        merged = layout.merged_gguf(adapter, quant)
        if merged.exists():
            return ModelChoice("gguf", merged)
    hf, lora_dir = layout.base_dir(spec), layout.lora_dir(adapter)
    if allow_hf and (hf / "config.json").exists() and layout.lora_weights(adapter).exists():
        return ModelChoice("hf", hf, lora_dir)
    missing, task = (lora_gguf, f"export:{adapter}") if not lora_gguf.exists() else (base_gguf, base_task)
    raise StageError(f"{missing}: not found; build it with `doit {task}`")


def merged_choice(cfg, adapter: str, quant: str) -> ModelChoice:
    """`<adapter>:<quant>`: the adapter's merged GGUF of that quant type; StageError naming the fix when missing."""
    merged = layout.merged_gguf(adapter, quant)
    if merged.exists():
        return ModelChoice("gguf", merged)
    where = layout.adapter_toml(adapter)
    if quant not in QUANT_TYPES:
        raise StageError(f"'{merged_id(adapter, quant)}': {quant} is not a quant type medforge exports; "
                         f"one of {', '.join(QUANT_TYPES)}")
    if quant not in cfg.adapter(adapter).export["merged"]:
        raise StageError(f"{merged}: not exported; add \"{quant}\" to export.merged in {where}, "
                         f"then run `doit export:{adapter}`")
    raise StageError(f"{merged}: not found; build it with `doit export:{adapter}`")


def merged_id(adapter: str, quant: str) -> str:
    """The name chat and serve give an adapter's merged GGUF of one quant type."""
    return f"{adapter}:{quant}"


def split_id(name: str) -> tuple[str, str | None]:
    """`<adapter>` or `<adapter>:<quant>` -> (adapter, quant or None)."""
    adapter, _, quant = name.partition(":")
    return adapter, quant or None


def model_names(cfg) -> list[str]:
    """Every adapter, each followed by its merged quants, as chat and serve name them."""
    return [name for a in sorted(cfg.adapters)
            for name in [a] + [merged_id(a, q) for q in cfg.adapters[a].export["merged"]]]


def turns_cost(lengths: list[int]) -> int:
    """Tokens a conversation takes in a chat template, its messages' contents being `lengths` tokens."""
    return TEMPLATE_TOKENS + sum(n + TURN_TOKENS for n in lengths)


def fit_turns(messages: list[dict], lengths: list[int], budget: int) -> tuple[list[dict], int]:
    """The conversation that fits `budget` tokens (`lengths`: each message's content in tokens), and how many
    messages were left out: the oldest turns go first, a question with its answer, while system messages and
    the last message always stay. StageError when even those do not fit."""
    cost = [n + TURN_TOKENS for n in lengths]
    keep = list(range(len(messages)))
    total = turns_cost(lengths)
    while total > budget:
        older = [i for i in keep[:-1] if messages[i]["role"] != "system"]
        if not older:
            raise StageError(f"the question is about {total} tokens with the chat template; the model's context "
                             f"leaves {budget} beside the answer: shorten it, or ask for fewer answer tokens")
        drop = older[:2] if len(older) > 1 and messages[older[1]]["role"] == "assistant" else older[:1]
        for i in drop:
            keep.remove(i)
            total -= cost[i]
    return [messages[i] for i in keep], len(messages) - len(keep)


def fit_context(messages: list[dict], count, context: int, max_tokens: int,
                notes: list[str] | None = None) -> list[dict]:
    """`messages` fitted to a model's `context` tokens with room for the answer (`fit_turns`; llama.cpp shortens a
    longer answer itself), each message's content measured by `count` (text -> tokens) unless the bytes of all
    already fit (a token is at least one byte); `notes` gets a sentence saying how many were left out."""
    budget = context - min(max_tokens, context // 2)
    if turns_cost([len(m["content"].encode("utf-8")) for m in messages]) <= budget:
        return messages
    messages, dropped = fit_turns(messages, [count(m["content"]) for m in messages], budget)
    if dropped and notes is not None:
        notes.append(f"{dropped} earlier message(s) left out to fit the {context:,}-token context")
    return messages


class ChatModel:
    """One loaded model (GGUF via llama-cpp-python, or HF + peft via transformers) that streams chat replies."""

    _cache: OrderedDict[ModelChoice, "ChatModel"] = OrderedDict()
    _cache_lock = threading.Lock()

    def __init__(self, choice: ModelChoice):
        self.choice = choice
        self.lock = threading.Lock()
        if choice.kind == "gguf":
            self._load_gguf()
        else:
            self._load_hf()

    @classmethod
    def get(cls, choice: ModelChoice) -> "ChatModel":
        """A cached model for `choice`, loading it (and evicting the least recently used) when needed."""
        with cls._cache_lock:
            model = cls._cache.get(choice)
            if model is None:
                model = cls._cache[choice] = cls(choice)
                while len(cls._cache) > MAX_LOADED:
                    cls._cache.popitem(last=False)[1].close()
            cls._cache.move_to_end(choice)
            return model

    @classmethod
    def clear(cls) -> None:
        with cls._cache_lock:
            while cls._cache:
                cls._cache.popitem()[1].close()

    # --- llama-cpp-python
    def _load_gguf(self) -> None:
        from stages import gguf

        self.llm = gguf.load(self.choice.model, self.choice.lora, n_ctx=N_CTX)
        if "tokenizer.chat_template" in self.llm.metadata:
            self.llm.chat_format = "chat_template.default"  # the GGUF's own template, never a guessed one

    def _stream_gguf(self, messages, max_tokens, temperature, stop) -> Iterator[str]:
        chunks = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                 temperature=temperature, stream=True)
        try:
            for chunk in chunks:
                if stop is not None and stop.is_set():
                    break
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        finally:
            getattr(chunks, "close", lambda: None)()  # ends llama.cpp's generation loop now

    # --- transformers + peft (before any GGUF export exists)
    def _load_hf(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok_dir = self.choice.lora if self.choice.lora and (self.choice.lora / "tokenizer_config.json").exists() \
            else self.choice.model
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        model = AutoModelForCausalLM.from_pretrained(str(self.choice.model), dtype=torch.float32)
        if self.choice.lora:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(self.choice.lora))
        self.model = model.eval()

    def _stream_hf(self, messages, max_tokens, temperature, stop) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        halt = threading.Event()  # also set when the caller abandons the stream, so generate() ends

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return halt.is_set() or (stop is not None and stop.is_set())

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        kwargs = dict(**ids, max_new_tokens=max_tokens, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([_Stop()]),
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **sampling)
        errors: list[BaseException] = []

        def generate():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if stop is not None and stop.is_set():
                    break
                if piece:
                    yield piece
        finally:
            halt.set()
            worker.join()
        if errors:
            raise errors[0]

    def context(self) -> int:
        """Tokens the model sees at once: the GGUF context opened, or the HF model's positions."""
        if self.choice.kind == "gguf":
            return N_CTX
        return int(getattr(self.model.config, "max_position_embeddings", 0) or N_CTX)

    def count(self, text: str) -> int:
        if self.choice.kind == "gguf":
            return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def stream(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0,
               stop: threading.Event | None = None, notes: list[str] | None = None) -> Iterator[str]:
        with self.lock:
            messages = fit_context(messages, self.count, self.context(), max_tokens, notes)
            impl = self._stream_gguf if self.choice.kind == "gguf" else self._stream_hf
            yield from impl(messages, max_tokens, temperature, stop)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


def api_base(url: str) -> str:
    """http://host:port[/v1][/] -> http://host:port/v1 (what the OpenAI routes hang under)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def stream_remote(url: str, adapter: str | None, messages: list[dict], max_tokens: int = 256,
                  temperature: float = 0.0, stop: threading.Event | None = None,
                  notes: list[str] | None = None) -> Iterator[str]:
    """Stream the reply of `adapter` (or the base) from a running `medforge serve` at `url` (SSE).

    A conversation longer than the server's context is fitted as a local model's is (`_fit_remote`): a
    server streams no error once it has answered 200, its stream just ends. A stream that ends without
    finishing is a StageError, never a short answer."""
    import httpx

    base = api_base(url)
    key = os.environ.get(API_KEY_ENV)
    model = adapter or BASE_ID
    with httpx.Client(headers={"Authorization": f"Bearer {key}"} if key else {},
                      timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        try:
            messages = _fit_remote(client, base, model, messages, max_tokens, notes)
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                    "stream": True}
            with client.stream("POST", f"{base}/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    raise StageError(f"{base}: HTTP {reply.status_code}: {_error(reply)[:300]}")
                if not (yield from _sse_pieces(reply, stop)) and not (stop is not None and stop.is_set()):
                    raise StageError(f"{base}: the server's answer broke off before its end; its log says why")
        except httpx.HTTPError as exc:
            raise StageError(f"{base}: no answer from the server ({type(exc).__name__}: {exc}); "
                             f"is `medforge serve` running there?") from None


def _fit_remote(client, base: str, model: str, messages: list[dict], max_tokens: int,
                notes: list[str] | None) -> list[dict]:
    """`messages` fitted to the server's context for `model` (`fit_turns`): the context from its /v1/models
    entry (`context_length`, which `medforge serve` gives; a server without it gets the messages as they are, and
    its refusals come from the chat request), each message counted by the server's tokenizer
    (/extras/tokenize/count)."""
    reply = client.get(f"{base}/models")
    listed = reply.json().get("data", []) if reply.status_code == 200 else []
    context = next((m.get("context_length") for m in listed if m.get("id") == model), None)
    if not context:
        return messages

    def count(text: str) -> int:
        reply = client.post(f"{base.removesuffix('/v1')}/extras/tokenize/count", json={"model": model, "input": text})
        if reply.status_code != 200:
            raise StageError(f"{base}: HTTP {reply.status_code} counting the conversation's tokens: "
                             f"{_error(reply)[:200]}")
        return int(reply.json()["count"])

    return fit_context(messages, count, context, max_tokens, notes)


def _error(reply) -> str:
    """An error answer's message on one line: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or its text."""
    reply.read()
    try:
        data = reply.json()
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    message = (error.get("message") if isinstance(error, dict) else None) \
        or (data.get("detail") if isinstance(data, dict) else None) or reply.text
    return " ".join(str(message).split())


def _sse_pieces(reply, stop: threading.Event | None):
    """Yields the text pieces of a chat completion's event stream until [DONE] or `stop` is set; returns whether
    the stream finished ([DONE] came)."""
    import orjson

    for line in reply.iter_lines():
        if stop is not None and stop.is_set():
            return False
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        chunk = orjson.loads(data)
        piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
        if piece:
            yield piece
    return False


def stream_chat(cfg, adapter: str | None, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0,
                stop: threading.Event | None = None, url: str | None = None,
                notes: list[str] | None = None) -> Iterator[str]:
    """Stream the reply of `adapter` (or the base model) to `messages`; see the module docstring."""
    if url:
        yield from stream_remote(url, adapter, messages, max_tokens, temperature, stop, notes)
        return
    choice = choose_model(cfg, adapter, allow_hf=True)
    yield from ChatModel.get(choice).stream(messages, max_tokens=max_tokens, temperature=temperature, stop=stop,
                                            notes=notes)


def chat_command(args) -> int:
    from stages import config

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise StageError("medforge chat: empty prompt; pass it as an argument or on stdin")
    if args.max_tokens < 1:
        raise StageError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    messages = [{"role": "user", "content": prompt.strip()}]
    url = args.url or os.environ.get(URL_ENV)
    if url:
        pieces = stream_remote(url, args.adapter, messages, max_tokens=args.max_tokens, temperature=args.temperature)
    else:
        choice = choose_model(config.load(), args.adapter, allow_hf=False)
        pieces = ChatModel.get(choice).stream(messages, max_tokens=args.max_tokens, temperature=args.temperature)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
