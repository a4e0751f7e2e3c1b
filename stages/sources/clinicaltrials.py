"""ClinicalTrials.gov API v2: `/studies` pages, followed by `nextPageToken`.

`totalCount` comes only on the first page (with countTotal=true); pages land as
`studies-<n>.json` and the checkpoint holds the page number and the next token.
Eligibility criteria are split into inclusion and exclusion lists.

params: cond (query.cond), term (query.term), intr (query.intr), status (filter.overallStatus,
e.g. "COMPLETED"), fields (comma list, "" = all), page_size (100, at most 1000),
max_records (1000; 0 = all), plus the HTTP ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _shape, _text, stored_json

# the headings registries write: "Inclusion Criteria:", "Key Inclusion Criteria:", "INCLUSION CRITERIA",
# "Eligibility criteria:", "Exclusion criteria for parents:" ...
_HEADING = re.compile(r"(?:(?:key|main|major|general|specific|additional|other)\s+)?(inclusion|exclusion|eligibility)"
                      r"(?:\s+criteria)?(?:\s+(?:for|in|of)\b[^:]{0,80}|\s*\([^)]{0,80}\))?\s*:?", re.I)
_ITEM = re.compile(r"\s*(?:-|\d+\.)\s")


def split_eligibility(markdown: str) -> dict[str, list[str]]:
    """The Markdown eligibility field -> {"preamble", "inclusion", "exclusion"}: lists of rendered lines.

    Each part keeps its own heading line as written and its items as "- " / "1. " lines, sub-items
    indented under theirs; text before the first heading is the preamble, never dropped.
    """
    out: dict[str, list[str]] = {"preamble": [], "inclusion": [], "exclusion": []}
    part = "preamble"
    for line in _text.markdown_to_text(markdown).splitlines():
        heading = None if _ITEM.match(line) else _HEADING.fullmatch(line.strip())
        if heading:
            part = "exclusion" if heading.group(1).lower() == "exclusion" else "inclusion"
        out[part].append(line)
    return out


class ClinicalTrials(Source):
    kind = "clinicaltrials"
    licence = "public domain (US NLM ClinicalTrials.gov; https://clinicaltrials.gov/about-site/terms-conditions)"
    origin = "https://clinicaltrials.gov/"
    network = True
    api = "clinicaltrials"
    PARAMS = {
        "cond": Key(str, ""),          # query.cond
        "term": Key(str, ""),          # query.term
        "intr": Key(str, ""),          # query.intr
        "status": Key(str, ""),        # filter.overallStatus, e.g. "COMPLETED"
        "fields": Key(str, ""),        # comma list; "" = all
        "page_size": Key(int, 100, min=1, max=1000),
        "max_records": Key(int, 1000, min=0, expect="0 (all) or more"),
    }

    def fetch(self, store) -> None:
        from stages import http

        size = self.param("page_size")
        max_records = self.param("max_records")
        query = {"format": "json", "pageSize": size, "countTotal": "true",
                 "query.cond": self.param("cond") or None, "query.term": self.param("term") or None,
                 "query.intr": self.param("intr") or None,
                 "filter.overallStatus": self.param("status") or None,
                 "fields": self.param("fields") or None}
        state = store.checkpoint or {"page": 0, "token": None, "fetched": 0, "done": False, "total": None}
        # "all" is the first page's totalCount (or max_records); a repeated nextPageToken stops the scrape
        listing = http.Listing(self.name, state, wanted=max_records, got=state["fetched"])

        def read(reply) -> http.Page:
            doc = reply.json()
            studies = doc.get("studies") or []
            if not isinstance(studies, list):
                raise http.Incomplete(f"\"studies\" is {type(studies).__name__}, not a list")
            return http.Page(len(studies), doc.get("nextPageToken") or None, doc.get("totalCount"))

        with http.Client(self.name, self.api, self.params) as client:
            while not state["done"] and not (max_records and state["fetched"] >= max_records):
                params = {**query, "pageToken": state["token"]} if state["token"] else query
                reply = client.get("studies", params, check=listing.check(read))
                page = listing.last
                store.put(f"studies-{state['page']:05d}.json", reply.content)
                state["page"] += 1
                state["fetched"] += page.items
                state["total"] = listing.state["total"]
                state["token"] = page.next
                state["done"] = not state["token"]
                store.save_checkpoint(state)

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        doc = stored_json(page)
        if not isinstance(doc, dict) or not ("studies" in doc or "protocolSection" in doc):
            raise SourceError(f"{page}: not a ClinicalTrials.gov v2 answer (expected /studies' {{\"studies\": [...]}} "
                              f"or one study's {{\"protocolSection\": ...}}); delete it and rerun the scrape")
        studies = doc.get("studies") if "studies" in doc else [doc]  # a /studies page or one /studies/{nctId}
        if not isinstance(studies, (list, type(None))):
            raise SourceError(f"{page}: ClinicalTrials.gov \"studies\" is {type(studies).__name__}, expected a list; "
                              f"delete it and rerun the scrape")
        plain = _text.unescape_markdown
        for n, study in enumerate(studies or [], 1):
            proto = _shape.obj(_shape.obj(study).get("protocolSection"))
            ident = _shape.obj(proto.get("identificationModule"))
            nct = _shape.text(ident.get("nctId"))
            if not nct:
                self.skip("a study without protocolSection.identificationModule.nctId", f"{page} study {n}")
                continue
            elig = _shape.obj(proto.get("eligibilityModule"))
            design = _shape.obj(proto.get("designModule"))
            arms = _shape.obj(proto.get("armsInterventionsModule"))
            outcomes = _shape.obj(proto.get("outcomesModule"))
            enrollment = _shape.obj(design.get("enrollmentInfo")).get("count")
            yield {
                "id": nct, "nct_id": nct, "origin": f"https://clinicaltrials.gov/study/{nct}",
                "title": plain(_shape.text(ident.get("briefTitle"), strip=False) or _shape.text(ident.get("officialTitle"), strip=False)),
                # v2 text fields are Markdown: rendered, so no escape or emphasis mark reaches the examples
                "summary": _text.markdown_to_text(_shape.text(_shape.obj(proto.get("descriptionModule")).get("briefSummary"), strip=False)),
                "conditions": [plain(c) for c in _shape.texts(_shape.obj(proto.get("conditionsModule")).get("conditions"))],
                "status": _shape.text(_shape.obj(proto.get("statusModule")).get("overallStatus")),
                "study_type": _shape.text(design.get("studyType")), "phases": _shape.texts(design.get("phases")),
                "enrollment": enrollment if _shape.number(enrollment, None) is not None else None,
                "interventions": [plain(t) for t in (_shape.text(i.get("name")) for i in _shape.objs(arms.get("interventions"))) if t],
                "primary_outcomes": [plain(t) for t in (_shape.text(o.get("measure"))
                                                        for o in _shape.objs(outcomes.get("primaryOutcomes"))) if t],
                "sponsor": _shape.text(_shape.obj(_shape.obj(proto.get("sponsorCollaboratorsModule")).get("leadSponsor")).get("name")),
                "sex": _shape.text(elig.get("sex")), "minimum_age": _shape.text(elig.get("minimumAge")),
                "maximum_age": _shape.text(elig.get("maximumAge")),
                "criteria": split_eligibility(_shape.text(elig.get("eligibilityCriteria"), strip=False)),
            }

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        title = record["title"]
        if record["summary"]:
            yield {"task": "clinicaltrials_summary", "messages": [
                {"role": "user", "content": f"Summarise the clinical trial \"{title}\" ({record['nct_id']})."},
                {"role": "assistant", "content": record["summary"]}]}
        criteria = record["criteria"]
        lines = criteria["preamble"] + criteria["inclusion"] + criteria["exclusion"]
        if lines:
            ages = " to ".join(a for a in (record["minimum_age"], record["maximum_age"]) if a)
            answer = ["\n".join(lines)]
            if ages:
                answer.append(f"Age: {ages}.")
            yield {"task": "clinicaltrials_eligibility", "messages": [
                {"role": "user", "content": f"Who can take part in the trial \"{title}\"? List the inclusion and "
                                            f"exclusion criteria."},
                {"role": "assistant", "content": "\n\n".join(answer)}]}
        if record["conditions"] and (record["interventions"] or record["phases"]):
            facts = [f"Conditions: {', '.join(record['conditions'])}"]
            if record["interventions"]:
                facts.append(f"Interventions: {', '.join(record['interventions'])}")
            if record["phases"]:
                facts.append(f"Phase: {', '.join(p.replace('PHASE', 'Phase ').replace('EARLY_', 'Early ') for p in record['phases'])}")
            if record["study_type"]:
                facts.append(f"Study type: {record['study_type'].lower()}")
            if record["enrollment"]:
                facts.append(f"Enrollment: {record['enrollment']}")
            yield {"task": "clinicaltrials_design", "messages": [
                {"role": "user", "content": f"What condition does the trial \"{title}\" study, which interventions "
                                            f"does it compare, and what is its design?"},
                {"role": "assistant", "content": "\n".join(facts)}]}


SOURCE = ClinicalTrials
