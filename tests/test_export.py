"""GGUF export with llama.cpp's own converters: the vendored-converter cache, base/LoRA/merged
GGUFs of a tiny real Llama (SmolLM2 tokenizer) with a real peft LoRA, loaded in llama-cpp-python
and compared against transformers + peft logits.
Tests marked slow share one exported project (tests/gguf_project.py), about a minute to build per session.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from stages import export, layout, llamacpp
from stages.errors import StageError
from tests.gguf_project import ADAPTER, UNTRAINED, exported_project
from tests.models import smollm2_tokenizer

TEXT = "<|im_start|>user\nWhat is a NEWS2 score of 7?<|im_end|>\n<|im_start|>assistant\nUrgent review"


@pytest.fixture(scope="session")
def llama_src() -> Path:
    """The vendored converters, fetched once into the medforge cache (later runs reuse it)."""
    return llamacpp.source_dir()


@pytest.fixture()
def project(llama_src, monkeypatch):
    """The exported tiny project (built once per session), as the working directory."""
    from stages import config

    root = exported_project()
    monkeypatch.chdir(root)
    return config.load(root)


def hf_logits(base: Path, lora: Path | None, ids: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if lora is not None:
        model = PeftModel.from_pretrained(model, str(lora))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def gguf_logits(model: Path, lora: Path | None, ids: list[int]) -> np.ndarray:
    from stages import gguf

    llm = gguf.load(model, lora, n_ctx=128, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def test_converter_cache_matches_installed_version(llama_src):
    from importlib import metadata

    assert llama_src.name == f"llama.cpp-{metadata.version('llama-cpp-python')}"
    for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/gguf/gguf_writer.py"):
        assert (llama_src / name).is_file(), name
    # only the converters are kept, not the C++ sources of the whole sdist
    assert not (llama_src / "src").exists() and not (llama_src / "ggml").exists()
    assert llamacpp.source_dir() == llama_src  # cached: no second fetch


def test_offline_without_cache_names_the_fixes(tmp_path, monkeypatch):
    empty = tmp_path / "no-index"
    empty.mkdir()
    monkeypatch.setenv("MEDFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDFORGE_LLAMACPP_SRC", raising=False)
    # a registry that cannot be reached: pip sees no index and an empty local folder
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(StageError) as err:
        llamacpp.source_dir()
    message = str(err.value)
    assert "\n" not in message and "MEDFORGE_LLAMACPP_SRC" in message and str(llamacpp.cache_dir()) in message
    assert "PIP_FIND_LINKS" in message and "(ERROR: " in message  # pip's error, not its closing note
    assert not llamacpp.cache_dir().exists()


def test_offline_the_converters_come_from_the_sdist_in_the_wheelhouse(tmp_path, monkeypatch):
    """README "A machine without internet": pip reads only the carried wheelhouse. pip's own download of an sdist
    installs its build backend to read the metadata, which the wheelhouse does not hold: the sdist is taken as it
    is, and the cache holds its converters."""
    from importlib import metadata

    version = metadata.version("llama-cpp-python")
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    top = f"llama_cpp_python-{version}/vendor/llama.cpp"
    with tarfile.open(wheelhouse / f"llama_cpp_python-{version}.tar.gz", "w:gz") as tar:
        for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/gguf/__init__.py", "src/llama.cpp"):
            path = tmp_path / "member"
            path.write_text(f"# {name}\n")
            tar.add(path, f"{top}/{name}")
    monkeypatch.setenv("MEDFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDFORGE_LLAMACPP_SRC", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    src = llamacpp.source_dir()
    assert src == llamacpp.cache_dir(version)
    assert (src / "convert_hf_to_gguf.py").read_text() == "# convert_hf_to_gguf.py\n"
    assert (src / "gguf-py" / "gguf" / "__init__.py").is_file() and not (src / "src").exists()


def test_broken_sdist_leaves_no_half_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDFORGE_LLAMACPP_SRC", raising=False)
    sdist = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:  # gguf-py but no converter scripts
        readme = tmp_path / "README.md"
        readme.write_text("gguf")
        tar.add(readme, "llama_cpp_python-0.0.0/vendor/llama.cpp/gguf-py/README.md")
    monkeypatch.setattr(llamacpp, "_download_sdist", lambda version, into, target: sdist)
    with pytest.raises(StageError, match="MEDFORGE_LLAMACPP_SRC"):
        llamacpp.source_dir()
    assert not llamacpp.cache_dir().exists()


def test_src_env_var_points_at_an_unpacked_sdist(tmp_path, monkeypatch, llama_src):
    sdist = tmp_path / "llama_cpp_python-x"
    (sdist / "vendor").mkdir(parents=True)
    (sdist / "vendor" / "llama.cpp").symlink_to(llama_src)
    monkeypatch.setenv("MEDFORGE_LLAMACPP_SRC", str(sdist))
    assert llamacpp.source_dir() == sdist / "vendor" / "llama.cpp"
    monkeypatch.setenv("MEDFORGE_LLAMACPP_SRC", str(tmp_path))
    with pytest.raises(StageError, match="MEDFORGE_LLAMACPP_SRC"):
        llamacpp.source_dir()


@pytest.mark.slow
def test_exports_exist_and_load(project):
    base = project.adapters[ADAPTER].base_model
    targets = [layout.base_gguf(base), layout.lora_gguf(ADAPTER), layout.merged_gguf(ADAPTER, "q8_0")]
    for path in targets:
        assert path.is_file() and path.read_bytes()[:4] == b"GGUF", path
    assert not list(layout.out_dir(ADAPTER).glob(".*"))  # no temporaries left behind
    from gguf import GGUFReader

    for path in (layout.base_gguf(base), layout.merged_gguf(ADAPTER, "q8_0")):
        assert "tokenizer.chat_template" in GGUFReader(str(path)).fields, path  # chat uses the model's own template


@pytest.mark.slow
def test_lora_gguf_matches_hf_peft(project):
    base = Path(project.adapters[ADAPTER].base_model)
    ids = smollm2_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    hf_base, hf_lora = hf_logits(base, None, ids), hf_logits(base, layout.lora_dir(ADAPTER), ids)
    g_base = gguf_logits(layout.base_gguf(str(base)), None, ids)
    g_lora = gguf_logits(layout.base_gguf(str(base)), layout.lora_gguf(ADAPTER), ids)
    effect = np.abs(hf_lora - hf_base).max()
    assert np.abs(g_base - hf_base).max() < 0.02 * effect
    assert np.abs(g_lora - hf_lora).max() < 0.02 * effect  # f16 rounding only: far below what the LoRA does
    assert np.abs(g_lora - g_base).max() > 0.5 * effect
    assert (g_lora.argmax(-1) == hf_lora.argmax(-1)).mean() > 0.9


@pytest.mark.slow
def test_merged_q8_0_close_to_hf_peft(project):
    base = Path(project.adapters[ADAPTER].base_model)
    ids = smollm2_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    hf_lora, hf_base = hf_logits(base, layout.lora_dir(ADAPTER), ids), hf_logits(base, None, ids)
    merged = gguf_logits(layout.merged_gguf(ADAPTER, "q8_0"), None, ids)
    effect = np.abs(hf_lora - hf_base).max()
    # q8_0 rounding stays well below the adapter's own effect, and the top token mostly survives
    assert np.abs(merged - hf_lora).max() < 0.25 * effect
    assert (merged.argmax(-1) == hf_lora.argmax(-1)).mean() > 0.7


@pytest.mark.slow
def test_export_names_the_missing_input(project):
    with pytest.raises(StageError, match=f"doit train:{UNTRAINED}"):
        export.run(project, UNTRAINED)


@pytest.mark.slow
def test_quantize_by_name(project, tmp_path):
    src = layout.base_gguf(project.adapters[ADAPTER].base_model)
    out = tmp_path / "q4_0.gguf"
    llamacpp.quantize(src, out, "q4_0")
    assert 0 < out.stat().st_size < src.stat().st_size
    export.check_gguf(out)
    with pytest.raises(StageError, match="q3_x"):
        llamacpp.quantize(src, tmp_path / "bad.gguf", "q3_x")
