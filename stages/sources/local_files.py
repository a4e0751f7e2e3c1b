"""Local files: PDFs, and JSONL/JSON/CSV in alpaca, sharegpt or messages form.

`fetch` copies each matched file into data/raw/<source>/pages/ (so the mirror and the
hash manifest cover them); `parse` reads one file. A row's form is detected per row
(or forced with `format`):
  alpaca    {"instruction", "input"?, "output"}
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
  messages  {"messages": [{"role", "content"}]}
A PDF becomes passages of about `chunk_chars` characters, each a text-continuation example.

params: paths (list of files or globs, relative to the project), format ("auto"), task
("local"), chunk_chars (1500), licence (what the files are licensed under, for provenance).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io as _io
import re
from pathlib import Path
from typing import Any, Iterator

import orjson

from stages import io
from stages.sources import Key, Source, SourceError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bing": "assistant", "chatgpt": "assistant"}
SUFFIXES = (".jsonl", ".json", ".csv", ".pdf")


def to_messages(row: dict[str, Any], form: str = "auto") -> list[dict[str, str]] | None:
    """One row in any supported form -> chat messages, or None when the row has none."""
    if form in ("auto", "messages") and isinstance(row.get("messages"), list):
        msgs = [{"role": str(m.get("role")), "content": str(m.get("content", ""))} for m in row["messages"]
                if isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")]
        return msgs or None
    if form in ("auto", "sharegpt") and isinstance(row.get("conversations"), list):
        msgs = [{"role": SHAREGPT_ROLES.get(str(m.get("from", "")).lower(), ""), "content": str(m.get("value", ""))}
                for m in row["conversations"] if isinstance(m, dict)]
        msgs = [m for m in msgs if m["role"]]
        return msgs or None
    if form in ("auto", "alpaca") and row.get("instruction") and row.get("output") is not None:
        prompt = str(row["instruction"]).strip()
        if str(row.get("input") or "").strip():
            prompt += "\n\n" + str(row["input"]).strip()
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"]).strip()}]
    return None


class LocalFiles(Source):
    kind = "local_files"
    licence = "as given in params.licence (the user's own files)"
    origin = "local"
    PARAMS = {
        "paths": Key(list, list, items=str, nonblank=True),  # files or globs, relative to the project
        "format": Key(str, "auto", choices=("auto", "alpaca", "sharegpt", "messages")),
        "task": Key(str, "local", nonblank=True),
        "chunk_chars": Key(int, 1500, min=1),
        "licence": Key(str, ""),       # what the files are licensed under, for provenance
    }

    def check(self, root: Path) -> list[tuple[str, str]]:
        if not self.param("paths"):
            return [("paths", "is empty; list files or globs, e.g. [\"data/local/*.jsonl\"], or set enabled = false")]
        return []

    def __init__(self, name: str, params: dict[str, Any]):
        super().__init__(name, params)
        if params.get("licence"):  # provenance carries what the user says their files are licensed under
            self.licence = str(params["licence"])

    @staticmethod
    def _matches(pattern: str) -> list[Path]:
        matched = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
        return [p for p in matched if p.is_file() and p.suffix.lower() in SUFFIXES]

    def inputs(self) -> list[Path]:
        patterns = self.params.get("paths")
        return [p for pattern in patterns if isinstance(pattern, str) for p in self._matches(pattern)] \
            if isinstance(patterns, list) else []

    def _files(self) -> list[Path]:
        patterns = self.param("paths")
        if not patterns:
            raise SourceError(f"sources.toml: key 'sources.{self.name}.params.paths' is empty; list files or globs, "
                              f"e.g. [\"data/local/*.jsonl\"]")
        files: list[Path] = []
        for pattern in patterns:
            matched = self._matches(pattern)
            if not matched:
                raise SourceError(f"sources.{self.name}.params.paths: '{pattern}' matches no .jsonl/.json/.csv/.pdf "
                                  f"file; fix the path")
            files += matched
        return files

    def fetch(self, store) -> None:
        for path in self._files():
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:80]
            store.put(f"{stem}-{digest}{path.suffix.lower()}", path.read_bytes())

    def _rows(self, page: Path) -> Iterator[dict[str, Any]]:
        suffix = page.suffix.lower()
        if suffix == ".jsonl":
            yield from io.read_jsonl(page)
        elif suffix == ".json":
            try:
                doc = orjson.loads(page.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise SourceError(f"{page}: not valid JSON ({exc}); fix the file") from None
            yield from (doc if isinstance(doc, list) else doc.get("data", []) if isinstance(doc, dict) else [])
        elif suffix == ".csv":
            yield from csv.DictReader(_io.StringIO(page.read_text(encoding="utf-8-sig")))

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        if page.suffix.lower() == ".pdf":
            from stages.sources.fda_guidance import pdf_text

            text = re.sub(r"[ \t]+", " ", "\n".join(pdf_text(page))).strip()
            size = self.param("chunk_chars")
            paragraphs, buf, n = re.split(r"\n\s*\n|\n(?=[A-Z0-9])", text), "", 0
            for para in paragraphs + [None]:
                if para is not None and len(buf) + len(para) < size:
                    buf = f"{buf}\n{para}".strip()
                    continue
                if len(buf) > 200:
                    yield {"id": f"{page.name}:{n}", "document": page.name, "passage": buf}
                    n += 1
                buf = (para or "").strip()
            return
        form = self.param("format")
        for i, row in enumerate(self._rows(page)):
            if not isinstance(row, dict):
                continue
            messages = to_messages(row, form)
            if messages and any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                yield {"id": str(row.get("id") or f"{page.name}:{i}"), "messages": messages, "task": row.get("task")}

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        task = self.param("task")
        if "passage" in record:
            text = record["passage"]
            cut = text.find(". ", len(text) // 3)
            cut = cut + 2 if 0 < cut < len(text) - 40 else len(text) // 2
            yield {"task": f"{task}_continue", "messages": [
                {"role": "user", "content": f"Continue this passage from {record['document']}:\n\n{text[:cut].strip()}"},
                {"role": "assistant", "content": text[cut:].strip()}]}
            return
        yield {"task": str(record.get("task") or task), "messages": record["messages"]}


SOURCE = LocalFiles
