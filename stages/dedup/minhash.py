"""MinHash fingerprints: normalization, word and shingle hashes, signatures (numpy reference; kernel.py runs it).

A document's fingerprint is its normalized-text digest (exact matches), its MinHash
signature, its quality (distinct words: the richer text wins a cluster) and its set of
shingle hashes (near-duplicate pairs are verified on their true Jaccard similarity).

The numpy functions here define every hash: words are hashed once each, shingle hashes are
combined from word hashes in vectorised steps, and the MinHash permutations are applied to the
whole shingle matrix. kernel.py computes the same in one compiled pass per batch (a test holds
them equal); documents longer than a batch take the numpy path a window at a time. The permutations are datasketch's "affine32" kind: a*h + b in
uint32 with a odd (a bijection, so no added collisions), on well-mixed 32-bit
shingle hashes; a modulo-prime family costs 8x more here for no gain on short texts.
"""
from __future__ import annotations

import os
import re
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

SIGNATURE_VERSION = 4     # bump when normalization or hashing changes: old caches are ignored
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"  # datasketch's name for our a*h + b (mod 2^32) permutations
MAX_HASH = np.uint32((1 << 32) - 1)
SHINGLES_PER_BATCH = 8_192  # x num_perm x 4 bytes: a batch's permuted matrix stays in cache
CHARS_PER_BATCH = 1 << 20    # text hashed per numpy batch (its word and shingle arrays: a few MB)
WORD_RE = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")  # what str.split() splits on


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


def mix64(x: np.ndarray) -> np.ndarray:
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
        hashes = mix64(sums + lengths.astype(np.uint64) * _LENGTH_MULT)
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
        mixed = mix64(combined) >> np.uint64(32)
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


def char_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per code point: is it `\\w` (WORD_RE: str.isalnum or "_"), is it whitespace (str.split: str.isspace)."""
    global _TABLES
    if _TABLES is None:
        chars = [chr(c) for c in range(0x110000)]
        is_word = np.fromiter((c.isalnum() for c in chars), np.bool_, len(chars))
        is_word[ord("_")] = True
        _TABLES = is_word, np.fromiter((c.isspace() for c in chars), np.bool_, len(chars))
    return _TABLES


_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def _prepared(text: str) -> bytes:
    """What the kernel reads: ASCII as it is (it lowercases and splits ASCII itself), other text after
    NFKC and casefold, which need Unicode's tables."""
    if text.isascii():
        return text.encode("ascii")
    return unicodedata.normalize("NFKC", text).casefold().encode("utf-8", "surrogatepass")  # as clean.py reads it


def _digest(norm: str) -> bytes:
    from stages.dedup import kernel

    return np.array(kernel.digest(np.frombuffer(norm.encode("utf-8", "surrogatepass"), np.uint8), *char_tables()),
                    np.uint64).tobytes()


def _batch_fingerprint(texts: list[bytes], num_perm: int, shingle_words: int
                       ) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(digests, signatures, quality, shingle values, shingles per document) of one batch (kernel.py)."""
    from stages.dedup import kernel

    a, b = permutations(num_perm)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    digests, *rest = kernel.fingerprint_batch(np.frombuffer(b"".join(texts), np.uint8), offsets, shingle_words,
                                              a, b, _BYTE_MULT, _LENGTH_MULT, *char_tables())
    flat = digests.tobytes()
    return [flat[i:i + 16] for i in range(0, len(flat), 16)], *rest


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


def cores() -> int:
    """The CPUs this process may use (its affinity: a container's or taskset's share), at most 8 threads."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, usable))


def fingerprint(texts: Iterable[str], num_perm: int, shingle_words: int, workers: int | None = None
                ) -> Fingerprints:
    """Fingerprints of `texts`, in order. Batches are fingerprinted by the compiled kernel on a thread pool
    (it releases the GIL): every core works, the result is the same. Memory stays bounded whatever the
    input: a few batches wait at most, and a document longer than a batch goes alone, through the numpy
    path (_long_fingerprint), a window at a time."""
    workers = workers or cores()
    parts: list[Future] = []
    batch: list[bytes] = []
    batch_chars = 0
    char_tables()  # built once, before the threads need them
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(fn, *args) -> None:
            parts.append(pool.submit(fn, *args))
            if len(parts) > 2 * workers:  # the reader is ahead: wait, so pending text stays bounded
                parts[-2 * workers - 1].result()

        for text in texts:
            if len(text) > CHARS_PER_BATCH:
                if batch:
                    submit(_batch_fingerprint, batch, num_perm, shingle_words)
                    batch, batch_chars = [], 0
                parts.append(_Done(_long_document(text, num_perm, shingle_words)))
                continue
            batch.append(_prepared(text))
            batch_chars += len(text)
            if batch_chars >= CHARS_PER_BATCH:
                submit(_batch_fingerprint, batch, num_perm, shingle_words)
                batch, batch_chars = [], 0
        if batch:
            submit(_batch_fingerprint, batch, num_perm, shingle_words)
        results = [part.result() for part in parts]
    if not results:
        return Fingerprints.empty(num_perm)
    digests = [d for r in results for d in r[0]]
    signatures, quality, shingles, sizes = (np.concatenate(column) for column in list(zip(*results))[1:])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return Fingerprints(digests, signatures, quality.astype(np.int64), shingles, offsets)


def _long_document(text: str, num_perm: int, shingle_words: int):
    norm = normalize_text(text)
    del text
    return ([_digest(norm)], *_long_fingerprint(_tokens(norm), num_perm, shingle_words))


class _Done:
    """A result already computed, where a Future would be."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value
