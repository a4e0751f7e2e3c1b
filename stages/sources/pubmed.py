"""PubMed through NCBI E-utilities: esearch (usehistory=y) -> efetch XML in batches of 200.

PubMed's esearch can only hand out the first 10,000 ids of a query, so a date range
with more hits is halved until every piece fits. Pages land as
`efetch-<from>-<to>-<offset>.xml`; the checkpoint holds the pending date ranges and the
current range's WebEnv, query_key and id list, so a killed scrape resumes at the next
batch (and falls back to POSTing the stored ids when the WebEnv has expired).

params: term (the PubMed query), mindate / maxdate ("YYYY/MM/DD"), datetype ("pdat"),
batch (200), max_records (0 = all), query_cap (10000), plus the HTTP ones (base_url, rate, ...).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _text, _xml


def _date(text: str, key: str, source: str) -> dt.date:
    try:
        return dt.datetime.strptime(text, "%Y/%m/%d").date()
    except ValueError:
        raise SourceError(f"sources.toml: key 'sources.{source}.params.{key}' must be a date \"YYYY/MM/DD\" "
                          f"(got {text!r}); fix it") from None


def _fmt(day: dt.date) -> str:
    return day.strftime("%Y/%m/%d")


def parse_esearch(content: bytes) -> dict[str, Any]:
    """count, ids, webenv, query_key and errors from an esearch answer (XML, or JSON with retmode=json)."""
    if content.lstrip().startswith(b"{"):
        import orjson
        result = orjson.loads(content).get("esearchresult", {})
        return {"count": int(result.get("count", 0)), "ids": list(result.get("idlist", [])),
                "webenv": result.get("webenv"), "query_key": result.get("querykey"),
                "errors": list((result.get("errorlist") or {}).get("phrasesnotfound", []))}
    root = _xml.parse(content, "esearch answer")
    errors = [_xml.text(e) for e in _xml.findall(_xml.find(root, "ErrorList"), "PhraseNotFound")]
    if _xml.local(root.tag) == "eSearchResult" and _xml.find(root, "ERROR") is not None:
        errors.append(_xml.text(_xml.find(root, "ERROR")))
    return {"count": int(_xml.text(_xml.find(root, "Count")) or 0),
            "ids": [_xml.text(i) for i in _xml.findall(_xml.find(root, "IdList"), "Id")],
            "webenv": _xml.text(_xml.find(root, "WebEnv")) or None,
            "query_key": _xml.text(_xml.find(root, "QueryKey")) or None, "errors": errors}


def _json_kind(page: Path) -> str:
    """What a JSON file from E-utilities is, for the error that says it is not an EFetch page."""
    import orjson

    try:
        doc = orjson.loads(page.read_bytes())
    except orjson.JSONDecodeError:
        return "not valid JSON"
    if isinstance(doc, dict) and "esearchresult" in doc:
        return "an ESearch result: PMIDs only"
    if isinstance(doc, dict) and doc.get("error"):
        return f"an NCBI error: {_text.one_line(str(doc['error']))[:80]}"  # the error line is the API's: one line
    return "not an E-utilities answer"


class PubMed(Source):
    kind = "pubmed"
    licence = "NLM terms: citations free to reuse; abstracts may be copyrighted by their publishers"
    origin = "https://pubmed.ncbi.nlm.nih.gov/"
    network = True
    api = "ncbi"
    PARAMS = {
        "term": Key(str, ""),          # the PubMed query (an enabled live source needs one: check())
        "mindate": Key(str, "2024/01/01", pattern=r"\d{4}/\d{2}/\d{2}", expect='a date "YYYY/MM/DD"'),
        "maxdate": Key(str, "2024/12/31", pattern=r"\d{4}/\d{2}/\d{2}", expect='a date "YYYY/MM/DD"'),
        "datetype": Key(str, "pdat", choices=("pdat", "edat", "mdat")),
        "batch": Key(int, 200, min=1, max=10_000),
        "max_records": Key(int, 0, min=0, expect="0 (all) or more"),
        "query_cap": Key(int, 10_000, min=1, max=10_000),  # esearch hands out at most 10,000 ids per query
    }

    def check(self, root: Path) -> list[tuple[str, str]]:
        if not self.param("term").strip():
            return [("term", "is empty; give a PubMed query, e.g. \"hypertension[majr] AND english[la]\"")]
        try:
            lo, hi = (dt.datetime.strptime(self.param(k), "%Y/%m/%d").date() for k in ("mindate", "maxdate"))
        except ValueError as exc:
            return [("mindate", f"or maxdate is not a calendar date ({exc}); fix it")]
        if lo > hi:
            return [("maxdate", f"({self.param('maxdate')}) is before mindate ({self.param('mindate')}); swap them")]
        return []

    # --- fetch
    def fetch(self, store) -> None:
        from stages import http

        term = self.param("term")
        if not term.strip():
            raise SourceError(f"sources.toml: key 'sources.{self.name}.params.term' is empty; give a PubMed query, "
                              f"e.g. \"hypertension[majr] AND english[la]\"")
        lo = _date(self.param("mindate"), "mindate", self.name)
        hi = _date(self.param("maxdate"), "maxdate", self.name)
        datetype = self.param("datetype")
        batch = min(self.param("batch"), 10_000)
        cap = self.param("query_cap")
        max_records = self.param("max_records")
        state = store.checkpoint or {"ranges": [[_fmt(lo), _fmt(hi)]], "current": None, "fetched": 0}
        base = {"db": "pubmed", "term": term, "datetype": datetype}

        with http.Client(self.name, self.api, self.params) as client:
            while not (max_records and state["fetched"] >= max_records):
                cur = state["current"]
                if cur is None:
                    if not state["ranges"]:
                        break
                    start, end = state["ranges"][0]
                    window = {**base, "mindate": start, "maxdate": end}
                    count = parse_esearch(client.get("esearch.fcgi", {**window, "retmax": 0}, expect="xml").content)["count"]
                    first, last = _date(start, "mindate", self.name), _date(end, "maxdate", self.name)
                    if count > cap and first < last:  # over the 10,000 cap: halve the date range
                        mid = first + (last - first) // 2
                        state["ranges"][0:1] = [[start, _fmt(mid)], [_fmt(mid + dt.timedelta(days=1)), end]]
                        store.save_checkpoint(state)
                        continue
                    state["ranges"].pop(0)
                    if count > cap:  # one day alone is over the cap: esearch cannot list the rest
                        print(f"{self.name}: warning: {start} alone has {count:,} hits, over esearch's {cap:,} cap; only "
                              f"{cap:,} are fetched: narrow sources.{self.name}.params.term to reach the rest")
                    if count:  # the id list must hold all `count` ids (up to the cap) it just announced
                        wanted = http.Listing(self.name, {}).check(
                            lambda r: http.Page(len(parse_esearch(r.content)["ids"]), None, min(count, cap)))
                        found = parse_esearch(client.get("esearch.fcgi", {**window, "usehistory": "y", "retmax": min(count, cap)},
                                                         expect="xml", check=wanted).content)
                        state["current"] = {"range": [start, end], "webenv": found["webenv"],
                                            "query_key": found["query_key"], "ids": found["ids"], "next": 0}
                    store.save_checkpoint(state)
                    continue
                offset = cur["next"]
                ids = cur["ids"][offset:offset + batch]
                name = f"efetch-{cur['range'][0].replace('/', '')}-{cur['range'][1].replace('/', '')}-{offset:05d}.xml"
                content = self._efetch(client, cur, offset, ids)
                store.put(name, content)
                cur["next"] = offset + batch
                state["fetched"] += len(ids)
                if cur["next"] >= len(cur["ids"]):
                    state["current"] = None
                store.save_checkpoint(state)

    def _efetch(self, client, cur: dict, offset: int, ids: list[str]) -> bytes:
        common = {"db": "pubmed", "retmode": "xml", "rettype": "abstract"}
        if cur.get("webenv"):
            reply = client.get("efetch.fcgi", {**common, "WebEnv": cur["webenv"], "query_key": cur["query_key"],
                                               "retstart": offset, "retmax": len(ids)}, expect="xml", accept=(200, 400),
                               api_errors=False)  # an expired WebEnv answers <ERROR> in a 200: handled below
            if reply.status == 200 and b"<PubmedArticleSet" in reply.content[:2048]:
                return reply.content
            cur["webenv"] = None  # the history session expired: use the stored ids from now on
        return client.post("efetch.fcgi", {**common, "id": ",".join(ids)}, expect="xml").content

    # --- parse
    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        with open(page, "rb") as fh:
            head = fh.read(2048).lstrip()
        if head.startswith((b"{", b"[")):
            raise SourceError(f"{page}: a JSON answer ({_json_kind(page)}), not EFetch XML; PubMed records come from "
                              f"efetch pages (<PubmedArticleSet>): parse an efetch-*.xml page")
        if b"<eSearchResult" in head or b"<eSummaryResult" in head:
            raise SourceError(f"{page}: an ESearch/ESummary answer (PMIDs only), not EFetch XML; parse an efetch-*.xml "
                              f"page (<PubmedArticleSet>)")
        articles = 0
        for art in _xml.iter_elements(page, {"PubmedArticle"}):
            articles += 1
            citation = _xml.find(art, "MedlineCitation")
            article = _xml.find(citation, "Article")
            pmid = _xml.text(_xml.find(citation, "PMID"))
            if not pmid or article is None:
                continue
            sections = []
            for node in _xml.findall(_xml.find(article, "Abstract"), "AbstractText"):
                body = _text.xml_to_text(node)  # ≤ from <u>&lt;</u>, p_trend, CO2: meaning kept
                if body:
                    sections.append({"label": node.get("Label", ""), "category": node.get("NlmCategory", ""), "text": body})
            issue = _xml.find(article, "Journal", "JournalIssue", "PubDate")
            year = _xml.text(_xml.find(issue, "Year")) or _xml.text(_xml.find(issue, "MedlineDate"))[:4] if issue is not None else ""
            mesh = []
            for heading in _xml.findall(_xml.find(citation, "MeshHeadingList"), "MeshHeading"):
                desc = _xml.find(heading, "DescriptorName")
                if desc is not None:
                    mesh.append({"term": _xml.text(desc), "major": desc.get("MajorTopicYN") == "Y",
                                 "qualifiers": [_xml.text(q) for q in _xml.findall(heading, "QualifierName")]})
            yield {
                "id": pmid, "pmid": pmid, "origin": f"https://pubmed.ncbi.nlm.nih.gov/{pmid}/",
                "title": _text.one_line(_text.xml_to_text(_xml.find(article, "ArticleTitle"))),
                "abstract": sections,
                "journal": _xml.text(_xml.find(article, "Journal", "Title")),
                "year": year,
                "mesh": mesh,
                "publication_types": [_xml.text(p) for p in _xml.findall(_xml.find(article, "PublicationTypeList"), "PublicationType")],
                "language": _xml.text(_xml.find(article, "Language")),
            }
        if not articles and b"<PubmedArticleSet" not in head and b"<PubmedBookArticle" not in head:
            raise SourceError(f"{page}: no <PubmedArticleSet> in it (not an EFetch answer of db=pubmed, retmode=xml); "
                              f"delete it and rerun the scrape")

    # --- examples
    @staticmethod
    def abstract_text(sections: list[dict], skip: set[str] = frozenset()) -> str:
        parts = []
        for s in sections:
            if (s["category"] or s["label"]).upper() in skip:
                continue
            parts.append(f"{s['label']}: {s['text']}" if s["label"] else s["text"])
        return "\n".join(parts)

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        sections = record["abstract"]
        if not sections:
            return
        abstract = self.abstract_text(sections)
        cite = f"{record['journal']}, {record['year']}" if record["journal"] else record["year"]
        if record["title"]:
            yield {"task": "pubmed_title", "messages": [
                {"role": "user", "content": f"Write a title for this PubMed abstract.\n\n{abstract}"},
                {"role": "assistant", "content": record["title"]}]}
        if record["mesh"]:
            terms = "\n".join(f"- {m['term']}{' (major topic)' if m['major'] else ''}"
                              + (f" / {', '.join(m['qualifiers'])}" if m["qualifiers"] else "") for m in record["mesh"])
            yield {"task": "pubmed_mesh", "messages": [
                {"role": "user", "content": f"Which MeSH headings index this article?\n\nTitle: {record['title']}\n\n{abstract}"},
                {"role": "assistant", "content": terms}]}
        conclusion = [s for s in sections if (s["category"] or s["label"]).upper() in ("CONCLUSIONS", "CONCLUSION")]
        rest = self.abstract_text(sections, skip={"CONCLUSIONS", "CONCLUSION"})
        if conclusion and rest:
            yield {"task": "pubmed_conclusion", "messages": [
                {"role": "user", "content": f"From the study below ({cite}), state what the authors conclude.\n\n{rest}"},
                {"role": "assistant", "content": " ".join(s["text"] for s in conclusion)}]}


SOURCE = PubMed
