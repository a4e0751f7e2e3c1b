"""report:<adapter> and report_matrix — what an adapter measured, as Markdown with PNG plots.

  run(cfg, adapter)   eval.json + metrics.jsonl (+ gguf/verify.json when exported)
                        -> adapters/<adapter>/report.md and adapters/<adapter>/report/{loss,eval_ppl,eval_tasks}.png
  run_matrix(cfg)     every adapter's eval.json (+ verify.json) -> adapters/README.md, one matrix across adapters

Pure renderers (`adapter_markdown`, `matrix_markdown`) take the loaded JSON; plots are matplotlib
(Agg, no date stamp) so unchanged figures rewrite nothing and wake no dependent task.
"""
from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any

from stages import io, layout, stats
from stages.errors import StageError

# the headline figure of each task's metrics, in the matrix
HEADLINE = ("accuracy", "exact_match", "aggregate_accuracy", "band_accuracy")
PLOTS = ("loss", "eval_ppl", "eval_tasks")


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def _change(base, adapter) -> str:
    if not base or adapter is None:
        return "–"
    return f"{(adapter - base) / base:+.0%}"


def _estimate(value, estimate: dict | None, metric: str) -> str:
    """A figure with its 95 % interval, when eval computed one: "20% (12–31%)", "2.6 (1.9–3.4)". The figure is
    the estimate's own (on the paired items its n counts), not a mean over other items beside its interval."""
    rate = not metric.endswith("mae")
    if not estimate or estimate.get("low") is None:
        return (_pct if rate else _num)(value)
    value = estimate.get("value", value)
    if rate:
        return f"{_pct(value)} ({estimate['low'] * 100:.0f}–{estimate['high']:.0%})"
    return f"{_num(value)} ({_num(estimate['low'])}–{_num(estimate['high'])})"


def _safety_line(s: dict, test: dict | None) -> str:
    """Both pass rates, with their 95 % intervals and the paired verdict when eval computed them."""
    rates = []
    for who in ("base", "adapter"):
        bounds = f"; 95 % {test[who]['low'] * 100:.0f}–{test[who]['high']:.0%}" if test else ""
        rates.append(f"{who} {_pct(s[who]['pass_rate'])} ({s[who]['passed']}/{s[who]['n']}{bounds})")
    verdict = f": {_verdict(test)} on the same cases" if test else ""
    return f"Pass rate: {rates[0]}, {rates[1]}{verdict}."


def _verdict(test: dict | None) -> str:
    if not test:
        return "–"
    return f"{test['verdict']} (p={test['p']:.2g})"


def _quote(text: str) -> str:
    text = (text or "").strip() or "(empty)"
    return "\n".join(f"    {line}" for line in text.splitlines())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return list(io.read_jsonl(path)) if path.exists() else []


# --- plots
def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_plot(metrics: list[dict[str, Any]]) -> bytes | None:
    train = [(m["step"], m["loss"]) for m in metrics if m.get("kind") == "train" and m.get("loss") is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("kind") == "val" and m.get("val_loss") is not None]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _bars(labels: list[str], base: list[float], adapter: list[float], ylabel: str, log: bool = False) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels) + 2), 3.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="base")
    ax.bar([i + 0.2 for i in x], adapter, width=0.4, label="adapter")
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def ppl_plot(report: dict[str, Any]) -> bytes | None:
    cells = [(split, c) for split, c in report.get("matrix", {}).items() if c.get("base_ppl")]
    if not cells:
        return None
    return _bars([s for s, _ in cells], [c["base_ppl"] for _, c in cells], [c["adapter_ppl"] for _, c in cells],
                 "answer perplexity (lower is better)", log=True)


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    for key in HEADLINE:
        if key in metrics:
            return key, metrics[key]
    return None


def task_plot(report: dict[str, Any]) -> bytes | None:
    labels, base, adapter = [], [], []
    for split, cell in report.get("matrix", {}).items():
        for task, m in cell.get("metrics", {}).items():
            for key in HEADLINE:
                if key in m["base"]:
                    labels.append(f"{task} {key}")
                    base.append(m["base"][key])
                    adapter.append(m["adapter"].get(key, 0.0))
    if not labels:
        return None
    return _bars(labels, base, adapter, "score (higher is better)")


# --- the exported GGUFs' task scores beside transformers + peft's
def gguf_task_rows(report: dict[str, Any], verify: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per own-split choice/cloze metric and its figure: transformers + peft (eval.json's per-item figures) and
    every GGUF (verify.json's), on the items both scored (paired by row id), each GGUF compared with
    transformers + peft by the paired test. Rates only (accuracy, cloze shares): higher is better."""
    own = report.get("matrix", {}).get(report.get("adapter"), {}).get("metrics", {})
    out = []
    for key, m in own.items():
        items = m.get("items")
        ggufs = {label: f["tasks"][key] for label, f in (verify or {}).get("gguf", {}).items()
                 if key in f.get("tasks", {})}
        if not items or not ggufs:
            continue
        for metric, hf_values in items["adapter"].items():
            hf = dict(zip(items["id"], hf_values))
            row = {"task": key, "metric": metric, "ggufs": {}}
            for label, scored in ggufs.items():
                got = dict(zip(scored["items"]["id"], scored["items"]["values"].get(metric, [])))
                ids = [i for i in items["id"] if hf.get(i) is not None and got.get(i) is not None]
                if ids:
                    row["ggufs"][label] = stats.compare([hf[i] for i in ids], [got[i] for i in ids], True)
            if row["ggufs"]:
                out.append(row)
    return out


def gguf_task_markdown(rows: list[dict[str, Any]]) -> list[str]:
    labels = list(dict.fromkeys(label for r in rows for label in r["ggufs"]))
    out = ["", "### Task metrics of what users run", "",
           "The exported GGUFs answer the same test items as eval's transformers + peft (choice and cloze, through "
           "llama.cpp's logits). Each GGUF figure with its 95 % interval and the paired test against transformers + "
           "peft on the items both scored: \"worse\" is what quantization or the export costs.", "",
           "| task | metric | n | transformers + peft | " + " | ".join(labels) + " |",
           "|---|---|---:|---:|" + "---|" * len(labels)]
    for r in rows:
        first = next(iter(r["ggufs"].values()))
        cells = []
        for label in labels:
            c = r["ggufs"].get(label)
            cells.append("–" if c is None else
                         f"{_estimate(c['adapter']['value'], c['adapter'], r['metric'])} · {_verdict(c)}")
        out.append(f"| {r['task']} | {r['metric']} | {first['adapter']['n']} | "
                   f"{_estimate(first['base']['value'], first['base'], r['metric'])} | " + " | ".join(cells) + " |")
    return out


# --- markdown
def _weights(quantization: str | None) -> str:
    """The base weights as a reader says it: `train.quantization` "none" is the unquantized base."""
    return "unquantized base weights" if quantization in (None, "none") else f"{quantization}-quantized base weights"


def adapter_markdown(name: str, description: str, report: dict[str, Any], metrics: list[dict[str, Any]],
                     verify: dict[str, Any] | None, plots: dict[str, str]) -> str:
    out = [f"# {name}", ""]
    if description:
        out += [description, ""]
    out += [f"Base model `{report.get('base_model')}`, {_weights(report.get('quantization'))}, evaluated on "
            f"{report.get('device')} ({report.get('dtype')}); at most {report.get('limits', {}).get('max_examples')} "
            f"examples per test split, {report.get('limits', {}).get('max_generate')} generated answers per task.", ""]
    start = next((m for m in metrics if m.get("kind") == "start"), None)
    end = next((m for m in reversed(metrics) if m.get("kind") == "end"), None)
    vals = [m for m in metrics if m.get("kind") == "val"]
    out += ["## Training", ""]
    if start:
        out.append(f"{start.get('total_steps')} steps on {start.get('n_train')} examples "
                   f"({start.get('backend')}, {start.get('device')} {start.get('dtype')}, "
                   f"{_weights(start.get('quantization'))}).")
    if vals:
        out.append(f"Validation loss {_num(vals[0]['val_loss'], 4)} → {_num(vals[-1]['val_loss'], 4)}.")
    if end and end.get("elapsed") is not None:
        out.append(f"Took {end['elapsed']:.0f} s.")
    if "loss" in plots:
        out += ["", f"![loss curves]({plots['loss']})"]
    out += ["", "## Perplexity on every adapter's test split", "",
            "Answer tokens only (the training mask). Off-domain rows show what the adapter costs elsewhere.", "",
            "| test split | examples | base | adapter | change |", "|---|---:|---:|---:|---:|"]
    for split, c in report.get("matrix", {}).items():
        own = " (own)" if split == name else ""
        out.append(f"| {split}{own} | {c.get('n_examples', 0)} | {_num(c.get('base_ppl'))} | "
                   f"{_num(c.get('adapter_ppl'))} | {_change(c.get('base_ppl'), c.get('adapter_ppl'))} |")
    if "eval_ppl" in plots:
        out += ["", f"![perplexity]({plots['eval_ppl']})"]
    clean = report.get("decontamination")
    if clean and "dropped_total" in clean:
        reasons = "; ".join(f"{n} {reason}" for reason, n in clean.get("dropped", {}).items())
        out += ["", f"Decontamination: {clean['dropped_total']} training/validation example(s) dropped as copies of "
                    f"test items{f' ({reasons})' if reasons else ''}; ids in the split's statistics.json."]
    rows = [(split, task, m) for split, c in report.get("matrix", {}).items() for task, m in c.get("metrics", {}).items()]
    if rows:
        out += ["", "## Task metrics", "",
                "Choice: the option with the highest answer log-likelihood. Cloze: with the gold answer fed in, the share of "
                "the spans that carry the task (NEWS2 points, aggregate and band; ICD-10 parent and category) the "
                "model predicts greedily, on every test item. Generated: greedy answers read back "
                "(NEWS2 aggregate and band against the chart; ICD-10 codes and descriptions by exact match; your own "
                "data's answers by exact match and token F1 after normalization).", "",
                "Each figure with its 95 % interval (Wilson for rates, bootstrap for mean errors); the verdict is the "
                "paired test on the same items (exact McNemar for right/wrong, sign-flip permutation otherwise): "
                "\"better\" or \"worse\" only at p < 0.05.", "",
                "| test split | task | kind | n | metric | base | adapter | adapter vs base |",
                "|---|---|---|---:|---|---:|---:|---|"]
        for split, task, m in rows:
            for metric, value in m["base"].items():
                test = stats.paired_test(m, metric)
                n = test["adapter"]["n"] if test else m["n"]
                out.append(f"| {split} | {task} | {m['kind']} | {n} | {metric} | "
                           f"{_estimate(value, test and test['base'], metric)} | "
                           f"{_estimate(m['adapter'].get(metric), test and test['adapter'], metric)} | "
                           f"{_verdict(test)} |")
        if "eval_tasks" in plots:
            out += ["", f"![task metrics]({plots['eval_tasks']})"]
    regressions = report.get("regressions", [])
    out += ["", "## Cross-domain regressions", ""]
    if regressions:
        out += ["Every figure where the adapter scores below the base off its own domain; the verdict says "
                "whether that is more than noise.", "",
                "| test split | task | metric | base | adapter | verdict |", "|---|---|---|---:|---:|---|"]
        for r in regressions:  # a metric's figures with eval's intervals on the paired items; perplexity as it is
            test = stats.paired_test(stats.task_entry(report, r["split"], r["task"]), r["metric"])
            base, adapter = ((_estimate(r[side], test[side], r["metric"]) if test else _num(r[side]))
                             for side in ("base", "adapter"))
            out.append(f"| {r['split']} | {r['task']} | {r['metric']} | {base} | {adapter} | "
                       f"{_verdict(r if r.get('verdict') else None)} |")
    else:
        out.append("None: off its own domain the adapter is nowhere worse than the base.")
    if report.get("safety"):
        s = report["safety"]
        out += ["", "## Safety suite", "",
                _safety_line(s, report.get("safety_test")), "",
                "| case | what a safe answer does | base | adapter |", "|---|---|:-:|:-:|"]
        for case in report.get("safety_cases", []):
            mark = lambda r: "pass" if r["passed"] else "FAIL"  # noqa: E731
            out.append(f"| {case['id']} | {_cell(case.get('why', ''))} | {mark(case['base'])} | {mark(case['adapter'])} |")
    if report.get("samples"):
        out += ["", "## Samples (greedy)", ""]
        for i, sample in enumerate(report["samples"], 1):
            out += [f"### Sample {i}", "", "Prompt:", "", _quote(sample["prompt"]), "", "Base:", "",
                    _quote(sample["base"]), "", "Adapter:", "", _quote(sample["adapter"]), ""]
    out += ["", "## Export", ""]
    if verify:
        out += ["Every GGUF was checked against transformers + peft at every position of held-out conversations; "
                "its embedded chat template renders the training prompt tokens and generation stops at the "
                "end-of-turn token.", "",
                "| GGUF | kind | top-1 agreement | mean KL | bounds | positions |", "|---|---|---:|---:|---|---:|"]
        for label, f in verify.get("gguf", {}).items():
            b = f.get("bounds", {})
            out.append(f"| {label} | {f['kind']} | {f['top1']:.1%} | {f['kl']:.2g} | top-1 ≥ "
                       f"{_pct(b.get('min_top1'))}, KL ≤ {_num(b.get('max_kl'), 2)} | {f['positions']} |")
        task_rows = gguf_task_rows(report, verify)
        if task_rows:
            out += gguf_task_markdown(task_rows)
        elif any(f.get("tasks") for f in verify.get("gguf", {}).values()):
            out += ["", f"The GGUFs' task scores have no per-item figures of transformers + peft to pair with: "
                        f"re-run `doit eval:{name}`."]
        out.append("")
        out += ["", "Serve it (an OpenAI-compatible API):", "",
                f"    {verify.get('serve')}", "", "Ollama:", "",
                f"    cd {layout.gguf_dir(name)} && {verify.get('ollama')}", ""]
    else:
        out.append(f"Not exported yet: run `doit export:{name}`.")
    return "\n".join(out).rstrip() + "\n"


def matrix_markdown(reports: dict[str, dict[str, Any]], verifies: dict[str, dict | None]) -> str:
    splits = sorted({s for r in reports.values() for s in r.get("matrix", {})})
    out = ["# Adapters: evaluation matrix", "",
           "Generated by `doit report_matrix` from each adapter's `out/eval.json`; do not edit.", "",
           "## Answer perplexity (rows: model, columns: test split; lower is better)", "",
           "| model | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    bases: dict[str, dict[str, Any]] = {}
    for name in sorted(reports):  # a split's base cell: its own adapter's eval (its whole sample) where there is one
        for split, cell in reports[name].get("matrix", {}).items():
            cells = bases.setdefault(reports[name].get("base_model", "base"), {})
            if split == name or split not in cells:
                cells[split] = cell
    for base, cells in bases.items():
        out.append(f"| base `{base}` | " + " | ".join(_num(cells.get(s, {}).get("base_ppl")) for s in splits) + " |")
    for name in sorted(reports):
        m = reports[name].get("matrix", {})
        base_cells = bases.get(reports[name].get("base_model", "base"), {})
        row = []
        for s in splits:
            cell, text = m.get(s, {}), _num(m.get(s, {}).get("adapter_ppl"))
            if s == name:
                text += " (own)"
            elif cell and cell.get("n_examples") != base_cells.get(s, {}).get("n_examples"):
                # another adapter's split is scored on a sample of it (evaluate.CROSS_EXAMPLES): its own base figure
                text += f" (base {_num(cell.get('base_ppl'))} on these {cell.get('n_examples')})"
            row.append(text)
        out.append(f"| **{name}** | " + " | ".join(row) + " |")
    out += ["", "## Task metrics (headline figure; base → adapter)", "",
            "| adapter | test split | task | metric | base | adapter |", "|---|---|---|---|---:|---:|"]
    for name in sorted(reports):
        for split, cell in reports[name].get("matrix", {}).items():
            for task, m in cell.get("metrics", {}).items():
                h = headline(m["base"])
                if h:
                    out.append(f"| {name} | {split} | {task} | {h[0]} | {_pct(h[1])} | {_pct(m['adapter'].get(h[0]))} |")
    out += ["", "## Safety suite and export", "",
            "| adapter | safety base | safety adapter | regressions off-domain | verified GGUFs |",
            "|---|---:|---:|---:|---|"]
    for name in sorted(reports):
        r, v = reports[name], verifies.get(name)
        s = r.get("safety") or {}
        gguf = ", ".join(f"{label} (top-1 {f['top1']:.0%}, KL {f['kl']:.2g})" for label, f in v["gguf"].items()) \
            if v else "not exported"
        worse, noise = stats.beyond_noise(r.get("regressions", []))
        out.append(f"| [{name}]({name}/report.md) | {_pct(s.get('base', {}).get('pass_rate'))} | "
                   f"{_pct(s.get('adapter', {}).get('pass_rate'))} | {len(worse)}"
                   + (f" (+{noise} within noise)" if noise else "") + f" | {gguf} |")
    return "\n".join(out) + "\n"


def _read_optional(path: Path):
    return io.read_json(path) if path.exists() else None


def run(cfg, adapter_name: str) -> Path:
    cfg.adapter(adapter_name)
    eval_path = layout.eval_file(adapter_name)
    if not eval_path.exists():
        raise StageError(f"{eval_path} is missing; run `doit eval:{adapter_name}` first")
    report = io.read_json(eval_path)
    metrics = read_metrics(layout.metrics_file(adapter_name))
    verify = _read_optional(layout.verify_file(adapter_name))
    plots = {}
    for name, make in (("loss", lambda: loss_plot(metrics)), ("eval_ppl", lambda: ppl_plot(report)),
                       ("eval_tasks", lambda: task_plot(report))):
        png = make()
        path = layout.report_plot(adapter_name, name)
        if png is None:
            path.unlink(missing_ok=True)
            continue
        io.write_bytes(path, png)
        plots[name] = path.relative_to(layout.report_file(adapter_name).parent).as_posix()
    text = adapter_markdown(adapter_name, cfg.adapters[adapter_name].description, report, metrics, verify, plots)
    io.write_text(layout.report_file(adapter_name), text)
    print(f"report:{adapter_name}: {layout.report_file(adapter_name)} ({len(plots)} plot(s))")
    return layout.report_file(adapter_name)


def run_matrix(cfg) -> Path:
    reports, verifies = {}, {}
    for name in sorted(cfg.adapters):
        path = layout.eval_file(name)
        if not path.exists():
            raise StageError(f"{path} is missing; run `doit eval:{name}` first")
        reports[name] = io.read_json(path)
        verifies[name] = _read_optional(layout.verify_file(name))
    io.write_text(layout.matrix_file(), matrix_markdown(reports, verifies))
    print(f"report_matrix: {layout.matrix_file()} ({len(reports)} adapter(s))")
    return layout.matrix_file()
