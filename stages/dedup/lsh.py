"""Near-duplicate clusters from MinHash fingerprints, staged like datatrove's MinHash dedup:
LSH candidate pairs -> pairs verified on true Jaccard -> union-find clusters -> one keeper per cluster.

The banding is datasketch MinHashLSH's: each signature cut into `bands` bands of `rows` values, two
documents a candidate pair when any band is equal. The buckets come from numpy: a band's rows are
sorted and equal neighbours share a bucket, with no Python object per document.

Everything here is engine-independent. `candidate_pairs` is the local engine; the Ray engine
(stages/dedup/ray_engine.py) finds the same buckets on a cluster with `band_hash` and `bucket_pairs`
and hands its pairs to `decide(..., candidates=...)`, so verification and clustering run here for both.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from stages.dedup import kernel, minhash
from stages.dedup.minhash import MINHASH_SCHEME, MINHASH_SEED, Fingerprints, mix64

LSH_RECALL = 0.98    # chance that a pair exactly at the threshold shares a band (more above it)
VERIFY_CHUNK = 200_000  # candidate pairs screened at once (x num_perm x 8 bytes)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# (fingerprints, documents, (bands, rows)) -> candidate pairs (i < j), sorted and unique
Candidates = Callable[[Fingerprints, np.ndarray, tuple[int, int]], np.ndarray]


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance candidates) that still make a pair at
    the threshold a candidate with probability >= `recall`; every candidate is verified exactly."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


# --- candidate pairs
def candidate_pairs(fp: Fingerprints, docs: np.ndarray, params: tuple[int, int]) -> np.ndarray:
    """Pairs (i < j) of `docs` that share an LSH bucket, sorted and unique (the local engine). The bands are
    bucketed on a thread pool (numpy's sorts release the GIL): every core works, the pairs are the same."""
    n = len(fp)
    with ThreadPoolExecutor(max_workers=minhash.cores()) as pool:
        codes = list(pool.map(lambda band: bucket_pairs(band, docs, n), bands(fp.signatures, docs, params)))
    return pairs_from_codes(codes, n)


def pairs_from_codes(codes: list[np.ndarray], n: int) -> np.ndarray:
    """Pair codes i * n + j (any order, repeats allowed) -> the sorted unique pairs, shape (m, 2)."""
    codes = [c for c in codes if len(c)]
    if not codes:
        return np.zeros((0, 2), dtype=np.int64)
    unique = np.unique(np.concatenate(codes))
    return np.stack([unique // n, unique % n], axis=1)


def bands(signatures: np.ndarray, docs: np.ndarray, params: tuple[int, int]) -> Iterator[np.ndarray]:
    """Each band of the `docs`' signatures: (len(docs), rows) values, as MinHashLSH cuts them."""
    count, rows = params
    for start in range(0, count * rows, rows):
        yield np.ascontiguousarray(signatures[docs, start:start + rows])


def band_hash(band: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each row of `band`: equal rows, equal hashes (unequal rows may collide too)."""
    with np.errstate(over="ignore"):
        mixed = np.zeros(len(band), np.uint64)
        for column in band.T:
            mixed = mix64(mixed * _GOLDEN + column)
    return mixed


def _runs(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, same): `order` sorts the band's rows so that equal rows (one bucket) are neighbours;
    same[p] says whether row order[p] equals row order[p + 1]."""
    mixed = band_hash(band)
    order = np.argsort(mixed)  # equal rows, equal mixes: each bucket a run
    same = (band[order[1:]] == band[order[:-1]]).all(axis=1)
    if (~same & (mixed[order[1:]] == mixed[order[:-1]])).any():  # two different rows, one mix: sort the rows
        order = np.lexsort(band.T[::-1])
        same = (band[order[1:]] == band[order[:-1]]).all(axis=1)
    return order, same


def bucket_pairs(band: np.ndarray, docs: np.ndarray, n: int) -> np.ndarray:
    """Pairs of `docs` whose rows of `band` are equal, each as the code i * n + j with i < j: what the
    band's MinHashLSH hashtable puts in one bucket."""
    order, same = _runs(band)
    if not same.any():
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    sizes = np.diff(np.append(starts, len(order)))
    pos = np.arange(len(order))
    later = np.repeat(starts + sizes, sizes) - pos - 1  # members after each one in its bucket
    left = np.repeat(pos, later)
    right = left + 1 + np.arange(len(left)) - np.repeat(np.cumsum(later) - later, later)
    i, j = docs[order[left]], docs[order[right]]
    return np.minimum(i, j) * n + np.maximum(i, j)


# --- datasketch interop: our signatures in datasketch's MinHashLSH (tests compare its buckets with ours)
def sketch(signature: np.ndarray):
    """A signature as datasketch takes it: a LeanMinHash of our seed and scheme."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=MINHASH_SCHEME)


def insert_all(lsh, signatures: np.ndarray, docs: np.ndarray) -> None:
    """Index `docs` in a datasketch MinHashLSH, keyed by 4-byte big-endian row numbers, in one insertion session."""
    with lsh.insertion_session() as session:
        for i in docs.tolist():
            session.insert(i.to_bytes(4, "big"), sketch(signatures[i]), check_duplication=False)


# --- verification
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
    # exact Jaccard in the compiled kernel, chunks of pairs on a thread pool (it releases the GIL)
    chunks = np.array_split(plausible, max(1, min(minhash.cores(), len(plausible) // 1000)))
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        scores = list(pool.map(lambda chunk: kernel.jaccards(fp.shingles, fp.offsets, pairs[chunk]), chunks))
    keep[plausible] = np.concatenate(scores) >= threshold
    return pairs[keep]


def near_pairs(fp: Fingerprints, threshold: float, candidates: Candidates | None = None,
               stats: dict[str, Any] | None = None) -> np.ndarray:
    """Verified near-duplicate pairs among documents that are not exact copies of an earlier one;
    `candidates` finds the LSH candidate pairs (default: candidate_pairs, in this process)."""
    candidates = candidates or candidate_pairs
    stats = {} if stats is None else stats
    first: dict[bytes, int] = {}
    reps = np.array([i for i, d in enumerate(fp.digests) if first.setdefault(d, i) == i], dtype=np.int64)
    if len(reps) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    params = lsh_params(threshold, fp.signatures.shape[1])
    pairs = candidates(fp, reps, params)
    verified = verify(fp, pairs, threshold)
    stats.update({"bands": params[0], "rows": params[1], "candidate_pairs": len(pairs), "near_pairs": len(verified)})
    return verified


# --- clusters and keepers
def cluster(fp: Fingerprints, threshold: float, candidates: Candidates | None = None,
            stats: dict[str, Any] | None = None) -> np.ndarray:
    """Cluster root per document: the smallest index of its connected component, where exact duplicates and
    verified near-duplicate pairs are the edges (scipy's connected components: no Python loop per document)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(fp)
    first: dict[bytes, int] = {}
    exact = [(first.setdefault(d, i), i) for i, d in enumerate(fp.digests)]  # (the first copy, this one)
    exact = np.array([(j, i) for j, i in exact if j != i], dtype=np.int64).reshape(-1, 2)
    edges = np.concatenate([exact, near_pairs(fp, threshold, candidates, stats)])
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    root_of_label = np.full(label.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(root_of_label, label, np.arange(n, dtype=np.int64))
    return root_of_label[label]


@dataclass
class Decision:
    roots: np.ndarray     # cluster root per document
    keep: np.ndarray      # bool per document
    keeper: np.ndarray    # index of the kept document of each document's cluster
    exact: np.ndarray     # bool: removed as an exact duplicate
    near: np.ndarray      # bool: removed as a near duplicate


def decide(fp: Fingerprints, threshold: float, rank: list[tuple], candidates: Candidates | None = None,
           stats: dict[str, Any] | None = None) -> Decision:
    """One keeper per cluster: the document with the smallest `rank` (priority, -quality, id)."""
    n = len(fp)
    roots = cluster(fp, threshold, candidates, stats)
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


