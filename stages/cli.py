"""The `medforge` command: the dashboard by default, plus chat, parse and dedup.

Each subcommand lives with the stage it belongs to; this file only routes.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medforge", description="Medical LoRA adapters from public sources. "
                                     "With no command, opens the terminal dashboard.")
    sub = parser.add_subparsers(dest="command")

    chat = sub.add_parser("chat", help="answer a prompt with the base model or an adapter")
    chat.add_argument("prompt", nargs="?", help="the question; read from stdin when omitted")
    chat.add_argument("--adapter", default=None, help="adapter name (adapters/<name>/); omit for the base model")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--url", default=None, help="ask a running `medforge serve` (http://host:port) instead of "
                      "loading the model here; MEDFORGE_API_KEY is sent as its key (default: $MEDFORGE_SERVER_URL)")

    parse = sub.add_parser("parse", help="print the records a source extracts from one raw response file")
    parse.add_argument("source", help="a source name from sources.toml (or a source kind)")
    parse.add_argument("file", help="a raw response file (as stored under data/raw/<source>/pages/)")

    dedup = sub.add_parser("dedup", help="exact + near-duplicate removal on any JSONL with 'text' or 'messages'",
                           description="Runs the pipeline's dedup (exact + MinHash near-duplicates) on any JSONL whose "
                           "records have a 'text' string or a 'messages' list; writes the kept lines unchanged "
                           "(every field, 'id' included, in input order) and prints one JSON line: kept, removed, "
                           "clusters, seconds.")
    dedup.add_argument("input", help="input JSONL")
    dedup.add_argument("--out", required=True, help="output JSONL of kept records")
    dedup.add_argument("--threshold", type=float, default=0.8,
                       help="Jaccard similarity of word 5-shingles at which two records are near-duplicates (0.8)")

    sub.add_parser("serve", add_help=False,
                   help="one OpenAI-compatible server for the base and every exported adapter, the base loaded once: "
                   "[--host 127.0.0.1] [--port 8000] [--adapters a,b] (`medforge serve --help`)")
    dashboard = sub.add_parser("dashboard", help="open the terminal dashboard (the default)")
    for p in (parser, dashboard):
        p.add_argument("--url", default=None, help="the dashboard's chat asks a running `medforge serve` "
                       "(http://host:port) instead of loading models itself")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from stages.config import ConfigError
    from stages.errors import StageError

    try:
        if argv[:1] == ["serve"]:  # stages.serve parses its own arguments (and llama_cpp.server's, for one model)
            from stages.serve import main as serve
            return serve(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "chat":
            from stages.chat import chat_command
            return chat_command(args)
        if args.command == "parse":
            from stages.normalize import parse_command
            return parse_command(args)
        if args.command == "dedup":
            from stages.dedup import dedup_command
            return dedup_command(args)
        if args.url:  # the chat process (tui.chat_worker) inherits it
            from stages.chat import URL_ENV
            os.environ[URL_ENV] = args.url
        from tui.app import run_dashboard
        return run_dashboard()
    except (ConfigError, StageError) as exc:
        for line in exc.problems if isinstance(exc, ConfigError) else [str(exc)]:
            print(f"medforge: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
