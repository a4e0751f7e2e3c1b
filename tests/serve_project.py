"""A throwaway project for `medforge serve`: a base GGUF and N adapters' LoRA GGUFs (plus merged f16 GGUFs).

Shared by tests/test_serve.py (a tiny random base) and bench/serve_memory.py (any HF base folder,
e.g. the embedded SmolLM2-135M). The LoRAs are random peft adapters (tests.gguf_project.make_lora,
at the rank asked) converted by llama.cpp's own converter: no training, no verification.
"""
from __future__ import annotations

import os
from pathlib import Path

def build(root: Path, base: Path, adapters: list[str], r: int = 4, scale: float = 0.6,
          merged: tuple[str, ...] = ()) -> Path:
    """sources.toml, adapters/<name>/adapter.toml on `base`, data/gguf/<base>/base-f16.gguf and each adapter's
    out/gguf/lora-f16.gguf; for names in `merged`, also out/gguf/merged-f16.gguf. Returns root."""
    from stages import config, export, layout, llamacpp
    from tests.gguf_project import make_lora

    root.mkdir(parents=True, exist_ok=True)
    (root / "sources.toml").write_text(
        f'[sources.news2]\nkind = "news2"\nadapters = {adapters!r}\n[sources.news2.params]\ncount = 10\n'.replace("'", '"'))
    for stale in (root / "adapters").glob("*/adapter.toml"):  # a reused root (bench's cache) built for other names:
        if stale.parent.name not in adapters:                  # those are not adapters now (their GGUFs stay cached)
            stale.unlink()
    for name in adapters:
        folder = root / "adapters" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter.toml").write_text(f'base_model = "{base}"\n[lora]\nr = {r}\nalpha = {2 * r}\n'
                                             f'[export]\nmerged = []\n')
    old = os.getcwd()
    os.chdir(root)
    try:
        cfg = config.load(root)
        if not layout.base_gguf(str(base)).exists():
            export.run_base(cfg, str(base))
        for seed, name in enumerate(adapters, start=1):
            lora = layout.lora_dir(name)
            if not layout.lora_gguf(name).exists():
                make_lora(base, lora, seed=seed, r=r, scale=scale, base_tokenizer=True)
                layout.gguf_dir(name).mkdir(parents=True, exist_ok=True)
                llamacpp.convert_lora(lora, base, layout.lora_gguf(name), "f16")
            if name in merged and not layout.merged_gguf(name, "f16").exists():
                hf = root / "merged-hf" / name
                export.merge_lora(base, lora, hf, lora)
                llamacpp.convert_hf(hf, layout.merged_gguf(name, "f16"), "f16")
    finally:
        os.chdir(old)
    return root


def stop(proc, log) -> None:
    """End a server process started by a test or bench (terminate, then kill after 30 s) and close its log."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
