"""Open medical QA sets through `datasets`: MedQA (USMLE), MedMCQA, PubMedQA.

From the Hugging Face hub when online (or its local cache with HF_DATASETS_OFFLINE=1),
or from a local copy (`path`: a JSON/JSONL/Parquet/CSV file or a `save_to_disk` folder).
Rows are stored as JSONL pages of `chunk` rows (`rows-<n>.jsonl`), which is also what a
mirror copies.

params: dataset ("medqa", "medmcqa" or "pubmedqa"), hub_id / config (override the hub
dataset), split ("train"), path (local copy), max_rows (2000; 0 = all), chunk (1000).
Scored in eval (`tasks`): medqa_mcq and medmcqa_mcq as a choice among the question's lettered options.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterator

import orjson

from stages import io
from stages.sources import Key, Source, SourceError, Task

DATASETS = {  # name -> (hub id, config, licence)
    "medqa": ("GBaker/MedQA-USMLE-4-options", None, "MIT (MedQA, Jin et al. 2021)"),
    "medmcqa": ("openlifescienceai/medmcqa", None, "MIT (MedMCQA, Pal et al. 2022)"),
    "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled", "MIT (PubMedQA, Jin et al. 2019)"),
}
LETTERS = "ABCDE"
_OPTION_RE = re.compile(r"^\s*([A-J])[.)]\s+(.+?)\s*$", re.MULTILINE)


def mcq_choices(rows: list[dict[str, Any]]) -> list[tuple[int, list[str], int]]:
    """The question's lettered options ("B. text") as the choices, gold from the answer's letter."""
    out = []
    for i, row in enumerate(rows):
        options = _OPTION_RE.findall(row["messages"][-2]["content"])
        letters = [letter for letter, _ in options]
        gold = row["messages"][-1]["content"].strip()[:1]
        if len(options) >= 2 and gold in letters:
            out.append((i, [f"{letter}. {text}" for letter, text in options], letters.index(gold)))
    return out


class HfQa(Source):
    kind = "hf_qa"
    licence = "MIT (MedQA, MedMCQA and PubMedQA are each MIT-licensed)"
    origin = "https://huggingface.co/datasets"
    PARAMS = {
        "dataset": Key(str, "medmcqa", choices=tuple(DATASETS)),
        "hub_id": Key(str, ""),        # override the hub dataset ("" = the dataset's own)
        "config": Key(str, ""),
        "split": Key(str, "train", nonblank=True),
        "path": Key(str, ""),          # a local copy instead of the hub
        "max_rows": Key(int, 2000, min=0, expect="0 (all) or more"),
        "chunk": Key(int, 1000, min=1),
    }
    tasks = {f"{ds}_mcq": Task(choices=mcq_choices) for ds in DATASETS if ds != "pubmedqa"}

    def check(self, root: Path) -> list[tuple[str, str]]:
        raw = self.param("path")
        if raw and not (root / Path(raw).expanduser()).exists():
            return [("path", f"names {raw}, which does not exist; point it at a local copy (JSON/JSONL/Parquet/CSV "
                             f"or a save_to_disk folder), or remove the key to use the hub")]
        return []

    @property
    def network(self) -> bool:  # the hub needs the internet; a local copy does not
        return not self.params.get("path")

    def _which(self) -> str:
        return self.param("dataset")  # one of DATASETS: its Key's choices

    def _load(self):
        name = self._which()
        hub_id, config, _ = DATASETS[name]
        split = self.param("split")
        path = self.param("path")
        try:
            import datasets
        except ImportError:
            raise SourceError("hf_qa needs the `datasets` package; pip install datasets") from None
        if path:
            local = Path(path).expanduser()
            if not local.exists():
                raise SourceError(f"sources.{self.name}.params.path: {local} not found; point it at a local copy "
                                  f"(JSONL/Parquet/CSV file or a save_to_disk folder)")
            if local.is_dir():
                ds = datasets.load_from_disk(str(local))
                return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
            if fmt is None:
                raise SourceError(f"sources.{self.name}.params.path: {local} must be .jsonl, .json, .parquet, .csv or a folder")
            self._check_text(local)
            try:
                return datasets.load_dataset(fmt, data_files=str(local), split="train")
            except Exception as exc:  # the datasets library raises many types for a file it cannot read
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                raise SourceError(f"{local}: the datasets library cannot read it as {local.suffix[1:]} "
                                  f"({type(exc).__name__}: {reason}); fix the file, or point "
                                  f"sources.{self.name}.params.path at a save_to_disk folder") from None
        try:
            return datasets.load_dataset(self.param("hub_id") or hub_id, self.param("config") or config or None,
                                         split=split)
        except Exception as exc:  # offline with no cache, unknown split, hub errors
            raise SourceError(f"source '{self.name}' could not load {hub_id} from the Hugging Face hub or its cache "
                              f"({type(exc).__name__}); set params.path to a local copy, or mode = \"mirror\" with "
                              f"data/raw/{self.name}/ copied from a connected machine, or enabled = false") from None

    def _check_text(self, local: Path) -> None:
        """A local JSON/JSONL/CSV copy must be UTF-8, and each JSONL line JSON: else one line naming the file,
        the line and the fix (the datasets library would refuse the whole file with a traceback)."""
        if local.suffix not in (".jsonl", ".json", ".csv"):
            return
        from stages.sources.local_files import decode

        text = decode(local.read_bytes(), "utf-8", str(local), None)  # the datasets library reads UTF-8 only
        if local.suffix == ".jsonl":
            for lineno, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise SourceError(f"{local}:{lineno}: not valid JSON ({exc}); fix or delete that line") from None

    def inputs(self) -> list[Path]:
        """A local copy: the file, or every file of a save_to_disk folder (the hub and its cache are not the user's)."""
        raw = self.params.get("path")
        local = Path(raw).expanduser() if isinstance(raw, str) and raw else None
        if local is None or not local.exists():
            return []
        return sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]

    def fetch(self, store) -> None:
        ds = self._load()
        max_rows = self.param("max_rows")
        chunk = max(1, self.param("chunk"))
        n = min(len(ds), max_rows) if max_rows else len(ds)
        for page, start in enumerate(range(0, n, chunk)):
            rows = ds.select(range(start, min(n, start + chunk))).to_list()
            store.put(f"rows-{page:05d}.jsonl", io.jsonl_bytes(rows))

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        """Rows -> records; a malformed row (not JSON, not an object, no question, no answer key) is skipped and
        counted by reason (a source none of whose rows is usable fails in normalize)."""
        name = self._which()
        # a local copy's rows are named in the user's file (page n holds its rows n*chunk+1 ...), not in the copy
        numbered = re.fullmatch(r"rows-(\d+)\.jsonl", page.name)
        local = self.params.get("path") if numbered else None
        first = int(numbered.group(1)) * self.param("chunk") if numbered else 0
        with open(page, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    record, problem = None, "not valid JSON"
                else:
                    record, problem = getattr(self, f"_{name}")(row) if isinstance(row, dict) else (None, "not a JSON object")
                if record is None:
                    self.skip(problem, f"{local} row {first + lineno}" if local else f"{page}:{lineno}")
                    continue
                yield record

    @staticmethod
    def _key(*parts: str) -> str:
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]

    @staticmethod
    def _text(value: Any) -> str | None:
        return value.strip() if isinstance(value, str) else None

    def _medmcqa(self, row: dict) -> tuple[dict | None, str]:
        question = self._text(row.get("question"))
        options = [self._text(row.get(k)) for k in ("opa", "opb", "opc", "opd")]
        cop = row.get("cop")
        if not question:
            return None, "no question"
        if not all(options):
            return None, "an option (opa..opd) missing or not text"
        if not isinstance(cop, int) or isinstance(cop, bool) or not 0 <= cop < 4:
            return None, "no answer key (cop 0-3)"  # the test split has none (cop = -1)
        return {"id": str(row.get("id") or self._key(question, *options)), "dataset": "medmcqa",
                "question": question, "options": options, "answer": cop,
                "explanation": self._text(row.get("exp")) or "", "subject": str(row.get("subject_name") or "")}, ""

    def _medqa(self, row: dict) -> tuple[dict | None, str]:
        opts = row.get("options") or {}
        if isinstance(opts, list):  # some exports store [{"key": "A", "value": ...}]
            if not all(isinstance(o, dict) and isinstance(o.get("key"), str) for o in opts):
                return None, "options not {key, value} objects"
            opts = {o["key"]: o.get("value") for o in opts}
        if not isinstance(opts, dict) or not opts:
            return None, "no options"
        texts = {k: self._text(v) for k, v in opts.items()}
        if not all(texts.values()):
            return None, "an option missing or not text"
        question = self._text(row.get("question"))
        letters = sorted(texts)
        idx = row.get("answer_idx")
        if not question:
            return None, "no question"
        if idx not in letters:
            return None, "no answer key (answer_idx among the options)"
        return {"id": self._key(question, *(texts[k] for k in letters)), "dataset": "medqa",
                "question": question, "options": [texts[k] for k in letters],
                "answer": letters.index(idx), "explanation": "", "subject": str(row.get("meta_info") or "")}, ""

    def _pubmedqa(self, row: dict) -> tuple[dict | None, str]:
        ctx = row.get("context") or {}
        question = self._text(row.get("question"))
        if not question:
            return None, "no question"
        if row.get("final_decision") not in ("yes", "no", "maybe"):
            return None, "no answer key (final_decision yes, no or maybe)"
        if not isinstance(ctx, dict):
            return None, "context not an object"
        labels = ctx.get("labels") or []
        passages = ctx.get("contexts") or []
        if not isinstance(labels, list) or not isinstance(passages, list) or \
                not all(isinstance(x, str) for x in [*labels, *passages]):
            return None, "context labels or contexts not lists of text"
        context = "\n".join(f"{labels[i]}: {p}" if i < len(labels) and labels[i] else p for i, p in enumerate(passages))
        pubid = row.get("pubid")
        pubid = str(pubid) if isinstance(pubid, (str, int)) and not isinstance(pubid, bool) and str(pubid) else ""
        return {"id": pubid or self._key(question), "dataset": "pubmedqa",
                "origin": f"https://pubmed.ncbi.nlm.nih.gov/{pubid}/" if pubid else self.origin,
                "question": question, "context": context, "decision": row["final_decision"],
                "long_answer": self._text(row.get("long_answer")) or ""}, ""

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        ds = record["dataset"]
        if ds == "pubmedqa":
            user = f"{record['context']}\n\nQuestion: {record['question']}\nAnswer yes, no or maybe, then explain."
            yield {"task": "pubmedqa_decision", "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": f"{record['decision'].capitalize()}. {record['long_answer']}".strip()}]}
            return
        options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(record["options"]))
        letter = LETTERS[record["answer"]]
        answer = f"{letter}. {record['options'][record['answer']]}"
        if record["explanation"]:
            answer += f"\n\nExplanation: {record['explanation']}"
        yield {"task": f"{ds}_mcq", "messages": [
            {"role": "user", "content": f"{record['question']}\n\n{options}\n\nAnswer with the letter of the best option."},
            {"role": "assistant", "content": answer}]}


SOURCE = HfQa
