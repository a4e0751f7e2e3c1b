"""dedup — exact and near-duplicate removal across every enabled source.

Staged like datatrove's MinHash: fingerprints (normalized-text digest + MinHash
signature) -> LSH candidate pairs -> verified pairs -> union-find clusters -> one
keeper per cluster. Fingerprints are cached per source, keyed by the content hash of
its examples file, so a change to one source re-hashes only that source.

Signatures are computed with numpy over all word shingles of many documents at
once: words are hashed once each (xxhash), shingle hashes are combined from word
hashes in vectorised steps, and the MinHash permutations are applied to the whole
shingle matrix. The permutations are datasketch's "affine32" kind: a*h + b in
uint32 with a odd (a bijection, so no added collisions), on well-mixed 32-bit
shingle hashes; a modulo-prime family costs 8x more here for no gain on short texts.

Outputs: data/dedup/kept.jsonl (kept examples, each with a `cluster` key: the source
record it came from, so every question about one record lands in one split) and
data/dedup/report.json. `medforge dedup` runs the same code on any JSONL.
"""
from __future__ import annotations

import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from stages import io, layout
from stages.errors import StageError

SIGNATURE_VERSION = 1     # bump when normalization or hashing changes: old caches are ignored
MINHASH_SEED = 1
MAX_HASH = np.uint32((1 << 32) - 1)
SHINGLES_PER_BATCH = 65_536  # x num_perm x 4 bytes: bounds the memory of one batch
WORD_RE = re.compile(r"\w+")
REPORT_CLUSTERS = 10
LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative) weights for choosing LSH bands


# --- normalization and fingerprints
def normalize_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def example_text(row: dict[str, Any]) -> str:
    """What two examples are compared on: `text`, or the user and assistant turns of `messages`."""
    if isinstance(row.get("text"), str):
        return row["text"]
    messages = row.get("messages")
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", "")) for m in messages
                         if isinstance(m, dict) and m.get("role") in ("user", "assistant"))
    raise ValueError("has neither a 'text' string nor a 'messages' list")


@dataclass
class Fingerprints:
    """Per document: exact-match digest, MinHash signature, quality (distinct words)."""
    digests: list[bytes]
    signatures: np.ndarray  # (n, num_perm) uint32
    quality: np.ndarray     # (n,) int64

    def __len__(self) -> int:
        return len(self.digests)

    @classmethod
    def concat(cls, parts: list["Fingerprints"], num_perm: int) -> "Fingerprints":
        if not parts:
            return cls([], np.zeros((0, num_perm), np.uint32), np.zeros(0, np.int64))
        return cls([d for p in parts for d in p.digests], np.concatenate([p.signatures for p in parts]),
                   np.concatenate([p.quality for p in parts]))


def permutations(num_perm: int, seed: int = MINHASH_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of each permutation h -> a*h + b (mod 2^32); a odd makes it a bijection."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = gen.randint(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads the combined word hashes over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _Vocabulary:
    """Each distinct word hashed once (xxh3_64)."""

    def __init__(self):
        import xxhash

        self._hash = xxhash.xxh3_64_intdigest
        self.ids: dict[str, int] = {}
        self.hashes: list[int] = []

    def encode(self, words: list[str]) -> list[int]:
        ids, hashes = self.ids, self.hashes
        out = []
        for word in words:
            idx = ids.get(word)
            if idx is None:
                idx = ids[word] = len(hashes)
                hashes.append(self._hash(word.encode("utf-8")))
            out.append(idx)
        return out


def shingle_hashes(word_hashes: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every n-word shingle of every document, and each document's shingle count.

    `word_hashes` is all documents' word hashes concatenated; a document shorter than
    n words is one shingle of all its words; an empty one has none.
    """
    total = len(word_hashes)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ends = starts + lengths
    pos = np.arange(total, dtype=np.int64)
    end_of = np.repeat(ends, lengths)
    start_of = np.repeat(starts, lengths)
    combined = word_hashes.copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            inside = pos + j < end_of
            nxt = np.where(inside, word_hashes[np.minimum(pos + j, total - 1)], np.uint64(0))
            combined = combined * np.uint64(0x9E3779B97F4A7C15) + nxt
        mixed = _mix64(combined) >> np.uint64(32)
    keep = (pos <= end_of - n) | ((pos == start_of) & (end_of - start_of < n))
    counts = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
    return mixed[keep], counts


def _minhash(hv: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per document, the minimum over its shingles of each permuted hash (no shingle: MAX_HASH)."""
    sigs = np.full((len(counts), len(a)), MAX_HASH, dtype=np.uint32)
    nonempty = counts > 0
    if hv.size:
        # (num_perm, shingles): each permutation's row is contiguous, so the per-document
        # minimum is one reduceat along it
        permuted = a[:, None] * hv.astype(np.uint32)[None, :] + b[:, None]
        offsets = np.concatenate([[0], np.cumsum(counts[nonempty])[:-1]])
        sigs[nonempty] = np.minimum.reduceat(permuted, offsets, axis=1).T
    return sigs


def fingerprint(texts: Iterable[str], num_perm: int, shingle_words: int) -> Fingerprints:
    import xxhash

    a, b = permutations(num_perm)
    vocab = _Vocabulary()
    digests: list[bytes] = []
    quality: list[int] = []
    signatures: list[np.ndarray] = []
    batch_ids: list[list[int]] = []
    batch_shingles = 0

    def flush():
        nonlocal batch_ids, batch_shingles
        if not batch_ids:
            return
        lengths = np.array([len(ids) for ids in batch_ids], dtype=np.int64)
        flat = np.fromiter((i for ids in batch_ids for i in ids), dtype=np.int64, count=int(lengths.sum()))
        word_hashes = np.array(vocab.hashes, dtype=np.uint64)[flat]
        hv, counts = shingle_hashes(word_hashes, lengths, shingle_words)
        signatures.append(_minhash(hv, counts, a, b))
        batch_ids, batch_shingles = [], 0

    for text in texts:
        norm = normalize_text(text)
        digests.append(xxhash.xxh3_128_digest(norm.encode("utf-8")))
        ids = vocab.encode(WORD_RE.findall(norm))
        quality.append(len(set(ids)))
        batch_ids.append(ids)
        batch_shingles += max(len(ids) - shingle_words + 1, 1)
        if batch_shingles >= SHINGLES_PER_BATCH:
            flush()
    flush()
    sigs = np.concatenate(signatures) if signatures else np.zeros((0, num_perm), np.uint32)
    return Fingerprints(digests, sigs, np.array(quality, dtype=np.int64))


# --- clusters
def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def _union(parent: np.ndarray, i: int, j: int) -> None:
    ri, rj = _find(parent, i), _find(parent, j)
    if ri != rj:
        parent[max(ri, rj)] = min(ri, rj)


def _lean_minhash(signature: np.ndarray):
    from datasketch import LeanMinHash

    try:  # datasketch >= 2 asks which permutation scheme made the values
        return LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme="affine32")
    except TypeError:
        return LeanMinHash(seed=MINHASH_SEED, hashvalues=signature.astype(np.uint64))


def cluster(fp: Fingerprints, threshold: float) -> np.ndarray:
    """Cluster root per document: exact duplicates, plus LSH candidates verified by estimated Jaccard."""
    from datasketch import MinHashLSH

    n = len(fp)
    parent = np.arange(n, dtype=np.int64)
    first: dict[bytes, int] = {}
    reps = []
    for i, digest in enumerate(fp.digests):
        j = first.setdefault(digest, i)
        if j != i:
            _union(parent, j, i)
        else:
            reps.append(i)
    if len(reps) < 2:
        return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    num_perm = fp.signatures.shape[1]
    # every candidate is verified below, so the bands favour recall: at J = 0.8 the default
    # weights find 40% of pairs, these 87%, for a few more cheap verifications
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    for i in reps:  # query before inserting: each candidate pair comes up once, no sketch is kept
        sketch = _lean_minhash(fp.signatures[i])
        candidates = np.fromiter(lsh.query(sketch), dtype=np.int64)
        if candidates.size:
            jaccard = (fp.signatures[candidates] == fp.signatures[i]).mean(axis=1)
            for c in candidates[jaccard >= threshold]:
                _union(parent, i, int(c))
        lsh.insert(i, sketch, check_duplication=False)
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


@dataclass
class Decision:
    roots: np.ndarray     # cluster root per document
    keep: np.ndarray      # bool per document
    keeper: np.ndarray    # index of the kept document of each document's cluster
    exact: np.ndarray     # bool: removed as an exact duplicate
    near: np.ndarray      # bool: removed as a near duplicate


def decide(fp: Fingerprints, threshold: float, rank: list[tuple]) -> Decision:
    """One keeper per cluster: the document with the smallest `rank` (priority, -quality, id)."""
    n = len(fp)
    roots = cluster(fp, threshold)
    keeper = np.arange(n, dtype=np.int64)
    best: dict[int, int] = {}
    best_exact: dict[tuple[int, bytes], int] = {}
    for i in range(n):
        r = int(roots[i])
        if r not in best or rank[i] < rank[best[r]]:
            best[r] = i
        key = (r, fp.digests[i])
        if key not in best_exact or rank[i] < rank[best_exact[key]]:
            best_exact[key] = i
    for i in range(n):
        keeper[i] = best[int(roots[i])]
    idx = np.arange(n)
    keep = keeper == idx
    group_best = np.array([best_exact[(int(roots[i]), fp.digests[i])] == i for i in range(n)], dtype=bool)
    exact = ~group_best
    near = group_best & ~keep
    return Decision(roots=roots, keep=keep, keeper=keeper, exact=exact, near=near)


# --- the pipeline stage
@dataclass
class _Row:
    """What dedup keeps in memory per example; the examples themselves are streamed from their files."""
    source: str
    id: str
    cluster: str


def _texts(path: Path, source: str) -> Iterator[str]:
    for lineno, row in enumerate(io.read_jsonl(path), 1):
        try:
            yield example_text(row)
        except ValueError as exc:
            raise StageError(f"{path}:{lineno}: example {exc}; re-run `doit normalize:{source}`") from None


def _fingerprints_for(source: str, path: Path, count: int, num_perm: int, shingle_words: int
                      ) -> tuple[Fingerprints, bool]:
    """A source's fingerprints, from the cache when its examples file is unchanged."""
    key = f"v{SIGNATURE_VERSION}:{num_perm}:{shingle_words}:{io.file_hash(path)}"
    cache = layout.dedup_cache(source)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as data:
                if str(data["key"]) == key and data["signatures"].shape == (count, num_perm):
                    digests = data["digests"]
                    return Fingerprints([bytes(d) for d in digests], data["signatures"], data["quality"]), True
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: recompute
    fp = fingerprint(_texts(path, source), num_perm, shingle_words)
    digests = np.array(fp.digests, dtype="S16") if fp.digests else np.zeros(0, dtype="S16")
    with io.atomic_path(cache) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), digests=digests, signatures=fp.signatures, quality=fp.quality)
    return fp, False


def _rank(priority: list[str], rows: list[_Row], fp: Fingerprints) -> list[tuple]:
    order = {name: i for i, name in enumerate(priority)}
    return [(order.get(row.source, len(order)), row.source if row.source not in order else "", -int(q), row.id)
            for row, q in zip(rows, fp.quality)]


def _cluster_key(row: dict) -> str:
    prov = row.get("provenance") or {}
    if prov.get("source") and prov.get("source_id"):
        return f"{prov['source']}:{prov['source_id']}"
    return str(row["id"])


def _preview(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def run(cfg) -> dict[str, Any]:
    started = time.time()
    settings = cfg.dedup
    num_perm, shingle_words, threshold = settings["num_perm"], settings["shingle_words"], settings["threshold"]
    paths = {s.name: layout.examples_file(s.name) for s in cfg.enabled_sources()}
    rows: list[_Row] = []
    parts: list[Fingerprints] = []
    per_source: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        if not path.exists():
            raise StageError(f"dedup: {path} is missing; run `doit normalize:{name}` first")
        source_rows = [_Row(row["source"], str(row["id"]), _cluster_key(row)) for row in io.read_jsonl(path)]
        fp, cached = _fingerprints_for(name, path, len(source_rows), num_perm, shingle_words)
        rows.extend(source_rows)
        parts.append(fp)
        per_source[name] = {"in": len(source_rows), "exact_dups": 0, "near_dups": 0, "kept": 0,
                            "signatures": "cached" if cached else "computed"}
    fp = Fingerprints.concat(parts, num_perm)
    decision = decide(fp, threshold, _rank(settings["source_priority"], rows, fp))
    for i, row in enumerate(rows):
        stats = per_source[row.source]
        stats["kept" if decision.keep[i] else "exact_dups" if decision.exact[i] else "near_dups"] += 1
    members: dict[int, list[int]] = {}
    for i, root in enumerate(decision.roots):
        members.setdefault(int(root), []).append(i)
    multi = sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), rows[m[0]].id))
    shown = {i for m in multi[:REPORT_CLUSTERS] for i in m[:5]}
    previews: dict[int, str] = {}

    def kept_rows() -> Iterator[dict]:
        i = 0
        for path in paths.values():
            for row in io.read_jsonl(path):
                if i in shown:
                    previews[i] = _preview(example_text(row))
                if decision.keep[i]:
                    yield {**row, "cluster": rows[i].cluster}
                i += 1

    io.write_jsonl(layout.dedup_file(), kept_rows())
    kept = int(decision.keep.sum())
    report = {
        "settings": {"threshold": threshold, "num_perm": num_perm, "shingle_words": shingle_words,
                     "source_priority": settings["source_priority"]},
        "sources": per_source,
        "total": {"in": len(rows), "kept": kept, "removed": len(rows) - kept, "duplicate_clusters": len(multi)},
        "largest_clusters": [{
            "size": len(m),
            "kept": rows[int(decision.keeper[m[0]])].id,
            "members": [{"id": rows[i].id, "source": rows[i].source, "text": previews[i]} for i in m[:5]],
        } for m in multi[:REPORT_CLUSTERS]],
        "seconds": round(time.time() - started, 2),
    }
    io.write_json(layout.dedup_report(), report)
    for name, stats in per_source.items():
        print(f"dedup: {name}: {stats['in']} in, {stats['exact_dups']} exact + {stats['near_dups']} near "
              f"duplicates removed, {stats['kept']} kept (signatures {stats['signatures']})")
    print(f"dedup: {kept} of {len(rows)} kept -> {layout.dedup_file()} ({report['seconds']}s)")
    return report


# --- `medforge dedup IN.jsonl --out OUT.jsonl`
def dedup_command(args) -> int:
    import orjson

    started = time.time()
    if not 0.0 < args.threshold < 1.0:
        raise StageError(f"--threshold must be between 0 and 1 (got {args.threshold}); fix it")
    path = Path(args.input)
    if not path.exists():
        raise StageError(f"{path}: file not found; give a JSONL file with 'text' or 'messages' per line")
    lines, texts = [], []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                texts.append(example_text(orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                raise StageError(f"{path}:{lineno}: not valid JSON ({exc}); fix or delete the line") from None
            except (ValueError, AttributeError) as exc:
                raise StageError(f"{path}:{lineno}: the record {exc}; every line needs 'text' or 'messages'") from None
            lines.append(line if line.endswith(b"\n") else line + b"\n")
    from stages.config import DEDUP_SCHEMA

    fp = fingerprint(texts, DEDUP_SCHEMA["num_perm"][1], DEDUP_SCHEMA["shingle_words"][1])
    # the keeper: the richest text, then the earliest line
    decision = decide(fp, args.threshold, [(-int(q), i) for i, q in enumerate(fp.quality)])
    io.write_bytes(args.out, b"".join(line for line, keep in zip(lines, decision.keep) if keep))
    sizes = np.bincount(decision.roots, minlength=len(lines)) if lines else np.zeros(0, np.int64)
    result = {"kept": int(decision.keep.sum()), "removed": int((~decision.keep).sum()),
              "clusters": int((sizes > 1).sum()), "seconds": round(time.time() - started, 3)}
    sys.stdout.write(io.dumps(result).decode() + "\n")
    return 0
