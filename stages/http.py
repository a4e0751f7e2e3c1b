"""The one HTTP client every network source uses: polite, persistent, secret-safe.

- a rate limiter per API at its documented limit (shared across processes through a
  lock file, so `doit -n 2` on two sources of one API still stays under it);
- retries with exponential backoff and jitter on 429, 5xx, timeouts and cut-off bodies,
  honouring `Retry-After`, StackExchange's `backoff`/quota and NCBI's rate-limit error
  that can arrive in a 200 body; one clear line once the retry budget is spent;
- an API error carried by a 200 (a JSON `error`, NCBI's `<ERROR>`), JSON of the wrong shape, a
  corrupt compressed body: retried like a 5xx, never handed back as a page; a redirect loop
  fails at once, in one line;
- completeness checked, not assumed: a `Listing` holds what the API said "all" is (its total,
  the cursors seen), so a page that ends the listing short is retried and a repeated cursor
  stops the scrape, instead of either passing as the end of the data;
- a daily request budget per API (openFDA 1,000 and StackExchange 300 without a key, and
  StackExchange's `quota_remaining`), counted in a file so resumed runs share it;
- API keys and the contact e-mail from the environment or a `.env` file, sent but
  never written anywhere: every URL or message that leaves this module is redacted;
- a User-Agent naming medforge; NCBI's `tool` and `email` parameters.

Each API's quirks (which statuses mean "slow down", a throttle marker in the body, a backoff in
every answer, the tool/email parameters) are fields of its `Api` in APIS, not branches in the client.
Base URLs, rates and retry settings come from the source's params, so tests and the
bench run this very code against a local server.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import fcntl
import os
import random
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson

from stages import io
from stages.schema import Key
from stages.errors import SourceError

VERSION = "0.1.0"
USER_AGENT = f"medforge/{VERSION} (medical LoRA data pipeline; python-httpx)"
# Slightly under the documented limit: server-side windows see request arrival times,
# which jitter by a few milliseconds around the times we send them.
RATE_MARGIN = 0.97


@dataclass(frozen=True)
class Api:
    """One public API: where it lives, how fast it may be called, how it says "slow down"."""
    name: str
    title: str
    base_url: str
    rate: float                       # requests per second without a key
    keyed_rate: float | None = None   # with a key
    daily: int | None = None          # requests per day without a key (None: no documented cap)
    keyed_daily: int | None = None
    key_env: str | None = None        # environment variable holding the key
    key_param: str | None = None      # query parameter the key travels in
    over_limit: tuple[int, ...] = (429,)  # statuses that always mean "too many requests"
    over_limit_marked: tuple[int, ...] = ()  # statuses that mean it only with `throttle_marker` in the body
    throttle_marker: bytes = b""      # a short answer (under 2 KiB) holding this, in any case, is over the limit,
                                      # whatever its status (even 200)
    wait_pattern: bytes = b""         # regex: group 1 is the seconds to wait, read from an over-limit body
                                      # when there is no Retry-After header
    backoff_in_body: bool = False     # every JSON answer carries `backoff` (s to wait) and `quota_remaining`
    identify: bool = False            # every request names the tool and the contact email (tool=, email=)
    limit_doc: str = ""               # where the limit is documented
    error_fields: tuple[str, ...] = ("error",)  # top-level JSON keys that make an answer an error, even a 200
    error_xml: bytes | None = None    # an XML answer holding this element is an error (NCBI's <ERROR>)
    json_top: tuple[type, ...] = (dict,)  # what the top level of a JSON answer is (an object, for most)


APIS: dict[str, Api] = {a.name: a for a in (
    Api("ncbi", "NCBI E-utilities", "https://eutils.ncbi.nlm.nih.gov/entrez/eutils", rate=3, keyed_rate=10,
        key_env="NCBI_API_KEY", key_param="api_key", error_xml=b"<ERROR>", identify=True,
        throttle_marker=b"rate limit exceeded",  # {"error":"API rate limit exceeded",...}, sometimes as a 200
        limit_doc="https://www.ncbi.nlm.nih.gov/books/NBK25497/ (3 req/s, 10 with api_key)"),
    Api("openfda", "openFDA", "https://api.fda.gov", rate=4, keyed_rate=4, daily=1000, keyed_daily=120_000,
        key_env="OPENFDA_API_KEY", key_param="api_key",
        limit_doc="https://open.fda.gov/apis/authentication/ (240 req/min; 1,000/day, 120,000 with key)"),
    Api("dailymed", "DailyMed v2", "https://dailymed.nlm.nih.gov/dailymed/services/v2", rate=4,
        limit_doc="undocumented; medforge keeps to 4 req/s"),
    Api("rxnav", "RxNav (RxNorm)", "https://rxnav.nlm.nih.gov/REST", rate=20, over_limit=(403, 429),
        limit_doc="https://lhncbc.nlm.nih.gov/RxNav/TermsofService.html (20 req/s per IP; over-limit answers 403)"),
    Api("clinicaltrials", "ClinicalTrials.gov v2", "https://clinicaltrials.gov/api/v2", rate=50 / 60,
        limit_doc="https://clinicaltrials.gov/data-api/api (about 50 req/min per IP)"),
    Api("fda", "FDA.gov", "https://www.fda.gov", rate=2, json_top=(list, dict),  # the guidance index is an array
        limit_doc="undocumented; medforge keeps to 2 req/s"),
    Api("stackexchange", "Stack Exchange API 2.3", "https://api.stackexchange.com/2.3", rate=30, daily=300,
        keyed_daily=10_000, key_env="STACKEXCHANGE_KEY", key_param="key", over_limit_marked=(400,),
        throttle_marker=b"throttle_violation", wait_pattern=rb"available in (\d+) seconds", backoff_in_body=True,
        error_fields=("error_id", "error_name"),
        limit_doc="https://api.stackexchange.com/docs/throttle (30 req/s per IP; 300/day, 10,000 with key)"),
    Api("medlineplus", "MedlinePlus", "https://medlineplus.gov", rate=85 / 60,
        limit_doc="https://medlineplus.gov/about/developers/webservices/ (85 req/min per IP)"),
)}

CONTACT_ENV = ("MEDFORGE_EMAIL", "NCBI_EMAIL")
SECRET_ENV = tuple(a.key_env for a in APIS.values() if a.key_env) + CONTACT_ENV
SECRET_PARAMS = {"api_key", "key", "email", "access_token"}


# --- secrets: environment first, then ./.env; values never leave this module unredacted
def read_dotenv(path: str | Path = ".env") -> dict[str, str]:
    """KEY=VALUE lines (optional `export`, quotes, # comments) of a .env file; missing file -> {}."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].strip()
        values[key.strip()] = value
    return values


def secret(name: str, env: dict[str, str] | None = None, dotenv: str | Path = ".env") -> str | None:
    env = os.environ if env is None else env
    value = env.get(name) or read_dotenv(dotenv).get(name)
    return value or None


def contact_email(env: dict[str, str] | None = None, dotenv: str | Path = ".env") -> str | None:
    for name in CONTACT_ENV:
        value = secret(name, env, dotenv)
        if value:
            return value
    return None


class Redactor:
    """Replaces every known secret value, and secret query parameters, with ***."""

    def __init__(self, values: list[str]):
        self.values = sorted({v for v in values if v and len(v) >= 3}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, "***")
            quoted = urllib.parse.quote(value, safe="")
            if quoted != value:
                text = text.replace(quoted, "***")
        return re.sub(r"([?&](?:%s)=)[^&#\s]*" % "|".join(sorted(SECRET_PARAMS)), r"\1***", text)

    def body(self, content: bytes) -> bytes:
        """A response body with every secret the request carried (as sent or URL-encoded) replaced by ***:
        an API that echoes the request (its URL in an error, a `meta` block) never gets a key stored."""
        for value in self.values:
            for form in {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}:
                content = content.replace(form.encode("utf-8"), b"***")
        return content


def strip_secret_params(params: dict[str, Any]) -> dict[str, Any]:
    """Query params safe to store (a checkpoint cursor): secrets dropped, the client adds them back."""
    return {k: v for k, v in params.items() if k not in SECRET_PARAMS and k != "tool"}


# --- rate limiting
class RateLimiter:
    """Even spacing at `rate` requests/s (a token bucket of depth 1).

    With `lock_path`, the schedule lives in that file under an flock, so every process
    calling one API shares one budget. `pause(seconds)` pushes the next slot back (a
    Retry-After or StackExchange `backoff` applies to everyone).
    """

    def __init__(self, rate: float, lock_path: str | Path | None = None):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self.lock_path = Path(lock_path) if lock_path else None
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic-free: wall clock, so processes agree
        if self.lock_path:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _shared(self):
        with self._lock:
            if not self.lock_path:
                yield
                return
            with open(self.lock_path, "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    fh.seek(0)
                    raw = fh.read().strip()
                    self._next = float(raw) if raw else 0.0
                    yield
                    fh.seek(0)
                    fh.truncate()
                    fh.write(repr(self._next).encode())
                    fh.flush()
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def reserve(self) -> float:
        """Claim the next slot; returns how long to sleep before sending."""
        with self._shared():
            now = time.time()
            slot = max(now, self._next)
            self._next = slot + self.interval
            return slot - now

    def wait(self) -> None:
        delay = self.reserve()
        if delay > 0:
            time.sleep(delay)

    def pause(self, seconds: float) -> None:
        with self._shared():
            self._next = max(self._next, time.time() + seconds)


# --- the client
class HttpError(SourceError):
    """A request failed for good; one line, secrets redacted."""


class QuotaExhausted(HttpError):
    """The API's daily quota is used up: the scrape stops, its checkpoint keeps the place."""


class Offline(HttpError):
    """The API's host cannot be reached at all."""


@dataclass
class Reply:
    status: int
    content: bytes
    headers: Any
    url: str  # redacted
    _json: Any = field(default=None, repr=False)

    def json(self) -> Any:
        if self._json is None:
            self._json = orjson.loads(self.content)
        return self._json

    def link(self, rel: str = "next") -> str | None:
        """The URL of an RFC 8288 `Link` header relation (openFDA's search_after paging)."""
        for part in self.headers.get_list("link") if hasattr(self.headers, "get_list") else [self.headers.get("link", "")]:
            for item in part.split(","):
                m = re.match(r'\s*<([^>]*)>\s*;\s*rel="?([^";]+)"?', item)
                if m and m.group(2) == rel:
                    return m.group(1)
        return None


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""

    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.reason, self.delay = reason, delay


class Incomplete(_Retry):
    """Raised by a request's `check`: a well-formed answer that cannot be the page asked for
    (it ends the listing short, or is empty yet points further); retried like a 5xx."""


@dataclass(frozen=True)
class Page:
    """What one answer of a paged listing says about the whole listing (read by a source, judged by a Listing)."""
    items: int                   # records on this page
    next: Any = None             # the cursor of the next page (token, link query, page number); None: the last page
    total: Any = None            # records in the whole listing, where the API says (totalCount, meta.results.total)
    capped: bool = False         # the source stops here on purpose, at a documented cap it warns about


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


class Listing:
    """One paged listing, checked page by page against what the API itself said "all" is.

    Its state (records so far, the announced total, hashes of the cursors seen) lives in the
    source's checkpoint under "listing", so a resumed scrape keeps checking where it stopped.
    Pass `check(read)` to `Client.get`: `read(reply) -> Page` is the source's only per-API part.
    - a page with no next cursor while fewer records than announced (or `wanted`) have come is
      not the end: it is retried, then the scrape fails in one line naming the shortfall;
    - an empty page that still points further is retried the same way;
    - a next cursor seen before stops the scrape at once (a server stuck on one page).
    Nothing changes until a page passes, so a bad answer is never stored or counted.
    """

    def __init__(self, source: str, state: dict[str, Any], *, wanted: int = 0, got: int = 0):
        self.source = source
        self.wanted = wanted
        self.state = state.setdefault("listing", {"got": got, "total": None, "seen": []})
        self.last: Page | None = None

    def check(self, read: Callable[[Reply], Page]) -> Callable[[Reply], None]:
        def judge(reply: Reply) -> None:
            page = read(reply)
            st = self.state
            total = _count(page.total)
            total = total if total is not None else st["total"]
            got = st["got"] + page.items
            of = f" of the {total:,} records the API announced" if total is not None else " records"
            key = None
            if page.next is not None:
                key = io.content_hash(io.dumps(page.next))[:16]
                if key in st["seen"]:
                    shown = str(page.next if not isinstance(page.next, dict) else urllib.parse.urlencode(page.next))
                    raise HttpError(f"{self.source}: the API sent the same next-page cursor again ({shown[:60]}) after "
                                    f"{got:,}{of}: stopped instead of paging in a loop, nothing marked done; rerun "
                                    f"`doit scrape:{self.source}` later (it resumes from its checkpoint), or narrow "
                                    f"[sources.{self.source}.params] if it repeats")
                if page.items == 0:
                    raise Incomplete(f"an empty page that still points to a next one, after {st['got']:,}{of}")
            elif not page.capped and total is not None:
                expected = min(total, self.wanted) if self.wanted else total
                if got < expected:
                    raise Incomplete(f"the listing ended (no next page) after {got:,}{of}")
            st.update(got=got, total=total)
            if key is not None:
                st["seen"].append(key)
            self.last = page
        return judge


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _looks_html(content: bytes, content_type: str) -> bool:
    head = content[:512].lstrip().lower()
    return "text/html" in content_type or head.startswith((b"<!doctype html", b"<html"))


def _xml_complete(content: bytes) -> str | None:
    """None when `content` is one well-formed XML document, else why not (no DTD is fetched)."""
    import xml.parsers.expat

    parser = xml.parsers.expat.ParserCreate()
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(content, True)
    except xml.parsers.expat.ExpatError as exc:
        return f"incomplete or malformed XML ({xml.parsers.expat.ErrorString(exc.code)})"
    return None


# what a source's [params] may set for the client (stages.schema.Key; checked by config.load with the source's own)
PARAMS = {
    "base_url": Key(str, "", pattern=r"https?://\S+", expect="an http:// or https:// URL"),  # "" = the API's
    "rate": Key(float, 0.0, min=0, expect="0 (the API's documented limit) or more, in requests/s"),
    "retries": Key(int, 6, min=0),
    "backoff": Key(float, 1.0, min=0),
    "backoff_cap": Key(float, 60.0, min=0),
    "max_wait": Key(float, 600.0, min=0),
    "timeout": Key(float, 60.0, above=0),
    "daily_limit": Key(int, 0, min=0, expect="0 (the API's documented cap) or more"),
    "lock_dir": Key(str, ""),  # "" = data/.ratelimit
}


class Client:
    """HTTP for one source against one API. Use as a context manager or call close().

    params understood (all optional, from `[sources.<name>.params]`):
      base_url      the API root (a local mirror or test server)
      rate          requests/s instead of the documented limit (never above it in real use)
      retries       attempts after the first (default 6)
      backoff       first backoff delay in seconds (default 1.0; doubles, with jitter, to 60)
      max_wait      longest single wait asked by the API that we accept (default 600 s)
      timeout       seconds per request (default 60)
      daily_limit   requests per UTC day (default: the API's documented cap); counted with the
                    API's last reported quota in `<lock_dir>/<api>-<host>.usage.json`, so resumed
                    runs and parallel sources of one API share one daily budget
    """

    def __init__(self, source: str, api: str, params: dict[str, Any] | None = None, *,
                 env: dict[str, str] | None = None, dotenv: str | Path = ".env",
                 lock_dir: str | Path | None = None):
        import httpx  # heavy-ish; only network sources need it

        params = params or {}
        self.source = source
        self.api = APIS[api]
        self.base_url = str(params.get("base_url") or self.api.base_url).rstrip("/")
        self.key = secret(self.api.key_env, env, dotenv) if self.api.key_env else None
        self.email = contact_email(env, dotenv)
        documented = (self.api.keyed_rate if self.key and self.api.keyed_rate else self.api.rate)
        self.rate = float(params.get("rate") or documented)
        self.retries = int(params.get("retries", 6))
        self.backoff = float(params.get("backoff", 1.0))
        self.backoff_cap = float(params.get("backoff_cap", 60.0))
        self.max_wait = float(params.get("max_wait", 600.0))
        self.daily_limit = params.get("daily_limit") or (self.api.keyed_daily if self.key else self.api.daily)
        self.redact = Redactor([v for v in (self.key, self.email) if v]
                               + [secret(n, env, dotenv) or "" for n in SECRET_ENV])
        if lock_dir is None:
            lock_dir = Path(params.get("lock_dir") or "data/.ratelimit")
        host = urllib.parse.urlsplit(self.base_url).netloc.replace(":", "_") or "local"
        self.limiter = RateLimiter(self.rate * RATE_MARGIN, Path(lock_dir) / f"{self.api.name}-{host}.next")
        self.usage_path = Path(lock_dir) / f"{self.api.name}-{host}.usage.json"
        self.requests = 0          # sent, retries included
        self.over_limit = 0        # answers that said "too many requests"
        self.quota_remaining: int | None = None
        self._httpx = httpx
        self._client = httpx.Client(
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate"},
            timeout=httpx.Timeout(float(params.get("timeout", 60.0)), connect=min(10.0, float(params.get("timeout", 60.0)))),
            follow_redirects=True)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # -- URL building: the key and NCBI's tool/email are added here and only here
    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def _auth_params(self) -> dict[str, str]:
        extra: dict[str, str] = {}
        if self.api.identify:
            extra["tool"] = "medforge"
            if self.email:
                extra["email"] = self.email
        if self.key and self.api.key_param:
            extra[self.api.key_param] = self.key
        return extra

    def shown(self, method: str, url: str, params: dict[str, Any] | None = None) -> str:
        """A request as it may appear in messages: no secrets."""
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if k not in SECRET_PARAMS}, doseq=True)
        return self.redact(f"{method} {url}{'?' + query if query else ''}")

    # -- the request loop
    def get(self, path: str, params: dict[str, Any] | None = None, **kw) -> Reply:
        return self.request("GET", path, params=params, **kw)

    def post(self, path: str, data: dict[str, Any] | None = None, **kw) -> Reply:
        return self.request("POST", path, data=data, **kw)

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                data: dict[str, Any] | None = None, expect: str = "json",
                accept: tuple[int, ...] = (200,), check: Callable[[Reply], None] | None = None,
                api_errors: bool = True) -> Reply:
        """Send until a good answer or the retry budget is spent.

        expect: "json", "xml", "pdf" or "bytes" — what a good 200 body must be (an HTML error page,
        a truncated body, JSON of the wrong shape or, unless `api_errors` is False, the API's
        own error in a 200 is retried). accept: statuses handed back to the caller as is
        (e.g. openFDA's 404 NOT_FOUND, which means "no results"). check: called on a good 200
        (a `Listing.check`); it raises `Incomplete` to retry, or a SourceError to stop.
        """
        url = self.url(path)
        params = {k: v for k, v in (params or {}).items() if v is not None}
        auth = self._auth_params()
        if method == "POST":  # long id lists go in the body, and so do the secrets
            data = {**(data or {}), **auth}
        else:
            params = {**params, **auth}
        shown = self.shown(method, url, params)
        last = "no attempt"
        for attempt in range(self.retries + 1):
            self._spend(shown)
            self.limiter.wait()
            try:
                response = self._client.request(method, url, params=params, data=data)
                content = self.redact.body(response.content)  # before anything reads, parses or stores it
                return self._judge(response, content, expect, accept, shown, check, api_errors)
            except _Retry as retry:
                last = retry.reason
                delay = retry.delay if retry.delay is not None else self._backoff(attempt)
            except self._httpx.TimeoutException:
                last, delay = "timed out", self._backoff(attempt)
            except self._httpx.ConnectError as exc:
                last, delay = f"cannot connect ({self.redact(str(exc)) or 'connection refused'})", self._backoff(attempt)
                if attempt >= min(2, self.retries):
                    raise Offline(self._offline_message()) from None
            except (self._httpx.RemoteProtocolError, self._httpx.ReadError, self._httpx.WriteError) as exc:
                last, delay = f"connection dropped mid-response ({type(exc).__name__})", self._backoff(attempt)
            except self._httpx.DecodingError:
                last, delay = "a corrupt compressed body (its Content-Encoding does not decode)", self._backoff(attempt)
            except self._httpx.TooManyRedirects:
                raise HttpError(f"{self.source}: {shown} redirects in a redirect loop (over {self._client.max_redirects} "
                                f"hops); check base_url in [sources.{self.source}.params] of sources.toml, or rerun "
                                f"`doit scrape:{self.source}` later if the server is misconfigured") from None
            except self._httpx.UnsupportedProtocol:
                raise HttpError(f"{self.source}: {shown} is not an http(s) URL; fix base_url in "
                                f"[sources.{self.source}.params] of sources.toml") from None
            except self._httpx.HTTPError as exc:  # any other transport fault (proxy, protocol): worth another try
                last, delay = f"{type(exc).__name__}: {self.redact(str(exc))[:120]}", self._backoff(attempt)
            if attempt == self.retries:
                break
            if delay > self.max_wait:
                raise HttpError(f"{self.source}: {self.api.title} asks to wait {delay:.0f} s ({last}) on {shown}; "
                                f"rerun `doit scrape:{self.source}` later — it resumes from its checkpoint")
            self.limiter.pause(delay)
            time.sleep(delay)
        raise HttpError(f"{self.source}: {shown} failed after {self.retries + 1} attempts (last: {last}); "
                        f"the API may be down, throttling this machine or serving partial answers — nothing is marked "
                        f"done; rerun `doit scrape:{self.source}` later, it resumes from its checkpoint")

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_cap, self.backoff * (2 ** attempt))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter": never a zero wait

    def _offline_message(self) -> str:
        host = urllib.parse.urlsplit(self.base_url).netloc
        return (f"source '{self.source}' cannot reach {self.api.title} ({host}): this machine looks offline; "
                f"set mode = \"mirror\" in [sources.{self.source}] of sources.toml to build from data/raw/{self.source}/ "
                f"(copied from a connected machine), or enabled = false to skip it")

    # -- the daily budget, kept beside the limiter's file: it outlives this run and is shared by every process
    def _usage(self) -> dict[str, Any]:
        today = dt.datetime.now(dt.timezone.utc).date().isoformat()
        with contextlib.suppress(OSError, ValueError):
            usage = io.read_json(self.usage_path)
            if usage.get("day") == today:
                return usage
        return {"day": today, "requests": 0}

    def _spend(self, shown: str) -> None:
        """Count one request against today's budget (UTC) of this API, or stop before sending it."""
        if self.daily_limit:
            with self.limiter._shared():
                usage = self._usage()
                quotas = [q for q in (self.quota_remaining, usage.get("quota_remaining")) if q is not None]
                if quotas and min(quotas) <= 0:
                    raise QuotaExhausted(f"{self.source}: {self.api.title} daily quota is used up (quota_remaining 0) "
                                         f"before {shown}; rerun after midnight UTC (it resumes from its checkpoint)"
                                         f"{f', or set {self.api.key_env} for a larger quota' if not self.key else ''}")
                if usage["requests"] >= int(self.daily_limit):
                    raise QuotaExhausted(f"{self.source}: {usage['requests']} requests sent today (UTC): {self.api.title}'s "
                                         f"daily limit{' without a key' if not self.key else ''} is {self.daily_limit}; "
                                         f"rerun tomorrow (it resumes from its checkpoint)"
                                         f"{f', or set {self.api.key_env}' if self.api.key_env and not self.key else ''}")
                usage["requests"] += 1
                io.write_json(self.usage_path, usage, durable=False)
        self.requests += 1

    def _note_quota(self, remaining: int) -> None:
        self.quota_remaining = remaining
        with self.limiter._shared():
            io.write_json(self.usage_path, {**self._usage(), "quota_remaining": remaining}, durable=False)

    def _judge(self, response, content: bytes, expect: str, accept: tuple[int, ...], shown: str,
               check: Callable[[Reply], None] | None = None, api_errors: bool = True) -> Reply:
        status = response.status_code
        headers = response.headers
        reply = Reply(status, content, headers, self.redact(str(response.url)))
        body_error = self._throttle_in_body(content)
        if status in self.api.over_limit or (status in self.api.over_limit_marked and body_error):
            self.over_limit += 1
            raise _Retry(f"HTTP {status}: too many requests", self._wait_hint(headers, content))
        if status >= 500 or status == 408:
            raise _Retry(f"HTTP {status}", retry_after(headers.get("retry-after")))
        if status in accept and status != 200:
            return reply
        if status != 200 and status not in accept:
            detail = self.redact(content[:300].decode("utf-8", "replace")).replace("\n", " ").strip()
            raise HttpError(f"{self.source}: {shown} answered HTTP {status} ({detail or 'no detail'}); "
                            f"check [sources.{self.source}.params] in sources.toml")
        if body_error:
            self.over_limit += 1
            raise _Retry(f"rate-limit error in a 200 body ({body_error})", self._wait_hint(headers, content))
        content_type = headers.get("content-type", "")
        if expect in ("json", "xml", "pdf") and _looks_html(content, content_type):
            raise _Retry(f"an HTML page instead of {expect.upper()} (a proxy or maintenance page)")
        if expect == "json":
            try:
                reply._json = orjson.loads(content)
            except orjson.JSONDecodeError:
                raise _Retry("truncated or invalid JSON body") from None
            self._backoff_in_body(reply._json)
            if not isinstance(reply._json, self.api.json_top):
                raise _Retry(f"JSON of the wrong shape ({type(reply._json).__name__} where {self.api.title} answers "
                             f"{' or '.join(t.__name__ for t in self.api.json_top)})")
        elif expect == "xml":
            problem = _xml_complete(content)
            if problem:
                raise _Retry(problem)
        if api_errors:
            error = self._api_error(reply, expect)
            if error:
                raise _Retry(f"an API error in a 200 answer: {error}")
        if check is not None:
            try:
                check(reply)
            except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:  # a page of a shape not planned for
                raise _Retry(f"an answer of an unexpected shape ({type(exc).__name__}: {self.redact(str(exc))[:100]})") from None
        elif expect == "pdf":
            if not content.lstrip()[:5] == b"%PDF-":
                raise _Retry("not a PDF")
            if b"%%EOF" not in content[-2048:]:
                raise _Retry("truncated PDF (no %%EOF)")
        return reply

    def _api_error(self, reply: Reply, expect: str) -> str | None:
        """The API's own error inside a 200 (the Api's `error_fields` / `error_xml`), shortened and redacted."""
        if expect == "json" and isinstance(reply._json, dict):
            found = {k: reply._json[k] for k in self.api.error_fields if reply._json.get(k) not in (None, "", [], {})}
            if found:
                return self.redact(io.dumps(found).decode("utf-8", "replace"))[:200]
        elif expect == "xml" and self.api.error_xml and self.api.error_xml in reply.content[:4096]:
            m = re.search(re.escape(self.api.error_xml) + rb"(.*?)</", reply.content[:4096], re.S)
            detail = m.group(1).decode("utf-8", "replace").strip()[:160] if m else ""
            return self.redact(f"{self.api.error_xml.decode()}{detail}")
        return None

    def _throttle_in_body(self, content: bytes) -> str | None:
        """The Api's `throttle_marker` in a short answer: an over-limit answer, whatever its status says."""
        marker = self.api.throttle_marker
        if marker and len(content) < 2048 and marker in content.lower():
            return marker.decode()
        return None

    def _wait_hint(self, headers, content: bytes) -> float | None:
        hint = retry_after(headers.get("retry-after"))
        if hint is None and self.api.wait_pattern:
            m = re.search(self.api.wait_pattern, content[:2048])
            if m:
                hint = float(m.group(1))
        return hint

    def _backoff_in_body(self, doc: Any) -> None:
        """`backoff` (seconds before the next call) and `quota_remaining` in every answer (Stack Exchange's wrapper)."""
        if not self.api.backoff_in_body or not isinstance(doc, dict):
            return
        if isinstance(doc.get("quota_remaining"), int):
            self._note_quota(doc["quota_remaining"])
        if isinstance(doc.get("backoff"), (int, float)) and doc["backoff"] > 0:
            if doc["backoff"] > self.max_wait:
                raise HttpError(f"{self.source}: Stack Exchange asks for a {doc['backoff']} s backoff; "
                                f"rerun later (it resumes from its checkpoint)")
            self.limiter.pause(float(doc["backoff"]))


def client(source: str, api: str, params: dict[str, Any] | None = None, **kw) -> Client:
    return Client(source, api, params, **kw)


def offline_requested(env: dict[str, str] | None = None) -> bool:
    """MEDFORGE_OFFLINE=1 (what `doit offline=1` sets) forbids every network fetch: network sources build
    from the raw pages already in data/raw/ (see stages/scrape.py)."""
    env = os.environ if env is None else env
    return env.get("MEDFORGE_OFFLINE", "").strip().lower() in ("1", "true", "yes")

