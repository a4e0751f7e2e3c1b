"""The shared split encoding: lint encodes, train reuses it; anything it depends on re-encodes it."""
from __future__ import annotations

import pytest

from stages import io, layout
from stages.train import encoded, format as fmt
from tests.models import smollm2_tokenizer, smollm2_tokenizer_dir
from tests.test_train import write_splits


@pytest.fixture()
def split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_splits("coding")
    return layout.split_file("coding", "train")


def reference(tok, max_length):
    rows = list(io.read_jsonl(layout.split_file("coding", "train")))
    return fmt.encode_batch(tok, [r["messages"] for r in rows], max_length, [r.get("task", "") for r in rows])


def count_encodes(monkeypatch) -> list[int]:
    calls = []
    real = fmt.encode_batch

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "encode_batch", counting)
    return calls


def test_a_second_call_reads_the_cache_and_equals_a_fresh_encoding(split, monkeypatch):
    tok, base = smollm2_tokenizer(), smollm2_tokenizer_dir()
    calls = count_encodes(monkeypatch)
    first = encoded.encode_split(tok, base, "coding", "train", 40)
    assert calls and layout.encoded_cache("coding", "train").exists()
    calls.clear()
    second = encoded.encode_split(tok, base, "coding", "train", 40)
    assert calls == []  # served from data/cache/encoded/
    expected = reference(tok, 40)
    assert first == second == expected
    assert any(full > 40 for _, full in second)  # truncated lengths survive the round trip
    assert {e.task for e, _ in second} == {e.task for e, _ in expected} and len({e.task for e, _ in second}) > 1


@pytest.mark.parametrize("change", ["split", "max_length", "tokenizer", "corrupt"])
def test_what_the_encoding_depends_on_re_encodes_it(split, monkeypatch, tmp_path, change):
    import shutil

    tok = smollm2_tokenizer()
    base = tmp_path / "tok"
    shutil.copytree(smollm2_tokenizer_dir(), base)
    encoded.encode_split(tok, base, "coding", "train", 64)
    max_length = 64
    if change == "split":
        rows = list(io.read_jsonl(split))
        rows[0]["messages"][-1]["content"] = "a different answer"
        io.write_jsonl(split, rows)
    elif change == "max_length":
        max_length = 32
    elif change == "tokenizer":
        config = base / "tokenizer_config.json"
        config.write_text(config.read_text().replace("{", '{"model_max_length_note": 1, ', 1))
    else:
        layout.encoded_cache("coding", "train").write_bytes(b"not an npz")
    calls = count_encodes(monkeypatch)
    got = encoded.encode_split(tok, base, "coding", "train", max_length)
    assert calls, f"a changed {change} must re-encode"
    assert got == reference(tok, max_length)


def test_lint_then_train_encode_the_split_once(tmp_path, monkeypatch):
    from stages import train
    from stages.train import lint
    from tests.models import make_tiny_model
    from tests.test_train_lint import project

    base = make_tiny_model(tmp_path / "base")
    cfg = project(tmp_path, monkeypatch, base)
    calls = count_encodes(monkeypatch)
    lint.run(cfg, "coding")
    assert sum(calls) == 32  # every training row (write_splits: 32 train, 8 val)
    train.run(cfg, "coding")
    assert sum(calls) == 32 + 8  # train encoded only the validation rows
