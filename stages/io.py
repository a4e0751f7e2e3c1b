"""The one place for file I/O: atomic writes, JSONL, content hashes.

Every target is written to a temporary sibling and renamed into place, so a task
killed mid-write never leaves a file (or folder) that looks finished.
"""
from __future__ import annotations

import contextlib
import filecmp
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; targets get the usual permissions


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces `target` in one rename.

    durable=False skips the fsyncs: still all-or-nothing, but a power cut may lose the write
    (for small state rewritten on every request, such as the daily request count). A caller that
    deletes the temporary file leaves `target` as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.exists():
            return
        if durable:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, target)
        if durable:
            _fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces the folder `target`.

    The old folder is moved aside first and removed after the swap, so at every
    instant `target` is either the complete old or the complete new folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(target: str | Path, data: bytes, durable: bool = True) -> bool:
    """Atomically write `data`; skip (and return False) when the file already holds it.

    Leaving identical content untouched keeps doit's checksums, and so dependents, quiet.
    """
    return write_chunks(target, [data], durable)


def write_chunks(target: str | Path, chunks: Iterable[bytes], durable: bool = True) -> bool:
    """write_bytes of the chunks joined, streamed: memory holds one chunk, not the file."""
    target = Path(target)
    with atomic_path(target, durable) as tmp:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        if target.is_file() and filecmp.cmp(tmp, target, shallow=False):
            tmp.unlink()
            return False
    return True


def write_text(target: str | Path, text: str) -> bool:
    return write_bytes(target, text.encode("utf-8"))


def dumps(obj: Any, indent: bool = False) -> bytes:
    option = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY
    if indent:
        option |= orjson.OPT_INDENT_2
    return orjson.dumps(obj, option=option)


def write_json(target: str | Path, obj: Any, durable: bool = True) -> bool:
    return write_bytes(target, dumps(obj, indent=True) + b"\n", durable)


def read_json(path: str | Path) -> Any:
    return orjson.loads(Path(path).read_bytes())


def jsonl_bytes(rows: Iterable[Any]) -> bytes:
    return b"".join(dumps(row) + b"\n" for row in rows)


def write_jsonl(target: str | Path, rows: Iterable[Any]) -> bool:
    return write_chunks(target, (dumps(row) + b"\n" for row in rows))


def read_jsonl(path: str | Path, fix: str = "fix or delete the line", error: type[Exception] = ValueError
               ) -> Iterator[Any]:
    """The rows of a JSONL file; a line that is not JSON raises `error`, one line naming the file, the line and `fix`."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise error(f"{path}:{lineno}: not valid JSON ({exc}); {fix}") from None


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append one line (used for live streams such as training metrics, not for targets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(dumps(row) + b"\n")
        fh.flush()


def content_hash(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_arrays(target: str | Path, key: str | None = None, durable: bool = True, **arrays) -> None:
    """Atomically write numpy `arrays` (an .npz cache), stamped with `key` when given."""
    import numpy as np

    if key is not None:
        arrays["key"] = np.array(key)
    with atomic_path(target, durable) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def read_arrays(path: str | Path, key: str | None = None) -> dict[str, Any] | None:
    """The arrays `write_arrays` wrote, all in memory; None when the file is missing, unreadable or
    stamped with another `key` (a cache that cannot be trusted is recomputed, never used)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            if key is not None and ("key" not in data.files or str(data["key"]) != key):
                return None
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None
