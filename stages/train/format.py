"""Chat examples -> token ids and loss labels, using the tokenizer's own chat template.

Only what the assistant says is trained: its content and the end-of-turn marker that
follows it (so the model learns to stop), never the prompt, the role headers or the
whitespace the template puts between turns. Masked positions carry IGNORE in `labels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]      # == input_ids where trained, IGNORE elsewhere
    task: str = ""

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


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
    """Token ids and labels of one conversation, truncated to `max_length` tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
    labels = []
    for token, (start, end) in zip(ids, offsets):
        # a token is trained when it starts inside an assistant span
        trained = any(s <= start < e for s, e in spans) and end > start
        labels.append(token if trained else IGNORE)
    return Encoded(list(ids), labels, task)


def encode_rows(tokenizer, rows: Iterable[dict[str, Any]], max_length: int) -> tuple[list[Encoded], int]:
    """Encode dataset rows; rows left with nothing to train (e.g. truncated away) are dropped and counted."""
    out, dropped = [], 0
    for row in rows:
        example = encode(tokenizer, row["messages"], max_length, row.get("task", ""))
        if example.n_trained:
            out.append(example)
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
