"""Chat examples -> token ids and loss labels, using the tokenizer's own chat template.

Only what the assistant says is trained: its content and the end-of-turn marker that
follows it (so the model learns to stop), never the prompt, the role headers or the
whitespace the template puts between turns. Masked positions carry IGNORE in `labels`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]      # == input_ids where trained, IGNORE elsewhere
    task: str = ""

    @property
    def n_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


class TemplateError(ValueError):
    """The chat template cannot be used to locate assistant turns."""


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn.

    A span runs from after the assistant header (what add_generation_prompt renders) to
    the turn's last non-space character, which is the template's end-of-turn marker.
    """
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise TemplateError("the chat template does not render conversations as prefixes of each other; "
                                "use a base model whose template does (e.g. ChatML)")
        end = len(upto.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    return text, spans


def encode(tokenizer, messages: list[dict[str, str]], max_length: int, task: str = "") -> Encoded:
    """Token ids and labels of one conversation, truncated to `max_length` tokens.

    The reference for `encode_batch`, which gives the same result for many conversations at once.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
    labels = []
    for token, (start, end) in zip(ids, offsets):
        # a token is trained when it starts inside an assistant span
        trained = any(s <= start < e for s, e in spans) and end > start
        labels.append(token if trained else IGNORE)
    return Encoded(list(ids), labels, task)


BATCH = 2048  # conversations rendered and tokenized per call: one call costs far less than as many single ones


def batch_spans(tokenizer, conversations: list[list[dict[str, str]]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """`assistant_spans` of each conversation, rendering them all in a few batched template calls.

    The rendering of a conversation up to its last message is the rendering of the whole
    conversation, so a user/assistant pair costs two renders instead of three.
    """
    if not all(conversations):
        _render(tokenizer, [])  # raises as `assistant_spans` does (a batch would render an empty one as "")
    texts = _render(tokenizer, conversations)
    turns = [[i for i, m in enumerate(messages) if m["role"] == "assistant"] for messages in conversations]
    cut = [(n, i) for n, idx in enumerate(turns) for i in idx]
    if any(i == 0 for _, i in cut):
        _render(tokenizer, [], add_generation_prompt=True)  # raises as `assistant_spans` does (empty prompt)
    prompts = _render(tokenizer, [conversations[n][:i] for n, i in cut], add_generation_prompt=True) if cut else []
    inner = [(n, i) for n, i in cut if i + 1 < len(conversations[n])]
    uptos = dict(zip(inner, _render(tokenizer, [conversations[n][:i + 1] for n, i in inner]) if inner else []))
    out = [(text, []) for text in texts]
    for (n, i), prompt in zip(cut, prompts):
        text = texts[n]
        upto = uptos.get((n, i), text)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise TemplateError("the chat template does not render conversations as prefixes of each other; "
                                "use a base model whose template does (e.g. ChatML)")
        end = len(upto.rstrip())
        if end > len(prompt):
            out[n][1].append((len(prompt), end))
    return out


def _labels(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """`encode`'s rule, written for speed: trained when a token starts inside a span and is not empty."""
    if len(spans) == 1:
        s, e = spans[0]
        return [t if s <= a < e and b > a else IGNORE for t, (a, b) in zip(ids, offsets)]
    return [t if b > a and any(s <= a < e for s, e in spans) else IGNORE for t, (a, b) in zip(ids, offsets)]


def encode_batch(tokenizer, conversations: list[list[dict[str, str]]], max_length: int,
                 tasks: list[str] | None = None) -> list[tuple[Encoded, int]]:
    """`encode` of each conversation, each with its length in tokens before truncation.

    Renders with batched template calls and tokenizes every text in one (Rust, multi-threaded)
    tokenizer call; the ids and labels equal `encode`'s.
    """
    if not conversations:
        return []
    rendered = batch_spans(tokenizer, conversations)
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False)
    tasks = tasks or [""] * len(conversations)
    out = []
    for ids, offsets, (_, spans), task in zip(enc["input_ids"], enc["offset_mapping"], rendered, tasks):
        full = len(ids)
        if full > max_length:
            ids, offsets = ids[:max_length], offsets[:max_length]
        out.append((Encoded(ids, _labels(ids, offsets, spans), task), full))
    return out


def encode_stream(tokenizer, rows: Iterable[dict[str, Any]], max_length: int,
                  batch: int = BATCH) -> Iterator[tuple[Encoded, int]]:
    """`encode_batch` of dataset rows, `batch` at a time, in order: rows are read only as they are needed."""
    it = iter(rows)
    while chunk := list(itertools.islice(it, batch)):
        yield from encode_batch(tokenizer, [row["messages"] for row in chunk], max_length,
                                [row.get("task", "") for row in chunk])


def encode_rows(tokenizer, rows: Iterable[dict[str, Any]], max_length: int,
                limit: int | None = None) -> tuple[list[Encoded], int]:
    """Encode dataset rows; rows left with nothing to train (e.g. truncated away) are dropped and counted.

    With `limit`, stop once that many examples are kept: the later rows are neither read nor encoded.
    """
    out, dropped = [], 0
    if limit == 0:
        return out, dropped
    for example, _ in encode_stream(tokenizer, rows, max_length, min(BATCH, limit) if limit else BATCH):
        if example.n_trained:
            out.append(example)
            if len(out) == limit:
                break
        else:
            dropped += 1
    return out, dropped


def describe(tokenizer, example: Encoded) -> str:
    """The example with trained text in [[...]], to eyeball the mask in the log."""
    parts, current, run = [], None, []
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE
        if trained != current and run:
            chunk = tokenizer.decode(run)
            parts.append(f"[[{chunk}]]" if current else chunk)
            run = []
        current = trained
        run.append(token)
    if run:
        chunk = tokenizer.decode(run)
        parts.append(f"[[{chunk}]]" if current else chunk)
    return "".join(parts)
