"""FDA guidance documents: the static JSON index behind fda.gov's guidance search, then each PDF.

Pages: `index.json` (the listing) and `doc-<media id>.pdf`; PDF text comes from pypdf.
The checkpoint holds the media ids still to download.

params: index_path (the index under base_url), status ("Final", "Draft" or "" for both),
center (substring of the issuing center, e.g. "Drug Evaluation"), max_docs (50; 0 = all),
plus the HTTP ones (base_url defaults to https://www.fda.gov).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _shape, _text, stored_json

INDEX = "index.json"
_MEDIA = re.compile(r'href="/media/(\d+)/download"')


class BadIndex(SourceError, ValueError):
    """An index of another shape: a ValueError, so the HTTP client's check retries it, then one line."""


def strip_html(text: Any) -> str:
    return _text.one_line(_text.html_to_text(_shape.text(text, strip=False)))


def index_rows(doc: Any, strict: bool = False) -> list[dict[str, Any]]:
    """The guidance rows of the index, with the PDF media id when the row links one. An index of another shape
    (not a list of rows, nor an object with a "data" list; `strict`, as fetch asks: a row that is not an object)
    raises BadIndex (fetch retries it, parse reports it); otherwise a row that is not an object, or a field that
    is not text, counts as absent."""
    rows = doc if isinstance(doc, list) else _shape.obj(doc).get("data")
    if not isinstance(rows, list):
        raise BadIndex(f"the guidance index is a JSON {type(doc).__name__} without a list of rows "
                       f"(expected [...] or {{\"data\": [...]}})")
    if strict and not all(isinstance(row, dict) for row in rows):
        raise BadIndex("the guidance index has rows that are not objects")
    out = []
    for row in _shape.objs(rows):
        media = _MEDIA.search(_shape.text(row.get("field_associated_media_2")))
        out.append({"media": media.group(1) if media else None, "title": strip_html(row.get("title")),
                    "issued": _shape.text(row.get("field_issue_datetime")), "office": strip_html(row.get("field_issuing_office_taxonomy")),
                    "center": strip_html(row.get("field_center")), "status": strip_html(row.get("field_final_guidance_1")),
                    "type": strip_html(row.get("field_communication_type")), "docket": strip_html(row.get("field_docket_number")),
                    "topics": strip_html(row.get("topics-product"))})
    return out


def pdf_text(path: Path, shown: str | None = None, fix: str = "delete it and rerun the scrape") -> list[str]:
    """Text of each page of a PDF; an unreadable one is one line naming `shown` (the file as the user knows it)."""
    try:
        import pypdf
    except ImportError:
        raise SourceError("reading PDFs needs pypdf; pip install pypdf") from None
    try:
        reader = pypdf.PdfReader(str(path))
        return [(p.extract_text() or "") for p in reader.pages]
    except Exception as exc:  # pypdf raises many types on damaged files
        raise SourceError(f"{shown or path}: cannot read this PDF ({type(exc).__name__}: {_text.one_line(str(exc))[:200]}); "
                          f"{fix}") from None


class FdaGuidance(Source):
    kind = "fda_guidance"
    licence = "public domain (US FDA guidance documents)"
    origin = "https://www.fda.gov/regulatory-information/search-fda-guidance-documents"
    network = True
    api = "fda"
    PARAMS = {
        "index_path": Key(str, "files/api/datatables/static/search-for-guidance.json", nonblank=True),
        "status": Key(str, "", choices=("", "Final", "Draft")),  # "" = both
        "center": Key(str, ""),        # substring of the issuing center, e.g. "Drug Evaluation"
        "max_docs": Key(int, 50, min=0, expect="0 (all) or more"),
    }

    def fetch(self, store) -> None:
        from stages import http

        status = self.param("status")
        center = self.param("center")
        max_docs = self.param("max_docs")
        state = store.checkpoint
        with http.Client(self.name, self.api, self.params) as client:
            if not state:
                reply = client.get(self.param("index_path"),
                                   check=lambda r: index_rows(r.json(), strict=True))  # rows of another shape: retried, then one line
                store.put(INDEX, reply.content)
                rows = [r for r in index_rows(reply.json()) if r["media"]
                        and (not status or r["status"].lower() == status.lower())
                        and (not center or center.lower() in r["center"].lower())]
                state = {"pending": [r["media"] for r in rows][: max_docs or None]}
                store.save_checkpoint(state)
            while state["pending"]:
                media = state["pending"][0]
                reply = client.get(f"media/{media}/download", expect="pdf")
                store.put(f"doc-{media}.pdf", reply.content)
                state["pending"].pop(0)
                store.save_checkpoint(state)

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        if page.suffix == ".json":
            return  # the index: its rows describe the PDFs
        m = re.fullmatch(r"doc-(\d+)\.pdf", page.name)
        media = m.group(1) if m else page.stem
        meta: dict[str, Any] = {}
        index = page.with_name(INDEX)
        if index.exists():
            doc = stored_json(index)
            try:
                rows = index_rows(doc)
            except SourceError as exc:
                raise SourceError(f"{index}: {exc}; delete it and rerun the scrape") from None
            meta = next((r for r in rows if r["media"] == media), {})
        pages = pdf_text(page)
        text = "\n".join(pages).strip()
        if not text:
            return
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        yield {"id": media, "origin": f"https://www.fda.gov/media/{media}/download",
               "title": meta.get("title") or " ".join(lines[:3]), "issued": meta.get("issued", ""),
               "office": meta.get("office", ""), "status": meta.get("status", ""), "docket": meta.get("docket", ""),
               "type": meta.get("type", ""), "pages": len(pages), "text": text}

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        text = record["text"]
        intro = re.search(r"(?:^|\n)\s*(?:I\.\s*)?INTRODUCTION\s*\n(.+?)(?:\n\s*(?:II\.|BACKGROUND)|\Z)", text, re.I | re.S)
        scope = (intro.group(1) if intro else text)[:2000].strip()
        if scope:
            yield {"task": "fda_guidance_scope", "messages": [
                {"role": "user", "content": f"What is the FDA guidance \"{record['title']}\" about?"},
                {"role": "assistant", "content": re.sub(r"\s*\n\s*", " ", scope)}]}
        facts = [f for f in (f"Issued: {record['issued']}" if record["issued"] else "",
                             f"Issuing office: {record['office']}" if record["office"] else "",
                             f"Status: {record['status']}" if record["status"] else "",
                             f"Docket: {record['docket']}" if record["docket"] else "") if f]
        if len(facts) >= 2:
            yield {"task": "fda_guidance_facts", "messages": [
                {"role": "user", "content": f"When and by which FDA office was \"{record['title']}\" issued, and is it final?"},
                {"role": "assistant", "content": "\n".join(facts)}]}


SOURCE = FdaGuidance
