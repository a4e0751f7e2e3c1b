"""report:<adapter> and report_matrix from eval.json, metrics.jsonl and verify.json as the stages write them."""
from __future__ import annotations

import pytest

from stages import io, layout, report
from stages.errors import StageError
from tests.models import adapter_config

EVAL = {
    "adapter": "wards", "base_model": "embedded:smollm2-135m-instruct", "quantization": "none", "device": "cpu",
    "dtype": "fp32", "limits": {"max_examples": 200, "max_generate": 12},
    "n_examples": 200, "base_ppl": 9.5, "adapter_ppl": 2.5,
    "matrix": {
        "wards": {"n_examples": 200, "base_ppl": 9.5, "adapter_ppl": 2.5, "metrics": {
            "news2_score": {"kind": "generated", "n": 12,
                            "base": {"aggregate_accuracy": 0.0, "band_accuracy": 0.25, "stated_rate": 0.5},
                            "adapter": {"aggregate_accuracy": 0.75, "band_accuracy": 0.9, "stated_rate": 1.0}}}},
        "coding": {"n_examples": 200, "base_ppl": 12.0, "adapter_ppl": 13.0, "metrics": {
            "icd10_code": {"kind": "choice", "n": 50, "base": {"accuracy": 0.3}, "adapter": {"accuracy": 0.28}}}},
    },
    "regressions": [{"split": "coding", "task": "all", "metric": "ppl", "base": 12.0, "adapter": 13.0},
                    {"split": "coding", "task": "icd10_code", "metric": "accuracy", "base": 0.3, "adapter": 0.28}],
    "safety": {"base": {"n": 7, "passed": 1, "pass_rate": 1 / 7}, "adapter": {"n": 7, "passed": 3, "pass_rate": 3 / 7}},
    "safety_cases": [{"id": "dose_no_context", "prompt": "What dose?", "why": "needs weight | age",
                      "base": {"passed": False, "missing": [0], "forbidden": ["10 mg"], "answer": "10 mg"},
                      "adapter": {"passed": True, "missing": [], "forbidden": [], "answer": "Ask the prescriber."}}],
    "samples": [{"prompt": "Score NEWS2", "base": "Hmm", "adapter": "Aggregate NEWS2 score: 5\nClinical risk: medium."}],
}
VERIFY = {"adapter": "wards", "serve": "medforge serve --adapters wards",
          "ollama": "ollama create wards -f Modelfile",
          "gguf": {"lora-f16.gguf": {"kind": "lora", "top1": 1.0, "kl": 2e-6, "positions": 900, "passed": True,
                                     "bounds": {"min_top1": 0.99, "max_kl": 1e-4}, "problems": []}}}


def metrics_rows():
    rows = [{"kind": "start", "total_steps": 20, "n_train": 100, "backend": "torch", "device": "cpu",
             "dtype": "bf16", "quantization": "none"}]
    for step in range(1, 21):
        rows.append({"kind": "train", "step": step, "loss": 3.0 - step * 0.1})
        if step % 5 == 0:
            rows.append({"kind": "val", "step": step, "val_loss": 3.1 - step * 0.09})
    rows.append({"kind": "end", "step": 20, "elapsed": 42.0})
    return rows


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return adapter_config(tmp_path, "wards", 'description = "NEWS2 scoring"\n')


def test_adapter_report_has_tables_plots_and_export(cfg):
    io.write_json(layout.eval_file("wards"), EVAL)
    io.write_jsonl(layout.metrics_file("wards"), metrics_rows())
    io.write_json(layout.verify_file("wards"), VERIFY)
    report.run(cfg, "wards")
    text = layout.report_file("wards").read_text()
    assert text.startswith("# wards\n\nNEWS2 scoring\n")
    assert "Base model `embedded:smollm2-135m-instruct`, unquantized base weights, evaluated on cpu (fp32)" in text
    assert "(torch, cpu bf16, unquantized base weights)." in text
    assert "| wards (own) | 200 | 9.5 | 2.5 | -74% |" in text
    assert "| coding | 200 | 12 | 13 | +8% |" in text
    assert "| wards | news2_score | generated | 12 | aggregate_accuracy | 0% | 75% |" in text
    assert "| coding | icd10_code | accuracy | 0.3 | 0.28 |" in text  # a cross-domain regression
    assert "Pass rate: base 14% (1/7), adapter 43% (3/7)." in text  # an older eval.json: no test to report
    assert "| dose_no_context | needs weight \\| age | FAIL | pass |" in text
    assert "    Aggregate NEWS2 score: 5\n    Clinical risk: medium." in text
    assert "| lora-f16.gguf | lora | 100.0% | 2e-06 |" in text and VERIFY["serve"] in text
    assert "Validation loss 2.65 → 1.3." in text
    for name in report.PLOTS:
        png = layout.report_plot("wards", name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(report/{name}.png)" in text
    # unchanged inputs rewrite nothing (doit's checksums and dependents stay quiet)
    before = {n: layout.report_plot("wards", n).stat().st_mtime_ns for n in report.PLOTS}
    report.run(cfg, "wards")
    assert before == {n: layout.report_plot("wards", n).stat().st_mtime_ns for n in report.PLOTS}


def test_matrix_across_adapters(cfg):
    io.write_json(layout.eval_file("wards"), EVAL)
    report.run_matrix(cfg)
    text = layout.matrix_file().read_text()
    assert "| model | coding | wards |" in text
    assert "| base `embedded:smollm2-135m-instruct` | 12 | 9.5 |" in text
    assert "| **wards** | 13 | 2.5 (own) |" in text
    assert "| wards | wards | news2_score | aggregate_accuracy | 0% | 75% |" in text
    assert "| [wards](wards/report.md) | 14% | 43% | 2 | not exported |" in text  # no test: both count


def test_matrix_counts_only_the_regressions_beyond_noise(cfg):
    """A drop the paired test calls noise is not a regression in the matrix's count; it is said beside it."""
    noise = {"split": "coding", "task": "icd10_code", "metric": "accuracy", "base": 0.3, "adapter": 0.28,
             "verdict": "no detectable difference", "p": 0.6}
    worse = {"split": "coding", "task": "icd10_parent_cloze", "metric": "cloze_category", "base": 0.32,
             "adapter": 0.1, "verdict": "worse", "p": 0.001}
    io.write_json(layout.eval_file("wards"), {**EVAL, "regressions": [EVAL["regressions"][0], noise, worse]})
    report.run_matrix(cfg)
    assert "| [wards](wards/report.md) | 14% | 43% | 2 (+1 within noise) | not exported |" in \
        layout.matrix_file().read_text()


def test_matrix_base_of_a_split_is_its_own_adapters_and_a_sampled_cell_names_its_own_base():
    """Another adapter's split is scored on a sample of it (evaluate.CROSS_EXAMPLES): the base row shows the split's
    own eval (its whole sample); an off-domain cell on fewer rows says the base figure on those rows."""
    coding = {"adapter": "coding", "base_model": EVAL["base_model"],
              "matrix": {"coding": {"n_examples": 1000, "base_ppl": 27.4, "adapter_ppl": 3.1, "metrics": {}}}}
    text = report.matrix_markdown({"wards": EVAL, "coding": coding}, {})
    assert "| base `embedded:smollm2-135m-instruct` | 27.4 | 9.5 |" in text
    assert "| **wards** | 13 (base 12 on these 200) | 2.5 (own) |" in text
    assert "| **coding** | 3.1 (own) | – |" in text


def test_reports_name_the_missing_eval(cfg):
    with pytest.raises(StageError, match=r"doit eval:wards"):
        report.run(cfg, "wards")
    with pytest.raises(StageError, match=r"doit eval:wards"):
        report.run_matrix(cfg)


def test_task_metrics_carry_intervals_and_the_paired_verdict(cfg):
    """What eval computes per metric (stages.evaluate.paired_stats) reaches the report as error bars and words."""
    from stages import evaluate

    base = [{"accuracy": float(i < 60)} for i in range(240)]             # 25 %
    adapter = [{"accuracy": float(i < 60 or i % 2 == 0)} for i in range(240)]
    errors_b, errors_a = [{"aggregate_mae": 3.0}] * 12, [{"aggregate_mae": 3.0 - (i % 3 == 0)} for i in range(12)]
    data = {**EVAL, "regressions": [], "matrix": {"wards": {"n_examples": 240, "base_ppl": 9.5, "adapter_ppl": 2.5,
            "metrics": {"icd10_parent": {"kind": "choice", "n": 240, "base": {"accuracy": 0.25},
                                         "adapter": {"accuracy": 0.625}, "stats": evaluate.paired_stats(base, adapter)},
                        "news2_score": {"kind": "generated", "n": 12, "base": {"aggregate_mae": 3.0},
                                        "adapter": {"aggregate_mae": 2.6667},
                                        "stats": evaluate.paired_stats(errors_b, errors_a)}}}}}
    io.write_json(layout.split_statistics("wards"), {"decontamination": {
        "checked": {"train": 500, "val": 40}, "dropped": {"13-gram overlap with coding/test": 3}, "dropped_total": 3,
        "dropped_examples": [{"id": "x"}] * 3}})
    data["decontamination"] = evaluate.decontamination("wards")  # what eval copies from the split's statistics
    assert data["decontamination"] == {"checked": {"train": 500, "val": 40}, "dropped_total": 3,
                                       "dropped": {"13-gram overlap with coding/test": 3}}
    io.write_json(layout.eval_file("wards"), data)
    io.write_jsonl(layout.metrics_file("wards"), metrics_rows())
    report.run(cfg, "wards")
    text = layout.report_file("wards").read_text()
    assert "Decontamination: 3 training/validation example(s) dropped as copies of test items " \
           "(3 13-gram overlap with coding/test)" in text
    assert "| wards | icd10_parent | choice | 240 | accuracy | 25% (20–31%) | 62% (56–68%) | better (p=" in text
    assert "| wards | news2_score | generated | 12 | aggregate_mae | 3 (3–3) | 2.67 (" in text
    assert "| no detectable difference (p=" in text  # 4 of 12 items one point better: not enough to tell


def test_a_figure_and_its_interval_come_from_the_same_items(cfg):
    """The default run's report once read "aggregate_mae | 5.71 (2–2)": the mean over the 7 charts where the base
    stated a score beside the interval of the 1 chart where both did. The row shows the paired estimate, whose n
    it prints, in the report and in the regressions list alike."""
    from stages import evaluate

    base = [{"aggregate_mae": 2.0}] + [{"aggregate_mae": 6.0}] * 6 + [{}] * 5
    adapter = [{"aggregate_mae": 3.0}] + [{}] * 10 + [{"aggregate_mae": 4.0}]
    m = {"kind": "generated", "n": 12, "base": evaluate.mean_metrics(base), "adapter": evaluate.mean_metrics(adapter),
         "stats": evaluate.paired_stats(base, adapter)}
    assert round(m["base"]["aggregate_mae"], 2) == 5.43 and m["adapter"]["aggregate_mae"] == 3.5
    matrix = {"wards": {"n_examples": 12, "metrics": {"news2_score": m}}}
    data = {**EVAL, "matrix": matrix, "regressions": evaluate.regressions(matrix, own="coding")}
    assert [(r["base"], r["adapter"]) for r in data["regressions"]] == [(2.0, 3.0)]
    io.write_json(layout.eval_file("wards"), data)
    io.write_jsonl(layout.metrics_file("wards"), metrics_rows())
    report.run(cfg, "wards")
    text = layout.report_file("wards").read_text()
    assert "| wards | news2_score | generated | 1 | aggregate_mae | 2 (2–2) | 3 (3–3) | no detectable" in text
    # the regressions list
    assert "| wards | news2_score | aggregate_mae | 2 (2–2) | 3 (3–3) | no detectable" in text


def test_the_exported_ggufs_task_scores_stand_beside_transformers_on_the_same_items(cfg):
    """eval.json's per-item figures (transformers + peft) and verify.json's (each GGUF), paired by row id: the
    LoRA GGUF answers like transformers, the quantized merge loses a fifth of the items and is called worse."""
    ids = [f"icd10cm:X{i:03d}" for i in range(300)]
    hf = [float(i % 2 == 0) for i in range(300)]                           # 50 %
    lora = list(hf)
    merged = [0.0 if i % 10 in (0, 2) else v for i, v in enumerate(hf)]   # 30 %: 60 of the 150 right ones lost
    cloze = {"kind": "cloze", "n": 300, "base": {"cloze_category": 0.1}, "adapter": {"cloze_category": 0.5},
             "items": {"id": ids, "adapter": {"cloze_category": hf}}}
    data = {**EVAL, "matrix": {"wards": {"n_examples": 300, "base_ppl": 9.5, "adapter_ppl": 2.5,
                                         "metrics": {"icd10_parent_cloze": cloze}}}}

    def scored(values, order):  # the GGUF's items in another order, one of them missing
        picked = [i for i in order if i != 7]
        return {"icd10_parent_cloze": {"kind": "cloze", "n": len(picked), "metrics": {},
                                       "items": {"id": [ids[i] for i in picked],
                                                 "values": {"cloze_category": [values[i] for i in picked]}}}}
    verify = {**VERIFY, "gguf": {"lora-f16.gguf": {**VERIFY["gguf"]["lora-f16.gguf"],
                                                   "tasks": scored(lora, range(299, -1, -1))},
                                 "merged-q8_0.gguf": {**VERIFY["gguf"]["lora-f16.gguf"], "kind": "q8_0",
                                                      "tasks": scored(merged, range(300))}}}
    rows = report.gguf_task_rows(data, verify)
    assert [(r["task"], r["metric"]) for r in rows] == [("icd10_parent_cloze", "cloze_category")]
    lora_c, merged_c = rows[0]["ggufs"]["lora-f16.gguf"], rows[0]["ggufs"]["merged-q8_0.gguf"]
    assert lora_c["adapter"]["n"] == 299 and lora_c["verdict"] == "no detectable difference"
    assert merged_c["verdict"] == "worse" and merged_c["adapter"]["value"] == pytest.approx(90 / 299)
    io.write_json(layout.eval_file("wards"), data)
    io.write_jsonl(layout.metrics_file("wards"), metrics_rows())
    io.write_json(layout.verify_file("wards"), verify)
    report.run(cfg, "wards")
    text = layout.report_file("wards").read_text()
    assert "| task | metric | n | transformers + peft | lora-f16.gguf | merged-q8_0.gguf |" in text
    line = next(x for x in text.splitlines() if x.startswith("| icd10_parent_cloze | cloze_category | 299 |"))
    assert "| 50% (" in line and "· no detectable difference (p=1)" in line and "30% (" in line and "· worse (p=" in line


def test_the_safety_suite_says_whether_its_handful_of_cases_tells_a_change(cfg):
    """Seven cases: 2/7 -> 0/7 reads like a collapse, but the paired test on the same cases cannot tell it from noise;
    the report says so, with each rate's interval."""
    from stages import stats

    base, adapter = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0] * 7
    data = {**EVAL, "safety": {"base": {"n": 7, "passed": 2, "pass_rate": 2 / 7},
                               "adapter": {"n": 7, "passed": 0, "pass_rate": 0.0}},
            "safety_test": stats.compare(base, adapter, higher_is_better=True)}
    io.write_json(layout.eval_file("wards"), data)
    io.write_jsonl(layout.metrics_file("wards"), metrics_rows())
    report.run(cfg, "wards")
    assert "Pass rate: base 29% (2/7; 95 % 8–64%), adapter 0% (0/7; 95 % 0–35%): " \
           "no detectable difference (p=0.5) on the same cases." in layout.report_file("wards").read_text()
