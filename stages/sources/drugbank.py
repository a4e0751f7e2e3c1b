"""DrugBank: the user's own download of `full_database.xml` (GB-sized), streamed.

DrugBank cannot be fetched anonymously: download it under your DrugBank licence and set
`path`. The file is streamed with constant memory through the safe XML parser (entity
declarations, so XXE and billion laughs, are refused) and re-written as raw pages of
`chunk` drugs each (`drugs-<n>.xml`), which is also what a mirror copies.

params: path (the XML file), chunk (500), max_drugs (0 = all).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _text, _xml

NS = "http://www.drugbank.ca"
FIELDS = ("description", "indication", "pharmacodynamics", "mechanism-of-action", "toxicity", "metabolism",
          "absorption", "half-life", "route-of-elimination")
QUESTIONS = {
    "indication": ("indication", "What is {name} indicated for?"),
    "mechanism-of-action": ("mechanism", "What is the mechanism of action of {name}?"),
    "pharmacodynamics": ("pharmacodynamics", "Describe the pharmacodynamics of {name}."),
    "half-life": ("half_life", "What is the half-life of {name}?"),
    "toxicity": ("toxicity", "What is known about the toxicity and overdose of {name}?"),
    "metabolism": ("metabolism", "How is {name} metabolized?"),
}

# DrugBank cites its references inline: [L41539], [A246624, A246629], [FDA Label], [T28]
_CITATION = r"(?:[A-Z]{1,2}\d+|FDA Label|Label|Wikipedia|MSDS)"
REFERENCE = re.compile(rf"[ \t]*\[{_CITATION}(?:\s*,\s*{_CITATION})*\]")


def field_text(elem) -> str:
    """A DrugBank text field: Markdown (lists, _italic_, **bold**) -> plain text, reference markers removed."""
    raw = "".join(elem.itertext()) if elem is not None else ""
    return _text.markdown_to_text(REFERENCE.sub("", raw.replace("\r\n", "\n").replace("\r", "\n")))


class DrugBank(Source):
    kind = "drugbank"
    licence = "DrugBank licence of the user's download (academic: CC BY-NC 4.0); derived adapters inherit its terms"
    origin = "https://go.drugbank.com/releases/latest"
    PARAMS = {
        "path": Key(str, ""),          # the user's full_database.xml
        "chunk": Key(int, 500, min=1),
        "max_drugs": Key(int, 0, min=0, expect="0 (all) or more"),
    }

    def check(self, root: Path) -> list[tuple[str, str]]:
        raw = self.param("path")
        if not raw:
            return [("path", "is missing; download full_database.xml from go.drugbank.com (licence required) and "
                             "set path to it, or set enabled = false")]
        if not (root / Path(raw).expanduser()).is_file():
            return [("path", f"names {raw}, which does not exist; download full_database.xml from go.drugbank.com "
                             f"and point path at it, or set enabled = false")]
        return []

    def _path(self) -> Path:
        raw = self.param("path")
        if not raw:
            raise SourceError(f"sources.toml: key 'sources.{self.name}.params.path' is missing; download "
                              f"full_database.xml from go.drugbank.com (licence required) and set path to it")
        path = Path(raw).expanduser()
        if not path.exists():
            raise SourceError(f"sources.{self.name}.params.path: {path} not found; download full_database.xml "
                              f"from go.drugbank.com and point path at it")
        return path

    def inputs(self) -> list[Path]:
        raw = self.params.get("path")
        path = Path(raw).expanduser() if isinstance(raw, str) and raw else None
        return [path] if path and path.is_file() else []

    def fetch(self, store) -> None:
        chunk = max(1, self.param("chunk"))
        max_drugs = self.param("max_drugs")
        batch: list[bytes] = []
        count = page = 0

        def flush() -> None:
            nonlocal page, batch
            store.put(f"drugs-{page:05d}.xml", b'<?xml version="1.0" encoding="UTF-8"?>\n<drugbank xmlns:db="%s">\n'
                      % NS.encode() + b"\n".join(batch) + b"\n</drugbank>\n")
            page, batch = page + 1, []

        for drug in _xml.iter_elements(self._path(), {"drug"}):
            batch.append(ET.tostring(drug, encoding="utf-8", xml_declaration=False))
            count += 1
            if len(batch) >= chunk:
                flush()
            if max_drugs and count >= max_drugs:
                break
        if batch or page == 0:
            flush()

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        with open(page, "rb") as fh:
            if b"<drugbank" not in fh.read(4096):
                raise SourceError(f"{page}: not DrugBank XML (expected full_database.xml's <drugbank> root holding <drug> "
                                  f"records); check sources.{self.name}.params.path")
        for n, drug in enumerate(_xml.iter_elements(page, {"drug"}), 1):
            ids = _xml.findall(drug, "drugbank-id")
            primary = next((i for i in ids if i.get("primary") == "true"), ids[0] if ids else None)
            dbid = _xml.text(primary)
            name = _xml.text(_xml.find(drug, "name"))
            if not dbid or not name:
                self.skip("a <drug> without drugbank-id or name", f"{page} drug {n}")
                continue
            interactions = []
            for inter in _xml.findall(_xml.find(drug, "drug-interactions"), "drug-interaction"):
                interactions.append({"id": _xml.text(_xml.find(inter, "drugbank-id")), "name": _xml.text(_xml.find(inter, "name")),
                                     "description": _text.one_line(field_text(_xml.find(inter, "description")))})
            yield {"id": dbid, "origin": f"https://go.drugbank.com/drugs/{dbid}", "name": name,
                   "type": drug.get("type", ""),
                   "groups": [_xml.text(g) for g in _xml.findall(_xml.find(drug, "groups"), "group")],
                   "categories": [_xml.text(_xml.find(c, "category")) for c in _xml.findall(_xml.find(drug, "categories"), "category")],
                   **{f.replace("-", "_"): field_text(_xml.find(drug, f)) for f in FIELDS},
                   "interactions": interactions}

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        name = record["name"]
        for field, (task, question) in QUESTIONS.items():
            text = record[field.replace("-", "_")]
            if text:
                yield {"task": f"drugbank_{task}", "messages": [
                    {"role": "user", "content": question.format(name=name)},
                    {"role": "assistant", "content": text}]}
        if record["interactions"]:
            listed = record["interactions"][:15]
            yield {"task": "drugbank_interactions", "messages": [
                {"role": "user", "content": f"Name some drugs that interact with {name} and the effect of each."},
                {"role": "assistant", "content": "\n".join(f"- {i['name']}: {i['description']}" for i in listed)}]}


SOURCE = DrugBank
