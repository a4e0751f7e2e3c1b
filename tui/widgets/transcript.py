"""A read-only, soft-wrapped, plain-text transcript that streaming answers append to cheaply.

A TextArea re-renders every visible line on each append (~11 ms a time at 120x40, a tenth
of a core while an answer streams, taken from the decoder on a busy machine). Here an append
re-wraps only the last paragraph, repaints only the lines that changed, and reuses the
rendered strips of the others when the view scrolls. Text is never read as markup.
"""
from __future__ import annotations

from rich._wrap import divide_line
from textual import events
from textual.geometry import Size
from textual.strip import Strip
from textual.widgets import Log


class Transcript(Log):
    DEFAULT_CSS = """
    Transcript {
        overflow-x: hidden;
        overflow-y: auto;
        scrollbar-gutter: stable;  /* a scrollbar that comes and goes would change the wrap width */
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(highlight=False, auto_scroll=True, id=id, classes=classes)
        self._paragraphs: list[str] = [""]
        self._starts: list[int] = [0]    # where each paragraph's wrapped lines begin in self._lines
        self._wrap_width = 0
        self._strips: dict[int, Strip] = {}
        self._style = None  # rich_style walks every ancestor: once per style change, not once per line

    @property
    def text(self) -> str:
        return "\n".join(self._paragraphs)

    def _wrap(self, paragraph: str) -> list[str]:
        width = max(self._wrap_width, 1)
        paragraph = self._process_line(paragraph)
        cuts = divide_line(paragraph, width, fold=True) if len(paragraph) > width else []
        return [paragraph[a:b] for a, b in zip([0, *cuts], [*cuts, len(paragraph)])] or [""]

    def _rewrap_from(self, first: int) -> None:
        """Re-wrap paragraphs `first`.. (the ones that changed) and repaint from there down."""
        start = self._starts[first] if first < len(self._starts) else len(self._lines)
        del self._lines[start:], self._starts[first:]
        for paragraph in self._paragraphs[first:]:
            self._starts.append(len(self._lines))
            self._lines.extend(self._wrap(paragraph))
        for y in [y for y in self._strips if y >= start]:
            del self._strips[y]
        self._width = self._wrap_width
        self._set_virtual_size(Size(self._wrap_width, len(self._lines)))
        self.refresh_lines(start, max(len(self._lines) - start, 1))

    def _set_virtual_size(self, size: Size) -> None:
        old = self.virtual_size
        if size == old:
            return
        height = self.scrollable_content_region.height
        if size.width != old.width or (size.height > height) != (old.height > height):
            self.virtual_size = size  # the scrollbar comes or goes: that takes a layout of the screen
        else:
            # a longer transcript in the same box: only the scroll range changes, so skip the
            # screen-wide layout that setting virtual_size asks for on every new line
            self.set_reactive(Log.virtual_size, size)
            self._scroll_update(size)

    def append(self, text: str) -> None:
        if not text:
            return
        at_end = self.is_vertical_scroll_end
        first = len(self._paragraphs) - 1
        parts = text.split("\n")
        self._paragraphs[-1] += parts[0]
        self._paragraphs.extend(parts[1:])
        self._rewrap_from(first)
        if at_end and not self.is_vertical_scrollbar_grabbed:
            self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)

    def clear(self) -> "Transcript":
        super().clear()
        self._paragraphs, self._starts, self._strips = [""], [0], {}
        self._rewrap_from(0)
        return self

    def on_resize(self, event: events.Resize) -> None:
        width = self.scrollable_content_region.width
        if width != self._wrap_width:
            self._wrap_width = width
            self._strips.clear()
            self._rewrap_from(0)
            self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips, self._style = {}, None

    def selection_updated(self, selection) -> None:
        self._strips.clear()
        super().selection_updated(selection)

    def _render_line(self, y: int, scroll_x: int, width: int) -> Strip:
        style = self._style
        if style is None:
            style = self._style = self.rich_style
        if y >= len(self._lines):
            return Strip.blank(width, style)
        return self._render_line_strip(y, style).crop_extend(scroll_x, scroll_x + width, style).apply_offsets(scroll_x, y)

    def _render_line_strip(self, y: int, rich_style) -> Strip:
        if self.text_selection is not None:
            return super()._render_line_strip(y, rich_style)
        strip = self._strips.get(y)
        if strip is None:
            strip = self._strips[y] = super()._render_line_strip(y, rich_style)
        return strip
