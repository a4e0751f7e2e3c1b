"""Safe, streaming XML for every XML source (PubMed, DailyMed SPL, MedlinePlus, DrugBank).

Standard-library expat with the defusedxml rules: a document that declares entities
(billion laughs, quadratic blowup) or references external ones (XXE) is rejected, and no
DTD is ever fetched. A DOCTYPE that only names a public DTD (as PubMed's does) is fine.
`iter_elements` streams: each matching element is handed over whole, then cleared, so a
GB-sized file parses in constant memory.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
import xml.parsers.expat
from pathlib import Path
from typing import IO, Iterator

from stages.sources import SourceError


class UnsafeXml(SourceError):
    pass


MAX_DEPTH = 500  # elements nested deeper than this are refused: real answers nest < 40, and the text
                 # renderer walks a tree recursively (a hostile 5,000-deep page would overflow the stack)


class _Stream:
    """expat -> ElementTree elements, building only the subtrees asked for."""

    def __init__(self, where: str, tags: set[str] | None):
        self.where, self.tags = where, tags  # tags None: build the whole document
        self.builder = ET.TreeBuilder()
        self.depth = 0
        self.level = 0  # nesting of the document, built or not
        self.ready: list[ET.Element] = []
        self.root: ET.Element | None = None
        p = xml.parsers.expat.ParserCreate(namespace_separator="}")
        p.buffer_text = True
        p.StartElementHandler = self.start
        p.EndElementHandler = self.end
        p.CharacterDataHandler = self.data
        p.EntityDeclHandler = self.entity_decl
        p.UnparsedEntityDeclHandler = lambda name, *rest: self.entity_decl(name)
        p.ExternalEntityRefHandler = self.external_ref
        p.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
        self.parser = p

    @staticmethod
    def _name(name: str) -> str:
        return "{" + name if "}" in name else name

    def start(self, name, attrs):
        self.level += 1
        if self.level > MAX_DEPTH:
            raise UnsafeXml(f"{self.where}: XML nested deeper than {MAX_DEPTH} elements (refused: no real answer "
                            f"nests so deep); re-download it")
        tag = self._name(name)
        if self.depth or self.tags is None or local(tag) in self.tags:
            self.depth += 1
            elem = self.builder.start(tag, {self._name(k): v for k, v in attrs.items()})
            if self.root is None:
                self.root = elem

    def end(self, name):
        self.level -= 1
        if self.depth:
            self.depth -= 1
            elem = self.builder.end(self._name(name))
            if self.depth == 0 and self.tags is not None:
                self.ready.append(elem)
                self.builder = ET.TreeBuilder()  # forget it once handed over: constant memory

    def data(self, text):
        if self.depth:
            self.builder.data(text)

    def entity_decl(self, name, *rest):
        raise UnsafeXml(f"{self.where}: XML declares entity '{name}' (entity expansion and external entities are "
                        f"refused); use the file exactly as published")

    def external_ref(self, context, base, system_id, public_id):
        raise UnsafeXml(f"{self.where}: XML references an external entity ({system_id}); refused")

    def feed(self, data: bytes, final: bool = False) -> list[ET.Element]:
        try:
            self.parser.Parse(data, final)
        except xml.parsers.expat.ExpatError as exc:
            what = "truncated" if "no element found" in str(exc) or "unclosed token" in str(exc) else "not well-formed"
            raise SourceError(f"{self.where}: {what} XML ({exc}); re-download it") from None
        out, self.ready = self.ready, []
        return out


def local(tag: str) -> str:
    """The tag without its {namespace}."""
    return tag.rsplit("}", 1)[-1]


def iter_elements(source: str | Path | bytes | IO[bytes], tags: set[str], where: str | None = None,
                  chunk: int = 1 << 16) -> Iterator[ET.Element]:
    """Yield each complete element whose local name is in `tags` (outermost match only); constant memory."""
    where = where or (str(source) if isinstance(source, (str, Path)) else "XML")
    stream = _Stream(where, tags)
    fh = open(source, "rb") if isinstance(source, (str, Path)) else source
    try:
        if isinstance(source, bytes):
            yield from stream.feed(source, True)
            return
        while data := fh.read(chunk):
            yield from stream.feed(data)
        yield from stream.feed(b"", True)
    finally:
        stream.parser = None  # parser <-> handlers is a cycle: break it, or each page's buffers wait for the GC
        if fh is not source:
            fh.close()


def parse(source: str | Path | bytes, where: str | None = None) -> ET.Element:
    """A whole (small) document, under the same safety rules."""
    where = where or (str(source) if isinstance(source, (str, Path)) else "XML")
    stream = _Stream(where, None)
    stream.feed(Path(source).read_bytes() if isinstance(source, (str, Path)) else source, True)
    if stream.root is None:
        raise SourceError(f"{where}: empty XML document; re-download it")
    return stream.root


_SPACE = re.compile(r"\s+")


def text(elem: ET.Element | None) -> str:
    """All text inside an element (inline markup such as <i> or <sup> kept as its text), whitespace collapsed."""
    if elem is None:
        return ""
    return _SPACE.sub(" ", "".join(elem.itertext())).strip()


def find(elem: ET.Element, *path: str) -> ET.Element | None:
    """Namespace-blind child lookup by local names."""
    for name in path:
        if elem is None:
            return None
        elem = next((c for c in elem if local(c.tag) == name), None)
    return elem


def findall(elem: ET.Element | None, name: str) -> list[ET.Element]:
    return [] if elem is None else [c for c in elem if local(c.tag) == name]
