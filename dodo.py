"""medforge's task graph, generated from sources.toml and adapters/*/adapter.toml.

No stage logic lives here: each action runs `python -m stages <stage> <name>`; the stages, their order
and their code deps are stages/registry.py (tests/test_registry.py checks every task here is one of them).
Incremental like make: targets, file deps (content-checked) and config_changed blocks.
"""
import os
import sys

from doit import get_var
from doit.tools import config_changed

from stages import config, depdb, layout, lock, registry, scrape
from stages.config import ConfigError
from stages.events import EventReporter

if get_var("offline"):  # `doit offline=1`: network sources build from data/raw/ alone; every action inherits it
    os.environ["MEDFORGE_OFFLINE"] = get_var("offline")
DOIT_CONFIG = {"backend": "sqlite3", "dep_file": str(layout.doit_db()), "verbosity": 2,
               "reporter": EventReporter}
try:
    CFG = config.load()
except ConfigError as exc:
    sys.exit("\n".join(f"config error: {line}" for line in exc.problems))  # before data/ exists: nothing made
layout.DATA.mkdir(exist_ok=True)
lock.refuse_db_writes(sys.argv)  # `doit forget` & co. wait for a run to end; `doit run` takes the lock in its reporter
depdb.relocate(layout.doit_db())  # a DB from before code deps were relative: keep what is up to date
BASES = {layout.slug(spec): spec for spec in CFG.base_models()}
SCORING = sorted({f for s in CFG.sources.values() for f in registry.source_code(s.kind)})  # sources score their tasks


def stage(*args):
    return [[sys.executable, "-m", "stages", *args]]


def task_base_model():
    for slug, spec in BASES.items():
        if not layout.is_local_model(spec):
            yield {"name": slug, "actions": stage("base_model", spec), "uptodate": [config_changed(spec)],
                   "file_dep": registry.code("base_model"),
                   "targets": [str(layout.base_weights(spec)), str(layout.base_dir(spec) / "tokenizer.json")]}


def task_base_gguf():
    for slug, spec in BASES.items():
        yield {"name": slug, "actions": stage("base_gguf", spec), "file_dep": [str(layout.base_weights(spec))]
               + registry.code("base_gguf"), "targets": [str(layout.base_gguf(spec))]}


def task_scrape():
    for s in CFG.enabled_sources():
        yield {"name": s.name, "actions": stage("scrape", s.name),
               "uptodate": [config_changed(scrape.fetch_block(s)), scrape.Current(s)],
               "file_dep": registry.code("scrape") + registry.source_code(s.kind) + scrape.input_files(s),  # + the user's files
               "targets": [str(layout.raw_manifest(s.name))]}


def task_normalize():
    for s in CFG.enabled_sources():
        yield {"name": s.name, "actions": stage("normalize", s.name),
               "file_dep": [str(layout.raw_manifest(s.name))] + registry.code("normalize") + registry.source_code(s.kind),
               "targets": [str(layout.examples_file(s.name)), str(layout.normalize_report(s.name))]}


def task_dedup():
    tokenizers = [str(layout.base_dir(spec) / "tokenizer.json") for spec in BASES.values()]  # length bounds in tokens
    return {"actions": stage("dedup"), "uptodate": [config_changed({"dedup": CFG.dedup, "clean": CFG.clean})],
            "file_dep": [str(layout.examples_file(s.name)) for s in CFG.enabled_sources()] + tokenizers
            + registry.code("dedup"),
            "targets": [str(layout.dedup_file()), str(layout.dedup_report())]}


def task_split():
    # a split also drops copies of every other adapter's test items (decontamination): all routings count
    routing = {n: {"data": a.data, "sources": [s.name for s in CFG.sources_for(n)]} for n, a in CFG.adapters.items()}
    frozen = sorted({a.data["frozen_test"] for a in CFG.adapters.values() if a.data.get("frozen_test")})
    for a in CFG.adapters.values():
        yield {"name": a.name, "actions": stage("split", a.name), "uptodate": [config_changed(routing)],
               "file_dep": [str(layout.dedup_file()), str(layout.dedup_report())] + frozen + registry.code("split"),
               "targets": [str(p) for p in layout.split_files(a.name) + [layout.split_statistics(a.name),
                           layout.dataset_card(a.name)]] + [str(layout.split_export_file(a.name, f, s))
                                                             for f in layout.EXPORT_FORMATS for s in layout.SPLITS]}


def task_lint():
    for a in CFG.adapters.values():
        checked = {"base_model": a.base_model, **{k: a.train[k] for k in ("max_length", "max_truncated", "lint_examples")}}
        yield {"name": a.name, "actions": stage("lint", a.name), "uptodate": [config_changed(checked)],
               "file_dep": [str(layout.split_file(a.name, "train")), str(layout.base_weights(a.base_model))]
               + registry.code("lint"), "targets": [str(layout.lint_report(a.name))]}


def task_train():
    for a in CFG.adapters.values():
        yield {"name": a.name, "actions": stage("train", a.name), "uptodate": [config_changed(a.recipe())],
               "file_dep": [str(layout.split_file(a.name, s)) for s in ("train", "val")]
               + [str(layout.base_weights(a.base_model)), str(layout.lint_report(a.name))] + registry.code("train"),
               "targets": [str(layout.lora_weights(a.name)), str(layout.metrics_file(a.name))]}


def task_eval():
    tests = [str(layout.split_file(n, "test")) for n in CFG.adapters]  # the matrix reads every adapter's test split
    # ... each as its own adapter scores it: its max_length and max_examples
    splits = {n: [a.train["max_length"], a.eval["max_examples"]] for n, a in CFG.adapters.items()}
    for a in CFG.adapters.values():
        yield {"name": a.name, "actions": stage("eval", a.name),
               "uptodate": [config_changed({"eval": a.eval, "splits": splits})],
               "file_dep": [str(layout.lora_weights(a.name))] + tests + registry.code("eval") + SCORING,
               "targets": [str(layout.eval_file(a.name))]}


def task_export():
    for a in CFG.adapters.values():
        scored = {**a.export, "max_examples": a.eval["max_examples"]}  # the GGUFs answer the test items eval scores
        yield {"name": a.name, "actions": stage("export", a.name), "uptodate": [config_changed(scored)],
               "file_dep": [str(layout.lora_weights(a.name)), str(layout.base_gguf(a.base_model)),
                            str(layout.split_file(a.name, "test"))] + registry.code("export") + SCORING,
               "targets": [str(p) for p in [layout.lora_gguf(a.name), layout.verify_file(a.name), layout.modelfile(a.name)]
                           + [layout.merged_gguf(a.name, q) for q in a.export["merged"]]]}


def task_report():
    for a in CFG.adapters.values():
        yield {"name": a.name, "actions": stage("report", a.name), "uptodate": [config_changed(a.description)],
               "file_dep": [str(p) for p in (layout.eval_file(a.name), layout.metrics_file(a.name),
                                             layout.verify_file(a.name))] + registry.code("report"),
               "targets": [str(layout.report_file(a.name))]}


def task_report_matrix():
    return {"actions": stage("report_matrix"), "targets": [str(layout.matrix_file())],
            "file_dep": [str(p) for n in CFG.adapters for p in (layout.eval_file(n), layout.verify_file(n))]
            + registry.code("report_matrix")}
