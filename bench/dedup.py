"""Near-duplicate detection: medforge's dedup against datasketch's best configuration, same corpus, same run.

The corpus: documents of a chosen length mix (Zipf-distributed vocabulary), and for a
share of them a planted copy with words replaced at spaced positions so that the 5-word-shingle
Jaccard similarity to its original is a chosen value in [0.5, 1.0] (then measured exactly, which
is the "known" similarity the scores use). Pairs at J >= threshold must be found; pairs below it
(many between 0.6 and 0.8) must not.

medforge: `dedup.fingerprint` (the compiled kernel, a batch per core) + `dedup.cluster` (MinHashLSH's banding, bands x
rows from `dedup.lsh_params`, its buckets found with numpy; candidates verified on true Jaccard, union-find).
datasketch: word shingles in Python, `MinHash.bulk` with xxhash's 32-bit hash (its fastest
permutation scheme, picked by timing affine32 and legacy here), `MinHashLSH` insert + query with
the same bands x rows, candidates kept at estimated Jaccard >= threshold.

rensa (Rust): `RMinHash.from_token_sets` on the same word shingles, `RMinHashLSH` insert + query with the
band count nearest medforge's that divides num_perm, candidates kept at estimated Jaccard >= threshold.

Prints one JSON line: docs/s of all three (end to end, and signatures alone; medforge on one core and on
all), the speed-ups, and recall at J >= threshold and precision of the near-duplicate pairs each reports.

    python bench/dedup.py [--docs 20000] [--length mix|short|abstract|long|legacy] [--copies 0.25] [--threshold 0.8]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import dedup  # noqa: E402

SHINGLE = 5
NUM_PERM = 128


def words_of(text: str) -> list[str]:
    return dedup.WORD_RE.findall(dedup.normalize_text(text))


def shingle_set(words: list[str]) -> set[str]:
    if len(words) < SHINGLE:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# words per document: ICD-10-like lines, abstracts, guidance chunks; "mix" draws each document's kind by
# share of documents (most are short or abstracts; a few long ones carry a large share of the text)
LENGTHS = {"short": (5, 15), "abstract": (150, 400), "long": (4000, 6000)}
MIX = (("short", 0.3), ("abstract", 0.65), ("long", 0.05))


def doc_words(rng: random.Random, length: str) -> int:
    if length == "mix":
        length = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
    low, high = LENGTHS.get(length, (60, 300))
    return rng.randint(low, high)


def build_corpus(docs: int, copies: float, seed: int, length: str = "mix"
                 ) -> tuple[list[str], list[tuple[int, int, float]]]:
    """Texts, and (original, copy, exact Jaccard) for every planted copy."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}{c}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu", "vo", "ze")
             for b in ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t") for c in range(40)]
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(vocab))]
    n_copies = int(docs * copies)
    originals = [rng.choices(vocab, weights, k=doc_words(rng, length)) for _ in range(docs - n_copies)]
    texts = [" ".join(w) for w in originals]
    planted = []
    for c, src in enumerate(rng.sample(range(len(originals)), n_copies)):  # one copy per original: pairs
        words = list(originals[src])
        m = len(words) - SHINGLE + 1
        target = rng.uniform(0.5, 1.0)
        # k isolated replacements change 5k shingles each way: J = (m - 5k) / (m + 5k)
        k = max(0, min(round(m * (1 - target) / (SHINGLE * (1 + target))), (len(words) - 2) // (SHINGLE + 1)))
        slots = rng.sample(range((len(words) - 2) // (SHINGLE + 1)), k)
        for slot in slots:
            pos = 1 + slot * (SHINGLE + 1)
            words[pos] = f"x{c}q{pos}"
        text = " ".join(words)
        if rng.random() < 0.3:  # case and spacing differences must not matter
            text = text.upper().replace(" ", "  ", 3)
        texts.append(text)
        planted.append((src, len(texts) - 1, jaccard(shingle_set(words_of(texts[src])), shingle_set(words_of(text)))))
    return texts, planted


def score(found: set[tuple[int, int]], truth: set[tuple[int, int]], texts: list[str], threshold: float
          ) -> dict[str, float]:
    """Recall over true pairs; precision with every reported pair's similarity measured exactly."""
    cache: dict[int, set] = {}

    def shingles(i: int) -> set:
        if i not in cache:
            cache[i] = shingle_set(words_of(texts[i]))
        return cache[i]

    correct = sum(1 for p in found if p in truth or jaccard(shingles(p[0]), shingles(p[1])) >= threshold)
    return {"recall": round(len(found & truth) / max(len(truth), 1), 4),
            "precision": round(correct / max(len(found), 1), 4), "pairs": len(found)}


def run_medforge(texts: list[str], threshold: float, cores: set[int] | None = None) -> tuple[set, float, float]:
    """medforge end to end; `cores`: pinned to these CPUs (the process's affinity) for the run."""
    import os

    everywhere = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        return _run_medforge(texts, threshold)
    finally:
        os.sched_setaffinity(0, everywhere)


def _run_medforge(texts: list[str], threshold: float) -> tuple[set, float, float]:
    started = time.perf_counter()
    fp = dedup.fingerprint(texts, NUM_PERM, SHINGLE)
    signed = time.perf_counter()
    roots = dedup.cluster(fp, threshold)
    seconds = time.perf_counter() - started
    members: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        members.setdefault(r, []).append(i)
    found = {(a, b) for m in members.values() if len(m) > 1 for x, a in enumerate(m) for b in m[x + 1:]}
    return found, seconds, signed - started


def datasketch_signatures(texts: list[str], scheme: str):
    import xxhash
    from datasketch import MinHash

    shingles = [[s.encode("utf-8") for s in shingle_set(words_of(t))] for t in texts]
    return MinHash.bulk(shingles, num_perm=NUM_PERM, hashfunc=xxhash.xxh32_intdigest, scheme=scheme)


def run_datasketch(texts: list[str], threshold: float, scheme: str) -> tuple[set, float, float]:
    from datasketch import MinHashLSH

    started = time.perf_counter()
    sketches = datasketch_signatures(texts, scheme)
    signed = time.perf_counter()
    lsh = MinHashLSH(num_perm=NUM_PERM, params=dedup.lsh_params(threshold, NUM_PERM))
    found = set()
    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            if m.jaccard(sketches[j]) >= threshold:
                found.add((j, i))
        lsh.insert(i, m, check_duplication=False)
    return found, time.perf_counter() - started, signed - started


def rensa_bands() -> int:
    """RMinHashLSH needs bands dividing num_perm: the divisor nearest to medforge's band count."""
    bands = dedup.lsh_params(THRESHOLD_FOR_BANDS, NUM_PERM)[0]
    return min((b for b in range(1, NUM_PERM + 1) if NUM_PERM % b == 0), key=lambda b: abs(b - bands))


THRESHOLD_FOR_BANDS = 0.8


def run_rensa(texts: list[str], threshold: float) -> tuple[set, float, float]:
    """rensa as its README drives it: `RMinHash` per document (built with its batch constructor from the
    same word shingles), `RMinHashLSH` insert + query, candidates kept at estimated Jaccard >= threshold."""
    from rensa import RMinHash, RMinHashLSH

    started = time.perf_counter()
    sketches = RMinHash.from_token_sets([list(shingle_set(words_of(t))) for t in texts], NUM_PERM, 42)
    signed = time.perf_counter()
    lsh = RMinHashLSH(threshold, NUM_PERM, rensa_bands())
    found = set()
    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            if m.jaccard(sketches[j]) >= threshold:
                found.add((j, i))
        lsh.insert(i, m)
    return found, time.perf_counter() - started, signed - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--copies", type=float, default=0.25, help="share of the corpus that is planted copies")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length", choices=[*LENGTHS, "mix", "legacy"], default="mix",
                        help="document lengths: short lines, abstracts, long chunks, a mix of all three, or "
                             "the earlier 60-300 words")
    args = parser.parse_args()
    import datasketch  # noqa: F401  imported before any clock starts (it pulls in scipy: ~2 s)
    import rensa  # noqa: F401
    import xxhash  # noqa: F401

    global THRESHOLD_FOR_BANDS
    THRESHOLD_FOR_BANDS = args.threshold
    dedup.fingerprint(["warm the compiled kernel up"], NUM_PERM, SHINGLE)  # numba's first-use compile: once per machine
    texts, planted = build_corpus(args.docs, args.copies, args.seed, args.length)
    truth = {(a, b) for a, b, j in planted if j >= args.threshold}
    sample = texts[:2000]
    best_scheme = min(("affine32", "legacy"), key=lambda s: _timed(lambda: datasketch_signatures(sample, s)))
    import os

    cores = sorted(os.sched_getaffinity(0))
    mf1_found, mf1_s, _ = run_medforge(texts, args.threshold, cores={cores[0]})
    mf_found, mf_s, mf_sig = run_medforge(texts, args.threshold)
    rs_found, rs_s, rs_sig = run_rensa(texts, args.threshold)
    ds_found, ds_s, ds_sig = run_datasketch(texts, args.threshold, best_scheme)
    assert mf1_found == mf_found, "medforge found different pairs on one core and on all"
    n = len(texts)
    mf, rs, ds = (score(f, truth, texts, args.threshold) for f in (mf_found, rs_found, ds_found))
    result = {
        "docs": n, "length": args.length, "words": sum(len(t.split()) for t in texts), "planted_pairs": len(planted),
        "true_pairs": len(truth), "threshold": args.threshold, "num_perm": NUM_PERM, "shingle_words": SHINGLE,
        "lsh_bands_rows": list(dedup.lsh_params(args.threshold, NUM_PERM)), "cores": len(cores),
        "medforge_docs_per_s": round(n / mf_s), "medforge_1core_docs_per_s": round(n / mf1_s),
        "rensa_docs_per_s": round(n / rs_s), "datasketch_docs_per_s": round(n / ds_s),
        "speedup_vs_rensa": round(rs_s / mf_s, 2), "speedup": round(ds_s / mf_s, 2),
        "medforge_signature_docs_per_s": round(n / mf_sig), "rensa_signature_docs_per_s": round(n / rs_sig),
        "datasketch_signature_docs_per_s": round(n / ds_sig),
        "rensa_config": f"RMinHash.from_token_sets (rensa {_version('rensa')}) + RMinHashLSH({rensa_bands()} bands) "
                        "insert/query, estimated Jaccard",
        "datasketch_config": f"MinHash.bulk(hashfunc=xxhash.xxh32_intdigest, scheme={best_scheme!r}) + MinHashLSH "
                             f"insert/query, estimated Jaccard",
        "medforge_recall": mf["recall"], "medforge_precision": mf["precision"], "medforge_pairs": mf["pairs"],
        "rensa_recall": rs["recall"], "rensa_precision": rs["precision"], "rensa_pairs": rs["pairs"],
        "datasketch_recall": ds["recall"], "datasketch_precision": ds["precision"], "datasketch_pairs": ds["pairs"],
        "cpu": _cpu(),
    }
    result["targets_met"] = (result["speedup_vs_rensa"] >= 2 and result["speedup"] >= 5
                             and mf["recall"] >= 0.95 and mf["precision"] >= 0.99)
    import json

    print(json.dumps(result))
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
