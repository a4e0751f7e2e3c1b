"""Batched encoding (`encode_rows`, `encode_batch`) gives exactly what the per-row `encode` gives."""
from __future__ import annotations

import pytest

from stages.sources import make
from tests.models import smollm2_tokenizer
from tests.test_train import rows as fact_rows


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def real_rows():
    """Rows of both default adapters' kinds, as their sources write them (ICD-10-CM codes, NEWS2 patients)."""
    from stages.sources.icd10cm import build_records, database_path, load_codes
    from stages.sources.news2 import generate_patient

    icd10, news2 = make("icd10cm", "icd10cm", {}), make("news2", "news2", {})
    out = [e for r in build_records(load_codes(database_path()), 60, 13, "x") for e in icd10.examples(r)]
    out += [e for i in range(40) for e in news2.examples(generate_patient(7, i))]
    return out


def conversations():
    """Multi-turn, system-prompted, empty-answer and long conversations."""
    return [
        {"task": "multi", "messages": [
            {"role": "system", "content": "You code diagnoses."},
            {"role": "user", "content": "Code for essential hypertension?"},
            {"role": "assistant", "content": "I10"},
            {"role": "user", "content": "And asthma?"},
            {"role": "assistant", "content": "J45.909 (asthma, unspecified)"}]},
        {"task": "three", "messages": [
            {"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c?"}, {"role": "assistant", "content": "  "},
            {"role": "user", "content": "e?"}, {"role": "assistant", "content": "f\n\n"}]},
        {"messages": [{"role": "user", "content": "Trailing user turn"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "no answer to this one"}]},
        {"messages": [{"role": "user", "content": "List codes."}, {"role": "assistant", "content": "A00 " * 200}]},
        {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "cut away"}]},
    ]


def per_row(tok, rows, max_length):
    """The old encode_rows: one `encode` per row."""
    from stages.train.format import encode

    kept, dropped = [], 0
    for row in rows:
        example = encode(tok, row["messages"], max_length, row.get("task", ""))
        if example.n_trained:
            kept.append(example)
        else:
            dropped += 1
    return kept, dropped


@pytest.mark.parametrize("max_length", [512, 256, 64, 24, 8])
def test_batched_encoding_equals_per_row_on_real_rows(tok, real_rows, monkeypatch, max_length):
    from stages.train import format as fmt

    rows = real_rows + conversations() + fact_rows(20)
    expected = per_row(tok, rows, max_length)
    assert fmt.encode_rows(tok, rows, max_length) == expected
    monkeypatch.setattr(fmt, "BATCH", 7)  # rows split over many batches, some of them partly dropped
    assert fmt.encode_rows(tok, iter(rows), max_length) == expected
    if max_length == 64:
        assert 0 < expected[1] < len(rows) and any(len(e.input_ids) == 64 for e in expected[0])


def test_encode_batch_reports_full_length_and_truncates_like_encode(tok, real_rows):
    from stages.train.format import encode, encode_batch

    rows = real_rows[:50] + conversations()
    encoded = encode_batch(tok, [r["messages"] for r in rows], 48, [r.get("task", "") for r in rows])
    for row, (example, full_length) in zip(rows, encoded):
        full = encode(tok, row["messages"], 10 ** 9, row.get("task", ""))
        assert full_length == len(full.input_ids)
        assert example == encode(tok, row["messages"], 48, row.get("task", ""))
    assert encode_batch(tok, [], 48) == []


def test_multi_turn_spans_match_and_other_templates_too(tok):
    from stages.train.format import assistant_spans, batch_spans, encode_rows

    convs = [c["messages"] for c in conversations()]
    assert batch_spans(tok, convs) == [assistant_spans(tok, m) for m in convs]
    assert len(batch_spans(tok, convs[:1])[0][1]) == 2
    # a template without a default system prompt, closing turns with </s>
    tok = smollm2_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    assert batch_spans(tok, convs) == [assistant_spans(tok, m) for m in convs]
    rows = conversations()
    assert encode_rows(tok, rows, 40) == per_row(tok, rows, 40)


def test_template_problems_raise_as_per_row(tok):
    from stages.train.format import TemplateError, encode, encode_rows

    tok = smollm2_tokenizer()
    # the generation prompt is not a prefix of the rendered answer
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(TemplateError):
        encode(tok, row["messages"], 64)
    with pytest.raises(TemplateError):
        encode_rows(tok, [row], 64)
    for bad in ([], [{"role": "assistant", "content": "a"}]):  # nothing to render / an empty prompt
        with pytest.raises(ValueError, match="empty conversation"):
            encode(smollm2_tokenizer(), bad, 64)
        with pytest.raises(ValueError, match="empty conversation"):
            encode_rows(smollm2_tokenizer(), [row, {"messages": bad}], 64)


def test_limit_stops_after_that_many_kept_examples(tok, real_rows, monkeypatch):
    from stages.train import format as fmt

    rows = [{"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "x"}]}] * 3
    rows += real_rows
    for limit, batch in ((10, 2048), (10, 4), (100, 3), (len(rows), 7)):
        kept, dropped = [], 0
        for row in rows:  # the per-row reference, stopping at `limit` kept
            if len(kept) == limit:
                break
            example = fmt.encode(tok, row["messages"], 64, row.get("task", ""))
            if example.n_trained:
                kept.append(example)
            else:
                dropped += 1
        monkeypatch.setattr(fmt, "BATCH", batch)
        consumed = []
        lazy = (consumed.append(r) or r for r in rows)
        assert fmt.encode_rows(tok, lazy, 64, limit=limit) == (kept, dropped)
        assert dropped >= 3
        if limit < 100:
            assert len(consumed) < len(rows)  # later rows are not read


def test_train_encodes_only_the_val_rows_it_uses(tmp_path, monkeypatch):
    import contextlib

    from stages import io, layout, train
    from stages.train import format as fmt
    from stages.train.torch_backend import VAL_MAX_EXAMPLES

    monkeypatch.chdir(tmp_path)
    io.write_jsonl(layout.split_file("coding", "val"), fact_rows(VAL_MAX_EXAMPLES + 700))
    seen = []
    real = fmt.encode_batch
    monkeypatch.setattr(fmt, "encode_batch", lambda tok, convs, *a: seen.append(len(convs)) or real(tok, convs, *a))
    with contextlib.closing(train.iter_split("coding", "val")) as rows:
        val, _ = fmt.encode_rows(smollm2_tokenizer(), rows, 128, limit=VAL_MAX_EXAMPLES)
    assert len(val) == VAL_MAX_EXAMPLES and sum(seen) == VAL_MAX_EXAMPLES
