"""The Eval view on real eval.json files (tests/fixtures/eval/, PROVENANCE.md there): the matrix (every adapter on
every test split), task metrics with n and 95% intervals, safety per model and the cross-domain regressions, each
labelled for what it is. SVG snapshots at 80x24 (top and bottom of the view) and 160x48."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stages import layout
from tests.pipeline_project import sources_toml
from tui.app import MedforgeApp
from tui.messages import MemoryReading
from tui.screens.eval import wilson

from tui_support import make_project, project_env, table_text, wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
ADAPTERS = ("clinical_coding", "clinical_decision")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def project(tmp_path, monkeypatch):
    return eval_project(tmp_path, monkeypatch, FIXTURES)


def eval_project(tmp_path: Path, monkeypatch, fixtures: Path) -> Path:
    root = make_project(tmp_path / "proj")
    (root / "sources.toml").write_text(sources_toml())  # icd10cm feeds clinical_coding, news2 clinical_decision
    shutil.rmtree(root / "adapters" / "tiny")
    for name in ADAPTERS:
        (root / "adapters" / name).mkdir(parents=True)
        (root / layout.adapter_toml(name)).write_text('description = "default adapter"\n')
        (root / layout.eval_file(name)).parent.mkdir(parents=True)
        shutil.copy(fixtures / f"{name}.json", root / layout.eval_file(name))
    project_env()
    monkeypatch.chdir(root)
    return root


def eval_app(root: Path) -> MedforgeApp:
    return MedforgeApp(root, poll_s=3600, memory_probe=lambda: MemoryReading([], 1, 2), start_view="eval")


def loaded(app) -> bool:
    return app.cfg is not None and "clinical_decision" in table_text(app, "#eval-regressions")


def squeezed(text: str) -> str:
    """A table's text with each row's runs of spaces as one (the nesting indent kept as one space)."""
    return "\n".join((" " if row.startswith(" ") else "") + " ".join(row.split()) for row in text.splitlines())


def test_wilson_interval():
    assert wilson(0.8, 15) == pytest.approx((0.548, 0.930), abs=1e-3)
    lo, hi = wilson(0.0, 12)
    assert lo == 0.0 and hi == pytest.approx(0.243, abs=1e-3)


async def test_eval_view_labels_every_figure(project):
    app = eval_app(project)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="the eval report")
        matrix = table_text(app, "#eval-matrix").splitlines()
        assert len(matrix) == 4  # 2 adapters x 2 test splits
        assert matrix[0].split()[:3] == ["clinical_coding", "clinical_coding", "own"]
        assert matrix[1].split()[:2] == ["clinical_decision", "cross"]
        metrics = table_text(app, "#eval-metrics")
        assert "icd10_billable\n accuracy 15 80% (55–93) 80% (55–93)" in squeezed(metrics)  # n, 95% interval
        decision = squeezed(metrics).split("clinical_decision adapter")[1]
        assert " aggregate_mae 12 13.83 2.92" in decision.split("news2_score\n")[1]  # an error: no interval
        safety = table_text(app, "#eval-safety").splitlines()
        assert [row.split()[-4:-2] for row in safety] == [["adapter", "0/7"], ["base", "2/7"],
                                                          ["adapter", "4/7"], ["base", "2/7"]]
        regressions = table_text(app, "#eval-regressions")
        rows = [row.strip() for row in regressions.splitlines()]
        await pilot.press("ctrl+r")  # says it reloaded, and the figures stay
        await wait_for(pilot, lambda: any("reloaded" in str(n.message) for n in app._notifications), 5, "feedback")
        await wait_for(pilot, lambda: loaded(app), what="the eval report again")
        assert rows == ["clinical_coding adapter on clinical_decision", "perplexity 14.00 15.81",
                        "news2_response", "aggregate_accuracy 8% (1–35) 0% (0–24)",
                        "aggregate_mae 2.60 49.20",  # the NEWS2 regression the issue names
                        "clinical_decision adapter on clinical_coding", "perplexity 34.70 34.96",
                        "icd10_code", "accuracy 20% (7–45) 13% (4–38)"]


async def test_at_80_columns_every_figure_and_verdict_is_in_view(tmp_path, monkeypatch):
    """Over SSH at 80x24 each table fits the width, so the adapter's figure and its verdict mark are on screen, not
    cut off at the right edge (the view scrolls down, never sideways): on the eval.json files of a recent default
    run, whose task and metric names are the longest the sources make (`icd10_describe_cloze · cloze_description`)."""
    from textual.widgets import DataTable

    app = eval_app(eval_project(tmp_path, monkeypatch, FIXTURES / "default_run"))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="the eval report")
        await pilot.pause(0.3)
        for table in app.screen.query(DataTable):
            assert table.virtual_size.width <= table.size.width, f"#{table.id} is cut at 80 columns"
        assert " cloze_parent 243 1% (0–3) 96% (93–98) ▲" in squeezed(table_text(app, "#eval-metrics"))


@pytest.mark.parametrize("size,where", [((80, 24), "top"), ((80, 24), "bottom"), ((160, 48), "top")],
                         ids=["80x24-top", "80x24-bottom", "160x48"])
def test_eval_view_snapshot(project, snap_compare, size, where):
    app = eval_app(project)

    async def ready(pilot):
        await wait_for(pilot, lambda: loaded(app), what="the eval report")
        if where == "bottom":
            app.screen.query_one("#eval-body").scroll_end(animate=False)
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=size, run_before=ready)


async def test_eval_view_shows_the_paired_verdict_and_eval_s_own_intervals(project):
    """eval.json's `stats` (stages.evaluate.paired_stats) decide the colour and the mark: ▲ better, ▼ worse,
    ≈ no detectable difference; intervals, n and the figure beside them come from there too (an error gets its
    bootstrap interval)."""
    import orjson

    from stages import evaluate

    path = project / layout.eval_file("clinical_coding")
    report = orjson.loads(path.read_bytes())
    metrics = report["matrix"]["clinical_coding"]["metrics"]
    base = [{"accuracy": float(i < 50)} for i in range(200)]
    adapter = [{"accuracy": float(i < 50 or i % 2 == 0)} for i in range(200)]
    metrics["icd10_billable"]["stats"] = evaluate.paired_stats(base, adapter)
    errors = evaluate.paired_stats([{"aggregate_mae": 3.0}] * 12, [{"aggregate_mae": 3.0 - (i % 3 == 0)}
                                                                    for i in range(12)])
    metrics["icd10_billable"]["stats"]["aggregate_mae"] = errors["aggregate_mae"]
    # the plain means over each model's own stated items differ from the paired ones: the paired figure is shown
    metrics["icd10_billable"]["base"]["aggregate_mae"], metrics["icd10_billable"]["adapter"]["aggregate_mae"] = 5.71, 2.5
    path.write_bytes(orjson.dumps(report))
    app = eval_app(project)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="the eval report")
        table = table_text(app, "#eval-metrics")
        billable = squeezed(table).split("icd10_billable\n")[1]
        assert billable.startswith(" accuracy 200 ") and " ▲" in billable.split("\n")[0]
        assert " aggregate_mae 12 3.00 (3.00–3.00) 2.67 (2.42–2.92) ≈" in billable


async def test_a_regression_s_interval_is_eval_s_own_on_the_paired_items(tmp_path, monkeypatch):
    """A cross-domain regression's rate carries the interval eval computed on the items both models were scored on
    (its `stats`), as the task metrics table shows it, not one made up from the task's n."""
    import orjson

    root = eval_project(tmp_path, monkeypatch, FIXTURES / "default_run")
    path = root / layout.eval_file("clinical_decision")
    report = orjson.loads(path.read_bytes())
    test = report["matrix"]["clinical_coding"]["metrics"]["icd10_code"]["stats"]["accuracy"]
    test["adapter"].update(n=40, low=0.15, high=0.45)  # fewer paired items than the task's 88: a wider interval
    test["base"].update(n=40, low=0.17, high=0.47)
    path.write_bytes(orjson.dumps(report))
    app = eval_app(root)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="the eval report")
        rows = [row.strip() for row in squeezed(table_text(app, "#eval-regressions")).splitlines()]
        assert "accuracy 30% (17–47) 27% (15–45) ≈" in rows, rows


async def test_the_safety_rows_carry_eval_s_paired_verdict(tmp_path, monkeypatch):
    """The coding adapter's 2/7 -> 1/7 on the same seven cases: eval's exact McNemar cannot tell it from noise (≈);
    an eval.json without the test (the decision adapter's here) shows the rates alone."""
    import orjson

    from stages import stats

    root = eval_project(tmp_path, monkeypatch, FIXTURES / "default_run")
    path = root / layout.eval_file("clinical_coding")
    report = orjson.loads(path.read_bytes())
    report["safety_test"] = stats.compare([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [1.0] + [0.0] * 6,
                                          higher_is_better=True)
    path.write_bytes(orjson.dumps(report))
    app = eval_app(root)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="the eval report")
        rows = [row.split() for row in table_text(app, "#eval-safety").splitlines()]
        assert rows == [["clinical_coding", "adapter", "1/7", "14%", "(3–51)", "≈"], ["base", "2/7", "29%", "(8–64)"],
                        ["clinical_decision", "adapter", "4/7", "57%", "(25–84)"], ["base", "2/7", "29%", "(8–64)"]]
