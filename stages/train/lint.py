"""lint:<adapter> — check the loss mask and the chat template before (and after) training.

Renders the first `train.lint_examples` training examples with trained text in [[ ]] into
adapters/<adapter>/out/lint.txt, and fails the build when:
  - an example has no trained token (truncation ate its answer, or the template hides it),
  - an assistant turn's end-of-turn token is not trained (the model would never learn to stop),
  - more than `train.max_truncated` of the examples are cut at `train.max_length`,
  - the chat template training uses differs from the one the export will embed (the tokenizer
    saved beside the trained adapter, which export.py ships).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import io, layout
from stages.errors import StageError
from stages.train.format import IGNORE, Encoded


@dataclass
class Checked:
    example: Encoded
    row_id: str
    full_length: int     # tokens before truncation
    turns: int           # assistant turns with content


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids the template closes an assistant turn with (e.g. <|im_end|>)."""
    from stages.train.format import assistant_spans

    text, spans = assistant_spans(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    start, end = spans[0]
    marker = text[start:end]
    marker = marker[marker.index("a") + 1:].strip()
    return tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []


def trained_count(example: Encoded, token: int) -> int:
    """How many times `token` is trained in `example` (list.index finds its few positions at C speed)."""
    ids, labels, n, i = example.input_ids, example.labels, 0, -1
    while True:
        try:
            i = ids.index(token, i + 1)
        except ValueError:
            return n
        n += labels[i] != IGNORE


def problems(checked: list[Checked], eot: list[int], max_length: int, max_truncated: float) -> list[str]:
    """What is wrong with these encoded examples, one line each (empty when fine)."""
    out = []
    if not eot:
        out.append("the chat template closes assistant turns with no end-of-turn token; the model cannot learn "
                   "to stop (use a base model with a chat template such as ChatML)")
    empty = [c.row_id for c in checked if c.example.n_trained == 0]
    if empty:
        out.append(f"{len(empty)} example(s) have no trained token (first: {empty[0]}); raise 'train.max_length' "
                   f"or shorten the prompts")
    if eot:
        untrained = []
        for c in checked:
            if c.full_length > max_length:
                continue  # a truncated answer has lost its end anyway (counted below)
            if trained_count(c.example, eot[-1]) < c.turns:
                untrained.append(c.row_id)
        if untrained:
            out.append(f"{len(untrained)} example(s) leave the end-of-turn token untrained (first: {untrained[0]}); "
                       "the mask must include it (stages/train/format.py)")
    truncated = sum(1 for c in checked if c.full_length > max_length)
    if checked and truncated / len(checked) > max_truncated:
        out.append(f"{truncated}/{len(checked)} examples ({truncated / len(checked):.1%}) are longer than "
                   f"'train.max_length' = {max_length}, over 'train.max_truncated' = {max_truncated:.0%}; "
                   "raise max_length or the allowed share")
    return out


def template_problem(base_dir: Path, adapter_name: str) -> str | None:
    """The training template (the base tokenizer's) against the one the export will embed."""
    from transformers import AutoTokenizer

    from stages.export import _tokenizer_source

    source = _tokenizer_source(adapter_name, base_dir)
    if source == base_dir:
        return None  # not trained yet: training saves the tokenizer it used, which export then embeds
    trained = AutoTokenizer.from_pretrained(str(base_dir)).chat_template
    exported = AutoTokenizer.from_pretrained(str(source)).chat_template
    if trained != exported:
        return (f"the chat template in {source} (what the export embeds) differs from the one training used "
                f"({base_dir}); retrain (`doit train:{adapter_name}`) or restore that tokenizer")
    return None


def run(cfg, adapter_name: str) -> dict[str, Any]:
    from stages.train import base_folder, read_split
    from stages.train import format as fmt
    from stages.train.encoded import encode_split
    from stages.train import load_tokenizer

    a = cfg.adapters[adapter_name]
    where = str(layout.adapter_toml(adapter_name))
    base_dir = base_folder(a.base_model, where)
    tokenizer = load_tokenizer(base_dir)
    max_length, max_truncated = a.train["max_length"], a.train["max_truncated"]
    # every row: one without trained tokens fails the build (the encoding is cached for train:<adapter>)
    rows = read_split(adapter_name, "train")
    encoded = encode_split(tokenizer, base_dir, adapter_name, "train", max_length, rows)
    checked = []
    for i, (row, (example, full_length)) in enumerate(zip(rows, encoded)):
        turns = sum(1 for m in row["messages"] if m["role"] == "assistant" and m["content"].strip())
        checked.append(Checked(example, str(row.get("id", f"line {i + 1}")), full_length, turns))
    found = problems(checked, end_of_turn_ids(tokenizer), max_length, max_truncated)
    template = template_problem(base_dir, adapter_name)
    if template:
        found.append(template)

    truncated = sum(1 for c in checked if c.full_length > max_length)
    lines = [f"lint:{adapter_name}: {len(checked)} training examples, {truncated} truncated at {max_length} tokens, "
             f"{sum(c.example.n_trained for c in checked)} trained tokens; template from {base_dir}",
             *(f"PROBLEM: {p}" for p in found)]
    for c in checked[:a.train["lint_examples"]]:
        lines += ["", f"--- {c.row_id} ({c.example.n_trained}/{len(c.example.input_ids)} tokens trained, "
                      "trained text in [[ ]])", fmt.describe(tokenizer, c.example)]
    report = "\n".join(lines) + "\n"
    io.write_text(layout.lint_report(adapter_name), report)
    print(report)
    if found:
        raise StageError(f"{where}: lint found {len(found)} problem(s): {found[0]} (all in {layout.lint_report(adapter_name)})")
    return {"examples": len(checked), "truncated": truncated, "problems": found}
