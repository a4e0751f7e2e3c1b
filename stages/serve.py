"""`medforge serve`: llama-cpp-python's OpenAI-compatible server, with medforge's safe llama.cpp settings.

`python -m llama_cpp.server` cannot take the setting that keeps quantized GGUFs from crashing on
some CPUs (stages.gguf: llama.cpp's extra buffer types), so this runs the same server in a process
where every model loads through those settings. Arguments are llama_cpp.server's own
(`--model`, `--lora_path`, `--chat_format`, `--host`, `--port`, ...); `--adapter NAME` stands for
the adapter's verified export, as `doit export:NAME` wrote it into verify.json.
"""
from __future__ import annotations

import sys


def adapter_args(adapter: str) -> list[str]:
    """llama_cpp.server arguments that serve `adapter`'s verified export (see export.serve_command)."""
    from stages import config, export, layout
    from stages.errors import StageError

    cfg = config.load()
    cfg.adapter(adapter)
    if not layout.verify_file(adapter).exists():
        raise StageError(f"{layout.verify_file(adapter)}: no verified export of '{adapter}' yet; "
                         f"build it first (`doit export:{adapter}`)")
    return export.serve_args(cfg, adapter)


def main(argv: list[str]) -> int:
    from stages import gguf

    if argv[:1] == ["--adapter"] and len(argv) >= 2:
        argv = adapter_args(argv[1]) + argv[2:]
    gguf.install()  # before the server builds its Llama()
    import llama_cpp.server.__main__ as server

    sys.argv = ["medforge serve", *argv]
    server.main()
    return 0
