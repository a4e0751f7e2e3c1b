"""Cleaning: text transforms, drop reasons, token counting, and the counts dedup reports."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages import clean, config, dedup, io, layout


def chat(question: str, answer: str, rid: str = "r1", source: str = "qa", task: str = "qa") -> dict:
    return {"id": f"{source}:{rid}:{task}", "source": source, "task": task,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "provenance": {"source": source, "source_id": rid}}


def test_unicode_markup_boilerplate_and_whitespace():
    cleaner = clean.Cleaner()
    page = ("<div><nav>Home | Topics | About</nav><p>Asthma&nbsp;is a <b>chronic</b>\u200b disease.</p>"
            "<ul><li>wheeze</li><li>cough</li></ul><script>track()</script>"
            "<p>Copyright 2024 Example Health. All rights reserved.</p></div>")
    assert cleaner.text(page) == "Asthma is a chronic disease.\n\n- wheeze\n- cough"
    text = "ｆｅｖｅｒ   of 39 ℃\r\n\r\n\r\n\r\nSkip to main content\nThis article is protected by copyright.\n  indented   line  "
    assert cleaner.text(text) == "fever of 39 °C\n\n  indented line"
    assert cleaner.changes["markup"] == 1 and cleaner.changes["boilerplate_lines"] >= 3
    # comparisons are not tags, and a sentence that mentions copyright inside a paragraph stays
    kept = "Give it if SpO2 <92 and RR >24.\nThe copyright of the scale belongs to the RCP, who publish it for free use in the NHS and beyond."
    assert clean.Cleaner().text(kept) == kept


def test_contacts_are_scrubbed_only_for_community_sources():
    row = chat("Mail me at jane.doe@example.org or call +1 (555) 123-4567.", "Dose 500-1000 mg on 2019-05-01.")
    settings = {"scrub_contacts": ["stackexchange"], "min_tokens": 1, "max_tokens": 1000}
    counter = clean.TokenCounter("x", "word-estimate")
    rows, reasons, changes = clean.clean_rows([row], "stackexchange", settings, counter)
    assert rows[0]["messages"][0]["content"] == "Mail me at [email] or call [phone]."
    assert rows[0]["messages"][1]["content"] == "Dose 500-1000 mg on 2019-05-01."
    assert reasons == [None] and changes["contacts"] == 2
    rows, _, changes = clean.clean_rows([row], "pubmed", settings, counter)
    assert "jane.doe@example.org" in rows[0]["messages"][0]["content"] and "contacts" not in changes


def test_every_drop_has_a_reason():
    settings = {"min_tokens": 6, "max_tokens": 60, "scrub_contacts": []}
    rows = [
        chat("What is the NEWS2 score for RR 25?", "3 points for respiration."),  # fine
        chat("What is   asthma?", "what is asthma"),                                # echo (case/space/punct)
        chat("Question?", "<p> </p>"),                                               # empty after markup
        {"id": "x", "messages": [{"role": "user", "content": "only a question"}]},    # no answer
        {"id": "y", "source": "s"},                                                  # neither messages nor text
        chat("Hi?", "Ok."),                                                          # too short
        chat("Explain " + "very " * 80, "Because."),                                 # too long
    ]
    _, reasons, _ = clean.clean_rows(rows, "news2", settings, clean.TokenCounter("x", "word-estimate"))
    assert reasons == [None, "echo", "empty", "empty", "invalid", "too_short", "too_long"]


def test_word_estimate_is_documented_and_a_built_tokenizer_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = "./base"
    counter = clean.token_counter(spec)
    assert counter.kind == "word-estimate" and "doit base_model" in counter.describe()["note"]
    assert counter.count(["one two three, four."]) == [(4 * 4 + 2) // 3 + 2]
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "one": 1, "two": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "base").mkdir()
    tok.save(str(tmp_path / "base" / "tokenizer.json"))
    counter = clean.token_counter(spec)
    assert counter.kind == "tokenizer" and counter.describe()["counter"] == "tokenizer"
    assert counter.count(["one two three, four.", ""]) == [6, 0]


def test_tokenizer_counts_are_cached_per_text(tmp_path, monkeypatch):
    """dedup counts every example; split then reads the same texts' counts from data/cache instead of re-tokenizing."""
    monkeypatch.chdir(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "one": 1, "two": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "base").mkdir()
    tok.save(str(tmp_path / "base" / "tokenizer.json"))
    texts = ["one two three, four.", "", "two two", "one two three, four."]
    first = clean.token_counter("./base")
    assert first.count(texts) == [6, 0, 2, 6]
    assert len(list((tmp_path / "data" / "cache").glob("tokens-*.npz"))) == 1

    second = clean.token_counter("./base")  # a later stage: every text is known, nothing is tokenized

    def no_tokenizing(batch):
        raise AssertionError(f"tokenized {batch}")

    second._encode = no_tokenizing
    assert second.count(texts[::-1]) == [6, 2, 0, 6]
    calls = []
    second._encode = lambda batch: calls.append(list(batch)) or [len(t.split()) for t in batch]
    assert second.count(["two two", "new text here", "new text here"]) == [2, 3, 3]
    assert calls == [["new text here"]]  # only the unseen text, once
    # another tokenizer file is another cache
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "three," and "four." are one token each now
    tok.save(str(tmp_path / "base" / "tokenizer.json"))
    assert clean.token_counter("./base").count(["one two three, four."]) == [4]
    assert len(list((tmp_path / "data" / "cache").glob("tokens-*.npz"))) == 2


SOURCES = """
[dedup]
source_priority = ["vitals"]

[clean]
min_tokens = 6
max_tokens = 200
scrub_contacts = ["news2"]

[sources.vitals]
kind = "news2"
adapters = ["decide"]
"""


def test_dedup_cleans_first_and_counts_drops_by_reason(tmp_path, monkeypatch):
    (tmp_path / "sources.toml").write_text(SOURCES)
    (tmp_path / "adapters" / "decide").mkdir(parents=True)
    (tmp_path / "adapters" / "decide" / "adapter.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    rows = [chat(f"<p>Patient {i}: score the vitals RR {10 + i}, SpO2 {90 + i % 9}%.</p>",
                 f"Score {i % 7}; ring 555 123 4567 for help.", rid=f"p{i}", source="vitals") for i in range(6)]
    rows.append(chat("Same?", "same", rid="echo", source="vitals"))
    rows.append(chat("Hi?", "Ok.", rid="short", source="vitals"))
    io.write_jsonl(layout.examples_file("vitals"), rows)
    report = dedup.run(config.load())
    stats = report["sources"]["vitals"]
    assert stats["in"] == 8 and stats["dropped"] == {"echo": 1, "too_short": 1} and stats["kept"] == 6
    assert stats["cleaned"]["markup"] == 6 and stats["cleaned"]["contacts"] == 6
    assert report["cleaning"]["dropped_examples"]["echo"] == ["vitals:echo:qa"]
    assert report["cleaning"]["tokens"]["counter"] == "word-estimate"
    assert report["total"]["dropped"] == 2
    kept = list(io.read_jsonl(layout.dedup_file()))
    assert kept[0]["messages"][0]["content"] == "Patient 0: score the vitals RR 10, SpO2 90%."
    assert kept[0]["messages"][1]["content"] == "Score 0; ring [phone] for help."
    # a cached run decides the same and still writes cleaned text
    again = dedup.run(config.load())
    assert again["sources"]["vitals"]["signatures"] == "cached"
    assert list(io.read_jsonl(layout.dedup_file())) == kept
    # changing the cleaning settings recomputes
    (tmp_path / "sources.toml").write_text(SOURCES.replace("min_tokens = 6", "min_tokens = 1"))
    third = dedup.run(config.load())
    assert third["sources"]["vitals"]["signatures"] == "computed" and third["sources"]["vitals"]["kept"] == 7
