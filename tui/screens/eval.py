"""Eval view: per adapter, answer perplexity base vs adapter overall and per task; safety pass rates when present."""
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


def _f(value, digits: int = 3) -> Text:
    return Text("–" if value is None else f"{value:.{digits}f}", justify="right")


def _gain(base, adapter) -> Text:
    if not base or adapter is None:
        return Text("–", justify="right")
    change = (adapter - base) / base * 100
    return Text(f"{change:+.1f}%", style="green" if change < 0 else "red", justify="right")


def safety_rates(report: dict) -> list[tuple[str, float]]:
    """Safety pass rates, whichever shape the eval writes: {name: rate} or {name: {"pass_rate": rate}}."""
    safety = report.get("safety")
    if isinstance(safety, (int, float)):
        return [("safety", float(safety))]
    if not isinstance(safety, dict):
        return []
    out = []
    for name, value in safety.items():
        if isinstance(value, dict):
            value = value.get("pass_rate")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out


class EvalScreen(ReportScreen):

    def compose(self) -> ComposeResult:
        yield TopBar("eval")
        with VerticalScroll(id="eval-body"):
            yield Static(Text("answer perplexity: base → adapter (lower is better)", style="bold"), classes="section")
            yield DataTable(id="eval-matrix", cursor_type="none", show_cursor=False)
            yield Static(Text("safety pass rates", style="bold"), classes="section")
            yield DataTable(id="eval-safety", cursor_type="none", show_cursor=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#eval-matrix", DataTable).add_columns("adapter", "task", "n", "base ppl", "adapter ppl", "change")
        self.query_one("#eval-safety", DataTable).add_columns("adapter", "check", "pass rate")
        self.action_reload()

    @work(thread=True, exclusive=True, group="eval", exit_on_error=False)
    def load(self) -> None:
        cfg = self.app.cfg
        if cfg is not None:
            self.post_message(ReportLoaded("eval", eval_report(self.app.root, sorted(cfg.adapters))))

    @on(ReportLoaded)
    def _loaded(self, msg: ReportLoaded) -> None:
        if msg.kind != "eval":
            return
        matrix = self.query_one("#eval-matrix", DataTable)
        safety = self.query_one("#eval-safety", DataTable)
        matrix.clear()
        safety.clear()
        reports = msg.data["adapters"]
        for name, rep in reports.items():
            matrix.add_row(Text(name, style="bold"), Text("all"), Text(f"{rep.get('n_examples', 0):,}", justify="right"),
                           _f(rep.get("base_ppl")), _f(rep.get("adapter_ppl")),
                           _gain(rep.get("base_ppl"), rep.get("adapter_ppl")))
            for task, t in (rep.get("tasks") or {}).items():
                matrix.add_row(Text(""), Text(task), Text(f"{t.get('n_examples', 0):,}", justify="right"),
                               _f(t.get("base_ppl")), _f(t.get("adapter_ppl")),
                               _gain(t.get("base_ppl"), t.get("adapter_ppl")))
            for check, rate in safety_rates(rep):
                safety.add_row(Text(name), Text(check), Text(f"{rate:.0%}", justify="right",
                                                             style="green" if rate >= 0.95 else "red"))
        if not reports:
            matrix.add_row(Text("–", style="dim"), Text("no eval yet: run eval:<adapter>", style="dim"),
                           Text(""), Text(""), Text(""), Text(""))
        if not safety.row_count:
            safety.add_row(Text("–", style="dim"), Text("no safety results in eval.json", style="dim"), Text(""))
