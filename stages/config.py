"""Load and validate `sources.toml` and `adapters/*/adapter.toml`.

Every problem becomes one line naming the file, the key, what was expected and what
to do; `load()` raises ConfigError carrying all of them, and nothing runs.
Importing this module is cheap (stdlib and the light modules beneath it): dodo.py imports it on every `doit`.
"""
from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages import layout, sources as source_kinds
from stages.errors import ConfigError, StageError  # ConfigError is defined at the bottom; read from here too
from stages.schema import REQUIRED, Key, check, check_value

SOURCES_FILE = "sources.toml"
ADAPTERS_DIR = "adapters"
DEFAULT_BASE_MODEL = "embedded:smollm2-135m-instruct"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


# --- every key of sources.toml and adapter.toml, as data (stages/schema.py checks them; sources declare
# their own params in their file: Source.PARAMS)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_TYPES = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")

SOURCES_TOP_SCHEMA = {
    "sources": Key(dict, dict),  # at least one [sources.<name>] (load_sources says so when there is none)
    "dedup": Key(dict, dict),
    "clean": Key(dict, dict),
}
SOURCE_SCHEMA = {
    "kind": Key(str, REQUIRED, nonblank=True),  # a file stages/sources/<kind>.py (checked against them at load)
    "enabled": Key(bool, True),
    "adapters": Key(list, list, items=str, unique=True),
    "refresh": Key(str, "never", pattern=r"never|\d+d", expect='"never" or "<N>d" (e.g. "30d")'),
    "mode": Key(str, "live", choices=("live", "mirror")),
    "params": Key(dict, dict),
}
LORA_SCHEMA = {
    "r": Key(int, 16, min=1),
    "alpha": Key(float, 32.0, above=0),
    "dropout": Key(float, 0.05, min=0, below=1),
    "targets": Key(list, lambda: list(ALL_TARGETS), items=str, unique=True, nonblank=True),
}
TRAIN_SCHEMA = {
    "backend": Key(str, "auto", choices=("auto", "torch", "mlx")),
    "quantization": Key(str, "none", choices=("none", "nf4")),
    "lr": Key(float, 2e-4, above=0, max=1, expect="greater than 0 and at most 1 (e.g. 2e-4)"),
    "epochs": Key(int, 1, min=1),
    "max_steps": Key(int, 0, min=0, expect="0 (train for `epochs`) or more"),
    "batch_size": Key(int, 8, min=1),
    "grad_accum": Key(int, 1, min=1),
    "max_length": Key(int, 512, min=1),
    "warmup_ratio": Key(float, 0.05, min=0, max=1, expect="a share between 0 and 1"),
    "seed": Key(int, 0, min=0),
    "dtype": Key(str, "auto", choices=("auto", "bf16", "fp32")),
    "preset": Key(str, "", choices=("", "quick", "overnight", "full")),  # steps, eval and checkpoint cadence
    "eval_every": Key(int, 0, min=0),          # validation every N optimizer steps; 0 = four times a run
    "patience": Key(int, 0, min=0),            # stop after N validations without a new best; 0 = never
    "packing": Key(bool, True),                # pack examples into rows (no attention across examples)
    "gradient_checkpointing": Key(bool, False),
    "checkpoint_every": Key(int, 0, min=0),    # resumable checkpoint every N steps; 0 = at each validation
    "keep_checkpoints": Key(int, 2, min=1),    # newest step checkpoints kept (each carries the best adapter)
    "resume": Key(bool, True),                 # continue from the newest checkpoint of the same recipe and data
    "optimizer": Key(str, "auto", choices=("auto", "adamw", "paged_adamw")),  # auto = paged on CUDA
    "lint_examples": Key(int, 3, min=0),       # examples `lint:<adapter>` renders with trained tokens marked
    "max_truncated": Key(float, 0.05, min=0, max=1, expect="a share between 0 and 1"),  # lint fails above it
    "nnodes": Key(int, 1, min=1),              # machines training together (torchrun); see stages/train/distributed.py
    "master": Key(str, "", pattern=r"[^\s:]+:[0-9]{1,5}", expect="host:port of node 0"),  # with nnodes > 1
}
# what a preset sets; keys written in the recipe win
TRAIN_PRESETS = {
    "quick": {"max_steps": 60, "eval_every": 20, "checkpoint_every": 20, "patience": 0},
    "overnight": {"epochs": 3, "max_steps": 0, "eval_every": 200, "checkpoint_every": 200, "patience": 5},
    "full": {"epochs": 10, "max_steps": 0, "eval_every": 500, "checkpoint_every": 500, "patience": 4},
}
DATA_SCHEMA = {
    "tasks": Key(list, list, items=str, unique=True, nonblank=True),
    "max_examples": Key(int, 0, min=0, expect="0 (all) or more"),
    "sources": Key(list, list, items=str, unique=True),  # more sources to draw from, besides those listing this adapter
    "keywords": Key(list, list, items=str, nonblank=True),          # keep only records that mention one of these
    "exclude_keywords": Key(list, list, items=str, nonblank=True),  # drop records that mention any of these
    "frozen_test": Key(str, ""),  # a JSONL (e.g. an earlier test.jsonl) or id list: the fixed test set
}
EVAL_SCHEMA = {
    "max_examples": Key(int, 200, min=0, expect="0 (all) or more"),  # per test split, for perplexity and log-likelihood
    # per generation-scored task and split: greedy decoding is the slow part (Zen 3, fp32, base and adapter: ~0.5 s
    # an ICD-10 row, ~1.4 s a NEWS2 chart)
    "max_generate": Key(int, 40, min=0),
    "safety": Key(bool, True),            # run the safety suite (stages/safety.py) on base and adapter
}
EXPORT_SCHEMA = {
    "merged": Key(list, lambda: ["q8_0"], items=str, choices=QUANT_TYPES, unique=True),
    "verify_examples": Key(int, 8, min=1),  # held-out test conversations compared HF+peft vs GGUF, every position
    # of the test rows eval scores, how many each GGUF answers (choice and cloze through llama.cpp, whose prompt
    # processing runs at ~500 tokens/s on 2 CPU cores): the same rows in every run, a subset of eval's sample
    "task_examples": Key(int, 200, min=0, expect="0 (all eval scores) or more"),
    "max_kl": Key(dict, dict),              # per quant type (or "lora"): upper bound on mean KL(HF || GGUF)
    "min_top1": Key(dict, dict),            # per quant type (or "lora"): lower bound on top-1 agreement
}
EXPORT_BOUNDS = {"max_kl": Key(float, REQUIRED, min=0), "min_top1": Key(float, REQUIRED, min=0, max=1)}
_DEDUP_GONE = 'removed with the Redis backend: use engine = "local", or engine = "ray" with address = "host:6379"'
DEDUP_SCHEMA = {
    "threshold": Key(float, 0.8, above=0, below=1, expect="between 0 and 1 (both excluded)"),  # Jaccard similarity
    "num_perm": Key(int, 128, min=16),
    "shingle_words": Key(int, 5, min=1),
    "source_priority": Key(list, list, items=str, unique=True),  # keeper of a cluster: earliest source listed first
    "engine": Key(str, "local", choices=("local", "ray")),  # where fingerprints and LSH buckets are computed
    # the Ray cluster for engine = "ray" (stages/dedup/ray_engine.py); "" starts a Ray on this machine for the run
    "address": Key(str, "", pattern=r"auto|(ray://)?[^\s/:]+:[0-9]{1,5}", expect="like host:6379, ray://host:10001 or auto"),
    # the Redis backend is gone: a config that still names it is told what replaces it (never accepted)
    "backend": Key(str, "", pattern=r"(?!)", expect=_DEDUP_GONE),
    "redis_url": Key(str, "", pattern=r"(?!)", expect=_DEDUP_GONE),
}
CLEAN_SCHEMA = {
    "min_tokens": Key(int, 4, min=0),            # whole example, in base-tokenizer tokens (or the word estimate)
    "max_tokens": Key(int, 8192, min=1),
    "strip_markup": Key(bool, True),
    "boilerplate": Key(list, list, items=str),   # extra regular expressions: a line matching one is removed
    "scrub_contacts": Key(list, lambda: ["stackexchange"], items=str, unique=True),  # source kinds whose e-mails/phones are masked
}
ADAPTER_SCHEMA = {
    "base_model": Key(str, DEFAULT_BASE_MODEL, nonblank=True),
    "description": Key(str, ""),
    "lora": Key(dict, dict),
    "train": Key(dict, dict),
    "data": Key(dict, dict),
    "eval": Key(dict, dict),
    "export": Key(dict, dict),
}
SECTIONS = {"lora": LORA_SCHEMA, "train": TRAIN_SCHEMA, "data": DATA_SCHEMA, "eval": EVAL_SCHEMA,
            "export": EXPORT_SCHEMA}
DEDUP_ENGINES = DEDUP_SCHEMA["engine"].choices




@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str
    enabled: bool
    adapters: list[str]
    refresh: str
    mode: str
    params: dict[str, Any]
    raw_block: dict[str, Any] = field(repr=False)  # as written, for doit's config_changed


@dataclass(frozen=True)
class AdapterConfig:
    name: str
    path: Path
    base_model: str
    description: str
    lora: dict[str, Any]
    train: dict[str, Any]
    data: dict[str, Any]
    eval: dict[str, Any]
    export: dict[str, Any]

    def recipe(self) -> dict[str, Any]:
        """What training depends on (routing lives in `data`, used by the split)."""
        return {"base_model": self.base_model, "lora": self.lora, "train": self.train}


@dataclass(frozen=True)
class Config:
    root: Path
    sources: dict[str, SourceConfig]
    adapters: dict[str, AdapterConfig]
    dedup: dict[str, Any]
    clean: dict[str, Any] = field(default_factory=dict)

    def enabled_sources(self) -> list[SourceConfig]:
        return [s for s in self.sources.values() if s.enabled]

    def adapter(self, name: str) -> AdapterConfig:
        """The adapter `name`, or a StageError naming its missing adapter.toml and the known adapters."""
        if name not in self.adapters:
            raise StageError(f"unknown adapter '{name}': {ADAPTERS_DIR}/{name}/adapter.toml not found; known adapters: "
                             f"{', '.join(sorted(self.adapters)) or 'none'}")
        return self.adapters[name]

    def sources_for(self, adapter: str) -> list[SourceConfig]:
        """Sources that list the adapter, plus those its `data.sources` names."""
        extra = set(self.adapters[adapter].data.get("sources", [])) if adapter in self.adapters else set()
        return [s for s in self.enabled_sources() if adapter in s.adapters or s.name in extra]

    def base_models(self) -> list[str]:
        return sorted({a.base_model for a in self.adapters.values()})


def _read_toml(path: Path, where: str, problems: list[str]) -> dict | None:
    """The TOML document at `path` (`where` is how the user knows it), or None and one line saying why not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{where}: file not found; create it (see README.md, 'Configuration')")
        return None
    except IsADirectoryError:
        problems.append(f"{where}: is a folder, not a file; remove the folder and create the file")
        return None
    except OSError as exc:
        problems.append(f"{where}: cannot be read ({exc.strerror or exc}); check its permissions")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        problems.append(f"{where}: line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the file as UTF-8")
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(_toml_problem(where, text, str(exc)))
    return None


def _toml_problem(where: str, text: str, message: str) -> str:
    """tomllib's error as one line that names the line, and the table or key a duplicate is about."""
    at = re.search(r"\(at line (\d+), column \d+\)", message)
    line = int(at.group(1)) if at else 0
    lines = text.splitlines()
    shown = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    twice = re.match(r"Cannot declare \((.*)\) twice", message)
    if twice:
        table = ".".join(part.strip().strip("'\"") for part in twice.group(1).split(",") if part.strip())
        return f"{where}: line {line}: key '{table}' is declared twice ([{table}]); merge the two blocks or rename one"
    if message.startswith("Cannot overwrite a value") and "=" in shown:
        header = next((m.group(1) for m in (re.match(r"\s*\[+\s*([^\]]+?)\s*\]+", lines[i])
                                             for i in range(line - 2, -1, -1)) if m), "")
        key = shown.split("=", 1)[0].strip().strip("'\"")
        return (f"{where}: line {line}: key '{header + '.' if header else ''}{key}' is set twice; "
                f"keep one of the two lines")
    return f"{where}: not valid TOML at line {line} ({re.sub(r' [(]at line .*', '', message)}: `{shown}`); fix the syntax" \
        if line else f"{where}: not valid TOML ({message}); fix the syntax"


def _kind_problem(where: str, key: str, kind: str, kinds) -> str:
    close = difflib.get_close_matches(kind, list(kinds), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"{where}: key '{key}.kind' is '{kind}', not a known source kind ({', '.join(sorted(kinds))}); "
            f"{hint}fix it or add stages/sources/{kind}.py")


def load_sources(root: Path, problems: list[str], known_kinds) -> tuple[dict[str, SourceConfig], dict]:
    where = SOURCES_FILE
    doc = _read_toml(root / SOURCES_FILE, where, problems)
    if doc is None:
        return {}, {}
    top = check(where, doc, SOURCES_TOP_SCHEMA, problems)
    dedup = check(where, top["dedup"], DEDUP_SCHEMA, problems, prefix="dedup.")
    dedup["clean"] = load_clean(where, top["clean"], problems, known_kinds)
    table = top["sources"]
    if not table:
        if "sources" not in doc or isinstance(doc.get("sources"), dict):
            problems.append(f"{where}: no [sources.<name>] blocks; declare at least one source")
        return {}, dedup
    sources = {}
    for name, block in table.items():
        key = f"sources.{name}"
        if not NAME_RE.match(name):
            problems.append(f"{where}: key '{key}': source name '{name}' must be lowercase letters, digits, '_' or '-'; "
                            f"rename [{key}]")
            dedup["routing_unsure"] = True
            continue
        if not isinstance(block, dict):
            problems.append(f"{where}: key '{key}' must be a table ([{key}]) (got {block!r}); fix it")
            dedup["routing_unsure"] = True
            continue
        values = check(where, block, SOURCE_SCHEMA, problems, prefix=f"{key}.")
        if any(f"'{key}.{k}'" in line for line in problems for k in ("enabled", "adapters")):
            dedup["routing_unsure"] = True  # which adapters it feeds is unknown: no 'nothing feeds' lines from it
        kind = values.get("kind")
        if kind is None:  # its own line says why; what it feeds is unknown
            dedup["routing_unsure"] = True
            continue
        if kind not in known_kinds:
            problems.append(_kind_problem(where, key, kind, known_kinds))
        else:
            live = values["enabled"] and values["mode"] == "live"
            try:
                cls = source_kinds.load(kind)
            except Exception as exc:  # a source file that cannot be imported (a missing dependency)
                problems.append(f"{where}: key '{key}.kind' is '{kind}', but stages/sources/{kind}.py cannot be "
                                f"imported ({type(exc).__name__}: {exc}); install what it needs or set enabled = false")
            else:
                found = len(problems)
                check(where, values["params"], cls.schema(), problems, prefix=f"{key}.params.", required=live)
                if live and len(problems) == found:  # well-formed: what it names on disk must exist
                    for param, message in cls(name, values["params"]).check(root):
                        problems.append(f"{where}: key '{key}.params.{param}' {message}")
        sources[name] = SourceConfig(name=name, raw_block=block, **{k: values[k] for k in SOURCE_SCHEMA})
    for name in dedup["source_priority"]:
        if name not in table:
            problems.append(f"{where}: key 'dedup.source_priority' names '{name}', which is not a [sources.<name>] "
                            f"block; fix the name or remove it")
    return sources, dedup


def load_clean(where: str, table: Any, problems: list[str], known_kinds=None) -> dict[str, Any]:
    """The [clean] table of sources.toml: length bounds, markup, boilerplate, contact scrubbing."""
    if not isinstance(table, dict):
        problems.append(f"{where}: key 'clean' must be a table ([clean]) (got {table!r}); fix it")
        table = {}
    clean = check(where, table, CLEAN_SCHEMA, problems, prefix="clean.")
    if clean["max_tokens"] < clean["min_tokens"]:
        problems.append(f"{where}: key 'clean.max_tokens' must be at least 1 and at least clean.min_tokens "
                        f"(got {clean['max_tokens']} < {clean['min_tokens']}); fix it")
    for pattern in clean["boilerplate"]:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"{where}: key 'clean.boilerplate' holds {pattern!r}, not a valid regular expression "
                            f"({exc}); fix it")
    for kind in clean["scrub_contacts"] if known_kinds is not None else []:
        if kind not in known_kinds:
            problems.append(f"{where}: key 'clean.scrub_contacts' names '{kind}', not a source kind "
                            f"({', '.join(sorted(known_kinds))}); fix it")
    return clean


HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+|[A-Za-z0-9][\w.\-]*")


def _base_model_problem(root: Path, where: str, spec: str) -> str | None:
    """What is wrong with `base_model`, found without the network: an unknown embedded name, a local
    folder that is missing or holds no weights, something that is none of the three forms."""
    if spec.startswith("embedded:"):
        from stages.base_model import EMBEDDED
        if spec.split(":", 1)[1] not in EMBEDDED:
            return (f"{where}: key 'base_model' is {spec!r}, not an embedded model "
                    f"({', '.join('embedded:' + n for n in EMBEDDED)}); fix the name")
    elif layout.is_local_model(spec):
        folder = root / Path(spec).expanduser()
        if not folder.is_dir():
            return (f"{where}: key 'base_model' names the folder {spec}, which does not exist; "
                    f"point it at a Hugging Face model folder, or use {DEFAULT_BASE_MODEL}")
        if not (folder / "model.safetensors").is_file():
            return (f"{where}: key 'base_model' names the folder {spec}, which has no model.safetensors; "
                    f"save the model there with save_pretrained(safe_serialization=True)")
    elif not HUB_ID_RE.fullmatch(spec):
        return (f"{where}: key 'base_model' is {spec!r}: not embedded:<name>, a local folder (/..., ./..., ../..., "
                f"~/...) or a hub id (org/name); fix it")
    return None


def _linear_names(root: Path, spec: str) -> set[str] | None:
    """The module paths of the base model's 2-D weights (what lora.targets can name: peft matches a target
    against a path's end), read from the safetensors header when the weights are on disk; the embedded
    model's known names; else None (not known before `doit base_model`)."""
    import json
    import struct

    weights = root / layout.base_weights(spec)
    try:
        with open(weights, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        return {name[:-len(".weight")] for name, t in header.items()
                if name.endswith(".weight") and isinstance(t, dict) and len(t.get("shape", ())) == 2}
    except (OSError, ValueError, struct.error, AttributeError):
        pass
    if spec.startswith("embedded:"):  # Llama-style (SmolLM2)
        return set(ALL_TARGETS) | {"lm_head", "embed_tokens"}
    return None


def load_adapter(root: Path, path: Path, problems: list[str]) -> AdapterConfig | None:
    where = f"{ADAPTERS_DIR}/{path.parent.name}/adapter.toml"
    doc = _read_toml(path, where, problems)
    if doc is None:
        return None
    name = path.parent.name
    if not NAME_RE.match(name):
        problems.append(f"{where}: adapter folder name '{name}' must be lowercase letters, digits, '_' or '-'; rename it")
    top = check(where, doc, ADAPTER_SCHEMA, problems)
    sections = {section: check(where, top[section], schema, problems, prefix=f"{section}.")
                for section, schema in SECTIONS.items()}
    preset = TRAIN_PRESETS.get(sections["train"]["preset"], {})
    sections["train"].update({k: v for k, v in preset.items() if k not in top["train"]})
    lora, data, export = sections["lora"], sections["data"], sections["export"]
    if "targets" in top["lora"] and not lora["targets"] and isinstance(top["lora"]["targets"], list):
        problems.append(f"{where}: key 'lora.targets' is empty; list the modules to adapt, or remove the key "
                        f"for the default ({', '.join(ALL_TARGETS)})")
    for key, bound in EXPORT_BOUNDS.items():
        for quant, value in export[key].items():
            if quant not in QUANT_TYPES + ("lora",):
                problems.append(f"{where}: key 'export.{key}.{quant}' names no quant type "
                                f"({', '.join(QUANT_TYPES + ('lora',))}); fix it")
                continue
            value, problem = check_value(where, f"export.{key}.{quant}", value, bound)
            if problem:
                problems.append(problem.replace(" must be a number", " must be a number >= 0", 1))
    # what the recipe names on disk must be there before anything runs
    base = top["base_model"]
    problem = _base_model_problem(root, where, base)
    if problem:
        problems.append(problem)
    else:
        paths = _linear_names(root, base)
        names = {p.rsplit(".", 1)[-1] for p in paths or ()}
        for target in lora["targets"] if paths else []:
            if not any(p == target or p.endswith("." + target) for p in paths):
                close = difflib.get_close_matches(target, sorted(names), n=1)
                problems.append(f"{where}: key 'lora.targets' lists '{target}', which the base model {base} has no "
                                f"layer named ({'did you mean ' + repr(close[0]) + '? ' if close else ''}it has: "
                                f"{', '.join(sorted(names))}); fix that item")
    frozen = data["frozen_test"]
    if frozen:
        frozen_path = root / Path(frozen).expanduser()
        if not frozen_path.is_file():
            problems.append(f"{where}: key 'data.frozen_test' names {frozen}, which "
                            f"{'is a folder' if frozen_path.is_dir() else 'does not exist'}; copy a test.jsonl (or a "
                            f"list of ids) there, or remove the key")
    return AdapterConfig(name=name, path=path.parent, base_model=base, description=top["description"], **sections)


def load(root: str | Path = ".") -> Config:
    root = Path(root).resolve()
    problems: list[str] = []
    sources, dedup = load_sources(root, problems, set(source_kinds.KINDS))  # load_sources imports the kinds it is given
    adapters = {}
    for path in sorted((root / ADAPTERS_DIR).glob("*/adapter.toml")):
        adapter = load_adapter(root, path, problems)
        if adapter is not None:
            adapters[adapter.name] = adapter
    if not adapters and not problems:
        problems.append(f"{ADAPTERS_DIR}/: no adapters found; create {ADAPTERS_DIR}/<name>/adapter.toml")
    for source in sources.values():
        for adapter in source.adapters:
            if adapter not in adapters and (root / ADAPTERS_DIR / adapter / "adapter.toml").exists():
                continue  # it exists but is broken: its own lines say why
            if adapter not in adapters:
                problems.append(f"{SOURCES_FILE}: key 'sources.{source.name}.adapters' names '{adapter}', but "
                                f"{ADAPTERS_DIR}/{adapter}/adapter.toml does not exist; create it or remove the name")
    for adapter in adapters.values():
        where = f"{ADAPTERS_DIR}/{adapter.name}/adapter.toml"
        for name in adapter.data["sources"]:
            if name not in sources:
                close = difflib.get_close_matches(name, list(sources), n=1)
                problems.append(f"{where}: key 'data.sources' names '{name}', which is not a [sources.<name>] block in "
                                f"{SOURCES_FILE}; {'did you mean ' + repr(close[0]) + '? ' if close else ''}fix the name")
        fed = [s for s in sources.values() if s.enabled and (adapter.name in s.adapters or s.name in adapter.data["sources"])]
        if sources and not fed and not dedup.get("routing_unsure"):
            problems.append(f"{where}: key 'data.sources': no enabled source feeds adapter '{adapter.name}'; list it in "
                            f"`adapters` of an enabled [sources.<name>] block in {SOURCES_FILE}, or name one here")
    if problems:
        raise ConfigError(problems)
    clean = dedup.pop("clean", {})
    dedup.pop("routing_unsure", None)
    return Config(root=root, sources=sources, adapters=adapters, dedup=dedup, clean=clean)
