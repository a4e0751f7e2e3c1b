"""Pilot tests of the chat view with an adapter answering (transformers + peft, before any GGUF exists),
and of the chat process's life: started and ended off the UI thread."""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from stages import layout
from tui.app import MedforgeApp
from tui.messages import ChatDone, ChatToken, MemoryReading

from tests.gguf_project import make_lora
from tests.models import make_tiny_model
from tui_support import make_project, project_env, screen_text, wait_for, wait_sync

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


PROMPT = "Which ICD-10-CM code is type 2 diabetes without complications?"
MAX_TOKENS = 24
# the adapter's own template (what its training used, saved with its LoRA): not the base model's
ADAPTER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'user' %}Answer as a clinical coder. {% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nCode:{% endif %}")


def make_app(root: Path, **kw) -> MedforgeApp:
    return MedforgeApp(root, poll_s=0.5, memory_probe=lambda: MemoryReading([], 1 << 30, 2 << 30), **kw)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The tiny dashboard project whose adapter `tiny` is a peft LoRA on a tiny random Llama (no GGUF)."""
    root = make_project(tmp_path / "proj")
    project_env()
    monkeypatch.chdir(root)
    base = make_tiny_model(root / "base")
    (root / "adapters" / "tiny" / "adapter.toml").write_text(
        f'base_model = "{base}"\n[lora]\nr = 4\nalpha = 8\n[train]\nmax_steps = 12\n')
    lora = layout.lora_dir("tiny")
    make_lora(base, lora)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lora))
    tokenizer.chat_template = ADAPTER_TEMPLATE
    tokenizer.save_pretrained(str(lora))
    return root


def greedy_reply(base: Path, lora: Path | None, template_from: Path, max_tokens: int) -> str:
    """What the model answers PROMPT, greedily, with the chat template of the tokenizer in `template_from`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(template_from))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if lora is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(lora))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.eval().generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def reply_of(pane) -> str:
    return pane.history[-1]["content"] if pane.history and pane.history[-1]["role"] == "assistant" else ""


async def ask(pilot, app, panes, what: str) -> None:
    app.screen.query_one("#chat-input").value = PROMPT
    await pilot.press("enter")
    await wait_for(pilot, lambda: all("tok/s" in p.status or "tokens" in p.status or p.status == "error"
                                      for p in panes), 240, what)
    for pane in panes:
        assert pane.status != "error", pane.query_one("Transcript").text


async def test_an_adapter_answers_alone_and_side_by_side_with_the_base(project, monkeypatch):
    from tui.screens import chat

    monkeypatch.setattr(chat, "MAX_TOKENS", MAX_TOKENS)
    base, lora = project / "base", project / layout.lora_dir("tiny")
    expected_adapter = greedy_reply(base, lora, lora, MAX_TOKENS)
    expected_base = greedy_reply(base, None, base, MAX_TOKENS)
    # the test can tell which template answered: the adapter under the base's template says something else
    assert expected_adapter and expected_base
    assert greedy_reply(base, lora, base, MAX_TOKENS) != expected_adapter

    # each chat message once: the hook sees it as the screen handles it and again as the app does, maybe later
    streamed: list = []
    app = make_app(project, start_view="chat")
    hook = lambda m: streamed.append(m) if isinstance(m, (ChatToken, ChatDone)) and all(m is not s for s in streamed) \
        else None
    async with app.run_test(size=(100, 30), message_hook=hook) as pilot:
        await wait_for(pilot, lambda: app.cfg is not None, what="config")
        screen = app.screen
        left, right = screen.query_one("#pane-left"), screen.query_one("#pane-right")
        # alone: ctrl+n picks the adapter
        await pilot.press("ctrl+n")
        assert left.model == "tiny" and not right.display
        await ask(pilot, app, [left], "the adapter's answer")
        assert reply_of(left) == expected_adapter
        assert left.query_one("Transcript").text == f"> {PROMPT}\n\n{expected_adapter}"
        tokens = [m for m in streamed if isinstance(m, ChatToken) and m.pane == "left"]
        assert tokens and "".join(m.text for m in tokens) == expected_adapter  # streamed, not dropped in at the end

        # side by side: the base on the left, the adapter on the right, one question
        start = len(streamed)  # not cleared: a first-answer token may bubble up to the app after this point
        await pilot.press("ctrl+l", "ctrl+b")
        assert right.display and left.model is None and right.model == "tiny"
        await ask(pilot, app, [left, right], "both answers")
        assert reply_of(left) == expected_base and reply_of(right) == expected_adapter
        assert expected_base != expected_adapter
        second = streamed[start:]
        for pane_id, expected in (("left", expected_base), ("right", expected_adapter)):
            pieces = [m.text for m in second if isinstance(m, ChatToken) and m.pane == pane_id]
            done = [i for i, m in enumerate(second) if isinstance(m, ChatDone) and m.pane == pane_id]
            first = next(i for i, m in enumerate(second) if isinstance(m, ChatToken) and m.pane == pane_id)
            assert "".join(pieces) == expected and len(done) == 1 and first < done[0]
        assert "tok/s" in left.status and "tok/s" in right.status


@pytest.fixture
def plain_project(tmp_path, monkeypatch):
    """The tiny dashboard project with no model built: a question gets the chat process's error, fast."""
    root = make_project(tmp_path / "proj")
    project_env()
    monkeypatch.chdir(root)
    return root


async def test_the_chat_process_starts_and_ends_off_the_ui_thread(plain_project, monkeypatch):
    """Popen (a process start) and the wait for it to end never run on the UI thread; replies still arrive."""
    starts: list[tuple[int, subprocess.Popen]] = []
    waits: list[int] = []
    real_popen = subprocess.Popen

    class Spy(real_popen):
        def __init__(self, args, *rest, **kw):
            if "tui.chat_worker" in args:
                starts.append((threading.get_ident(), self))
                threading.Event().wait(0.5)  # a slow start (a loaded machine): the UI must not feel it
            super().__init__(args, *rest, **kw)

        def wait(self, timeout=None):
            if "tui.chat_worker" in self.args and threading.current_thread().name != "chat-reader":
                waits.append(threading.get_ident())
            return super().wait(timeout)

    monkeypatch.setattr(subprocess, "Popen", Spy)
    app = make_app(plain_project, start_view="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        ui_thread = threading.get_ident()
        await wait_for(pilot, lambda: app.cfg is not None, what="config")
        left = app.screen.query_one("#pane-left")
        app.screen.query_one("#chat-input").value = "hi"
        await pilot.press("enter")
        assert left.status == "thinking…"  # the question is on screen while the process starts
        await wait_for(pilot, lambda: left.status == "error", 60, "the chat process's answer")
        assert "doit" in left.query_one("Transcript").text  # it names the task that builds the model
        assert len(starts) == 1 and starts[0][0] != ui_thread
        proc = starts[0][1]
        assert proc.poll() is None  # kept for the next question
    wait_sync(lambda: proc.poll() is not None, 10, "the chat process to end with the app")
    wait_sync(lambda: waits, 10, "the wait for its end")
    assert ui_thread not in waits  # the wait for its end (up to 3 s, then a kill) ran in a thread of its own


CRASH_HOOK = '''
import os

if os.environ.get("MEDFORGE_TEST_FAULT") == "chat-segfault":
    import stages.chat

    def crash(*args, **kwargs):
        import ctypes
        ctypes.string_at(0)  # a real invalid read in native code, as a llama.cpp crash is
        yield ""

    stages.chat.stream_chat = crash
'''


async def test_a_native_crash_in_the_chat_process_is_named_in_the_pane(plain_project, monkeypatch, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.environ["PYTHONPATH"] + os.pathsep + str(hook))
    monkeypatch.setenv("MEDFORGE_TEST_FAULT", "chat-segfault")
    app = make_app(plain_project, start_view="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.cfg is not None, what="config")
        left = app.screen.query_one("#pane-left")
        app.screen.query_one("#chat-input").value = "hi"
        await pilot.press("enter")
        await wait_for(pilot, lambda: left.status == "error", 60, "the crash to reach the pane")
        text = " ".join(left.query_one("Transcript").text.split())
        assert "llama.cpp crashed (SIGSEGV, exit -11) in the chat process" in text
        assert "extra buffer types" in text


async def answer(pilot, pane, prompt: str, reply: str) -> list[dict]:
    """Put `prompt` to the pane's model and stream `reply` back through the screen's own messages."""
    sent = pane.begin(prompt)
    screen = pilot.app.screen
    for i in range(0, len(reply), 5):
        screen.post_message(ChatToken(pane.pane_id, reply[i:i + 5]))
    screen.post_message(ChatDone(pane.pane_id, 7, 0.5))
    await wait_for(pilot, lambda: "tokens" in pane.status, 10, "the answer")
    return sent


async def test_switching_the_model_keeps_each_models_conversation(plain_project):
    """ctrl+n shows the next model's own conversation; coming back finds the first one as it was, and each
    model is sent only its own turns. ctrl+l forgets only the conversation shown."""
    app = make_app(plain_project, start_view="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.cfg is not None, what="config")
        screen = app.screen
        left, right = screen.query_one("#pane-left"), screen.query_one("#pane-right")
        transcript = left.query_one("Transcript")
        await answer(pilot, left, "[b]q1[/b]", "the base says one")
        base_text = transcript.text
        assert base_text == "> [b]q1[/b]\n\nthe base says one"

        await pilot.press("ctrl+n")
        assert left.model == "tiny" and transcript.text == "" and left.status == ""
        assert "tiny" in str(screen.query_one("#chat-bar").content)
        sent = await answer(pilot, left, "q2", "the adapter says two")
        assert sent == [{"role": "user", "content": "q2"}]  # the adapter does not see the base's turns
        adapter_text = transcript.text

        await pilot.press("ctrl+n")  # the adapter's merged GGUF (what Ollama users run): a conversation of its own
        assert left.model == "tiny:q8_0" and transcript.text == ""
        await pilot.press("ctrl+n")  # back to the base: its conversation as it was left
        assert left.model is None and transcript.text == base_text and "7 tokens" in left.status
        sent = await answer(pilot, left, "q3", "the base says three")
        assert sent == [{"role": "user", "content": "[b]q1[/b]"}, {"role": "assistant", "content": "the base says one"},
                        {"role": "user", "content": "q3"}]
        assert transcript.text == base_text + "\n\n> q3\n\nthe base says three"

        await pilot.press("ctrl+b")  # side by side: both conversations, each in its pane
        assert right.display and left.model is None and right.model == "tiny"
        assert right.query_one("Transcript").text == adapter_text
        bar = screen.query_one("#chat-bar")
        assert bar.content.cell_len <= bar.content_region.width == 78  # the bar fits 80 columns
        assert transcript.text.endswith("the base says three")

        await pilot.press("ctrl+b", "ctrl+l")  # alone again, showing the base: only its conversation goes
        assert left.model is None and transcript.text == "" and left.history == []
        await pilot.press("ctrl+n")
        assert left.model == "tiny" and transcript.text == adapter_text
        await pilot.press("escape")  # out of the input: the footer shows every key it has, uncut at 80 columns
        await pilot.pause(0.2)
        footer = screen_text(app).splitlines()[-1]
        for key in ("^n Model", "^b Side by side", "esc Stop", "^l Clear", "? Help", "q Quit", "^p palette"):
            assert key in footer, (key, footer)


async def test_a_conversation_longer_than_the_models_context_goes_on_with_its_newest_turns(tmp_path, monkeypatch):
    """The pane keeps the whole conversation; the model gets what fits its context (here a tiny model of 160
    positions), the oldest turns left out, and the pane says so instead of failing every question from then on."""
    from tui.screens import chat

    root = make_project(tmp_path / "proj")
    project_env()
    monkeypatch.chdir(root)
    monkeypatch.setattr(chat, "MAX_TOKENS", MAX_TOKENS)
    base = make_tiny_model(root / "base", max_position_embeddings=160)
    (root / "adapters" / "tiny" / "adapter.toml").write_text(
        f'base_model = "{base}"\n[lora]\nr = 4\nalpha = 8\n[train]\nmax_steps = 12\n')
    make_lora(base, layout.lora_dir("tiny"))
    app = make_app(root, start_view="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.cfg is not None, what="config")
        left = app.screen.query_one("#pane-left")
        await pilot.press("ctrl+n")
        await ask(pilot, app, [left], "the first answer")
        assert "left out" not in left.query_one("Transcript").text
        await ask(pilot, app, [left], "the second answer")
        assert left.query_one("Transcript").text.endswith(
            "\n[2 earlier message(s) left out to fit the 160-token context]")
        assert [m["role"] for m in left.history] == ["user", "assistant"] * 2  # the pane keeps them all
