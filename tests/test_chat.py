"""`medforge chat` and stream_chat on the exported tiny project (real GGUFs, real llama-cpp-python).
Tests marked slow share one exported project (tests/gguf_project.py), about a minute to build per session.
"""
from __future__ import annotations

import shutil
import threading
import time

import pytest

from stages import chat, layout
from stages.cli import main
from stages.errors import StageError
from tests.gguf_project import ADAPTER, UNTRAINED, exported_project, make_lora, write_project

QUESTION = "Score NEWS2 for RR 24, SpO2 93, HR 115."


@pytest.fixture()
def project(monkeypatch):
    from stages import config

    root = exported_project()
    monkeypatch.chdir(root)
    yield config.load(root)
    chat.ChatModel.clear()


@pytest.mark.slow
def test_chat_cli_streams_an_answer_from_base_plus_lora(project, capsys):
    assert main(["chat", "--adapter", ADAPTER, "--max-tokens", "12", QUESTION]) == 0
    printed = capsys.readouterr().out
    assert printed.strip()
    messages = [{"role": "user", "content": QUESTION}]
    assert chat.choose_model(project, ADAPTER).lora == layout.lora_gguf(ADAPTER)
    # the CLI prints exactly what the streaming API yields (greedy: deterministic)
    assert printed == "".join(chat.stream_chat(project, ADAPTER, messages, max_tokens=12)) + "\n"
    base_answer = "".join(chat.stream_chat(project, None, messages, max_tokens=12))
    assert base_answer != printed.rstrip("\n")  # the adapter changes the answer
    assert printed.rstrip("\n") == hf_peft_greedy(project, messages, 12)


def hf_peft_greedy(cfg, messages, max_tokens: int) -> str:
    """The reference: transformers + peft, greedy, on the tokenizer's own chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = layout.lora_dir(ADAPTER)
    tokenizer = AutoTokenizer.from_pretrained(str(lora))
    model = AutoModelForCausalLM.from_pretrained(cfg.adapters[ADAPTER].base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(lora)).eval()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_chat_cli_reads_the_prompt_from_stdin(project, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n"))
    assert main(["chat", "--adapter", ADAPTER, "--max-tokens", "12"]) == 0
    from_stdin = capsys.readouterr().out
    assert main(["chat", "--adapter", ADAPTER, "--max-tokens", "12", QUESTION]) == 0
    assert from_stdin == capsys.readouterr().out


@pytest.mark.slow
def test_chat_cli_names_the_missing_export_and_its_task(project, capsys):
    assert main(["chat", "--adapter", UNTRAINED, "hello"]) == 2
    err = capsys.readouterr().err
    assert str(layout.lora_gguf(UNTRAINED)) in err and f"doit export:{UNTRAINED}" in err
    assert main(["chat", "--adapter", "nope", "hello"]) == 2
    assert "unknown adapter 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_stream_chat_stops_promptly(project):
    stop = threading.Event()
    pieces = []
    messages = [{"role": "user", "content": QUESTION}]
    for piece in chat.stream_chat(project, ADAPTER, messages, max_tokens=200, temperature=0.8, stop=stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert len(pieces) == 3
    # the model is free again right away: the stream released its lock
    assert "".join(chat.stream_chat(project, ADAPTER, messages, max_tokens=4))


@pytest.mark.slow
def test_merged_gguf_answers_when_lora_gguf_is_missing(project, monkeypatch, tmp_path):
    moved = tmp_path / "lora.gguf"
    shutil.move(layout.lora_gguf(ADAPTER), moved)
    try:
        assert chat.choose_model(project, ADAPTER).model == layout.merged_gguf(ADAPTER, "q8_0")
        assert "".join(chat.stream_chat(project, ADAPTER, [{"role": "user", "content": QUESTION}], max_tokens=8))
    finally:
        shutil.move(moved, layout.lora_gguf(ADAPTER))


@pytest.mark.slow
def test_an_adapters_merged_quant_answers_by_its_serve_name(project, capsys):
    """`--adapter <adapter>:<quant>` (serve's model id) chats with that merged GGUF alone, what Ollama users run; a
    quant not exported or not a quant type is one line naming the fix."""
    assert chat.choose_model(project, f"{ADAPTER}:q8_0") == chat.ModelChoice("gguf", layout.merged_gguf(ADAPTER, "q8_0"))
    assert main(["chat", "--adapter", f"{ADAPTER}:q8_0", "--max-tokens", "8", QUESTION]) == 0
    messages = [{"role": "user", "content": QUESTION}]
    assert capsys.readouterr().out == "".join(chat.stream_chat(project, f"{ADAPTER}:q8_0", messages, max_tokens=8)) + "\n"
    assert main(["chat", "--adapter", f"{ADAPTER}:q4_k_m", "hello"]) == 2
    err = capsys.readouterr().err
    assert f'add "q4_k_m" to export.merged in {layout.adapter_toml(ADAPTER)}' in err and f"doit export:{ADAPTER}" in err
    assert main(["chat", "--adapter", f"{ADAPTER}:q9", "hello"]) == 2
    assert "q9 is not a quant type" in capsys.readouterr().err
    names = chat.model_names(project)  # the dashboard's ctrl+n: each adapter, then its merged quants
    assert names.index(f"{ADAPTER}:q8_0") == names.index(ADAPTER) + 1


def test_stream_chat_falls_back_to_transformers_before_export(tmp_path, monkeypatch):
    """A freshly trained adapter (no GGUF yet) answers through transformers + peft; stop works there too."""
    from stages import config

    monkeypatch.chdir(tmp_path)
    base = write_project(tmp_path)
    make_lora(base, layout.lora_dir(ADAPTER))
    cfg = config.load(tmp_path)
    with pytest.raises(StageError, match=f"doit export:{ADAPTER}"):
        chat.choose_model(cfg, ADAPTER)  # the CLI wants GGUFs
    choice = chat.choose_model(cfg, ADAPTER, allow_hf=True)
    assert choice.kind == "hf" and choice.lora == layout.lora_dir(ADAPTER)
    messages = [{"role": "user", "content": QUESTION}]
    try:
        answer = "".join(chat.stream_chat(cfg, ADAPTER, messages, max_tokens=8))
        assert answer
        stop = threading.Event()
        started = time.monotonic()
        pieces = []
        for piece in chat.stream_chat(cfg, ADAPTER, messages, max_tokens=500, stop=stop):
            pieces.append(piece)
            stop.set()
        assert len(pieces) == 1 and time.monotonic() - started < 30
    finally:
        chat.ChatModel.clear()


def test_a_long_conversation_keeps_its_system_message_and_newest_turns():
    turn = lambda role, n: {"role": role, "content": f"{role} {n}"}  # noqa: E731
    talk = [turn("system", 0)] + [turn(r, n) for n in range(1, 6) for r in ("user", "assistant")] + [turn("user", 6)]
    lengths = [100] * len(talk)  # each message costs 100 + chat.TURN_TOKENS
    fits = chat.TEMPLATE_TOKENS + 5 * (100 + chat.TURN_TOKENS)
    kept, dropped = chat.fit_turns(talk, lengths, fits)
    # the system message, the two newest question/answer pairs and the last question: whole pairs go, oldest first
    assert [m["content"] for m in kept] == ["system 0", "user 5", "assistant 5", "user 6"] and dropped == 8
    assert chat.fit_turns(talk, lengths, 10_000) == (talk, 0)
    with pytest.raises(StageError, match="the question is about 280 tokens with the chat template"):
        chat.fit_turns([turn("system", 0), turn("user", 1)], [100, 100], 200)


@pytest.mark.slow
def test_a_conversation_longer_than_the_context_is_answered_from_its_newest_turns(project):
    """Through llama.cpp: the answer is the one to the fitted conversation, and the caller is told what was left
    out; a question that alone is too long is one line saying so."""
    long = "Tell me everything about the NEWS2 early warning score on a surgical ward. " * 20
    talk = [m for n in range(6) for m in ({"role": "user", "content": f"{n}. {long}"},
                                          {"role": "assistant", "content": long})]
    talk.append({"role": "user", "content": QUESTION})
    notes: list[str] = []
    answer = "".join(chat.stream_chat(project, ADAPTER, talk, max_tokens=12, notes=notes))
    assert notes and notes[0].endswith(f"left out to fit the {chat.N_CTX:,}-token context"), notes
    dropped = int(notes[0].split()[0])
    assert dropped % 2 == 0 and 0 < dropped < len(talk)
    assert answer == "".join(chat.stream_chat(project, ADAPTER, talk[dropped:], max_tokens=12))
    with pytest.raises(StageError, match="shorten it, or ask for fewer answer tokens"):
        "".join(chat.stream_chat(project, ADAPTER, [{"role": "user", "content": long * 8}], max_tokens=12))
