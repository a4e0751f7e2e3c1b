"""Follow growing files without loading them: the last lines of a huge log, then only what is appended.

Pure file logic (no Textual), called from worker threads.
"""
from __future__ import annotations

import os
from pathlib import Path

import orjson

TAIL_BYTES = 256 * 1024  # what a first look at a log reads, at most


def as_shown(data: bytes) -> list[bytes]:
    """The lines of `data` (complete lines, split at "\\n" only) as a terminal shows them: within a line, a carriage
    return starts it over, so a progress bar that redraws itself ("\\r 10%\\r 50%\\r100%\\n", tqdm in a library's
    log) is its last drawing, one line, not one line per redraw."""
    return [line.rstrip(b"\r").rsplit(b"\r", 1)[-1] for line in data.split(b"\n")[:-1]]


def tail_lines(path: Path, count: int, max_bytes: int = TAIL_BYTES) -> tuple[list[str], int]:
    """The last `count` lines of `path` (reading at most `max_bytes` from its end) and the file size read up to."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            fh.seek(start)
            data = fh.read(size - start)
    except FileNotFoundError:
        return [], 0
    if start > 0:  # the first line is cut by the seek; drop it
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    end = data.rfind(b"\n") + 1  # keep a trailing partial line for the next read
    lines = [line.decode("utf-8", "replace") for line in as_shown(data[:end])]
    return lines[-count:], size - (len(data) - end)


class Follower:
    """Complete lines appended to a file since the last call; starts again if the file is replaced or truncated."""

    def __init__(self, path: Path, offset: int = 0):
        self.path = Path(path)
        self.offset = offset
        self._inode: int | None = None
        self.restarted = False  # the last read started the file over (callers drop what they had)

    def read_new(self, max_bytes: int = 4 << 20) -> list[bytes]:
        self.restarted = False
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.restarted = self.offset > 0
            self.offset, self._inode = 0, None
            return []
        if (self._inode is not None and st.st_ino != self._inode) or st.st_size < self.offset:
            self.offset, self.restarted = 0, True  # replaced (a re-run rewrote it) or truncated
        self._inode = st.st_ino
        if st.st_size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            if st.st_size - self.offset > max_bytes:  # fell far behind: skip to the newest part
                self.offset = st.st_size - max_bytes
                fh.seek(self.offset)
                fh.readline()
                self.offset = fh.tell()
            fh.seek(self.offset)
            data = fh.read(st.st_size - self.offset)
        end = data.rfind(b"\n") + 1
        self.offset += end
        return as_shown(data[:end])

    def read_json(self) -> list[dict]:
        rows = []
        for line in self.read_new():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn line from a killed writer; the next lines are still good
            if isinstance(row, dict):
                rows.append(row)
        return rows
