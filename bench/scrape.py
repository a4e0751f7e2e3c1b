"""Sustained request rate of the shared HTTP client against the local fake API, per API.

Prints one JSON line: for each API a network source uses (PubMed, openFDA, ClinicalTrials.gov,
RxNav, DailyMed, StackExchange, FDA guidance, MedlinePlus), the steady request rate as a fraction of its limit
(target >= 0.95) and the over-limit answers once steady (target 0). Limits are scaled by
--scale so the bench runs in seconds; the server enforces the scaled limit over the
API's window.

    python bench/scrape.py [--seconds 3] [--scale 10]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import http  # noqa: E402
from tests.fakeapi import LIMITS, FakeApi  # noqa: E402

PATHS = {"ncbi": ("esearch.fcgi", {"db": "pubmed", "term": "x", "retmax": 0}, "xml"),
         "openfda": ("drug/label.json", {"limit": 1}, "json"),
         "clinicaltrials": ("studies", {"pageSize": 1}, "json"),
         "rxnav": ("drugs.json", {"name": "lisinopril"}, "json"),
         "dailymed": ("spls.json", {"pagesize": 1}, "json"),
         "stackexchange": ("questions", {"site": "medicalsciences", "pagesize": 1}, "json"),
         "fda": ("guidance.json", {}, "json"),  # fda_guidance: the index, then PDFs, from www.fda.gov
         "medlineplus": ("xml.html", {}, "bytes")}


def bench(api: str, seconds: float, scale: float, ceiling: float) -> dict:
    n, window = LIMITS[api]
    scale = max(1.0, min(scale, ceiling / (n / window)))  # never faster than one sequential client can go
    with FakeApi(records=10, scale=scale) as fake, tempfile.TemporaryDirectory() as locks:
        fake.se_quota = 10**9  # daily quotas are not what this measures
        n, window = fake.limits[api]
        limit = n / window
        path, params, expect = PATHS[api]
        with http.Client("bench", api, {"base_url": fake.url(api), "rate": limit, "backoff": 0.05,
                                                "daily_limit": 10**9}, env={},
                         dotenv="/nonexistent", lock_dir=locks) as client:
            end = time.time() + seconds
            while time.time() < end:
                client.get(path, params, expect=expect)
        log = fake.requests(api)
        times = [r["t"] for r in log]
        steady = [r for r in log if r["t"] >= times[0] + window]  # after the first window
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        return {"scale": round(scale, 3), "limit_per_s": round(limit, 3), "requests": len(log), "rate_per_s": round(rate, 3),
                "fraction_of_limit": round(rate / limit, 3), "over_limit_steady": sum(r["over_limit"] for r in steady),
                "over_limit_total": fake.over_limit(api)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--scale", type=float, default=10.0, help="multiply every documented limit (runs faster)")
    parser.add_argument("--ceiling", type=float, default=40.0,
                        help="scale no API beyond this many requests/s (a sequential client's own speed)")
    parser.add_argument("--apis", default=",".join(PATHS))
    args = parser.parse_args()
    results = {api: bench(api, args.seconds, args.scale, args.ceiling) for api in args.apis.split(",")}
    ok = all(r["fraction_of_limit"] >= 0.95 and r["over_limit_steady"] == 0 for r in results.values())
    print(json.dumps({"bench": "scrape", "max_scale": args.scale, "seconds": args.seconds, "ok": ok, "apis": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
