"""Command palette entries (ctrl+p): every action of the dashboard, searchable by name."""
from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

COMMANDS = [
    ("Pipeline view", "show the task graph and logs", "switch_mode('pipeline')"),
    ("Training view", "loss curves, learning rate, tokens/s, memory", "switch_mode('training')"),
    ("Data view", "records per source, drops, duplicates, splits", "switch_mode('data')"),
    ("Eval view", "eval matrix and safety pass rates", "switch_mode('eval')"),
    ("Chat", "talk to the base model or an adapter", "switch_mode('chat')"),
    ("Run everything", "start doit on all tasks, detached", "run_all"),
    ("Run selected task", "the selected task and what it depends on, detached", "run_selected"),
    ("Forget selected task", "doit forget: it runs next time", "forget_selected"),
    ("Stop the run", "interrupt the detached doit run", "stop_run"),
    ("Help", "every key", "help"),
]


class MedforgeCommands(Provider):
    async def _run(self, action: str) -> None:
        # screen actions (run_selected...) live on the pipeline screen; go there first
        if action in ("run_all", "run_selected", "forget_selected", "stop_run"):
            await self.app.run_action("switch_mode('pipeline')")
            await self.app.screen.run_action(action)
        else:
            await self.app.run_action(action)

    async def discover(self) -> Hits:
        for name, help_text, action in COMMANDS:
            yield DiscoveryHit(name, partial(self._run, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, action in COMMANDS:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), partial(self._run, action), help=help_text)
