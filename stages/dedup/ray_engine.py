"""The Ray engine (`[dedup] engine = "ray"`): dedup's fingerprints and LSH banding as tasks on a Ray cluster.

What runs where:
- the driver (the machine running `doit dedup`) reads and cleans every source, keeps the per-source
  fingerprint cache, verifies the candidate pairs, clusters them (union-find) and writes kept.jsonl:
  the same code as the local engine, in stages/dedup/lsh.py and stage.py;
- the cluster fingerprints, one task per shard of a source's texts, with minhash.fingerprint itself
  (a document's fingerprint does not depend on its shard), and groups band buckets by key as a
  shuffle: each map task cuts a block of signatures into bands and sends every band row to one of R
  reducers by a hash of (band number, band values); each reducer finds its buckets exactly (equal
  band values, lsh.bucket_pairs) and returns their pairs.
Every bucket lies whole in one reducer, so the candidate pairs are the local engine's, and so are the
verified pairs, the clusters and kept.jsonl, byte for byte.

Workers import this module, so every node needs medforge installed. ray.init refuses a node whose Ray or
Python differs from the driver's; on connecting, one task per node compares that node's dedup code (the
files of this package) with the driver's, since other code could fingerprint differently without a sign.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import time
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

import numpy as np
import ray

from stages.dedup import lsh
from stages.dedup.minhash import Fingerprints, fingerprint, mix64
from stages.errors import StageError

SHARD_CHARS = 4 << 20   # text per fingerprint task: big enough to amortise a task, small enough to spread
MAX_PENDING = 64        # fingerprint shards in flight at once: the driver's text and the object store stay bounded
BLOCK_DOCS = 50_000     # signatures per band-map task
CONNECT_TIMEOUT_S = 10  # ray.init waits minutes on an address nobody listens on; a TCP probe answers first
# Ray Client's server starts one process per client session; when that process dies as it starts, the connection
# fails with "Initialization failure from server" (seen here: psutil.ZombieProcess, "no specific server"), and a new
# session usually starts: so many tries, a second apart, before it is the one-line error
SESSION_TRIES = 3
SESSION_FAILED = "Initialization failure from server"


def _unreachable(address: str, why: str) -> StageError:
    if not address:
        return StageError(f"dedup: could not start a Ray on this machine for dedup.engine = \"ray\" in sources.toml "
                          f"({why}); set dedup.address to a running cluster, or dedup.engine = \"local\"")
    return StageError(f"dedup: cannot connect to the Ray cluster at dedup.address = {address!r} in sources.toml ({why}); "
                      f"start it (`ray start --head` on the head node), fix the address, or set dedup.engine = "
                      f"\"local\"")


def _probe(address: str) -> None:
    """Fail fast when nothing listens at a `host:port` or `ray://host:port` address ("auto" is Ray's to resolve)."""
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise _unreachable(address, "expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise _unreachable(address, f"{parts.hostname}:{port}: {exc.strerror or exc}") from None


def _reason(exc: BaseException) -> str:
    """One line of why Ray refused: its first line, and where that only heads the server's answer ("Initialization
    failure from server:" over a traceback), that answer's last line too."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[-1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0]


class RayEngine:
    """A Ray session for one dedup run: `with RayEngine(address) as engine:` connects (or, with no address,
    starts a Ray on this machine for the run) and disconnects at the end."""

    def __init__(self, address: str):
        self.address = address

    def __enter__(self) -> "RayEngine":
        if self.address:
            _probe(self.address)
        for attempt in range(1, SESSION_TRIES + 1):
            try:
                # "local": a fresh Ray on this machine, never some other cluster found here by accident
                ray.init(address=self.address or "local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, configure_logging=False)
                break
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
                # a connection that failed half-way (Ray Client's "Initialization failure from server") leaves
                # this process's Ray half set up, and every later ray.init in it then fails: undo it first
                ray.shutdown()
                if attempt == SESSION_TRIES or SESSION_FAILED not in str(exc):
                    raise _unreachable(self.address, _reason(exc)) from None
                time.sleep(1)
        try:
            self._check_code()
        except BaseException:
            ray.shutdown()
            raise
        return self

    def _check_code(self) -> None:
        """Every node's stages/dedup code is the driver's (one pinned task per node)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [node for node in ray.nodes() if node.get("Alive")]
        refs = [_code_identity.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote() for node in nodes]
        mine = code_identity()
        for node, (theirs, where) in zip(nodes, ray.get(refs)):
            if theirs != mine:
                raise StageError(f"dedup: the Ray node {node.get('NodeManagerAddress')} runs other dedup code ({where}) "
                                 f"than this machine ({Path(__file__).parent}); install this medforge checkout on "
                                 f"every node (dedup.address = {self.address!r} in sources.toml)")

    def __exit__(self, *exc) -> None:
        ray.shutdown()

    def describe(self) -> str:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        return f"ray at {self.address or 'a local Ray started for this run'} ({nodes} node(s), {cpus} CPU(s))"

    def reducers(self) -> int:
        # one per CPU of the cluster; at least two, so that each map task returns a tuple of parts
        return max(2, int(ray.cluster_resources().get("CPU", 1)))

    def fingerprint(self, texts: Iterable[str], num_perm: int, shingle_words: int) -> Fingerprints:
        """minhash.fingerprint(texts, ...), computed as Ray tasks over shards of `texts`: the same result."""
        refs: list[ray.ObjectRef] = []
        shard: list[str] = []
        chars = 0
        for text in texts:
            shard.append(text)
            chars += len(text)
            if chars >= SHARD_CHARS:
                refs.append(_fingerprint.remote(shard, num_perm, shingle_words))
                shard, chars = [], 0
                if len(refs) > MAX_PENDING:  # the reader is ahead of the cluster: wait for an older shard
                    ray.wait([refs[-MAX_PENDING - 1]], fetch_local=False)
        if shard:
            refs.append(_fingerprint.remote(shard, num_perm, shingle_words))
        return Fingerprints.concat(ray.get(refs), num_perm)

    def candidate_pairs(self, fp: Fingerprints, docs: np.ndarray, params: tuple[int, int]) -> np.ndarray:
        """lsh.candidate_pairs(fp, docs, params) as a shuffle on the cluster: map tasks over blocks of
        signatures, reducers over band-bucket keys; the same sorted unique pairs."""
        reducers = self.reducers()
        parts = [_map_bands.options(num_returns=reducers).remote(fp.signatures[block], block, params, reducers)
                 for block in (docs[lo:lo + BLOCK_DOCS] for lo in range(0, len(docs), BLOCK_DOCS))]
        codes = [_reduce_buckets.remote(len(fp), *(part[r] for part in parts)) for r in range(reducers)]
        return lsh.pairs_from_codes(ray.get(codes), len(fp))


def code_identity() -> str:
    """A hash of this package's source files: equal on two machines when they dedup alike."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@ray.remote(num_cpus=0)  # a check, not work: it runs beside any task, never waits for a free CPU
def _code_identity() -> tuple[str, str]:
    return code_identity(), str(Path(__file__).parent)


@ray.remote
def _fingerprint(texts: list[str], num_perm: int, shingle_words: int) -> Fingerprints:
    return fingerprint(texts, num_perm, shingle_words)


@ray.remote
def _map_bands(signatures: np.ndarray, ids: np.ndarray, params: tuple[int, int], reducers: int
               ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """Every band row of these documents, sent to reducer hash(band number, values) % reducers: one
    (band numbers, document ids, band values) triple per reducer."""
    rows = params[1]
    numbers, values, targets = [], [], []
    for b, band in enumerate(lsh.bands(signatures, np.arange(len(ids)), params)):
        with np.errstate(over="ignore"):  # the band number is mixed in: equal values in two bands are two buckets
            key = mix64(lsh.band_hash(band) + np.uint64(b))
        numbers.append(np.full(len(band), b, np.int32))
        values.append(band)
        targets.append(key % np.uint64(reducers))
    number = np.concatenate(numbers) if numbers else np.zeros(0, np.int32)
    value = np.concatenate(values) if values else np.zeros((0, rows), np.uint32)
    target = np.concatenate(targets).astype(np.int64) if targets else np.zeros(0, np.int64)
    doc = np.tile(ids, len(numbers))
    order = np.argsort(target, kind="stable")
    cuts = np.cumsum(np.bincount(target, minlength=reducers))[:-1]
    return tuple(zip(np.split(number[order], cuts), np.split(doc[order], cuts), np.split(value[order], cuts)))


@ray.remote
def _reduce_buckets(n: int, *parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The pair codes (i * n + j) of every bucket whose rows this reducer was sent: per band number, the
    documents whose band values are equal, found exactly as the local engine does."""
    number = np.concatenate([p[0] for p in parts])
    doc = np.concatenate([p[1] for p in parts])
    value = np.concatenate([p[2] for p in parts])
    codes = [lsh.bucket_pairs(value[number == b], doc[number == b], n) for b in np.unique(number).tolist()]
    codes = [c for c in codes if len(c)]
    return np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
