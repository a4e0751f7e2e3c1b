"""base_gguf:<base> and export:<adapter> — GGUF files for llama.cpp, Ollama and LM Studio.

Conversion and quantization are llama.cpp's own (stages.llamacpp: the converter scripts
vendored in the installed llama-cpp-python's sdist, and `llama_model_quantize`), never a
converter of ours.

  run_base(cfg, spec)     layout.base_dir(spec) (HF folder)  -> layout.base_gguf(spec), f16
  run(cfg, adapter)       layout.lora_dir(adapter) (peft)    -> layout.lora_gguf(adapter), f16 LoRA GGUF
                                                                 applied on the base GGUF at load time
                          base + LoRA merged (merge_and_unload) -> layout.merged_gguf(adapter, q) for
                                                                 each q in [export] merged

Every GGUF is built in a temporary folder and VERIFIED before anything is renamed into place
(`verify`): next-token logits of transformers (+ peft) against llama-cpp-python at every
position of held-out conversations (the adapter's test split; fixed prompts when it has none),
as top-1 agreement and mean KL(HF || GGUF), within bounds per quant type (`BOUNDS`, overridable
with [export] max_kl / min_top1 in adapter.toml); the GGUF's embedded chat template must render
the prompt tokens training saw, and llama.cpp must stop generating at the end-of-turn token.
A failed check raises StageError with the figures; any failure (a crash in llama.cpp too) removes
the adapter's old exports, so nothing unverified is served. Beside the GGUFs: verify.json (the figures and the serve
command) and an Ollama Modelfile with the training chat template and stop tokens.

Each verified GGUF also answers the choice and cloze items of `export.task_examples` of the test rows eval
scores (a subset of its sample), through llama.cpp's logits (`task_scores`): verify.json keeps per task metric the means
and the per-item figures by row id, and the report sets them beside transformers + peft's on the same items,
so what quantization costs shows in task terms, not only as KL.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import gguf, io, layout, llamacpp
from stages.errors import StageError

CHECK_PROMPT = "The patient presents with"
# Measured on SmolLM2-135M (llama.cpp's converter, every position of 8 chat prompts): f16 top-1 100 %,
# KL < 1e-5; q8_0 95.5 %, 0.011; q4_k_m 88 %, 0.11; a LoRA GGUF on q8_0 92 %, 0.016. f16 (and the f16 LoRA
# on the f16 base) must agree fully; quantized types are gated by KL with about 3x margin, top-1 only loosely:
# near-ties flip under rounding (a random tiny model's q8_0 agrees on 87 % at KL 0.003).
BOUNDS: dict[str, dict[str, float]] = {
    "f16": {"min_top1": 0.99, "max_kl": 1e-4},  # top-1 counts near-ties as agreeing (compare_logits)
    "bf16": {"min_top1": 0.99, "max_kl": 1e-3},
    "lora": {"min_top1": 0.99, "max_kl": 1e-4},  # f16 LoRA GGUF applied on the f16 base GGUF
    "q8_0": {"min_top1": 0.8, "max_kl": 0.03},
    "q6_k": {"min_top1": 0.75, "max_kl": 0.05},
    "q5_k_m": {"min_top1": 0.7, "max_kl": 0.08},
    "q4_k_m": {"min_top1": 0.6, "max_kl": 0.3},
    "q4_0": {"min_top1": 0.5, "max_kl": 0.4},
}
# held-out prompts for the base GGUF and for adapters whose test split is missing
FALLBACK_PROMPTS = (
    "Calculate the NEWS2 score for a patient with respiration rate 24, SpO2 93% on room air, systolic BP 104, "
    "pulse 118, alert, temperature 38.6 °C.",
    "What does ICD-10-CM code J18.9 describe?",
    "What is the ICD-10-CM code for: Type 2 diabetes mellitus without complications?",
    "A patient's NEWS2 is 7. What is the clinical response?",
    "Is ICD-10-CM code E11 billable?",
    "What dose of morphine should I give?",
    "Summarize the early warning signs of sepsis on a ward.",
    "What is the parent category of ICD-10-CM code I10?",
)


def _need(path: Path, what: str, task: str) -> None:
    if not path.exists():
        raise StageError(f"{path}: {what} not found; build it first (`doit {task}`)")


def _base_task(spec: str) -> str:
    return f"base_model:{layout.slug(spec)}"


def check_gguf(model_path: Path, lora_path: Path | None = None, n_tokens: int = 4, kind: str = "",
               name: str = "") -> list[float]:
    """Load a GGUF (plus a LoRA GGUF) in llama-cpp-python, generate a few tokens; return the prompt's last logits.

    Runs in a child process (stages.gguf.in_child). Raises StageError when it does not load, its logits
    are not finite, or llama.cpp crashes.
    """
    name = name or (lora_path or model_path).name  # a temp file's target's name, where it has one
    return gguf.in_child(_check_gguf, model_path, lora_path, n_tokens,
                         doing=f"decoding {name}" + (f" ({kind})" if kind else ""))


def _check_gguf(model_path: Path, lora_path: Path | None, n_tokens: int) -> list[float]:
    what = f"{model_path}" + (f" + {lora_path}" if lora_path else "")
    llm = gguf.load(model_path, lora_path, n_ctx=256, n_batch=64)
    try:
        tokens = llm.tokenize(CHECK_PROMPT.encode())
        llm.eval(tokens)
        logits = [float(x) for x in llm.scores[llm.n_tokens - 1]]
        if not all(math.isfinite(x) for x in logits):
            raise StageError(f"{what}: non-finite logits from llama.cpp; the export is broken, re-run it")
        llm.reset()
        llm.create_completion(CHECK_PROMPT, max_tokens=n_tokens, temperature=0.0)
    finally:
        llm.close()
    return logits


def run_base(cfg, spec: str) -> Path:
    src = layout.base_dir(spec)
    _need(src / "config.json", "base model folder", _base_task(spec))
    target = layout.base_gguf(spec)
    with io.atomic_path(target) as tmp:
        llamacpp.convert_hf(src, tmp, "f16")
        check_gguf(tmp, kind="f16", name=target.name)
        tokenizer = _load_tokenizer(src)
        conversations = [[{"role": "user", "content": p}] for p in FALLBACK_PROMPTS]
        figures = verify(src, None, tokenizer, conversations, [Candidate("f16", tmp, name=target.name)], BOUNDS)
        gate(figures, f"base_gguf:{layout.slug(spec)}", "the base GGUF")
    print(f"base_gguf: {src} -> {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    return target


def _tokenizer_source(adapter_name: str, base_dir: Path) -> Path:
    """Training saves the tokenizer it used beside the LoRA; older runs may not have."""
    lora = layout.lora_dir(adapter_name)
    return lora if (lora / "tokenizer_config.json").exists() else base_dir


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not tokenizer.chat_template:
        raise StageError(f"{folder}: the tokenizer has no chat template; exports need the training template")
    return tokenizer


def merge_lora(base_dir: Path, lora_dir: Path, out: Path, tokenizer_dir: Path) -> None:
    """Base + LoRA folded into plain weights (fp32 on CPU), saved as an HF folder with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))


def build_merged(adapter_name: str, base_dir: Path, quants: list[str], work: Path) -> dict[str, Path]:
    """Merged GGUFs for each quant type, in `work` (not yet verified, not yet in place)."""
    if not quants:
        return {}
    merged_dir, f16 = work / "hf", work / "merged-f16.gguf"
    merge_lora(base_dir, layout.lora_dir(adapter_name), merged_dir, _tokenizer_source(adapter_name, base_dir))
    if any(q != "bf16" for q in quants):
        llamacpp.convert_hf(merged_dir, f16, "f16")
    out = {}
    for quant in quants:
        path = work / f"merged-{quant}.gguf"
        if quant == "bf16":
            # straight from the fp32 merge: going through f16 would lose range for nothing
            llamacpp.convert_hf(merged_dir, path, "bf16")
        elif quant != "f16":
            llamacpp.quantize(f16, path, quant)
        out[quant] = path
        check_gguf(path, kind=quant)
    return out


# --- verification
@dataclass(frozen=True)
class Candidate:
    """One GGUF under test: `kind` names its bounds ("lora" or a quant type)."""
    kind: str
    model: Path
    lora: Path | None = None
    name: str = ""  # how reports call it; the file's name by default

    @property
    def label(self) -> str:
        return self.name or (self.lora or self.model).name


def bounds_for(export_cfg: dict[str, Any]) -> dict[str, dict[str, float]]:
    """BOUNDS with the recipe's [export] max_kl / min_top1 tables laid over them."""
    out = {kind: dict(b) for kind, b in BOUNDS.items()}
    for key in ("max_kl", "min_top1"):
        for kind, value in export_cfg.get(key, {}).items():
            out.setdefault(kind, {})[key] = float(value)
    return out


TIE_NATS = 0.05  # under the reference, a pick this close to its top token is a near-tie, not a disagreement


def compare_logits(ref, got) -> tuple[int, float, int]:
    """(positions where the top token agrees, summed KL(ref || got), positions) over [positions, vocab] logits.

    Half-precision rounding (~1e-3 relative) flips the order of near-tied tokens; a position counts
    as agreeing when the GGUF's top token is within TIE_NATS of the reference's top under the
    reference's own distribution. Real breakage moves tokens by far more, and KL is measured too.
    """
    import numpy as np

    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    rows = np.arange(ref.shape[0])
    gap = lp[rows, ref.argmax(-1)] - lp[rows, got.argmax(-1)]
    agree = int((gap <= TIE_NATS).sum())
    return agree, float(np.maximum(kl, 0.0).sum()), int(ref.shape[0])


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def template_check(llm, tokenizer, messages: list[dict]) -> str | None:
    """None when the GGUF's embedded template, rendered the way llama-cpp-python's chat API renders it,
    gives the same prompt tokens as training; else what differs."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return "no tokenizer.chat_template in the GGUF"
    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(template=template,
                                    eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                                    bos_token=llm._model.token_get_text(bos) if bos != -1 else "")
    rendered = formatter(messages=messages)
    got = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
    want = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    at = first_difference(list(got), list(want))
    if at is None:
        return None
    show = lambda ids: repr(tokenizer.decode(ids[max(0, at - 2):at + 3]))  # noqa: E731
    return f"its chat template renders other prompt tokens than training from token {at} ({show(got)} vs {show(want)})"


def stop_check(llm, prompt_ids: list[int], eot: int) -> str | None:
    """None when llama.cpp ends generation at the training end-of-turn token."""
    import llama_cpp

    if not llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), eot):
        return f"token {eot} (the training end-of-turn) is not an end-of-generation token in the GGUF"
    llm.reset()
    # force the end-of-turn token: generation must stop there, not run on past the turn
    out = llm.create_completion(prompt_ids, max_tokens=4, temperature=0.0, logit_bias={eot: 1000.0})
    if out["choices"][0]["finish_reason"] != "stop":
        return "greedy generation does not stop at the end-of-turn token"
    return None


def conversations_for(adapter_name: str | None, n: int) -> list[list[dict]]:
    """Held-out conversations: the first `n` of the adapter's test split, else FALLBACK_PROMPTS."""
    path = layout.split_file(adapter_name, "test") if adapter_name else None
    if path is not None and path.exists():
        rows = [row["messages"] for _, row in zip(range(n), io.read_jsonl(path))]
        if rows:
            return rows
    return [[{"role": "user", "content": p}] for p in FALLBACK_PROMPTS[:n]]


def scored_rows(cfg, adapter_name: str) -> tuple[list[dict], list[dict]]:
    """The test rows each GGUF answers and their choice questions: `export.task_examples` of those the adapter's
    eval scores (its sample, stages.evaluate.test_splits), picked by the same hash rank, and asked the questions
    eval asks them (drawn against the whole split), so every item pairs with eval's by row id."""
    from stages import evaluate
    from stages.train.inputs import read_split

    if not layout.split_file(adapter_name, "test").exists():
        return [], []
    a = cfg.adapters[adapter_name]
    split = read_split(adapter_name, "test")
    rows = evaluate.spread_sample(evaluate.spread_sample(split, a.eval["max_examples"]), a.export["task_examples"])
    return rows, evaluate.choices_for(rows, split)


def verify(base_dir: Path, lora_dir: Path | None, tokenizer, conversations: list[list[dict]],
           candidates: list[Candidate], bounds: dict[str, dict[str, float]], max_length: int = 512,
           task_rows: list[dict] | None = None, task_choices: list[dict] | None = None) -> dict:
    """Figures per candidate GGUF against transformers (+ peft) in fp32; see the module docstring. With
    `task_rows` (the test rows eval scores, and `task_choices`: their questions as eval asks them, scored_rows),
    each GGUF also answers their choice and cloze items (`tasks`).

    Runs in a child process (stages.gguf.in_child): a crash in llama.cpp is a StageError naming the GGUFs.
    """
    doing = "verifying " + ", ".join(f"{c.label} ({c.kind})" for c in candidates)
    return gguf.in_child(_verify, base_dir, lora_dir, tokenizer, conversations, candidates, bounds, max_length,
                         task_rows or [], task_choices, doing=doing)


def _verify(base_dir: Path, lora_dir: Path | None, tokenizer, conversations: list[list[dict]],
            candidates: list[Candidate], bounds: dict[str, dict[str, float]], max_length: int,
            task_rows: list[dict], task_choices: list[dict] | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from stages import evaluate
    from stages.evaluate import end_of_turn_id
    from stages.train import format as fmt

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if lora_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(lora_dir))
    model.eval()
    eot = end_of_turn_id(tokenizer)
    sequences = []
    for messages in conversations:
        if messages[-1]["role"] == "assistant":
            ids = fmt.encode(tokenizer, messages, max_length).input_ids
        else:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        sequences.append((ids, messages[:-1] if messages[-1]["role"] == "assistant" else messages))
    items = evaluate.task_items(tokenizer, task_rows, task_choices)
    lengths = [len(ids) for ids, _ in sequences] + [len(e.input_ids) for e in items.choice_examples] \
        + [len(c.ids) for c in items.cloze]
    n_ctx = max(lengths) + 8
    figures: dict[str, dict] = {}
    llms = {}
    try:
        for c in candidates:
            llm = llms[c.label] = gguf.load(c.model, c.lora, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                            logits_all=True)
            problems = [p for p in (template_check(llm, tokenizer, sequences[0][1]),
                                    stop_check(llm, llm.tokenize(b"Hello", add_bos=False), eot)) if p]
            figures[c.label] = {"kind": c.kind, "agree": 0, "kl_sum": 0.0, "positions": 0, "problems": problems}
        for ids, _ in sequences:
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].float().numpy()
            for c in candidates:
                llm = llms[c.label]
                llm.reset()
                llm.eval(ids)
                agree, kl_sum, n = compare_logits(ref, llm.scores[:len(ids)])
                f = figures[c.label]
                f["agree"] += agree
                f["kl_sum"] += kl_sum
                f["positions"] += n
        for c in candidates:
            figures[c.label]["tasks"] = task_scores(llms[c.label], task_rows, items)
    finally:
        for llm in llms.values():
            llm.close()
    out = {}
    for c in candidates:
        f = figures[c.label]
        top1, kl = f["agree"] / f["positions"], f["kl_sum"] / f["positions"]
        bound = bounds.get(c.kind, {})
        problems = list(f["problems"])
        if top1 < bound.get("min_top1", 0.0):
            problems.append(f"top-1 agreement {top1:.1%} < {bound['min_top1']:.1%}")
        if kl > bound.get("max_kl", math.inf):
            problems.append(f"mean KL {kl:.3g} > {bound['max_kl']:.3g}")
        out[c.label] = {"kind": c.kind, "top1": top1, "kl": kl, "positions": f["positions"],
                        "prompts": len(sequences), "bounds": bound, "problems": problems, "passed": not problems,
                        "tasks": f["tasks"]}
    return out


# --- task scores through llama.cpp: what users run, on the items eval scores transformers + peft on
def gguf_logits_at(llm, ids: list[int], wanted: list[int]):
    """llama.cpp's next-token logits after each position in `wanted` (sorted, increasing) of `ids`, as a
    [len(wanted), vocab] array. The output head runs only there (over a 49k vocabulary it is a quarter of a
    small model's work per position) and nothing else is copied out. What the context already holds of
    `ids` before the first wanted position is kept: a question's options share its prompt, every chat the
    system turn."""
    import ctypes

    import numpy as np

    lcp = min(llm.n_tokens, len(ids) - 1, wanted[0] if wanted else len(ids) - 1)
    same = np.asarray(llm.input_ids[:lcp]) == np.asarray(ids[:lcp], dtype=llm.input_ids.dtype)
    keep = lcp if same.all() else int(same.argmin())
    llm._ctx.kv_cache_seq_rm(-1, keep, -1)
    llm.n_tokens = keep
    want = set(wanted)
    out = np.empty((len(wanted), llm.n_vocab()), dtype=np.float32)
    row = 0
    for start in range(keep, len(ids), llm.n_batch):
        chunk = ids[start:start + llm.n_batch]
        llm._batch.set_batch(batch=chunk, n_past=start, logits_all=False)
        flagged = [j for j in range(len(chunk)) if start + j in want]
        for j in range(len(chunk)):
            llm._batch.batch.logits[j] = start + j in want
        if not flagged:  # llama.cpp wants at least one output: the chunk's last, not read
            llm._batch.batch.logits[len(chunk) - 1] = True
        llm._ctx.decode(llm._batch)
        for j in flagged:
            ptr = llm._ctx.get_logits_ith(j)
            out[row] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(out.shape[1],))
            row += 1
        llm.input_ids[start:start + len(chunk)] = chunk
        llm.n_tokens = start + len(chunk)
    return out


def gguf_nll(llm, examples) -> list[tuple[float, int]]:
    """(summed NLL of the trained tokens, their count) per Encoded example, as torch_backend.nll_by_example."""
    import numpy as np

    from stages.train.format import IGNORE

    out = []
    for e in examples:
        positions = [p for p, label in enumerate(e.labels) if label != IGNORE and p > 0]
        rows = gguf_logits_at(llm, e.input_ids, [p - 1 for p in positions]).astype(np.float64)
        top = rows.max(axis=-1, keepdims=True)
        logz = (top + np.log(np.exp(rows - top).sum(axis=-1, keepdims=True)))[:, 0]
        picked = rows[np.arange(len(positions)), [e.input_ids[p] for p in positions]]
        out.append((float((logz - picked).sum()), len(positions)))
    return out


def gguf_cloze(llm, examples) -> list[dict[str, float]]:
    from stages.evaluate import hits_of, wanted_positions

    out = []
    for e in examples:
        positions = wanted_positions(e)
        logits = gguf_logits_at(llm, e.ids, [p - 1 for p in positions])
        out.append(hits_of(e, dict(zip(positions, logits.argmax(-1).tolist()))))
    return out


def task_scores(llm, rows: list[dict], items) -> dict[str, dict[str, Any]]:
    """Per task metric: {"kind", "n", "metrics": means, "items": {"id": [...], "values": columns}} — eval.json's
    per-item figures of transformers + peft pair with these by row id (stages.report)."""
    from stages import evaluate

    if not rows:
        return {}
    llm.reset()
    scored = evaluate.item_scores(rows, items, gguf_nll(llm, items.choice_examples), gguf_cloze(llm, items.cloze))
    return {key: {"kind": s["kind"], "n": len(s["values"]), "metrics": evaluate.mean_metrics(s["values"]),
                  "items": {"id": s["ids"], "values": evaluate.columns(s["values"])}} for key, s in scored.items()}


def gate(figures: dict[str, dict], task: str, where: str) -> None:
    """StageError with the figures of every failed GGUF."""
    failed = {label: f for label, f in figures.items() if not f["passed"]}
    for label, f in figures.items():
        print(f"{task}: verify {label}: top-1 {f['top1']:.2%}, mean KL {f['kl']:.3g} over {f['positions']} "
              f"positions: {'ok' if f['passed'] else 'FAILED: ' + '; '.join(f['problems'])}")
    if failed:
        detail = "; ".join(f"{label}: " + ", ".join(f["problems"]) for label, f in failed.items())
        raise StageError(f"{task}: export verification failed against transformers+peft ({detail}); the export "
                         f"does not match the trained model: re-run it, or loosen [export] max_kl/min_top1 in {where}")


# --- Ollama Modelfile
def ollama_template(tokenizer) -> dict[str, str]:
    """The training chat template split into per-role prefixes and the turn suffix, checked to re-render it.

    Raises StageError for a template these parts cannot express (no per-message structure).
    """
    S, U, A, U2 = "\x01SYS\x01", "\x01USR\x01", "\x01AST\x01", "\x01US2\x01"
    conv = [{"role": "system", "content": S}, {"role": "user", "content": U}, {"role": "assistant", "content": A},
            {"role": "user", "content": U2}]
    text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    try:
        p0, rest = text.split(S)
        p1, rest = rest.split(U)
        p2, rest = rest.split(A)
        p3, p4 = rest.split(U2)
    except ValueError:
        raise StageError("the chat template renders messages out of order; write the Modelfile by hand") from None
    common = os.path.commonprefix([p1, p2, p3])
    # the turn suffix ends where the next turn's header (which begins like the system header) starts
    cut = next((k for k in range(len(common) + 1) if p0.startswith(common[k:])), len(common))
    suffix = common[:cut]
    parts = {"system": p0, "user": p1[len(suffix):], "assistant": p2[len(suffix):], "suffix": suffix,
             "generation": p4[len(suffix):]}
    only_user = tokenizer.apply_chat_template([{"role": "user", "content": U}], tokenize=False,
                                              add_generation_prompt=True)
    default_system = ""
    if only_user.startswith(p0) and not only_user.startswith(parts["user"]):
        default_system = only_user[len(p0):only_user.index(suffix + parts["user"])]
    parts["default_system"] = default_system
    for messages in ([{"role": "user", "content": "a"}],
                     [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if render_parts(parts, messages) != want:
            raise StageError("the chat template has no per-message prefix/suffix structure medforge can express "
                             "as an Ollama TEMPLATE; write the Modelfile by hand")
    return parts


def render_parts(parts: dict[str, str], messages: list[dict]) -> str:
    """What the Ollama TEMPLATE renders (Ollama puts SYSTEM first when the request has no system message)."""
    if messages[0]["role"] != "system" and parts["default_system"]:
        messages = [{"role": "system", "content": parts["default_system"]}] + messages
    body = "".join(parts[m["role"]] + m["content"] + parts["suffix"] for m in messages)
    return body + parts["generation"]


def modelfile_text(adapter_name: str, parts: dict[str, str], stops: list[str], model_line: str) -> str:
    for text in parts.values():
        if '"""' in text or "{{" in text:
            raise StageError("the chat template holds text an Ollama TEMPLATE cannot quote; write the Modelfile by hand")
    body = "".join(f'{{{{ if eq .Role "{role}" }}}}{parts[role]}{{{{ .Content }}}}{parts["suffix"]}{{{{ end }}}}'
                   for role in ("system", "user", "assistant"))
    lines = [f"# Ollama Modelfile for the medforge adapter '{adapter_name}' (verified export; see verify.json).",
             f"#   cd {layout.gguf_dir(adapter_name)} && ollama create {adapter_name} -f Modelfile",
             model_line,
             f'TEMPLATE """{{{{ range .Messages }}}}{body}{{{{ end }}}}{parts["generation"]}"""']
    if parts["default_system"]:
        lines.append(f'SYSTEM """{parts["default_system"]}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def stop_tokens(tokenizer) -> list[str]:
    from stages.evaluate import end_of_turn_id

    stops = [tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def serve_args(cfg, adapter_name: str, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """`medforge serve`'s arguments (llama-cpp-python's server, with the safe llama.cpp settings of stages.gguf)
    for the adapter's verified export: the best merged GGUF, else base + LoRA GGUF, with the GGUF's own chat
    template."""
    from stages.config import QUANT_TYPES

    a = cfg.adapter(adapter_name)
    merged = [layout.merged_gguf(adapter_name, q) for q in QUANT_TYPES if q in a.export["merged"]]
    model = ["--model", str(merged[0])] if merged else \
        ["--model", str(layout.base_gguf(a.base_model)), "--lora_path", str(layout.lora_gguf(adapter_name))]
    return [*model, "--chat_format", "chat_template.default", "--host", host, "--port", str(port)]


def serve_command(cfg, adapter_name: str, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """The command that runs `medforge serve` on the adapter's export from this Python."""
    import sys

    return [sys.executable, "-m", "stages.cli", "serve", *serve_args(cfg, adapter_name, host, port)]


def remove_exports(adapter_name: str, quants: list[str]) -> None:
    """A failed verification leaves no target: an old export no longer matches the adapter being exported."""
    for path in [layout.lora_gguf(adapter_name), layout.verify_file(adapter_name), layout.modelfile(adapter_name)] \
            + [layout.merged_gguf(adapter_name, q) for q in quants]:
        path.unlink(missing_ok=True)


def run(cfg, adapter_name: str) -> list[Path]:
    import shlex

    from stages.config import QUANT_TYPES

    a = cfg.adapter(adapter_name)
    where = str(layout.adapter_toml(adapter_name))
    base_dir = layout.base_dir(a.base_model)
    _need(base_dir / "config.json", "base model folder", _base_task(a.base_model))
    _need(layout.lora_weights(adapter_name), "trained LoRA adapter", f"train:{adapter_name}")
    base_gguf = layout.base_gguf(a.base_model)
    _need(base_gguf, "base GGUF", f"base_gguf:{layout.slug(a.base_model)}")
    quants = sorted(a.export["merged"], key=QUANT_TYPES.index)
    tokenizer = _load_tokenizer(_tokenizer_source(adapter_name, base_dir))
    parts = ollama_template(tokenizer)  # fails early for a template Ollama cannot take
    out_dir = layout.out_dir(adapter_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    # big temporaries beside the targets: same disk, and removed even when a step fails
    with tempfile.TemporaryDirectory(prefix=".export.", dir=out_dir) as tmp:
        work = Path(tmp)
        lora_tmp = work / layout.lora_gguf(adapter_name).name
        try:
            llamacpp.convert_lora(layout.lora_dir(adapter_name), base_dir, lora_tmp, "f16")
            check_gguf(base_gguf, lora_path=lora_tmp, kind="lora")
            merged = build_merged(adapter_name, base_dir, quants, work)
            candidates = [Candidate("lora", base_gguf, lora_tmp)] + [Candidate(q, p) for q, p in merged.items()]
            figures = verify(base_dir, layout.lora_dir(adapter_name), tokenizer,
                             conversations_for(adapter_name, a.export["verify_examples"]), candidates,
                             bounds_for(a.export), a.train["max_length"], *scored_rows(cfg, adapter_name))
            gate(figures, f"export:{adapter_name}", where)
        except Exception:  # whatever failed (a crash too), no export of an older adapter stays to be served
            remove_exports(adapter_name, list(QUANT_TYPES))
            raise
        targets = [layout.lora_gguf(adapter_name)] + [layout.merged_gguf(adapter_name, q) for q in merged]
        for src, target in zip([lora_tmp] + list(merged.values()), targets):
            with io.atomic_path(target) as out:
                src.replace(out)
            print(f"export:{adapter_name}: {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    gguf_dir = layout.gguf_dir(adapter_name)
    if merged:
        model_line = f"FROM ./{layout.merged_gguf(adapter_name, quants[0]).name}"
    else:
        rel = os.path.relpath(base_gguf.resolve(), gguf_dir.resolve())
        model_line = f"FROM {rel}\nADAPTER ./{layout.lora_gguf(adapter_name).name}"
    io.write_text(layout.modelfile(adapter_name), modelfile_text(adapter_name, parts, stop_tokens(tokenizer),
                                                                 model_line))
    # one server for every adapter on the base loaded once; this adapter answers as model "<name>" (its LoRA
    # GGUF) or "<name>:<quant>" (a merged GGUF). `medforge serve --adapter NAME` still serves this export alone.
    serve = shlex.join(["medforge", "serve", "--adapters", adapter_name])
    io.write_json(layout.verify_file(adapter_name), {"adapter": adapter_name, "gguf": figures, "serve": serve,
                                                     "ollama": f"ollama create {adapter_name} -f Modelfile"})
    print(f"export:{adapter_name}: verified; serve it with: {serve}")
    return targets
