"""The Ray engine on a real local Ray cluster (a head and one worker node, two `ray start` processes on
127.0.0.1): the same kept.jsonl, byte for byte, and the same clusters as the local engine.

The cluster's processes are stopped by their own process groups (each `ray start --block` runs in a new
session), never by `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from stages import config, dedup, io, layout
from stages.config import ConfigError
from stages.dedup import ray_engine
from stages.errors import StageError

from test_dedup import example, make_project, mutate, sentence
from tests.ports import free_port

RAY = str(Path(sys.executable).with_name("ray"))  # the CLI of the Ray this Python imports
START_TIMEOUT_S = 240  # two CPU cores shared with other jobs: a node can take a minute to come up
SOURCES = """
[dedup]
threshold = 0.8
source_priority = ["icd10cm", "news2"]
{engine}
[sources.icd10cm]
kind = "icd10cm"
adapters = ["coding"]

[sources.news2]
kind = "news2"
adapters = ["decide"]

[sources.news2_ward]
kind = "news2"
adapters = ["decide"]
"""


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 "--object-store-memory=100000000", "--disable-usage-stats", *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the node's process group (its `ray start`, raylet, GCS and workers), SIGKILL what is left
    after a grace period (`ray start --block` itself can take half a minute over its SIGTERM)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait(timeout=10)
                return
            proc.poll()  # reap `ray start` itself, so that only the group's other members keep it alive
            time.sleep(0.5)


@dataclass
class Cluster:
    address: str  # the head's GCS, host:port
    client: str   # the head's Ray Client server, ray://host:port


@pytest.fixture(scope="module")
def no_ray_auth():
    """Ray turns on token authentication for a new local cluster and writes ~/.ray/auth_token, which every
    later `ray start` on the machine then requires: off for this module's clusters (nothing of the user's
    home is written or read), in this process and the `ray start` processes it spawns."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        yield


@pytest.fixture(scope="module")
def ray_cluster(no_ray_auth):
    # short: Ray puts unix sockets under it (a path limit of ~107 bytes)
    temp = Path(tempfile.mkdtemp(prefix="mfray", dir="/tmp"))
    port, client_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    procs = [_start(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
                     f"--ray-client-server-port={client_port}"], temp / "head.log")]
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                if procs[0].poll() is not None or time.time() > deadline:
                    pytest.fail(f"the Ray head did not start: {(temp / 'head.log').read_text()[-2000:]}")
                time.sleep(1)
        procs.append(_start([f"--address={address}"], temp / "worker.log"))
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        try:
            while sum(1 for node in ray.nodes() if node["Alive"]) < 2:
                if procs[1].poll() is not None or time.time() > deadline:
                    pytest.fail(f"the Ray worker node did not join: {(temp / 'worker.log').read_text()[-2000:]}")
                time.sleep(1)
        finally:
            ray.shutdown()
        yield Cluster(address, f"ray://127.0.0.1:{client_port}")
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def corpus() -> dict[str, list[dict]]:
    """Three sources with planted near copies at a spread of similarities, within and across sources,
    plus exact copies."""
    rng = random.Random(19)
    texts = [sentence(rng, rng.randint(60, 200)) for _ in range(360)]
    icd = [example("icd10cm", f"c{i}", t, "a") for i, t in enumerate(texts[:120])]
    news = [example("news2", f"p{i}", t, "a") for i, t in enumerate(texts[120:240])]
    ward = [example("news2_ward", f"w{i}", t, "a") for i, t in enumerate(texts[240:])]
    for k in range(90):
        src = rng.choice(icd + news + ward)["messages"][0]["content"]
        into = rng.choice([news, ward])
        name = into[0]["source"]
        into.append(example(name, f"n{k}", mutate(rng, src, rng.randint(0, 6)), "a"))
    for k in range(10):
        ward.append(example("news2_ward", f"x{k}", icd[k]["messages"][0]["content"].upper(), "a"))
    return {"icd10cm": icd, "news2": news, "news2_ward": ward}


def run_engine(root: Path, engine: str) -> tuple[dict, bytes]:
    """One dedup run with fresh fingerprints (no source's cache), on `engine`: (report, kept.jsonl)."""
    (root / "sources.toml").write_text(SOURCES.format(engine=engine))
    for name in corpus():
        layout.dedup_cache(name).unlink(missing_ok=True)
    report = dedup.run(config.load())
    assert all(s["signatures"] == "computed" for s in report["sources"].values())
    return report, layout.dedup_file().read_bytes()


def without_signatures(report: dict) -> dict:
    return {key: report[key] for key in ("lsh", "total", "largest_clusters")} | {
        "sources": {n: {k: v for k, v in s.items() if k != "signatures"} for n, s in report["sources"].items()}}


def test_ray_engine_gives_the_local_engines_kept_jsonl_byte_for_byte(tmp_path, monkeypatch, capsys, ray_cluster):
    monkeypatch.chdir(make_project(tmp_path, SOURCES.format(engine="")))
    for name, rows in corpus().items():
        io.write_jsonl(layout.examples_file(name), rows)
    # small shards and blocks: each source is several fingerprint tasks, the banding several map tasks
    monkeypatch.setattr(ray_engine, "SHARD_CHARS", 6_000)
    monkeypatch.setattr(ray_engine, "BLOCK_DOCS", 150)
    local, kept_local = run_engine(tmp_path, "")
    started = time.time()
    on_ray, kept_ray = run_engine(tmp_path, f'engine = "ray"\naddress = "{ray_cluster.address}"\n')
    print(f"ray engine run: {time.time() - started:.1f}s", file=sys.__stderr__)
    assert f"engine ray at {ray_cluster.address} (2 node(s), 2 CPU(s))" in capsys.readouterr().out
    assert local["settings"]["engine"] == "local" and on_ray["settings"]["engine"] == "ray"
    assert kept_ray == kept_local
    assert without_signatures(on_ray) == without_signatures(local)
    assert local["lsh"]["candidate_pairs"] > local["lsh"]["near_pairs"] >= 25
    assert local["total"]["exact_dups"] >= 10 and local["total"]["duplicate_clusters"] >= 30
    assert {m["source"] for c in local["largest_clusters"] for m in c["members"]} == set(corpus())
    assert not ray.is_initialized()  # the run disconnected from the cluster


def test_with_no_address_a_ray_is_started_here_for_the_run(tmp_path, monkeypatch, capsys, no_ray_auth):
    """engine = "ray" alone: a fresh Ray on this machine, for this run only; still the local engine's result."""
    monkeypatch.chdir(make_project(tmp_path, SOURCES.format(engine="")))
    for name, rows in corpus().items():
        io.write_jsonl(layout.examples_file(name), rows[:40] + rows[-30:])  # planted copies are last
    local, kept_local = run_engine(tmp_path, "")
    temp = tempfile.mkdtemp(prefix="mfray", dir="/tmp")  # Ray's session files, there and not in /tmp/ray
    monkeypatch.setenv("RAY_TMPDIR", temp)
    try:
        on_ray, kept_ray = run_engine(tmp_path, 'engine = "ray"\n')
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert "engine ray at a local Ray started for this run (1 node(s)" in capsys.readouterr().out
    assert kept_ray == kept_local and without_signatures(on_ray) == without_signatures(local)
    assert local["lsh"]["near_pairs"] > 0 and local["total"]["exact_dups"] > 0
    assert not ray.is_initialized()


@pytest.mark.parametrize("through", ["address", "client"])
def test_ray_candidate_pairs_equal_local_ones_with_buckets_of_three_and_more(ray_cluster, through):
    """The shuffle finds every pair of every bucket, buckets of three and four included, and only those;
    connected to the head's GCS (host:port) or through Ray Client (ray://host:port)."""
    import numpy as np

    rng = random.Random(6)
    base = [sentence(rng, 50) for _ in range(30)]
    docs = base + [mutate(rng, d, 1) for d in base[:8]] + base[:3] * 3
    fp = dedup.fingerprint(docs, 64, 5)
    params = dedup.lsh_params(0.8, 64)
    every = np.arange(len(docs))
    with ray_engine.RayEngine(getattr(ray_cluster, through)) as engine:
        assert np.array_equal(engine.candidate_pairs(fp, every, params), dedup.lsh.candidate_pairs(fp, every, params))
        odd = every[1::2]  # a subset of documents: ids are kept, not renumbered
        assert np.array_equal(engine.candidate_pairs(fp, odd, params), dedup.lsh.candidate_pairs(fp, odd, params))
    assert {(0, 38), (38, 41), (41, 44)} <= set(map(tuple, dedup.lsh.candidate_pairs(fp, every, params).tolist()))


def test_a_node_running_other_dedup_code_is_refused(ray_cluster, monkeypatch):
    """Each node hashes its stages/dedup files and the driver compares the hashes with its own: here the
    nodes answer another hash, as a node with an older checkout would."""
    @ray.remote(num_cpus=0)
    def older_checkout() -> tuple[str, str]:
        return "0" * 64, "/opt/old/stages/dedup"

    monkeypatch.setattr(ray_engine, "_code_identity", older_checkout)
    with pytest.raises(StageError, match=r"runs other dedup code .* install this medforge checkout on every node"):
        ray_engine.RayEngine(ray_cluster.address).__enter__()
    assert not ray.is_initialized()


def test_a_connection_that_fails_half_way_leaves_no_ray_behind(monkeypatch, no_ray_auth):
    """The suite once saw Ray Client fail after connecting ("Initialization failure from server") under load;
    the next RayEngine in the same process then died inside ray.init. A failed connect is one StageError and
    leaves this process's Ray as it found it, so the next connection works; the server's reason, which Ray puts on
    the lines under its heading, is in the one line."""
    real_init = ray.init

    def half_way(*args, **kwargs):
        real_init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=1)
        raise ConnectionError("Initialization failure from server:\nTraceback (most recent call last):\n"
                              "  File \"proxier.py\", line 437, in get_channel\nTimeoutError: no specific server")

    monkeypatch.setattr(ray, "init", half_way)
    monkeypatch.setattr(ray_engine, "SESSION_TRIES", 1)  # a failed session is tried again: not here
    why = r"could not start a Ray on this machine .* \(Initialization failure from server: TimeoutError: no specific "
    why += r"server\); "
    with pytest.raises(StageError, match=why):
        ray_engine.RayEngine("").__enter__()
    assert not ray.is_initialized()
    monkeypatch.setattr(ray, "init", real_init)
    with ray_engine.RayEngine("") as engine:
        assert "(1 node(s)" in engine.describe()
    assert not ray.is_initialized()


def test_a_client_session_that_dies_as_it_starts_is_tried_again(ray_cluster, monkeypatch):
    """Ray Client's server starts a process per session; the suite saw one die as it started (the connection failed
    with "Initialization failure from server: ... psutil.ZombieProcess"). A new session is tried, a second later,
    up to SESSION_TRIES in all; a server that keeps failing is the one-line error, the last reason in it."""
    real_init, calls = ray.init, []

    def dies_first(*args, **kwargs):
        calls.append(kwargs["address"])
        if len(calls) == 1:
            raise ConnectionError("Initialization failure from server:\nTraceback (most recent call last):\n"
                                  "psutil.ZombieProcess: PID still exists but it's a zombie (pid=17364)")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", dies_first)
    with ray_engine.RayEngine(ray_cluster.client) as engine:
        assert "(2 node(s)" in engine.describe()
    assert calls == [ray_cluster.client] * 2 and not ray.is_initialized()

    def always(*args, **kwargs):
        calls.append(kwargs["address"])
        raise ConnectionError("Initialization failure from server:\nTimeoutError: no specific server")

    calls.clear()
    monkeypatch.setattr(ray, "init", always)
    with pytest.raises(StageError, match=r"cannot connect .* \(Initialization failure from server: TimeoutError: no "):
        ray_engine.RayEngine(ray_cluster.client).__enter__()
    assert len(calls) == ray_engine.SESSION_TRIES and not ray.is_initialized()


def test_unreachable_cluster_is_one_line_naming_the_key(tmp_path, monkeypatch):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.chdir(make_project(tmp_path, SOURCES.format(engine=f'engine = "ray"\naddress = "{address}"\n')))
    for name, rows in corpus().items():
        io.write_jsonl(layout.examples_file(name), rows)
    started = time.time()
    with pytest.raises(StageError) as err:
        dedup.run(config.load())
    message = str(err.value)
    assert "\n" not in message and f"dedup.address = '{address}' in sources.toml" in message
    assert "ray start --head" in message and time.time() - started < 60
    assert not layout.dedup_file().exists()


def test_a_config_naming_the_redis_backend_is_told_to_use_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path, SOURCES.format(engine='backend = "redis"\n')))
    with pytest.raises(ConfigError) as err:
        config.load()
    line = next(p for p in str(err.value).splitlines() if "dedup.backend" in p)
    assert 'engine = "ray"' in line and "Redis" in line
