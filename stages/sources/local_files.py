"""Local files: PDFs, and JSONL/JSON/CSV in alpaca, sharegpt or messages form.

`fetch` copies each matched file into data/raw/<source>/pages/ (so the mirror and the
hash manifest cover them); `parse` reads one file. A row's form is detected per row
(or forced with `format`):
  alpaca    {"instruction", "input"?, "output"}
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
  messages  {"messages": [{"role", "content"}]}
A PDF becomes passages of about `chunk_chars` characters, each a text-continuation example.

params: paths (list of files or globs, relative to the project), format ("auto"), task
("local"), chunk_chars (1500), licence (what the files are licensed under, for provenance),
encoding ("utf-8": of the JSONL/JSON/CSV files; a file starting with a UTF-8 BOM is UTF-8).

A row's `group` (text or a number) keeps the rows that share it in one split, as one record's examples are:
paraphrases of one question, several questions about one patient or document.

Eval scores these tasks (the `task` param's, a row's own, `<task>_continue`) by greedy answers against the
gold one: exact match and token F1 after SQuAD's normalization (case, punctuation, articles and spacing
ignored), each with its interval and the paired verdict, as every scored task is.

A file that cannot be read as a whole (wrong encoding, a .json that is not JSON, a CSV the csv
module refuses) is one line naming the file as `paths` names it, the line and the fix. A row that
is malformed (a broken JSONL line, a CSV row with the wrong number of columns, no usable messages,
fields that are not text) is skipped and counted by reason (Source.skip); a file none of whose
rows is usable fails.
"""
from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io as _io
import re
from pathlib import Path
from typing import Any, Iterator

import orjson

from stages import layout
from stages.sources import Key, Source, SourceError, Task

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bing": "assistant", "chatgpt": "assistant"}
SUFFIXES = (".jsonl", ".json", ".csv", ".pdf")
ANSWER_TOKENS = 256  # a generated answer's length limit when eval scores it
ARTICLES = {"a", "an", "the"}
WORD = re.compile(r"\w+")


def answer_words(text: str) -> list[str]:
    """SQuAD's answer normalization, as words: lower case, no punctuation, no articles."""
    return [w for w in WORD.findall(text.lower()) if w not in ARTICLES]


def answer_match(gold: str, answer: str) -> dict[str, float]:
    """Exact match and token F1 of a generated answer against the gold one (both normalized)."""
    want, got = answer_words(gold), answer_words(answer)
    common = sum(min(want.count(w), got.count(w)) for w in set(want))
    f1 = 2 * common / (len(want) + len(got)) if want and got else float(want == got)
    return {"exact_match": float(want == got), "token_f1": f1}


def _text_field(value: Any) -> str | None:
    """A message's text: a string, or a number written as one; anything else (a list, an object, null) is not text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def row_messages(row: dict[str, Any], form: str = "auto") -> tuple[list[dict[str, str]] | None, str]:
    """One row in any supported form -> (chat messages, "") or (None, why the row has none)."""
    if form in ("auto", "messages") and isinstance(row.get("messages"), list):
        msgs = []
        for m in row["messages"]:
            if isinstance(m, dict) and m.get("role") in ("system", "user", "assistant"):
                content = _text_field(m.get("content", ""))
                if content is None:
                    return None, "a message whose content is not text"
                msgs.append({"role": m["role"], "content": content})
        return (msgs, "") if msgs else (None, "no messages with a role of system, user or assistant")
    if form in ("auto", "sharegpt") and isinstance(row.get("conversations"), list):
        msgs = []
        for m in row["conversations"]:
            role = SHAREGPT_ROLES.get(str(m.get("from", "")).lower(), "") if isinstance(m, dict) else ""
            if role:
                content = _text_field(m.get("value", ""))
                if content is None:
                    return None, "a conversation turn whose value is not text"
                msgs.append({"role": role, "content": content})
        return (msgs, "") if msgs else (None, "no conversation turns from human, gpt or system")
    if form in ("auto", "alpaca") and row.get("instruction") and row.get("output") is not None:
        instruction, extra, output = (_text_field(row.get(k)) for k in ("instruction", "input", "output"))
        if instruction is None or output is None or (row.get("input") is not None and extra is None):
            return None, "an instruction, input or output that is not text"
        prompt = instruction.strip()
        if (extra or "").strip():
            prompt += "\n\n" + extra.strip()
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output.strip()}], ""
    wanted = {"auto": "instruction and output, conversations or messages", "alpaca": "instruction and output",
              "sharegpt": "conversations", "messages": "messages"}[form]
    return None, f"no {wanted}"


def to_messages(row: dict[str, Any], form: str = "auto") -> list[dict[str, str]] | None:
    """One row in any supported form -> chat messages, or None when the row has none."""
    return row_messages(row, form)[0]


def decode(data: bytes, encoding: str, shown: str, source: str | None) -> str:
    """A text file's bytes -> str, or one line naming the file, the line of the first bad byte and the fix
    (`source`: the source whose `encoding` param may be set; None when it has none)."""
    utf8 = codecs.lookup(encoding).name == "utf-8" or data.startswith(codecs.BOM_UTF8)  # a BOM says UTF-8
    try:
        return data.decode("utf-8-sig" if utf8 else encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        fix = "save the file as UTF-8" + (f", or set sources.{source}.params.encoding to the encoding it is in "
                                          f"(e.g. \"cp1252\" or \"latin-1\")" if source else "")
        raise SourceError(f"{shown}: line {line} is not {'UTF-8' if utf8 else encoding} text (byte "
                          f"0x{data[exc.start]:02x}); {fix}") from None


class LocalFiles(Source):
    kind = "local_files"
    licence = "as given in params.licence (the user's own files)"
    origin = "local"
    user_task = Task(ANSWER_TOKENS, answer_match, rates=frozenset({"exact_match", "token_f1"}))
    PARAMS = {
        "paths": Key(list, list, items=str, nonblank=True),  # files or globs, relative to the project
        "format": Key(str, "auto", choices=("auto", "alpaca", "sharegpt", "messages")),
        "task": Key(str, "local", nonblank=True),
        "chunk_chars": Key(int, 1500, min=1),
        "licence": Key(str, ""),       # what the files are licensed under, for provenance
        "encoding": Key(str, "utf-8", nonblank=True),  # of the JSONL/JSON/CSV files (a Python codec name)
    }

    def check(self, root: Path) -> list[tuple[str, str]]:
        if not self.param("paths"):
            return [("paths", "is empty; list files or globs, e.g. [\"data/local/*.jsonl\"], or set enabled = false")]
        try:
            codecs.lookup(self.param("encoding"))
        except LookupError:
            return [("encoding", f"names no text encoding Python knows ({self.param('encoding')!r}); use e.g. "
                                 f"\"utf-8\", \"cp1252\" or \"latin-1\"")]
        return []

    def __init__(self, name: str, params: dict[str, Any]):
        super().__init__(name, params)
        self._origins: dict[str, str] | None = None  # raw page name -> the user's file
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

    @staticmethod
    def page_name(path: Path) -> str:
        """The name of a user's file's copy under data/raw/<source>/pages/, which its rows' ids (without an id of
        their own) and so their clusters and splits carry: from the file's path relative to the project (the working
        directory) where it is inside it, absolute otherwise, so a project moved or mounted elsewhere names its
        files' copies, and keeps its examples' ids, as before."""
        digest = hashlib.sha256(str(layout.as_named(path)).encode()).hexdigest()[:8]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:80]
        return f"{stem}-{digest}{path.suffix.lower()}"

    def _encoding(self) -> str:
        encoding = self.param("encoding")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise SourceError(f"sources.toml: key 'sources.{self.name}.params.encoding' names no text encoding Python "
                              f"knows ({encoding!r}); use e.g. \"utf-8\", \"cp1252\" or \"latin-1\"") from None
        return encoding

    def fetch(self, store) -> None:
        """Copy each file; text files are read in `encoding` and stored as UTF-8, so a file in another encoding,
        or a .json file that is not JSON, is refused here, naming the user's file, not the copy."""
        encoding = self._encoding()
        for path in self._files():
            data = path.read_bytes()
            if path.suffix.lower() != ".pdf":
                text = decode(data, encoding, str(path), self.name)
                if path.suffix.lower() == ".json":
                    self._json_doc(text.encode("utf-8"), str(path))
                if codecs.lookup(encoding).name != "utf-8" or data.startswith(codecs.BOM_UTF8):
                    data = text.encode("utf-8")
            store.put(self.page_name(path), data)

    def _shown(self, page: Path) -> str:
        """The user's file a raw copy was made from, as their paths name it (the copy itself when none matches)."""
        if self._origins is None:
            self._origins = {self.page_name(p): str(p) for p in self.inputs()}
        return self._origins.get(page.name, str(page))

    @staticmethod
    def _json_doc(data: bytes, shown: str) -> list:
        """A .json file's rows: a list, or an object holding them under "data" (or one row itself)."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"{shown}: not valid JSON ({exc}); fix the file, or save one row per line as .jsonl "
                              f"so a broken row is skipped instead") from None
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            return doc["data"]
        if isinstance(doc, dict) and ({"instruction", "conversations", "messages"} & doc.keys()):
            return [doc]
        if not isinstance(doc, list):
            raise SourceError(f"{shown}: a JSON {type(doc).__name__}, not a list of rows (or an object with a "
                              f"\"data\" list); write the rows as a JSON list, or one per line as .jsonl")
        return doc

    def _rows(self, page: Path, shown: str) -> Iterator[tuple[str, Any, str]]:
        """(where, row, "") for each row of a text file; (where, None, why) for one that cannot be read at all."""
        suffix = page.suffix.lower()
        data = page.read_bytes()
        try:  # fetch stored it as UTF-8; `medforge parse` may be given the user's file itself
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = decode(data, self._encoding(), shown, self.name)
        if suffix == ".jsonl":
            for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    yield f"{shown}:{lineno}", None, "not valid JSON"
                    continue
                yield f"{shown}:{lineno}", row, ""
        elif suffix == ".json":
            for i, row in enumerate(self._json_doc(text.encode("utf-8"), shown), 1):
                yield f"{shown} row {i}", row, ""
        elif suffix == ".csv":
            reader = csv.reader(_io.StringIO(text, newline=""))
            try:
                header = next(reader, None)
                if header is None:
                    return
                for values in reader:
                    if not values:  # a blank line is no row
                        continue
                    where = f"{shown}:{reader.line_num}"
                    if len(values) != len(header):
                        yield where, None, "wrong number of columns"
                        continue
                    yield where, dict(zip(header, values)), ""
            except csv.Error as exc:
                raise SourceError(f"{shown}:{reader.line_num}: not readable as CSV ({exc}); fix that line") from None

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        if page.suffix.lower() == ".pdf":
            from stages.sources.fda_guidance import pdf_text

            text = re.sub(r"[ \t]+", " ", "\n".join(pdf_text(page, shown=self._shown(page), fix="replace it with a "
                                                           "readable PDF or remove it from paths"))).strip()
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
        shown = self._shown(page)
        good, bad = 0, []
        for i, (where, row, problem) in enumerate(self._rows(page, shown)):
            if problem:
                pass
            elif not isinstance(row, dict):
                problem = "not a JSON object"
            else:
                messages, problem = row_messages(row, form)
                if messages and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                    problem = "no assistant answer"
            if problem:
                self.skip(problem, where)
                bad.append((where, problem))
                continue
            good += 1
            group = row.get("group")
            yield {"id": str(row.get("id") or f"{page.name}:{i}"), "messages": messages, "task": row.get("task"),
                   "group": str(group) if isinstance(group, (str, int)) and not isinstance(group, bool) else None}
        if bad and not good:
            where, problem = bad[0]
            raise SourceError(f"{shown}: none of its {len(bad)} row(s) is usable (first: {where}: {problem}); "
                              f"write rows as alpaca {{instruction, output}}, sharegpt {{conversations}} or "
                              f"{{messages}} (sources.{self.name}.params.format says which)")

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
