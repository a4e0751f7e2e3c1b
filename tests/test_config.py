"""Invalid configuration gets one line naming file, key and expected type; nothing runs."""
import subprocess
import sys
from pathlib import Path

import pytest

from stages import config

REPO = Path(__file__).resolve().parents[1]

SOURCES = """
[sources.news2]
kind = "news2"
adapters = ["decide"]
[sources.news2.params]
count = 50
"""
ADAPTER = """
base_model = "embedded:smollm2-135m-instruct"
[train]
lr = 1e-4
max_steps = 3
"""


def project(tmp_path: Path, sources: str = SOURCES, adapter: str = ADAPTER) -> Path:
    (tmp_path / "sources.toml").write_text(sources)
    (tmp_path / "adapters" / "decide").mkdir(parents=True)
    (tmp_path / "adapters" / "decide" / "adapter.toml").write_text(adapter)
    return tmp_path


def problems(tmp_path: Path) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.load(tmp_path)
    return info.value.problems


def test_valid_config_loads_with_defaults(tmp_path):
    cfg = config.load(project(tmp_path))
    assert list(cfg.sources) == ["news2"]
    decide = cfg.adapters["decide"]
    assert decide.train["lr"] == 1e-4 and decide.train["max_steps"] == 3
    assert decide.train["batch_size"] == 8  # default filled in
    assert decide.lora["r"] == 16
    assert cfg.sources_for("decide")[0].name == "news2"
    assert cfg.dedup["threshold"] == 0.8


def test_the_shipped_config_is_valid():
    cfg = config.load(REPO)
    assert {"clinical_coding", "clinical_decision"} <= set(cfg.adapters)
    assert {"icd10cm", "news2"} <= {s.name for s in cfg.enabled_sources()}


@pytest.mark.parametrize("adapter, expected", [
    ('[train]\nlr = "fast"\n', "adapters/decide/adapter.toml: key 'train.lr' must be a number (got 'fast')"),
    ("[train]\nbatch_size = 2.5\n", "key 'train.batch_size' must be an integer"),
    ("[train]\nbatch_size = 0\n", "key 'train.batch_size' must be at least 1"),
    ('[train]\nquantization = "int3"\n', "key 'train.quantization' must be one of none, nf4"),
    ("[lora]\nrank = 8\n", "unknown key 'lora.rank'"),
    ('[lora]\ntargets = "q_proj"\n', "key 'lora.targets' must be a list"),
    ('[export]\nmerged = ["q3_xyz"]\n', "key 'export.merged' lists 'q3_xyz'"),
    ("[train\nlr = 1\n", "adapters/decide/adapter.toml: not valid TOML"),
])
def test_bad_adapter_values_name_file_key_and_type(tmp_path, adapter, expected):
    found = problems(project(tmp_path, adapter=adapter))
    assert any(expected in line for line in found), found
    assert all("\n" not in line for line in found)


@pytest.mark.parametrize("sources, expected", [
    (SOURCES.replace('kind = "news2"', 'kind = "news3"'), "key 'sources.news2.kind' is 'news3', not a known source kind"),
    (SOURCES.replace('adapters = ["decide"]', 'adapters = ["nope"]'),
     "key 'sources.news2.adapters' names 'nope', but adapters/nope/adapter.toml does not exist"),
    (SOURCES.replace('kind = "news2"', 'kind = "news2"\nenabled = "yes"'), "key 'sources.news2.enabled' must be true or false"),
    (SOURCES.replace('kind = "news2"', 'kind = "news2"\nrefresh = "weekly"'), "key 'sources.news2.refresh' must be"),
    (SOURCES.replace('kind = "news2"\n', ''), "missing key 'sources.news2.kind'"),
    ("[dedup]\nthreshold = 1.5\n" + SOURCES, "key 'dedup.threshold' must be between 0 and 1"),
])
def test_bad_sources_name_file_key_and_fix(tmp_path, sources, expected):
    found = problems(project(tmp_path, sources=sources))
    assert any(line.startswith("sources.toml") and expected in line for line in found), found


def test_doit_refuses_to_run_with_invalid_config(tmp_path):
    root = project(tmp_path, adapter='[train]\nlr = "fast"\n')
    result = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "config error: adapters/decide/adapter.toml: key 'train.lr' must be a number" in result.stderr
    assert not (root / "data" / "raw").exists()  # nothing ran
