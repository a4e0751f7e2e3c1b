"""Decontamination: drop training examples that copy an item of a test set the project scores.

Pure core (`check`): training examples and test items in, kept examples and dropped ones (each with
its reason and the test item it copies) out. The split stage calls it with every adapter's test
split (eval scores each adapter on every adapter's test split, the matrix), so adapter X never
trains on adapter Y's test items either; MedQA, MedMCQA and PubMedQA items reach eval as the test
split of an adapter that an `hf_qa` source feeds, and are named by their benchmark.

Two checks, either one drops:
- 13-gram overlap, lm-eval-harness style: lowercased text, punctuation stripped, word 13-grams (a
  question shorter than 13 words is one key: its whole normalized text). Compared on the question
  side only: a test question copied into a training prompt is contamination whatever answer goes
  with it (a near copy with a reworded answer), while an answer shared alone is not: templated
  sources give different questions the same answer ("Yes.", one NEWS2 response per risk band).
  A hit is a training prompt holding at least MIN_SHARE of the test question's 13-grams, not just
  one: every ICD-10 question starts with the same eight template words, so one shared 13-gram
  only says two descriptions start alike. 13-grams found in more than MAX_DF training prompts are
  template text, not any one item's, and are left out of both counts. Even so, two ICD-10 codes
  whose descriptions differ only in their last words ask near-identical questions ("..., right
  hand" and "..., right hand, subsequent encounter"), and a short description is held whole in a
  longer one: on the full ICD-10-CM (97,584 codes) that drops 8,991 of 348,279 train and val
  examples (2.6 %), all `icd10_code`, and no NEWS2 patient of 1,500 (on 6,000 codes, MIN_SHARE
  0.5 dropped 202 and 7 patients' examples, 0.8 dropped 53 and none). Every dropped id is
  listed with the test item it copies, for a person to judge.
- near-duplicate by MinHash on the whole example (question and answer), at dedup's threshold,
  num_perm and shingle size (stages.dedup: the same fingerprints and LSH), so "near-duplicate"
  means one thing in the project. Dedup already keeps one example per near-duplicate cluster of
  all sources together, so what this finds is an example routed both to X's train and to Y's
  test (a source feeding two adapters) or a near copy the LSH missed in dedup.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

NGRAM = 13        # words per n-gram (lm-eval-harness, GPT-3)
MIN_SHARE = 0.8   # share of a test question's 13-grams a training prompt must hold to be a copy of it
MAX_DF = 10       # a 13-gram in more training prompts than this is template text
SHOWN = 5         # dropped ids shown per reason in the dataset card (statistics.json keeps them all)


@dataclass(frozen=True)
class ScoredItem:
    label: str   # the test set, as reasons name it: "<adapter>/test" or "medqa (<adapter>/test)"
    row: dict    # the test example (id, messages)


def words(text: str) -> list[str]:
    """lm-eval-harness's normalization: lowercase (NFKC casefold), punctuation stripped, split on words."""
    from stages.dedup import WORD_RE, normalize_text

    return WORD_RE.findall(normalize_text(text))


def prompt_text(row: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in row.get("messages") or []
                     if isinstance(m, dict) and m.get("role") == "user")


def question_keys(tokens: list[str]) -> set[tuple[str, ...]]:
    """A test question's 13-grams; one shorter than 13 words is one key, all its words."""
    if len(tokens) < NGRAM:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)}


def _grams(tokens: list[str], sizes: set[int]) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for n in sizes for i in range(len(tokens) - n + 1)}


def ngram_hits(train_prompts: list[list[str]], test_prompts: list[list[str]]) -> dict[int, int]:
    """training example -> the test item whose question it copies (the largest share, >= MIN_SHARE)."""
    keys = [question_keys(t) for t in test_prompts]
    owners: dict[tuple, list[int]] = defaultdict(list)
    for j, ks in enumerate(keys):
        for k in ks:
            owners[k].append(j)
    sizes = {len(k) for k in owners}  # 13, and the lengths of the short questions
    found: dict[int, set[tuple]] = {}  # training example -> the test keys its prompt holds (most hold none)
    df: Counter = Counter()
    for i, tokens in enumerate(train_prompts):
        held = {g for g in _grams(tokens, sizes) if g in owners}
        if held:
            found[i] = held
            df.update(held)
    template = {k for k, n in df.items() if n > MAX_DF}
    size = [sum(1 for k in ks if k not in template) for ks in keys]
    hits: dict[int, int] = {}
    for i, held in found.items():
        shared: Counter = Counter()
        for k in held - template:
            shared.update(owners[k])
        best = max(shared, key=lambda j: (shared[j] / size[j], -j), default=None)
        if best is not None and shared[best] >= MIN_SHARE * size[best]:
            hits[i] = best
    return hits


def minhash_hits(train_texts: list[str], test_texts: list[str], settings: dict[str, Any]) -> dict[int, int]:
    """training example -> a test item it near-duplicates (true Jaccard >= dedup's threshold), through
    dedup's fingerprints, LSH candidate pairs and exact verification."""
    from stages.dedup import fingerprint, lsh_params
    from stages.dedup.lsh import candidate_pairs, verify

    if not train_texts or not test_texts:
        return {}
    num_perm, threshold = settings["num_perm"], settings["threshold"]
    fp = fingerprint([*train_texts, *test_texts], num_perm, settings["shingle_words"])
    n = len(train_texts)
    pairs = candidate_pairs(fp, np.arange(len(fp), dtype=np.int64), lsh_params(threshold, num_perm))
    pairs = pairs[(pairs[:, 0] < n) & (pairs[:, 1] >= n)]  # (training, test) only; i < j puts training first
    hits: dict[int, int] = {}
    for i, j in verify(fp, pairs, threshold).tolist():
        hits.setdefault(int(i), int(j) - n)
    return hits


def check(train: list[dict], tests: list[ScoredItem], settings: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(kept training examples, dropped ones): each dropped as {"id", "reason", "test_id"}, in input order.

    `settings`: num_perm, shingle_words and threshold (the dedup block). MinHash is asked first: a
    whole-example near copy is the stronger finding when both checks hit.
    """
    from stages.dedup import example_text

    near = minhash_hits([example_text(r) for r in train], [example_text(t.row) for t in tests], settings)
    overlap = ngram_hits([words(prompt_text(r)) for r in train], [words(prompt_text(t.row)) for t in tests])
    kept, dropped = [], []
    for i, row in enumerate(train):
        if i in near:
            item, reason = tests[near[i]], "near-duplicate (MinHash) of {}"
        elif i in overlap:
            item, reason = tests[overlap[i]], "13-gram overlap with {}"
        else:
            kept.append(row)
            continue
        dropped.append({"id": str(row["id"]), "reason": reason.format(item.label), "test_id": str(item.row["id"])})
    return kept, dropped


def summary(dropped: list[dict], checked: dict[str, int], tests: list[ScoredItem], settings: dict[str, Any]
            ) -> dict[str, Any]:
    """What statistics.json records: counts per reason, every dropped id (with the test item), settings."""
    reasons = Counter(d["reason"] for d in dropped)
    return {
        "checked": checked, "test_items": dict(sorted(Counter(t.label for t in tests).items())),
        "dropped": dict(sorted(reasons.items())), "dropped_total": len(dropped),
        "dropped_examples": dropped,
        "settings": {"ngram": NGRAM, "min_share": MIN_SHARE, "max_df": MAX_DF,
                     **{k: settings[k] for k in ("threshold", "num_perm", "shingle_words")}},
    }
