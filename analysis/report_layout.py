"""A small typesetter for the PDF report: blocks flowed onto A4 pages, drawn with matplotlib.

The report is a sequence of blocks (headings, paragraphs, typeset tables, framed boxes and figures
with captions). ``Document.layout`` measures every block (text widths come from matplotlib's own
font metrics, so wrapping is exact), places them on pages, splits long tables and paragraphs across
pages and keeps a heading with what follows it. ``Document.write`` then draws one page at a time:
each figure is drawn once, into a ``SubFigure`` of the page (matplotlib's constrained layout works
inside it), and the same drawing is also saved cropped to its own PDF (vector) and PNG, so a figure in
``<name>_files/`` is exactly the one on the page. Tables are drawn as text grids with booktabs rules
and are written as CSV beside the figures.

Determinism: no dates or producer strings in any PDF (``CreationDate`` None), no "Software" entry
in PNGs, ``svg.hashsalt`` fixed, and nothing depends on the clock or on dictionary order of the
filesystem, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure, SubFigure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

PAGE_W, PAGE_H = 8.27, 11.69      # A4 portrait, inches
MARGIN_X = 0.8                    # left and right page margin, inches
MARGIN_TOP = 0.75                 # top margin (the running head sits inside it), inches
MARGIN_BOTTOM = 0.7               # bottom margin (the page number sits inside it), inches
BODY_W = PAGE_W - 2 * MARGIN_X
BODY_H = PAGE_H - MARGIN_TOP - MARGIN_BOTTOM
SERIF = "DejaVu Serif"            # prose and tables; figures keep matplotlib's sans-serif
FontStyle = Literal["normal", "italic", "oblique"]  # the styles FontProperties accepts
# keys typed Any: the stubs want rcParams names as a Literal, which a dict literal of str does not infer
RC: dict[Any, Any] = {"svg.hashsalt": "onestep-probe", "pdf.fonttype": 3, "font.size": 8, "axes.titlesize": 8,
      "axes.labelsize": 7.5, "xtick.labelsize": 6.5, "ytick.labelsize": 6.5, "legend.fontsize": 6.5,
      "figure.dpi": 100}
PDF_META = {"Creator": "onestep-probe", "Producer": None, "CreationDate": None, "ModDate": None}

# verdict -> (text colour, cell colour)
VERDICT_STYLE = {"supported": ("#116329", "#d5f5dc"), "contradicted": ("#a40e26", "#ffe0e0"),
                 "inconclusive": ("#7d4e00", "#fff3c4"), "refused": ("#424a53", "#e6e9ed")}
GRID = 1440                       # page grid for subfigure rows, units per inch
SHRINK = 0.72                     # a figure may be drawn this much smaller to fit the rest of a page
GREY_CELL = "#e4e4e4"             # table cells within the floor's spread
RULE = "#222222"


# ------------------------------------------------------------------------------ measuring
@lru_cache(maxsize=1)
def _renderer():
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(10, 10, 72)  # 72 dpi: one pixel is one point


@lru_cache(maxsize=20000)
def text_width(s: str, size: float, weight: str = "normal", style: str = "normal", family: str = SERIF) -> float:
    """Width of one line of text in inches, from the same font metrics the PDF uses."""
    from matplotlib.font_manager import FontProperties

    if not s:
        return 0.0
    # the callers pass only the three valid styles; the str signature keeps lru_cache keys simple
    prop = FontProperties(family=family, size=size, weight=weight, style=cast(FontStyle, style))
    w, _, _ = _renderer().get_text_width_height_descent(s, prop, ismath=False)
    return w / 72.0


def wrap(text: str, width: float, size: float, weight: str = "normal", style: str = "normal",
         first_width: float | None = None) -> list[str]:
    """Greedy word wrap to ``width`` inches (the first line to ``first_width``); explicit newlines kept."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        words, line = para.split(" "), ""
        for word in words:
            limit = first_width if (first_width is not None and not lines) else width
            trial = f"{line} {word}" if line else word
            if text_width(trial, size, weight, style) <= limit or not line:
                line = trial
                while text_width(line, size, weight, style) > limit and len(line) > 1:  # one over-long word
                    cut = len(line) - 1
                    while cut > 1 and text_width(line[:cut], size, weight, style) > limit:
                        cut -= 1
                    lines.append(line[:cut])
                    line = line[cut:]
                    limit = width
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def leading(size: float) -> float:
    """Line distance in inches for a font size in points."""
    return 1.32 * size / 72.0


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40] or "x"


# ---------------------------------------------------------------------------------- blocks
class Block:
    """Something placed on a page: it has a height for the body width and draws itself there."""

    space_before = 0.0   # inches above (dropped at the top of a page)
    keep_with_next = False

    def height(self) -> float:
        raise NotImplementedError

    def split(self, avail: float):
        """(part that fits in ``avail`` inches, the rest) or None when it cannot be split usefully."""
        return None

    def least_height(self) -> float:
        """The least room that lets this block start on a page (a heading needs that much below it)."""
        return self.height()

    def draw(self, page: PageCanvas, top: float) -> None:
        raise NotImplementedError


class PageCanvas:
    """Drawing helpers in inches from the page's top-left corner."""

    def __init__(self, fig: Figure):
        self.fig = fig

    def _xy(self, x: float, y: float) -> tuple[float, float]:
        return x / PAGE_W, 1 - y / PAGE_H

    def text(self, x, y, s, size=9, weight="normal", style="normal", color="black", ha="left", va="baseline",
             family=SERIF):
        self.fig.text(*self._xy(x, y), s, fontsize=size, weight=weight, style=style, color=color, ha=ha, va=va,
                      family=family, parse_math=False)

    def hline(self, x0, x1, y, lw=0.6, color=RULE):
        self.fig.add_artist(Line2D([x0 / PAGE_W, x1 / PAGE_W], [1 - y / PAGE_H] * 2, lw=lw, color=color,
                                   transform=self.fig.transFigure, solid_capstyle="butt"))

    def rect(self, x, y, w, h, face, edge="none", lw=0.0):
        self.fig.add_artist(Rectangle((x / PAGE_W, 1 - (y + h) / PAGE_H), w / PAGE_W, h / PAGE_H, facecolor=face,
                                      edgecolor=edge, lw=lw, transform=self.fig.transFigure, zorder=-1))


@dataclass
class Heading(Block):
    text: str
    level: int = 1                # 1 section, 2 subsection
    anchor: str | None = None     # contents entry this heading starts (its page is recorded)

    def __post_init__(self):
        self.size = 13.0 if self.level == 1 else 10.5
        self.space_before = 0.22 if self.level == 1 else 0.14
        self.keep_with_next = True

    def height(self):
        return leading(self.size) + 0.06

    def draw(self, page, top):
        page.text(MARGIN_X, top + self.size / 72.0, self.text, size=self.size, weight="bold")
        if self.level == 1:
            page.hline(MARGIN_X, MARGIN_X + BODY_W, top + leading(self.size) + 0.02, lw=0.5, color="0.55")


@dataclass
class Paragraph(Block):
    text: str
    size: float = 9.0
    style: str = "normal"
    weight: str = "normal"
    color: str = "black"
    bullet: str | None = None     # e.g. "•" or "1." hung in the left margin of the text
    label: str | None = None      # bold run-in label ("Figure 3.")
    indent: float = 0.0           # left indent, inches
    space_before: float = 0.07
    lines: list | None = None     # the wrapped lines (set by __post_init__ or by split)

    def __post_init__(self):
        if self.lines is None:
            width = BODY_W - self.indent - (0.22 if self.bullet else 0.0)
            first = width - text_width(self.label + " ", self.size, "bold") if self.label else None
            self.lines = wrap(self.text, width, self.size, self.weight, self.style, first_width=first)

    def height(self):
        assert self.lines is not None  # set by __post_init__
        return len(self.lines) * leading(self.size)

    def least_height(self):
        return min(self.height(), 2 * leading(self.size))

    def split(self, avail):
        assert self.lines is not None  # set by __post_init__
        n = int(avail // leading(self.size))
        if n < 2 or len(self.lines) - n < 2:
            return None
        head = Paragraph(self.text, self.size, self.style, self.weight, self.color, self.bullet, self.label,
                         self.indent, self.space_before, self.lines[:n])
        tail = Paragraph(self.text, self.size, self.style, self.weight, self.color, None, None,
                         self.indent + (0.22 if self.bullet else 0.0), 0.0, self.lines[n:])
        return head, tail

    def draw(self, page, top):
        x = MARGIN_X + self.indent
        if self.bullet:
            page.text(x + 0.05, top + self.size / 72.0, self.bullet, size=self.size, color=self.color)
            x += 0.22
        assert self.lines is not None  # set by __post_init__
        for i, line in enumerate(self.lines):
            y = top + self.size / 72.0 + i * leading(self.size)
            dx = 0.0
            if i == 0 and self.label:
                page.text(x, y, self.label, size=self.size, weight="bold", color=self.color)
                dx = text_width(self.label + " ", self.size, "bold")
            page.text(x + dx, y, line, size=self.size, weight=self.weight, style=self.style, color=self.color)


@dataclass
class Column:
    label: str
    align: str = "left"           # "left" | "right" | "center"
    wrap: bool = False            # may wrap onto several lines (takes the width left over)


@dataclass
class Table(Block):
    """A typeset table: booktabs rules, measured column widths, optional cell colours.

    ``cells`` are display strings; ``csv`` (the unformatted data) is written to the files dir.
    """

    columns: list
    cells: list                                   # rows of strings
    caption: str = ""                             # "Table N." is prefixed when numbered
    number: int | None = None
    name: str = "table"
    csv: pd.DataFrame | None = None
    bg: dict = field(default_factory=dict)        # (row, col) -> face colour
    fg: dict = field(default_factory=dict)        # (row, col) -> text colour
    bold: set = field(default_factory=set)        # (row, col) drawn bold
    size: float = 7.5
    boxed: bool = False                           # a framed key/value box instead of a booktabs table
    header: bool = True
    continued: bool = False
    space_before: float = 0.12
    note: str = ""                                # a line under the table (what grey means, units)

    def __post_init__(self):
        self._fit()

    # --- sizes
    def _fit(self):
        """Column widths: natural (longest line) when the table fits; otherwise the wrapping columns share
        what the others leave, never narrower than their longest word; otherwise a smaller font."""
        pad = 0.08
        total = BODY_W - (0.16 if self.boxed else 0.0)
        while True:
            natural, minimum = [], []
            for j, col in enumerate(self.columns):
                cells = [(str(r[j]), "bold" if (i, j) in self.bold else "normal") for i, r in enumerate(self.cells)]
                lines = [text_width(t, self.size, w) for s, w in cells for t in s.split("\n")]
                words = [text_width(t, self.size, w) for s, w in cells for t in s.replace("\n", " ").split(" ")] \
                    if col.wrap else lines
                head = [text_width(t, self.size, "bold") for t in col.label.split(" ")] if self.header else []
                natural.append(max(lines + head + [0.05]) + 2 * pad)
                minimum.append(max(words + head + [0.05]) + 2 * pad)
            if sum(natural) <= total:
                widths = natural
                break
            wraps = [j for j, c in enumerate(self.columns) if c.wrap]
            left = total - sum(n for n, c in zip(natural, self.columns) if not c.wrap)
            if wraps and left >= sum(minimum[j] for j in wraps):
                extra = left - sum(minimum[j] for j in wraps)
                want = sum(natural[j] - minimum[j] for j in wraps)
                widths = list(natural)
                for j in wraps:
                    widths[j] = minimum[j] + (extra * (natural[j] - minimum[j]) / want if want > 0 else 0.0)
                break
            if self.size <= 5.5:  # still too wide at the smallest size: squeeze proportionally
                widths = [w * total / sum(natural) for w in natural]
                break
            self.size -= 0.5
        natural = widths
        self.widths = natural
        self.pad = pad
        self.wrapped = [[wrap(str(s), w - 2 * pad + 0.01, self.size) if self.columns[j].wrap else str(s).split("\n")
                         for j, (s, w) in enumerate(zip(r, natural))] for r in self.cells]
        self.head_lines = [wrap(c.label, w - 2 * pad + 0.01, self.size, "bold") for c, w in zip(self.columns, natural)]
        self.caption_lines = wrap(self._caption(), BODY_W, 8.5, first_width=BODY_W - text_width(
            self._label() + " ", 8.5, "bold")) if self.caption else []
        self.note_lines = wrap(self.note, BODY_W, 7.0, style="italic") if self.note else []

    def _label(self):
        return f"Table {self.number}." if self.number is not None else ""

    def _caption(self):
        return self.caption + (" (continued)" if self.continued else "")

    def _row_h(self, i):
        return max(len(c) for c in self.wrapped[i]) * leading(self.size) + 0.05

    def _head_h(self):
        return (max(len(c) for c in self.head_lines) * leading(self.size) + 0.07) if self.header else 0.0

    def _cap_h(self):
        return len(self.caption_lines) * leading(8.5) + (0.06 if self.caption_lines else 0.0)

    def height(self):
        return (self._cap_h() + self._head_h() + sum(self._row_h(i) for i in range(len(self.cells))) + 0.06
                + len(self.note_lines) * leading(7.0) + (0.04 if self.note_lines else 0.0))

    def least_height(self):
        if self.boxed or len(self.cells) < 5:
            return self.height()
        return self._cap_h() + self._head_h() + sum(self._row_h(i) for i in range(3)) + 0.06

    def split(self, avail):
        if self.boxed:  # a box is read as one thing: it moves whole
            return None
        fixed = self._cap_h() + self._head_h() + 0.06 + len(self.note_lines) * leading(7.0)
        n, used = 0, fixed
        while n < len(self.cells) and used + self._row_h(n) <= avail:
            used += self._row_h(n)
            n += 1
        if n < 3 or len(self.cells) - n < 2:
            return None
        parts = []
        for rows, cont in ((range(0, n), self.continued), (range(n, len(self.cells)), True)):
            shift = rows.start
            parts.append(Table(self.columns, [self.cells[i] for i in rows], self.caption, self.number, self.name,
                               self.csv if shift == 0 else None,
                               {(r - shift, c): v for (r, c), v in self.bg.items() if r in rows},
                               {(r - shift, c): v for (r, c), v in self.fg.items() if r in rows},
                               {(r - shift, c) for (r, c) in self.bold if r in rows}, self.size, self.boxed,
                               self.header, cont, 0.12, self.note if cont else ""))
        return parts[0], parts[1]

    # --- drawing
    def draw(self, page, top):
        y = top
        x0 = MARGIN_X + (0.08 if self.boxed else 0.0)
        width = sum(self.widths)
        if self.caption_lines:
            for i, line in enumerate(self.caption_lines):
                yy = y + 8.5 / 72 + i * leading(8.5)
                dx = 0.0
                if i == 0 and self._label():
                    page.text(MARGIN_X, yy, self._label(), size=8.5, weight="bold")
                    dx = text_width(self._label() + " ", 8.5, "bold")
                page.text(MARGIN_X + dx, yy, line, size=8.5)
            y += self._cap_h()
        body_top = y
        if self.boxed:
            h = self.height() - self._cap_h() - len(self.note_lines) * leading(7.0)
            page.rect(MARGIN_X, body_top - 0.02, BODY_W, h, face="#f4f6f8", edge="#8c959f", lw=0.6)
        else:
            page.hline(x0, x0 + width, y, lw=0.9)
        y += 0.03
        if self.header:
            self._draw_row(page, x0, y, self.head_lines, bold_row=True)
            y += self._head_h()
            if not self.boxed:
                page.hline(x0, x0 + width, y - 0.02, lw=0.5)
        for i in range(len(self.cells)):
            h = self._row_h(i)
            x = x0
            for j, w in enumerate(self.widths):
                if (i, j) in self.bg:
                    page.rect(x, y - 0.01, w, h, face=self.bg[(i, j)])
                x += w
            self._draw_row(page, x0, y, self.wrapped[i], row=i)
            y += h
        if not self.boxed:
            page.hline(x0, x0 + width, y + 0.01, lw=0.9)
        y += 0.06
        for k, line in enumerate(self.note_lines):
            page.text(MARGIN_X, y + 7.0 / 72 + k * leading(7.0), line, size=7.0, style="italic", color="0.3")

    def _draw_row(self, page, x0, y, lines_per_col, row=None, bold_row=False):
        x = x0
        for j, (lines, w) in enumerate(zip(lines_per_col, self.widths)):
            col = self.columns[j]
            weight = "bold" if bold_row or (row, j) in self.bold else "normal"
            colour = self.fg.get((row, j), "black") if row is not None else "black"
            for k, line in enumerate(lines):
                yy = y + self.size / 72.0 + 0.02 + k * leading(self.size)
                if col.align == "right":
                    page.text(x + w - self.pad, yy, line, size=self.size, weight=weight, color=colour, ha="right")
                elif col.align == "center":
                    page.text(x + w / 2, yy, line, size=self.size, weight=weight, color=colour, ha="center")
                else:
                    page.text(x + self.pad, yy, line, size=self.size, weight=weight, color=colour)
            x += w


@dataclass
class FigureBlock(Block):
    """A figure drawn by ``draw(subfigure)`` into ``height`` inches, its caption below it."""

    draw_fn: Callable
    height_in: float
    caption: str
    number: int
    name: str
    data: dict = field(default_factory=dict)      # name -> DataFrame written as CSV beside the figure
    space_before: float = 0.14

    def __post_init__(self):
        label = f"Figure {self.number}."
        self.cap = Paragraph(self.caption, size=8.5, label=label, space_before=0.0)

    def height(self):
        return self.height_in + 0.08 + self.cap.height()

    def least_height(self):
        return SHRINK * self.height_in + 0.08 + self.cap.height()

    def split(self, avail):
        """Shrink (down to ``SHRINK`` of its height) to finish a page instead of leaving it half empty."""
        h = avail - 0.08 - self.cap.height()
        if h >= SHRINK * self.height_in:
            return (FigureBlock(self.draw_fn, h, self.caption, self.number, self.name, self.data,
                                self.space_before), None)
        return None

    def draw(self, page, top):  # the subfigure itself is made by the page renderer (it needs the grid)
        self.cap.draw(page, top + self.height_in + 0.08)


@dataclass
class Spacer(Block):
    h: float

    def height(self):
        return self.h

    def draw(self, page, top):
        pass


class NeedSpace(Block):
    """Start a new page unless the blocks that follow (``keep``) fit in what is left of this one, as
    LaTeX's needspace: figures meant to be read together stay on one page."""

    def __init__(self, keep: list | None = None):
        self.keep = keep if keep is not None else []

    def height(self):
        return 0.0

    def need(self) -> float:
        return sum(b.space_before + b.height() for b in self.keep)

    def draw(self, page, top):
        pass


class PageBreak(Block):
    """Start a new page; with ``first_only`` only while still on page 1 (so text that spilled from page 1
    is followed directly by what comes next instead of by a mostly empty page)."""

    def __init__(self, first_only: bool = False):
        self.first_only = first_only

    def height(self):
        return 0.0

    def draw(self, page, top):
        pass


@contextmanager
def pdf_precision(decimals: int = 4):
    """Numbers in PDF operators rounded to ``decimals`` (1e-4 pt by default) instead of matplotlib's 10.

    The tenth decimal of a text position carries floating-point noise that differs between
    processes (transform products of inexact numbers); at 1e-4 pt the bytes repeat and nothing visible
    changes. matplotlib's ``pdfRepr`` is swapped for the duration of a save (it looks itself up by name
    for nested values, so lists and dictionaries are rounded too).
    """
    from matplotlib.backends import backend_pdf

    original = backend_pdf.pdfRepr

    def rounded(obj):
        if isinstance(obj, (float, np.floating)) and np.isfinite(obj):
            return original(round(float(obj), decimals) + 0.0)  # + 0.0: no "-0"
        return original(obj)

    backend_pdf.pdfRepr = rounded
    try:
        yield
    finally:
        backend_pdf.pdfRepr = original


def freeze_layout(fig: Figure) -> None:
    """Fix the positions constrained layout found, rounded to 1e-6 of the page, and switch it off.

    The layout solver (kiwisolver) can differ in the last bits from one process to the next; images
    are snapped to whole pixels, so such noise could move a colour bar by a pixel in a cropped export.
    Rounding removes the noise, and drawing without the engine keeps every later save identical.
    """
    for ax in fig.axes:
        pos = ax.get_position(original=True)
        x0, y0, w, h = (round(v, 6) for v in pos.bounds)
        ax.set_position((x0, y0, w, h), which="original")
    fig.set_layout_engine("none")


# -------------------------------------------------------------------------------- document
@dataclass
class Placed:
    block: Block
    top: float                    # inches from the page top


B = TypeVar("B", bound=Block)


class Document:
    """Blocks in reading order; numbering of figures and tables; layout; drawing; exports."""

    def __init__(self, title: str, files: Path, page_pngs: bool = True):
        self.title, self.files, self.page_pngs = title, Path(files), page_pngs
        self.blocks: list[Block] = []
        self.n_fig = self.n_tab = 0
        self.pages: list[list[Placed]] = []

    # --- adding
    def add(self, block: B) -> B:
        self.blocks.append(block)
        return block

    def heading(self, text, level=1, anchor=None):
        return self.add(Heading(text, level, anchor))

    def para(self, text, **kw):
        return self.add(Paragraph(text, **kw))

    def page_break(self, first_only: bool = False):
        self.add(PageBreak(first_only))

    def table(self, columns, cells, caption, name, csv=None, **kw) -> Table:
        self.n_tab += 1
        return self.add(Table(columns, cells, caption, self.n_tab, name, csv, **kw))

    def box(self, rows, caption, name, csv=None) -> Table:
        """Key / value rows in a framed box (what was run)."""
        self.n_tab += 1
        return self.add(Table([Column("", "left"), Column("", "left", wrap=True)], rows, caption, self.n_tab, name,
                              csv, bold={(i, 0) for i in range(len(rows))}, boxed=True, header=False, size=7.0))

    def figure(self, draw_fn, height, caption, name, data=None) -> FigureBlock:
        self.n_fig += 1
        return self.add(FigureBlock(draw_fn, min(height, BODY_H - 1.2), caption, self.n_fig, slug(name),
                                    data or {}))

    # --- layout
    def layout(self) -> list[list[Placed]]:
        pages: list[list[Placed]] = [[]]
        y = 0.0
        queue = list(self.blocks)
        while queue:
            b = queue.pop(0)
            if isinstance(b, PageBreak):
                if pages[-1] and not (b.first_only and len(pages) > 1):
                    pages.append([])
                    y = 0.0
                continue
            if isinstance(b, NeedSpace):
                if pages[-1] and y + b.need() > BODY_H and b.need() <= BODY_H:
                    pages.append([])
                    y = 0.0
                continue
            gap = b.space_before if pages[-1] else 0.0
            need = b.height()
            if b.keep_with_next and queue and not isinstance(queue[0], PageBreak):
                nxt = queue[0]
                need += nxt.space_before + nxt.least_height()
            if y + gap + need <= BODY_H:
                pages[-1].append(Placed(b, y + gap))
                y += gap + b.height()
                continue
            parts = None if b.keep_with_next else b.split(BODY_H - y - gap)
            if parts is not None:  # what fits finishes this page, the rest starts the next
                pages[-1].append(Placed(parts[0], y + gap))
                if parts[1] is not None:
                    queue.insert(0, parts[1])
            elif not pages[-1]:  # taller than a page and not splittable: it gets a page of its own
                pages[-1].append(Placed(b, y + gap))
            else:
                queue.insert(0, b)
            pages.append([])
            y = 0.0
        self.pages = [p for p in pages if p]
        return self.pages

    def page_of(self, block: Block) -> int | None:
        for n, page in enumerate(self.pages, start=1):
            if any(p.block is block for p in page):
                return n
        return None

    # --- drawing
    def write(self, out_pdf: Path, page_png_dpi: int = 100) -> list[dict]:
        """Draw every page into ``out_pdf``; export figures (PDF + PNG), tables (CSV) and page PNGs.

        Returns the page manifest: for each page its number, PNG, figures and tables.
        """
        from matplotlib.backends.backend_pdf import PdfPages

        if not self.pages:
            self.layout()
        manifest = []
        with matplotlib.rc_context(RC), pdf_precision(), \
                PdfPages(out_pdf, metadata={"Title": self.title, **PDF_META}) as pdf:
            for n, placed in enumerate(self.pages, start=1):
                fig, figures = self._draw_page(n, placed)
                names = [p.block.name for p in placed if isinstance(p.block, FigureBlock)] or \
                    [next((slug(p.block.text) for p in placed if isinstance(p.block, Heading)), "text")]
                png = f"page-{n:02d}-{'_'.join(names)}.png"  # named by the figures it holds
                if self.page_pngs:
                    fig.savefig(self.files / png, dpi=page_png_dpi, metadata={"Software": None})
                else:
                    fig.canvas.draw()  # the constrained layout runs once, here ...
                freeze_layout(fig)  # ... and every later save reuses its positions
                for block, sub in figures:
                    self._export(fig, block, sub)
                pdf.savefig(fig)
                tables = [p.block for p in placed if isinstance(p.block, Table)]
                for t in tables:
                    if t.csv is not None:
                        t.csv.to_csv(self.files / f"table-{t.number:02d}-{t.name}.csv", index=False)
                manifest.append({"page": n, "png": png if self.page_pngs else None,
                                 "figures": [b.number for b, _ in figures],
                                 "tables": sorted({t.number for t in tables if t.number is not None}),
                                 "headings": [p.block.text for p in placed if isinstance(p.block, Heading)]})
        (self.files / "pages.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest

    def _draw_page(self, n: int, placed: list[Placed]):
        fig = Figure(figsize=(PAGE_W, PAGE_H), layout="constrained")
        engine = fig.get_layout_engine()
        assert isinstance(engine, ConstrainedLayoutEngine)  # made with layout="constrained" just above
        engine.set(w_pad=0.03, h_pad=0.03, wspace=0.02, hspace=0.02)
        canvas = PageCanvas(fig)
        # running head and page number, inside the margins
        canvas.text(MARGIN_X, 0.45, self.title, size=7.5, color="0.4", style="italic")
        canvas.text(PAGE_W - MARGIN_X, 0.45, f"page {n} of {len(self.pages)}", size=7.5, color="0.4", ha="right")
        canvas.hline(MARGIN_X, PAGE_W - MARGIN_X, 0.52, lw=0.4, color="0.6")
        canvas.text(PAGE_W / 2, PAGE_H - 0.38, str(n), size=8, color="0.3", ha="center")
        # one grid row per figure (and filler rows between), so constrained layout keeps every
        # subfigure inside the rectangle it was given
        figs = [(p.top, p.block) for p in placed if isinstance(p.block, FigureBlock)]
        subfigures: list[tuple[FigureBlock, SubFigure]] = []
        if figs:
            edges, kinds = [0.0], []
            for fig_top, fig_block in figs:
                top = MARGIN_TOP + fig_top
                edges += [top, top + fig_block.height_in]
                kinds += ["gap", "fig"]
            edges.append(PAGE_H)
            kinds.append("gap")
            # ratios in whole 1/1440 inch: numpy sums them exactly in any order (a float sum's last bit can
            # depend on the array's memory alignment, which would make the bytes differ from run to run)
            heights = [max(float(round((b - a) * GRID)), 1.0) for a, b in zip(edges[:-1], edges[1:])]
            widths = [float(round(w * GRID)) for w in (MARGIN_X, BODY_W, MARGIN_X)]
            gs = fig.add_gridspec(len(heights), 3, height_ratios=heights, width_ratios=widths, hspace=0, wspace=0)
            row = 0
            for kind in kinds:
                if kind == "fig":
                    block = figs[len(subfigures)][1]
                    sub = fig.add_subfigure(gs[row, 1])
                    # the page is white already; an invisible patch also keeps a cropped export free of a
                    # rectangle whose corner would sit at 0 +- rounding noise ("-0" in one run, "0" in another)
                    sub.patch.set_visible(False)
                    block.draw_fn(sub)
                    subfigures.append((block, sub))
                row += 1
        for p in placed:
            p.block.draw(canvas, MARGIN_TOP + p.top)
        return fig, subfigures

    def _export(self, fig: Figure, block: FigureBlock, sub) -> None:
        bbox = sub.bbox.transformed(fig.dpi_scale_trans.inverted())
        # extents on a 1/1024-inch grid: dyadic numbers make the crop's arithmetic exact, so the figure's
        # background corner is written as "0", never as "-0" from 1e-16 noise in the layout (which
        # differed between two builds in one process, e.g. after a first build warmed a text cache)
        box = Bbox.from_extents(*(round(v * 1024) / 1024 for v in (bbox.x0 - 0.02, bbox.y0 - 0.02,
                                                                   bbox.x1 + 0.02, bbox.y1 + 0.02)))
        stem = self.files / f"figure-{block.number:02d}-{block.name}"
        fig.savefig(f"{stem}.pdf", bbox_inches=box, metadata=PDF_META)
        fig.savefig(f"{stem}.png", bbox_inches=box, dpi=200, metadata={"Software": None})
        for key, df in block.data.items():
            df.to_csv(self.files / f"figure-{block.number:02d}-{block.name}-{key}.csv", index=False)
