"""The compiled fingerprint kernel (stages/dedup/kernel.py) computes exactly what minhash.py's numpy
reference defines, on messy text: any case, punctuation, ASCII control whitespace, Unicode spaces,
ligatures, accents, CJK, emoji; and its digest groups texts exactly as normalize_text does."""
from __future__ import annotations

import random

import numpy as np

from stages.dedup import minhash as mh

ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789_ .,;:-!?'\"()[]\t\n\r\x0b\x0c\x1c\x1f")
            + list("éÉßﬁµ°–—“”…\u00a0\u2003\u3000\u200b日本語Ωω\u0085\u2028😀İ"))
WORDS = ["the", "cat", "Sat", "on", "mat", "x", " ", "Fever", "fever,", "FEVER"]
EDGES = ["", " ", "\n\n", "a", "A b", "one two three four", "one two three four five", "İstanbul", "ﬁle", "file",
         "File.", "  file  ", "\x1cfile\x1f"]


def corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) if rng.random() < 0.3 else rng.choice(WORDS)
                    for _ in range(rng.randint(0, 300))) for _ in range(n)] + EDGES


def reference(texts: list[str], num_perm: int, n: int):
    """minhash.py's numpy path over normalize_text + WORD_RE tokens: the definition."""
    tokens = [mh._tokens(mh.normalize_text(t)) for t in texts]
    hashes, lengths, distinct = mh.word_hashes("\n".join(tokens).encode("utf-8"), len(tokens))
    hv, counts = mh.shingle_hashes(hashes, lengths, n)
    values, sizes = mh._shingle_sets(hv, counts)
    a, b = mh.permutations(num_perm)
    return mh._minhash(hv, counts, a, b), distinct, values, sizes


def test_kernel_fingerprints_equal_the_numpy_reference():
    texts = corpus(5, 1500)
    fp = mh.fingerprint(texts, 64, 5)
    sigs, distinct, values, sizes = reference(texts, 64, 5)
    assert np.array_equal(fp.signatures, sigs) and np.array_equal(fp.quality, distinct)
    ends = np.cumsum(sizes)
    for i in range(len(texts)):
        assert np.array_equal(np.sort(fp.shingle_set(i)), values[ends[i] - sizes[i]:ends[i]]), texts[i]


def test_digests_group_texts_exactly_as_normalize_text_does():
    texts = corpus(6, 1500) + [t.upper() for t in EDGES] + [f"  {t}\t" for t in EDGES]
    fp = mh.fingerprint(texts, 16, 5)
    by_digest: dict[bytes, set[str]] = {}
    for digest, text in zip(fp.digests, texts):
        by_digest.setdefault(digest, set()).add(mh.normalize_text(text))
    assert all(len(norms) == 1 for norms in by_digest.values())            # no two normal forms share a digest
    assert len(by_digest) == len({mh.normalize_text(t) for t in texts})     # one normal form, one digest
    assert fp.digests[texts.index("ﬁle")] == fp.digests[texts.index("file")] == fp.digests[texts.index("  file  ")]


def test_a_document_longer_than_a_batch_gets_the_same_fingerprint_as_in_a_batch(monkeypatch):
    texts = corpus(7, 40)
    whole = mh.fingerprint(texts, 32, 5)
    monkeypatch.setattr(mh, "CHARS_PER_BATCH", 200)  # most documents now take the long, windowed numpy path
    long = mh.fingerprint(texts, 32, 5)
    assert whole.digests == long.digests
    assert np.array_equal(whole.signatures, long.signatures) and np.array_equal(whole.quality, long.quality)
    for i in range(len(texts)):
        assert np.array_equal(np.sort(whole.shingle_set(i)), np.sort(long.shingle_set(i)))


def test_cluster_roots_are_each_component_s_smallest_index():
    """cluster() (connected components) against a plain union-find over the same edges: exact copies and
    verified near pairs, chains included (a ~ b ~ c with a !~ c is one cluster)."""
    from stages.dedup import lsh

    rng = random.Random(8)
    words = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choices(words, k=60)) for _ in range(40)]
    texts = []
    for t in base:
        texts.append(t)
        w = t.split()
        for k in range(rng.randint(0, 3)):  # a chain of near copies, each one word further off
            w = w[:]
            w[rng.randrange(len(w))] = f"x{k}"
            texts.append(" ".join(w))
        if rng.random() < 0.3:
            texts.append(t.upper())  # an exact copy after normalization
    rng.shuffle(texts)
    fp = mh.fingerprint(texts, 128, 5)
    parent = list(range(len(texts)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    first: dict[bytes, int] = {}
    edges = [(first.setdefault(d, i), i) for i, d in enumerate(fp.digests)]
    for i, j in edges + [tuple(p) for p in lsh.near_pairs(fp, 0.8).tolist()]:
        ri, rj = find(i), find(j)
        parent[max(ri, rj)] = min(ri, rj)
    roots = lsh.cluster(fp, 0.8)
    assert roots.tolist() == [find(i) for i in range(len(texts))]
    assert len(set(roots.tolist())) < len(texts) - 20  # chains and copies did merge


def test_verification_jaccard_is_the_exact_set_jaccard():
    from stages.dedup import kernel

    texts = corpus(9, 200)
    fp = mh.fingerprint(texts, 16, 3)
    rng = random.Random(9)
    pairs = np.array([(rng.randrange(len(texts)), rng.randrange(len(texts))) for _ in range(500)], dtype=np.int64)
    got = kernel.jaccards(fp.shingles, fp.offsets, pairs)
    for (i, j), value in zip(pairs.tolist(), got):
        a, b = set(fp.shingle_set(i).tolist()), set(fp.shingle_set(j).tolist())
        assert value == (len(a & b) / len(a | b) if a | b else 1.0)
