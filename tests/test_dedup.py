"""dedup on real files in a temp project: exact and near duplicates, keepers, the per-source cache, the CLI."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages import config, dedup, io, layout
from stages.dedup import lsh, minhash
from stages.errors import StageError

REPO = Path(__file__).resolve().parents[1]
SOURCES = """
[dedup]
threshold = 0.8
source_priority = ["icd10cm", "news2"]

[sources.icd10cm]
kind = "icd10cm"
adapters = ["coding"]

[sources.news2]
kind = "news2"
adapters = ["decide"]
"""
WORDS = [f"{a}{b}" for a in ("bra", "cle", "dro", "fen", "gli", "hup", "jor", "kel", "lum", "mor")
         for b in ("ta", "vo", "ni", "sek", "pul", "rim", "dax", "wen")]


def sentence(rng: random.Random, n: int = 120) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def example(source: str, rid: str, question: str, answer: str, task: str = "qa") -> dict:
    return {"id": f"{source}:{rid}:{task}", "source": source, "task": task,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "provenance": {"source": source, "kind": source, "source_id": rid, "origin": "test",
                           "licence": "test", "retrieved_at": ""}}


def make_project(root: Path, sources: str = SOURCES) -> Path:
    (root / "sources.toml").write_text(sources)
    for name in ("coding", "decide"):
        (root / "adapters" / name).mkdir(parents=True, exist_ok=True)
        (root / "adapters" / name / "adapter.toml").write_text("")
    return root


def shingles(text: str, n: int = 5) -> set:
    words = dedup.WORD_RE.findall(dedup.normalize_text(text))
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


def jaccard(x: str, y: str) -> float:
    a, b = shingles(x), shingles(y)
    return len(a & b) / len(a | b)


def mutate(rng: random.Random, text: str, k: int) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), k):
        words[i] = "zzz" + words[i]
    return " ".join(words)


# --- fingerprints
def test_signature_of_a_document_does_not_depend_on_its_batch():
    rng = random.Random(1)
    docs = [sentence(rng, n) for n in (0, 1, 3, 4, 5, 6, 40, 200)] * 3
    together = dedup.fingerprint(docs, 64, 5)
    for i, doc in enumerate(docs):
        alone = dedup.fingerprint([doc], 64, 5)
        assert np.array_equal(alone.signatures[0], together.signatures[i])


def test_batches_hashed_in_parallel_come_back_in_order(monkeypatch):
    rng = random.Random(3)
    docs = [sentence(rng, rng.randint(0, 80)) for _ in range(300)]
    one_batch = dedup.fingerprint(docs, 64, 5)
    monkeypatch.setattr(minhash, "CHARS_PER_BATCH", 500)  # dozens of batches on the thread pool
    many = dedup.fingerprint(docs, 64, 5)
    assert many.digests == one_batch.digests
    assert np.array_equal(many.signatures, one_batch.signatures)
    assert np.array_equal(many.quality, one_batch.quality)
    assert np.array_equal(many.shingles, one_batch.shingles) and np.array_equal(many.offsets, one_batch.offsets)


@pytest.mark.parametrize("shingle_words", [1, 3, 5])
def test_documents_longer_than_a_batch_fingerprint_as_in_one_batch(monkeypatch, shingle_words):
    """A document longer than a batch is hashed a window of words at a time (bounded memory); its
    signature, distinct words and shingle set are exactly those of hashing it whole."""
    rng = random.Random(5)
    docs = [sentence(rng, 9000) + ", the end.", "short one", sentence(rng, 2),
            "Ünïcode wörds, " + sentence(rng, 3000) + " — ﬁn", "", sentence(rng, 700)]
    whole = dedup.fingerprint(docs, 64, shingle_words)
    monkeypatch.setattr(minhash, "CHARS_PER_BATCH", 997)  # every long document in dozens of windows
    windows = dedup.fingerprint(docs, 64, shingle_words)
    assert windows.digests == whole.digests
    assert np.array_equal(windows.signatures, whole.signatures)
    assert np.array_equal(windows.quality, whole.quality)
    assert np.array_equal(windows.shingles, whole.shingles) and np.array_equal(windows.offsets, whole.offsets)


def datasketch_pairs(index, signatures: np.ndarray) -> list[tuple[int, int]]:
    """Every pair that a datasketch MinHashLSH puts in one bucket, by its own query of each document."""
    return sorted({(min(i, j), max(i, j)) for i in range(len(signatures))
                   for j in (int.from_bytes(k, "big") for k in index.query(lsh.sketch(signatures[i]))) if j != i})


def test_in_memory_buckets_are_datasketch_minhashlsh_buckets():
    """The in-memory banding pairs exactly the documents that datasketch's MinHashLSH, filled by its own
    insert, puts in one bucket; an index filled by insert_all answers its queries the same."""
    from datasketch import MinHashLSH

    rng = random.Random(4)
    base = [sentence(rng, 60) for _ in range(40)]
    docs = base + [mutate(rng, d, 2) for d in base[:10]] + base[:5]  # near and exact copies share buckets
    fp = dedup.fingerprint(docs, 64, 5)
    params = dedup.lsh_params(0.8, 64)
    bulk, own = (MinHashLSH(num_perm=64, params=params, prepickle=False) for _ in range(2))
    lsh.insert_all(bulk, fp.signatures, np.arange(len(docs)))
    for i in range(len(docs)):
        own.insert(i.to_bytes(4, "big"), lsh.sketch(fp.signatures[i]))
    expected = datasketch_pairs(own, fp.signatures)
    assert datasketch_pairs(bulk, fp.signatures) == expected
    assert sorted(int.from_bytes(k, "big") for k in bulk.query(lsh.sketch(fp.signatures[0]))) == [0, 40, 50]
    pairs = lsh.candidate_pairs(fp, np.arange(len(docs)), params)
    assert [tuple(p) for p in pairs.tolist()] == expected and len(expected) >= 5


def test_buckets_stay_exact_when_band_mixes_collide(monkeypatch):
    """Buckets are found by sorting a 64-bit mix of each band; should two different bands mix alike,
    the rows themselves are sorted: the pairs (here from buckets of three and more) do not change."""
    rng = random.Random(6)
    base = [sentence(rng, 50) for _ in range(30)]
    docs = base + [mutate(rng, d, 1) for d in base[:8]] + base[:3] * 3
    fp = dedup.fingerprint(docs, 64, 5)
    params = dedup.lsh_params(0.8, 64)
    honest = lsh.candidate_pairs(fp, np.arange(len(docs)), params)
    monkeypatch.setattr(lsh, "mix64", lambda x: np.zeros_like(x))  # every band the same mix
    assert np.array_equal(lsh.candidate_pairs(fp, np.arange(len(docs)), params), honest)
    assert {(0, 38), (0, 41), (0, 44), (38, 41), (41, 44)} <= set(map(tuple, honest.tolist()))


def test_estimated_jaccard_tracks_true_jaccard():
    rng = random.Random(2)
    base = sentence(rng, 120)
    for k in (0, 2, 4, 8, 16, 30):
        other = mutate(rng, base, k)
        fp = dedup.fingerprint([base, other], 256, 5)
        estimate = (fp.signatures[0] == fp.signatures[1]).mean()
        assert abs(estimate - jaccard(base, other)) < 0.12


def test_exact_match_ignores_case_whitespace_and_unicode_width():
    fp = dedup.fingerprint(["Fever  of 39 °C\nand RIGOR", "fever of 39 °C and rigor", "ｆｅｖｅｒ of 39 °C and rigor",
                            "fever of 38 °C and rigor"], 32, 5)
    assert fp.digests[0] == fp.digests[1] == fp.digests[2] != fp.digests[3]


# --- the stage
@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path))
    rng = random.Random(3)
    base_texts = [sentence(rng) for _ in range(40)]
    icd = [example("icd10cm", f"c{i}", f"Q{i}: {t}", "answer") for i, t in enumerate(base_texts[:20])]
    news = [example("news2", f"p{i}", f"Q{i}: {t}", "answer") for i, t in enumerate(base_texts[20:])]
    # news2 repeats icd10cm's c0 exactly (modulo case/spacing) and c1 with one word changed: icd10cm keeps both
    news.append(example("news2", "dup0", icd[0]["messages"][0]["content"].upper() + "  ", "ANSWER"))
    news.append(example("news2", "near1", mutate(rng, icd[1]["messages"][0]["content"], 1), "answer"))
    # two news2 near-duplicates of each other: the richer text wins
    longer = news[0]["messages"][0]["content"] + " extra words here"
    news.append(example("news2", "rich0", longer, "answer"))
    io.write_jsonl(layout.examples_file("icd10cm"), icd)
    io.write_jsonl(layout.examples_file("news2"), news)
    return {"icd": icd, "news": news}


def kept_ids() -> list[str]:
    return [row["id"] for row in io.read_jsonl(layout.dedup_file())]


def test_stage_removes_exact_and_near_duplicates_by_source_priority(project):
    report = dedup.run(config.load())
    ids = kept_ids()
    assert "icd10cm:c0:qa" in ids and "icd10cm:c1:qa" in ids
    assert "news2:dup0:qa" not in ids and "news2:near1:qa" not in ids
    assert "news2:rich0:qa" in ids and "news2:p0:qa" not in ids
    assert report["sources"]["news2"] == {"in": 23, "dropped": {}, "cleaned": {}, "exact_dups": 1, "near_dups": 2,
                                          "duplicate_clusters": 1, "kept": 20, "signatures": "computed"}
    assert report["sources"]["icd10cm"]["kept"] == 20 and report["sources"]["icd10cm"]["duplicate_clusters"] == 2
    assert report["total"] == {"in": 43, "dropped": 0, "exact_dups": 1, "near_dups": 2, "kept": 40, "removed": 3,
                               "duplicate_clusters": 3}
    largest = report["largest_clusters"][0]
    assert largest["size"] == 2 and largest["members"][0]["text"]
    rows = list(io.read_jsonl(layout.dedup_file()))
    assert all(row["cluster"] == f"{row['source']}:{row['provenance']['source_id']}" for row in rows)
    # nothing left at or above the threshold
    texts = [dedup.example_text(r) for r in rows]
    assert max(jaccard(a, b) for i, a in enumerate(texts) for b in texts[i + 1:]) < 0.8


def test_cache_is_per_source_and_keyed_by_content(project):
    cfg = config.load()
    dedup.run(cfg)
    first = layout.dedup_file().read_bytes()
    icd_cache = layout.dedup_cache("icd10cm")
    icd_stamp = icd_cache.stat().st_mtime_ns
    report = dedup.run(cfg)
    assert {s["signatures"] for s in report["sources"].values()} == {"cached"}
    assert layout.dedup_file().read_bytes() == first
    # a change to news2 re-hashes news2 only
    rows = project["news"] + [example("news2", "new", "a brand new question about something else", "ok")]
    io.write_jsonl(layout.examples_file("news2"), rows)
    report = dedup.run(cfg)
    assert report["sources"]["icd10cm"]["signatures"] == "cached"
    assert report["sources"]["news2"]["signatures"] == "computed"
    assert icd_cache.stat().st_mtime_ns == icd_stamp
    assert "news2:new:qa" in kept_ids()
    # cached and fresh fingerprints decide the same
    cached_output = layout.dedup_file().read_bytes()
    for path in layout.dedup_cache("x").parent.iterdir():
        path.unlink()
    dedup.run(cfg)
    assert layout.dedup_file().read_bytes() == cached_output


def test_settings_change_invalidates_the_cache(project, tmp_path):
    dedup.run(config.load())
    (tmp_path / "sources.toml").write_text(SOURCES.replace("threshold = 0.8", "threshold = 0.8\nshingle_words = 3"))
    report = dedup.run(config.load())
    assert {s["signatures"] for s in report["sources"].values()} == {"computed"}


def test_missing_examples_file_names_the_fix(project):
    layout.examples_file("news2").unlink()
    with pytest.raises(StageError, match="normalize:news2"):
        dedup.run(config.load())


# --- the CLI
def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def test_cli_round_trip_keeps_records_unchanged(tmp_path):
    rng = random.Random(4)
    texts = [sentence(rng, 100) for _ in range(30)]
    lines = []
    for i, text in enumerate(texts):
        lines.append(json.dumps({"text": text, "meta": {"n": i}, "z": [1, 2]}, ensure_ascii=False))
    lines.append(json.dumps({"text": texts[3].upper(), "meta": "exact"}))
    # a shorter copy: near-duplicate, and no richer than the original, which stays
    lines.append(json.dumps({"text": " ".join(texts[5].split()[:-3]), "meta": "near"}))
    lines.append(json.dumps({"messages": [{"role": "system", "content": "ignored"},
                                          {"role": "user", "content": texts[7]}], "meta": "messages"}))
    lines.append(json.dumps({"messages": [{"role": "user", "content": "an unrelated short question"}]}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "stages.cli", "dedup", str(src), "--out", str(out),
                             "--threshold", "0.8"], capture_output=True, text=True, cwd=tmp_path,
                            env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["kept"] == 31 and summary["removed"] == 3 and summary["clusters"] == 3
    assert summary["seconds"] >= 0
    kept = out.read_text().splitlines()
    assert kept == lines[:30] + [lines[-1]]  # byte-identical, in input order


def test_cli_keeps_every_field_including_id(tmp_path):
    """`medforge dedup` on records with an `id`: kept lines come back byte for byte, ids included."""
    rng = random.Random(11)
    texts = [sentence(rng, 60) for _ in range(12)]
    records = [{"id": f"doc-{i:03d}", "text": text, "lang": "en"} for i, text in enumerate(texts)]
    records.append({"id": "copy-of-doc-002", "text": texts[2]})                      # exact duplicate
    shorter = " ".join(texts[4].split()[:-2])  # near duplicate, no richer than doc-004, which stays
    records.append({"id": 7, "messages": [{"role": "user", "content": shorter}]})
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    src.write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "stages.cli", "dedup", str(src), "--out", str(out)],
                            capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["kept"] == 12
    kept = out.read_text().splitlines()
    assert kept == lines[:12]
    assert [json.loads(line)["id"] for line in kept] == [f"doc-{i:03d}" for i in range(12)]


def test_cli_names_a_bad_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"other": 1}\n')
    result = subprocess.run([sys.executable, "-m", "stages.cli", "dedup", str(src), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=tmp_path, env=cli_env(),
                            timeout=120)
    assert result.returncode == 2 and "in.jsonl:2" in result.stderr and not (tmp_path / "o").exists()


def test_pairs_at_known_jaccard_found_by_true_similarity():
    """Copies planted from J = 0.6 to 1.0: every pair at J >= 0.8 clusters, none below it (verified exactly)."""
    rng = random.Random(9)
    vocab = [f"{w}{i}" for w in WORDS for i in range(10)]
    docs, planted = [], []
    for k in range(300):
        words = [rng.choice(vocab) for _ in range(rng.randint(60, 200))]
        docs.append(" ".join(words))
        target = rng.uniform(0.6, 1.0)
        m = len(words) - 4
        n = round(m * (1 - target) / (5 * (1 + target)))
        for slot in rng.sample(range((len(words) - 2) // 6), n):
            words[1 + slot * 6] = f"new{k}x{slot}"
        docs.append(" ".join(words))
        planted.append((2 * k, 2 * k + 1, jaccard(docs[-2], docs[-1])))
    roots = dedup.cluster(dedup.fingerprint(docs, 128, 5), 0.8)
    above = [(a, b) for a, b, j in planted if j >= 0.8]
    below = [(a, b) for a, b, j in planted if j < 0.8]
    assert len(above) > 60 and len(below) > 60
    assert sum(roots[a] == roots[b] for a, b in above) >= 0.95 * len(above)
    assert not any(roots[a] == roots[b] for a, b in below)
    assert len(set(roots.tolist())) >= 300  # no chance merges between unrelated documents


def test_cli_memory_is_bounded_on_a_huge_record(tmp_path):
    """`medforge dedup` on a 40 MB single-record file (it once peaked at 4.2 GB on 52 MB): the child's peak
    resident memory stays under 25x the file, and the records come back."""
    rng = random.Random(9)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    words = " ".join(rng.choices(vocab, k=6_500_000))[:40_000_000]
    src.write_bytes(json.dumps({"text": words}).encode() + b"\n" + b'{"text": "a small one"}\n')
    del words
    # VmHWM, not ru_maxrss: a child's ru_maxrss counts pytest's own resident set at the fork (~3 GB late in the suite)
    probe = ("import sys, runpy; sys.argv = ['medforge', 'dedup', sys.argv[1], '--out', sys.argv[2]]\n"
             "try:\n    runpy.run_module('stages.cli', run_name='__main__')\n"
             "finally:\n    print('maxrss_kb', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')),"
             " file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, str(src), str(out)], capture_output=True, text=True,
                            cwd=tmp_path, env=cli_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kept"] == 2 and out.read_bytes() == src.read_bytes()
    peak = int(result.stderr.split("maxrss_kb")[-1]) * 1024
    assert peak < 25 * src.stat().st_size, f"peak {peak / 2 ** 20:.0f} MiB for a {src.stat().st_size >> 20} MiB file"
