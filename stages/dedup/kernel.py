"""The fingerprint of a batch of documents in one compiled pass (numba): the hot loop of dedup.

Per document it reads the UTF-8 bytes once and produces what minhash.py defines: the digest of the
normalized text (lowercase, whitespace runs as one space, trimmed), the 64-bit hash of every word (a run
of `\\w` characters, as WORD_RE finds them), the n-word shingle hashes, the MinHash signature, the
distinct-word count and the sorted shingle set. minhash.py's numpy functions remain the reference (a test
holds the two equal) and serve documents longer than a batch. numpy could not get here: each byte and each
shingle costs a handful of integer operations, and numpy pays a memory round trip for each of a dozen
passes; and the kernel releases the GIL, so minhash.fingerprint's thread pool runs one batch per core.

Text arrives lowercased by Python only where Unicode needs it (NFKC + casefold of non-ASCII text); ASCII
is lowercased here. `\\w` and whitespace beyond ASCII come from tables of str.isalnum / str.isspace.
Compiled on first use and cached beside this file (numba's cache=True): a few seconds once per machine.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_U24, _U27, _U30, _U31, _U32 = (np.uint64(s) for s in (24, 27, 30, 31, 32))
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SHINGLE_MULT = np.uint64(0x9E3779B97F4A7C15)
_LOW32 = np.uint64(0xFFFFFFFF)
_ZERO = np.uint64(0)
# the digest: two FNV-1a lanes over the normalized bytes, each finished with mix64 (128 bits in all)
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_A, _FNV_B = np.uint64(0xCBF29CE484222325), np.uint64(0x84222325CBF29CE4)
_SPACE = np.uint64(32)


@njit(cache=True, nogil=True, inline="always")
def mix64(x):
    x = x ^ (x >> _U30)
    x = x * _M1
    x = x ^ (x >> _U27)
    x = x * _M2
    return x ^ (x >> _U31)


@njit(cache=True, nogil=True)
def _read(data, i, end):
    """The code point at byte i and the byte after it (UTF-8; Python's encoder made it valid)."""
    c = np.int64(data[i])
    if c < 0x80:
        return c, i + 1
    if c < 0xE0:
        n, cp = 1, c & 0x1F
    elif c < 0xF0:
        n, cp = 2, c & 0x0F
    else:
        n, cp = 3, c & 0x07
    for k in range(1, n + 1):
        if i + k < end:
            cp = (cp << 6) | (np.int64(data[i + k]) & 0x3F)
    return cp, i + n + 1


@njit(cache=True, nogil=True)
def _words(data, lo, hi, is_word, is_space, byte_mult, length_mult, out, want_words):
    """The digest of data[lo:hi]'s normalized text, and (want_words) its words' hashes written to `out`;
    returns (word count, digest lane a, digest lane b)."""
    count, acc, length, emitted = 0, _ZERO, 0, 0
    da, db = _FNV_A, _FNV_B
    started, pending = False, False  # digest: text seen yet, a whitespace run waiting to become one space
    i = lo
    while i < hi:
        start = i
        cp, i = _read(data, i, hi)
        if 65 <= cp <= 90:
            cp += 32
        space = is_space[cp]
        if space:
            pending = started
        else:
            if pending:
                da = (da ^ _SPACE) * _FNV_PRIME
                db = (db ^ _SPACE) * _FNV_PRIME
                emitted += 1
                pending = False
            started = True
        word = want_words and is_word[cp]
        for k in range(start, i):  # the character's bytes (lowercased when ASCII)
            byte = np.uint64(cp) if cp < 128 else np.uint64(data[k])
            if not space:
                da = (da ^ byte) * _FNV_PRIME
                db = (db ^ byte) * _FNV_PRIME
                emitted += 1
            if word:
                acc += byte * byte_mult[length & 63]
                length += 1
        if not word and length:
            out[count] = mix64(acc + np.uint64(length) * length_mult)
            count, acc, length = count + 1, _ZERO, 0
    if length:
        out[count] = mix64(acc + np.uint64(length) * length_mult)
        count += 1
    return count, mix64(da), mix64(db ^ np.uint64(emitted))


@njit(cache=True, nogil=True)
def digest(data, is_word, is_space):
    """The digest of one text (two uint64), as fingerprint_batch computes it, in constant memory."""
    _, da, db = _words(data, 0, len(data), is_word, is_space, np.zeros(64, np.uint64), _ZERO,
                       np.zeros(1, np.uint64), False)
    return da, db


@njit(cache=True, nogil=True, inline="always")
def _next_pow2(n):
    size = 1
    while size < n:
        size *= 2
    return size


@njit(cache=True, nogil=True, inline="always")
def _table_mask(n):
    return 2 * _next_pow2(n) - 1  # at most half full: short probe runs


@njit(cache=True, nogil=True, inline="always")
def _insert(keys, stamps, mask, stamp, key):
    """Add `key` (a well-mixed hash) to the set marked `stamp`; True if it was not there yet."""
    i = np.int64(key & np.uint64(mask))
    while stamps[i] == stamp:
        if keys[i] == key:
            return False
        i = (i + 1) & mask
    stamps[i], keys[i] = stamp, key
    return True


@njit(cache=True, nogil=True)
def fingerprint_batch(data, offsets, n, a, b, byte_mult, length_mult, is_word, is_space):
    """Document d is data[offsets[d]:offsets[d + 1]]. Returns (digests (docs, 2) uint64, signatures,
    distinct words, shingle set values, shingle set sizes), with n-word shingles and permutations (a, b)."""
    docs = len(offsets) - 1
    num_perm = len(a)
    hashes = np.empty(len(data) // 2 + 1, np.uint64)  # a word takes a byte and a separator
    digests = np.empty((docs, 2), np.uint64)
    sigs = np.full((docs, num_perm), np.uint32(0xFFFFFFFF), np.uint32)
    distinct = np.zeros(docs, np.int64)
    sizes = np.zeros(docs, np.int64)
    values = np.empty(len(hashes), np.uint32)  # at most one shingle per word
    shingles = np.empty(len(hashes), np.uint32)
    # one open-addressing hash set, reused by every document: an entry counts only under the current stamp,
    # so nothing is ever cleared; a small document uses only the start of it (cache-friendly)
    table_keys = np.empty(2 * _next_pow2(len(hashes)), np.uint64)
    table_stamp = np.zeros(len(table_keys), np.int64)
    a64, b64 = a.astype(np.uint64), b.astype(np.uint64)
    out = 0
    for d in range(docs):
        lo, hi = offsets[d], offsets[d + 1]
        length, da, db = _words(data, lo, hi, is_word, is_space, byte_mult, length_mult, hashes, True)
        digests[d, 0], digests[d, 1] = da, db
        if length == 0:
            continue
        mask = _table_mask(length)
        count = 0  # distinct words: unique 40-bit keys, as minhash.word_hashes counts them
        for k in range(length):
            count += _insert(table_keys, table_stamp, mask, 2 * d + 1, hashes[k] >> _U24)
        distinct[d] = count
        m = length - n + 1 if length >= n else 1
        for p in range(m):
            combined = hashes[p]
            for j in range(1, n):
                combined = combined * _SHINGLE_MULT + (hashes[p + j] if p + j < length else _ZERO)
            shingles[p] = np.uint32(mix64(combined) >> _U32)
        sig = sigs[d]
        for q in range(num_perm):  # a min-reduction over the shingles per permutation: it vectorizes
            aq, bq, low = a64[q], b64[q], _LOW32
            for p in range(m):
                v = (aq * np.uint64(shingles[p]) + bq) & _LOW32
                if v < low:
                    low = v
            sig[q] = np.uint32(low)
        mask = _table_mask(m)
        size = 0  # the shingle set: each distinct hash once, sorted (the same however documents are batched)
        for p in range(m):
            if _insert(table_keys, table_stamp, mask, 2 * d + 2, np.uint64(shingles[p])):
                values[out + size] = shingles[p]
                size += 1
        values[out:out + size].sort()
        sizes[d] = size
        out += size
    return digests, sigs, distinct, values[:out].copy(), sizes


@njit(cache=True, nogil=True)
def jaccards(shingles, offsets, pairs):
    """True Jaccard similarity of each pair's sorted shingle sets (a merge walk per pair; two empty sets: 1.0)."""
    out = np.empty(len(pairs), np.float64)
    for k in range(len(pairs)):
        a0, a1 = offsets[pairs[k, 0]], offsets[pairs[k, 0] + 1]
        b0, b1 = offsets[pairs[k, 1]], offsets[pairs[k, 1] + 1]
        total = (a1 - a0) + (b1 - b0)
        if total == 0:
            out[k] = 1.0
            continue
        shared = 0
        while a0 < a1 and b0 < b1:
            x, y = shingles[a0], shingles[b0]
            if x == y:
                shared += 1
                a0 += 1
                b0 += 1
            elif x < y:
                a0 += 1
            else:
                b0 += 1
        out[k] = shared / (total - shared)
    return out
