"""Refresh the README's screenshots: docs/screens/<view>.svg, one per view, at 100x30.

The scene is the one the SVG snapshot tests pin (tests/tui_support.py: a tiny project with
fixed reports and a fixed memory reading, a `doit run --continue` going on with tasks done,
running, failed and waiting, and base vs adapter answering side by side), so a re-run gives
the same files unless a view changed. Usage: python bench/screens.py [--size 100x30] [--out docs/screens] [view ...]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from stages import io  # noqa: E402
from tui_support import SCENE_READY, scene_app, scene_project, scene_ready  # noqa: E402


async def capture(root: Path, view: str, size: tuple[int, int]) -> str:
    app = scene_app(root, view)
    async with app.run_test(size=size) as pilot:
        await scene_ready(app, pilot, view)
        return app.export_screenshot(title=f"medforge · {view}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("views", nargs="*", default=list(SCENE_READY), help=f"any of {', '.join(SCENE_READY)}")
    parser.add_argument("--size", default="100x30", help="COLSxROWS")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screens")
    args = parser.parse_args()
    unknown = set(args.views) - set(SCENE_READY)
    if unknown:
        parser.error(f"unknown view(s): {', '.join(sorted(unknown))}")
    cols, rows = (int(n) for n in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medforge-screens-") as tmp:
        root = scene_project(Path(tmp) / "proj")
        os.chdir(root)  # stages resolve paths against the working directory
        for view in args.views:
            svg = asyncio.run(capture(root, view, (cols, rows)))
            path = args.out / f"{view}.svg"
            io.write_text(path, svg)
            print(f"wrote {path} ({cols}x{rows})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
