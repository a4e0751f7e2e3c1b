"""stages/registry.py is the one list of stages: dodo.py's tasks are exactly its stages, in its order;
each entry names a module and function that exist and code deps that exist; and a source's code deps
hold every module it builds on (so editing a helper re-runs the sources that use it)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stages import depdb, registry
from stages.sources import KINDS
from tests.test_import_graph import ROOT, graph

# what a source builds on that is not its own code: the layers beneath every source (editing them does not
# re-run the sources, as before the registry); anything else a source imports must be in its code deps
PLATFORM = {"stages.sources", "stages.errors", "stages.http", "stages.io", "stages.layout", "stages.raw",
            "stages.schema"}


def test_dodo_has_one_task_per_stage_in_the_registry_order():
    tree = ast.parse((ROOT / "dodo.py").read_text(encoding="utf-8"))
    tasks = [node.name.removeprefix("task_") for node in tree.body
             if isinstance(node, ast.FunctionDef) and node.name.startswith("task_")]
    assert tasks == list(registry.NAMES)


def test_each_stage_names_an_entry_and_code_that_exist():
    for stage in registry.STAGES:
        path = ROOT / (stage.module.replace(".", "/") + ".py")
        path = path if path.exists() else path.with_suffix("") / "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert stage.entry in defined, f"{stage.name}: {path} has no {stage.entry}()"
        for name in stage.code:
            assert (registry.CODE / name).exists(), f"{stage.name}: code dep stages/{name} does not exist"
    for kind, uses in registry.SOURCE_USES.items():
        assert kind in KINDS, f"SOURCE_USES names '{kind}', which is no source kind"
        for name in uses:
            assert (registry.CODE / name).exists(), f"{kind}: code dep stages/{name} does not exist"


def builds_on(module: str, edges: dict[str, set[str]]) -> set[str]:
    """Every project module `module` imports, directly or through another, the platform left out."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for nxt in edges[todo.pop()] - PLATFORM - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def as_module(path: str) -> str:
    return "stages." + str(Path(path).resolve()).split("/stages/", 1)[1].removesuffix(".py").replace("/", ".")


def test_a_source_declares_every_module_it_builds_on():
    edges = graph()
    missing = {}
    for kind in KINDS:
        declared = {as_module(p) for p in registry.source_code(kind)}
        undeclared = builds_on(f"stages.sources.{kind}", edges) - declared
        if undeclared:
            missing[kind] = sorted(undeclared)
    assert not missing, ("sources import modules their scrape/normalize tasks do not depend on; add them to "
                         f"SOURCE_USES in stages/registry.py: {missing}")


# the plumbing beneath every stage: paths, config, I/O, the registry itself, the libraries' quieting, progress lines
STAGE_PLATFORM = PLATFORM | {"stages", "stages.config", "stages.base_model", "stages.registry", "stages.events",
                             "stages.lock", "stages.quiet", "stages.progress"}


@pytest.mark.parametrize("name", ["eval", "export", "report", "report_matrix"])
def test_a_scoring_stage_depends_on_every_module_it_computes_with(name):
    """eval's figures come from training's passes (a fix there that leaves the adapter's bytes as they were must
    still re-run eval), the export's task scores from eval's items, the report's verdicts from stats: each such
    module is a code dep of the stage, or its results go stale as 'up to date'."""
    stage = registry.BY_NAME[name]
    declared = {as_module(p).removesuffix(".__init__") for p in registry.code(name)}  # a package: its __init__.py
    undeclared = {m for m in builds_on(stage.module, graph()) - STAGE_PLATFORM - declared
                  if not m.startswith("stages.sources.")}  # a source's module: the configured ones, dodo's SCORING
    assert not undeclared, f"{name}: add to its code in stages/registry.py: {sorted(undeclared)}"


def test_a_code_dep_folder_stands_for_every_module_in_it():
    train = [Path(p).resolve() for p in registry.code("train")]
    assert registry.CODE / "train" / "__init__.py" in train
    assert registry.CODE / "train" / "loop.py" in train
    assert all(p.suffix == ".py" for p in train)


def test_code_deps_are_named_relative_to_the_project_so_a_moved_project_stays_up_to_date(monkeypatch, tmp_path):
    monkeypatch.chdir(registry.CODE.parent)  # doit runs from the project's root
    assert "stages/split.py" in registry.code("split")
    monkeypatch.chdir(tmp_path)  # stages/ outside the working directory (an installed package): absolute
    assert str(registry.CODE / "split.py") in registry.code("split")


def test_an_older_state_dbs_absolute_code_deps_are_renamed_and_nothing_else(monkeypatch):
    monkeypatch.chdir(registry.CODE.parent)
    code = depdb.code_files()
    assert depdb.relocated("/old/root/stages/split.py", code) == "stages/split.py"
    assert depdb.relocated("/old/root/stages/sources/news2.py", code) == "stages/sources/news2.py"
    for users in ("/mnt/stages/notes.jsonl", "/mnt/stages/no_such_stage.py", "data/dedup/kept.jsonl"):
        assert depdb.relocated(users, code) == users  # a user's file, or no stage's code: as it is
