"""One schema for every setting (issue 14): malformed configurations, table-driven.

Each case breaks one thing in a valid project (sources.toml or adapters/decide/adapter.toml, or what
they name on disk). `config.load` must refuse it with exactly one line that starts with the file and
names the full dotted key, says what was expected and the fix; `doit` must print that same line and
stop before any task runs: no traceback, `data/` exactly as it was.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import config, schema
from stages.sources import KINDS, load as load_kind

REPO = Path(__file__).resolve().parents[1]
SOURCES = "sources.toml"
ADAPTER = "adapters/decide/adapter.toml"

BASE_SOURCES = """\
[dedup]
threshold = 0.8
source_priority = ["news2"]

[clean]
min_tokens = 4

[sources.news2]
kind = "news2"
adapters = ["decide"]
[sources.news2.params]
count = 50
seed = 7

[sources.papers]
kind = "pubmed"
enabled = false
adapters = []
refresh = "30d"
[sources.papers.params]
term = "sepsis"
mindate = "2023/01/01"
maxdate = "2023/12/31"
max_records = 10
"""
BASE_ADAPTER = """\
base_model = "embedded:smollm2-135m-instruct"
description = "a test adapter"

[lora]
r = 8
alpha = 16
dropout = 0.05
targets = ["q_proj", "v_proj"]

[train]
lr = 1e-4
max_steps = 3
warmup_ratio = 0.1

[data]
tasks = []

[eval]
max_examples = 10

[export]
merged = ["q8_0"]
"""


def project(root: Path, sources: str = BASE_SOURCES, adapter: str = BASE_ADAPTER) -> Path:
    (root / "adapters" / "decide").mkdir(parents=True, exist_ok=True)
    (root / SOURCES).write_text(sources, encoding="utf-8")
    (root / ADAPTER).write_text(adapter, encoding="utf-8")
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)  # an earlier run's data: must stay as it is
    (root / "data" / "raw" / "marker.txt").write_text("earlier run\n")
    return root


# --- edits: each returns a function that breaks a fresh project
def sub(file: str, old: str, new: str):
    def edit(root: Path) -> None:
        text = (root / file).read_text(encoding="utf-8")
        assert old in text, (file, old)
        (root / file).write_text(text.replace(old, new, 1), encoding="utf-8")
    return edit


def after(file: str, header: str, line: str):
    return sub(file, header + "\n", f"{header}\n{line}\n")


def _append(file: str, text: str):
    def edit(root: Path) -> None:
        with open(root / file, "a", encoding="utf-8") as fh:
            fh.write("\n" + text + "\n")
    return edit


def both(*edits):
    def edit(root: Path) -> None:
        for e in edits:
            e(root)
    return edit


def raw_bytes(file: str, data: bytes):
    def edit(root: Path) -> None:
        (root / file).write_bytes(data)
    return edit


def folder_instead(file: str):
    def edit(root: Path) -> None:
        (root / file).unlink()
        (root / file).mkdir()
    return edit


def mkdir(path: str):
    def edit(root: Path) -> None:
        (root / path).mkdir(parents=True)
    return edit


def fake_base(path: str, modules=("q_proj", "k_proj", "v_proj", "o_proj")):
    """A local base folder whose model.safetensors holds only a header: the layers lora.targets is checked against."""
    def edit(root: Path) -> None:
        import json
        import struct

        folder = root / path
        folder.mkdir(parents=True)
        header = {f"model.layers.0.self_attn.{m}.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
                  for m in modules}
        header["model.norm.weight"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
        blob = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(64))
    return edit


S, A = SOURCES, ADAPTER
# (id, edit, file the line must start with, dotted key it must name (None: a file-level problem), text it must hold)
CASES = [
    # --- unknown keys, at every level
    ("unknown top-level table", _append(S, "[dedupe]\nthreshold = 0.5"), S, "dedupe", "did you mean 'dedup'?"),
    ("unknown dedup key", after(S, "[dedup]", "treshold = 0.7"), S, "dedup.treshold", "did you mean 'threshold'?"),
    ("unknown clean key", after(S, "[clean]", "min_token = 3"), S, "clean.min_token", "did you mean 'min_tokens'?"),
    ("unknown source key", after(S, "[sources.news2]", "enable = true"), S, "sources.news2.enable", "did you mean 'enabled'?"),
    ("typo in a disabled source's params", after(S, "[sources.papers.params]", "max_recrods = 10"), S,
     "sources.papers.params.max_recrods", "did you mean 'max_records'?"),
    ("unknown param of an enabled source", after(S, "[sources.news2.params]", "cuont = 3"), S,
     "sources.news2.params.cuont", "did you mean 'count'?"),
    ("unknown adapter top-level key", sub(A, "base_model =", "base_modle ="), A, "base_modle", "did you mean 'base_model'?"),
    ("unknown lora key", after(A, "[lora]", "rank = 8"), A, "lora.rank", "unknown key"),
    ("unknown train key", after(A, "[train]", "learning_rate = 1e-4"), A, "train.learning_rate", "unknown key"),
    ("unknown data key", after(A, "[data]", "keyword = [\"x\"]"), A, "data.keyword", "did you mean 'keywords'?"),
    ("unknown eval key", after(A, "[eval]", "max_example = 5"), A, "eval.max_example", "did you mean 'max_examples'?"),
    ("unknown export key", after(A, "[export]", "merge = [\"q8_0\"]"), A, "export.merge", "did you mean 'merged'?"),
    # --- wrong types
    ("adapters as a string", sub(S, 'adapters = ["decide"]', 'adapters = "decide"'), S, "sources.news2.adapters",
     "must be a list (got 'decide')"),
    ("enabled as a string", after(S, "[sources.news2]", 'enabled = "yes"'), S, "sources.news2.enabled", "must be true or false"),
    ("param as a string", sub(S, "count = 50", 'count = "fifty"'), S, "sources.news2.params.count",
     "must be an integer (got 'fifty')"),
    ("bool where an integer belongs", sub(S, "seed = 7", "seed = true"), S, "sources.news2.params.seed", "must be an integer"),
    ("params not a table", sub(S, "[sources.news2.params]\ncount = 50\nseed = 7\n", "params = 3\n"), S,
     "sources.news2.params", "must be a table"),
    ("lr as a string", sub(A, "lr = 1e-4", 'lr = "fast"'), A, "train.lr", "must be a number (got 'fast')"),
    ("batch_size as a float", after(A, "[train]", "batch_size = 2.5"), A, "train.batch_size", "must be an integer"),
    ("a table given a value", both(sub(A, "[eval]\nmax_examples = 10\n", ""), sub(A, "description =", "eval = 3\ndescription =")),
     A, "eval", "must be a table"),
    ("keywords as a string", after(A, "[data]", 'keywords = "sepsis"'), A, "data.keywords", "must be a list"),
    ("list of wrong items", after(A, "[data]", "exclude_keywords = [3]"), A, "data.exclude_keywords", "list of strings"),
    ("clean.max_tokens as a string", after(S, "[clean]", 'max_tokens = "many"'), S, "clean.max_tokens", "must be an integer"),
    # --- out of range
    ("negative max_records", sub(S, "max_records = 10", "max_records = -3"), S, "sources.papers.params.max_records",
     "must be 0 (all) or more (got -3)"),
    ("zero count", sub(S, "count = 50", "count = 0"), S, "sources.news2.params.count", "must be at least 1"),
    ("negative retries (the HTTP client's key)", after(S, "[sources.papers.params]", "retries = -1"), S,
     "sources.papers.params.retries", "must be 0 or more"),
    ("lr of zero", sub(A, "lr = 1e-4", "lr = 0"), A, "train.lr", "greater than 0"),
    ("negative lr", sub(A, "lr = 1e-4", "lr = -1e-4"), A, "train.lr", "greater than 0"),
    ("dropout above 1", sub(A, "dropout = 0.05", "dropout = 1.5"), A, "lora.dropout", "less than 1"),
    ("warmup_ratio of 2", sub(A, "warmup_ratio = 0.1", "warmup_ratio = 2"), A, "train.warmup_ratio", "a share between 0 and 1"),
    ("negative eval.max_examples", sub(A, "max_examples = 10", "max_examples = -1"), A, "eval.max_examples",
     "0 (all) or more"),
    ("zero lora.r", sub(A, "r = 8", "r = 0"), A, "lora.r", "at least 1"),
    ("negative max_steps", sub(A, "max_steps = 3", "max_steps = -1"), A, "train.max_steps", "or more"),
    ("dedup.threshold above 1", sub(S, "threshold = 0.8", "threshold = 1.5"), S, "dedup.threshold", "between 0 and 1"),
    ("dedup.num_perm too small", after(S, "[dedup]", "num_perm = 8"), S, "dedup.num_perm", "at least 16"),
    ("min_top1 above 1", _append(A, "[export.min_top1]\nq8_0 = 1.5"), A, "export.min_top1.q8_0", "between 0 and 1"),
    ("max_tokens below min_tokens", after(S, "[clean]", "max_tokens = 2"), S, "clean.max_tokens", "at least clean.min_tokens"),
    # --- bad choices and forms
    ("quantization int4", after(A, "[train]", 'quantization = "int4"'), A, "train.quantization", "one of none, nf4"),
    ("preset weekend", after(A, "[train]", 'preset = "weekend"'), A, "train.preset", "one of"),
    ("misspelled LoRA target", sub(A, '"v_proj"]', '"v_prj"]'), A, "lora.targets", "did you mean 'v_proj'?"),
    ("unknown quant type", sub(A, 'merged = ["q8_0"]', 'merged = ["q3_xyz"]'), A, "export.merged", "lists 'q3_xyz'"),
    ("max_kl for no quant type", _append(A, "[export.max_kl]\nq9 = 0.1"), A, "export.max_kl.q9", "names no quant type"),
    ("pubmed datetype", after(S, "[sources.papers.params]", 'datetype = "pubdate"'), S, "sources.papers.params.datetype",
     "one of pdat, edat, mdat"),
    ("pubmed date form", sub(S, 'mindate = "2023/01/01"', 'mindate = "2023-01-01"'), S, "sources.papers.params.mindate",
     'a date "YYYY/MM/DD"'),
    ("base_url not a URL", after(S, "[sources.papers.params]", 'base_url = "ftp://mirror"'), S,
     "sources.papers.params.base_url", "http:// or https://"),
    ("refresh weekly", sub(S, 'refresh = "30d"', 'refresh = "weekly"'), S, "sources.papers.refresh", '"never" or "<N>d"'),
    ("mode offline", after(S, "[sources.news2]", 'mode = "offline"'), S, "sources.news2.mode", "one of live, mirror"),
    ("unknown source kind", sub(S, 'kind = "pubmed"', 'kind = "pubmde"'), S, "sources.papers.kind", "did you mean 'pubmed'?"),
    ("dedup engine", after(S, "[dedup]", 'engine = "cassandra"'), S, "dedup.engine", "one of local, ray"),
    ("dedup address form", after(S, "[dedup]", 'address = "localhost"'), S, "dedup.address", "host:6379"),
    ("dedup backend is gone", after(S, "[dedup]", 'backend = "redis"'), S, "dedup.backend", 'use engine = "local", or engine = "ray"'),
    ("scrub_contacts names no kind", after(S, "[clean]", 'scrub_contacts = ["reddit"]'), S, "clean.scrub_contacts",
     "not a source kind"),
    ("boilerplate not a regex", after(S, "[clean]", 'boilerplate = ["(unclosed"]'), S, "clean.boilerplate",
     "not a valid regular expression"),
    ("embedded model unknown", sub(A, "embedded:smollm2-135m-instruct", "embedded:gpt5"), A, "base_model",
     "not an embedded model"),
    ("base_model of no known form", sub(A, "embedded:smollm2-135m-instruct", "embeded:smollm2"), A, "base_model",
     "hub id"),
    ("invalid source name", both(sub(S, "[sources.papers]\n", "[sources.Papers]\n"),
                                 sub(S, "[sources.papers.params]", "[sources.Papers.params]")), S, "sources.Papers", "lowercase"),
    # --- missing required
    ("missing kind", sub(S, 'kind = "news2"\n', ""), S, "sources.news2.kind", "missing key"),
    ("empty base_model", sub(A, 'base_model = "embedded:smollm2-135m-instruct"', 'base_model = ""'), A, "base_model",
     "is empty"),
    ("enabled pubmed with no term", both(sub(S, "enabled = false\n", ""), sub(S, 'term = "sepsis"', 'term = ""')), S,
     "sources.papers.params.term", "is empty"),
    # --- cross-references
    ("dangling source -> adapter", sub(S, 'adapters = ["decide"]', 'adapters = ["decide", "nope"]'), S,
     "sources.news2.adapters", "adapters/nope/adapter.toml does not exist"),
    ("dangling adapter -> source", after(A, "[data]", 'sources = ["newz2"]'), A, "data.sources", "did you mean 'news2'?"),
    ("no enabled source feeds the adapter", sub(S, 'adapters = ["decide"]', "adapters = []"), A, "data.sources",
     "no enabled source feeds adapter 'decide'"),
    ("source_priority names no source", sub(S, 'source_priority = ["news2"]', 'source_priority = ["news2", "nope"]'), S,
     "dedup.source_priority", "names 'nope'"),
    ("missing base model folder", sub(A, "embedded:smollm2-135m-instruct", "./models/missing"), A, "base_model",
     "does not exist"),
    ("base model folder without weights", both(mkdir("models/empty"), sub(A, "embedded:smollm2-135m-instruct",
                                                                           "./models/empty")), A, "base_model",
     "no model.safetensors"),
    ("LoRA target the local base lacks", both(fake_base("models/tiny", ("q_proj", "k_proj", "o_proj")),
                                              sub(A, "embedded:smollm2-135m-instruct", "./models/tiny")), A,
     "lora.targets", "lists 'v_proj', which the base model ./models/tiny has no layer named"),
    ("missing frozen_test file", after(A, "[data]", 'frozen_test = "frozen/test.jsonl"'), A, "data.frozen_test",
     "does not exist"),
    ("frozen_test is a folder", both(mkdir("frozen"), after(A, "[data]", 'frozen_test = "frozen"')), A, "data.frozen_test",
     "is a folder"),
    ("enabled drugbank with a missing file", _append(S, '[sources.db]\nkind = "drugbank"\n[sources.db.params]\n'
                                                      'path = "downloads/full_database.xml"'), S, "sources.db.params.path",
     "does not exist"),
    ("enabled local source with no paths", _append(S, '[sources.mine]\nkind = "local_files"\n[sources.mine.params]\n'
                                                     "paths = []"), S, "sources.mine.params.paths", "is empty"),
    ("pubmed dates backwards", both(sub(S, "enabled = false\n", ""), sub(S, 'maxdate = "2023/12/31"',
                                                                          'maxdate = "2022/12/31"')), S,
     "sources.papers.params.maxdate", "before mindate"),
    # --- duplicates
    ("duplicate source block", _append(S, '[sources.news2]\nkind = "news2"'), S, "sources.news2", "declared twice"),
    ("duplicate key in a table", sub(S, "count = 50\n", "count = 50\ncount = 60\n"), S, "sources.news2.params.count",
     "set twice"),
    ("duplicate adapter in a source", sub(S, 'adapters = ["decide"]', 'adapters = ["decide", "decide"]'), S,
     "sources.news2.adapters", "lists 'decide' twice"),
    ("duplicate quant type", sub(A, 'merged = ["q8_0"]', 'merged = ["q8_0", "q8_0"]'), A, "export.merged", "twice"),
    ("duplicate LoRA target", sub(A, '"v_proj"]', '"v_proj", "q_proj"]'), A, "lora.targets", "lists 'q_proj' twice"),
    # --- files that are not TOML text
    ("sources.toml not UTF-8", raw_bytes(S, BASE_SOURCES.encode().replace(b"sepsis", b"s\xe9psis")), S, None, "not UTF-8"),
    ("adapter.toml not UTF-8", raw_bytes(A, b"description = \"caf\xe9\"\n"), A, None, "not UTF-8"),
    ("sources.toml is a folder", folder_instead(S), S, None, "is a folder"),
    ("adapter.toml is a folder", folder_instead(A), A, None, "is a folder"),
    ("a source block given a value", sub(S, '[sources.news2]\nkind = "news2"\nadapters = ["decide"]\n[sources.news2.params]\n'
                                            'count = 50\nseed = 7\n', "[sources]\nnews2 = 3\n"), S, "sources.news2",
     "must be a table"),
    ("adapter.toml syntax", sub(A, "[train]", "[train"), A, None, "not valid TOML at line"),
]
IDS = [case[0] for case in CASES]


def test_the_table_is_large_and_the_base_project_is_valid(tmp_path):
    assert len(CASES) >= 40 and len(set(IDS)) == len(IDS)
    cfg = config.load(project(tmp_path))
    assert set(cfg.sources) == {"news2", "papers"} and cfg.adapters["decide"].lora["targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_refused_at_load_with_one_line_naming_file_and_key(tmp_path, case):
    _, edit, file, key, text = case
    root = project(tmp_path)
    edit(root)
    with pytest.raises(config.ConfigError) as info:
        config.load(root)
    lines = info.value.problems
    assert len(lines) == 1, lines  # one fault, one line: no follow-on noise
    line = lines[0]
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"{file}: "), line
    if key is not None:
        assert f"key '{key}'" in line, line
    if text is not None:
        assert text in line, line
    assert "; " in line  # ... then what to do


def _snapshot(root: Path) -> dict[str, bytes]:
    data = root / "data"
    return {str(p.relative_to(data)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(data.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_doit_refuses_before_anything_runs(tmp_path, case):
    _, edit, file, key, text = case
    root = project(tmp_path)
    edit(root)
    before = _snapshot(root)
    (line,) = config_problems(root)
    result = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [f"config error: {line}"]
    assert _snapshot(root) == before  # nothing ran: data/ holds exactly what it held


def config_problems(root: Path) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.load(root)
    return info.value.problems


def test_doit_list_a_stage_and_medforge_refuse_with_the_same_line(tmp_path):
    root = project(tmp_path)
    after(S, "[sources.news2.params]", "cuont = 3")(root)
    expected = ("sources.toml: unknown key 'sources.news2.params.cuont' (did you mean 'count'? known keys: count, seed); "
                "rename or remove it")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    listed = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root), "list"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode != 0 and listed.stderr.strip() == f"config error: {expected}"
    stage = subprocess.run([sys.executable, "-m", "stages", "scrape", "news2"], cwd=root, capture_output=True, text=True,
                           timeout=120, env=env)
    assert stage.returncode == 2 and "Traceback" not in stage.stderr
    assert stage.stderr.strip() == f"[scrape:news2] failed: {expected}"
    assert not (root / "data" / "raw" / "news2").exists()
    chat = subprocess.run([sys.executable, "-m", "stages.cli", "chat", "--adapter", "decide", "hi"], cwd=root,
                          capture_output=True, text=True, timeout=120, env=env)
    assert chat.returncode == 2 and chat.stderr.strip() == f"medforge: {expected}"


def test_medforge_prefixes_every_problem_line(tmp_path):
    root = project(tmp_path)
    after(S, "[sources.news2.params]", "cuont = 3\nsede = 1")(root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    chat = subprocess.run([sys.executable, "-m", "stages.cli", "chat", "--adapter", "decide", "hi"], cwd=root,
                          capture_output=True, text=True, timeout=120, env=env)
    lines = chat.stderr.strip().splitlines()
    assert chat.returncode == 2 and len(lines) == 2, chat.stderr
    assert all(line.startswith("medforge: sources.toml: unknown key 'sources.news2.params.") for line in lines)


def test_a_fresh_clone_with_a_bad_config_gets_no_data_folder(tmp_path):
    root = project(tmp_path)
    shutil.rmtree(root / "data")  # a fresh clone: no data/ yet
    after(S, "[sources.news2.params]", "cuont = 3")(root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for command in (["list"], []):
        run = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root), *command],
                             capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode != 0 and run.stderr.strip().startswith("config error: sources.toml: unknown key")
    assert not (root / "data").exists()


# --- every source declares its params as data, and reads them through it
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_source_declares_its_params(kind):
    cls = load_kind(kind)
    assert cls.PARAMS, f"stages/sources/{kind}.py declares no PARAMS"
    for name, key in cls.schema().items():
        assert isinstance(key, schema.Key), (kind, name)
        if not key.required:  # every default passes its own key
            value, problem = schema.check_value(SOURCES, f"sources.x.params.{name}", key.make_default(), key)
            assert problem is None, problem
    text = (REPO / "stages" / "sources" / f"{kind}.py").read_text()
    import re
    read = set(re.findall(r'self\.param\("([a-z_]+)"\)', text))
    assert read <= set(cls.schema()), f"{kind} reads undeclared params: {read - set(cls.schema())}"


def test_param_reads_the_declared_default_and_refuses_a_bad_value():
    from stages.sources import SourceError, make

    source = make("pm", "pubmed", {"batch": 50})
    assert source.param("batch") == 50 and source.param("query_cap") == 10_000 and source.param("rate") == 0.0
    with pytest.raises(SourceError, match=r"^sources.toml: key 'sources.bad.params.batch' must be between 1 and 10000"):
        make("bad", "pubmed", {"batch": 0}).param("batch")


def test_lora_targets_may_name_a_path_end_of_the_local_base(tmp_path):
    root = project(tmp_path, adapter=BASE_ADAPTER.replace("embedded:smollm2-135m-instruct", "./models/tiny")
                   .replace('"v_proj"]', '"self_attn.v_proj"]'))
    fake_base("models/tiny")(root)
    assert config.load(root).adapters["decide"].lora["targets"] == ["q_proj", "self_attn.v_proj"]


def test_params_stay_as_written_so_nothing_reruns_after_an_upgrade(tmp_path):
    """doit's config_changed hashes a source's params: validation fills no defaults into them."""
    cfg = config.load(project(tmp_path))
    assert cfg.sources["news2"].params == {"count": 50, "seed": 7}
    assert cfg.sources["papers"].params == {"term": "sepsis", "mindate": "2023/01/01", "maxdate": "2023/12/31",
                                            "max_records": 10}


def test_the_shipped_configuration_is_valid():
    cfg = config.load(REPO)
    assert {"clinical_coding", "clinical_decision"} <= set(cfg.adapters)
