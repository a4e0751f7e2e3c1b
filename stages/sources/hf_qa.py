"""Open medical QA sets through `datasets`: MedQA (USMLE), MedMCQA, PubMedQA.

From the Hugging Face hub when online (or its local cache with HF_DATASETS_OFFLINE=1),
or from a local copy (`path`: a JSON/JSONL/Parquet/CSV file or a `save_to_disk` folder).
Rows are stored as JSONL pages of `chunk` rows (`rows-<n>.jsonl`), which is also what a
mirror copies.

params: dataset ("medqa", "medmcqa" or "pubmedqa"), hub_id / config (override the hub
dataset), split ("train"), path (local copy), max_rows (2000; 0 = all), chunk (1000).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

from stages import io
from stages.sources import Key, Source, SourceError

DATASETS = {  # name -> (hub id, config, licence)
    "medqa": ("GBaker/MedQA-USMLE-4-options", None, "MIT (MedQA, Jin et al. 2021)"),
    "medmcqa": ("openlifescienceai/medmcqa", None, "MIT (MedMCQA, Pal et al. 2022)"),
    "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled", "MIT (PubMedQA, Jin et al. 2019)"),
}
LETTERS = "ABCDE"


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
            return datasets.load_dataset(fmt, data_files=str(local), split="train")
        try:
            return datasets.load_dataset(self.param("hub_id") or hub_id, self.param("config") or config or None,
                                         split=split)
        except Exception as exc:  # offline with no cache, unknown split, hub errors
            raise SourceError(f"source '{self.name}' could not load {hub_id} from the Hugging Face hub or its cache "
                              f"({type(exc).__name__}); set params.path to a local copy, or mode = \"mirror\" with "
                              f"data/raw/{self.name}/ copied from a connected machine, or enabled = false") from None

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
        name = self._which()
        for row in io.read_jsonl(page):
            record = getattr(self, f"_{name}")(row)
            if record:
                yield record

    @staticmethod
    def _key(*parts: str) -> str:
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]

    def _medmcqa(self, row: dict) -> dict | None:
        options = [row.get(k) for k in ("opa", "opb", "opc", "opd")]
        cop = row.get("cop")
        if not row.get("question") or not all(options) or not isinstance(cop, int) or not 0 <= cop < 4:
            return None  # the test split has no answer key (cop = -1)
        return {"id": str(row.get("id") or self._key(row["question"], *options)), "dataset": "medmcqa",
                "question": row["question"].strip(), "options": [o.strip() for o in options], "answer": cop,
                "explanation": (row.get("exp") or "").strip(), "subject": row.get("subject_name") or ""}

    def _medqa(self, row: dict) -> dict | None:
        opts = row.get("options") or {}
        if isinstance(opts, list):  # some exports store [{"key": "A", "value": ...}]
            opts = {o["key"]: o["value"] for o in opts}
        letters = sorted(opts)
        idx = row.get("answer_idx")
        if not row.get("question") or idx not in letters:
            return None
        return {"id": self._key(row["question"], *(opts[k] for k in letters)), "dataset": "medqa",
                "question": row["question"].strip(), "options": [opts[k].strip() for k in letters],
                "answer": letters.index(idx), "explanation": "", "subject": row.get("meta_info") or ""}

    def _pubmedqa(self, row: dict) -> dict | None:
        ctx = row.get("context") or {}
        if not row.get("question") or row.get("final_decision") not in ("yes", "no", "maybe"):
            return None
        labels = ctx.get("labels") or []
        passages = ctx.get("contexts") or []
        context = "\n".join(f"{labels[i]}: {p}" if i < len(labels) and labels[i] else p for i, p in enumerate(passages))
        return {"id": str(row.get("pubid") or self._key(row["question"])), "dataset": "pubmedqa",
                "origin": f"https://pubmed.ncbi.nlm.nih.gov/{row['pubid']}/" if row.get("pubid") else self.origin,
                "question": row["question"].strip(), "context": context, "decision": row["final_decision"],
                "long_answer": (row.get("long_answer") or "").strip()}

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
