"""MedlinePlus health topics, from the bulk XML file NLM publishes daily.

The latest file name (`mplus_topics_YYYY-MM-DD.xml`) is read from `xml.html`, then the
file (about 30 MB) is stored as one page and streamed when parsed.

params: language ("English" or "Spanish"), file (a specific mplus_topics_*.xml name,
skipping discovery), plus the HTTP ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _text, _xml

_FILE = re.compile(r"mplus_topics_(\d{4}-\d{2}-\d{2})\.xml")


def summary_text(escaped_html: str) -> str:
    """<full-summary> holds HTML: list items become '- ' lines, tags go, entities decode."""
    return _text.html_to_text(escaped_html)


class MedlinePlus(Source):
    kind = "medlineplus"
    licence = "public domain (NLM-authored MedlinePlus health topic summaries; https://medlineplus.gov/about/using/usingcontent/)"
    origin = "https://medlineplus.gov/xml.html"
    network = True
    api = "medlineplus"
    PARAMS = {
        "language": Key(str, "English", choices=("English", "Spanish")),
        "file": Key(str, "", pattern=r"mplus_topics_\d{4}-\d{2}-\d{2}\.xml", expect="like mplus_topics_YYYY-MM-DD.xml"),
    }

    def fetch(self, store) -> None:
        from stages import http

        state = store.checkpoint or {}
        with http.Client(self.name, self.api, self.params) as client:
            name = state.get("file") or self.param("file")
            if not name:
                listing = client.get("xml.html", expect="bytes").content.decode("utf-8", "replace")
                found = sorted(set(_FILE.findall(listing)))
                if not found:
                    raise SourceError(f"{self.name}: no mplus_topics_*.xml link on {client.url('xml.html')}; set "
                                      f"sources.{self.name}.params.file to the current file name")
                name = f"mplus_topics_{found[-1]}.xml"
                store.save_checkpoint({"file": name})
            if not _FILE.fullmatch(name):
                raise SourceError(f"sources.toml: key 'sources.{self.name}.params.file' must look like "
                                  f"mplus_topics_YYYY-MM-DD.xml (got {name!r}); fix it")
            if not store.has(name):
                store.put(name, client.get(f"xml/{name}", expect="xml").content)
            store.save_checkpoint({"file": name, "done": True})

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        language = self.param("language")
        with open(page, "rb") as fh:
            if b"<health-topics" not in fh.read(4096):
                raise SourceError(f"{page}: not a MedlinePlus health topics file (expected mplus_topics_*.xml with a "
                                  f"<health-topics> root); delete it and rerun the scrape")
        for topic in _xml.iter_elements(page, {"health-topic"}):
            if topic.get("language", "English") != language or not topic.get("id"):
                continue
            yield {"id": topic.get("id"), "origin": topic.get("url", self.origin), "title": topic.get("title", ""),
                   "also_called": [_xml.text(a) for a in _xml.findall(topic, "also-called")],
                   "summary": summary_text(_xml.text(_xml.find(topic, "full-summary"))),
                   "groups": [_xml.text(g) for g in _xml.findall(topic, "group")],
                   "mesh": [_xml.text(_xml.find(m, "descriptor")) for m in _xml.findall(topic, "mesh-heading")],
                   "language": topic.get("language", "")}

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        title = record["title"]
        if record["summary"]:
            yield {"task": "medlineplus_explain", "messages": [
                {"role": "user", "content": f"Explain {title} in plain language for a patient."},
                {"role": "assistant", "content": record["summary"]}]}
        if record["also_called"]:
            yield {"task": "medlineplus_synonyms", "messages": [
                {"role": "user", "content": f"What other names is {title} known by?"},
                {"role": "assistant", "content": ", ".join(record["also_called"])}]}
        if record["groups"]:
            yield {"task": "medlineplus_body_system", "messages": [
                {"role": "user", "content": f"Under which MedlinePlus health topic groups is {title} listed?"},
                {"role": "assistant", "content": ", ".join(record["groups"])}]}


SOURCE = MedlinePlus
