"""Training keys: presets fill what the recipe leaves out; bad values name the file, key and fix."""
from __future__ import annotations

import pytest

from stages import config
from tests.test_config import problems, project


def adapter(train: str) -> str:
    return f'base_model = "embedded:smollm2-135m-instruct"\n[train]\n{train}\n'


def train_cfg(tmp_path, train: str) -> dict:
    return config.load(project(tmp_path, adapter=adapter(train))).adapters["decide"].train


def test_defaults_keep_packing_on_and_cadence_automatic(tmp_path):
    t = train_cfg(tmp_path, "lr = 1e-4")
    assert t["packing"] is True and t["eval_every"] == 0 and t["patience"] == 0 and t["resume"] is True
    assert t["gradient_checkpointing"] is False and t["optimizer"] == "auto" and t["preset"] == ""


@pytest.mark.parametrize("preset", sorted(config.TRAIN_PRESETS))
def test_a_preset_sets_steps_and_cadence(tmp_path, preset):
    t = train_cfg(tmp_path, f'preset = "{preset}"')
    for key, value in config.TRAIN_PRESETS[preset].items():
        assert t[key] == value


def test_the_recipe_overrides_its_preset(tmp_path):
    t = train_cfg(tmp_path, 'preset = "overnight"\npatience = 9\nepochs = 1')
    assert t["patience"] == 9 and t["epochs"] == 1 and t["eval_every"] == config.TRAIN_PRESETS["overnight"]["eval_every"]


@pytest.mark.parametrize("train, expected", [
    ('preset = "weekend"', "'train.preset' must be one of \"\", quick, overnight, full"),
    ('optimizer = "sgd"', r"'train.optimizer' must be one of auto, adamw, paged_adamw"),
    ("eval_every = -1", r"'train.eval_every' must be 0 or more"),
    ("patience = -2", r"'train.patience' must be 0 or more"),
    ("checkpoint_every = -5", r"'train.checkpoint_every' must be 0 or more"),
    ("keep_checkpoints = 0", r"'train.keep_checkpoints' must be at least 1"),
    ("max_truncated = 1.5", r"'train.max_truncated' must be a share between 0 and 1"),
    ('packing = "yes"', r"'train.packing' must be true or false"),
    ("gradient_checkpointing = 1", r"'train.gradient_checkpointing' must be true or false"),
    ("resume = 0", r"'train.resume' must be true or false"),
])
def test_bad_training_keys_name_file_key_and_fix(tmp_path, train, expected):
    found = problems(project(tmp_path, adapter=adapter(train)))
    assert any(p.startswith("adapters/decide/adapter.toml: ") and expected in p and "fix" in p for p in found), found
