"""medforge's terminal dashboard (Textual). Heavy imports stay inside: `tui.runner` and friends are cheap."""
