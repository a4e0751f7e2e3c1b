"""A local stand-in for every API medforge scrapes: replay, limits, faults.

`FakeApi` is a threaded HTTP server on 127.0.0.1. Each API lives under its own path
prefix (`/ncbi`, `/openfda`, `/clinicaltrials`, ...) so a source's `base_url` param
points at `server.url("ncbi")` and the real client code talks to it.

- Replay: answers are built from the REAL recorded responses in ../shared/fixtures
  (PubMed efetch articles, openFDA label/event results, ClinicalTrials.gov studies, the
  DailyMed SPL, the FDA guidance index, NCBI's rate-limit body); to serve more pages
  than were recorded, a record is repeated with only its identifier (and date) rewritten.
  Sources without a real capture replay the documented-shape `tests/fixtures/synthetic_*`.
- Limits: each API's documented rate (times `scale`) is enforced over a sliding window;
  an over-limit request gets that API's real over-limit answer (429, RxNav's 403,
  NCBI's error body, StackExchange's throttle_violation) and is counted.
- Faults: `inject(api, *faults)` queues faults for that API's next requests:
  "429", "429-retry-after", "503", "timeout", "truncated", "html200", "ncbi-error200",
  "se-backoff", "se-throttle", and the silent-loss ones: "error200" (the API's real error
  body with status 200), "empty-end" (the page emptied and its next cursor dropped, the
  announced total kept), "gzip-corrupt" (a gzip Content-Encoding over garbage),
  "redirect-loop" (a 302 back to the same URL), "array200"/"null200" (JSON of the wrong
  shape), "echo" (the normal answer plus the request's URL and form, secrets included: a JSON
  object's "request" key, an XML comment), "ok" (answer normally: to aim a later fault at page 2). `stick(api, fault)`
  applies a fault to every request once the queue is empty, until `unstick(api)`;
  `repeat_cursor` (a set of APIs) makes the next-page cursor repeat the one just sent.
- Quotas: StackExchange wrappers report `quota_remaining` counting down from `se_quota`;
  past 0 every call is a throttle_violation. `se_replay` (a list of files) replays whole
  recorded wrappers as the questions pages 1, 2, ...
"""
from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SYNTHETIC = Path(__file__).resolve().parent / "fixtures"

# documented limits as (requests, window seconds); see stages/http.py APIS
LIMITS = {
    "ncbi": (3, 1.0), "openfda": (4, 1.0), "dailymed": (4, 1.0), "rxnav": (20, 1.0),
    "clinicaltrials": (1, 1.2), "fda": (2, 1.0), "stackexchange": (30, 1.0), "medlineplus": (1, 60 / 85),
}
HTML_PAGE = b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head><body>Maintenance</body></html>"


def _articles() -> list[str]:
    out = []
    for name in ("pubmed1.xml", "pubmed2.xml"):
        text = (FIXTURES / "pubmed" / name).read_text(encoding="utf-8")
        out += re.findall(r"<PubmedArticle>.*?</PubmedArticle>", text, re.S)
    return out


def _studies() -> list[dict]:
    out = []
    for name in ("search_phelan_limit5_20260811.json", "search_phelan_next_20260811.json"):
        out += json.loads((FIXTURES / "clinicaltrials" / name).read_text())["studies"]
    for name in ("get_nct06382129_20260811.json", "get_nct06604689_20260811.json"):
        out.append(json.loads((FIXTURES / "clinicaltrials" / name).read_text()))
    return out


class FakeApi:
    def __init__(self, *, records: int = 60, scale: float = 1.0, limits: dict | None = None,
                 enforce: bool = True, openfda_link: bool = True, openfda_skip_max: int = 25_000,
                 pubmed_cap: int = 10_000, timeout_sleep: float = 1.0):
        self.records = records
        self.scale = scale
        self.limits = {api: (max(1, round(n * scale)) if scale >= 1 else n, w if scale >= 1 else w / scale)
                       for api, (n, w) in {**LIMITS, **(limits or {})}.items()}
        self.enforce = enforce
        self.openfda_link = openfda_link
        self.openfda_skip_max = openfda_skip_max
        self.pubmed_cap = pubmed_cap
        self.timeout_sleep = timeout_sleep
        self.se_quota = 300  # StackExchange's daily quota without a key
        self.se_replay: list[Path] = []
        self.faults: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.sticky: dict[str, str] = {}
        self.repeat_cursor: set[str] = set()
        self.arrivals: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.log: list[dict] = []  # every request: api, path, query, t, status, over_limit, ua
        self.lock = threading.Lock()
        self.webenvs: dict[str, list[str]] = {}
        self._build_data()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # --- lifecycle
    def __enter__(self) -> "FakeApi":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, api: str) -> str:
        return f"http://127.0.0.1:{self.port}/{api}"

    def inject(self, api: str, *faults: str) -> None:
        with self.lock:
            self.faults[api].extend(faults)

    def stick(self, api: str, fault: str) -> None:
        with self.lock:
            self.sticky[api] = fault

    def unstick(self, api: str) -> None:
        with self.lock:
            self.sticky.pop(api, None)

    def requests(self, api: str | None = None) -> list[dict]:
        return sorted((r for r in self.log if api is None or r["api"] == api), key=lambda r: r["t"])  # arrival order

    def over_limit(self, api: str | None = None) -> int:
        return sum(1 for r in self.requests(api) if r["over_limit"])

    # --- data, from the recorded responses
    def _build_data(self) -> None:
        n = self.records
        articles = _articles()
        start = dt.date(2020, 1, 1)
        self.pubmed = []  # (pmid, date, xml)
        for i in range(n):
            pmid = str(30_000_000 + i)
            xml = articles[i % len(articles)]
            xml = re.sub(r'<PMID Version="1">\d+</PMID>', f'<PMID Version="1">{pmid}</PMID>', xml, count=1)
            xml = re.sub(r'<ArticleId IdType="pubmed">\d+</ArticleId>', f'<ArticleId IdType="pubmed">{pmid}</ArticleId>', xml)
            self.pubmed.append((pmid, start + dt.timedelta(days=(i * 7) % 366), xml))
        labels = [json.loads((FIXTURES / "openfda" / f).read_text())["results"][0] for f in ("aspirin.json", "sudafed.json")]
        event = json.loads((FIXTURES / "openfda" / "event_50242-051-death.json").read_text())["results"][0]
        self.labels = []
        for i in range(n):
            rec = dict(labels[i % len(labels)])
            rec["id"] = f"00000000-0000-4000-8000-{i:012d}"
            rec["set_id"] = f"11111111-0000-4000-8000-{i:012d}"
            self.labels.append(rec)
        self.events = [dict(event, safetyreportid=str(20_000_000 + i)) for i in range(n)]
        self.studies = []
        base = _studies()
        for i in range(n):
            study = json.loads(json.dumps(base[i % len(base)]))
            study["protocolSection"]["identificationModule"]["nctId"] = f"NCT9{i:07d}"
            self.studies.append(study)
        self.spl = (FIXTURES / "spl" / "cough.xml").read_text(encoding="utf-8")
        # the DailyMed listing: the synthetic listing's rows first, then rows of its shape
        self.spls_listing = json.loads((SYNTHETIC / "synthetic_dailymed_spls.json").read_text())
        rows = self.spls_listing["data"]
        self.spl_rows = rows + [dict(rows[-1], setid=f"22222222-0000-4000-8000-{i:012d}", title=f"{rows[-1]['title']} #{i}")
                                for i in range(max(1, n // 10))]
        self.setids = [r["setid"] for r in self.spl_rows]

    # --- request handling
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake._serve(self, "GET")

            def do_POST(self):
                fake._serve(self, "POST")

        return Handler

    def _over_limit(self, api: str, now: float) -> bool:
        n, window = self.limits.get(api, (10**9, 1.0))
        arrivals = self.arrivals[api]
        while arrivals and arrivals[0] <= now - window:
            arrivals.popleft()
        arrivals.append(now)
        return self.enforce and len(arrivals) > n

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        now = time.time()
        parts = urllib.parse.urlsplit(h.path)
        segments = parts.path.strip("/").split("/")
        api, rest = segments[0], "/".join(segments[1:])
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        if method == "POST":
            length = int(h.headers.get("content-length", 0))
            query.update(urllib.parse.parse_qsl(h.rfile.read(length).decode()))
        with self.lock:
            over = self._over_limit(api, now)
            fault = None if over else self.faults[api].popleft() if self.faults[api] else self.sticky.get(api)
        entry = {"api": api, "path": rest, "query": query, "t": now, "over_limit": over, "fault": fault,
                 "ua": h.headers.get("user-agent", ""), "method": method, "status": None}
        self.log.append(entry)  # at arrival: a request still being answered (a timeout) is already counted
        if over:
            status, headers, body = self._over_limit_answer(api)
        elif fault:
            status, headers, body = self._fault(api, fault, h, rest, query)
            if status is None:  # handled (truncated/timeout) or fall through to a normal answer
                if headers == "sent":
                    entry["status"] = 200
                    return
                status, headers, body = self._route(api, rest, query)
        else:
            status, headers, body = self._route(api, rest, query)
        if fault in ("empty-end", "array200", "null200") and status == 200 and "json" in headers.get("Content-Type", ""):
            headers, body = self._reshape(fault, headers, body)
        if fault == "echo" and status == 200:  # an API that echoes the request, secrets included, in its answer
            body = self._echo(headers, body, f"{parts.path}?{urllib.parse.urlencode(query)}")
        if fault == "se-backoff" and status == 200:
            doc = json.loads(body)
            doc["backoff"] = 1
            body = json.dumps(doc).encode()
        entry["status"] = status
        self._send(h, status, headers, body)

    @staticmethod
    def _send(h, status: int, headers: dict, body: bytes) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that timed out has gone
            h.wfile.write(body)

    @staticmethod
    def _echo(headers: dict, body: bytes, request: str) -> bytes:
        if "json" in headers.get("Content-Type", ""):
            doc = json.loads(body)
            if isinstance(doc, dict):
                return json.dumps({**doc, "request": request}).encode()
            return body
        return body + f"<!-- request: {request} -->\n".encode()  # XML: a comment after the root element

    @staticmethod
    def _reshape(fault: str, headers: dict, body: bytes):
        if fault != "empty-end":  # valid JSON, but not the object the API documents
            return headers, b"null" if fault == "null200" else json.dumps([json.loads(body)]).encode()
        doc = json.loads(body)  # what a silently-failing backend sends: no records, no cursor, the total unchanged
        for key in ("results", "studies", "items", "data"):
            if isinstance(doc.get(key), list):
                doc[key] = []
        doc.pop("nextPageToken", None)
        if "has_more" in doc:
            doc["has_more"] = False
        if isinstance(doc.get("metadata"), dict):
            doc["metadata"].update(next_page="null", next_page_url="null")
        return {k: v for k, v in headers.items() if k.lower() != "link"}, json.dumps(doc).encode()

    def _over_limit_answer(self, api: str):
        js = {"Content-Type": "application/json"}
        if api == "ncbi":
            return 429, js, (FIXTURES / "pubmed" / "ratelimit_error.json").read_bytes()
        if api == "rxnav":
            return 403, {"Content-Type": "text/html"}, b"<html><body>403 Forbidden</body></html>"
        if api == "stackexchange":
            return 400, js, json.dumps({"error_id": 502, "error_name": "throttle_violation",
                                        "error_message": "too many requests from this IP, more requests available in 1 seconds"}).encode()
        return 429, js, json.dumps({"error": {"code": "OVER_RATE_LIMIT", "message": "API rate limit exceeded"}}).encode()

    def _fault(self, api: str, fault: str, h, rest: str, query: dict):
        js = {"Content-Type": "application/json"}
        if fault == "429":
            return 429, js, b'{"error":{"code":"OVER_RATE_LIMIT","message":"You have exceeded your rate limit."}}'
        if fault == "429-retry-after":
            return 429, {**js, "Retry-After": "1"}, b'{"error":{"code":"OVER_RATE_LIMIT","message":"slow down"}}'
        if fault == "503":
            return 503, {"Content-Type": "text/html"}, HTML_PAGE
        if fault == "html200":
            return 200, {"Content-Type": "text/html; charset=utf-8"}, HTML_PAGE
        if fault == "error200":  # the API's own error body, sent with 200
            if api == "openfda":
                return 200, js, (FIXTURES / "openfda" / "500.json").read_bytes()
            if api == "ncbi":
                return 200, {"Content-Type": "text/xml"}, (b'<?xml version="1.0" ?>\n<eFetchResult>\n\t<ERROR>Unable to '
                                                          b'obtain query #1</ERROR>\n</eFetchResult>\n')
            if api == "stackexchange":
                return 200, js, b'{"error_id":500,"error_name":"internal_error","error_message":"an internal error"}'
            return 200, js, b'{"error":{"code":"SERVER_ERROR","message":"Check your request and try again"}}'
        if fault == "gzip-corrupt":
            return 200, {**js, "Content-Encoding": "gzip"}, b"\x1f\x8b\x08\x00" + b"not really gzip" * 8
        if fault == "redirect-loop":
            return 302, {"Location": h.path, "Content-Type": "text/plain"}, b"moved"
        if fault in ("ok", "empty-end", "array200", "null200", "echo"):
            return None, None, None
        if fault == "ncbi-error200":
            return 200, js, (FIXTURES / "pubmed" / "ratelimit_error.json").read_bytes()
        if fault == "se-throttle":
            return self._over_limit_answer("stackexchange")
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
            return None, None, None  # then answer normally (the client has given up by then)
        if fault == "truncated":
            status, headers, body = self._route(api, rest, query)
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(2)
            return None, "sent", None
        if fault == "se-backoff":
            return None, None, None
        raise ValueError(f"unknown fault {fault!r}")

    def _route(self, api: str, rest: str, q: dict):
        handler = getattr(self, f"_api_{api}", None)
        if handler is None:
            return 404, {"Content-Type": "text/plain"}, b"no such API"
        return handler(rest, q)

    # --- NCBI E-utilities
    def _api_ncbi(self, rest: str, q: dict):
        xml = {"Content-Type": "text/xml; charset=UTF-8"}
        if rest == "esearch.fcgi":
            lo = q.get("mindate", "1800/01/01")
            hi = q.get("maxdate", "3000/12/31")
            lo_d = dt.date(*map(int, lo.split("/")))
            hi_d = dt.date(*map(int, hi.split("/")))
            ids = [p for p, d, _ in self.pubmed if lo_d <= d <= hi_d and "NOMATCH" not in q.get("term", "")]
            retstart, retmax = int(q.get("retstart", 0)), int(q.get("retmax", 20))
            if retstart + retmax > self.pubmed_cap and retmax:
                retmax = max(0, self.pubmed_cap - retstart)
            webenv = ""
            if q.get("usehistory") == "y":
                webenv = f"MCID_fake{len(self.webenvs):04d}"
                self.webenvs[webenv] = ids
            id_xml = "".join(f"<Id>{i}</Id>\n" for i in ids[retstart:retstart + retmax])
            body = (f'<?xml version="1.0" encoding="UTF-8" ?>\n<!DOCTYPE eSearchResult PUBLIC "-//NLM//DTD esearch 20060628//EN" '
                    f'"https://eutils.ncbi.nlm.nih.gov/eutils/dtd/20060628/esearch.dtd">\n<eSearchResult><Count>{len(ids)}</Count>'
                    f'<RetMax>{min(retmax, max(0, len(ids) - retstart))}</RetMax><RetStart>{retstart}</RetStart>'
                    + (f"<QueryKey>1</QueryKey><WebEnv>{webenv}</WebEnv>" if webenv else "")
                    + f"<IdList>\n{id_xml}</IdList><TranslationSet/><QueryTranslation>{q.get('term', '')}</QueryTranslation></eSearchResult>\n")
            return 200, xml, body.encode()
        if rest == "efetch.fcgi":
            if "id" in q:
                wanted = q["id"].split(",")
            else:
                ids = self.webenvs.get(q.get("WebEnv", ""))
                if ids is None:
                    return 200, xml, (b'<?xml version="1.0" ?>\n<eFetchResult>\n\t<ERROR>Unable to obtain query #1</ERROR>\n'
                                      b'</eFetchResult>\n')
                start, count = int(q.get("retstart", 0)), int(q.get("retmax", 20))
                wanted = ids[start:start + count]
            by_id = {p: x for p, _, x in self.pubmed}
            body = ('<?xml version="1.0" ?>\n<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" '
                    '"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n<PubmedArticleSet>\n'
                    + "\n".join(by_id[i] for i in wanted if i in by_id) + "\n</PubmedArticleSet>\n")
            return 200, xml, body.encode()
        return 404, {"Content-Type": "text/plain"}, b"unknown E-utility"

    # --- openFDA
    def _api_openfda(self, rest: str, q: dict):
        js = {"Content-Type": "application/json"}
        pool = {"drug/label.json": self.labels, "drug/event.json": self.events}.get(rest)
        if pool is None or "NOMATCH" in q.get("search", ""):
            return 404, js, (FIXTURES / "openfda" / "404.json").read_bytes()
        limit = int(q.get("limit", 1))
        if limit > 1000:
            return 400, js, b'{"error":{"code":"BAD_REQUEST","message":"Limit cannot exceed 1000 results for search requests. Use the skip or search_after param to get additional results."}}'
        skip = int(q.get("skip", 0))
        if skip > self.openfda_skip_max:
            return 400, js, b'{"error":{"code":"BAD_REQUEST","message":"Skip value must %d or less."}}' % self.openfda_skip_max
        start = int(q["search_after"].split("=", 1)[1]) + 1 if q.get("search_after") else skip
        page = pool[start:start + limit]
        meta = {"disclaimer": "Do not rely on openFDA to make decisions regarding medical care.",
                "terms": "https://open.fda.gov/terms/", "license": "https://open.fda.gov/license/",
                "last_updated": "2026-07-30", "results": {"skip": skip, "limit": limit, "total": len(pool)}}
        headers = dict(js)
        if self.openfda_link and start + limit < len(pool):
            nxt = {k: v for k, v in q.items() if k != "skip"}
            if "skip" in q and not q.get("search_after"):
                nxt["skip"] = str(skip + limit)  # the real API degrades to skip paging when given a skip
            else:
                nxt["skip"] = "0"
                nxt["search_after"] = f"0={start + limit - 1}"
            if "openfda" in self.repeat_cursor and q.get("search_after"):
                nxt = q  # a backend stuck on one page
            headers["Link"] = f'<{self.url("openfda")}/{rest}?{urllib.parse.urlencode(nxt)}>; rel="next"'
        return 200, headers, json.dumps({"meta": meta, "results": page}).encode()

    # --- ClinicalTrials.gov v2
    def _api_clinicaltrials(self, rest: str, q: dict):
        js = {"Content-Type": "application/json"}
        if rest != "studies":
            return 404, js, b'{"message":"not found"}'
        size = int(q.get("pageSize", 10))
        if size > 1000:
            return 400, {"Content-Type": "text/plain"}, b"pageSize must be at most 1000"
        start = int(base64.urlsafe_b64decode(q["pageToken"]).decode()) if q.get("pageToken") else 0
        page = self.studies[start:start + size]
        doc: dict = {"studies": page}
        if start + size < len(self.studies):
            doc["nextPageToken"] = base64.urlsafe_b64encode(str(start + size).encode()).decode()
            if "clinicaltrials" in self.repeat_cursor and q.get("pageToken"):
                doc["nextPageToken"] = q["pageToken"]  # a backend stuck on one page
        if not q.get("pageToken") and q.get("countTotal") == "true":
            doc["totalCount"] = len(self.studies)
        return 200, js, json.dumps(doc).encode()

    # --- DailyMed v2
    def _api_dailymed(self, rest: str, q: dict):
        if rest == "spls.json":
            page, size = int(q.get("page", 1)), int(q.get("pagesize", 100))
            total_pages = max(1, -(-len(self.spl_rows) // size))
            nxt = page + 1 if page < total_pages else "null"
            url = f"{self.url('dailymed')}/spls.json?page=%s&pagesize={size}"
            meta = {**self.spls_listing["metadata"], "total_elements": len(self.spl_rows), "elements_per_page": size,
                    "total_pages": total_pages, "current_page": page, "current_url": url % page, "next_page": nxt,
                    "next_page_url": url % nxt if nxt != "null" else "null",
                    "previous_page": page - 1 if page > 1 else "null",
                    "previous_page_url": url % (page - 1) if page > 1 else "null"}
            data = self.spl_rows[(page - 1) * size: page * size]
            return 200, {"Content-Type": "application/json"}, json.dumps({"data": data, "metadata": meta}).encode()
        m = re.fullmatch(r"spls/([0-9a-f-]+)\.xml", rest)
        if m and m.group(1) in self.setids:
            body = self.spl.replace("00f66f25-3469-4c16-9baf-fba21e9628bd", m.group(1))
            return 200, {"Content-Type": "application/xml"}, body.encode()
        return 404, {"Content-Type": "application/json"}, b'{"message":"not found"}'

    # --- RxNav
    def _api_rxnav(self, rest: str, q: dict):
        js = {"Content-Type": "application/json"}
        if rest == "drugs.json":
            doc = json.loads((SYNTHETIC / "synthetic_rxnav_drugs.json").read_text())
            if q.get("name", "").lower() != doc["drugGroup"]["name"].lower():
                return 200, js, json.dumps({"drugGroup": {"name": q.get("name")}}).encode()
            return 200, js, json.dumps(doc).encode()
        m = re.fullmatch(r"rxcui/(\d+)/allrelated\.json", rest)
        if m:
            doc = json.loads((SYNTHETIC / "synthetic_rxnav_allrelated.json").read_text())
            doc["allRelatedGroup"]["rxcui"] = m.group(1)
            return 200, js, json.dumps(doc).encode()
        return 404, js, b"{}"

    # --- StackExchange
    def _api_stackexchange(self, rest: str, q: dict):
        js = {"Content-Type": "application/json; charset=utf-8"}
        remaining = self.se_quota - len(self.requests("stackexchange"))  # this request is already logged
        if remaining < 0:  # the day's quota is spent: every call is refused until midnight UTC
            return 400, js, json.dumps({"error_id": 502, "error_name": "throttle_violation",
                                        "error_message": "too many requests from this IP, more requests available in 86400 seconds"}).encode()
        quota = {"quota_max": self.se_quota, "quota_remaining": remaining}
        questions = json.loads((SYNTHETIC / "synthetic_stackexchange_questions.json").read_text())
        answers = json.loads((SYNTHETIC / "synthetic_stackexchange_answers.json").read_text())
        if rest == "questions" and self.se_replay:  # recorded wrappers, byte for byte
            return 200, js, self.se_replay[int(q.get("page", 1)) - 1].read_bytes()
        if rest == "questions":
            page, size = int(q.get("page", 1)), int(q.get("pagesize", 30))
            items = questions["items"][(page - 1) * size: page * size]
            return 200, js, json.dumps({"items": items, "has_more": page * size < len(questions["items"]), **quota}).encode()
        m = re.fullmatch(r"questions/([\d;]+)/answers", rest)
        if m:
            ids = {int(i) for i in m.group(1).split(";")}
            items = [a for a in answers["items"] if a["question_id"] in ids]
            return 200, js, json.dumps({"items": items, "has_more": False, **quota}).encode()
        return 400, js, b'{"error_id":404,"error_name":"no_method","error_message":"no method found with this name"}'

    # --- FDA guidance
    def _api_fda(self, rest: str, q: dict):
        if rest == "guidance.json":
            return 200, {"Content-Type": "application/json"}, (FIXTURES / "fda_guidance" / "search-for-guidance-sample.json").read_bytes()
        m = re.fullmatch(r"media/(\d+)/download", rest)
        if m:
            return 200, {"Content-Type": "application/pdf"}, tiny_pdf([
                "Guidance for Industry", "Voluntary Labeling Indicating Whether Foods Have or Have Not Been",
                "Derived from Genetically Engineered Plants", "I. Introduction",
                "This guidance is intended to help food manufacturers who wish to voluntarily label their foods."])
        return 404, {"Content-Type": "text/html"}, HTML_PAGE

    # --- MedlinePlus
    def _api_medlineplus(self, rest: str, q: dict):
        if rest == "xml.html":
            return 200, {"Content-Type": "text/html"}, (
                b'<html><body><a href="https://medlineplus.gov/xml/mplus_topics_2024-01-02.xml">Health topics</a>'
                b'<a href="xml/mplus_topics_2024-03-05.xml">MedlinePlus Health Topic XML</a></body></html>')
        if rest.startswith("xml/mplus_topics_") and rest.endswith(".xml"):
            return 200, {"Content-Type": "application/xml"}, (SYNTHETIC / "synthetic_medlineplus_topics.xml").read_bytes()
        return 404, {"Content-Type": "text/html"}, HTML_PAGE


def tiny_pdf(lines: list[str]) -> bytes:
    """A valid one-page PDF with the given text lines (for the FDA guidance and local-file tests)."""
    text = "BT /F1 11 Tf 72 720 Td 14 TL " + " ".join(
        "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*" for line in lines) + " ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(text) + text.encode("latin-1") + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
