"""The LSH index on a real redis-server (127.0.0.1, a free port): the same dedup result as in memory.

Needs the `redis-server` binary (Debian: apt-get install redis-server) and the `redis` Python package.
"""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time

import pytest

from stages import config, dedup, io, layout
from stages.dedup import lsh
from stages.errors import StageError

from test_dedup import SOURCES, example, make_project, mutate, sentence

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server binary not installed "
                                "(apt-get install redis-server); the Redis LSH backend is untested here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    redis = pytest.importorskip("redis")
    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0", client
    proc.terminate()
    proc.wait(timeout=10)


def corpus() -> dict[str, list[dict]]:
    rng = random.Random(11)
    texts = [sentence(rng, rng.randint(20, 150)) for _ in range(300)]
    icd = [example("icd10cm", f"c{i}", t, "a") for i, t in enumerate(texts[:150])]
    news = [example("news2", f"p{i}", t, "a") for i, t in enumerate(texts[150:])]
    for k in range(60):  # near copies at a spread of similarities, across and within sources
        src = rng.choice(icd + news)["messages"][0]["content"]
        news.append(example("news2", f"n{k}", mutate(rng, src, rng.randint(0, 8)), "a"))
    return {"icd10cm": icd, "news2": news}


def test_redis_backend_gives_the_identical_result(tmp_path, monkeypatch, redis_url):
    url, client = redis_url
    monkeypatch.chdir(make_project(tmp_path))
    for name, rows in corpus().items():
        io.write_jsonl(layout.examples_file(name), rows)
    memory = dedup.run(config.load())
    kept_memory = layout.dedup_file().read_bytes()
    (tmp_path / "sources.toml").write_text(SOURCES.replace("[dedup]\n", f'[dedup]\nbackend = "redis"\n'
                                                                      f'redis_url = "{url}"\n'))
    on_redis = dedup.run(config.load())
    assert on_redis["settings"]["backend"] == "redis"
    assert layout.dedup_file().read_bytes() == kept_memory
    assert on_redis["lsh"] == memory["lsh"] and memory["lsh"]["candidate_pairs"] > 0
    for key in ("sources", "total", "largest_clusters"):
        if key == "sources":
            assert {n: {k: v for k, v in s.items() if k != "signatures"} for n, s in on_redis[key].items()} == \
                   {n: {k: v for k, v in s.items() if k != "signatures"} for n, s in memory[key].items()}
        else:
            assert on_redis[key] == memory[key]
    assert memory["total"]["near_dups"] >= 10
    assert client.dbsize() == 0  # the run's index namespace is removed afterwards


def test_the_index_is_a_real_minhashlsh_on_redis(redis_url):
    """Documents inserted in bulk are found by datasketch's own query, as other workers would."""
    import numpy as np
    from datasketch import MinHashLSH

    url, client = redis_url
    texts = ["alpha beta gamma delta epsilon zeta eta theta"] * 2 + ["one two three four five six seven"]
    fp = dedup.fingerprint(texts, 64, 3)
    storage = lsh.storage_config({"backend": "redis", "redis_url": url})
    index = MinHashLSH(num_perm=64, params=dedup.lsh_params(0.8, 64), storage_config=storage, prepickle=False)
    lsh.insert_all(index, fp.signatures, np.arange(3))
    found = sorted(int.from_bytes(k, "big") for k in index.query(lsh.sketch(fp.signatures[0])))
    assert found == [0, 1] and client.dbsize() > 0


def test_redis_candidate_pairs_equal_memory_with_buckets_of_three_and_more(redis_url):
    """Only some documents are queried on Redis (all but one of each shared bucket): every pair is still
    found, also in buckets of three and four."""
    import numpy as np

    url, client = redis_url
    rng = random.Random(6)
    base = [sentence(rng, 50) for _ in range(30)]
    docs = base + [mutate(rng, d, 1) for d in base[:8]] + base[:3] * 3
    fp = dedup.fingerprint(docs, 64, 5)
    params = dedup.lsh_params(0.8, 64)
    in_memory = lsh.candidate_pairs(fp, np.arange(len(docs)), params)
    storage = lsh.storage_config({"backend": "redis", "redis_url": url})
    on_redis = lsh.candidate_pairs(fp, np.arange(len(docs)), params, storage, url)
    assert np.array_equal(on_redis, in_memory) and {(0, 38), (38, 41), (41, 44)} <= set(map(tuple, in_memory.tolist()))
    assert client.dbsize() == 0


def test_unreachable_redis_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path, SOURCES.replace(
        "[dedup]\n", f'[dedup]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{free_port()}/0"\n')))
    pytest.importorskip("redis")
    for name, rows in corpus().items():
        io.write_jsonl(layout.examples_file(name), rows)
    with pytest.raises(StageError, match=r"dedup.redis_url.*redis-server"):
        dedup.run(config.load())
