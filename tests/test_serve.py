"""`medforge serve`: one OpenAI-compatible server, the base loaded once, every adapter's LoRA GGUF beside it.

A real server process on 127.0.0.1 with two tiny adapters (a, b) and a's merged f16 GGUF, driven
by the `openai` client: interleaved and concurrent requests for base, a, b and a:f16 each give
the same greedy tokens as that model loaded alone through the one loader (in a child process,
as native llama.cpp work runs in the tests). Adapter b's Modelfile has a stop string taken from the
middle of its own greedy completion: its chat and plain completions must end there, the others not.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stages import gguf
from stages.errors import StageError
from tests.models import make_tiny_model, session_tempdir
from tests.ports import free_port
from tests.serve_project import stop

openai = pytest.importorskip("openai")

ADAPTERS = ["a", "b"]
MODELS = ["base", "a", "b", "a:f16"]
N_CTX = 512
MAX_TOKENS = 12
KEY = "test-key-123"
CHATS = [[{"role": "user", "content": "Score NEWS2 for RR 24, SpO2 93, HR 115."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does J18.9 describe?"}]]
PROMPT = "The patient presents with"


@pytest.fixture(scope="module")
def project() -> Path:
    from tests.serve_project import build

    root = session_tempdir("medforge-serve-")
    base = make_tiny_model(root / "base")
    return build(root, base, ADAPTERS, merged=("a",))


@pytest.fixture(scope="module")
def b_stop(project) -> str:
    """A stop for adapter b, in its Modelfile (where the export writes its stop tokens): the text of a token
    in the middle of b's greedy completion of PROMPT that first occurs there, so the completion is cut at it."""
    model_path, lora = paths(project, "b")
    pieces = gguf.in_child(completion_pieces, str(model_path), str(lora), doing="decoding b")
    full = "".join(pieces)
    for i in range(3, len(pieces)):
        piece = pieces[i]
        if piece.strip() and not set(piece) & set('"\\\n') and full.find(piece) == len("".join(pieces[:i])):
            modelfile = project / "adapters" / "b" / "out" / "gguf" / "Modelfile"
            modelfile.write_text(f'FROM ./lora-f16.gguf\nPARAMETER stop "{piece}"\n', encoding="utf-8")
            return piece
    pytest.fail(f"no token of b's completion can serve as a stop: {pieces}")


def completion_pieces(model_path: str, lora_path: str | None) -> list[str]:
    """Runs in a child: the text of each token of the model's greedy completion of PROMPT, without stops."""
    llm = gguf.load(model_path, lora_path, n_ctx=N_CTX)
    try:
        return [c["choices"][0]["text"] for c in
                llm.create_completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, stream=True)]
    finally:
        llm.close()


def paths(root: Path, model: str) -> tuple[Path, Path | None]:
    """(model GGUF, LoRA GGUF) that `model` stands for, loaded alone."""
    base = next((root / "data" / "gguf").glob("*/base-f16.gguf"))
    if model == "base":
        return base, None
    if ":" in model:
        name, quant = model.split(":")
        return root / "adapters" / name / "out" / "gguf" / f"merged-{quant}.gguf", None
    return base, root / "adapters" / model / "out" / "gguf" / "lora-f16.gguf"


def alone(model_path: str, lora_path: str | None, stops: list[str]) -> dict:
    """Runs in a child: the model loaded alone through the one loader, asked with its adapter's stops;
    greedy chat and completion text."""
    llm = gguf.load(model_path, lora_path, n_ctx=N_CTX)
    try:
        llm.chat_format = "chat_template.default"
        chats = [llm.create_chat_completion(messages=m, max_tokens=MAX_TOKENS, temperature=0.0, stop=stops)
                 ["choices"][0]["message"]["content"] for m in CHATS]
        llm.reset()
        completion = llm.create_completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, stop=stops)
        return {"chats": chats, "completion": completion["choices"][0]["text"],
                "finish": completion["choices"][0]["finish_reason"]}
    finally:
        llm.close()


@pytest.fixture(scope="module")
def expected(project, b_stop) -> dict[str, dict]:
    out = {}
    for model in MODELS:
        model_path, lora = paths(project, model)
        stops = [b_stop] if model == "b" else []
        out[model] = gguf.in_child(alone, str(model_path), str(lora) if lora else None, stops,
                                   doing=f"decoding {model}")
    # the test means something only if the adapters change the greedy tokens
    assert len({str(v) for v in out.values()} - {str(out["a"])}) >= 2, out
    assert out["a"] != out["b"] and out["a"] != out["base"] and out["b"] != out["base"]
    return out


@pytest.fixture(scope="module")
def server(project, b_stop):
    yield from start_server(project)


@pytest.fixture(scope="module")
def server_one_loaded(project, b_stop):
    """The server with --max-loaded 1: a request for one adapter evicts the other's LoRA."""
    yield from start_server(project, "--max-loaded", "1")


def start_server(project: Path, *args: str):
    port = free_port()
    env = {**os.environ, "MEDFORGE_API_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = tempfile.TemporaryFile()  # not a pipe nobody reads while it runs
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "serve", "--port", str(port), "--n-ctx", str(N_CTX),
                             *args], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"medforge serve exited: {log.read().decode(errors='replace')}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "medforge serve did not start"
                time.sleep(0.3)
        yield client, url, proc
    finally:
        stop(proc, log)


def chat(client, model: str, i: int, stream: bool) -> str:
    if not stream:
        reply = client.chat.completions.create(model=model, messages=CHATS[i], max_tokens=MAX_TOKENS, temperature=0)
        return reply.choices[0].message.content
    pieces = client.chat.completions.create(model=model, messages=CHATS[i], max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)


def complete(client, model: str, stream: bool = False) -> str:
    if not stream:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0) \
            .choices[0].text
    return "".join(c.choices[0].text for c in
                   client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True))


def test_models_lists_the_base_every_adapter_and_the_merged_quant(server):
    client, _, _ = server
    listed = client.models.list().data
    assert sorted(m.id for m in listed) == sorted(MODELS)
    assert {m.context_length for m in listed} == {N_CTX}  # what a client fits a long conversation to


def test_interleaved_requests_give_each_models_own_greedy_tokens(server, expected):
    client, _, _ = server
    for round_ in range(2):
        for model in (["base", "a", "b", "a:f16", "a", "base", "b"] if round_ == 0 else ["b", "a", "a:f16", "base"]):
            for i in range(len(CHATS)):
                assert chat(client, model, i, stream=bool((i + round_) % 2)) == expected[model]["chats"][i], model
            assert complete(client, model, stream=bool(round_)) == expected[model]["completion"], model


def test_a_completion_stops_where_the_adapters_stop_says(server, expected, project, b_stop):
    client, _, _ = server
    model_path, lora = paths(project, "b")
    full = "".join(gguf.in_child(completion_pieces, str(model_path), str(lora), doing="decoding b"))
    cut = full[:full.index(b_stop)]
    assert expected["b"]["completion"] == cut and expected["b"]["finish"] == "stop"
    for model in ("a", "b", "base", "b"):
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0).choices[0]
        assert reply.text == expected[model]["completion"] and reply.finish_reason == expected[model]["finish"], model
        assert complete(client, model, stream=True) == expected[model]["completion"], model
    # the request's own stops still count beside the adapter's
    asked = cut[2:4]
    assert len(asked) == 2, cut
    early = client.completions.create(model="b", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                      stop=[asked]).choices[0].text
    assert early == cut[:cut.index(asked)]


def test_concurrent_requests_for_different_adapters_do_not_mix(server, expected):
    client, _, _ = server
    jobs = [(model, i, stream) for stream in (True, False) for model in MODELS for i in range(len(CHATS))] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [(job, pool.submit(chat, client, *job)) for job in jobs]
        completions = [(model, pool.submit(complete, client, model, True)) for model in MODELS * 2]
        for (model, i, _), future in futures:
            assert future.result() == expected[model]["chats"][i], model
        for model, future in completions:
            assert future.result() == expected[model]["completion"], model


def test_with_one_lora_loaded_each_adapter_still_gets_its_own_greedy_tokens(server_one_loaded, expected):
    """--max-loaded 1 and two adapters: every request for a or b after the other frees the other's LoRA and
    loads its own again; a, b, a, b (and the base between) must each give that adapter's tokens alone."""
    client, _, _ = server_one_loaded
    assert sorted(m.id for m in client.models.list().data) == sorted(MODELS)  # evicted ones stay served
    for model in ("a", "b", "a", "b", "base", "b", "a"):
        for i in range(len(CHATS)):
            assert chat(client, model, i, stream=bool(i)) == expected[model]["chats"][i], model
        assert complete(client, model, stream=model == "a") == expected[model]["completion"], model
    jobs = [("a", 0), ("b", 1), ("a", 1), ("b", 0)] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [(job, pool.submit(chat, client, *job, True)) for job in jobs]
        for (model, i), future in futures:
            assert future.result() == expected[model]["chats"][i], model


def lru_loads(project: str, max_loaded: int, order: list[str]) -> list[tuple[list[str], int]]:
    """Runs in a child: Models over the project's catalog, asked for each model of `order` in turn; the LoRAs
    loaded (least recently used first) and the reloads so far, after each."""
    from stages import config
    from stages.serve import Models, catalog

    os.chdir(project)
    models = Models(catalog(config.load(project)), n_ctx=N_CTX, max_loaded=max_loaded)
    try:
        seen = [(list(models.loras), models.reloads)]
        for model in order:
            models(model)
            seen.append((list(models.loras), models.reloads))
        return seen
    finally:
        models.close()


def test_at_most_max_loaded_loras_stay_loaded_least_recently_used_evicted(project):
    order = ["a", "a", "b", "base", "b", "a", "a:f16"]
    assert gguf.in_child(lru_loads, str(project), 1, order, doing="serving with --max-loaded 1") == [
        (["b"], 0),                   # both loaded at start (a broken file fails there), a evicted by b
        (["a"], 1), (["a"], 1),       # a reloaded once, then in use
        (["b"], 2), (["b"], 2), (["b"], 2),  # the base and merged models need no LoRA: b stays
        (["a"], 3), (["a"], 3)]
    assert gguf.in_child(lru_loads, str(project), 0, order, doing="serving with --max-loaded 0") == [
        (["a", "b"], 0), (["b", "a"], 0), (["b", "a"], 0), (["a", "b"], 0), (["a", "b"], 0), (["a", "b"], 0),
        (["b", "a"], 0), (["b", "a"], 0)]


def test_resident_memory_does_not_grow_with_requests(server):
    """Each generation's llama.cpp sampler chain holds 576 KiB (one llama_token_data per token of SmolLM2's
    vocabulary); llama-cpp-python leaves freeing it to Python's cycle collector, so without serve freeing it
    the server grew ~0.57 MiB with every request, whichever model it was for."""
    import psutil

    client, _, proc = server

    def rss_mib() -> float:
        return psutil.Process(proc.pid).memory_info().rss / 2 ** 20

    for model in ("base", "a", "b"):  # every model's compute buffers made, and the allocator settled
        for _ in range(2):
            complete(client, model)
    before = rss_mib()
    for i in range(30):
        complete(client, ("a", "b", "base")[i % 3])
    grown = rss_mib() - before
    assert grown < 5, f"resident memory grew {grown:.1f} MiB over 30 requests"


def test_the_api_key_is_required_and_an_unknown_model_is_a_404(server):
    _, url, _ = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=CHATS[0], max_tokens=2)
    assert "'nope' is not served here; served: base, a, a:f16, b" in info.value.response.text


def test_a_non_loopback_address_needs_an_api_key(project, monkeypatch):
    from stages.serve import check_bind

    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "k")
    with pytest.raises(StageError, match="refusing to serve on 0.0.0.0: .* MEDFORGE_API_KEY is not set"):
        check_bind("0.0.0.0", None)
    env = {k: v for k, v in os.environ.items() if k != "MEDFORGE_API_KEY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-m", "stages.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "refusing to serve on 0.0.0.0" in out.stderr


def test_remote_chat_streams_from_the_server(server, expected, project, monkeypatch):
    from stages import chat as chat_stage, config

    _, url, _ = server
    monkeypatch.chdir(project)
    monkeypatch.setenv("MEDFORGE_API_KEY", KEY)
    cfg = config.load(project)
    for adapter, model in ((None, "base"), ("b", "b")):
        text = "".join(chat_stage.stream_chat(cfg, adapter, CHATS[0], max_tokens=MAX_TOKENS, url=url))
        assert text == expected[model]["chats"][0]


def test_remote_chat_fits_a_conversation_longer_than_the_servers_context(server, project, monkeypatch):
    from stages import chat as chat_stage, config

    client, url, _ = server
    monkeypatch.chdir(project)
    monkeypatch.setenv("MEDFORGE_API_KEY", KEY)
    turn = "RR 24, SpO2 93 %, HR 115, BP 98/60, temperature 38.4, new confusion. " * 4
    long = [{"role": "system", "content": "Be brief."}]
    for i in range(8):
        long += [{"role": "user", "content": f"Chart {i}: {turn}"}, {"role": "assistant", "content": f"{i}: {turn}"}]
    long.append({"role": "user", "content": CHATS[1][1]["content"]})
    with pytest.raises(openai.BadRequestError, match="context length"):  # as it is, the server cannot take it
        client.chat.completions.create(model="a", messages=long, max_tokens=MAX_TOKENS, temperature=0)

    notes: list[str] = []
    text = "".join(chat_stage.stream_chat(config.load(project), "a", long, max_tokens=MAX_TOKENS, url=url,
                                          notes=notes))
    dropped = int(notes[0].split()[0]) if notes else 0
    assert notes == [f"{dropped} earlier message(s) left out to fit the {N_CTX}-token context"]
    assert dropped % 2 == 0 and 2 <= dropped < 16  # whole question/answer pairs, the oldest, not all of them
    kept = long[:1] + long[1 + dropped:]
    direct = client.chat.completions.create(model="a", messages=kept, max_tokens=MAX_TOKENS, temperature=0)
    assert text == direct.choices[0].message.content  # the answer to the conversation the server could take

    alone = [{"role": "user", "content": turn * 20}]  # too long even alone: one line saying so, no answer
    with pytest.raises(StageError, match="shorten it"):
        "".join(chat_stage.stream_chat(config.load(project), "a", alone, max_tokens=MAX_TOKENS, url=url))

    # a server that does not say its context (the fit skipped) streams 200 and then breaks off: loud, not empty
    monkeypatch.setattr(chat_stage, "_fit_remote", lambda client, base, model, messages, *rest: messages)
    with pytest.raises(StageError, match="broke off before its end"):
        "".join(chat_stage.stream_chat(config.load(project), "a", long, max_tokens=MAX_TOKENS, url=url))


def test_medforge_chat_url_asks_the_server(server, expected, project, monkeypatch, capsys):
    from stages.cli import main

    _, url, _ = server
    monkeypatch.chdir(project)
    monkeypatch.setenv("MEDFORGE_API_KEY", KEY)
    root_url = url.removesuffix("/v1")  # with or without /v1
    assert main(["chat", "--url", root_url, "--adapter", "a", "--max-tokens", str(MAX_TOKENS),
                 CHATS[0][0]["content"]]) == 0
    assert capsys.readouterr().out == expected["a"]["chats"][0] + "\n"
    monkeypatch.delenv("MEDFORGE_API_KEY")
    assert main(["chat", "--url", url, "hello"]) == 2
    assert "HTTP 401" in capsys.readouterr().err


def test_the_dashboards_chat_process_streams_from_the_server(server, expected, project):
    import orjson

    _, url, _ = server
    env = {**os.environ, "MEDFORGE_SERVER_URL": url, "MEDFORGE_API_KEY": KEY,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    request = {"op": "chat", "id": "left:1", "model": "b", "messages": CHATS[1], "max_tokens": MAX_TOKENS,
               "temperature": 0.0}
    proc = subprocess.Popen([sys.executable, "-m", "tui.chat_worker"], cwd=project, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        proc.stdin.write(orjson.dumps(request) + b"\n")
        proc.stdin.flush()  # kept open until the answer is done: closing it is the dashboard quitting
        rows = []
        for line in proc.stdout:
            rows.append(orjson.loads(line))
            if "done" in rows[-1] or "error" in rows[-1]:
                break
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert rows and rows[-1].get("done") and not rows[-1]["stopped"], rows
    assert "".join(r.get("text", "") for r in rows) == expected["b"]["chats"][1]
