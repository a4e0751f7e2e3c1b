"""Load and validate `sources.toml` and `adapters/*/adapter.toml`.

Every problem becomes one line naming the file, the key, what was expected and what
to do; `load()` raises ConfigError carrying all of them, and nothing runs.
Importing this module is cheap (stdlib only): dodo.py imports it on every `doit`.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCES_FILE = "sources.toml"
ADAPTERS_DIR = "adapters"
DEFAULT_BASE_MODEL = "embedded:smollm2-135m-instruct"
REFRESH_RE = re.compile(r"^(never|\d+d)$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


class ConfigError(Exception):
    """One or more configuration problems, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --- a tiny schema: key -> (type(s), default); default REQUIRED means the key must be given
REQUIRED = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}


def _type_name(types: tuple) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _check(where: str, table: dict, schema: dict[str, tuple], problems: list[str], prefix: str = "") -> dict:
    """Validate `table` against `schema`, filling defaults; unknown keys are errors (typos)."""
    out: dict[str, Any] = {}
    for key in table:
        if key not in schema:
            known = ", ".join(sorted(schema))
            problems.append(f"{where}: unknown key '{prefix}{key}' (known keys: {known}); remove or rename it")
    for key, (types, default, *item) in schema.items():
        if key not in table:
            if default is REQUIRED:
                problems.append(f"{where}: missing key '{prefix}{key}' ({_type_name(types)}); add it")
            else:
                out[key] = default() if callable(default) else default
            continue
        value = table[key]
        # TOML has distinct int and float; accept an int where a number is wanted, never a bool.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            problems.append(f"{where}: key '{prefix}{key}' must be {_type_name(types)} (got {value!r}); fix its value")
            continue
        if item and isinstance(value, list):
            bad = [v for v in value if not isinstance(v, item[0])]
            if bad:
                problems.append(f"{where}: key '{prefix}{key}' must be a list of {_type_name((item[0],))} (got {bad[0]!r}); fix it")
                continue
        out[key] = value
    return out


SOURCE_SCHEMA = {
    "kind": ((str,), REQUIRED),
    "enabled": ((bool,), True),
    "adapters": ((list,), list, str),
    "refresh": ((str,), "never"),
    "mode": ((str,), "live"),
    "params": ((dict,), dict),
}
LORA_SCHEMA = {
    "r": ((int,), 16),
    "alpha": ((float,), 32.0),
    "dropout": ((float,), 0.05),
    "targets": ((list,), lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], str),
}
TRAIN_SCHEMA = {
    "backend": ((str,), "auto"),
    "quantization": ((str,), "none"),
    "lr": ((float,), 2e-4),
    "epochs": ((int,), 1),
    "max_steps": ((int,), 0),
    "batch_size": ((int,), 8),
    "grad_accum": ((int,), 1),
    "max_length": ((int,), 512),
    "warmup_ratio": ((float,), 0.05),
    "seed": ((int,), 0),
    "dtype": ((str,), "auto"),
    "preset": ((str,), ""),                   # quick | overnight | full: steps, eval and checkpoint cadence
    "eval_every": ((int,), 0),                # validation every N optimizer steps; 0 = four times a run
    "patience": ((int,), 0),                  # stop after N validations without a new best; 0 = never
    "packing": ((bool,), True),               # pack examples into rows (no attention across examples)
    "gradient_checkpointing": ((bool,), False),
    "checkpoint_every": ((int,), 0),          # resumable checkpoint every N steps; 0 = at each validation
    "keep_checkpoints": ((int,), 2),          # newest step checkpoints kept (each carries the best adapter)
    "resume": ((bool,), True),                # continue from the newest checkpoint of the same recipe and data
    "optimizer": ((str,), "auto"),            # adamw | paged_adamw (CUDA); auto = paged on CUDA
    "lint_examples": ((int,), 3),             # examples `lint:<adapter>` renders with trained tokens marked
    "max_truncated": ((float,), 0.05),        # lint fails when a larger share of examples is truncated
}
# what a preset sets; keys written in the recipe win
TRAIN_PRESETS = {
    "quick": {"max_steps": 60, "eval_every": 20, "checkpoint_every": 20, "patience": 0},
    "overnight": {"epochs": 3, "max_steps": 0, "eval_every": 200, "checkpoint_every": 200, "patience": 5},
    "full": {"epochs": 10, "max_steps": 0, "eval_every": 500, "checkpoint_every": 500, "patience": 4},
}
DATA_SCHEMA = {
    "tasks": ((list,), list, str),
    "max_examples": ((int,), 0),
    "sources": ((list,), list, str),           # more sources to draw from, besides those listing this adapter
    "keywords": ((list,), list, str),          # keep only records that mention one of these (words/phrases)
    "exclude_keywords": ((list,), list, str),  # drop records that mention any of these
    "frozen_test": ((str,), ""),               # a JSONL (e.g. an earlier test.jsonl) or id list: the fixed test set
}
EVAL_SCHEMA = {
    "max_examples": ((int,), 200),   # per test split, for perplexity and log-likelihood metrics
    "max_generate": ((int,), 12),    # per generation-scored task and split (greedy decoding is the slow part)
    "safety": ((bool,), True),       # run the safety suite (stages/safety.py) on base and adapter
}
EXPORT_SCHEMA = {
    "merged": ((list,), lambda: ["q8_0"], str),
    "verify_examples": ((int,), 8),  # held-out test conversations compared HF+peft vs GGUF, every position
    "max_kl": ((dict,), dict),       # per quant type (or "lora"): upper bound on mean KL(HF || GGUF)
    "min_top1": ((dict,), dict),     # per quant type (or "lora"): lower bound on top-1 agreement
}
DEDUP_SCHEMA = {
    "threshold": ((float,), 0.8),        # Jaccard similarity at which two examples are near-duplicates
    "num_perm": ((int,), 128),
    "shingle_words": ((int,), 5),
    "source_priority": ((list,), list, str),  # keeper of a cluster: earliest source listed here first
    "backend": ((str,), "memory"),       # where the LSH index lives: "memory" or "redis" (shared by workers)
    "redis_url": ((str,), "redis://127.0.0.1:6379/0"),
}
CLEAN_SCHEMA = {
    "min_tokens": ((int,), 4),            # whole example, in base-tokenizer tokens (or the word estimate)
    "max_tokens": ((int,), 8192),
    "strip_markup": ((bool,), True),
    "boilerplate": ((list,), list, str),  # extra regular expressions: a line matching one is removed
    "scrub_contacts": ((list,), lambda: ["stackexchange"], str),  # source kinds whose e-mails/phones are masked
}
ADAPTER_SCHEMA = {
    "base_model": ((str,), DEFAULT_BASE_MODEL),
    "description": ((str,), ""),
    "lora": ((dict,), dict),
    "train": ((dict,), dict),
    "data": ((dict,), dict),
    "eval": ((dict,), dict),
    "export": ((dict,), dict),
}
CHOICES = {
    ("train", "backend"): ("auto", "torch", "mlx"),
    ("train", "quantization"): ("none", "nf4"),
    ("train", "dtype"): ("auto", "bf16", "fp32"),
    ("train", "preset"): ("", "quick", "overnight", "full"),
    ("train", "optimizer"): ("auto", "adamw", "paged_adamw"),
}
DEDUP_BACKENDS = ("memory", "redis")
QUANT_TYPES = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


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
            from stages.errors import StageError
            raise StageError(f"unknown adapter '{name}': {ADAPTERS_DIR}/{name}/adapter.toml not found; known adapters: "
                             f"{', '.join(sorted(self.adapters)) or 'none'}")
        return self.adapters[name]

    def sources_for(self, adapter: str) -> list[SourceConfig]:
        """Sources that list the adapter, plus those its `data.sources` names."""
        extra = set(self.adapters[adapter].data.get("sources", [])) if adapter in self.adapters else set()
        return [s for s in self.enabled_sources() if adapter in s.adapters or s.name in extra]

    def base_models(self) -> list[str]:
        return sorted({a.base_model for a in self.adapters.values()})


def _read_toml(path: Path, problems: list[str]) -> dict | None:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path}: file not found; create it (see README.md, 'Configuration')")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{path}: not valid TOML ({exc}); fix the syntax")
    return None


def load_sources(root: Path, problems: list[str], known_kinds: set[str]) -> tuple[dict[str, SourceConfig], dict]:
    path = root / SOURCES_FILE
    doc = _read_toml(path, problems)
    if doc is None:
        return {}, {}
    where = SOURCES_FILE
    extra = set(doc) - {"sources", "dedup", "clean"}
    for key in sorted(extra):
        problems.append(f"{where}: unknown top-level key '{key}'; sources go under [sources.<name>], dedup settings "
                        f"under [dedup], cleaning under [clean]")
    dedup = _check(where, doc.get("dedup", {}) if isinstance(doc.get("dedup"), dict) else {}, DEDUP_SCHEMA,
                   problems, prefix="dedup.")
    if not 0.0 < dedup.get("threshold", 0.8) < 1.0:
        problems.append(f"{where}: key 'dedup.threshold' must be between 0 and 1 (got {dedup['threshold']}); fix it")
    if dedup.get("backend", "memory") not in DEDUP_BACKENDS:
        problems.append(f"{where}: key 'dedup.backend' must be one of {', '.join(DEDUP_BACKENDS)} "
                        f"(got {dedup['backend']!r}); fix it")
    if not str(dedup.get("redis_url", "redis://")).startswith(("redis://", "rediss://", "unix://")):
        problems.append(f"{where}: key 'dedup.redis_url' must look like redis://host:port/db "
                        f"(got {dedup['redis_url']!r}); fix it")
    if dedup.get("num_perm", 128) < 16:
        problems.append(f"{where}: key 'dedup.num_perm' must be at least 16 (got {dedup['num_perm']}); fix it")
    if dedup.get("shingle_words", 5) < 1:
        problems.append(f"{where}: key 'dedup.shingle_words' must be at least 1 (got {dedup['shingle_words']}); fix it")
    dedup["clean"] = load_clean(where, doc.get("clean", {}), problems)
    for kind in dedup["clean"].get("scrub_contacts", []):
        if kind not in known_kinds:
            problems.append(f"{where}: key 'clean.scrub_contacts' names '{kind}', not a source kind "
                            f"({', '.join(sorted(known_kinds))}); fix it")
    table = doc.get("sources", {})
    if not isinstance(table, dict) or not table:
        problems.append(f"{where}: no [sources.<name>] blocks; declare at least one source")
        return {}, dedup
    sources = {}
    for name, block in table.items():
        key = f"sources.{name}"
        if not NAME_RE.match(name):
            problems.append(f"{where}: source name '{name}' must be lowercase letters, digits, '_' or '-'; rename [{key}]")
            continue
        if not isinstance(block, dict):
            problems.append(f"{where}: '{key}' must be a table ([{key}]); fix it")
            continue
        values = _check(where, block, SOURCE_SCHEMA, problems, prefix=f"{key}.")
        if "kind" in values and values["kind"] not in known_kinds:
            problems.append(f"{where}: key '{key}.kind' is '{values['kind']}', not a known source kind "
                            f"({', '.join(sorted(known_kinds))}); fix it or add stages/sources/{values['kind']}.py")
        if not REFRESH_RE.match(values.get("refresh", "never")):
            problems.append(f"{where}: key '{key}.refresh' must be \"never\" or \"<N>d\" (got {values['refresh']!r}); fix it")
        if values.get("mode", "live") not in ("live", "mirror"):
            problems.append(f"{where}: key '{key}.mode' must be \"live\" or \"mirror\" (got {values['mode']!r}); fix it")
        if "kind" in values:
            sources[name] = SourceConfig(name=name, raw_block=block, **{k: values.get(k) for k in SOURCE_SCHEMA})
    return sources, dedup


def load_clean(where: str, table: Any, problems: list[str]) -> dict[str, Any]:
    """The [clean] table of sources.toml: length bounds, markup, boilerplate, contact scrubbing."""
    if not isinstance(table, dict):
        problems.append(f"{where}: 'clean' must be a table ([clean]); fix it")
        table = {}
    clean = _check(where, table, CLEAN_SCHEMA, problems, prefix="clean.")
    if clean.get("min_tokens", 0) < 0:
        problems.append(f"{where}: key 'clean.min_tokens' must be 0 or more (got {clean['min_tokens']}); fix it")
    if "max_tokens" in clean and clean["max_tokens"] < max(clean.get("min_tokens", 0), 1):
        problems.append(f"{where}: key 'clean.max_tokens' must be at least 1 and at least clean.min_tokens "
                        f"(got {clean['max_tokens']}); fix it")
    for pattern in clean.get("boilerplate", []):
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"{where}: key 'clean.boilerplate' holds {pattern!r}, not a valid regular expression "
                            f"({exc}); fix it")
    return clean


def load_adapter(root: Path, path: Path, problems: list[str]) -> AdapterConfig | None:
    doc = _read_toml(path, problems)
    if doc is None:
        return None
    where = f"{ADAPTERS_DIR}/{path.parent.name}/adapter.toml"
    name = path.parent.name
    if not NAME_RE.match(name):
        problems.append(f"{where}: adapter folder name '{name}' must be lowercase letters, digits, '_' or '-'; rename it")
    top = _check(where, doc, ADAPTER_SCHEMA, problems)
    sections = {}
    for section, schema in (("lora", LORA_SCHEMA), ("train", TRAIN_SCHEMA), ("data", DATA_SCHEMA),
                            ("eval", EVAL_SCHEMA), ("export", EXPORT_SCHEMA)):
        sections[section] = _check(where, top.get(section, {}) or {}, schema, problems, prefix=f"{section}.")
    for (section, key), choices in CHOICES.items():
        value = sections[section].get(key)
        if value is not None and value not in choices:
            problems.append(f"{where}: key '{section}.{key}' must be one of {', '.join(choices)} (got {value!r}); fix it")
    preset = TRAIN_PRESETS.get(sections["train"].get("preset", ""), {})
    written = top.get("train") if isinstance(top.get("train"), dict) else {}
    sections["train"].update({k: v for k, v in preset.items() if k not in written})
    for key in ("eval_every", "patience", "checkpoint_every", "max_steps"):
        value = sections["train"].get(key)
        if isinstance(value, int) and value < 0:
            problems.append(f"{where}: key 'train.{key}' must be 0 or more (got {value}); fix it")
    if not 0.0 <= sections["train"].get("max_truncated", 0.0) <= 1.0:
        problems.append(f"{where}: key 'train.max_truncated' must be a share between 0 and 1 "
                        f"(got {sections['train']['max_truncated']}); fix it")
    if sections["train"].get("keep_checkpoints", 1) < 1:
        problems.append(f"{where}: key 'train.keep_checkpoints' must be at least 1 "
                        f"(got {sections['train']['keep_checkpoints']}); fix it")
    for quant in sections["export"].get("merged", []):
        if quant not in QUANT_TYPES:
            problems.append(f"{where}: key 'export.merged' lists '{quant}', not one of {', '.join(QUANT_TYPES)}; fix it")
    for key in ("max_kl", "min_top1"):
        for quant, value in sections["export"].get(key, {}).items():
            if quant not in QUANT_TYPES + ("lora",):
                problems.append(f"{where}: key 'export.{key}.{quant}' names no quant type "
                                f"({', '.join(QUANT_TYPES + ('lora',))}); fix it")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"{where}: key 'export.{key}.{quant}' must be a number >= 0 (got {value!r}); fix it")
    for section, key in (("train", "batch_size"), ("train", "grad_accum"), ("train", "max_length"),
                         ("train", "epochs"), ("lora", "r"), ("export", "verify_examples")):
        value = sections[section].get(key)
        if isinstance(value, int) and value < 1:
            problems.append(f"{where}: key '{section}.{key}' must be at least 1 (got {value}); fix it")
    data = sections["data"]
    if isinstance(data.get("max_examples"), int) and data["max_examples"] < 0:
        problems.append(f"{where}: key 'data.max_examples' must be 0 (all) or more (got {data['max_examples']}); fix it")
    for key in ("keywords", "exclude_keywords"):
        for word in data.get(key, []):
            if not word.strip():
                problems.append(f"{where}: key 'data.{key}' holds an empty string; remove it")
    return AdapterConfig(name=name, path=path.parent, base_model=top.get("base_model", DEFAULT_BASE_MODEL),
                         description=top.get("description", ""), **sections)


def load(root: str | Path = ".") -> Config:
    from stages.sources import KINDS  # cheap: a dict of names, modules are imported lazily

    root = Path(root).resolve()
    problems: list[str] = []
    sources, dedup = load_sources(root, problems, set(KINDS))
    adapters = {}
    for path in sorted((root / ADAPTERS_DIR).glob("*/adapter.toml")):
        adapter = load_adapter(root, path, problems)
        if adapter is not None:
            adapters[adapter.name] = adapter
    if not adapters and not problems:
        problems.append(f"{ADAPTERS_DIR}/: no adapters found; create {ADAPTERS_DIR}/<name>/adapter.toml")
    for source in sources.values():
        for adapter in source.adapters:
            if adapter not in adapters:
                problems.append(f"{SOURCES_FILE}: key 'sources.{source.name}.adapters' names '{adapter}', but "
                                f"{ADAPTERS_DIR}/{adapter}/adapter.toml does not exist; create it or remove the name")
    for adapter in adapters.values():
        for name in adapter.data.get("sources", []):
            if name not in sources:
                problems.append(f"{ADAPTERS_DIR}/{adapter.name}/adapter.toml: key 'data.sources' names '{name}', "
                                f"which is not a [sources.<name>] block in {SOURCES_FILE}; fix the name")
    if problems:
        raise ConfigError(problems)
    clean = dedup.pop("clean", {})
    return Config(root=root, sources=sources, adapters=adapters, dedup=dedup, clean=clean)
