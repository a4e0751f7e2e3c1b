"""Data view: records per source, drops by reason, duplicates removed, split sizes per adapter."""
from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Static

from tui.messages import ReportLoaded
from tui.reports import data_report
from tui.screens.report_screen import ReportScreen
from tui.widgets.topbar import TopBar


def _n(value) -> Text:
    return Text("–" if value is None else f"{value:,}", justify="right")


def dedup_note(total: dict | None, cleaning: dict | None) -> Text:
    """One line over all sources: what cleaning dropped (by reason), the duplicates removed, what was kept."""
    if not total:
        return Text("dedup has not run yet", style="dim")
    if "exact_dups" in total:
        dups = total["exact_dups"] + total.get("near_dups", 0)
    else:  # an older report: `removed` is every example not kept
        dups = total["removed"] - total.get("dropped", 0)
    note = f"dedup: {total['in']:,} in"
    if cleaning is not None:
        by_reason = ", ".join(f"{n:,} {reason.replace('_', ' ')}"
                              for reason, n in sorted(cleaning.items(), key=lambda kv: (-kv[1], kv[0])) if n)
        note += f", {sum(cleaning.values()):,} dropped by cleaning" + (f" ({by_reason})" if by_reason else "")
    groups = total.get("duplicate_clusters")  # the copies came in this many groups (one kept of each)
    note += f", {dups:,} duplicates removed" + (f" ({groups:,} groups of copies)" if groups else "")
    note += f", {total['kept']:,} kept"
    return Text(note, style="dim")


class DataScreen(ReportScreen):

    def compose(self) -> ComposeResult:
        yield TopBar("data")
        with VerticalScroll(id="data-body"):
            yield Static(Text("sources", style="bold"), classes="section")
            yield DataTable(id="data-sources", cursor_type="none", show_cursor=False)
            yield Static(id="dedup-total", classes="note")
            yield Static(Text("drops by reason", style="bold"), classes="section")
            yield DataTable(id="data-drops", cursor_type="none", show_cursor=False)
            yield Static(Text("splits", style="bold"), classes="section")
            yield DataTable(id="data-splits", cursor_type="none", show_cursor=False)
        yield Footer()

    def on_mount(self) -> None:
        for table_id, columns in (("#data-sources", ("source", "pages", "examples", "cleaned out", "exact dup",
                                                    "near dup", "kept")),
                                  ("#data-drops", ("where", "reason", "count")),
                                  ("#data-splits", ("adapter", "examples", "train", "val", "test"))):
            self.query_one(table_id, DataTable).add_columns(*columns)
        self.action_reload()

    @work(thread=True, exclusive=True, group="data", exit_on_error=False)
    def load(self) -> None:
        cfg = self.app.cfg
        if cfg is None:
            return
        sources = [s.name for s in cfg.enabled_sources()]
        self.post_message(ReportLoaded("data", data_report(self.app.root, sources, sorted(cfg.adapters))))

    @on(ReportLoaded)
    def _loaded(self, msg: ReportLoaded) -> None:
        if msg.kind != "data":
            return
        report = msg.data
        table = self.query_one("#data-sources", DataTable)
        table.clear()
        for r in report["sources"]:
            table.add_row(Text(r["source"]), _n(r["pages"]), _n(r["examples"]), _n(r["cleaned_out"]),
                          _n(r["exact_dups"]), _n(r["near_dups"]), _n(r["kept"]))
        self.query_one("#dedup-total", Static).update(dedup_note(report.get("dedup_total"), report.get("clean_total")))
        table = self.query_one("#data-drops", DataTable)
        table.clear()
        for d in report["drops"]:
            table.add_row(Text(d["where"]), Text(d["reason"]), _n(d["count"]))
        if not report["drops"]:
            table.add_row(Text("–", style="dim"), Text("nothing dropped yet", style="dim"), Text(""))
        table = self.query_one("#data-splits", DataTable)
        table.clear()
        for s in report["splits"]:
            table.add_row(Text(s["adapter"]), _n(s.get("examples")), _n(s.get("train")), _n(s.get("val")),
                          _n(s.get("test")))
        if not report["splits"]:
            table.add_row(Text("–", style="dim"), Text("no splits yet"), Text(""), Text(""), Text(""))
