"""lint:<adapter>: marked examples, and failures on empty masks, untrained end-of-turn, truncation, template drift."""
from __future__ import annotations

import pytest

from stages import io, layout
from stages.errors import StageError
from tests.models import adapter_config, make_tiny_model, smollm2_tokenizer
from tests.test_train import TOML, write_splits


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def project(tmp_path, monkeypatch, base, extra="", max_length=128):
    monkeypatch.chdir(tmp_path)
    write_splits("coding")
    text = TOML.format(base=base, steps=2, lr=1e-2, extra=extra).replace("max_length = 128", f"max_length = {max_length}")
    return adapter_config(tmp_path, "coding", text)


def test_clean_data_passes_and_renders_trained_tokens(tmp_path, monkeypatch, tiny_base, capsys):
    from stages import progress
    from stages.train import lint

    cfg = project(tmp_path, monkeypatch, tiny_base)
    monkeypatch.setattr(progress, "_tracker", progress.Tracker("lint:coding", log_every=0))
    result = lint.run(cfg, "coding")
    out = capsys.readouterr().out  # encoding the split says how far it got (about a minute for ICD-10-CM's)
    assert "lint:coding: train split, encoding: 0/32 examples" in out
    assert "lint:coding: train split, encoding: 31/32 examples" in out
    assert io.read_json(layout.progress_file("lint:coding"))["done"] == 32
    assert result["problems"] == [] and result["examples"] == 32
    report = layout.lint_report("coding").read_text()
    assert report.count("--- r") == 3  # train.lint_examples
    assert "<|im_start|>assistant\n[[" in report and "<|im_end|>]]" in report


def test_truncation_over_the_allowed_share_fails(tmp_path, monkeypatch, tiny_base):
    from stages.train import lint

    cfg = project(tmp_path, monkeypatch, tiny_base, extra="max_truncated = 0.1", max_length=53)
    with pytest.raises(StageError, match=r"adapter\.toml: lint found 1 problem.*'train\.max_truncated'") as err:
        lint.run(cfg, "coding")
    assert "\n" not in str(err.value)
    assert "PROBLEM:" in layout.lint_report("coding").read_text()


def test_an_example_without_trained_tokens_fails(tmp_path, monkeypatch, tiny_base):
    from stages.train import lint

    cfg = project(tmp_path, monkeypatch, tiny_base, extra="max_truncated = 1.0")
    rows = list(io.read_jsonl(layout.split_file("coding", "train")))
    rows[3]["messages"][0]["content"] = "word " * 200  # the prompt alone fills max_length
    io.write_jsonl(layout.split_file("coding", "train"), rows)
    with pytest.raises(StageError, match=r"1 example\(s\) have no trained token \(first: r3\)"):
        lint.run(cfg, "coding")


def test_an_untrained_end_of_turn_token_is_caught():
    from stages.train.format import IGNORE, Encoded, encode
    from stages.train.lint import Checked, end_of_turn_ids, problems

    tok = smollm2_tokenizer()
    eot = end_of_turn_ids(tok)
    assert tok.convert_ids_to_tokens(eot) == ["<|im_end|>"]
    e = encode(tok, [{"role": "user", "content": "Code for asthma?"}, {"role": "assistant", "content": "J45.909"}], 128)
    assert problems([Checked(e, "ok", len(e.input_ids), 1)], eot, 128, 0.0) == []
    masked = Encoded(e.input_ids, [IGNORE if t == eot[0] else label for t, label in zip(e.input_ids, e.labels)])
    found = problems([Checked(masked, "bad", len(e.input_ids), 1)], eot, 128, 0.0)
    assert len(found) == 1 and "end-of-turn token untrained (first: bad)" in found[0]


def test_a_changed_template_beside_the_adapter_fails(tmp_path, monkeypatch, tiny_base):
    from stages import train
    from stages.train import lint

    cfg = project(tmp_path, monkeypatch, tiny_base)
    train.run(cfg, "coding")
    assert lint.run(cfg, "coding")["problems"] == []  # the trained adapter carries the training template
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(layout.lora_dir("coding")))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(str(layout.lora_dir("coding")))
    with pytest.raises(StageError, match=r"chat template in .*lora.* differs from the one training used"):
        lint.run(cfg, "coding")


def test_trained_count_counts_trained_positions_of_a_token():
    from stages.train.format import IGNORE, Encoded
    from stages.train.lint import trained_count

    ids = [5, 9, 5, 5, 7, 5]
    for labels in ([5, 9, 5, 5, 7, 5], [IGNORE, 9, 5, IGNORE, 7, 5], [IGNORE] * 6,
                   [IGNORE, IGNORE, IGNORE, 5, 7, IGNORE]):
        expected = sum(1 for t, label in zip(ids, labels) if label != IGNORE and t == 5)  # the rule it replaces
        assert trained_count(Encoded(ids, labels), 5) == expected
    assert trained_count(Encoded(ids, ids), 8) == 0 and trained_count(Encoded([], []), 5) == 0
