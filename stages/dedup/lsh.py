"""Near-duplicate clusters from MinHash fingerprints, staged like datatrove's MinHash dedup:
LSH candidate pairs -> pairs verified on true Jaccard -> union-find clusters -> one keeper per cluster.

The banding is datasketch MinHashLSH's: each signature cut into `bands` bands of `rows` values, two
documents a candidate pair when any band is equal. In memory (the default) the buckets come from
numpy: a band's rows are sorted and equal neighbours share a bucket, with no Python object per
document. With `backend = "redis"` the index is a real MinHashLSH on Redis, filled and read through
datasketch's public API alone (insertion_session, query); the pairs are the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from stages.dedup.minhash import MINHASH_SCHEME, MINHASH_SEED, Fingerprints, mix64
from stages.errors import StageError

LSH_RECALL = 0.98    # chance that a pair exactly at the threshold shares a band (more above it)
VERIFY_CHUNK = 200_000  # candidate pairs screened at once (x num_perm x 8 bytes)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance candidates) that still make a pair at
    the threshold a candidate with probability >= `recall`; every candidate is verified exactly."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


# --- candidate pairs
def candidate_pairs(fp: Fingerprints, docs: np.ndarray, params: tuple[int, int],
                    storage: dict[str, Any] | None = None, redis_url: str = "") -> np.ndarray:
    """Pairs (i < j) of `docs` that share an LSH bucket, sorted and unique: the same on every backend.
    `storage`: datasketch's storage_config of a Redis index (storage_config()), or None for memory."""
    n = len(fp)
    if storage is None:
        codes = [_bucket_pairs(band, docs, n) for band in _bands(fp.signatures, docs, params)]
    else:
        codes = _redis_pairs(fp, docs, params, storage, redis_url)
    codes = [c for c in codes if len(c)]
    if not codes:
        return np.zeros((0, 2), dtype=np.int64)
    unique = np.unique(np.concatenate(codes))
    return np.stack([unique // n, unique % n], axis=1)


def _bands(signatures: np.ndarray, docs: np.ndarray, params: tuple[int, int]) -> Iterator[np.ndarray]:
    """Each band of the `docs`' signatures: (len(docs), rows) values, as MinHashLSH cuts them."""
    bands, rows = params
    for start in range(0, bands * rows, rows):
        yield np.ascontiguousarray(signatures[docs, start:start + rows])


def _runs(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, same): `order` sorts the band's rows so that equal rows (one bucket) are neighbours;
    same[p] says whether row order[p] equals row order[p + 1]."""
    with np.errstate(over="ignore"):
        mixed = np.zeros(len(band), np.uint64)
        for column in band.T:
            mixed = mix64(mixed * _GOLDEN + column)
    order = np.argsort(mixed)  # equal rows, equal mixes: each bucket a run
    same = (band[order[1:]] == band[order[:-1]]).all(axis=1)
    if (~same & (mixed[order[1:]] == mixed[order[:-1]])).any():  # two different rows, one mix: sort the rows
        order = np.lexsort(band.T[::-1])
        same = (band[order[1:]] == band[order[:-1]]).all(axis=1)
    return order, same


def _bucket_pairs(band: np.ndarray, docs: np.ndarray, n: int) -> np.ndarray:
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


# --- the Redis index: a datasketch MinHashLSH, public API only
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


def sketch(signature: np.ndarray):
    """A signature as datasketch takes it: a LeanMinHash of our seed and scheme."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=MINHASH_SCHEME)


def insert_all(lsh, signatures: np.ndarray, docs: np.ndarray) -> None:
    """Index `docs` in a datasketch MinHashLSH, keyed by 4-byte big-endian row numbers, in one insertion
    session (on Redis: pipelined)."""
    with lsh.insertion_session() as session:
        for i in docs.tolist():
            session.insert(i.to_bytes(4, "big"), sketch(signatures[i]), check_duplication=False)


def _redis_pairs(fp: Fingerprints, docs: np.ndarray, params: tuple[int, int], storage: dict[str, Any],
                 redis_url: str) -> list[np.ndarray]:
    """candidate_pairs' codes from a MinHashLSH on Redis: all documents inserted, then queried, those
    that sit in a shared bucket (_to_query); the run's keys are deleted at the end, whatever happens."""
    from datasketch import MinHashLSH

    client = _connect(storage, redis_url)
    n = len(fp)
    lsh = MinHashLSH(num_perm=fp.signatures.shape[1], params=params, storage_config=storage, prepickle=False)
    try:
        insert_all(lsh, fp.signatures, docs)
        codes = []
        for k in _to_query(fp.signatures, docs, params).tolist():
            found = np.array([int.from_bytes(key, "big") for key in lsh.query(sketch(fp.signatures[k]))], np.int64)
            found = found[found != k]
            codes.append(np.minimum(found, k) * n + np.maximum(found, k))
        return codes
    finally:
        keys = list(client.scan_iter(match=storage["basename"] + b"*", count=10_000))
        for start in range(0, len(keys), 10_000):
            client.delete(*keys[start:start + 10_000])


def _to_query(signatures: np.ndarray, docs: np.ndarray, params: tuple[int, int]) -> np.ndarray:
    """The `docs` whose queries find every candidate pair: of each bucket of two or more, every member
    but the last (the last one's pairs are found from the others). MinHashLSH's bucket key is a
    one-to-one function of the band (no hashfunc here), so its buckets are the groups of equal bands
    found in memory: no need to read the whole index's bucket counts from Redis."""
    wanted = np.zeros(len(docs), dtype=bool)
    for band in _bands(signatures, docs, params):
        order, same = _runs(band)
        wanted[order[:-1][same]] = True
    return docs[wanted]


# --- verification
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


# --- clusters and keepers
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


