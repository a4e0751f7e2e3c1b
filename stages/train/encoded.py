"""A split's encoding (token ids, loss labels, full lengths), computed once and shared.

`lint:<adapter>` and `train:<adapter>` both need every training example encoded (about 1.5 min
for the 310k ICD-10-CM rows); retraining with a new learning rate needs it again. The encoding is
kept in data/cache/encoded/<adapter>/<split>.npz, keyed by everything it depends on: the split
file, the tokenizer's files, `max_length` and format.py's code. Any change re-encodes; a cache
that cannot be read is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from stages import io, layout, progress
from stages.train import format as fmt
from stages.train.inputs import iter_split

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


def cache_key(split_path: Path, base_dir: Path, max_length: int) -> str:
    h = hashlib.sha256(f"max_length={max_length}\n".encode())
    h.update(io.file_hash(split_path).encode())
    for name in TOKENIZER_FILES:
        path = Path(base_dir) / name
        h.update(f"{name}={io.file_hash(path) if path.exists() else '-'}\n".encode())
    h.update(Path(fmt.__file__).read_bytes())
    return h.hexdigest()


def encode_split(tokenizer, base_dir: Path, adapter: str, split: str, max_length: int,
                 rows: list[dict] | None = None) -> list[tuple[fmt.Encoded, int]]:
    """`format.encode_batch` of every row of the split, in file order, each with its length before truncation.

    `rows`: the split's rows when the caller has read them already (read here otherwise, on a cache miss only).
    """
    split_path = layout.split_file(adapter, split)
    if rows is None and not split_path.exists():
        iter_split(adapter, split)  # says which task to run
    cache = layout.encoded_cache(adapter, split)
    key = cache_key(split_path, base_dir, max_length)
    cached = _load(cache, key)
    if cached is not None:
        return cached
    out = []
    with progress.part("encoding", len(rows) if rows is not None else 0, "examples", f"{split} split"):
        for item in fmt.encode_stream(tokenizer, rows if rows is not None else iter_split(adapter, split), max_length):
            out.append(item)
            progress.advance()
    _save(cache, key, out)
    return out


def _save(cache: Path, key: str, encoded: list[tuple[fmt.Encoded, int]]) -> None:
    import numpy as np

    tasks = sorted({e.task for e, _ in encoded})
    index = {t: i for i, t in enumerate(tasks)}
    ids = np.fromiter((t for e, _ in encoded for t in e.input_ids), dtype=np.int32)
    labels = np.fromiter((t for e, _ in encoded for t in e.labels), dtype=np.int32)
    # a cache: losing it on a power cut costs one re-encode, so no fsync
    io.write_arrays(cache, key, durable=False, ids=ids, labels=labels,
                    lengths=np.array([len(e.input_ids) for e, _ in encoded], dtype=np.int64),
                    full=np.array([n for _, n in encoded], dtype=np.int64), tasks=np.array(tasks, dtype=str),
                    task=np.array([index[e.task] for e, _ in encoded], dtype=np.int32))


def _load(cache: Path, key: str) -> list[tuple[fmt.Encoded, int]] | None:
    import numpy as np

    data = io.read_arrays(cache, key)
    if data is None or not {"ids", "labels", "lengths", "full", "tasks", "task"} <= data.keys():
        return None  # none yet, unreadable, stale or from an older layout: re-encode
    ids, labels = data["ids"].tolist(), data["labels"].tolist()
    ends = np.cumsum(data["lengths"]).tolist()
    full, task, tasks = data["full"].tolist(), data["task"].tolist(), [str(t) for t in data["tasks"]]
    if len(ids) != len(labels) or (ends and ends[-1] != len(ids)):
        return None
    starts = [0, *ends[:-1]]
    return [(fmt.Encoded(ids[a:b], labels[a:b], tasks[t]), n) for a, b, n, t in zip(starts, ends, full, task)]
