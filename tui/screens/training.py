"""Training view: loss and validation loss, learning rate, tokens/s, step/total, ETA, best so far, memory."""
from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from stages import layout
from tui.messages import MemoryReading, MetricsRows, PipelineChanged, RunStateChanged
from tui.state import DONE, FAILED, MAY_RUN, UP_TO_DATE, WILL_RUN, TrainingCurves, duration
from tui.tail import Follower
from tui.widgets.memory import human_bytes, read_memory
from tui.widgets.topbar import TopBar


# the metrics stream's memory keys (stages/train/metrics.py: memory()), at most 9 characters each
MEMORY_LABELS = {
    "rss": "train RSS", "rss_peak": "RSS peak",
    "cuda_allocated": "CUDA used", "cuda_peak": "CUDA peak",
    "mps_allocated": "MPS alloc", "mps_driver": "MPS drv",
    "mlx_active": "MLX used", "mlx_peak": "MLX peak",
}


def adapter_names(app) -> list[str]:
    if app.cfg is not None:
        return sorted(app.cfg.adapters)
    return sorted({n.partition(":")[2] for n in app.pipeline.names() if n.startswith("train:")})


class TrainingScreen(Screen):
    BINDINGS = [
        Binding("left_square_bracket", "cycle(-1)", "Prev adapter"),
        Binding("right_square_bracket", "cycle(1)", "Next adapter"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.adapter: str | None = None
        self.curves = TrainingCurves()
        self.memory: MemoryReading | None = None
        self._follower: Follower | None = None
        self._follow_adapter: str | None = None
        self._poll_timers: dict[str, object] = {}

    def compose(self) -> ComposeResult:
        yield TopBar("training")
        yield Static(id="train-title")
        with Horizontal(id="train-body"):
            with Vertical(id="train-plots"):
                yield PlotextPlot(id="loss-plot")
                yield PlotextPlot(id="lr-plot")
            yield Static(id="train-stats")
        yield Footer()

    def on_mount(self) -> None:
        self.pick_default_adapter()
        self.render_all()
        self.schedule("metrics", 0, self.poll_metrics)
        self.schedule("memory", 0, self.poll_memory)

    def on_screen_resume(self) -> None:
        self.query_one(TopBar).show_run(self.app.running, self.app.run_summary())
        self.pick_default_adapter()

    def pick_default_adapter(self) -> None:
        names = adapter_names(self.app)
        running = [r.item for r in self.app.pipeline.rows() if r.stage == "train" and r.state == "running"]
        if running and running[0] != self.adapter:
            self.adapter = running[0]  # follow what is training now
        elif self.adapter not in names and names:
            self.adapter = names[0]
        self.render_all()

    @on(PipelineChanged)
    def _pipeline_changed(self) -> None:
        self.pick_default_adapter()

    @on(RunStateChanged)
    def _run_state(self, msg: RunStateChanged) -> None:
        self.query_one(TopBar).show_run(msg.running, msg.summary)
        self.render_stats()  # what it says before any metrics depends on the run

    def action_cycle(self, step: int) -> None:
        names = adapter_names(self.app)
        if names:
            i = names.index(self.adapter) if self.adapter in names else 0
            self.adapter = names[(i + step) % len(names)]
            self.curves.reset()
            self.render_all()
            self.schedule("metrics", 0, self.poll_metrics)

    # --- polls: each re-arms only when it finished; hidden views skip the work
    def schedule(self, name: str, delay: float, poll) -> None:
        timer = self._poll_timers.get(name)
        if timer is not None:
            timer.stop()
        self._poll_timers[name] = self.set_timer(max(delay, 0.01), poll)  # textual timers need a delay > 0

    def _poll_round(self, name: str, label: str, delay: float, body, poll) -> None:
        """One round of a repeating poll (in its worker): an error is said once (app.poll_failed) and the
        poll goes on, since the next round may work."""
        try:
            body()
            self.app.poll_ok(label)
        except Exception as exc:
            self.app.poll_failed(label, exc)
        finally:
            if not get_current_worker().is_cancelled:
                self.app.call_from_thread(self.schedule, name, delay, poll)

    @work(thread=True, exclusive=True, group="metrics", exit_on_error=False)
    def poll_metrics(self) -> None:
        self._poll_round("metrics", "training metrics", 1.0, self._read_metrics, self.poll_metrics)

    def _read_metrics(self) -> None:
        adapter = self.adapter
        if adapter is None or not self.is_current:
            return
        reset = adapter != self._follow_adapter
        follower = Follower(self.app.root / layout.metrics_file(adapter)) if reset else self._follower
        rows = follower.read_json()
        # only once read: a round that failed starts over (reset) in the next one
        self._follower, self._follow_adapter = follower, adapter
        if rows or reset or follower.restarted:
            self.post_message(MetricsRows(adapter, rows, reset or follower.restarted))

    @work(thread=True, exclusive=True, group="memory", exit_on_error=False)
    def poll_memory(self) -> None:
        self._poll_round("memory", "memory", 2.0, self._read_memory, self.poll_memory)

    def _read_memory(self) -> None:
        if self.is_current:
            probe = self.app.memory_probe or read_memory
            self.post_message(probe())

    @on(MetricsRows)
    def _metrics(self, msg: MetricsRows) -> None:
        if msg.adapter != self.adapter:
            return
        if msg.reset:
            self.curves.reset()
        self.curves.add(msg.rows)
        self.render_all()

    @on(MemoryReading)
    def _memory(self, msg: MemoryReading) -> None:
        self.memory = msg
        self.render_stats()

    # --- rendering
    def render_all(self) -> None:
        names = adapter_names(self.app)
        title = Text("training · ", style="bold")
        title.append(self.adapter or "no adapters", style="bold cyan")
        if len(names) > 1:
            title.append(f"   ([ ] switch: {', '.join(names)})", style="dim")
        self.query_one("#train-title", Static).update(title)
        self.render_plots()
        self.render_stats()

    def render_plots(self) -> None:
        c = self.curves
        loss_plot = self.query_one("#loss-plot", PlotextPlot)
        plt = loss_plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("loss (train, val)")
        if c.steps:
            plt.plot(c.steps, c.loss, label="train", marker="braille")
            if c.val_steps:
                plt.plot(c.val_steps, c.val_loss, label="val", marker="hd")
            plt.xlim(0, max(c.total_steps or c.steps[-1], c.steps[-1]))
        loss_plot.refresh()
        lr_plot = self.query_one("#lr-plot", PlotextPlot)
        plt = lr_plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("learning rate")
        if c.steps:
            plt.plot(c.steps, c.lr, marker="braille")
            plt.xlim(0, max(c.total_steps or c.steps[-1], c.steps[-1]))
        lr_plot.refresh()

    def render_stats(self) -> None:
        c = self.curves
        out = Text()

        def line(label: str, value: str, style: str = "") -> None:
            out.append(f"{label:<11}", style="dim")
            out.append(value + "\n", style=style)

        if not c.steps and not c.start:
            out.append("no metrics yet\n", style="dim")
            if self.adapter:
                task = f"train:{self.adapter}"
                state = self.app.pipeline.task(task).state
                if state == "running":  # its metrics stream opens once the model and data are loaded
                    out.append(f"{task} is running: loading the model and data\n", style="cyan")
                elif self.app.running:
                    said = {WILL_RUN: "will run in it", MAY_RUN: "may run in it (if its inputs change)",
                            FAILED: "failed in it (its log says why)",
                            UP_TO_DATE: "is up to date (not part of it)", DONE: "finished in it"}.get(state, state)
                    out.append(f"a run is going; {task} {said}\n", style="dim")
                else:
                    out.append(f"run {task} from the pipeline view (1, then r)\n", style="dim")
        else:
            total = c.total_steps
            step = c.steps[-1] if c.steps else 0
            pct = f" ({100 * step / total:.0f}%)" if total else ""
            line("step", f"{step}/{total or '?'}{pct}", "bold")
            if c.end:
                line("status", "finished", "bold green")
            line("loss", f"{c.loss[-1]:.4f}" if c.loss else "–")
            line("val loss", f"{c.val_loss[-1]:.4f}" if c.val_loss else "–")
            best = c.best_val()
            line("best", f"{best[0]:.4f} @ step {best[1]}" if best else "–", "green")
            line("lr", f"{c.lr[-1]:.2e}" if c.lr else "–")
            tok_s = c.last.get("tok_s")
            line("tok/s", f"{tok_s:,.0f} trained" if tok_s else "–")
            line("ETA", "done" if c.end else duration(c.last.get("eta_s")))
            line("elapsed", duration(c.last.get("elapsed") if not c.end else c.end.get("elapsed")))
            if c.start:
                where = " ".join(str(c.start.get(k)) for k in ("device", "dtype", "backend", "quantization")
                                 if c.start.get(k) not in (None, "", "none"))
                line("on", where)
        out.append("memory\n", style="bold")
        mem = c.last.get("memory") or {}  # the training process's own figures (stages/train/metrics.py)
        for key, value in mem.items():
            label = MEMORY_LABELS.get(key, key.replace("_", " "))
            line(" " + label[:9], human_bytes(value))
        reading = self.memory
        if reading is not None:
            for name, used, total in reading.gpus:  # "GPU0 NVIDIA H100 80GB HBM3", from NVML
                index, _, model = name.partition(" ")
                line(" " + index[:9], f"{human_bytes(used)} / {human_bytes(total)}")
                if model and len(reading.gpus) <= 2:
                    out.append(f"  {model[:30]}\n", style="dim")
            if not reading.gpus:
                line(" GPU", "none (NVML)", "dim")
            line(" host RAM", f"{human_bytes(reading.host_used)} / {human_bytes(reading.host_total)}")
        self.query_one("#train-stats", Static).update(out)
