"""eval: answer-token perplexity of base vs base + adapter, written to eval.json."""
from __future__ import annotations

import math

import pytest

from stages import io, layout
from stages.errors import StageError
from tests.models import adapter_config, make_tiny_model
from tests.test_train import TOML, write_splits


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-eval") / "base")


def test_eval_reports_base_and_adapter_perplexity(tmp_path, monkeypatch, tiny_base):
    from stages import evaluate, train

    monkeypatch.chdir(tmp_path)
    write_splits("coding", n_test=10)
    cfg = adapter_config(tmp_path, "coding", TOML.format(base=tiny_base, steps=25, lr=1e-2, extra=""))
    train.run(cfg, "coding")
    evaluate.run(cfg, "coding")

    report = io.read_json(layout.eval_file("coding"))
    assert report["adapter"] == "coding" and report["n_examples"] == 6  # eval.max_examples caps the 10
    assert report["n_tokens"] > report["n_examples"]  # every answer has its tokens plus <|im_end|>
    # a random base is near-uniform over the vocabulary; the adapter learned these answers
    assert report["base_ppl"] > 1000
    assert report["adapter_ppl"] < report["base_ppl"] / 10
    assert report["adapter_loss"] == pytest.approx(math.log(report["adapter_ppl"]))
    tasks = report["tasks"]
    assert set(tasks) == {"code_lookup", "describe"}
    assert sum(t["n_examples"] for t in tasks.values()) == 6
    assert sum(t["n_tokens"] for t in tasks.values()) == report["n_tokens"]
    for t in tasks.values():
        assert t["adapter_ppl"] < t["base_ppl"]


def test_eval_without_a_trained_adapter_says_what_to_run(tmp_path, monkeypatch, tiny_base):
    from stages import evaluate

    monkeypatch.chdir(tmp_path)
    write_splits("coding")
    cfg = adapter_config(tmp_path, "coding", TOML.format(base=tiny_base, steps=1, lr=1e-3, extra=""))
    with pytest.raises(StageError, match=r"doit train:coding"):
        evaluate.run(cfg, "coding")


def test_perplexity_report_is_token_weighted():
    from stages.evaluate import perplexity_report
    from stages.train.format import Encoded

    examples = [Encoded([1], [1], "a"), Encoded([1], [1], "b")]
    report = perplexity_report(examples, [(2.0, 1), (6.0, 3)], [(1.0, 1), (3.0, 3)])
    assert report["base_ppl"] == pytest.approx(math.exp(8 / 4))
    assert report["adapter_ppl"] == pytest.approx(math.exp(1.0))
    assert report["tasks"]["a"]["base_ppl"] == pytest.approx(math.exp(2.0))
    assert report["n_tokens"] == 4
