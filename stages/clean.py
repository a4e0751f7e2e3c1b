"""Cleaning: the first step of `dedup`, so every dropped example is counted by reason in one report.

Per message: Unicode NFKC, invisible characters removed, HTML/markup reduced to its text,
boilerplate lines (copyright notices, "protected by copyright", navigation text) removed,
whitespace tidied, and for community sources (`clean.scrub_contacts`, by source kind)
e-mail addresses and phone numbers masked. Then the example is dropped, with a reason, when
a user or assistant turn is empty (`empty`), an answer repeats its question (`echo`), or its
length in tokens falls outside [clean.min_tokens, clean.max_tokens] (`too_short`, `too_long`).

Tokens are counted with the base model's tokenizer when it has been built
(`<base_dir>/tokenizer.json`, loaded with the `tokenizers` library alone, no transformers);
before that, with a word-based estimate (4 tokens per 3 words plus one per punctuation mark,
what SmolLM2's BPE gives on English prose). Which counter ran is written to the reports.
Tokenizer counts are cached per text (data/cache/), so split:<adapter> reuses dedup's.
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterable

CLEAN_VERSION = 1  # bump when a transform changes: dedup's per-source caches are then recomputed

REASONS = ("invalid", "empty", "echo", "too_short", "too_long")
INVISIBLE_RE = re.compile(r"[\u200b-\u200f\u2028\u2029\u2060-\u2064\ufeff\u00ad]|[\x00-\x08\x0b-\x1f\x7f]")
_TAGS = ("a|abbr|b|blockquote|body|br|caption|center|code|dd|div|dl|dt|em|figcaption|figure|font|footer|form|"
         "h[1-6]|head|header|hr|html|i|iframe|img|li|link|meta|nav|noscript|ol|p|pre|script|section|small|span|"
         "strong|style|sub|sup|table|tbody|td|tfoot|th|thead|title|tr|u|ul")
# a known tag with attributes that have values (so "if a<b and c>d" is not taken for markup), or an entity
MARKUP_RE = re.compile(rf"<(?:/?(?:{_TAGS})(?:\s+[\w:-]+\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s>]+))*\s*/?|!--.*?--)>"
                       r"|&(?:[a-zA-Z]{2,8}|#\d{2,6}|#x[0-9a-fA-F]{2,5});", re.S | re.I)
BLOCK_TAGS = {"p", "div", "br", "li", "tr", "ul", "ol", "table", "section", "article", "blockquote", "pre", "h1",
              "h2", "h3", "h4", "h5", "h6", "dd", "dt", "hr", "header", "footer", "caption", "figure"}
SKIP_TAGS = {"script", "style", "noscript", "nav", "template", "head", "svg", "button", "form", "iframe"}
# whole lines that carry no content: notices and site chrome (kept short, so a sentence that merely mentions
# copyright in a longer paragraph stays)
BOILERPLATE = [
    r"(?:copyright|\(c\)|©)\s*(?:\d{4}|[a-z]).{0,160}",
    r".{0,160}\ball rights reserved\b.{0,80}",
    r".{0,160}\bprotected by copyright\b.{0,80}",
    r"(?:skip to (?:main )?content|skip navigation|jump to (?:navigation|content)|back to top|return to top|"
    r"print this page|share this (?:page|article)|email this page|accept (?:all )?cookies|cookie (?:policy|settings)|"
    r"(?:sign|log) ?in(?: to .{0,40})?|subscribe(?: to .{0,40})?|click here.{0,80}|advertisement|"
    r"you are here:?.{0,160}|last (?:updated|reviewed):? .{0,40})[.!:]?",
    r"home\s*(?:[>›»|/]\s*[^>›»|/]{1,60}){1,8}",          # breadcrumbs: Home > Topics > Asthma
    r"(?:[A-Za-z][A-Za-z &'-]{0,29}\s*[|•]\s*){3,}[A-Za-z][A-Za-z &'-]{0,29}",  # menus: About | Contact | Terms
]
EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
PHONE_RE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w])")
WORD_RE = re.compile(r"\w+")
PUNCT_RE = re.compile(r"[^\w\s]")


# --- text transforms (pure)
class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in SKIP_TAGS:
            self.skipping += 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")
            if tag == "li":
                self.parts.append("- ")

    def handle_endtag(self, tag):
        if tag in SKIP_TAGS:
            self.skipping = max(self.skipping - 1, 0)
        elif tag in BLOCK_TAGS and tag != "li":
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def markup_to_text(text: str) -> str:
    """HTML (or stray tags and entities) -> plain text, block elements on their own lines."""
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return html.unescape("".join(parser.parts))


def tidy_whitespace(text: str) -> str:
    """Runs of spaces collapsed (indentation kept), trailing spaces and 3+ blank lines removed."""
    lines = [re.sub(r"(?<=\S)[ \t]{2,}", " ", line.replace("\t", "    ")).rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def scrub_contacts(text: str) -> tuple[str, int]:
    """Mask e-mail addresses and phone numbers (9 to 15 digits, so doses, years and ranges stay)."""
    text, emails = EMAIL_RE.subn("[email]", text)
    phones = 0

    def phone(match: re.Match) -> str:
        nonlocal phones
        digits = sum(ch.isdigit() for ch in match.group())
        if 9 <= digits <= 15:
            phones += 1
            return "[phone]"
        return match.group()

    return PHONE_RE.sub(phone, text), emails + phones


@dataclass
class Cleaner:
    """Cleans one example's messages; counts what it changed in `changes`."""
    strip_markup: bool = True
    boilerplate: list[str] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._boilerplate = re.compile("|".join(f"(?:{p})" for p in BOILERPLATE + list(self.boilerplate)), re.I)

    def _count(self, what: str, n: int = 1) -> None:
        if n:
            self.changes[what] = self.changes.get(what, 0) + n

    def text(self, text: str, scrub: bool = False) -> str:
        out = unicodedata.normalize("NFKC", text.replace("\r\n", "\n").replace("\r", "\n"))
        out = INVISIBLE_RE.sub("", out)
        if out != text:
            self._count("unicode")
        if self.strip_markup and MARKUP_RE.search(out):
            out = INVISIBLE_RE.sub("", unicodedata.normalize("NFKC", markup_to_text(out)))  # entities may be &nbsp;
            self._count("markup")
        lines = out.split("\n")
        kept = [line for line in lines if not self._boilerplate.fullmatch(line.strip())]
        self._count("boilerplate_lines", len(lines) - len(kept))
        out = tidy_whitespace("\n".join(kept))
        if scrub:
            out, n = scrub_contacts(out)
            self._count("contacts", n)
        return out

    def messages(self, messages: list[dict], scrub: bool = False) -> list[dict]:
        return [{**m, "content": self.text(str(m.get("content", "")), scrub)} for m in messages]

    def row(self, row: dict, scrub: bool = False) -> dict:
        """The example with its messages (or `text`) cleaned; every other field unchanged."""
        if isinstance(row.get("messages"), list):
            return {**row, "messages": self.messages(row["messages"], scrub)}
        if isinstance(row.get("text"), str):
            return {**row, "text": self.text(row["text"], scrub)}
        return row


# --- drop decisions
def _norm(text: str) -> str:
    return " ".join(WORD_RE.findall(text.casefold()))


def problem(row: dict) -> str | None:
    """Why a cleaned example is unusable regardless of length: invalid, empty or echo (None: fine)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "empty" if isinstance(row.get("text"), str) and not row["text"].strip() else (
            None if isinstance(row.get("text"), str) else "invalid")
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    if not any(m.get("role") == "assistant" for m in turns) or not any(m.get("role") == "user" for m in turns):
        return "empty"
    if any(not str(m.get("content", "")).strip() for m in turns):
        return "empty"
    for prev, cur in zip(turns, turns[1:]):
        if prev["role"] == "user" and cur["role"] == "assistant" and _norm(prev["content"]) == _norm(cur["content"]):
            return "echo"
    return None


def example_content(row: dict) -> str:
    """Everything that is tokenized when training on the example (message contents, in order)."""
    if isinstance(row.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
    return str(row.get("text", ""))


# --- token counting
@dataclass
class TokenCounter:
    """Counts tokens with the base tokenizer when built, else with the documented word estimate.

    Tokenizer counts are remembered in `cache` (data/cache/tokens-<tokenizer hash>.npz, a
    64-bit hash of each text -> its count): dedup counts every cleaned example for the length
    bounds, and split:<adapter> then reads the same texts' counts for its histogram instead
    of tokenizing hundreds of thousands of examples again.
    """
    spec: str
    kind: str                                   # "tokenizer" or "word-estimate"
    _encode: Callable[[list[str]], list[int]] | None = None
    cache: Path | None = None
    _memo: dict[int, int] | None = field(default=None, repr=False)

    def describe(self) -> dict[str, str]:
        if self.kind == "tokenizer":
            return {"base_model": self.spec, "counter": "tokenizer"}
        return {"base_model": self.spec, "counter": "word-estimate",
                "note": "base tokenizer not built yet (run `doit base_model`); tokens estimated as 4/3 per word "
                        "+ 1 per punctuation mark"}

    def count(self, texts: list[str]) -> list[int]:
        if self._encode is None:
            return [estimate_tokens(t) for t in texts]
        if self.cache is None:
            return self._encode(texts)
        import xxhash

        memo = self._load()
        keys = [xxhash.xxh3_64_intdigest(t.encode("utf-8", "surrogatepass")) for t in texts]
        missing = {k: t for k, t in zip(keys, texts) if k not in memo}
        if missing:
            memo.update(zip(missing, self._encode(list(missing.values()))))
            self._save()
        return [memo[k] for k in keys]

    def _load(self) -> dict[int, int]:
        if self._memo is None:
            from stages import io

            data = io.read_arrays(self.cache) or {}  # none yet, or unreadable: counted afresh
            has = {"keys", "counts"} <= data.keys()
            self._memo = dict(zip(data["keys"].tolist(), data["counts"].tolist())) if has else {}
        return self._memo

    def _save(self) -> None:
        import numpy as np

        from stages import io

        memo = self._memo or {}
        try:
            io.write_arrays(self.cache, keys=np.fromiter(memo.keys(), np.uint64, len(memo)),
                            counts=np.fromiter(memo.values(), np.uint32, len(memo)))
        except OSError as exc:  # a cache only: counting still worked
            print(f"warning: could not save token counts to {self.cache} ({exc})")


def estimate_tokens(text: str) -> int:
    return (len(WORD_RE.findall(text)) * 4 + 2) // 3 + len(PUNCT_RE.findall(text))


def token_counter(spec: str) -> TokenCounter:
    from stages import io, layout

    path = Path(layout.base_dir(spec)) / "tokenizer.json"
    if path.exists():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
        except Exception:  # an unreadable tokenizer file: fall back, and say so in the stats
            return TokenCounter(spec, "word-estimate")

        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: the same ids in about half the time
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

        def encode(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in batch(texts, add_special_tokens=False)]

        cache = layout.token_count_cache(io.file_hash(path))
        return TokenCounter(spec, "tokenizer", encode, cache)
    return TokenCounter(spec, "word-estimate")


def clean_rows(rows: Iterable[dict], kind: str, settings: dict[str, Any], counter: TokenCounter
               ) -> tuple[list[dict], list[str | None], dict[str, int]]:
    """Clean every row; returns (cleaned rows, drop reason per row or None, change counts)."""
    cleaner = Cleaner(settings.get("strip_markup", True), settings.get("boilerplate", []))
    scrub = kind in settings.get("scrub_contacts", [])
    cleaned, reasons = [], []
    for row in rows:
        row = cleaner.row(row, scrub)
        cleaned.append(row)
        reasons.append(problem(row))
    pending = [i for i, r in enumerate(reasons) if r is None]
    counts = counter.count([example_content(cleaned[i]) for i in pending])
    low, high = settings.get("min_tokens", 0), settings.get("max_tokens", 1 << 30)
    for i, n in zip(pending, counts):
        if n < low:
            reasons[i] = "too_short"
        elif n > high:
            reasons[i] = "too_long"
    return cleaned, reasons, cleaner.changes
