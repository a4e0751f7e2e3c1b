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


MATRIX_TOML = """
base_model = "{base}"
[lora]
r = 4
alpha = 8
[train]
max_length = 384
[eval]
max_examples = 40
max_generate = 2
"""


def wards_and_coding(root, base):
    """Two adapters with random LoRAs on `base` (eval needs no training): "coding" with plain test rows,
    "wards" with NEWS2 and ICD-10 rows that every kind of task metric scores."""
    from stages import config
    from tests.gguf_project import make_lora
    from tests.test_evaluate_metrics import icd10_rows, news2_rows

    write_splits("coding")
    io.write_jsonl(layout.split_file("wards", "test"), news2_rows(2) + icd10_rows())
    problems: list[str] = []
    adapters = {}
    for seed, name in enumerate(("coding", "wards"), 1):
        path = layout.adapter_toml(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(MATRIX_TOML.format(base=base))
        adapters[name] = config.load_adapter(root, path, problems)
        make_lora(base, layout.lora_dir(name), seed=seed)
    assert not problems
    return config.Config(root=root, sources={}, adapters=adapters, dedup={})


def test_the_base_is_scored_once_for_every_adapter_and_again_for_another_base(tmp_path, monkeypatch, tiny_base):
    """The second adapter's eval reads the base figures the first computed (same base, same items), and gets
    exactly the numbers it would compute; a base with other weights is scored afresh."""
    import dataclasses
    import shutil

    from stages import evaluate

    monkeypatch.chdir(tmp_path)
    cfg = wards_and_coding(tmp_path, tiny_base)
    wards = evaluate.run(cfg, "wards")
    cached = sorted(layout.eval_base_cache("x").parent.glob("*.json"))
    assert cached
    coding = evaluate.run(cfg, "coding")
    new = set(layout.eval_base_cache("x").parent.glob("*.json")) - set(cached)
    assert len(new) == 1  # only the first sample, the adapter's own test prompt: every other figure was read back
    assert io.read_json(new.pop()).startswith(coding["samples"][0]["base"][:20])
    for split in ("wards", "coding"):
        a, b = wards["matrix"][split], coding["matrix"][split]
        assert (a["base_ppl"], a["n_tokens"]) == (b["base_ppl"], b["n_tokens"])
        shared = set(a["metrics"]) & set(b["metrics"])  # generated: own split only
        assert {k: a["metrics"][k]["base"] for k in shared} == {k: b["metrics"][k]["base"] for k in shared}
    kinds = {k: m["kind"] for k, m in wards["matrix"]["wards"]["metrics"].items()}
    assert {k: m["kind"] for k, m in coding["matrix"]["wards"]["metrics"].items()} == {
        k: kind for k, kind in kinds.items() if kind != "generated"} and "generated" in kinds.values()
    assert wards["safety"]["base"] == coding["safety"]["base"]
    shutil.rmtree(layout.eval_base_cache("x").parent)
    fresh = evaluate.run(cfg, "coding")  # computed again: the same figures
    assert fresh["matrix"]["wards"]["base_ppl"] == coding["matrix"]["wards"]["base_ppl"]
    assert fresh["matrix"]["wards"]["metrics"] == coding["matrix"]["wards"]["metrics"]

    # another adapter's split is a sample of the rows that adapter's own eval scores: its base figures are read
    # back row by row, and an eval computes the base only for the rows no eval has scored yet
    from stages.train import torch_backend

    shutil.rmtree(layout.eval_base_cache("x").parent)
    monkeypatch.setattr(evaluate, "CROSS_EXAMPLES", 3)
    scored = []
    real = torch_backend.nll_by_example
    monkeypatch.setattr(torch_backend, "nll_by_example", lambda model, examples, *a, **k: (
        scored.append(len(examples)), real(model, examples, *a, **k))[1])
    evaluate.run(cfg, "wards")
    n = {split: cell["n_examples"] for split, cell in coding["matrix"].items()}
    assert scored == [n["wards"]] * 2 + [3, 3]  # own split: base and adapter; 3 of coding's: base and adapter
    scored.clear()
    subset = evaluate.run(cfg, "coding")
    rows = list(io.read_jsonl(layout.split_file("coding", "test")))
    seen = {io.dumps(r["messages"]) for r in evaluate.spread_sample(rows, 3)}
    unseen = [r for r in rows if io.dumps(r["messages"]) not in seen]
    assert 0 < len(unseen) < n["coding"] - 2
    assert scored == [len(unseen), n["coding"], 3]  # rows wards' eval scored (or their copies): read back; wards': all
    assert subset["matrix"]["coding"]["base_ppl"] == coding["matrix"]["coding"]["base_ppl"]

    other = make_tiny_model(tmp_path / "other-base", seed=5)  # other weights, same shape: its own figures
    cfg.adapters["coding"] = dataclasses.replace(cfg.adapters["coding"], base_model=str(other))
    again = evaluate.run(cfg, "coding")
    assert again["matrix"]["coding"]["base_ppl"] != coding["matrix"]["coding"]["base_ppl"]
    assert len(list(layout.eval_base_cache("x").parent.glob("*.json"))) >= len(cached)


def test_eval_says_how_far_each_part_has_got(tmp_path, monkeypatch, tiny_base, capsys):
    """Eval runs for minutes: its log names each part as it starts with how much it holds (base and adapter, or the
    adapter alone where the base's figures are read back), and each part's count ends where it said it would."""
    from stages import evaluate, progress, safety

    monkeypatch.chdir(tmp_path)
    cfg = wards_and_coding(tmp_path, tiny_base)
    parts: dict[tuple[str, str], list[tuple[int, int]]] = {}

    class Recorder(progress.Tracker):
        def write(self, now):
            super().write(now)
            parts.setdefault((self.scope, self.what), []).append((self.done, self.total))

    for name in ("wards", "coding"):
        monkeypatch.setattr(progress, "_tracker", Recorder(f"eval:{name}", write_every=0))
        report = evaluate.run(cfg, name)
        progress.stop()
        assert not layout.progress_file(f"eval:{name}").exists()
        lines = capsys.readouterr().out.splitlines()
        n = {split: cell["n_examples"] for split, cell in report["matrix"].items()}
        sides = 2 if name == "wards" else 1  # the second adapter's eval reads the base's figures back
        for split in ("wards", "coding"):
            assert f"eval:{name}: {split} split, perplexity: 0/{sides * n[split]} rows" in lines, lines
        assert any(line.startswith(f"eval:{name}: wards split, choice: 0/") for line in lines)
        generating = [line for line in lines if line.startswith(f"eval:{name}: wards split, generating ")]
        assert bool(generating) == (name == "wards")  # generated answers: own split only, one part per task
        assert len({line.split(":")[2] for line in generating}) == len(generating) >= 2 * (name == "wards"), generating
        # the safety suite and the samples in one batch; the second eval asks the base only its own test prompt
        asked = len(safety.CASES) + len(evaluate.SAMPLE_PROMPTS) + 1
        assert f"eval:{name}: safety suite and samples, generating: 0/{asked + (asked if sides == 2 else 1)} " \
            "answers" in lines, lines
        for (scope, what), seen in parts.items():  # every part counted to its total, never past it
            assert seen[-1][0] == seen[-1][1] and all(done <= total for done, total in seen), (scope, what, seen)
        parts.clear()


def test_eval_matrix_task_metrics_safety_samples_and_reports(tmp_path, monkeypatch, tiny_base):
    """Every adapter's test split, task metrics on real NEWS2/ICD-10 rows, safety and samples; then the reports."""
    from stages import evaluate, report, safety
    from tests.test_evaluate_metrics import icd10_rows, news2_rows

    monkeypatch.chdir(tmp_path)
    cfg = wards_and_coding(tmp_path, tiny_base)

    out = evaluate.run(cfg, "wards")
    assert out == io.read_json(layout.eval_file("wards"))
    assert list(out["matrix"]) == ["wards", "coding"]  # own split first, then every other adapter's
    own = out["matrix"]["wards"]
    assert out["base_ppl"] == own["base_ppl"] and out["n_examples"] == own["n_examples"] == 4 + len(icd10_rows())
    metrics = own["metrics"]
    assert {"news2_score", "news2_response", "icd10_code", "icd10_billable", "icd10_describe",
            "icd10_code_generated", "icd10_parent"} <= set(metrics)
    assert metrics["icd10_code"]["kind"] == "choice" and metrics["icd10_code"]["n"] == 5
    assert metrics["news2_score"]["kind"] == "generated" and metrics["news2_score"]["n"] == 2
    # teacher-forced spans of every row, with intervals and verdicts
    assert metrics["news2_score_cloze"]["kind"] == "cloze" and metrics["news2_score_cloze"]["n"] == 2
    assert set(metrics["news2_score_cloze"]["stats"]) == {"cloze_points", "cloze_aggregate", "cloze_band"}
    assert set(metrics["icd10_parent_cloze"]["adapter"]) == {"cloze_parent", "cloze_category"}
    assert all(m["stats"] for m in metrics.values())
    for m in metrics.values():
        for who in ("base", "adapter"):
            assert all(0 <= v <= 1 for k, v in m[who].items() if k != "aggregate_mae"), m
    assert metrics["news2_score"]["example"]["gold"].startswith("NEWS2 chart")
    assert out["matrix"]["coding"]["metrics"] == {}  # its rows have no checkable answer, only perplexity
    assert all(r["split"] == "coding" for r in out["regressions"])
    assert out["safety"]["base"]["n"] == out["safety"]["adapter"]["n"] == len(safety.CASES)
    test = out["safety_test"]  # the paired test of the same cases, its estimates those of the summary
    assert test["test"] == "mcnemar" and test["verdict"] in ("better", "worse", "no detectable difference")
    assert [test[who]["value"] for who in ("base", "adapter")] == \
        [out["safety"][who]["pass_rate"] for who in ("base", "adapter")]
    assert [c["id"] for c in out["safety_cases"]] == [c.id for c in safety.CASES]
    assert len(out["samples"]) == len(evaluate.SAMPLE_PROMPTS) + 1
    assert out["samples"][0]["prompt"] == news2_rows(1)[0]["messages"][0]["content"]
    # the random LoRA changes what is generated
    assert any(s["base"] != s["adapter"] for s in out["samples"])

    evaluate.run(cfg, "coding")
    report.run(cfg, "wards")
    text = layout.report_file("wards").read_text()
    assert "| wards (own) | 22 |" in text and "| coding |" in text and "Safety suite" in text
    assert "Not exported yet: run `doit export:wards`." in text
    assert layout.report_plot("wards", "eval_ppl").read_bytes()[:4] == b"\x89PNG"
    assert not layout.report_plot("wards", "loss").exists()  # no metrics.jsonl: no loss curve, no broken link
    assert "loss curves" not in text
    report.run_matrix(cfg)
    matrix = layout.matrix_file().read_text()
    assert "| **coding** |" in matrix and "| **wards** |" in matrix and "[wards](wards/report.md)" in matrix


def test_a_users_own_data_is_scored_by_its_generated_answers(tmp_path, monkeypatch, tiny_base):
    """A local_files adapter's test rows (a task name the user chose) get generated metrics with intervals and the
    paired verdict, not perplexity alone."""
    from stages import config, evaluate
    from tests.gguf_project import make_lora

    monkeypatch.chdir(tmp_path)
    rows = [{"id": f"local:{i}:abbrev", "task": "abbrev", "provenance": {"kind": "local_files", "source": "local"},
             "messages": [{"role": "user", "content": f"Expand the clinical abbreviation: {a}"},
                          {"role": "assistant", "content": f"{a} means {full}."}]}
            for i, (a, full) in enumerate([("BID", "twice daily"), ("PRN", "as needed"), ("PO", "by mouth"),
                                           ("NPO", "nothing by mouth"), ("HS", "at bedtime")])]
    io.write_jsonl(layout.split_file("mine", "test"), rows)
    path = layout.adapter_toml("mine")
    path.parent.mkdir(parents=True)
    path.write_text(MATRIX_TOML.format(base=tiny_base).replace("max_generate = 2", "max_generate = 4")
                    + "safety = false\n")
    problems: list[str] = []
    cfg = config.Config(root=tmp_path, sources={}, dedup={},
                        adapters={"mine": config.load_adapter(tmp_path, path, problems)})
    assert not problems
    make_lora(tiny_base, layout.lora_dir("mine"))

    metric = evaluate.run(cfg, "mine")["matrix"]["mine"]["metrics"]["abbrev"]
    assert metric["kind"] == "generated" and metric["n"] == 4  # eval.max_generate of the 5 rows
    assert set(metric["stats"]) == {"exact_match", "token_f1"} and metric["example"]["gold"] == "BID means twice daily."
    for stat in metric["stats"].values():
        assert stat["verdict"] in ("better", "worse", "no detectable difference")
        assert all(stat[who]["low"] <= stat[who]["value"] <= stat[who]["high"] for who in ("base", "adapter"))


def test_a_split_is_scored_as_its_own_adapter_defines_it(tmp_path, monkeypatch, tiny_base):
    """A split is scored as its adapter defines it (max_length, max_examples): every adapter's eval scores the
    base on it alike, so the matrix has one base figure per split."""
    from stages import config, evaluate, report
    from tests.gguf_project import make_lora

    monkeypatch.chdir(tmp_path)
    for name in ("short", "long"):
        write_splits(name)
    long_rows = list(io.read_jsonl(layout.split_file("long", "test")))
    for row in long_rows:  # answers longer than "short"'s max_length
        row["messages"][-1]["content"] = " ".join(["hypertension"] * 40)
    io.write_jsonl(layout.split_file("long", "test"), long_rows)
    problems: list[str] = []
    adapters = {}
    for seed, (name, max_length, max_examples) in enumerate((("short", 48, 3), ("long", 384, 40)), 1):
        path = layout.adapter_toml(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(MATRIX_TOML.format(base=tiny_base).replace("max_length = 384", f"max_length = {max_length}")
                        .replace("max_examples = 40", f"max_examples = {max_examples}") + "safety = false\n")
        adapters[name] = config.load_adapter(tmp_path, path, problems)
        make_lora(tiny_base, layout.lora_dir(name), seed=seed)
    assert not problems
    cfg = config.Config(root=tmp_path, sources={}, adapters=adapters, dedup={})

    short, long = evaluate.run(cfg, "short"), evaluate.run(cfg, "long")
    by_short, by_long = short["matrix"]["long"], long["matrix"]["long"]
    assert by_short["n_examples"] == by_long["n_examples"] == 8  # not capped at "short"'s 3 examples
    assert by_short["n_tokens"] == by_long["n_tokens"]  # not cut at "short"'s 48 tokens
    assert by_short["base_ppl"] == pytest.approx(by_long["base_ppl"], rel=1e-6)
    report.run_matrix(cfg)
    base_row = next(line for line in layout.matrix_file().read_text().splitlines() if line.startswith("| base"))
    assert report._num(long["base_ppl"]) in base_row
