"""The shared HTTP client against the local fake API: limits, faults, secrets, offline."""
from __future__ import annotations

import time

import pytest

from stages import http
from tests.fakeapi import FakeApi


@pytest.fixture()
def fake():
    with FakeApi(records=30, timeout_sleep=0.6) as server:
        yield server


def client(fake, api="openfda", env=None, **params):
    params = {"base_url": fake.url(api), "backoff": 0.01, "timeout": 0.3, "rate": 50, **params}
    fake.limits[api] = (50, 1.0)
    return http.Client("src", api, params, env=env or {}, dotenv="/nonexistent/.env", lock_dir=fake.lock_dir)


@pytest.fixture(autouse=True)
def _lock_dir(fake, tmp_path):
    fake.lock_dir = tmp_path / "locks"


@pytest.mark.parametrize("fault", ["429", "503", "timeout", "truncated", "html200"])
def test_each_fault_is_retried_to_the_good_answer(fake, fault):
    fake.inject("openfda", fault)
    with client(fake) as c:
        reply = c.get("drug/label.json", {"limit": 5})
    assert reply.status == 200 and len(reply.json()["results"]) == 5
    assert [r["fault"] for r in fake.requests("openfda")] == [fault, None]


def test_retry_after_is_honoured(fake):
    fake.inject("openfda", "429-retry-after")
    start = time.time()
    with client(fake) as c:
        c.get("drug/label.json", {"limit": 1})
    times = [r["t"] for r in fake.requests("openfda")]
    assert times[1] - times[0] >= 0.95 and time.time() - start >= 0.95


def test_ncbi_rate_limit_error_inside_a_200_is_retried(fake):
    fake.inject("ncbi", "ncbi-error200")
    with client(fake, "ncbi") as c:
        reply = c.get("esearch.fcgi", {"db": "pubmed", "term": "x", "retmax": 0}, expect="xml")
    assert b"<eSearchResult>" in reply.content and c.over_limit == 1


def test_budget_spent_gives_one_clear_line_without_secrets(fake):
    fake.inject("openfda", "503", "503", "503")
    with client(fake, env={"OPENFDA_API_KEY": "KEY-s3cr3t-999"}, retries=2) as c:
        with pytest.raises(http.HttpError) as err:
            c.get("drug/label.json", {"limit": 1})
    message = str(err.value)
    assert "\n" not in message and "src" in message and "3 attempts" in message and "HTTP 503" in message
    assert "s3cr3t" not in message
    assert fake.requests("openfda")[0]["query"]["api_key"] == "KEY-s3cr3t-999"  # it was sent, just never shown


def test_client_error_is_not_retried(fake):
    with client(fake) as c, pytest.raises(http.HttpError, match="HTTP 400"):
        c.get("drug/label.json", {"limit": 5000})
    assert len(fake.requests("openfda")) == 1


def test_key_and_email_come_from_dotenv_and_ncbi_gets_tool_and_email(fake, tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text('# keys\nexport NCBI_API_KEY="abc123key"\nMEDFORGE_EMAIL=me@example.org  # contact\n')
    c = http.Client("pm", "ncbi", {"base_url": fake.url("ncbi")}, env={}, dotenv=dotenv, lock_dir=tmp_path)
    with c:
        c.get("esearch.fcgi", {"db": "pubmed", "term": "x", "retmax": 0}, expect="xml")
    sent = fake.requests("ncbi")[0]
    assert sent["query"]["api_key"] == "abc123key" and sent["query"]["tool"] == "medforge"
    assert sent["query"]["email"] == "me@example.org" and sent["ua"].startswith("medforge/")
    assert c.rate == 10  # the keyed NCBI limit
    assert "abc123key" not in c.redact(f"failed {sent['query']} https://x/?api_key=abc123key&email=me%40example.org")


def test_rate_limit_is_kept_and_nothing_is_over_limit(fake):
    fake.limits["rxnav"] = (20, 1.0)
    with http.Client("rx", "rxnav", {"base_url": fake.url("rxnav"), "rate": 20}, env={}, lock_dir=fake.lock_dir) as c:
        start = time.time()
        for _ in range(30):
            c.get("drugs.json", {"name": "lisinopril"})
        elapsed = time.time() - start
    assert fake.over_limit("rxnav") == 0
    assert 29 / elapsed > 0.9 * 20  # close to the limit, not far under it


def test_over_limit_answers_are_retried_not_fatal(fake):
    fake.limits["rxnav"] = (2, 1.0)  # the server is stricter than the client thinks: RxNav answers 403
    with http.Client("rx", "rxnav", {"base_url": fake.url("rxnav"), "rate": 20, "backoff": 0.2}, env={},
                     lock_dir=fake.lock_dir) as c:
        for _ in range(4):
            assert c.get("drugs.json", {"name": "lisinopril"}).status == 200
    assert fake.over_limit("rxnav") >= 1 and c.over_limit == fake.over_limit("rxnav")


def test_stackexchange_backoff_and_quota(fake):
    fake.inject("stackexchange", "se-backoff")
    with client(fake, "stackexchange") as c:
        c.get("questions", {"site": "medicalsciences", "page": 1})
        c.get("questions", {"site": "medicalsciences", "page": 1})
        times = [r["t"] for r in fake.requests("stackexchange")]
        assert times[1] - times[0] >= 0.95  # `backoff: 1` held the next call back
        c.quota_remaining = 0
        with pytest.raises(http.QuotaExhausted, match="quota"):
            c.get("questions", {"site": "medicalsciences"})


def test_stackexchange_throttle_violation_waits_then_succeeds(fake):
    fake.inject("stackexchange", "se-throttle")
    with client(fake, "stackexchange") as c:
        assert c.get("questions", {"site": "medicalsciences"}).status == 200
    assert [r["status"] for r in fake.requests("stackexchange")] == [400, 200]


def test_wait_longer_than_max_wait_fails_clearly(fake):
    fake.inject("openfda", "429-retry-after")
    with client(fake, max_wait=0.5) as c, pytest.raises(http.HttpError, match="asks to wait"):
        c.get("drug/label.json", {"limit": 1})


def test_offline_is_one_line_naming_the_source_and_the_fix(tmp_path):
    c = http.Client("pubmed", "ncbi", {"base_url": "http://127.0.0.1:9", "backoff": 0.01}, env={}, lock_dir=tmp_path)
    with c, pytest.raises(http.Offline) as err:
        c.get("esearch.fcgi")
    message = str(err.value)
    assert "\n" not in message and "'pubmed'" in message and 'mode = "mirror"' in message and "enabled = false" in message


def test_link_header_and_retry_after_date():
    import httpx

    reply = http.Reply(200, b"{}", httpx.Headers({"Link": '<https://api.fda.gov/drug/label.json?search_after=0%3D9>; rel="next"'}), "")
    assert reply.link("next").endswith("search_after=0%3D9") and reply.link("prev") is None
    assert http.retry_after("7") == 7.0
    assert 0 <= http.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_limiter_is_shared_between_processes_through_its_lock_file(tmp_path):
    a = http.RateLimiter(10, tmp_path / "api.next")
    b = http.RateLimiter(10, tmp_path / "api.next")  # another process's view of the same API
    waits = [a.reserve(), b.reserve(), a.reserve(), b.reserve()]
    assert waits[0] < 0.01 and all(w2 - w1 == pytest.approx(0.1, abs=0.02) for w1, w2 in zip(waits, waits[1:]))
