"""A failing task is loud and clear, whatever kills it: one line saying why, the task failed, no
temporary files left, and its log (what the dashboard shows) ends with the failure.

Faults are injected with a `sitecustomize` on PYTHONPATH, so the real doit, the real stage process
and the real child processes run: the GGUF verifying child dies of a real SIGSEGV in native code
(an invalid read through ctypes), a stage process is SIGKILLed mid-task, a stage hits a bug.
"""
from __future__ import annotations

import signal

import pytest

from stages import layout
from tests.models import make_tiny_model
from tests.pipeline_project import Project

HOOK = '''
import os

fault = os.environ.get("MEDFORGE_TEST_FAULT")
if fault == "segfault-verifying":
    import stages.export

    def crash(*args, **kwargs):
        import ctypes
        ctypes.string_at(0)

    stages.export._check_gguf = stages.export._verify = crash
elif fault == "kill-split":
    import stages.split

    def die(*args, **kwargs):
        import signal
        print("splitting...", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    stages.split.run = die
elif fault == "bug-in-report":
    import stages.report

    def bug(*args, **kwargs):
        return {}["missing"]

    stages.report.run_matrix = bug
'''
ADAPTER = "clinical_decision"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("failing-project")
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "base")
    proj = Project(root, base_model=str(model))
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(HOOK)
    proj.hook = str(hook)
    return proj


def run_with_fault(project: Project, fault: str, *tasks: str):
    env = {"PYTHONPATH": f"{project.root}:{project.hook}", "MEDFORGE_TEST_FAULT": fault}
    return project.doit(*tasks, check=False, env=env)


def log_lines(project: Project, task: str) -> list[str]:
    return project.path(str(layout.log_file(task))).read_text().rstrip("\n").splitlines()


def failed_events(project: Project) -> dict[str, list]:
    return {e["task"]: e["error"] for e in project.events() if e["event"] == "task_failed"}


def test_a_stage_killed_by_a_signal_fails_and_its_log_ends_with_why(project):
    task = f"split:{ADAPTER}"
    result = run_with_fault(project, "kill-split", task)
    assert result.returncode != 0
    assert task in failed_events(project)
    lines = log_lines(project, task)
    assert lines[0].startswith(f"[{task}] started") and "splitting..." in lines
    assert lines[-1].startswith(f"[{task}] failed: ") and f"returned -{int(signal.SIGKILL)}" in lines[-1]


def test_an_unexpected_error_keeps_its_traceback_in_the_log_and_ends_with_the_outcome(project):
    project.doit(f"eval:{ADAPTER}", "eval:clinical_coding", f"export:{ADAPTER}", "export:clinical_coding")
    result = run_with_fault(project, "bug-in-report", "report_matrix")
    assert result.returncode != 0
    lines = log_lines(project, "report_matrix")
    assert "Traceback (most recent call last):" in lines
    assert lines[-1] == "[report_matrix] failed: KeyError: 'missing'"
    assert sum("failed:" in line for line in lines) == 1  # the reporter adds nothing when the stage said it


def test_a_native_crash_while_verifying_is_one_line_and_leaves_nothing_behind(project):
    project.doit(f"export:{ADAPTER}")  # a verified export to begin with: it must not outlive a failed one
    project.edit(f"adapters/{ADAPTER}/adapter.toml", 'merged = ["q8_0"]', 'merged = ["q8_0", "q4_k_m"]')
    task = f"export:{ADAPTER}"
    result = run_with_fault(project, "segfault-verifying", task)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    crash = [line for line in output.splitlines() if "llama.cpp crashed" in line]
    assert len(crash) == 1, output
    assert crash[0].startswith(f"[{task}] failed: llama.cpp crashed (SIGSEGV, exit -{int(signal.SIGSEGV)}) decoding ")
    assert "extra buffer types" in crash[0] and "the task log has the native stack" in crash[0]
    assert task in failed_events(project)
    out = project.path(str(layout.out_dir(ADAPTER)))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "a temporary export folder was left"
    assert not project.path(str(layout.verify_file(ADAPTER))).exists()  # nothing unverified stays served
    lines = log_lines(project, task)
    assert lines[-1] == crash[0]
    assert any("Fatal Python error: Segmentation fault" in line for line in lines)  # the native stack
