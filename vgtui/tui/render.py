"""Pure renderers: state in, Rich Text out. Cheap (numpy + a few hundred segments per frame) and
testable without an app. Colour encodes log10 of a norm (dark blue = tiny, dark red = huge);
in monochrome the same information is carried by bar heights and shade characters.
"""

from __future__ import annotations

import math

import numpy as np
from rich.style import Style
from rich.text import Text

from ..formatting import fmt
from ..diagnosis import EXPLODE_ENTER, VANISH_ENTER
from ..records import SEVERITY_ORDER, Verdict
from . import rows as rowplan
from .state import RunState

# "turbo"-like ramp: vanishing = cold, exploding = hot (its near-black ends left out: a bar or a
# cell must stay visible on a dark background). Numbers never take these colours.
RAMP = ["#4145ab", "#4675ed", "#39a2fc", "#1bcfd4", "#24eca6", "#61fc6c", "#a4fc3b",
        "#d1e834", "#f3c63a", "#fe9b2d", "#f36315", "#d93806", "#b11901"]
BAD_COLOUR = "#ff00ff"
SPARK = "▁▂▃▄▅▆▇█"
SHADES = " ░▒▓█"
_STYLES = [Style(color=c) for c in RAMP]
_BAD_STYLE = Style(color=BAD_COLOUR, bold=True)

METRIC_TITLES = {
    "act_grad_norm": "‖∂L/∂h‖",
    "weight_grad_norm": "‖∂L/∂W‖",
}


def scale_of(values: np.ndarray, min_span: float = 1.0) -> tuple[float, float]:
    """(lo, hi) of the finite values, at least ``min_span`` apart (decades)."""
    finite = values[np.isfinite(values)] if values.size else values
    if finite.size == 0:
        return -1.0, 0.0
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < min_span:
        mid = (hi + lo) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    return lo, hi


def level(value: float, lo: float, hi: float, n: int) -> int:
    """0..n-1 for a finite value, -1 for nan/inf."""
    if not math.isfinite(value):
        return -1 if not (value == float("-inf")) else 0
    frac = (value - lo) / (hi - lo) if hi > lo else 0.5
    return int(min(n - 1, max(0, frac * n)))


def _levels(values: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Vectorised :func:`level`; -1 marks nan/+inf, -inf (exact zero) is level 0."""
    with np.errstate(invalid="ignore"):
        frac = (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5)
        out = np.clip((frac * n).astype(float), 0, n - 1)
    out = np.where(np.isnan(values) | (values == np.inf), -1, out)
    out = np.where(values == -np.inf, 0, out)
    return out.astype(int)


def fit(parts: list[str], width: int, sep: str = " · ") -> str:
    """Join as many whole parts as fit in ``width`` (never cut a word in half)."""
    out = ""
    for part in parts:
        candidate = part if not out else out + sep + part
        if len(candidate) > width:
            break
        out = candidate
    return out


def clip_words(text: str, width: int) -> str:
    """``text`` cut at a word boundary to fit ``width``, with an ellipsis when cut."""
    if len(text) <= width:
        return text
    words, out = text.split(), ""
    for word in words:
        candidate = f"{out} {word}" if out else word
        if len(candidate) + 1 > width:
            break
        out = candidate
    return out + "…"


def exp_label(log_value: float) -> str:
    """10^x as a short label: 1e-06, 3e-02, 1e+00."""
    if not math.isfinite(log_value):
        return "?"
    return f"{10 ** log_value:.0e}"


def bin_columns(matrix: np.ndarray, width: int) -> np.ndarray:
    """(rows, T) -> (rows, <=width): the mean of equal groups of columns; a group with a
    non-finite (nan/+inf) value stays nan so a blow-up is never averaged away."""
    rows, t = matrix.shape
    if t <= width or width <= 0:
        return matrix
    edges = np.linspace(0, t, width + 1).astype(int)
    out = np.empty((rows, width))
    for j, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        chunk = matrix[:, a:b]
        bad = np.isnan(chunk).any(axis=1) | (chunk == np.inf).any(axis=1)
        finite = np.where(np.isfinite(chunk), chunk, 0.0)
        count = np.isfinite(chunk).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, finite.sum(axis=1) / np.maximum(count, 1), np.nan)
        allneg = (chunk == -np.inf).all(axis=1)
        mean = np.where(allneg, -np.inf, mean)
        out[:, j] = np.where(bad, np.nan, mean)
    return out


def stretch(matrix: np.ndarray, width: int) -> np.ndarray:
    """(rows, T) with T < ``width`` -> (rows, width): each column repeated as evenly as it goes,
    so that a short history still spans the plot (the time ticks use the same mapping)."""
    t = matrix.shape[-1]
    if t == 0 or t >= width:
        return matrix
    return np.take(matrix, np.arange(width) * t // width, axis=-1)


def bin_rows(matrix: np.ndarray, rows: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(L, T) -> (<=rows, T) grouping adjacent layers (min of the group: the weakest gradient
    in the group is what matters for vanishing; nan wins). Returns the groups' (first, last)."""
    n = matrix.shape[0]
    if n <= rows:
        return matrix, [(i, i) for i in range(n)]
    edges = np.linspace(0, n, rows + 1).astype(int)
    out = np.empty((rows, matrix.shape[1]))
    groups = []
    for r, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        chunk = matrix[a:b]
        bad = np.isnan(chunk).any(axis=0)
        with np.errstate(invalid="ignore"):
            out[r] = np.where(bad, np.nan, np.nanmin(np.where(np.isnan(chunk), np.inf, chunk), axis=0))
        groups.append((int(a), int(b - 1)))
    return out, groups


def _append_runs(text: Text, cells: list[tuple[str, Style | None]]) -> None:
    """Append characters, one span per run of equal style (fewer segments to composite)."""
    run, style = [], None
    for ch, st in cells:
        if run and st is not style:
            text.append("".join(run), style=style)
            run = []
        run.append(ch)
        style = st
    if run:
        text.append("".join(run), style=style)


# -- shared by the per-layer views ----------------------------------------------------------------

NOT_MEASURED = "·"  # a cell or value that was not measured (not the same as non-finite: ✗)
NOT_FINITE = "✗"
_UNMEASURED_STYLE = Style(color="#808080", dim=True)


class Ctx:
    """What a per-layer view draws: the rows (layers or blocks), which layer is selected, which
    blocks are open, monochrome or not. Built by the owner; renderers only read it."""

    def __init__(self, state: RunState, by_block: bool = False, expanded: frozenset = frozenset(),
                 selected: int = 0, mono: bool = False):
        self.state = state
        self.by_block = by_block
        self.expanded = expanded
        self.rows = state.plan(by_block, expanded)
        self.prefix = state.prefix
        self.selected_layer = max(-1, min(selected, max(0, state.n_layers - 1)))
        self.selected_row = rowplan.row_of(self.rows, self.selected_layer) \
            if self.rows and self.selected_layer >= 0 else -1
        self.mono = mono
        self.tied = state.header.tied if state.header else {}

    def label(self, r: int, width: int) -> str:
        row = self.rows[r]
        tied = (not row.block) and row.label in self.tied
        text = rowplan.row_label(row, self.prefix, width - (2 if tied else 0), self.expanded)
        return text + " ⇄" if tied else text

    def label_width(self, width: int, share: float = 0.3) -> int:
        tied = 2 if self.tied else 0
        return rowplan.label_width(self.rows, width, self.prefix, share) + tied

    def label_style(self, r: int) -> str:
        if r == self.selected_row:
            return "reverse bold"
        return "bold" if self.rows[r].block else ""

    def window(self, height: int) -> range:
        """The rows that fit in ``height`` lines, following the selection."""
        n = len(self.rows)
        if n <= height:
            return range(n)
        first = max(0, min(n - height, self.selected_row - height // 2))
        return range(first, first + height)


def selected_line(state: RunState, rows: list[rowplan.Row], selected: int) -> Text:
    """The selected layer's (or block's) full name, always on screen, and the names' shared
    prefix, dropped from every label. Empty before the run's header."""
    text = Text(no_wrap=True, overflow="ellipsis")
    names = state.layer_names
    if not names:
        return text
    layer = max(0, min(selected, len(names) - 1))
    row = rows[rowplan.row_of(rows, layer)]
    if row.block:
        text.append(f"▸ {row.label}", style="bold")
        text.append(f" · block of {row.last - row.first + 1} layers "
                    f"({row.first + 1}–{row.last + 1} of {len(names)})")
    else:
        text.append(f"▸ {names[layer]}", style="bold")
        text.append(f" · layer {layer + 1}/{len(names)}")
        kinds = state.header.layer_kinds
        if layer < len(kinds) and kinds[layer] not in ("linear", "?"):
            text.append(f" · {kinds[layer]}")
        tied = state.header.tied.get(names[layer])
        if tied:
            text.append(f" · ⇄ tied to {', '.join(tied)}")
    prefix = state.prefix
    if prefix:
        text.append(f" · labels drop “{prefix}”", style="dim")
    return text


def ratio_verdict(ratio: float) -> str:
    """The diagnosis's words for a first/last ‖∂L/∂h‖ ratio, on the diagnosis's own thresholds
    (so this line never says healthy beside a vanishing verdict)."""
    if not math.isfinite(ratio):
        return "(not finite or not measured)"
    if ratio < VANISH_ENTER:
        return "vanishing toward the input"
    if ratio > EXPLODE_ENTER:
        return "exploding toward the input"
    return "within the healthy range"


ratio_words = ratio_verdict  # the name earlier callers used


def _value_text(text: Text, value: float, measured: bool, width: int, mono: bool,
                style: str | Style | None = None) -> None:
    """A number in a readable text colour; non-finite and not measured each say so."""
    if not measured:
        words = "· not measured" if width >= 14 else "not meas." if width >= 9 else NOT_MEASURED
        text.append(words.rjust(width)[-width:], style="dim")
    elif not math.isfinite(value):
        text.append(f"{NOT_FINITE} {fmt(value, 0).strip()}".rjust(width)[:width],
                    style="bold reverse" if mono else _BAD_STYLE)
    else:
        text.append(fmt(value, width), style=style)


def _bars(levels: list[int], lines: int, line: int) -> str:
    """Line ``line`` (0 = top) of ``lines``-tall vertical bars for eighth-levels 0..8*lines-1."""
    out = []
    floor = (lines - 1 - line) * 8
    for lv in levels:
        fill = lv + 1 - floor
        out.append(" " if fill <= 0 else "█" if fill >= 8 else SPARK[fill - 1])
    return "".join(out)


def first_last_line(state: RunState, width: int) -> Text:
    """input/output ‖∂L/∂h‖ with the diagnosis's words, from the record's one first/last rule."""
    text = Text(no_wrap=True, overflow="crop")
    if state.last is None:
        return text
    ratio = state.last.first_last_ratio()
    head = f"input/output ‖∂L/∂h‖ {fmt(ratio.value, 0).strip()}"
    text.append(fit([head, ratio_verdict(ratio.value),
                     f"{NOT_FINITE} not finite  {NOT_MEASURED} not measured"], width, sep="  "), style="dim")
    return text


# -- per-layer sparkline rows ------------------------------------------------------------------

def layer_rows(state: RunState, width: int, metrics: list[str], selected: int, mono: bool,
               ctx: Ctx | None = None, lines: int = 1) -> Text:
    """One row per layer or block (input at top): name, the current values in a plain text
    colour, then per metric a sparkline of log10 norm over the kept history (one shared scale per
    metric, so a vanishing gradient sits visibly lower; ``lines`` text lines tall when the
    terminal has room). Numbers come first: they change at every step, and a terminal update
    carries each changed line from its start to its last change."""
    text = Text(no_wrap=True, overflow="crop")
    if not state.layer_names:
        text.append("waiting for the first record…", style="dim")
        return text
    ctx = ctx or Ctx(state, selected=selected, mono=mono)
    lines = max(1, lines)
    name_w = ctx.label_width(width, 0.3 if len(metrics) > 1 else 0.4)
    fixed = name_w + 1 + 10 * len(metrics)
    spark_w = max(1, (width - fixed) // len(metrics) - 1)
    columns = []
    for metric in metrics:
        # the whole kept history in spark_w columns (mean of each column's steps, a non-finite
        # value kept): a new step moves a column's mean a little, so the glyphs mostly stay put
        # and a redraw sends little more than the numbers; a short history is stretched instead
        logged, measured = state.row_log_matrix(metric, ctx.rows)
        logged, measured = bin_columns(logged, spark_w), _bin_mask(measured, spark_w)
        logged, measured = stretch(logged, spark_w), stretch(measured, spark_w)
        values, now_measured = state.row_matrix(metric, ctx.rows, 1)
        lo, hi = scale_of(logged)
        columns.append((metric, logged, measured, values, now_measured, lo, hi))
    what = "block" if ctx.by_block else "layer"
    text.append(f"{what:<{name_w}} ", style="bold")
    for metric, *_ in columns:
        text.append(f"{METRIC_TITLES.get(metric, metric):>9} ", style="bold")
    for metric, _, _, _, _, lo, hi in columns:
        name = METRIC_TITLES.get(metric, metric) if len(columns) > 1 else ""
        title = fit([name, f"{exp_label(lo)}…{exp_label(hi)}", "log scale"], spark_w, sep=" ")
        text.append(f"{title:<{spark_w}} ", style="bold")
    text.append("\n")
    levels_per = len(SPARK) * lines
    for r in range(len(ctx.rows)):
        for line in range(lines):
            last_line = line == lines - 1
            label = ctx.label(r, name_w) if last_line else ""
            text.append(f"{label:<{name_w}}", style=ctx.label_style(r) if label else "")
            text.append(" ")
            for metric, logged, measured, values, now_measured, lo, hi in columns:
                if last_line:
                    current = float(values[r, -1]) if values.shape[1] else float("nan")
                    was_measured = bool(now_measured[r, -1]) if now_measured.shape[1] else True
                    row_ = ctx.rows[r]
                    if (not was_measured and metric == "weight_grad_norm" and not row_.block
                            and row_.label in ctx.tied):
                        # its weight is another layer's tensor, measured there once
                        text.append(f"{'⇄ tied':>9}", style="dim")
                    else:
                        _value_text(text, current, was_measured, 9, mono,
                                    "bold" if r == ctx.selected_row else None)
                    text.append(" ")
                else:
                    text.append(" " * 10)
            for metric, logged, measured, values, now_measured, lo, hi in columns:
                row = logged[r] if logged.shape[1] else np.zeros(0)
                seen = measured[r] if measured.shape[1] else np.zeros(0, dtype=bool)
                levels = _levels(row, lo, hi, levels_per).tolist() if row.size else []
                finite = row[np.isfinite(row)]  # one colour per row: its newest column's
                colour = level(float(finite[-1]), lo, hi, len(RAMP)) if finite.size else 0
                bar_style = None if mono else _STYLES[colour]
                cells = []
                body = _bars([max(0, lv) for lv in levels], lines, line)
                for j, lv in enumerate(levels):
                    if not seen[j]:
                        cells.append((NOT_MEASURED if last_line else " ", _UNMEASURED_STYLE))
                    elif lv < 0:
                        cells.append((NOT_FINITE if last_line else " ", _BAD_STYLE))
                    else:
                        cells.append((body[j], bar_style))
                _append_runs(text, cells)
                text.append(" " * (spark_w - len(levels) + 1))
            text.append("\n")
    text.append_text(first_last_line(state, width))
    return text


def rows_height(n_rows: int, lines: int) -> int:
    return n_rows * max(1, lines) + 2


# -- heatmap ------------------------------------------------------------------------------------

def _time_axis(steps: list[int], cols: int, offset: int) -> str:
    """Step numbers under a time axis of ``cols`` columns covering ``steps`` (oldest left)."""
    axis = [" "] * (offset + cols)
    if not steps or cols <= 0:
        return ""
    n = len(steps)
    at, previous = offset, None
    while at < offset + cols:
        j = at - offset
        step = steps[min(n - 1, int(j * n / cols))]
        label = f"╵{step}"
        if at + len(label) > offset + cols:
            break
        if step != previous:  # a stretched short history repeats steps across columns
            axis[at:at + len(label)] = list(label)
            previous = step
        at += max(len(label) + 3, cols // 6)
    return "".join(axis).rstrip()


def heatmap(state: RunState, width: int, height: int, metric: str, mono: bool,
            ctx: Ctx | None = None) -> Text:
    """Rows (layers or blocks, input at top) × steps (newest at right); colour = log10 norm.
    One text row per layer when they fit, two per row (half blocks) when they do not, grouped
    (weakest of the group) beyond that. Every text row is labelled; step ticks underneath."""
    text = Text(no_wrap=True, overflow="crop")
    if not state.layer_names or not state.steps:
        text.append("waiting for the first record…", style="dim")
        return text
    ctx = ctx or Ctx(state, mono=mono)
    logged, measured = state.row_log_matrix(metric, ctx.rows)
    steps = [s.step for s in state.steps]
    label_w = ctx.label_width(width, 0.3)
    plot_w = max(4, width - label_w - 1)
    plot_h = max(1, height - 3)
    n_rows = len(ctx.rows)
    per_line = 1 if (n_rows <= plot_h or mono) else 2
    cols = bin_columns(np.where(measured, logged, -np.inf if False else logged), plot_w)
    seen = _bin_mask(measured, plot_w)
    cols, seen = stretch(cols, plot_w), stretch(seen, plot_w)  # few steps: wider cells
    used_w = cols.shape[1]
    cells, groups = bin_rows(cols, plot_h * per_line)
    seen_rows = np.stack([seen[a:b + 1].any(axis=0) for a, b in groups]) if groups else seen
    lo, hi = scale_of(cells)
    what = f"{n_rows} blocks" if ctx.by_block else f"{n_rows} layers"
    n_lines = -(-cells.shape[0] // per_line)
    if n_rows > n_lines:  # packed: say how many share a line and what a line shows
        share = n_rows / n_lines
        what += f", {share:.0f} per line" if share == int(share) else f", ≈{share:.1f} per line"
        if n_rows > 2 * n_lines:
            what += " (weakest shown)"
    title = fit([f"log10{METRIC_TITLES.get(metric, metric)}", f"{what} (input top)",
                 f"steps {steps[0]}–{steps[-1]} (newest right)"], width)
    text.append(title + "\n", style="bold")
    n_cells = cells.shape[0]

    def label_for(a: int, b: int) -> tuple[str, str]:
        r0, r1 = groups[a][0], groups[b][1]
        style = "reverse bold" if r0 <= ctx.selected_row <= r1 else ("bold" if ctx.rows[r0].block else "")
        if r0 == r1:
            return ctx.label(r0, label_w), style
        return rowplan.span_label(ctx.rows, r0, r1, ctx.prefix, label_w), style

    if per_line == 1:
        n_levels = len(SHADES) - 1 if mono else len(RAMP)
        lv = _levels(cells, lo, hi, n_levels)
        tall = max(1, min(4, plot_h // max(1, n_cells)))  # few rows: each gets more lines
        for r in range(n_cells):
            label, style = label_for(r, r)
            if mono:
                line = "".join(NOT_MEASURED if not seen_rows[r, j] else "!" if v < 0 else SHADES[v + 1]
                               for j, v in enumerate(lv[r].tolist()))
            for k in range(tall):
                text.append(f"{label if k == 0 else '':<{label_w}}", style=style if k == 0 else "")
                text.append(" ")
                if mono:
                    text.append(line)
                else:
                    _append_runs(text, [((NOT_MEASURED if k == 0 else " "), _UNMEASURED_STYLE)
                                        if not seen_rows[r, j] else ("█", _BAD_STYLE if v < 0 else _STYLES[v])
                                        for j, v in enumerate(lv[r].tolist())])
                text.append("\n")
    else:
        lv = _levels(cells, lo, hi, len(RAMP))
        lv = np.where(seen_rows, lv, -2)
        for r in range(0, n_cells, 2):
            label, style = label_for(r, min(r + 1, n_cells - 1))
            text.append(f"{label:<{label_w}}", style=style)
            text.append(" ")
            top = lv[r].tolist()
            bottom = lv[r + 1].tolist() if r + 1 < n_cells else None
            _append_runs(text, [("▀", _cell_style(t, None if bottom is None else bottom[j]))
                                for j, t in enumerate(top)])
            text.append("\n")
    text.append(_time_axis(steps, used_w, label_w + 1) + "\n", style="dim")
    text.append(" " * (label_w + 1))
    text.append_text(_legend(lo, hi, width - label_w - 1, mono, grey_block=per_line == 2))
    return text


def _legend(lo: float, hi: float, width: int, mono: bool, grey_block: bool = False) -> Text:
    """The colour scale and the two marks that are not values, as much as fits in ``width``."""
    text = Text(no_wrap=True, overflow="crop")
    if mono:
        text.append(f"{exp_label(lo)} " + "".join(SHADES[1:]) + f" {exp_label(hi)}")
    else:
        text.append(f"{exp_label(lo)} ")
        for colour in RAMP:
            text.append("█", style=Style(color=colour))
        text.append(f" {exp_label(hi)}")
    used = len(text.plain)
    marks = [("!" if mono else "█", None if mono else _BAD_STYLE, " not finite"),
             ("█" if grey_block and not mono else NOT_MEASURED, _UNMEASURED_STYLE, " not measured")]
    for glyph, style, words in marks:
        if used + 2 + len(glyph) + len(words) > width:
            break
        text.append("  ")
        text.append(glyph, style=style)
        text.append(words)
        used += 2 + len(glyph) + len(words)
    return text


def _bin_mask(mask: np.ndarray, width: int) -> np.ndarray:
    rows, t = mask.shape
    if t <= width or width <= 0:
        return mask
    edges = np.linspace(0, t, width + 1).astype(int)
    return np.stack([mask[:, a:b].any(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)


_CELL_STYLES: dict = {}
_GREY = "#5a5a5a"


def _cell_style(top: int, bottom: int | None) -> Style:
    """Half-block style for two colour levels (-1 not finite, -2 not measured), cached."""
    key = (top, bottom)
    style = _CELL_STYLES.get(key)
    if style is None:
        def colour(v):
            return BAD_COLOUR if v == -1 else _GREY if v == -2 else RAMP[v]
        style = Style(color=colour(top)) if bottom is None else Style(color=colour(top), bgcolor=colour(bottom))
        _CELL_STYLES[key] = style
    return style


# -- histograms of every layer ---------------------------------------------------------------------

_DENSITY = " ·░▒▓█"


def histogram(state: RunState, layer: int, width: int, height: int, mono: bool,
              ctx: Ctx | None = None) -> Text:
    """Every layer's (or block's) log10|∂L/∂W| histogram at the newest detail step, one line each,
    input at top, on one shared axis: vanishing reads as the mass moving left layer after layer.
    Each line is scaled to its own peak (shade = share of that layer's weights); colour = where
    on the axis. The selected one is highlighted and summed up underneath."""
    text = Text(no_wrap=True, overflow="crop")
    record = state.last_detail
    if record is None or not state.header:
        text.append("waiting for the first record…", style="dim")
        return text
    ctx = ctx or Ctx(state, selected=layer, mono=mono)
    edges = np.asarray(state.header.hist_edges, dtype=float)
    counts = np.nan_to_num(record.hist.astype(float))
    bins = counts.shape[1]
    per_row = np.stack([counts[row.first:row.last + 1].sum(axis=0) for row in ctx.rows])
    label_w = ctx.label_width(width, 0.3)
    plot_w = max(bins, width - label_w - 1)
    bar_w = max(1, plot_w // bins)
    title = fit([f"log10|∂L/∂W| of every {'block' if ctx.by_block else 'layer'} at step {record.step}",
                 "input top", "each row scaled to its own peak", "zeros in the lowest bin"], width)
    text.append(title + "\n", style="bold")
    body_h = max(1, height - 4)
    mids = (edges[:-1] + edges[1:]) / 2 if len(edges) == bins + 1 else np.arange(bins, dtype=float)
    bin_styles = [None if mono else _STYLES[level(float(m), HIST_LO, HIST_HI, len(RAMP))] for m in mids]
    # with room to spare each one is a small bar chart (a ridge line), else one shaded line
    lines = max(1, min(6, body_h // max(1, len(ctx.rows))))
    for r in ctx.window(body_h // lines):
        row = per_row[r]
        peak = row.max()
        for line in range(lines):
            label = ctx.label(r, label_w) if line == lines - 1 else ""
            text.append(f"{label:<{label_w}}", style=ctx.label_style(r) if label else "")
            text.append(" ")
            if peak <= 0:
                if line == lines - 1:
                    text.append(f"{NOT_MEASURED} not measured", style="dim")
            elif lines == 1:
                cells = []
                for b, v in enumerate((row / peak).tolist()):
                    ch = " " if v <= 0 else _DENSITY[1] if v < 0.05 else _DENSITY[min(5, 2 + int(v * 4))]
                    cells.append((ch * bar_w, bin_styles[b] if ch.strip() else None))
                _append_runs(text, cells)
            else:
                levels = [-1 if v <= 0 else int(v * (8 * lines - 1)) for v in (row / peak).tolist()]
                body = _bars([max(0, v) for v in levels], lines, line)
                cells = [((" " if levels[b] < 0 else body[b]) * bar_w, bin_styles[b]) for b in range(bins)]
                _append_runs(text, cells)
            text.append("\n")
    axis = [" "] * (bins * bar_w)
    step = max(1, int(math.ceil(5 / bar_w)))
    for b in range(0, bins + 1, step):
        if b >= len(edges):
            break
        label = f"{edges[b]:g}"
        pos = b * bar_w
        if pos + len(label) <= len(axis):
            axis[pos:pos + len(label)] = list(label)
    text.append(" " * (label_w + 1) + "".join(axis).rstrip() + "\n", style="dim")
    # the selected one, in words
    row = ctx.rows[max(0, ctx.selected_row)]
    sel = per_row[max(0, ctx.selected_row)]
    total = sel.sum()
    if total > 0:
        centre = float((sel * mids).sum() / total)
        words = [f"{row.label}", f"{int(total):,} sampled weights",
                 f"typical |∂L/∂W| ≈ 1e{centre:+.0f}", "log10|∂L/∂W| →"]
    else:
        words = [row.label, "not measured at this step"]
    text.append(fit(words, width), style="dim")
    return text


HIST_LO, HIST_HI = -12.0, 2.0


# -- activations --------------------------------------------------------------------------------

_KIND_RANGE = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
#: The activation distribution's drawing: p2-p98 light, p16-p84 dark, the median a line. In
#: colour the band is two shades of one hue and the median a bright line; in --mono the
#: characters alone carry it.
BAND_OUTER, BAND_INNER = "░", "▓"
BAND_MEDIAN = "▁━▔"  # the median in the lower, middle or upper third of its cell
_OUTER_STYLE, _INNER_STYLE, _MEDIAN_STYLE = Style(color="#2a6f97"), Style(color="#39a2fc"), Style(color="#ffffff", bold=True)
_PCTS = ("act_p02", "act_p16", "act_p50", "act_p84", "act_p98")
_ACT_LINES_MAX = 9


def activations(state: RunState, width: int, selected: int, mono: bool, height: int = 0,
                ctx: Ctx | None = None) -> Text:
    """Per layer (or block), input at the top: activation mean, std, % saturated / % dead now;
    over the newest detail steps its distribution (p2-p98 band, p16-p84 darker, the median) on
    the activation's own range (sigmoid 0..1, tanh -1..1, else the span shown) and the saturated
    or dead share. Each layer gets as many lines as the height allows (up to 9): one line shows
    the median only. Recordings without percentiles draw the mean there instead."""
    text = Text(no_wrap=True, overflow="crop")
    if not state.layer_names or state.last_detail is None:
        text.append("waiting for the first record…", style="dim")
        return text
    ctx = ctx or Ctx(state, selected=selected, mono=mono)
    name_w = ctx.label_width(width, 0.25)
    fixed = name_w + 8 + 10 + 10 + 7 + 7 + 2
    if width < fixed:
        name_w = max(5, name_w - (fixed - width))
        fixed = name_w + 8 + 10 + 10 + 7 + 7 + 2
    room = max(0, width - fixed)
    axis_w = 7 if room >= 24 else 0
    chart_w = (room - axis_w) * 2 // 3 if room >= 14 else 0
    share_w = max(0, room - axis_w - chart_w - 1) if chart_w else 0
    rows = ctx.rows
    body = len(rows) if height <= 1 else max(1, height - 2)
    lines = max(1, min(_ACT_LINES_MAX, body // max(1, len(rows))))
    if lines >= 6 and lines % 2 == 0:
        lines -= 1  # an odd count puts a sigmoid's 0.5 inside a line, not on a boundary (where
        # its median would flicker between two lines); worth a line only when there are many
    has_band = bool(chart_w) and bool(state.row_matrix("act_p50", rows, chart_w, detail=True)[1].any())
    text.append(f"{'block' if ctx.by_block else 'layer':<{name_w}} {'kind':<7} {'mean':>9} {'std':>9} "
                f"{'sat%':>6} {'dead%':>6}  ", style="bold")
    if not has_band:
        lines = 1  # a recording without percentiles: the mean, one line per layer, as before
    if lines == 1:
        axis_w, chart_w = 0, chart_w + axis_w  # one line has no axis to label
    if chart_w:
        titles = (["distribution over time: p2–p98 ░ p16–p84 ▓ median ━", "distribution over time",
                   "distribution"] if has_band and lines > 1 else
                  ["distribution now, low → high of its range", "distribution now", "now"] if has_band
                  else ["mean over time (its range)", "mean"])
        title = next((t for t in titles if len(t) <= chart_w), titles[-1][:chart_w])
        text.append(" " * axis_w + f"{title:<{chart_w}} ", style="bold")
        share_title = next((t for t in ("sat/dead % over time", "sat/dead %", "share") if len(t) <= share_w), "")
        text.append(share_title, style="bold")
    text.append("\n")
    now = {m: state.row_matrix(m, rows, 1, detail=True) for m in ("act_mean", "act_std", "saturated", "dead")}
    series = {}
    if chart_w:
        # the whole kept history, each column the mean of its steps: the start of a run (where
        # Glorot & Bengio's top sigmoid layer sinks) stays on screen however long it gets
        for metric in (_PCTS if has_band else ("act_mean",)):
            series[metric] = stretch(bin_columns(state.row_matrix(metric, rows, None, detail=True)[0], chart_w),
                                     chart_w)
        for metric in ("saturated", "dead"):
            series[metric] = stretch(bin_columns(state.row_matrix(metric, rows, None, detail=True)[0], share_w),
                                     share_w)
    kinds = state.header.layer_kinds if state.header else ["?"] * state.n_layers
    for r in ctx.window(max(1, body // lines)):
        row = rows[r]
        kind = kinds[row.last] if row.last < len(kinds) else "?"
        head = Text(no_wrap=True)
        head.append(f"{ctx.label(r, name_w):<{name_w}}", style=ctx.label_style(r))
        head.append(f" {kind[:7]:<7} ")
        for metric in ("act_mean", "act_std"):
            values, seen = now[metric]
            _value_text(head, float(values[r, -1]) if values.shape[1] else float("nan"),
                        bool(seen[r, -1]) if seen.shape[1] else True, 9, mono)
            head.append(" ")
        sat = float(now["saturated"][0][r, -1]) if now["saturated"][0].shape[1] else float("nan")
        dead = float(now["dead"][0][r, -1]) if now["dead"][0].shape[1] else float("nan")
        head.append(_pct(sat), style=_pct_style(sat, mono))
        head.append(" ")
        head.append(_pct(dead), style=_pct_style(dead, mono))
        head.append("  ")
        if not chart_w:
            text.append_text(head)
            text.append("\n")
            continue
        chart, lo, hi = _distribution(series, r, kind, chart_w, lines if has_band else 1, mono)
        share = series["saturated"][r] if not np.all(np.isnan(series["saturated"][r])) else series["dead"][r]
        bars = _share_bars(share, share_w, lines, mono)
        for line in range(lines):
            if line == 0:
                text.append_text(head)
            else:
                text.append(" " * (fixed - 2) + "  ")
            if axis_w:
                label = fmt(hi, axis_w - 1) if line == 0 else fmt(lo, axis_w - 1) if line == lines - 1 else ""
                text.append(f"{label:>{axis_w - 1}} ", style="dim")
            _append_runs(text, chart[line])
            text.append(" ")
            _append_runs(text, bars[line])
            text.append("\n")
    if chart_w:
        if not has_band:
            parts = ["▁…█ mean over time"]
        elif lines > 1:
            shown = state.detail_steps
            a, b = shown[0].step, shown[-1].step
            parts = ["░ p2–p98 · ▓ p16–p84 · ━ median", f"steps {a}–{b} left → right" if b > a else f"step {a}"]
        else:
            parts = ["░ p2–p98 · ▓ p16–p84 · ┃ median, newest (taller terminal: over time)"]
        if any(row.block and row.label not in ctx.expanded for row in rows):
            parts.append("a block: its last layer's output")
        text.append(fit(parts + ["on sigmoid 0…1, tanh −1…1, others the span shown",
                                 "share over time: ▁ 0 % … █ 100 %"], width), style="dim")
    return text


def _distribution(series: dict, r: int, kind: str, width: int, lines: int, mono: bool
                  ) -> tuple[list[list[tuple[str, Style | None]]], float, float]:
    """Row ``r``'s chart: ``lines`` rows of ``width`` cells, and its value range (lo, hi)."""
    centre = series["act_p50"][r] if "act_p50" in series else series["act_mean"][r]
    low = series["act_p02"][r] if "act_p02" in series else centre
    high = series["act_p98"][r] if "act_p98" in series else centre
    lo, hi = _KIND_RANGE.get(kind, (None, None))
    if lo is None:
        shown = np.concatenate([low[np.isfinite(low)], high[np.isfinite(high)]])
        lo, hi = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
    n = len(centre)
    pad = [[(" ", None)] * (width - n) for _ in range(lines)]
    if lines == 1 and "act_p50" in series:
        return [_distribution_now(series, r, lo, hi, width, mono)], lo, hi
    if lines == 1:
        cells = [(" ", None) if not math.isfinite(v) else (SPARK[level(v, lo, hi, len(SPARK))],
                                                          None if mono else Style(color="cyan"))
                 for v in centre.tolist()]
        return [pad[0] + cells], lo, hi
    inner_lo, inner_hi = series["act_p16"][r], series["act_p84"][r]
    step = (hi - lo) / lines
    out = []
    for line in range(lines):
        top = hi - line * step
        bottom = top - step
        cells = []
        for t in range(n):
            c = centre[t]
            if not math.isfinite(c):
                cells.append((" ", None))
            elif (bottom <= c < top) or (line == 0 and c >= top) or (line == lines - 1 and c < bottom):
                third = min(2, max(0, int((c - bottom) / step * 3))) if step > 0 else 1
                cells.append((BAND_MEDIAN[third], None if mono else _MEDIAN_STYLE))
            elif inner_hi[t] >= bottom and inner_lo[t] <= top:
                cells.append((BAND_INNER, None if mono else _INNER_STYLE))
            elif high[t] >= bottom and low[t] <= top:
                cells.append((BAND_OUTER, None if mono else _OUTER_STYLE))
            else:
                cells.append((" ", None))
        out.append(pad[line] + cells)
    return out, lo, hi


def _distribution_now(series: dict, r: int, lo: float, hi: float, width: int, mono: bool
                      ) -> list[tuple[str, Style | None]]:
    """One line: the newest distribution across the value axis lo → hi (left to right), where
    a layer has one line only: p2-p98 ░, p16-p84 ▓, the median ┃."""
    p02, p16, p50, p84, p98 = (float(series[m][r][-1]) for m in _PCTS)
    if not math.isfinite(p50):
        return [(NOT_MEASURED, _UNMEASURED_STYLE)] + [(" ", None)] * (width - 1)
    edges = np.linspace(lo, hi, width + 1)
    median_at = level(p50, lo, hi, width)
    cells = []
    for k in range(width):
        a, b = edges[k], edges[k + 1]
        if k == median_at:
            cells.append(("┃", None if mono else _MEDIAN_STYLE))
        elif p84 >= a and p16 <= b:
            cells.append((BAND_INNER, None if mono else _INNER_STYLE))
        elif p98 >= a and p02 <= b:
            cells.append((BAND_OUTER, None if mono else _OUTER_STYLE))
        else:
            cells.append((" ", None))
    return cells


def _share_bars(share: np.ndarray, width: int, lines: int, mono: bool) -> list[list[tuple[str, Style | None]]]:
    """The saturated or dead share over time as bars ``lines`` tall (0 to 100 %)."""
    values = share.tolist()[-width:] if width else []
    levels = [int(min(8 * lines - 1, v * 8 * lines)) if math.isfinite(v) else -1 for v in values]
    out = []
    for line in range(lines):
        column = _bars([max(lv, 0) for lv in levels], lines, line) if lines > 1 else None
        cells = [(" ", None)] * (width - len(values))
        for k, (v, lv) in enumerate(zip(values, levels)):
            if lv < 0:
                cells.append((" ", None))
                continue
            ch = column[k] if column is not None else SPARK[min(len(SPARK) - 1, int(v * len(SPARK)))]
            cells.append((ch, None if mono else _pct_style(v, False)))
        out.append(cells)
    return out


def _pct(value: float) -> str:
    return "     -" if not math.isfinite(value) else f"{100 * value:6.1f}"


def _pct_style(value: float, mono: bool):
    if mono or not math.isfinite(value):
        return None
    if value >= 0.5:
        return "bold red"
    if value >= 0.2:
        return "yellow"
    return "green"


# -- through time -------------------------------------------------------------------------------

def time_series_of(state: RunState, selected: int) -> str | None:
    """The through-time series the selected layer shows: its own (the first, for a fused stacked
    module), else the first recurrent layer's; None for a run without one."""
    names = state.time_layers
    all_names = state.layer_names
    picked = all_names[selected] if 0 <= selected < len(all_names) else None
    return next((n for n in names if state.time_layer(n) == picked), names[0] if names else None)


def _time_logs(state: RunState) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The newest record's through-time series and their log10 (0 -> -inf, non-finite -> nan)."""
    series = {n: np.asarray(state.last.time_act_grad_norm[n], dtype=float) for n in state.time_layers}
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = {n: np.where(np.isfinite(v) & (v > 0), np.log10(np.abs(v)), np.where(v == 0, -np.inf, np.nan))
                for n, v in series.items()}
    return series, logs


def time_scale(states: list[RunState]) -> tuple[float, float] | None:
    """One log scale for the through-time series of several runs (the compare screen): on
    separate scales a flat LSTM curve and a tanh RNN's 12-decade fall would look alike."""
    logs = [v for state in states if state.time_layers for v in _time_logs(state)[1].values()]
    return scale_of(np.concatenate(logs)) if logs else None


def through_time(state: RunState, width: int, height: int, selected: int, mono: bool,
                 ctx: Ctx | None = None, scale: tuple[float, float] | None = None) -> Text:
    """Recurrent layers: ‖∂L/∂h_t‖ over the time steps t of the newest measured batch (one
    coloured strip per layer, shared log scale, input time step 0 at left), then the selected
    layer's curve and how fast it falls per step back in time. ``scale``: (lo, hi) log10 to draw
    on instead of this run's own."""
    text = Text(no_wrap=True, overflow="crop")
    names = state.time_layers
    if not names:
        text.append("no recurrent layer in this run: nothing measured through time", style="dim")
        return text
    record = state.last
    chosen = time_series_of(state, selected)
    label_w = max(6, min(max(len(n) for n in names), int(width * 0.25)))
    plot_w = max(8, width - label_w - 1)
    series, logs = _time_logs(state)
    lo, hi = scale or scale_of(np.concatenate([v for v in logs.values()]))
    T = max(len(v) for v in series.values())
    text.append(fit([f"log10‖∂L/∂h_t‖ through time at step {record.step}", f"{len(names)} recurrent layer(s)",
                     f"t = 0…{T - 1} (first input left)"], width) + "\n", style="bold")

    def columns(v: np.ndarray) -> np.ndarray:
        return stretch(bin_columns(v[None, :], plot_w), plot_w)[0]

    for n in names:
        style = "reverse bold" if n == chosen else ""
        text.append(f"{rowplan.shorten(n, label_w):<{label_w}}", style=style)
        text.append(" ")
        lv = _levels(columns(logs[n]), lo, hi, len(SHADES) - 1 if mono else len(RAMP)).tolist()
        if mono:
            text.append("".join("!" if v < 0 else SHADES[v + 1] for v in lv))
        else:
            _append_runs(text, [("█", _BAD_STYLE if v < 0 else _STYLES[v]) for v in lv])
        text.append("\n")
    curve = columns(logs[chosen])
    chart_h = max(2, height - len(names) - 3)  # title, axis, words
    levels = _levels(curve, lo, hi, 8 * chart_h).tolist()
    for line in range(chart_h):
        label = exp_label(hi) if line == 0 else exp_label(lo) if line == chart_h - 1 else ""
        text.append(f"{label:>{label_w}}▕", style="dim")
        text.append(_bars([max(0, v) for v in levels], chart_h, line), style=None if mono else "cyan")
        text.append("\n")
    axis = [" "] * len(curve)
    for t in range(0, T, max(1, T // 6)):
        pos = int(t * len(curve) / T)
        lab = f"╵{t}"
        if pos + len(lab) <= len(axis):
            axis[pos:pos + len(lab)] = list(lab)
    text.append(" " * (label_w + 1) + "".join(axis).rstrip() + "\n", style="dim")
    text.append_text(_time_words(chosen, series[chosen], width))
    return text


def _time_words(name: str, g: np.ndarray, width: int) -> Text:
    """How fast the gradient falls going back in time, in the diagnosis's words."""
    text = Text(no_wrap=True, overflow="crop")
    T = len(g)
    last = g[-1] if T else float("nan")
    if T < 2 or not math.isfinite(last) or last <= 0:
        text.append(fit([name, "first/last step ratio: not finite or not measured"], width), style="dim")
        return text
    ratio = float(g[0] / last)
    per_step = ratio ** (1.0 / (T - 1)) if ratio > 0 and math.isfinite(ratio) else float("nan")
    weak = np.flatnonzero(~(g / last >= 1e-3))
    parts = [f"{name}: t=0/t={T - 1} {fmt(ratio, 0).strip()}"]
    if math.isfinite(per_step):
        parts.append(f"×{per_step:.3g} per step back")
    if weak.size:
        parts.append(f"inputs > {T - 1 - int(weak[-1])} steps back get < 1e-3 of it")
    parts.append(ratio_verdict(ratio).replace("the input", "t = 0"))
    text.append(fit(parts, width, sep=" · "), style="dim")
    return text



# -- diagnosis ----------------------------------------------------------------------------------

SEVERITY_STYLE = {"critical": "bold white on red", "warning": "bold black on yellow", "info": "bold black on green"}


def verdicts_text(verdicts: list[Verdict], mono: bool, limit: int = 3, waiting: str = "",
                  keys: dict[str, int] | None = None) -> Text:
    """The newest verdicts, worst first; a suggested preset that has a number key shows it."""
    text = Text()
    if not verdicts:
        text.append(" diagnosis ", style="reverse")
        text.append(" no verdict yet" + (f" — {waiting}" if waiting else ""), style="dim")
        return text
    ordered = sorted(verdicts, key=lambda v: SEVERITY_ORDER.get(v.severity, 3))
    for n, verdict in enumerate(ordered[:limit]):
        if n:
            text.append("\n")
        style = "reverse bold" if mono else SEVERITY_STYLE.get(verdict.severity, "reverse")
        text.append(f" {verdict.severity.upper()} ", style=style)
        text.append(f" {verdict.kind}: ", style="bold")
        text.append(verdict.summary)
        if verdict.suggestions:
            text.append("\n   try: ", style="dim")
            keys = keys or {}
            text.append(" · ".join(f"{s} [{keys[s]}]" if s in keys else s for s in verdict.suggestions))
    if len(ordered) > limit:
        rest = ", ".join(f"{v.kind} ({v.severity})" for v in ordered[limit:])
        text.append(f"\n   also: {rest}", style="dim")
    return text
