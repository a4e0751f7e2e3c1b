"""Scrapes killed with SIGKILL at random points resume to exactly the records of an uninterrupted run.

Real processes (`python -m stages scrape <name>`) against the local fake API; also: a
failed scrape leaves no manifest, mirror mode builds from data/raw alone, offline fails
in one line.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import io
from stages.sources import make
from tests.fakeapi import FakeApi

SOURCES = {  # name -> (kind, api, params)
    "pubmed": ("pubmed", "ncbi", {"term": "cancer", "mindate": "2020/01/01", "maxdate": "2020/12/31",
                                  "batch": 5, "query_cap": 25}),
    "labels": ("openfda", "openfda", {"endpoint": "drug/label", "limit": 4, "max_records": 0}),
    "trials": ("clinicaltrials", "clinicaltrials", {"cond": "cancer", "page_size": 4, "max_records": 0}),
}


def toml_value(v) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def block(fake: FakeApi | None, name: str, mode: str = "live", **extra) -> str:
    kind, api, params = SOURCES[name]
    params = {**params, "base_url": fake.url(api) if fake else "http://127.0.0.1:9", "rate": 40, "backoff": 0.02,
              "timeout": 2, **extra}
    lines = "\n".join(f"{k} = {toml_value(v)}" for k, v in params.items())
    return f'[sources.{name}]\nkind = "{kind}"\nmode = "{mode}"\nadapters = ["demo"]\n[sources.{name}.params]\n{lines}\n'


def project(root: Path, fake: FakeApi | None, name: str, mode: str = "live", **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapters" / "demo").mkdir(parents=True, exist_ok=True)
    (root / "adapters" / "demo" / "adapter.toml").write_text('description = "test"\n')
    (root / "sources.toml").write_text(block(fake, name, mode, **extra))
    return root


def env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path),
            "MEDFORGE_EMAIL": "", **extra}


def scrape(root: Path, name: str, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", "scrape", name], cwd=root, env=env(**env_extra),
                          capture_output=True, text=True, timeout=120)


def records(root: Path, name: str) -> list[dict]:
    kind, _, params = SOURCES[name]
    source = make(name, kind, params)
    raw = root / "data" / "raw" / name
    manifest = io.read_json(raw / "manifest.json")
    out = [r for page in manifest["pages"] for r in source.parse(raw / "pages" / page["name"])]
    return out


@pytest.fixture(scope="module")
def fake():
    with FakeApi(records=60, pubmed_cap=25, scale=20) as server:
        yield server


@pytest.mark.parametrize("name", list(SOURCES))
def test_kill9_then_resume_equals_uninterrupted(fake, tmp_path, name):
    clean = project(tmp_path / "clean", fake, name, rate=20)
    started = time.time()
    done = scrape(clean, name)
    duration = time.time() - started
    assert done.returncode == 0, done.stderr
    expected = records(clean, name)
    assert len(expected) == 60 and len({r["id"] for r in expected}) == 60

    killed = project(tmp_path / "killed", fake, name, rate=20)
    manifest = killed / "data" / "raw" / name / "manifest.json"
    rng = random.Random(name)
    kills = 0
    for _ in range(40):
        proc = subprocess.Popen([sys.executable, "-m", "stages", "scrape", name], cwd=killed, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.9) * duration)  # anywhere from start-up to the last pages
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            if manifest.exists():  # killed after the manifest landed: it must already be complete
                assert sorted(records(killed, name), key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
            continue
        assert proc.returncode == 0
        break
    else:
        pytest.fail("the scrape never finished")
    assert kills >= 1
    got = records(killed, name)
    assert sorted(got, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
    assert len(got) == len({r["id"] for r in got})  # no duplicates across pages
    pages = sorted(p.name for p in (killed / "data/raw" / name / "pages").iterdir())
    assert pages == sorted(p.name for p in (clean / "data/raw" / name / "pages").iterdir())  # no leftover .tmp


def test_failed_scrape_leaves_no_manifest_and_the_rerun_resumes(fake, tmp_path):
    root = project(tmp_path / "p", fake, "labels", retries=1, rate=10)
    fake.faults["openfda"].clear()
    first = subprocess.Popen([sys.executable, "-m", "stages", "scrape", "labels"], cwd=root, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pages_dir = root / "data" / "raw" / "labels" / "pages"
    deadline = time.time() + 30
    while not (pages_dir.exists() and any(pages_dir.iterdir())) and time.time() < deadline:
        time.sleep(0.02)  # let it store a page or two, then make the API fail for good
    fake.inject("openfda", *["503"] * 50)
    out, err = first.communicate(timeout=60)
    fake.faults["openfda"].clear()
    assert first.returncode == 2
    error = [line for line in err.splitlines() if "] failed:" in line]  # the one line `python -m stages` ends with
    assert len(error) == 1 and "labels" in error[0] and "HTTP 503" in error[0] and "resumes" in error[0]
    raw = root / "data" / "raw" / "labels"
    assert not (raw / "manifest.json").exists()
    stored = len(list((raw / "pages").iterdir()))
    assert stored >= 1
    before = len(fake.requests("openfda"))
    again = scrape(root, "labels")
    assert again.returncode == 0 and "resuming" in again.stdout
    assert len(fake.requests("openfda")) - before == 15 - stored + 0  # only the pages it did not have
    assert len(records(root, "labels")) == 60


def test_mirror_mode_builds_from_raw_alone_and_offline_fails_in_one_line(fake, tmp_path):
    online = project(tmp_path / "online", fake, "trials")
    assert scrape(online, "trials").returncode == 0
    mirror = project(tmp_path / "mirror", None, "trials", mode="mirror")  # base_url: a closed port
    shutil.copytree(online / "data" / "raw", mirror / "data" / "raw")
    result = scrape(mirror, "trials")
    assert result.returncode == 0, result.stderr
    assert records(mirror, "trials") == records(online, "trials")

    empty = project(tmp_path / "empty", None, "trials", mode="mirror")
    result = scrape(empty, "trials")
    assert result.returncode == 2 and "mirror mode" in result.stderr and "data/raw/trials" in result.stderr

    offline = project(tmp_path / "offline", None, "trials")
    for kwargs in ({"MEDFORGE_OFFLINE": "1"}, {}):  # told so, or finding out by failing to connect
        result = scrape(offline, "trials", **kwargs)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "'trials'" in lines[0] and 'mode = \\"mirror\\"' not in lines[0] and 'mode = "mirror"' in lines[0]
        assert "enabled = false" in lines[0]
    assert not (offline / "data" / "raw" / "trials" / "manifest.json").exists()


def test_keys_never_reach_data_logs_or_errors(fake, tmp_path):
    env_key, dotenv_key, email = "env-KEY-7f3a9c", "dotenv-KEY-51be02", "curator.secret@example.org"
    root = project(tmp_path / "p", fake, "labels", retries=1)
    with open(root / "sources.toml", "a") as fh:
        fh.write(block(fake, "pubmed", retries=1))
    (root / ".env").write_text(f'NCBI_API_KEY="{dotenv_key}"\nMEDFORGE_EMAIL={email}\n')
    secrets = (env_key, dotenv_key, email, "curator.secret%40example.org")
    start = len(fake.log)

    def leaks(*outputs: str) -> list[str]:
        """Every secret in the outputs or in any file under data/ (pages, checkpoints, manifests, logs, usage)."""
        files = [p for p in (root / "data").rglob("*") if p.is_file()]
        found = [f"{s} in output" for s in secrets for out in outputs if s in out]
        return found + [f"{s} in {p}" for p in files for s in secrets if s.encode() in p.read_bytes()]

    fake.inject("openfda", "503", "503")  # a failed run: its error line and its log name the request
    failed = scrape(root, "labels", OPENFDA_API_KEY=env_key)
    assert failed.returncode == 2 and "HTTP 503" in failed.stderr
    assert "HTTP 503" in (root / "data" / "logs" / "scrape_labels.log").read_text()
    assert leaks(failed.stdout, failed.stderr) == []
    for name in ("labels", "pubmed"):
        done = scrape(root, name, OPENFDA_API_KEY=env_key)
        assert done.returncode == 0, done.stderr
        assert leaks(done.stdout, done.stderr) == []
    sent = fake.log[start:]
    assert {r["query"].get("api_key") for r in sent if r["api"] == "openfda"} == {env_key}  # sent, from the env
    assert {(r["query"].get("api_key"), r["query"].get("email")) for r in sent if r["api"] == "ncbi"} == {(dotenv_key, email)}
    kinds = {p.relative_to(root / "data").parts[0] for p in (root / "data").rglob("*") if p.is_file()}
    assert {"raw", "logs", ".ratelimit"} <= kinds and (root / "data/raw/labels/checkpoint.json").exists()


def test_current_for_dodo_uptodate(tmp_path, monkeypatch):
    import datetime as dt

    from stages import scrape
    from stages.config import SourceConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDFORGE_OFFLINE", raising=False)

    def cfg(refresh, mode="live", **params):
        return SourceConfig(name="pm", kind="pubmed", enabled=True, adapters=[], refresh=refresh, mode=mode,
                            params=params, raw_block={})

    check = scrape.Current(cfg("never"))
    assert check(None, {}) is False and check.why == "never scraped"  # what the dashboard says
    assert scrape.Current(cfg("7d", mode="mirror"))() is True  # a mirror never fetches
    status = tmp_path / "data" / "raw" / "pm" / scrape.STATUS
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=8)).isoformat()
    io.write_json(status, {"block": scrape.block_hash(cfg("7d")), "done": True, "finished_at": old})
    check = scrape.Current(cfg("7d"))
    assert check() is False and check.why == 'refresh due: scraped 8 days ago (refresh = "7d")'
    assert scrape.Current(cfg("9d"))() is True  # "9d": same block
    assert scrape.Current(cfg("never"))() is True
    check = scrape.Current(cfg("never", term="other"))
    assert check() is False and check.why == "[sources.pm] changed since the last scrape"  # finished, another block
    monkeypatch.setenv("MEDFORGE_OFFLINE", "1")
    assert scrape.Current(cfg("7d"))() is True  # offline: a due refresh builds from data/raw/
    io.write_json(status, {"block": scrape.block_hash(cfg("7d")), "done": False, "started_at": old})
    monkeypatch.delenv("MEDFORGE_OFFLINE")
    check = scrape.Current(cfg("never"))
    assert check() is False and check.why == "the last scrape did not finish"  # an unfinished pass resumes
