"""openFDA drug labels (`drug/label`) and adverse-event reports (`drug/event`).

Paging follows the `Link: <...>; rel="next"` header (openFDA's search_after cursor, no
25,000 cap); a server that sends no Link is paged with `skip` (at most 25,000, limit at
most 1,000). A 404 NOT_FOUND means "no results", not a failure. Pages land as
`<endpoint>-<n>.json`; the checkpoint holds the page number and the cursor (query
parameters of the next link, the API key stripped), so a killed scrape resumes exactly.

params: endpoint ("drug/label" or "drug/event"), search (openFDA query syntax, "" = all),
sort, limit (100, at most 1000), max_records (1000; 0 = all), plus the HTTP ones.
"""
from __future__ import annotations

import math
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _shape, _text, stored_json

ENDPOINTS = ("drug/label", "drug/event")
SKIP_MAX = 25_000
# label field -> (task suffix, question template); the answer is the field's text
LABEL_QUESTIONS = {
    "indications_and_usage": ("indications", "What is {name} indicated for?"),
    "dosage_and_administration": ("dosage", "How should {name} be taken or given (dosage and administration)?"),
    "contraindications": ("contraindications", "What are the contraindications of {name}?"),
    "boxed_warning": ("boxed_warning", "What does the boxed warning for {name} say?"),
    "warnings_and_cautions": ("warnings", "What are the warnings and precautions for {name}?"),
    "warnings": ("warnings", "What warnings does the label of {name} give?"),
    "adverse_reactions": ("adverse_reactions", "What adverse reactions are reported for {name}?"),
    "drug_interactions": ("interactions", "What drug interactions are listed for {name}?"),
    "do_not_use": ("do_not_use", "When should {name} not be used?"),
    "purpose": ("purpose", "What is the purpose of {name}?"),
}
SERIOUS = {"seriousnessdeath": "death", "seriousnesslifethreatening": "life-threatening",
           "seriousnesshospitalization": "hospitalization", "seriousnessdisabling": "disability",
           "seriousnesscongenitalanomali": "congenital anomaly", "seriousnessother": "other medically important condition"}
AGE_UNITS = {"800": "decade", "801": "year", "802": "month", "803": "week", "804": "day", "805": "hour"}
SEX = {"1": "male", "2": "female"}
ROLE = {"1": "suspect", "2": "concomitant", "3": "interacting"}


def _first(value: Any) -> str:
    """The first text of a field openFDA gives as a list (or, in some answers, as one string)."""
    found = _shape.texts(value)
    return found[0] if found else ""


def _joined(value: Any) -> str:
    return "\n".join(_shape.texts(value))


def _number(value: Any) -> float | None:
    """A number from openFDA's strings ("45", "UNK", "45-50"): finite, or None."""
    try:
        number = float(value.strip() if isinstance(value, str) else _shape.text(value))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class OpenFda(Source):
    kind = "openfda"
    licence = "CC0 1.0 (openFDA; https://open.fda.gov/license/) — not for clinical decisions"
    origin = "https://api.fda.gov/"
    network = True
    api = "openfda"
    PARAMS = {
        "endpoint": Key(str, "drug/label", choices=ENDPOINTS),
        "search": Key(str, ""),        # openFDA query syntax; "" = all
        "sort": Key(str, ""),
        "limit": Key(int, 100, min=1, max=1000),
        "max_records": Key(int, 1000, min=0, expect="0 (all) or more"),
    }

    def fetch(self, store) -> None:
        from stages import http

        endpoint = self.param("endpoint")
        limit = self.param("limit")
        max_records = self.param("max_records")
        query = {"search": self.param("search") or None, "sort": self.param("sort") or None,
                 "limit": limit}
        state = store.checkpoint or {"page": 0, "cursor": None, "skip": 0, "fetched": 0, "done": False}
        prefix = endpoint.replace("/", "-")
        # "all" is meta.results.total (or max_records): a page ending the listing short of it is retried, then fails
        listing = http.Listing(self.name, state, wanted=max_records, got=state["fetched"])

        def read(reply) -> http.Page:
            doc = reply.json()
            results = doc.get("results") or []
            if not isinstance(results, list):
                raise http.Incomplete(f"\"results\" is {type(results).__name__}, not a list")
            total = ((doc.get("meta") or {}).get("results") or {}).get("total")
            link = reply.link("next") if results else None
            nxt = http.strip_secret_params(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(link).query,
                                                                       keep_blank_values=True))) if link else None
            # following links, no next link is the end; without links, skip paging until the total
            more = nxt is not None or (not state["cursor"] and len(results) == limit
                                       and state["skip"] + limit < int(total or 0))
            skip = int(nxt.get("skip") or 0) if nxt else state["skip"] + limit
            if more and nxt and ("search_after" in nxt or skip <= SKIP_MAX):
                return http.Page(len(results), ["cursor", nxt], total)
            if more and not nxt and skip <= SKIP_MAX:
                return http.Page(len(results), ["skip", skip], total)
            return http.Page(len(results), None, total, capped=more)  # capped: a skip past the cap would be refused

        with http.Client(self.name, self.api, self.params) as client:
            while not state["done"] and not (max_records and state["fetched"] >= max_records):
                params = state["cursor"] or {**query, **({"skip": state["skip"]} if state["skip"] else {})}
                reply = client.get(f"{endpoint}.json", params, accept=(200, 404), check=listing.check(read))
                if reply.status == 404:
                    code = (reply.json() if reply.content.startswith(b"{") else {}).get("error", {}).get("code")
                    if code != "NOT_FOUND":
                        raise SourceError(f"{self.name}: openFDA answered 404 ({code or 'no error code'}) for "
                                          f"{endpoint}; check sources.{self.name}.params.endpoint")
                    state["done"] = True  # no (more) matches: an empty result, not a failure
                    store.save_checkpoint(state)
                    break
                page = listing.last
                store.put(f"{prefix}-{state['page']:05d}.json", reply.content)
                state["page"] += 1
                state["fetched"] += page.items
                if page.next is None:
                    state["done"] = True
                    if page.capped:  # say so instead of stopping quietly
                        print(f"{self.name}: warning: openFDA pages with skip only up to {SKIP_MAX:,} and sent no "
                              f"search_after Link; stopped after {state['fetched']:,} of {int(page.total or 0):,} "
                              f"records: narrow sources.{self.name}.params.search (e.g. by date) to reach the rest")
                elif page.next[0] == "cursor":
                    state["cursor"] = page.next[1]
                else:
                    state["skip"] = page.next[1]
                store.save_checkpoint(state)

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        doc = stored_json(page)
        if not isinstance(doc, dict) or not ({"results", "error", "meta"} & doc.keys()):
            raise SourceError(f"{page}: not an openFDA answer (expected an object with \"results\", or an \"error\"); "
                              f"delete it and rerun the scrape")
        results = doc.get("results") or []
        if not isinstance(results, list):
            raise SourceError(f"{page}: openFDA \"results\" is {type(results).__name__}, expected a list; delete it "
                              f"and rerun the scrape")
        for n, result in enumerate(results, 1):
            if not isinstance(result, dict):
                self.skip("a result that is not an object", f"{page} result {n}")
            elif "safetyreportid" in result:
                if _shape.text(result["safetyreportid"]):
                    yield self._event(result)
                else:
                    self.skip("an event without a safetyreportid", f"{page} result {n}")
            elif "set_id" in result or ("id" in result and "openfda" in result):
                if _shape.text(result.get("set_id")) or _shape.text(result.get("id")):
                    yield self._label(result)
                else:
                    self.skip("a label without a set_id or id", f"{page} result {n}")
            # count queries ({"term", "count"}) carry no records

    @staticmethod
    def _label(r: dict) -> dict[str, Any]:
        fda = _shape.obj(r.get("openfda"))
        # each field opens with its heading, numbered on PLR labels ("1 INDICATIONS AND USAGE"): the number goes
        sections = {field: _text.strip_section_number(_joined(r.get(field))) for field in LABEL_QUESTIONS
                    if _joined(r.get(field))}
        set_id = _shape.text(r.get("set_id")) or _shape.text(r.get("id"))
        return {"id": set_id, "type": "label", "set_id": set_id, "version": _shape.text(r.get("version")),
                "effective_time": _shape.text(r.get("effective_time")),
                "origin": f"https://dailymed.nlm.nih.gov/dailymed/lookup.cfm?setid={set_id}",
                "brand_name": _first(fda.get("brand_name")), "generic_name": _first(fda.get("generic_name")),
                "manufacturer": _first(fda.get("manufacturer_name")), "route": _shape.texts(fda.get("route") or []),
                "product_type": _first(fda.get("product_type")), "pharm_class": _shape.texts(fda.get("pharm_class_epc") or []),
                "sections": sections}

    @staticmethod
    def _event(r: dict) -> dict[str, Any]:
        patient = _shape.obj(r.get("patient"))
        drugs = [{"name": _shape.text(d.get("medicinalproduct")), "role": ROLE.get(_shape.text(d.get("drugcharacterization")), ""),
                  "indication": _shape.text(d.get("drugindication"))} for d in _shape.objs(patient.get("drug"))]
        age = _number(patient.get("patientonsetage"))  # free text in some reports ("UNK", "45-50"): then no age
        unit = AGE_UNITS.get(_shape.text(patient.get("patientonsetageunit")), "")
        return {"id": _shape.text(r["safetyreportid"]), "type": "event", "receivedate": _shape.text(r.get("receivedate")),
                "origin": "https://open.fda.gov/apis/drug/event/",
                "serious": _shape.text(r.get("serious")) == "1",
                "criteria": [label for key, label in SERIOUS.items() if _shape.text(r.get(key)) == "1"],
                "age": f"{age:g} {unit}{'s' if age != 1 else ''}" if age is not None and unit else "",
                "sex": SEX.get(_shape.text(patient.get("patientsex")), ""),
                "reactions": _shape.texts([x.get("reactionmeddrapt") for x in _shape.objs(patient.get("reaction"))]),
                "drugs": [d for d in drugs if d["name"]]}

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if record["type"] == "label":
            yield from self._label_examples(record)
        else:
            yield from self._event_examples(record)

    @staticmethod
    def _label_examples(record: dict) -> Iterator[dict[str, Any]]:
        name = record["brand_name"] or record["generic_name"]
        if not name:
            return
        if record["generic_name"] and record["generic_name"].lower() != name.lower():
            name = f"{name} ({record['generic_name'].lower()})"
        seen = set()
        for field, text in record["sections"].items():
            task, question = LABEL_QUESTIONS[field]
            if task in seen:  # warnings_and_cautions and warnings: keep the first present
                continue
            seen.add(task)
            yield {"task": f"openfda_label_{task}", "messages": [
                {"role": "user", "content": question.format(name=name)},
                {"role": "assistant", "content": f"According to the FDA label: {text}"}]}

    @staticmethod
    def _event_examples(record: dict) -> Iterator[dict[str, Any]]:
        if not record["drugs"] or not record["reactions"]:
            return
        who = ", ".join(x for x in (record["age"], record["sex"]) if x) or "patient details not given"
        lines = []
        for d in record["drugs"]:
            role = f" ({d['role']})" if d["role"] else ""
            why = f", for {d['indication'].lower()}" if d["indication"] else ""
            lines.append(f"- {d['name']}{role}{why}")
        drugs = "\n".join(lines)
        report = f"A FAERS adverse event report ({who}).\nDrugs:\n{drugs}"
        yield {"task": "openfda_event_reactions", "messages": [
            {"role": "user", "content": f"{report}\n\nWhich adverse reactions were reported?"},
            {"role": "assistant", "content": "Reported reactions (a report does not establish causation): "
                                             + "; ".join(record["reactions"]) + "."}]}
        if record["serious"]:
            answer = "Yes. It was reported as serious: " + (", ".join(record["criteria"]) or "criteria not specified") + "."
        else:
            answer = "No, it was not reported as serious."
        yield {"task": "openfda_event_seriousness", "messages": [
            {"role": "user", "content": f"{report}\nReactions: {'; '.join(record['reactions'])}\n\n"
                                        f"Was this report classified as serious, and on which criteria?"},
            {"role": "assistant", "content": answer}]}


SOURCE = OpenFda
