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

import gc
import os
import re
import sys
import time
import unicodedata
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import orjson

from stages import clean, io, layout
from stages.errors import StageError

SIGNATURE_VERSION = 3     # bump when normalization or hashing changes: old caches are ignored
MINHASH_SEED = 1
MAX_HASH = np.uint32((1 << 32) - 1)
SHINGLES_PER_BATCH = 8_192  # x num_perm x 4 bytes: a batch's permuted matrix stays in cache
CHARS_PER_BATCH = 1 << 20    # text hashed per numpy batch (its word and shingle arrays: a few MB)
WORD_RE = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")  # what str.split() splits on
REPORT_CLUSTERS = 10
LSH_RECALL = 0.98    # chance that a pair exactly at the threshold shares a band (more above it)
VERIFY_CHUNK = 200_000  # candidate pairs screened at once (x num_perm x 8 bytes)


# --- normalization and fingerprints
def normalize_text(text: str) -> str:
    if text.isascii():  # O(1) in CPython; NFKC leaves ASCII as is and casefold is lower
        text = text.lower()
    else:
        text = unicodedata.normalize("NFKC", text).casefold()
    if len(text) <= CHARS_PER_BATCH:
        return " ".join(text.split())
    # a piece at a time: split() holds a str object per word, gigabytes for a huge record
    return " ".join(p for p in (" ".join(piece.split()) for piece in _pieces(text, CHARS_PER_BATCH)) if p)


def _pieces(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive pieces of about `size` characters, each cut before whitespace (no word is split)."""
    start = 0
    while start < len(text):
        cut = _SPACES.search(text, start + size) if start + size < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[start:end]
        start = end


# ASCII characters that are neither \w nor whitespace, mapped to spaces: on ASCII text,
# str.split() after this translation gives exactly WORD_RE.findall, several times faster
_ASCII_SEPARATORS = str.maketrans({chr(c): " " for c in range(128)
                                   if not re.match(r"[\w\s]", chr(c))})


def words_of(norm: str) -> list[str]:
    """The words (\\w+ runs) of a normalized text."""
    if norm.isascii():
        return norm.translate(_ASCII_SEPARATORS).split()
    return WORD_RE.findall(norm)


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
    """Per document: exact-match digest, MinHash signature, quality (distinct words), shingle set.

    The shingle sets (sorted unique 32-bit shingle hashes, flat with offsets) let candidate
    pairs be verified on their true Jaccard similarity, not only on the MinHash estimate.
    """
    digests: list[bytes]
    signatures: np.ndarray  # (n, num_perm) uint32
    quality: np.ndarray     # (n,) int64
    shingles: np.ndarray    # (total,) uint32, document i's at shingles[offsets[i]:offsets[i + 1]]
    offsets: np.ndarray     # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.digests)

    def shingle_set(self, i: int) -> np.ndarray:
        return self.shingles[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def empty(cls, num_perm: int) -> "Fingerprints":
        return cls([], np.zeros((0, num_perm), np.uint32), np.zeros(0, np.int64), np.zeros(0, np.uint32),
                   np.zeros(1, np.int64))

    @classmethod
    def concat(cls, parts: list["Fingerprints"], num_perm: int) -> "Fingerprints":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(num_perm)
        bases = np.cumsum([0] + [len(p.shingles) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(parts, bases)])
        return cls([d for p in parts for d in p.digests], np.concatenate([p.signatures for p in parts]),
                   np.concatenate([p.quality for p in parts]), np.concatenate([p.shingles for p in parts]),
                   offsets.astype(np.int64))


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


# one random odd 64-bit multiplier per byte position in a word (positions beyond 64 wrap around)
_BYTE_MULT = (np.random.RandomState(7).randint(0, 1 << 62, size=64, dtype=np.int64).astype(np.uint64) << np.uint64(1)
              ) | np.uint64(1)
_LENGTH_MULT = np.uint64(0x9E3779B97F4A7C15)


def word_hashes(blob: bytes, docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64-bit hashes of every word in `blob`, all in numpy: (hashes, words per document, distinct words per document).

    `blob` holds documents separated by b"\\n", words separated by spaces. A word's hash is the
    splitmix64 mix of sum(byte_k * M[k mod 64]) + length * C (mod 2^64): the same word hashes the
    same in every document and batch, without a Python call per word.
    """
    buf = np.frombuffer(blob, dtype=np.uint8)
    if not len(buf):
        return np.zeros(0, np.uint64), np.zeros(docs, np.int64), np.zeros(docs, np.int64)
    inside = (buf != 32) & (buf != 10)
    before = np.concatenate([[False], inside[:-1]])
    after = np.concatenate([inside[1:], [False]])
    starts = np.flatnonzero(inside & ~before)
    ends = np.flatnonzero(inside & ~after)
    if not len(starts):
        return np.zeros(0, np.uint64), np.zeros(docs, np.int64), np.zeros(docs, np.int64)
    lengths = ends - starts + 1
    word_bytes = buf[inside].astype(np.uint64)  # the words' bytes alone, back to back
    first_byte = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(len(word_bytes)) - np.repeat(first_byte, lengths)
    with np.errstate(over="ignore"):
        sums = np.add.reduceat(word_bytes * _BYTE_MULT[position & 63], first_byte)
        hashes = _mix64(sums + lengths.astype(np.uint64) * _LENGTH_MULT)
    doc_of = np.searchsorted(np.flatnonzero(buf == 10), starts)  # newlines before a word = its document
    words = np.bincount(doc_of, minlength=docs)
    # distinct words per document (the keeper's quality): unique (document, hash) keys
    keys = (doc_of.astype(np.uint64) << np.uint64(40)) | (hashes >> np.uint64(24))
    keys.sort()
    first = np.concatenate([[True], keys[1:] != keys[:-1]])
    distinct = np.bincount((keys[first] >> np.uint64(40)).astype(np.int64), minlength=docs)
    return hashes, words, distinct


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


def _minhash(hv: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray, sigs: np.ndarray | None = None
             ) -> np.ndarray:
    """Per document, the minimum over its shingles of each permuted hash (no shingle: MAX_HASH); with
    `sigs`, folded into it. The permuted matrix (num_perm x shingles) is built SHINGLES_PER_BATCH shingles
    at a time, cutting through documents where it must (a running minimum): it stays in cache, and one
    huge document costs no more memory than many small ones."""
    if sigs is None:
        sigs = np.full((len(counts), len(a)), MAX_HASH, dtype=np.uint32)
    ends = np.cumsum(counts)
    starts = ends - counts
    for lo in range(0, len(hv), SHINGLES_PER_BATCH):
        hi = min(lo + SHINGLES_PER_BATCH, len(hv))
        docs = np.arange(np.searchsorted(ends, lo, side="right"), np.searchsorted(starts, hi, side="left"))
        docs = docs[counts[docs] > 0]  # the documents with shingles in [lo, hi), in order
        # each permutation's row is contiguous, so the per-document minimum is one reduceat along it
        permuted = np.multiply(a[:, None], hv[lo:hi].astype(np.uint32)[None, :])
        permuted += b[:, None]
        part = np.minimum.reduceat(permuted, np.maximum(starts[docs], lo) - lo, axis=1).T
        sigs[docs] = np.minimum(sigs[docs], part)
    return sigs


def _shingle_sets(hv: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's shingle hashes, sorted and unique: (flat values, per-document sizes)."""
    doc = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
    keys = (doc << np.uint64(32)) | hv.astype(np.uint64)
    keys.sort()
    if len(keys):
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    sizes = np.bincount((keys >> np.uint64(32)).astype(np.int64), minlength=len(counts))
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), sizes


def _tokens(norm: str) -> str:
    """A normalized text's words, space-separated (punctuation becomes spaces)."""
    if norm.isascii():
        return norm.translate(_ASCII_SEPARATORS)
    return " ".join(" ".join(WORD_RE.findall(piece)) for piece in _pieces(norm, CHARS_PER_BATCH))


def _batch_fingerprint(tokens: list[str], num_perm: int, shingle_words: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(signatures, quality, shingle values, shingles per document) of one batch of token strings."""
    if len(tokens) == 1 and len(tokens[0]) > CHARS_PER_BATCH:
        return _long_fingerprint(tokens[0], num_perm, shingle_words)
    a, b = permutations(num_perm)
    hashes, lengths, distinct = word_hashes("\n".join(tokens).encode("utf-8"), len(tokens))
    hv, counts = shingle_hashes(hashes, lengths, shingle_words)
    values, per_doc = _shingle_sets(hv, counts)
    return _minhash(hv, counts, a, b), distinct, values, per_doc


def _long_fingerprint(tokens: str, num_perm: int, shingle_words: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """_batch_fingerprint of one document longer than a batch, a window of words at a time: each window's
    shingles start with the last `shingle_words - 1` words of the one before, so every shingle is hashed
    once, and the signature, distinct words and shingle set are exactly those of the whole document, in
    memory bounded by the window, not the document."""
    a, b = permutations(num_perm)
    sigs = np.full((1, num_perm), MAX_HASH, dtype=np.uint32)
    carry = np.zeros(0, np.uint64)
    words, sets = [], []

    def shingles(hashes: np.ndarray) -> None:
        hv, counts = shingle_hashes(hashes, np.array([len(hashes)]), shingle_words)
        _minhash(hv, counts, a, b, sigs)
        sets.append(np.unique(hv.astype(np.uint32)))

    for window in _pieces(tokens, CHARS_PER_BATCH):
        hashes, _, _ = word_hashes(window.encode("utf-8"), 1)
        words.append(np.unique(hashes >> np.uint64(24)))  # word_hashes' distinct-word key
        hashes = np.concatenate([carry, hashes])
        if len(hashes) < shingle_words:  # not one whole shingle yet: wait for the next window
            carry = hashes
            continue
        shingles(hashes)
        carry = hashes[len(hashes) - shingle_words + 1:]
    if not sets and len(carry):  # fewer words than a shingle in all: one shingle of them, as for short texts
        shingles(carry)
    distinct = len(np.unique(np.concatenate(words))) if words else 0
    values = np.unique(np.concatenate(sets)) if sets else np.zeros(0, np.uint32)
    return sigs, np.array([distinct]), values, np.array([len(values)])


def fingerprint(texts: Iterable[str], num_perm: int, shingle_words: int) -> Fingerprints:
    """Fingerprints of `texts`, in order. Texts are normalized here (Python) while earlier batches are
    hashed on a thread pool (numpy, which releases the GIL): every core works, the result is the same.
    Memory stays bounded whatever the input: a few batches wait at most, and a document longer than a
    batch goes alone, through _long_fingerprint."""
    import xxhash

    workers = max(1, min(4, os.cpu_count() or 1))
    digests: list[bytes] = []
    batches: list[Future] = []
    batch: list[str] = []
    batch_chars = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(tokens: list[str]) -> None:
            batches.append(pool.submit(_batch_fingerprint, tokens, num_perm, shingle_words))
            if len(batches) > 2 * workers:  # the reader is ahead: wait, so pending text stays bounded
                batches[-2 * workers - 1].result()

        for text in texts:
            norm = normalize_text(text)
            digests.append(xxhash.xxh3_128_digest(norm.encode("utf-8")))
            if len(norm) > CHARS_PER_BATCH and batch:
                submit(batch)
                batch, batch_chars = [], 0
            batch.append(_tokens(norm))
            batch_chars += len(norm)
            del norm
            if batch_chars >= CHARS_PER_BATCH:
                submit(batch)
                batch, batch_chars = [], 0
        if batch:
            submit(batch)
        parts = [future.result() for future in batches]
    if not digests:
        return Fingerprints.empty(num_perm)
    signatures, quality, shingles, sizes = (np.concatenate(column) for column in zip(*parts))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return Fingerprints(digests, signatures, quality.astype(np.int64), shingles, offsets)


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


class _Sketch:
    """A signature as MinHashLSH reads it (hash values, length, scheme), without a MinHash object per document."""
    __slots__ = ("hashvalues",)
    scheme = "affine32"  # datasketch's name for our a*h + b (mod 2^32) permutations

    def __init__(self, hashvalues: np.ndarray):
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance candidates) that still make a pair at
    the threshold a candidate with probability >= `recall`; every candidate is verified exactly."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def storage_config(settings: dict[str, Any]) -> dict[str, Any] | None:
    """datasketch's storage_config for the configured backend (None: in memory)."""
    if settings.get("backend", "memory") != "redis":
        return None
    from urllib.parse import urlparse
    import uuid

    url = urlparse(settings["redis_url"])
    params: dict[str, Any] = {"host": url.hostname or "127.0.0.1", "port": url.port or 6379,
                              "db": int(url.path.strip("/") or 0)}
    if url.password:
        params["password"] = url.password
    if url.username:
        params["username"] = url.username
    # a fresh namespace per run; its keys are deleted when the run ends
    return {"type": "redis", "redis": params, "basename": f"medforge:dedup:{uuid.uuid4().hex[:12]}".encode()}


def _connect(config: dict[str, Any], url: str):
    import redis

    client = redis.Redis(**config["redis"])
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StageError(f"dedup: cannot reach Redis at dedup.redis_url = {url!r} in sources.toml ({exc}); "
                         f"start redis-server or set dedup.backend = \"memory\"") from None
    return client


def insert_all(lsh, signatures: np.ndarray, docs: np.ndarray, buffer: bool = False) -> list[list[bytes]] | None:
    """Index `docs` (keys: 4-byte big-endian row numbers) in a MinHashLSH, all at once.

    Writes the very band keys `MinHashLSH.insert` would (big-endian bytes of each band of
    the signature) into the index's own hashtables and key store, so `lsh.query` and
    `lsh.remove` work as usual; but the keys of all documents are cut from one byte-swapped
    matrix, not per document (MinHashLSH.insert costs ~100 us a document here).
    Returns, per table, the band keys that hold two or more documents when the in-memory
    fill saw them (None on other storage: read them from the index).
    """
    from datasketch.storage import DictListStorage, DictSetStorage

    swapped = np.ascontiguousarray(signatures[docs]).byteswap()
    keys = [i.to_bytes(4, "big") for i in docs.tolist()]
    in_memory = not buffer and not lsh.hashfunc and all(isinstance(t, DictSetStorage) for t in lsh.hashtables)
    bands, shared = [], []
    for (start, end), table in zip(lsh.hashranges, lsh.hashtables):
        if in_memory:
            hs, repeated = _fill_buckets(table._dict, swapped[:, start:end], keys)
            bands.append(hs)
            shared.append(repeated)
            continue
        width = (end - start) * swapped.itemsize  # each row's band, as one bytes object (from C)
        hs = np.ascontiguousarray(swapped[:, start:end]).view(f"V{width}").ravel().tolist()
        if lsh.hashfunc:
            hs = [lsh.hashfunc(h) for h in hs]
        if buffer:
            for h, key in zip(hs, keys):
                table.insert(h, key, buffer=True)
        else:  # the same calls, driven from C (no Python loop around them)
            deque(map(table.insert, hs, keys), maxlen=0)
        bands.append(hs)
    if isinstance(lsh.keys, DictListStorage) and not buffer:
        lsh.keys._dict.update(zip(keys, map(list, zip(*bands))))
    else:
        for key, hs in zip(keys, zip(*bands)):
            lsh.keys.insert(key, *hs, buffer=buffer)
    if buffer:
        for storage in (*lsh.hashtables, lsh.keys):
            storage.empty_buffer()
    return shared if in_memory else None


def _fill_buckets(buckets: dict, rows: np.ndarray, keys: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """What `DictSetStorage.insert(h, key)` for every row leaves in an empty table, built from C (one
    insert at a time costs ~2.5 us, most of a dedup run): returns each row's band key, and the band
    keys that hold two or more rows.
    `rows`: (n, rows per band) uint32, each row's band as its bytes (already big-endian)."""
    band = np.ascontiguousarray(rows).view(f"V{rows.shape[1] * rows.itemsize}").ravel()
    hs = band.tolist()
    buckets.update(zip(hs, map(set, zip(keys))))  # a shared bucket keeps only its last key here...
    if len(buckets) == len(hs):
        return hs, []
    with np.errstate(over="ignore"):  # equal bands have equal 64-bit mixes (a collision only costs a look)
        mixed = np.zeros(len(rows), np.uint64)
        for column in rows.T:
            mixed = _mix64(mixed * _LENGTH_MULT + column)
    order = np.argsort(mixed)
    same = mixed[order[1:]] == mixed[order[:-1]]
    repeated = order[np.concatenate([same, [False]]) | np.concatenate([[False], same])]
    for i in repeated.tolist():  # ...so its other keys are added back
        buckets[hs[i]].add(keys[i])
    return hs, [h for h in dict.fromkeys(hs[i] for i in repeated.tolist()) if len(buckets[h]) > 1]


def candidate_pairs(fp: Fingerprints, docs: np.ndarray, params: tuple[int, int],
                    storage: dict[str, Any] | None = None, redis_url: str = "") -> np.ndarray:
    """Pairs (i < j) of `docs` that share an LSH bucket of datasketch's MinHashLSH, sorted and unique.

    All documents are inserted (pipelined on Redis), then every bucket holding two or more
    is read back: one pass instead of a query per document, and the same on every backend.
    """
    client = _connect(storage, redis_url) if storage else None
    with _gc_paused():
        return _candidate_pairs(fp, docs, params, storage, client)


@contextmanager
def _gc_paused():
    """The index is hundreds of thousands of small sets and nothing cyclic: without this, Python's
    cycle collector re-scans every live object again and again while they are built (~3x the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _candidate_pairs(fp: Fingerprints, docs: np.ndarray, params: tuple[int, int],
                     storage: dict[str, Any] | None, client) -> np.ndarray:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(num_perm=fp.signatures.shape[1], params=params, storage_config=storage, prepickle=False)
    n = len(fp)
    try:
        known_shared = insert_all(lsh, fp.signatures, docs, buffer=storage is not None)
        chunks, twos = [], []
        for t, table in enumerate(lsh.hashtables):
            if known_shared is not None:
                shared = known_shared[t]
            else:
                shared = [key for key, count in table.itemcounts().items() if count > 1]
            for members in (table.getmany(*shared) if shared else []):
                if len(members) == 2:  # most shared buckets: a pair, no index arithmetic needed
                    twos.extend(members)
                    continue
                ids = np.sort(np.fromiter((int.from_bytes(m, "big") for m in members), dtype=np.int64))
                left, right = np.triu_indices(len(ids), 1)
                chunks.append(ids[left] * n + ids[right])
        if twos:
            flat = np.frombuffer(b"".join(twos), dtype=">u4").astype(np.int64).reshape(-1, 2)
            flat.sort(axis=1)
            chunks.append(flat[:, 0] * n + flat[:, 1])
    finally:
        if client is not None:
            keys = list(client.scan_iter(match=storage["basename"] + b"*", count=10_000))
            for start in range(0, len(keys), 10_000):
                client.delete(*keys[start:start + 10_000])
        # MinHashLSH keeps a bound method of itself (a reference cycle): let go of its buckets now,
        # not at the cycle collector's next full pass over all of them
        lsh.hashtables, lsh.keys = [], None
    if not chunks:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(chunks))
    return np.stack([codes // n, codes % n], axis=1)


def true_jaccard(fp: Fingerprints, i: int, j: int) -> float:
    a, b = fp.shingle_set(i), fp.shingle_set(j)
    if not len(a) and not len(b):
        return 1.0
    shared = np.intersect1d(a, b, assume_unique=True).size
    return shared / (len(a) + len(b) - shared)


def verify(fp: Fingerprints, pairs: np.ndarray, threshold: float) -> np.ndarray:
    """The candidate pairs whose true Jaccard similarity (on shingle sets) is >= threshold.

    The MinHash estimate screens first (vectorised), with a margin of ~4 standard errors
    below the threshold, so the exact set intersection runs only on plausible pairs.
    """
    if not len(pairs):
        return pairs
    num_perm = fp.signatures.shape[1]
    margin = 4.0 * (threshold * (1.0 - threshold) / num_perm) ** 0.5
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), VERIFY_CHUNK):
        part = pairs[start:start + VERIFY_CHUNK]
        estimate = (fp.signatures[part[:, 0]] == fp.signatures[part[:, 1]]).mean(axis=1)
        keep[start:start + VERIFY_CHUNK] = estimate >= threshold - margin
    plausible = np.flatnonzero(keep)
    for k in plausible.tolist():
        i, j = pairs[k]
        keep[k] = true_jaccard(fp, int(i), int(j)) >= threshold
    return pairs[keep]


def near_pairs(fp: Fingerprints, threshold: float, settings: dict[str, Any] | None = None,
               stats: dict[str, Any] | None = None) -> np.ndarray:
    """Verified near-duplicate pairs among documents that are not exact copies of an earlier one."""
    settings = settings or {}
    stats = {} if stats is None else stats
    first: dict[bytes, int] = {}
    reps = np.array([i for i, d in enumerate(fp.digests) if first.setdefault(d, i) == i], dtype=np.int64)
    if len(reps) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    params = lsh_params(threshold, fp.signatures.shape[1])
    pairs = candidate_pairs(fp, reps, params, storage_config(settings), settings.get("redis_url", ""))
    verified = verify(fp, pairs, threshold)
    stats.update({"bands": params[0], "rows": params[1], "candidate_pairs": len(pairs), "near_pairs": len(verified)})
    return verified


def cluster(fp: Fingerprints, threshold: float, settings: dict[str, Any] | None = None,
            stats: dict[str, Any] | None = None) -> np.ndarray:
    """Cluster root per document: exact duplicates plus verified near-duplicate pairs, by union-find."""
    n = len(fp)
    parent = np.arange(n, dtype=np.int64)
    first: dict[bytes, int] = {}
    for i, digest in enumerate(fp.digests):
        j = first.setdefault(digest, i)
        if j != i:
            _union(parent, j, i)
    for i, j in near_pairs(fp, threshold, settings, stats).tolist():  # sorted: the same roots on every backend
        _union(parent, i, j)
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


@dataclass
class Decision:
    roots: np.ndarray     # cluster root per document
    keep: np.ndarray      # bool per document
    keeper: np.ndarray    # index of the kept document of each document's cluster
    exact: np.ndarray     # bool: removed as an exact duplicate
    near: np.ndarray      # bool: removed as a near duplicate


def decide(fp: Fingerprints, threshold: float, rank: list[tuple], settings: dict[str, Any] | None = None,
           stats: dict[str, Any] | None = None) -> Decision:
    """One keeper per cluster: the document with the smallest `rank` (priority, -quality, id)."""
    n = len(fp)
    roots = cluster(fp, threshold, settings, stats)
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


@dataclass
class _Source:
    """One source after cleaning and fingerprinting (from its cache when nothing it depends on changed)."""
    name: str
    kind: str
    path: Path
    reasons: list[str]       # per example in the file: "" = kept by cleaning, else the drop reason
    changes: dict[str, int]  # what cleaning changed (markup, boilerplate lines, contacts, unicode)
    fp: Fingerprints         # of the examples cleaning kept, in file order
    cached: bool


def _cache_key(path: Path, settings: dict, clean_settings: dict, counter_key: str) -> str:
    knobs = io.dumps({"clean": clean_settings, "counter": counter_key, "num_perm": settings["num_perm"],
                      "shingle_words": settings["shingle_words"]})
    return f"v{SIGNATURE_VERSION}:c{clean.CLEAN_VERSION}:{io.content_hash(knobs)[:16]}:{io.file_hash(path)}"


def _load_cache(cache: Path, key: str) -> tuple[list[str], dict, Fingerprints] | None:
    data = io.read_arrays(cache, key)
    if data is None:
        return None  # none yet, unreadable or stale: recompute
    try:
        fp = Fingerprints([bytes(d) for d in data["digests"]], data["signatures"], data["quality"],
                          data["shingles"], data["offsets"])
        reasons = [str(r) for r in data["reasons"]]
        changes = orjson.loads(data["changes"].tobytes())
    except (KeyError, ValueError):
        return None  # an older cache's layout: recompute
    if len(fp) != sum(1 for r in reasons if not r):
        return None
    return reasons, changes, fp


def _prepare(source, settings: dict, clean_settings: dict, counter: clean.TokenCounter, counter_key: str) -> _Source:
    """Clean and fingerprint one source, or take both from its cache when its file and settings are unchanged."""
    path = layout.examples_file(source.name)
    key = _cache_key(path, settings, clean_settings, counter_key)
    cache = layout.dedup_cache(source.name)
    hit = _load_cache(cache, key)
    if hit is not None:
        return _Source(source.name, source.kind, path, hit[0], hit[1], hit[2], True)
    cleaned, why, changes = clean.clean_rows(io.read_jsonl(path), source.kind, clean_settings, counter)
    reasons = [r or "" for r in why]
    fp = fingerprint((example_text(row) for row, r in zip(cleaned, reasons) if not r),
                     settings["num_perm"], settings["shingle_words"])
    digests = np.array(fp.digests, dtype="S16") if fp.digests else np.zeros(0, dtype="S16")
    io.write_arrays(cache, key, digests=digests, signatures=fp.signatures, quality=fp.quality, shingles=fp.shingles,
                    offsets=fp.offsets, reasons=np.array(reasons, dtype=str),
                    changes=np.frombuffer(io.dumps(changes), dtype=np.uint8))
    return _Source(source.name, source.kind, path, reasons, changes, fp, False)


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


def tokenizer_spec(cfg) -> str:
    """The base model whose tokenizer measures lengths: the adapters' (the first, when they differ)."""
    from stages.config import DEFAULT_BASE_MODEL

    bases = cfg.base_models()
    return bases[0] if bases else DEFAULT_BASE_MODEL


def counter_identity(counter: clean.TokenCounter) -> str:
    if counter.kind != "tokenizer":
        return f"estimate:{clean.CLEAN_VERSION}"
    return f"tokenizer:{io.file_hash(layout.base_dir(counter.spec) / 'tokenizer.json')}"


def run(cfg) -> dict[str, Any]:
    started = time.time()
    settings = cfg.dedup
    clean_settings = cfg.clean or {}
    num_perm, shingle_words, threshold = settings["num_perm"], settings["shingle_words"], settings["threshold"]
    counter = clean.token_counter(tokenizer_spec(cfg))
    counter_key = counter_identity(counter)
    prepared: list[_Source] = []
    for source in cfg.enabled_sources():
        if not layout.examples_file(source.name).exists():
            raise StageError(f"dedup: {layout.examples_file(source.name)} is missing; "
                             f"run `doit normalize:{source.name}` first")
        prepared.append(_prepare(source, settings, clean_settings, counter, counter_key))
    rows: list[_Row] = []
    per_source: dict[str, dict[str, Any]] = {}
    drop_examples: dict[str, list[str]] = {}
    for src in prepared:
        for row, reason in zip(io.read_jsonl(src.path), src.reasons):
            if reason:
                examples = drop_examples.setdefault(reason, [])
                if len(examples) < 5:
                    examples.append(str(row.get("id")))
            else:
                rows.append(_Row(src.name, str(row["id"]), _cluster_key(row)))
        dropped = Counter(r for r in src.reasons if r)
        per_source[src.name] = {"in": len(src.reasons), "dropped": dict(sorted(dropped.items())),
                                "cleaned": dict(sorted(src.changes.items())), "exact_dups": 0, "near_dups": 0,
                                "duplicate_clusters": 0, "kept": 0,
                                "signatures": "cached" if src.cached else "computed"}
    fp = Fingerprints.concat([src.fp for src in prepared], num_perm)
    lsh_stats: dict[str, Any] = {}
    decision = decide(fp, threshold, _rank(settings["source_priority"], rows, fp), settings, lsh_stats)
    for i, row in enumerate(rows):
        stats = per_source[row.source]
        stats["kept" if decision.keep[i] else "exact_dups" if decision.exact[i] else "near_dups"] += 1
    members: dict[int, list[int]] = {}
    for i, root in enumerate(decision.roots):
        members.setdefault(int(root), []).append(i)
    multi = sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), rows[m[0]].id))
    for m in multi:
        per_source[rows[int(decision.keeper[m[0]])].source]["duplicate_clusters"] += 1
    shown = {i for m in multi[:REPORT_CLUSTERS] for i in m[:5]}
    previews: dict[int, str] = {}
    cleaner = clean.Cleaner(clean_settings.get("strip_markup", True), clean_settings.get("boilerplate", []))

    def kept_rows() -> Iterator[dict]:
        i = 0
        for src in prepared:
            scrub = src.kind in clean_settings.get("scrub_contacts", [])
            for row, reason in zip(io.read_jsonl(src.path), src.reasons):
                if reason:
                    continue
                if i in shown or decision.keep[i]:
                    row = cleaner.row(row, scrub)  # the same transform that was fingerprinted
                if i in shown:
                    previews[i] = _preview(example_text(row))
                if decision.keep[i]:
                    yield {**row, "cluster": rows[i].cluster}
                i += 1

    io.write_jsonl(layout.dedup_file(), kept_rows())
    kept = int(decision.keep.sum())
    total_in = sum(s["in"] for s in per_source.values())
    dropped_total = Counter()
    for stats in per_source.values():
        dropped_total.update(stats["dropped"])
    report = {
        "settings": {"threshold": threshold, "num_perm": num_perm, "shingle_words": shingle_words,
                     "source_priority": settings["source_priority"], "backend": settings.get("backend", "memory")},
        "cleaning": {"tokens": counter.describe(), "settings": clean_settings,
                     "dropped": dict(sorted(dropped_total.items())),
                     "dropped_examples": dict(sorted(drop_examples.items()))},
        "lsh": lsh_stats,
        "sources": per_source,
        "total": {"in": total_in, "dropped": sum(dropped_total.values()),
                  "exact_dups": int(decision.exact.sum()), "near_dups": int(decision.near.sum()),
                  "kept": kept, "removed": total_in - kept, "duplicate_clusters": len(multi)},
        "largest_clusters": [{
            "size": len(m),
            "kept": rows[int(decision.keeper[m[0]])].id,
            "members": [{"id": rows[i].id, "source": rows[i].source, "text": previews[i]} for i in m[:5]],
        } for m in multi[:REPORT_CLUSTERS]],
        "seconds": round(time.time() - started, 2),
    }
    io.write_json(layout.dedup_report(), report)
    print(f"dedup: tokens counted with {counter.kind} ({counter.spec})")
    for name, stats in per_source.items():
        drops = ", ".join(f"{n} {why}" for why, n in stats["dropped"].items()) or "none"
        print(f"dedup: {name}: {stats['in']} in, dropped by cleaning: {drops}; {stats['exact_dups']} exact + "
              f"{stats['near_dups']} near duplicates removed, {stats['kept']} kept (signatures {stats['signatures']})")
    print(f"dedup: {kept} of {total_in} kept -> {layout.dedup_file()} ({report['seconds']}s)")
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
    records = 0  # non-blank lines, each one record

    def texts() -> Iterator[str]:  # streamed: only the fingerprints stay in memory, never the file
        nonlocal records
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise StageError(f"{path}:{lineno}: not valid JSON ({exc}); fix or delete the line") from None
                del line
                try:
                    text = example_text(record)
                except (ValueError, AttributeError, TypeError) as exc:
                    raise StageError(f"{path}:{lineno}: the record {exc}; every line needs 'text' or "
                                     f"'messages'") from None
                del record
                records += 1
                yield text

    from stages.config import DEDUP_SCHEMA

    fp = fingerprint(texts(), DEDUP_SCHEMA["num_perm"][1], DEDUP_SCHEMA["shingle_words"][1])
    # the keeper: the richest text, then the earliest line
    decision = decide(fp, args.threshold, [(-int(q), i) for i, q in enumerate(fp.quality)])

    def kept_lines() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            kept = iter(decision.keep)
            for line in fh:
                if line.strip() and next(kept):
                    yield line if line.endswith(b"\n") else line + b"\n"

    io.write_chunks(args.out, kept_lines())
    sizes = np.bincount(decision.roots, minlength=records) if records else np.zeros(0, np.int64)
    result = {"kept": int(decision.keep.sum()), "removed": int((~decision.keep).sum()),
              "clusters": int((sizes > 1).sum()), "seconds": round(time.time() - started, 3)}
    sys.stdout.write(io.dumps(result).decode() + "\n")
    return 0
