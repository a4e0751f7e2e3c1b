"""Plain text from the markup sources publish: HTML, XML narrative (SPL, PubMed) and Markdown.

One renderer turns start/end/data events into readable plain text, whatever the markup:
paragraphs, headings and table rows on their own lines; lists as "- " / "1. " lines indented
by depth, so sub-items stay under their item; table cells joined by " | "; sub/superscripts
written inline so they keep their meaning (CO2, 10^9/L, p_trend); PubMed's underline
encoding of inequalities (<u>&lt;</u> is ≤) decoded. HTML strings reach it through
html.parser, XML elements through a tree walk, Markdown through markdown-it-py's HTML, so
the same structure gives the same text in every source.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

_SPACE = re.compile(r"\s+")
BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "thead", "tbody", "tfoot", "caption",
         "blockquote", "pre", "section", "article", "header", "footer", "dl", "dt", "dd", "hr", "figure",
         "figcaption", "title"}
SKIP = {"script", "style", "head", "noscript", "template", "svg", "nav", "form", "button", "iframe"}
INLINE_MARKS = {"sub", "sup", "u", "footnote"}  # rendered from their whole content, so captured first
PLAIN_SUP = set("®™©*†‡§¶")  # superscripts that are symbols, not exponents
UNDERLINED = {"<": "≤", ">": "≥"}  # PubMed writes ≤ as <u>&lt;</u>
# XML narrative names (SPL) -> the HTML element they render as
XML_NAMES = {"paragraph": "p", "item": "li", "caption": "caption", "linkHtml": "span", "content": "span"}
XML_SKIP = {"renderMultiMedia", "observationMedia"}
# "1 INDICATIONS AND USAGE", "2.1\tDosage": a number, then a capitalised heading word that is not a unit ("10 MG")
SECTION_NUMBER = re.compile(r"^\s*\d{1,2}(?:\.\d{1,2})*\.?\s+(?=[A-Z])"
                            r"(?!(?i:mg|mcg|ml|g|kg|iu|units?|tablets?|capsules?|hours?|days?|weeks?|years?)\b)")
_ESCAPE = re.compile(r"\\[!-/:-@\[-`{-~]")


class Renderer:
    """Events in, plain text out (see the module docstring for what each structure becomes)."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.fresh = True           # at the start of a line: leading spaces of data are dropped
        self.lists: list[dict[str, Any]] = []
        self.open_items = 0         # <li> nesting: the indentation of items and their continuation lines
        self.captures: list[list[str]] = []
        self.capture_tags: list[str] = []  # the mark each capture belongs to (a stray end tag closes nothing)
        self.skipping = 0
        self.cells = 0
        self.in_cell = 0

    def _newline(self) -> None:
        if not self.fresh:
            self.chunks.append("\n" + "  " * self.open_items)
            self.fresh = True

    def _emit(self, text: str) -> None:
        if self.fresh:
            text = text.lstrip()
        elif text.startswith(" ") and self.chunks and self.chunks[-1].endswith(" "):
            text = text[1:]
        if text:
            self.chunks.append(text)
            self.fresh = False

    def _last_char(self) -> str:
        for chunk in reversed(self.captures[-1] if self.captures else self.chunks):
            if chunk:
                return chunk[-1]
        return ""

    def start(self, tag: str, attrs: dict[str, str | None]) -> None:
        if tag in SKIP or self.skipping:
            self.skipping += tag in SKIP
            return
        if tag in INLINE_MARKS:
            self.captures.append([])
            self.capture_tags.append(tag)
        elif self.captures:
            return  # structure inside a sub/sup/u is read as its text
        elif self.in_cell and (tag in BLOCK or tag in ("br", "li", "ul", "ol")) and tag != "tr":
            self._emit(" ")  # a table row stays on one line
        elif tag == "br":
            self.fresh = False
            self._newline()
        elif tag in ("ul", "ol"):
            self._newline()
            start = str(attrs.get("start") or "1")
            self.lists.append({"ordered": tag == "ol", "n": int(start) - 1 if start.isdigit() else 0})
        elif tag == "li":
            self._newline()
            marker = "- "
            if self.lists and self.lists[-1]["ordered"]:
                self.lists[-1]["n"] += 1
                marker = f"{self.lists[-1]['n']}. "
            self.chunks.append(marker)
            self.open_items += 1
            self.fresh = True
        elif tag in ("td", "th"):
            if self.cells:
                self.chunks.append(" | ")
                self.fresh = True
            self.cells += 1
            self.in_cell += 1
        elif tag in BLOCK:
            self._newline()
            if tag == "tr":
                self.cells = 0

    def end(self, tag: str) -> None:
        if self.skipping:
            self.skipping -= tag in SKIP
            return
        if tag in INLINE_MARKS:
            if tag not in self.capture_tags:
                return  # an end tag whose start never came ("a</sup>b", or a start swallowed by "<![CDATA["): no mark
            while self.capture_tags:  # marks left open inside this one close with it
                if self._close_mark() == tag:
                    break
        elif self.captures:
            return
        elif tag in ("td", "th"):
            self.in_cell = max(0, self.in_cell - 1)
        elif self.in_cell and (tag in BLOCK or tag in ("li", "ul", "ol")) and tag != "tr":
            self._emit(" ")
        elif tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self._newline()
        elif tag == "li":
            self.open_items = max(0, self.open_items - 1)
            self.fresh = False
            self._newline()
        elif tag in BLOCK:
            self._newline()

    def _close_mark(self) -> str:
        tag = self.capture_tags.pop()
        text = _SPACE.sub(" ", "".join(self.captures.pop())).strip()
        text = self._mark(tag, text, self._last_char())
        if self.captures:
            self.captures[-1].append(text)
        elif text:
            self._emit(text)
        return tag

    @staticmethod
    def _mark(tag: str, text: str, before: str) -> str:
        if not text:
            return ""
        if tag == "u":
            return UNDERLINED.get(text, text)
        if tag == "footnote":  # SPL table footnotes, written where they are called
            return f" ({text})"
        if tag == "sup" and (set(text) <= PLAIN_SUP or not before or before.isspace()):
            return text  # ® after a name, or a footnote mark opening a line: no exponent
        if tag == "sub" and text.isdigit() and before.isalpha():
            return text  # a formula: CO2, H2O
        text = f"({text})" if " " in text else text
        return ("^" if tag == "sup" else "_") + text

    def data(self, text: str) -> None:
        if self.skipping or not text:
            return
        text = _SPACE.sub(" ", text)
        if self.captures:
            self.captures[-1].append(text)
        else:
            self._emit(text)

    def text(self) -> str:
        lines = []
        for line in "".join(self.chunks).split("\n"):
            line = re.sub(r"(?<=\S) {2,}", " ", line.rstrip())
            if line.strip() and not re.fullmatch(r"\s*(?:-|\d+\.)", line):
                lines.append(line)
        return "\n".join(lines)


class _HtmlEvents(HTMLParser):
    def __init__(self, renderer: Renderer):
        super().__init__(convert_charrefs=True)
        self.renderer = renderer

    def handle_starttag(self, tag, attrs):
        self.renderer.start(tag, dict(attrs))
        if tag in ("br", "hr", "img"):  # void elements never close
            self.renderer.end(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.renderer.end(tag)

    def handle_endtag(self, tag):
        if tag not in ("br", "hr", "img"):
            self.renderer.end(tag)

    def handle_data(self, data):
        self.renderer.data(data)


def html_to_text(markup: str) -> str:
    """HTML (a fragment or a page) -> plain text."""
    renderer = Renderer()
    parser = _HtmlEvents(renderer)
    parser.feed(markup or "")
    parser.close()
    return renderer.text()


def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""  # comments and PIs have callable tags


def _walk(elem, renderer: Renderer) -> None:
    name = _local(elem.tag)
    if name in XML_SKIP or not name:
        return
    if name == "list":
        name = "ol" if elem.get("listType") == "ordered" else "ul"
    name = XML_NAMES.get(name, name)
    renderer.start(name, dict(elem.attrib))
    renderer.data(elem.text or "")
    for child in elem:
        _walk(child, renderer)
        renderer.data(child.tail or "")
    renderer.end(name)


def xml_to_text(elem) -> str:
    """An XML element's narrative (SPL <text>, PubMed <AbstractText>, ...) -> plain text; "" for None."""
    if elem is None:
        return ""
    renderer = Renderer()
    _walk(elem, renderer)
    return renderer.text()


_MARKDOWN = None


def markdown_to_text(markdown: str) -> str:
    """Markdown (CommonMark plus pipe tables; a line break is kept as one) -> plain text: escapes
    resolved, emphasis reduced to its words, lists kept as lists."""
    global _MARKDOWN
    if not (markdown or "").strip():
        return ""
    if _MARKDOWN is None:
        from markdown_it import MarkdownIt

        _MARKDOWN = MarkdownIt("commonmark", {"breaks": True}).enable("table")
    return html_to_text(_MARKDOWN.render(markdown))


def strip_section_number(text: str) -> str:
    """'1 INDICATIONS AND USAGE ...' / '2.1\tDosage' -> the text without its leading section number."""
    return SECTION_NUMBER.sub("", text, count=1)


def unescape_markdown(text: str) -> str:
    """A short plain field that may carry Markdown backslash escapes ('\\>= 18'): the escapes resolved."""
    return _ESCAPE.sub(lambda m: m.group()[1], text or "")


def one_line(text: str) -> str:
    return _SPACE.sub(" ", text).strip()
