"""The pipeline's stages, in graph order (upstream first): the one list that dodo.py, `python -m stages`
and the dashboard read.

Pure data, nothing heavy imported: dodo.py loads it on every `doit` call, the dashboard at start.
A stage's `code` is the code its results are computed by: its own files and the stages' code it computes with
(paths under stages/; a folder means every .py in it), the plumbing beneath every stage aside (config, paths,
I/O). Editing one re-runs the stage's tasks and what follows, even where an upstream result comes out the same
bytes. A source's shared code is `SOURCE_USES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages import layout

CODE = Path(__file__).resolve().parent  # the installed `stages` package


@dataclass(frozen=True)
class Stage:
    name: str                    # the doit task (`<name>:<item>` when named) and `python -m stages <name>`
    module: str                  # where its entry function lives, imported only when the stage runs
    code: tuple[str, ...]        # its code deps, relative to stages/
    entry: str = "run"           # the function `python -m stages` calls: entry(cfg, *args)
    named: bool = True           # one task per base model/source/adapter, given as the argument


STAGES = (
    Stage("base_model", "stages.base_model", ("base_model.py",)),
    Stage("base_gguf", "stages.export", ("export.py", "llamacpp.py", "gguf.py"), entry="run_base"),
    Stage("scrape", "stages.scrape", ("scrape.py",)),        # + the source's code (source_code)
    Stage("normalize", "stages.normalize", ("normalize.py",)),  # + the source's code (source_code)
    Stage("dedup", "stages.dedup", ("dedup", "clean.py"), named=False),
    Stage("split", "stages.split", ("split.py", "clean.py", "decontaminate.py", "dedup")),  # + dedup: its MinHash and LSH
    Stage("lint", "stages.train.lint", ("train/lint.py", "train/format.py", "train/encoded.py", "train/inputs.py")),
    Stage("train", "stages.train", ("train",)),
    # + the configured sources' code (source_code): they score their tasks, through sources/__init__.py's Task;
    # + train/: the model, its LoRA branch and the passes that score it, the examples' encoding
    Stage("eval", "stages.evaluate", ("evaluate.py", "safety.py", "stats.py", "sources/__init__.py", "train")),
    # + the configured sources' code, as eval: each GGUF answers the same choice and cloze items
    Stage("export", "stages.export", ("export.py", "llamacpp.py", "gguf.py", "evaluate.py", "safety.py", "stats.py",
                                      "sources/__init__.py", "train")),
    Stage("report", "stages.report", ("report.py", "stats.py")),  # stats: the GGUFs' paired tests
    Stage("report_matrix", "stages.report", ("report.py", "stats.py"), entry="run_matrix", named=False),
)
BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)

# The code a source kind's module (stages/sources/<kind>.py) builds on besides itself, relative to stages/:
# shared helpers and other sources it borrows from (what those use in turn follows from their own entry).
# Editing one re-runs the kind's scrape and normalize. tests/test_registry.py fails when a source imports
# such a module, directly or not, that is not listed here.
SOURCE_USES = {
    "clinicaltrials": ("sources/_shape.py", "sources/_text.py"),
    "dailymed": ("sources/_text.py", "sources/_xml.py"),
    "drugbank": ("sources/_text.py", "sources/_xml.py"),
    "fda_guidance": ("sources/_shape.py", "sources/_text.py"),
    "hf_qa": ("sources/local_files.py",),
    "local_files": ("sources/fda_guidance.py",),
    "medlineplus": ("sources/_text.py", "sources/_xml.py"),
    "openfda": ("sources/_shape.py", "sources/_text.py"),
    "pubmed": ("sources/_text.py", "sources/_xml.py"),
    "rxnorm": ("sources/_shape.py",),
    "stackexchange": ("sources/_shape.py", "sources/_text.py"),
}


def where() -> Path:
    """stages/ as code deps name it (layout.as_named): doit runs from the project's root and keys its state by each
    dep's path, so a project moved, renamed or mounted elsewhere stays up to date; absolute for a `stages` installed
    outside the project."""
    return layout.as_named(CODE)


def files(names) -> list[str]:
    """Paths of code files under stages/ (see `where`); a folder stands for every .py in it (new ones included)."""
    out: list[str] = []
    code = where()
    for name in names:
        path = code / name
        out += [str(p) for p in sorted(path.glob("*.py"))] if path.is_dir() else [str(path)]
    return out


def code(stage: str) -> list[str]:
    """A stage's code deps, so editing the stage re-runs it and what follows."""
    return files(BY_NAME[stage].code)


def source_code(kind: str) -> list[str]:
    """A source kind's module and the code it builds on (SOURCE_USES), through the other sources it uses too."""
    found = [f"sources/{kind}.py"]
    for name in found:  # grows while it is read: what each used source uses in turn
        used_kind = name.removeprefix("sources/").removesuffix(".py")
        found += [n for n in SOURCE_USES.get(used_kind, ()) if n not in found]
    return files(found)
