"""dedup — exact and near-duplicate removal across every enabled source.

minhash: normalized text -> digest, MinHash signature, shingle set (numpy);
lsh: candidate pairs (LSH bands) -> verified pairs -> union-find clusters -> one keeper per cluster;
ray_engine: `[dedup] engine = "ray"`: fingerprints and LSH buckets as tasks on a Ray cluster, the same pairs
(imported only then: Ray is an optional dependency);
stage: `doit dedup` (`run`) and `medforge dedup` (`dedup_command`).
"""
from stages.dedup.lsh import cluster, decide, lsh_params
from stages.dedup.minhash import SIGNATURE_VERSION, WORD_RE, Fingerprints, fingerprint, normalize_text
from stages.dedup.stage import dedup_command, example_text, run

__all__ = ["SIGNATURE_VERSION", "WORD_RE", "Fingerprints", "cluster", "decide", "dedup_command", "example_text",
           "fingerprint", "lsh_params", "normalize_text", "run"]
