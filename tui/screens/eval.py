"""Eval view: what eval:<adapter> wrote (adapters/<a>/out/eval.json), each figure labelled for what it is.

- the matrix: every adapter on every adapter's test split (its own and the others'), answer perplexity
  base → adapter;
- task metrics per split, base → adapter, with their n, a 95% interval and eval's paired verdict
  (▲ better, ▼ worse, ≈ no detectable difference);
- safety pass rates per model (base, adapter);
- cross-domain regressions: off its own domain, where the adapter scores below the base, each marked by eval's
  paired verdict (▼ worse, ≈ a drop within noise; perplexity has no test and stands as measured).
"""
from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Static

from tui.messages import ReportLoaded
from tui.reports import eval_report
from tui.screens.report_screen import ReportScreen
from tui.widgets.topbar import TopBar

# rates: higher is better, shown as percentages with an interval (stages.evaluate.HIGHER_IS_BETTER, read
# once the view loads a report: the module is cheap, but nothing of a stage loads before the first frame)
RATES: set[str] = set()


def _f(value, digits: int = 2) -> Text:
    return Text("–" if value is None else f"{value:.{digits}f}", justify="right")


def _change(base, adapter) -> Text:
    if not base or adapter is None:
        return Text("–", justify="right")
    change = (adapter - base) / base * 100
    return Text(f"{change:+.1f}%", style="green" if change < 0 else "red", justify="right")


def wilson(rate: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a rate measured on n cases (stages.stats, as eval computes it), for an older
    eval.json that gives no interval of its own."""
    from stages import stats  # light, but a stage module: loaded with the first report, not the first frame

    return stats.wilson(rate * n, n)


def _metric(metric: str, value, n: int, interval=None, style: str = "") -> Text:
    if value is None:
        return Text("–", justify="right")
    if metric in RATES:
        lo, hi = interval or wilson(float(value), n)
        return Text(f"{value:.0%} ({lo * 100:.0f}–{hi * 100:.0f})", style=style, justify="right")
    text = f"{value:.2f}" + (f" ({interval[0]:.2f}–{interval[1]:.2f})" if interval else "")
    return Text(text, style=style, justify="right")


def _better(metric: str, base, adapter) -> str:
    if base is None or adapter is None or base == adapter:
        return ""
    return "green" if (adapter > base) == (metric in RATES) else "red"


def _estimate(m: dict, side: str, metric: str) -> dict:
    from stages import stats

    return stats.paired_test(m, metric).get(side) or {}


def _figure(m: dict, side: str, metric: str):
    """The figure shown beside its interval: the paired estimate's (on the items where both models have the
    metric, as its n says: a NEWS2 error needs both to state a score), else the plain mean (an older eval.json)."""
    return _estimate(m, side, metric).get("value", (m.get(side) or {}).get(metric))


def _interval(m: dict, side: str, metric: str):
    """The interval eval.json gives itself, if any: {"stats": {metric: {"base": {"low", "high"}, ...}}}."""
    estimate = _estimate(m, side, metric)
    if estimate.get("low") is not None and estimate.get("high") is not None:
        return estimate["low"], estimate["high"]
    found = ((m.get("ci") or {}).get(side) or {}).get(metric)
    return tuple(found) if isinstance(found, (list, tuple)) and len(found) == 2 else None


VERDICT_MARK = {"better": ("▲", "green"), "worse": ("▼", "red"), "no detectable difference": ("≈", "")}


def _adapter_cell(m: dict, metric: str, n: int, base, adapter) -> Text:
    """The adapter's figure, coloured and marked by eval's paired verdict (▲ better, ▼ worse, ≈ no detectable
    difference); without one (an older eval.json), coloured by the raw difference."""
    from stages import stats

    test = stats.paired_test(m, metric)
    mark, style = VERDICT_MARK.get(test.get("verdict"), ("", _better(metric, base, adapter)))
    cell = _metric(metric, adapter, n, _interval(m, "adapter", metric), style)
    if mark and adapter is not None:
        cell.append(f" {mark}", style=style)
    return cell


def safety_rows(report: dict) -> tuple[str, list[tuple[str, dict]]]:
    """Safety results as ("model" or "check", [(label, {"pass_rate", "passed", "n"})]): eval.json has them
    per model ({"base": {...}, "adapter": {...}}); older files had {check: rate or {"pass_rate": rate}}."""
    safety = report.get("safety")
    if isinstance(safety, (int, float)) and not isinstance(safety, bool):
        return "check", [("safety", {"pass_rate": float(safety)})]
    if not isinstance(safety, dict):
        return "model", []
    kind = "model" if set(safety) <= {"base", "adapter"} else "check"
    rows = []
    for name, value in safety.items():
        value = value if isinstance(value, dict) else {"pass_rate": value}
        if isinstance(value.get("pass_rate"), (int, float)) and not isinstance(value["pass_rate"], bool):
            rows.append((name, value))
    return kind, rows


def matrix_cells(name: str, report: dict) -> list[tuple[str, dict]]:
    """(split, cell) for every split this adapter was measured on, its own first; a report without a
    matrix has its own split only."""
    matrix = report.get("matrix") or {name: report}
    return sorted(matrix.items(), key=lambda item: (item[0] != name, item[0]))


class EvalScreen(ReportScreen):

    def compose(self) -> ComposeResult:
        yield TopBar("eval")
        with VerticalScroll(id="eval-body"):
            yield Static(Text("eval matrix · answer perplexity, base → adapter (lower is better)", style="bold"),
                         classes="section")
            yield DataTable(id="eval-matrix", cursor_type="none", show_cursor=False)
            yield Static(Text("task metrics · base → adapter on n cases; rates with a 95% interval", style="bold"),
                         classes="section")
            yield DataTable(id="eval-metrics", cursor_type="none", show_cursor=False)
            yield Static(Text("safety suite · pass rate per model", style="bold"), classes="section")
            yield DataTable(id="eval-safety", cursor_type="none", show_cursor=False)
            yield Static(Text("cross-domain regressions · adapter below base (▼ worse, ≈ within noise)",
                              style="bold"), classes="section")
            yield DataTable(id="eval-regressions", cursor_type="none", show_cursor=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#eval-matrix", DataTable).add_columns("adapter", "test split", "", "n", "base", "adapter",
                                                              "change")
        self.query_one("#eval-metrics", DataTable).add_columns("metric", "n", "base", "adapter")
        self.query_one("#eval-safety", DataTable).add_columns("adapter", "model", "passed", "pass rate (95%)")
        self.query_one("#eval-regressions", DataTable).add_columns("metric", "base", "adapter")
        self.action_reload()

    @work(thread=True, exclusive=True, group="eval", exit_on_error=False)
    def load(self) -> None:
        from stages.evaluate import HIGHER_IS_BETTER

        RATES.update(HIGHER_IS_BETTER)
        cfg = self.app.cfg
        if cfg is not None:
            self.post_message(ReportLoaded("eval", eval_report(self.app.root, sorted(cfg.adapters))))

    @on(ReportLoaded)
    def _loaded(self, msg: ReportLoaded) -> None:
        if msg.kind != "eval":
            return
        tables = {key: self.query_one(f"#eval-{key}", DataTable)
                  for key in ("matrix", "metrics", "safety", "regressions")}
        for table in tables.values():
            table.clear()
        reports = msg.data["adapters"]
        for name, report in reports.items():
            self._matrix(tables["matrix"], name, report)
            self._metrics(tables["metrics"], name, report)
            self._safety(tables["safety"], name, report)
            self._regressions(tables["regressions"], name, report)
        empty = {"matrix": "no eval yet: run eval:<adapter>", "metrics": "no task metrics in eval.json",
                 "safety": "no safety results in eval.json",
                 "regressions": "none: off its own domain no adapter does worse than the base"
                 if reports else "no eval yet"}
        for key, table in tables.items():
            if not table.row_count:
                table.add_row(Text(empty[key], style="dim"), *[Text("")] * (len(table.columns) - 1))

    @staticmethod
    def _matrix(table: DataTable, name: str, report: dict) -> None:
        for i, (split, cell) in enumerate(matrix_cells(name, report)):
            table.add_row(Text(name if i == 0 else "", style="bold"), Text(split),
                          Text("own" if split == name else "cross", style="dim"),
                          Text(f"{cell.get('n_examples', 0):,}", justify="right"),
                          _f(cell.get("base_ppl")), _f(cell.get("adapter_ppl")),
                          _change(cell.get("base_ppl"), cell.get("adapter_ppl")))

    @staticmethod
    def _metrics(table: DataTable, name: str, report: dict) -> None:
        first = True
        for split, cell in matrix_cells(name, report):
            metrics = cell.get("metrics") or {}
            if not metrics:
                continue
            if first:
                table.add_row(Text(f"{name} adapter", style="bold"), Text(""), Text(""), Text(""))
                first = False
            own = " (own)" if split == name else ""
            table.add_row(Text(f"  on {split}{own}", style="italic"), Text(""), Text(""), Text(""))
            for task, m in sorted(metrics.items()):
                n = int(m.get("n") or 0)
                base, adapter = m.get("base") or {}, m.get("adapter") or {}
                table.add_row(Text(f"    {task}"), Text(""), Text(""), Text(""))
                for metric in sorted(set(base) | set(adapter)):
                    b, a = _figure(m, "base", metric), _figure(m, "adapter", metric)
                    pairs = _estimate(m, "adapter", metric).get("n", n)
                    table.add_row(Text(f"      {metric}"), Text(str(pairs), justify="right"),
                                  _metric(metric, b, pairs, _interval(m, "base", metric)),
                                  _adapter_cell(m, metric, pairs, b, a))

    @staticmethod
    def _safety(table: DataTable, name: str, report: dict) -> None:
        kind, rows = safety_rows(report)
        # eval's paired test of the same cases marks the adapter's rate: ▲ better, ▼ worse, ≈ within noise
        mark, style = VERDICT_MARK.get((report.get("safety_test") or {}).get("verdict"), ("", ""))
        for i, (label, result) in enumerate(rows):
            rate, n = float(result["pass_rate"]), result.get("n")
            passed = f"{result['passed']}/{n}" if n and result.get("passed") is not None else "–"
            shown = f"{rate:.0%}" + (" ({:.0f}–{:.0f})".format(*(x * 100 for x in wilson(rate, int(n)))) if n else "")
            cell = Text(shown, justify="right", style="green" if rate >= 0.95 else "red")
            if kind == "model" and label == "adapter" and mark:
                cell.append(f" {mark}", style=style)
            label = label if kind == "model" else f"check: {label}"
            table.add_row(Text(name if i == 0 else "", style="bold"), Text(label), Text(passed, justify="right"), cell)

    @staticmethod
    def _regressions(table: DataTable, name: str, report: dict) -> None:
        from stages import stats

        split = task = None
        for r in report.get("regressions") or []:
            if r.get("split") != split:
                split, task = r.get("split"), None
                table.add_row(Text.assemble((f"{name} adapter", "bold"), f" on {split}"), Text(""), Text(""))
            metric = r.get("metric", "")
            if r.get("task") == "all" and metric == "ppl":
                what = "    perplexity"
            else:
                if r.get("task") != task:
                    task = r.get("task")
                    table.add_row(Text(f"    {task}"), Text(""), Text(""))
                what = f"      {metric}"
            # a rate's interval as the task metrics table shows it: eval's own, on the paired items
            m = stats.task_entry(report, r.get("split"), r.get("task"))
            n = int(_estimate(m, "adapter", metric).get("n", m.get("n") or 0))
            base, adapter = (_metric(metric, r.get(side), n, _interval(m, side, metric)) if metric in RATES and n
                             else _f(r.get(side)) for side in ("base", "adapter"))
            # ▼ worse by the paired test, ≈ a drop within noise; no test (perplexity): red as it stands
            mark, style = VERDICT_MARK.get(r.get("verdict"), ("", "red"))
            adapter.stylize(style)
            if mark:
                adapter.append(f" {mark}", style=style)
            table.add_row(Text(what), base, adapter)
