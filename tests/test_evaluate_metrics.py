"""Task metrics of the eval matrix, on real answers of the news2 and icd10cm sources: choices, read-back, regressions."""
from __future__ import annotations

import pytest

from stages import evaluate
from stages.sources import icd10cm, news2, scored_tasks
from stages.sources.icd10cm import Icd10cmSource
from stages.sources.news2 import News2Source, generate_patient


def score(task: str, gold: str, answer: str) -> dict[str, float]:
    """What eval records for one generated answer of a source's named task."""
    return scored_tasks()[task].score(gold, answer)


def icd10_rows() -> list[dict]:
    source = Icd10cmSource("icd10cm", {})
    records = [
        {"id": "J189", "code_dot": "J18.9", "billable": True, "description": "Pneumonia, unspecified organism",
         "parent": {"code": "J18", "description": "Pneumonia, unspecified organism"}, "category": None,
         "unique_description": True},
        {"id": "E11", "code_dot": "E11", "billable": False, "description": "Type 2 diabetes mellitus",
         "parent": None, "category": None, "unique_description": True, "children": 3,
         "first_child": {"code": "E11.0", "description": "Type 2 diabetes mellitus with hyperosmolarity"}},
        {"id": "I10", "code_dot": "I10", "billable": True, "description": "Essential (primary) hypertension",
         "parent": None, "category": None, "unique_description": True},
        {"id": "A207", "code_dot": "A20.7", "billable": True, "description": "Septicemic plague",
         "parent": {"code": "A20", "description": "Plague"}, "category": None, "unique_description": True},
        {"id": "R509", "code_dot": "R50.9", "billable": True, "description": "Fever, unspecified",
         "parent": {"code": "R50", "description": "Fever of other and unknown origin"}, "category": None,
         "unique_description": True},
    ]
    return [ex for r in records for ex in source.examples(r)]


def icd10_split(n: int) -> list[dict]:
    """The examples of `n` made-up billable codes, with ids as a split's rows have them."""
    source = Icd10cmSource("icd10cm", {})
    return [{**ex, "id": f"J{k:03d}:{ex['task']}"} for k in range(n) for ex in source.examples(
        {"id": f"J{k:03d}", "code_dot": f"J{k // 10}{k % 10}.{k % 7}", "billable": True,
         "description": f"Disorder number {k}", "parent": None, "category": None, "unique_description": True})]


def news2_rows(n: int = 6) -> list[dict]:
    source = News2Source("news2", {})
    return [ex for i in range(n) for ex in source.examples(generate_patient(7, i))]


def gold(row: dict) -> str:
    return row["messages"][-1]["content"]


def test_gold_answers_score_perfectly_and_are_read_back():
    for row in icd10_rows() + news2_rows():
        if scored_tasks()[row["task"]].score:
            metrics = score(row["task"], gold(row), gold(row))
            headline = {k: v for k, v in metrics.items() if k != "aggregate_mae"}
            assert headline and all(v == 1.0 for v in headline.values()), (row["task"], metrics)
    # the gold NEWS2 answer states the chart's own aggregate and band
    source = News2Source("news2", {})
    patient = generate_patient(7, 3)
    chart = news2.score(patient["vitals"])
    for row in source.examples(patient):
        assert news2.parse_answer(gold(row)) == (chart.aggregate, chart.band)


def test_news2_generated_answers_are_compared_with_the_chart():
    row = news2_rows(1)[0]
    want_agg, want_band = news2.parse_answer(gold(row))
    wrong_band = next(b for b in news2.BANDS if b != want_band)
    off = score("news2_score", gold(row),
                f"Aggregate NEWS2 score: {want_agg + 2}\nClinical risk: {wrong_band}.")
    assert off == {"stated_rate": 1.0, "aggregate_accuracy": 0.0, "band_accuracy": 0.0, "aggregate_mae": 2.0,
                   "points_accuracy": 0.0}
    silent = score("news2_score", gold(row), "The patient seems unwell.")
    assert silent == {"stated_rate": 0.0, "aggregate_accuracy": 0.0, "band_accuracy": 0.0, "points_accuracy": 0.0}
    assert evaluate.mean_metrics([off, silent]) == {"aggregate_accuracy": 0.0, "aggregate_mae": 2.0,
                                                    "band_accuracy": 0.0, "points_accuracy": 0.0, "stated_rate": 0.5}


def test_news2_points_per_parameter_are_read_from_either_answer_form():
    """news2_score states all seven parameters' points on chart lines; news2_response names those that score."""
    patient = generate_patient(7, 4)
    chart = news2.score(patient["vitals"])
    score_row, response_row = News2Source("news2", {}).examples(patient)
    assert news2.stated_points(gold(score_row)) == news2.stated_points(gold(response_row)) == chart.points
    # one parameter off by one, the rest right: 6 of 7, in either form and against either gold answer
    wrong = dict(chart.points, pulse=chart.points["pulse"] + 1)
    lines = "\n".join(f"- {news2.LABELS[k]}: x -> {v} points" for k, v in wrong.items())
    scoring = "Scoring: " + ", ".join(f"{news2.LABELS[k]} {v}" for k, v in wrong.items() if v) + "."
    for answer in (lines, scoring):
        for row in (score_row, response_row):
            assert news2.grade(gold(row), answer)["points_accuracy"] == pytest.approx(6 / 7), answer


def test_icd10_exact_match_reads_codes_descriptions_and_parents():
    rows = {(r["task"], r["messages"][0]["content"]): r for r in icd10_rows()}
    describe = rows[("icd10_describe", "What does ICD-10-CM code J18.9 describe?")]
    assert score("icd10_describe", gold(describe),
                 "ICD-10-CM J18.9: pneumonia, unspecified organism. It is billable.")["exact_match"] == 1
    assert score("icd10_describe", gold(describe),
                 "ICD-10-CM J18.9: Viral pneumonia. It is billable.")["exact_match"] == 0
    code = rows[("icd10_code", "What is the ICD-10-CM code for: Septicemic plague?")]
    assert score("icd10_code", gold(code), "A20.7 (Septicemic plague)")["exact_match"] == 1
    assert score("icd10_code", gold(code), "A20.9 (Plague)")["exact_match"] == 0
    parent = rows[("icd10_parent", "What is the parent category of ICD-10-CM code R50.9?")]
    assert score("icd10_parent", gold(parent),
                 "The parent of R50.9 (Fever) is R50: Fever.")["exact_match"] == 1
    assert score("icd10_parent", gold(parent), "It is R51.")["exact_match"] == 0


def test_icd10_parent_category_is_scored_apart_from_the_parent():
    rows = {(r["task"], r["messages"][0]["content"]): r for r in icd10_rows()}
    parent = gold(rows[("icd10_parent", "What is the parent category of ICD-10-CM code R50.9?")])
    assert icd10cm.stated_category(parent) == "R50"  # "That is its 3-character category": the parent is it
    wrong_parent = "The parent of R50.9 is R50.8: Other fever. Its 3-character category is R50: Fever."
    assert icd10cm.score_parent(parent, wrong_parent) == {"exact_match": 0.0, "category_accuracy": 1.0}
    assert icd10cm.score_parent(parent, "The parent of R50.9 is R50. Its 3-character category is R51.") == \
        {"exact_match": 1.0, "category_accuracy": 0.0}
    assert icd10cm.score_parent(parent, "It is a fever.") == {"exact_match": 0.0, "category_accuracy": 0.0}


def test_choice_questions_from_icd10_and_mcq_rows():
    mcq = {"task": "medqa_mcq", "messages": [
        {"role": "user", "content": "Which drug?\n\nA. Aspirin\nB. Heparin\nC. Warfarin\n\nAnswer with the letter."},
        {"role": "assistant", "content": "B. Heparin\n\nExplanation: ..."}]}
    rows = icd10_rows() + [mcq]
    choices = evaluate.choices_for(rows)
    by_task = {}
    for q in choices:
        by_task.setdefault(q["task"], []).append(q)
    assert set(by_task) == {"icd10_code", "icd10_billable", "medqa_mcq"}
    (m,) = by_task["medqa_mcq"]
    assert m["options"] == ["A. Aspirin", "B. Heparin", "C. Warfarin"] and m["gold"] == 1
    for q in by_task["icd10_code"]:
        code = icd10cm.first_code(gold(rows[q["index"]]))
        assert len(q["options"]) == 1 + icd10cm.N_DISTRACTORS and q["options"][q["gold"]] == code
        assert len(set(q["options"])) == len(q["options"])
    billable = {gold(rows[q["index"]])[:3]: q["options"][q["gold"]] for q in by_task["icd10_billable"]}
    assert billable == {"Yes": "Yes", "No.": "No"}
    assert evaluate.choices_for(rows) == choices  # fixed distractors: the same questions every run

    # the gold option scoring highest is right; accuracy is per task
    loglik = [[0.0 if i == q["gold"] else -5.0 for i in range(len(q["options"]))] for q in choices]
    loglik[-1] = [0.0, -1.0, -2.0]  # the mcq picks A, gold is B
    correct = evaluate.choice_correct(choices, loglik)
    assert set(correct["icd10_code"]) == {1.0} and correct["medqa_mcq"] == [0.0]


def test_a_row_is_asked_the_same_question_in_every_sample_of_its_split():
    """eval scores a sample of the test split, another adapter's eval a smaller one, the export a subset of eval's:
    their figures pair by row id only if each row is asked one question. ICD-10 distractors are other codes of the
    rows given, so asked of each sample alone a row's options change with the sample; asked against the split, not."""
    split = icd10_split(60)
    sample = evaluate.spread_sample(split, 120)
    subset = evaluate.spread_sample(sample, 40)

    def by_id(rows, pool=None):
        return {rows[q["index"]]["id"]: (q["task"], q["options"], q["gold"]) for q in evaluate.choices_for(rows, pool)}

    whole, of_sample, of_subset = by_id(split), by_id(sample, split), by_id(subset, split)
    code_questions = [i for i, (task, _, _) in of_subset.items() if task == "icd10_code"]
    assert len(code_questions) >= 5 and set(of_subset) <= set(of_sample) <= set(whole)
    assert all(of_subset[i] == of_sample[i] == whole[i] for i in of_subset)
    alone = by_id(subset)  # the fault this guards against: the subset's own codes as distractors
    assert any(alone[i] != whole[i] for i in code_questions)
    # the indexes are the sample's own, in its order
    assert [q["index"] for q in evaluate.choices_for(subset, split)] == sorted(
        subset.index(next(r for r in subset if r["id"] == i)) for i in of_subset)


def test_regressions_are_off_domain_and_directional():
    matrix = {
        "own": {"base_ppl": 10.0, "adapter_ppl": 20.0, "metrics": {}},
        "other": {"base_ppl": 10.0, "adapter_ppl": 12.0, "metrics": {
            "news2_score": {"kind": "generated", "n": 4,
                            "base": {"aggregate_accuracy": 0.5, "aggregate_mae": 1.0, "band_accuracy": 0.5},
                            "adapter": {"aggregate_accuracy": 0.25, "aggregate_mae": 0.5, "band_accuracy": 0.75}}}},
    }
    found = {(r["split"], r["task"], r["metric"]) for r in evaluate.regressions(matrix, "own")}
    assert found == {("other", "all", "ppl"), ("other", "news2_score", "aggregate_accuracy")}


def test_end_of_turn_is_the_last_trained_token():
    from tests.models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    assert tokenizer.convert_ids_to_tokens(evaluate.end_of_turn_id(tokenizer)) == "<|im_end|>"


@pytest.mark.parametrize("text,code", [("A20.7 (Septicemic plague)", "A20.7"), ("code: E11", "E11"),
                                       ("no code here", None)])
def test_first_code(text, code):
    assert icd10cm.first_code(text) == code


class _Oracle:
    """A causal LM stand-in that predicts the next token of the sequence it was built for, except at `wrong`
    positions (it predicts token 0 there): cloze scoring must count exactly the spans those positions touch."""

    def __init__(self, ids: list[int], wrong: set[int], vocab: int):
        import torch

        self.logits = torch.zeros(len(ids), vocab)
        for p in range(len(ids) - 1):
            self.logits[p, 0 if p + 1 in wrong else ids[p + 1]] = 1.0

    def get_decoder(self):
        from types import SimpleNamespace
        return lambda input_ids, attention_mask=None: SimpleNamespace(last_hidden_state=self.logits[None])

    def get_output_embeddings(self):
        return lambda hidden: hidden


def test_cloze_spans_mark_the_tokens_that_carry_the_answer_and_count_greedy_hits():
    from stages.train.hardware import Hardware
    from tests.models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    rows = news2_rows(3) + [r for r in icd10_rows() if r["task"] == "icd10_describe"][:2] \
        + [r for r in icd10_rows() if r["task"] == "icd10_parent"][:2]
    examples = evaluate.cloze_examples(tokenizer, rows)
    assert [e.task for e in examples] == [r["task"] for r in rows] and [e.row for e in examples] == list(range(len(rows)))
    for (task, ids, marked, _), row in zip(examples, rows):
        spans = scored_tasks()[task].cloze(gold(row))
        for (metric, positions), (name, start, end) in zip(marked, spans):
            assert metric == name and gold(row)[start:end] in tokenizer.decode(ids[positions[0]:positions[-1] + 1])
    hw = Hardware("cpu", "fp32", "test")
    task, ids, marked, _ = examples[0]
    assert evaluate.cloze_hits(_Oracle(ids, set(), len(tokenizer)), [examples[0]], hw) == [
        {"cloze_points": 1.0, "cloze_aggregate": 1.0, "cloze_band": 1.0}]
    first_points = marked[0][1][0]  # one parameter's points mispredicted: 6 of 7 right, the rest untouched
    hits = evaluate.cloze_hits(_Oracle(ids, {first_points}, len(tokenizer)), [examples[0]], hw)[0]
    assert hits == {"cloze_points": pytest.approx(6 / 7), "cloze_aggregate": 1.0, "cloze_band": 1.0}
    task, ids, marked, _ = examples[-1]  # icd10_parent: the parent right, the category wrong
    category = dict(marked)["cloze_category"]
    wrong = set(category) - set(dict(marked)["cloze_parent"]) or set(category)
    hits = evaluate.cloze_hits(_Oracle(ids, wrong, len(tokenizer)), [examples[-1]], hw)[0]
    assert hits["cloze_category"] == 0.0


def test_eval_samples_a_split_spread_over_it_in_file_order():
    rows = [{"id": f"icd10cm:{chapter}{i:03d}", "task": "icd10_code"} for chapter in "ABCDEFGHIJ" for i in range(100)]
    picked = evaluate.spread_sample(rows, 200)
    assert len(picked) == 200 and picked == evaluate.spread_sample(list(rows), 200)  # the same in every eval
    assert picked == [r for r in rows if r in picked]                                # file order kept
    assert len({r["id"][8] for r in picked}) == 10 and picked != rows[:200]           # every chapter, not the first
    assert evaluate.spread_sample(rows, 0) == rows and evaluate.spread_sample(rows[:5], 200) == rows[:5]


def test_batched_cloze_scoring_equals_one_example_at_a_time(tmp_path):
    """Cloze rows of different lengths, right-padded into one batch, get the hits each gets alone."""
    from transformers import AutoModelForCausalLM

    from stages.train.hardware import Hardware
    from tests.models import make_tiny_model, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(tmp_path / "tiny")))
    model.eval()
    rows = news2_rows(3) + [r for r in icd10_rows() if r["task"] == "icd10_parent"]
    examples = evaluate.cloze_examples(tokenizer, rows)
    assert len({len(e.ids) for e in examples}) > 2
    hw = Hardware("cpu", "fp32", "test")
    alone = evaluate.cloze_guesses(model, examples, hw, batch_tokens=1)
    assert evaluate.cloze_guesses(model, examples, hw, batch_tokens=10_000) == alone  # all in one batch
    import torch
    for example, guess in zip(examples, alone):  # each the argmax of a plain forward of that example alone
        logits = model(torch.tensor([example.ids])).logits[0]
        assert guess == {p: int(logits[p - 1].argmax()) for p in evaluate.wanted_positions(example)}


def test_cloze_read_from_the_perplexity_pass_equals_a_pass_of_its_own(tmp_path):
    """eval scores cloze from the perplexity pass's greedy tokens (one forward for both): the same hits as
    a cloze pass of its own; a row the pass cannot serve (cut at max_length) gets a pass of its own."""
    from transformers import AutoModelForCausalLM

    from stages.train import format as fmt
    from stages.train import torch_backend
    from stages.train.hardware import Hardware
    from tests.models import make_tiny_model, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(tmp_path / "tiny")))
    hw = Hardware("cpu", "fp32", "test")
    rows = news2_rows(3) + [r for r in icd10_rows() if r["task"] in ("icd10_parent", "icd10_describe")]
    cloze = evaluate.cloze_examples(tokenizer, rows)
    own = evaluate.cloze_hits(model, cloze, hw)
    assert any(0 < v < 1 for h in own for v in h.values()) or len({str(h) for h in own}) > 1  # not all alike

    class Judge:  # the rows the pass cannot serve, scored apart as eval's Judge does (base, adapter)
        apart: list = []

        def cloze(self, examples):
            self.apart += examples
            hits = evaluate.cloze_hits(model, examples, hw)
            return hits, hits

    for max_length in (10_000, 200):  # 200: the NEWS2 rows' answers are cut, icd10's are whole
        encoded = {row: e for row, (e, _) in enumerate(fmt.encode_stream(tokenizer, rows, max_length))
                   if e.n_trained}
        passed = torch_backend.nll_by_example(model, list(encoded.values()), tokenizer.pad_token_id, hw,
                                              guesses=True)
        assert [p[:2] for p in passed] == pytest.approx(
            torch_backend.nll_by_example(model, list(encoded.values()), tokenizer.pad_token_id, hw))
        judge = Judge()
        base, adapter = evaluate.cloze_from_pass(judge, cloze, list(encoded), list(encoded.values()), passed, passed)
        assert base == adapter == own
        cut = {c.row for c in cloze if len(c.ids) > max_length}
        assert {c.row for c in judge.apart} == cut and (cut or max_length > 1000)


def test_options_sharing_their_prompt_score_as_each_option_alone(tmp_path):
    """eval scores a question's options as one row (the prompt once, each option seeing the prompt and
    itself): every option's summed NLL equals a forward of prompt + that option alone."""
    from transformers import AutoModelForCausalLM

    from stages.train import torch_backend
    from stages.train.format import Encoded
    from stages.train.hardware import Hardware
    from tests.models import make_tiny_model, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(tmp_path / "tiny")))
    hw = Hardware("cpu", "fp32", "test")
    rows = icd10_rows()
    choices = evaluate.choices_for(rows)
    examples = evaluate.choice_examples(tokenizer, rows, choices)
    assert {len(q["options"]) for q in choices} == {2, 4} and len({len(e.input_ids) for e in examples}) > 3
    alone = torch_backend.nll_by_example(model, examples, tokenizer.pad_token_id, hw, batch_tokens=1)
    for batch_tokens in (1, 100, 10_000):  # a question per batch, a few, all at once
        shared = evaluate.shared_prompt_nll(model, examples, hw, batch_tokens=batch_tokens)
        assert [c for _, c in shared] == [c for _, c in alone]
        assert [s for s, _ in shared] == pytest.approx([s for s, _ in alone], rel=1e-4)
    with pytest.raises(ValueError, match="example 0"):
        evaluate.shared_prompt_nll(model, [Encoded([1, 2, 3], [1, 2, 3])], hw)


def test_news2_answers_are_complete_where_generation_may_stop():
    for row in news2_rows(6):
        text = gold(row)
        cut = next(i for i in range(len(text) + 1) if news2.answered(text[:i]))
        assert cut < len(text) and news2.grade(text, text[:cut]) == news2.grade(text, text)
    assert not news2.answered("Aggregate NEWS2 score: 5\nClinical risk: low")  # may still become low-medium
    assert news2.answered("Aggregate NEWS2 score: 5\nClinical risk: low-medium\n")
    assert not news2.answered("Clinical risk: high\n")


def test_icd10_answers_are_complete_where_generation_may_stop():
    """Generation of an ICD-10 answer stops once what its score reads is settled: the score of the answer cut
    there equals the whole answer's, nothing appended can change it, and the cut saves tokens."""
    deep = {"id": "T360X1A", "code_dot": "T36.0X1A", "billable": True, "description": "Poisoning by penicillins",
            "parent": {"code": "T36.0X1", "description": "Poisoning by penicillins, accidental"},
            "category": {"code": "T36", "description": "Poisoning by systemic antibiotics"},
            "unique_description": True}
    rows = icd10_rows() + list(Icd10cmSource("icd10cm", {}).examples(deep))
    endings = ["", ".", ".1", "1", "X", " It is Z99.9.", ". It is A00.", "\nThe parent of A00.0 is A00.1. Its "
               "3-character category is B99.", " Its 3-character category is B99. That is its 3-character category."]
    cut_short = set()
    for row in rows:
        task = scored_tasks()[row["task"]]
        if task.answered is None:
            continue
        text = gold(row)
        cut = next((i for i in range(len(text) + 1) if task.answered(text[:i])), None)
        if cut is None:  # the parent is the category: "That is its 3-character category" ends at the end of turn
            assert row["task"] == "icd10_parent" and icd10cm.stated_category(text) == icd10cm.parent_code(text)
            continue
        assert task.score(text, text[:cut]) == task.score(text, text), (row["task"], text[:cut])
        for ending in endings:
            assert task.score(text, text[:cut] + ending) == task.score(text, text[:cut]), (text[:cut], ending)
        if cut < len(text) - 1:
            cut_short.add(row["task"])
    assert cut_short == {"icd10_code", "icd10_describe", "icd10_parent"}
    unsettled = {"icd10_code": ["A20", "A20.", "A20.7", "The code is"],
                 "icd10_describe": ["ICD-10-CM A20.7: Plague. It is", "ICD-10-CM A20.7: Plague. "],
                 "icd10_parent": ["The parent of A20.7 is A20.", "The parent of T36.0X1A is T36.0X1. Its 3-character "
                                  "category is T36", "The parent of A20.7 is A20: Plague. That is its 3-character "
                                  "category."]}
    for task, answers in unsettled.items():
        assert not any(scored_tasks()[task].answered(a) for a in answers), task
    assert icd10cm.code_answered("A20. ") and icd10cm.code_answered("A20.7 (") and icd10cm.code_answered("A20.7.")


def test_generation_stops_each_reply_once_answered():
    """Replies of one batch stop where `answered` says, each on its own; what they hold is the start of the
    unstopped greedy reply (the embedded SmolLM2: a random tiny model only repeats a newline)."""
    from transformers import AutoModelForCausalLM

    from stages.train.hardware import Hardware
    from tests.models import smollm2_base_dir, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_base_dir())).eval()
    hw, eot = Hardware("cpu", "fp32", "test"), evaluate.end_of_turn_id(tokenizer)
    chats = [[{"role": "user", "content": q}] for q in ("Hi", "What is NEWS2?", "Code for cholera, please?")]
    full = evaluate.generate(model, tokenizer, chats, 24, hw, eot)
    words = [len(r.split()) for r in full]
    assert min(words) >= 4
    need = {r: 2 + i for i, r in enumerate(full)}  # each reply its own stopping point

    def answered(reply: str) -> bool:
        return any(len(reply.split()) > need[f] and f.startswith(reply.strip()) for f in full)

    stopped = evaluate.generate(model, tokenizer, chats, 24, hw, eot, answered)
    for reply, whole in zip(stopped, full):
        assert whole.startswith(reply) and len(reply) < len(whole)
    # a stop rule per conversation (questions of several tasks in one batch): the one without runs on
    assert evaluate.generate(model, tokenizer, chats, 24, hw, eot, [answered, None, answered]) == \
        [stopped[0], full[1], stopped[2]]


def test_batched_generation_gives_each_conversation_its_own_greedy_reply(monkeypatch):
    """Replies of different lengths share a left-padded batch and leave it as they end; each is what transformers'
    greedy `generate` makes of its conversation alone, and the same whether the KV budget holds one row or all and
    whether the prompts are prefilled in one pass or one at a time (caches joined)."""
    from transformers import AutoModelForCausalLM

    from stages.train.hardware import Hardware
    from tests.models import smollm2_base_dir, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_base_dir())).eval()
    hw, eot = Hardware("cpu", "fp32", "test"), evaluate.end_of_turn_id(tokenizer)
    chats = [[{"role": "user", "content": q}] for q in
             ("Hi", "Say only: yes.", "What is NEWS2? Explain the whole chart, parameter by parameter.", "2+2=?")]
    batched = evaluate.generate(model, tokenizer, chats, 40, hw, eot)
    made = []  # each conversation's greedy tokens alone
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, eos_token_id=eot,
                             pad_token_id=tokenizer.pad_token_id)
        made.append(out[0, ids["input_ids"].shape[1]:])
    alone = [tokenizer.decode(m, skip_special_tokens=True).strip() for m in made]
    lengths = [len(tokenizer(r)["input_ids"]) for r in alone]
    assert min(lengths) < 20 and max(lengths) >= 39  # some end early, one runs to the limit
    assert batched == alone
    # a token limit per conversation (the safety suite's and the samples' in one batch): each reply stops at its own
    limits = [40, 3, 9, 40]
    cut = [tokenizer.decode(m[:limit], skip_special_tokens=True).strip() for m, limit in zip(made, limits)]
    assert cut != alone and evaluate.generate(model, tokenizer, chats, limits, hw, eot) == cut
    monkeypatch.setattr(evaluate, "EVAL_BATCH_TOKENS", 1)  # all four in one batch, each prompt prefilled alone
    assert evaluate.generate(model, tokenizer, chats, 40, hw, eot) == alone
    monkeypatch.setattr(evaluate, "GEN_KV_BYTES", 1)  # one conversation per batch
    assert evaluate.generate(model, tokenizer, chats, 40, hw, eot) == alone


def test_a_users_own_task_is_scored_by_exact_match_and_token_f1_after_normalization():
    """local_files rows carry task names the user chose: eval scores them by answer match (SQuAD's normalization),
    rates with intervals like every scored task; rows of a named task keep their source's own scorer."""
    from stages.sources import task_of
    from stages.sources.local_files import answer_match

    assert answer_match("BID means twice daily.", "bid means twice daily") == {"exact_match": 1.0, "token_f1": 1.0}
    assert answer_match("BID means twice daily.", "It means twice a day.") == {"exact_match": 0.0, "token_f1": 0.5}
    assert answer_match("The answer is PRN.", "") == {"exact_match": 0.0, "token_f1": 0.0}
    assert answer_match("An apple", "the APPLE!") == {"exact_match": 1.0, "token_f1": 1.0}
    mine = {"task": "abbreviations", "provenance": {"kind": "local_files"}}
    assert task_of(mine).score is answer_match and {"exact_match", "token_f1"} <= evaluate.HIGHER_IS_BETTER
    assert task_of({**mine, "task": "news2_score"}) is scored_tasks()["news2_score"]
    assert task_of({"task": "abbreviations", "provenance": {"kind": "news2"}}) is None  # a source's unknown task
    assert task_of({"task": "abbreviations"}) is None
