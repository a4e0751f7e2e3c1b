"""The whole graph on the real embedded SmolLM2-135M, a handful of steps, then `medforge chat` on its exports."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.pipeline_project import Project, adapter_toml, sources_toml


@pytest.mark.slow
def test_embedded_smollm2_end_to_end_then_chat(tmp_path):
    project = Project(tmp_path, base_model="embedded:smollm2-135m-instruct")
    (tmp_path / "sources.toml").write_text(sources_toml(news2_count=40, icd_codes=40))
    for name in ("clinical_coding", "clinical_decision"):
        (tmp_path / "adapters" / name / "adapter.toml").write_text(
            adapter_toml("embedded:smollm2-135m-instruct", max_steps=3, merged="[]"))
    executed = project.run()
    assert {"base_model:embedded_smollm2-135m-instruct", "train:clinical_decision", "export:clinical_decision"} <= executed

    base = tmp_path / "data" / "base" / "embedded_smollm2-135m-instruct"
    assert json.loads((base / "config.json").read_text())["num_hidden_layers"] == 30  # the real model, not a toy
    for adapter in ("clinical_coding", "clinical_decision"):
        out = tmp_path / "adapters" / adapter / "out"
        assert (out / "gguf" / "lora-f16.gguf").stat().st_size > 0
        assert json.loads((out / "eval.json").read_text())["n_examples"] > 0

    answer = subprocess.run(
        [sys.executable, "-m", "stages.cli", "chat", "--adapter", "clinical_decision", "--max-tokens", "48",
         "RR 24, SpO2 93% on air (scale 1), BP 105/70, pulse 112, alert, 38.4 C. What is the NEWS2 score?"],
        cwd=tmp_path, env=project.env(), capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert len(answer.stdout.strip()) > 10
