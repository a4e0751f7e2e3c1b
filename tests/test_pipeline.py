"""The whole graph on a tiny random model, and the make-like rules, proven by counting executed tasks."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.models import make_tiny_model
from tests.pipeline_project import Project

ADAPTERS = ("clinical_coding", "clinical_decision")
ALL_ADAPTER_TASKS = {f"{stage}:{a}" for stage in ("split", "train", "eval", "export", "report") for a in ADAPTERS}


def adapter_tasks(executed: set[str], adapter: str) -> set[str]:
    return {t for t in executed if t.endswith(f":{adapter}")}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    model = make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    proj = Project(root, base_model=str(model))
    executed = proj.run()
    proj.first_run = executed
    return proj


def test_full_graph_builds_every_target(project):
    assert ALL_ADAPTER_TASKS | {"dedup", "scrape:news2", "normalize:icd10cm", "report_matrix"} <= project.first_run
    for adapter in ("clinical_coding", "clinical_decision"):
        out = project.path(f"adapters/{adapter}/out")
        assert (out / "lora" / "adapter_model.safetensors").stat().st_size > 0
        assert (out / "gguf" / "lora-f16.gguf").stat().st_size > 0
        assert (out / "gguf" / "merged-q8_0.gguf").stat().st_size > 0
        assert json.loads((out / "gguf" / "verify.json").read_text())
        assert (out.parent / "report.md").stat().st_size > 0
        report = json.loads((out / "eval.json").read_text())
        assert report["base_ppl"] > 1 and report["adapter_ppl"] > 1
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in m for m in metrics)
    for name in ("train", "val", "test"):
        assert project.path(f"data/splits/clinical_decision/{name}.jsonl").stat().st_size > 0
    log = project.path("data/logs/train_clinical_decision.log").read_text()
    assert "[train:clinical_decision] done" in log


def test_second_run_with_nothing_changed_executes_nothing(project):
    assert project.run() == set()


def moved_copy(project: Project, where) -> Project:
    """The project at another path, as `mv`, `cp -a` or another mount gives it: every file, mtimes kept."""
    shutil.copytree(project.root, where, symlinks=True)
    moved = copy.copy(project)
    moved.root = where
    return moved


def test_a_moved_project_runs_nothing(project, tmp_path):
    assert moved_copy(project, tmp_path / "elsewhere").run() == set()


def test_a_state_db_an_older_medforge_wrote_runs_nothing_after_the_update(project, tmp_path):
    """Older medforge keyed stage-code deps by absolute path: a DB written so, even in another place, is rewritten
    in place (stages.depdb) instead of rebuilding everything on the first run after the update."""
    moved = moved_copy(project, tmp_path / "elsewhere")
    db = sqlite3.connect(moved.path("data/.doit.sqlite"))

    def absolute(path: str) -> str:
        return str(project.root / path) if path.startswith("stages/") else path

    with db:
        for task, text in db.execute("select task_id, task_data from doit").fetchall():
            data = {absolute(k): v for k, v in json.loads(text).items()}
            data["deps:"] = [absolute(p) for p in data.get("deps:", [])]
            db.execute("update doit set task_data = ? where task_id = ?", (json.dumps(data), task))
    assert moved.run() == set()
    keys = [k for (text,) in db.execute("select task_data from doit") for k in json.loads(text)]
    db.close()
    assert "stages/split.py" in keys and not [k for k in keys if k.startswith(str(project.root))]


def test_one_source_change_reruns_only_that_source_and_changed_splits(project):
    project.edit("sources.toml", "count = 60", "count = 70")
    executed = project.run()
    assert {"scrape:news2", "normalize:news2", "dedup"} <= executed
    assert "scrape:icd10cm" not in executed and "normalize:icd10cm" not in executed
    # news2 feeds clinical_decision only: the coding split is rebuilt, its content is unchanged,
    # so the coding adapter is not retrained
    assert {"train:clinical_decision", "eval:clinical_decision", "export:clinical_decision"} <= executed
    # eval:clinical_coding re-runs (its matrix scores every adapter's test split), training does not
    assert not {"train:clinical_coding", "export:clinical_coding"} & executed
    assert project.run() == set()


def test_one_adapter_recipe_change_reruns_only_that_adapter(project):
    project.edit("adapters/clinical_coding/adapter.toml", "lr = 0.0003", "lr = 0.0005")
    executed = project.run()
    assert {"train:clinical_coding", "eval:clinical_coding", "export:clinical_coding"} <= executed
    assert adapter_tasks(executed, "clinical_decision") == set()
    assert executed <= {"train:clinical_coding", "eval:clinical_coding", "export:clinical_coding",
                        "report:clinical_coding", "report_matrix"}
    assert project.run() == set()


def test_stage_code_change_reruns_that_stage_and_only_what_changed_downstream(project):
    # a change in split's code re-runs every split; their outputs are identical, so no training follows
    project.edit("stages/split.py", '"""', '"""\n# a harmless edit\n')
    assert project.run() == {"split:clinical_coding", "split:clinical_decision"}
    # a change in the export code re-runs the exports only
    project.edit("stages/export.py", '"""', '"""\n# a harmless edit\n')
    executed = project.run()
    assert {"export:clinical_coding", "export:clinical_decision"} <= executed
    assert any(t.startswith("base_gguf:") for t in executed)  # the base GGUF is built by export.py too
    assert not {t for t in executed if t.split(":")[0] in ("scrape", "normalize", "dedup", "split", "train", "eval")}
    # a change in training's code re-runs training, and eval and export, which compute with it (the passes that
    # score, the examples' encoding), even where the adapters come out the same bytes
    weights = [project.root / "adapters" / a / "out" / "lora" / "adapter_model.safetensors" for a in ADAPTERS]
    before = [w.read_bytes() for w in weights]
    project.edit("stages/train/torch_backend.py", '"""', '"""\n# a harmless edit\n')
    executed = project.run()
    assert [w.read_bytes() for w in weights] == before
    assert {f"{stage}:{a}" for stage in ("train", "eval", "export") for a in ADAPTERS} <= executed


def test_killed_task_leaves_no_done_looking_target(project):
    """SIGKILL doit while train runs: no adapter appears, and the next run trains again."""
    project.edit("adapters/clinical_decision/adapter.toml", "max_steps = 2", "max_steps = 400")
    lora = project.path("adapters/clinical_decision/out/lora")
    before = (lora / "adapter_model.safetensors").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "doit", "train:clinical_decision"], cwd=project.root,
                            env=project.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = project.path("adapters/clinical_decision/out/metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is really under way
        if metrics.exists() and metrics.read_text().count('"loss"') >= 3:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("training never started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the old adapter is untouched (the new one would only ever appear by an atomic rename)
    assert (lora / "adapter_model.safetensors").read_bytes() == before
    project.edit("adapters/clinical_decision/adapter.toml", "max_steps = 400", "max_steps = 3")
    executed = project.run()
    assert "train:clinical_decision" in executed
    assert (lora / "adapter_model.safetensors").read_bytes() != before


def test_atomic_write_killed_mid_write_leaves_no_target(tmp_path):
    target = tmp_path / "big.bin"
    code = ("import sys, time\nfrom stages import io\n"
            "with io.atomic_path(sys.argv[1]) as tmp:\n"
            "    with open(tmp, 'wb') as fh:\n"
            "        for _ in range(10_000):\n"
            "            fh.write(b'x' * 65536); fh.flush(); time.sleep(0.001)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.name.endswith(".tmp") and p.stat().st_size > 1 << 20
                                              for p in tmp_path.iterdir()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
