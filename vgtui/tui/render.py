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
from ..records import SEVERITY_ORDER, Verdict
from .state import RunState

# "turbo"-like ramp: vanishing = cold, exploding = hot
RAMP = ["#30123b", "#4145ab", "#4675ed", "#39a2fc", "#1bcfd4", "#24eca6", "#61fc6c", "#a4fc3b",
        "#d1e834", "#f3c63a", "#fe9b2d", "#f36315", "#d93806", "#b11901", "#7a0402"]
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


# -- per-layer sparkline rows ------------------------------------------------------------------

def layer_rows(state: RunState, width: int, metrics: list[str], selected: int, mono: bool) -> Text:
    """One row per layer (input at top): name, a sparkline of log10 norm over the newest steps
    (one shared scale per metric, so a vanishing gradient sits visibly lower), the current value."""
    text = Text(no_wrap=True, overflow="crop")
    names = state.layer_names
    if not names:
        text.append("waiting for the first record…", style="dim")
        return text
    name_w = min(10, max(len(n) for n in names))
    col_w = max(12, (width - name_w - 1) // len(metrics))
    spark_w = max(1, col_w - 11)
    columns = []
    for metric in metrics:
        logged = state.log_matrix(metric, spark_w)
        lo, hi = scale_of(logged)
        columns.append((metric, logged, lo, hi))
    # header
    text.append(f"{'layer':<{name_w}} ", style="bold")
    for metric, _, lo, hi in columns:
        title = f"log10{METRIC_TITLES.get(metric, metric)} {exp_label(lo)}…{exp_label(hi)}"
        text.append(f"{title[:col_w - 1]:<{col_w - 1}} ", style="bold")
    text.append("\n")
    for i, name in enumerate(names):
        marker_style = "reverse bold" if i == selected else "bold" if i in (0, len(names) - 1) else ""
        text.append(f"{name[:name_w]:<{name_w}}", style=marker_style)
        text.append(" ")
        for metric, logged, lo, hi in columns:
            row = logged[i] if logged.shape[1] else np.zeros(0)
            levels = _levels(row, lo, hi, len(SPARK)).tolist() if row.size else []
            # one colour per row: that of the newest value (few spans: cheap to composite)
            colour = level(float(row[-1]), lo, hi, len(RAMP)) if row.size else 0
            row_style = None if mono else (_STYLES[colour] if colour >= 0 else _BAD_STYLE)
            pad = spark_w - len(levels)
            if pad > 0:
                text.append(" " * pad)
            _append_runs(text, [("✗", _BAD_STYLE) if lv < 0 else (SPARK[lv], row_style) for lv in levels])
            current = state.last.layers[metric][i] if state.last is not None else float("nan")
            value_style = row_style
            if not math.isfinite(current):
                value_style = "bold reverse" if mono else _BAD_STYLE
            text.append(" ")
            text.append(fmt(current, 9), style=value_style)
            text.append(" " * (col_w - spark_w - 10))
        text.append("\n")
    if state.last is not None and "act_grad_norm" in metrics:
        g = state.last.layers["act_grad_norm"]
        ratio = float(g[0] / g[-1]) if len(g) > 1 and g[-1] not in (0,) and math.isfinite(g[-1]) else float("nan")
        head = f"input/output ‖∂L/∂h‖ {fmt(ratio, 0).strip()}"
        text.append(fit([head, ratio_words(ratio)], width, sep="  "), style="dim")
    return text


def ratio_words(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "(not finite)"
    if ratio < 1e-2:
        return "vanishing toward the input"
    if ratio > 1e2:
        return "exploding toward the input"
    return "healthy: it keeps its size"


# -- heatmap ------------------------------------------------------------------------------------

def heatmap(state: RunState, width: int, height: int, metric: str, mono: bool) -> Text:
    """Layers (rows, input at top) × steps (columns, newest at right); colour = log10 norm.
    Two layers per text row with half blocks; many layers are grouped (weakest of the group)."""
    text = Text(no_wrap=True, overflow="crop")
    names = state.layer_names
    if not names or not state.steps:
        text.append("waiting for the first record…", style="dim")
        return text
    logged = state.log_matrix(metric)
    first_step, last_step = state.steps[0].step, state.steps[-1].step
    label_w = min(9, max(len(n) for n in names))
    plot_w = max(4, width - label_w - 1)
    plot_h = max(1, height - 3)
    per_row = 1 if mono else 2
    cols = bin_columns(logged, plot_w)
    if 0 < cols.shape[1] < plot_w:  # few steps: widen each step's cell, up to 6 characters
        cols = np.repeat(cols, max(1, min(6, plot_w // cols.shape[1])), axis=1)
    cells, groups = bin_rows(cols, plot_h * per_row)
    lo, hi = scale_of(cells)
    title = fit([f"log10{METRIC_TITLES.get(metric, metric)}", f"{len(names)} layers (input top)",
                 f"steps {first_step}–{last_step} (newest right)"], width)
    text.append(title + "\n", style="bold")
    n_cells = cells.shape[0]
    if mono:
        lv = _levels(cells, lo, hi, len(SHADES) - 1)
        for r in range(n_cells):
            a, b = groups[r]
            label = names[a] if a == b else f"{a + 1}-{b + 1}"
            text.append(f"{label[:label_w]:>{label_w}} ")
            text.append("".join("!" if v < 0 else SHADES[v + 1] for v in lv[r].tolist()))
            text.append("\n")
    else:
        lv = _levels(cells, lo, hi, len(RAMP))
        for r in range(0, n_cells, 2):
            a = groups[r][0]
            b = groups[min(r + 1, n_cells - 1)][1]
            label = names[a] if groups[r][0] == groups[r][1] else f"{a + 1}-{b + 1}"
            text.append(f"{label[:label_w]:>{label_w}} ")
            top = lv[r].tolist()
            bottom = lv[r + 1].tolist() if r + 1 < n_cells else None
            cells = []
            for j, t in enumerate(top):
                b = None if bottom is None else bottom[j]
                cells.append(("▀", _cell_style(t, b)))
            _append_runs(text, cells)
            text.append("\n")
    # legend
    text.append(" " * (label_w + 1))
    if mono:
        text.append(f"{exp_label(lo)} " + "".join(SHADES[1:]) + f" {exp_label(hi)}   ! = nan/inf")
    else:
        text.append(f"{exp_label(lo)} ")
        for colour in RAMP:
            text.append("█", style=Style(color=colour))
        text.append(f" {exp_label(hi)}  ")
        text.append("█", style=_BAD_STYLE)
        text.append(" nan/inf")
    return text


_CELL_STYLES: dict = {}


def _cell_style(top: int, bottom: int | None) -> Style:
    """Half-block style for two colour levels (-1 = nan/inf), cached: 17×18 styles at most."""
    key = (top, bottom)
    style = _CELL_STYLES.get(key)
    if style is None:
        fg = BAD_COLOUR if top < 0 else RAMP[top]
        if bottom is None:
            style = Style(color=fg)
        else:
            style = Style(color=fg, bgcolor=BAD_COLOUR if bottom < 0 else RAMP[bottom])
        _CELL_STYLES[key] = style
    return style


# -- histogram ----------------------------------------------------------------------------------

def histogram(state: RunState, layer: int, width: int, height: int, mono: bool) -> Text:
    """The selected layer's log10|∂L/∂W| histogram at the newest step, as vertical bars."""
    text = Text(no_wrap=True, overflow="crop")
    record = state.last_detail
    if record is None or not state.header:
        text.append("waiting for the first record…", style="dim")
        return text
    layer = max(0, min(layer, state.n_layers - 1))
    counts = np.nan_to_num(record.hist[layer].astype(float))
    edges = np.asarray(state.header.hist_edges, dtype=float)
    bins = len(counts)
    name = state.layer_names[layer]
    total = counts.sum()
    title = fit([f"log10|∂L/∂W| histogram", f"{name} ({layer + 1}/{state.n_layers})",
                 f"step {record.step}", f"{int(total):,} sampled weights", "zeros in the lowest bin"], width)
    text.append(title + "\n", style="bold")
    axis_w = 7
    bar_w = max(1, (width - axis_w) // max(1, bins))
    plot_h = max(2, height - 3)
    peak = counts.max() if counts.size else 0
    eighths = (counts / peak * plot_h * 8) if peak > 0 else np.zeros_like(counts)
    mids = (edges[:-1] + edges[1:]) / 2 if len(edges) == bins + 1 else np.arange(bins)
    lo, hi = -12.0, 2.0
    for row in range(plot_h, 0, -1):
        label = f"{int(peak):,}" if row == plot_h else ("0" if row == 1 else "")
        text.append(f"{label[:axis_w - 1]:>{axis_w - 1}}▕")
        base = (row - 1) * 8
        for b in range(bins):
            fill = eighths[b] - base
            if fill <= 0:
                ch = " "
            elif fill >= 8:
                ch = "█"
            else:
                ch = SPARK[max(0, int(fill) - 1)] if fill >= 1 else "▁"
            style = None if mono else _STYLES[level(float(mids[b]), lo, hi, len(RAMP))]
            text.append(ch * bar_w, style=style)
        text.append("\n")
    # x axis: a tick label every few bins
    text.append(" " * axis_w)
    axis = [" "] * (bins * bar_w)
    step = max(1, int(math.ceil(4 / bar_w)))
    for b in range(0, bins + 1, step):
        if b >= len(edges):
            break
        label = f"{edges[b]:g}"
        pos = b * bar_w
        if pos + len(label) <= len(axis):
            axis[pos:pos + len(label)] = list(label)
    text.append("".join(axis) + "\n")
    text.append(" " * axis_w + "log10|∂L/∂W| →", style="dim")
    return text


# -- activations --------------------------------------------------------------------------------

def activations(state: RunState, width: int, selected: int, mono: bool, height: int = 0) -> Text:
    """Per layer: activation mean and std, % saturated / % dead now, and its history.
    With more layers than ``height - 1`` rows, a window that follows the selected layer."""
    text = Text(no_wrap=True, overflow="crop")
    names = state.layer_names
    if not names or state.last_detail is None:
        text.append("waiting for the first record…", style="dim")
        return text
    name_w = min(10, max(len(n) for n in names))
    fixed = name_w + 8 + 9 + 9 + 7 + 7 + 2
    spark_w = max(0, width - fixed)
    text.append(f"{'layer':<{name_w}} {'kind':<7} {'mean':>8} {'std':>8} {'sat%':>6} {'dead%':>6}  ",
                style="bold")
    if spark_w >= 6:
        text.append(f"{'sat/dead % over time'[:spark_w]}", style="bold")
    text.append("\n")
    cols = state.last_detail.layers
    sat_hist = state.matrix("saturated", spark_w, detail=True) if spark_w else None
    dead_hist = state.matrix("dead", spark_w, detail=True) if spark_w else None
    kinds = state.header.layer_kinds if state.header else ["?"] * len(names)
    rows = len(names) if height <= 1 else max(1, height - 1)
    first = 0
    if len(names) > rows:
        first = max(0, min(len(names) - rows, selected - rows // 2))
    for i in range(first, min(len(names), first + rows)):
        name = names[i]
        style = "reverse bold" if i == selected else ""
        text.append(f"{name[:name_w]:<{name_w}}", style=style)
        sat, dead = cols["saturated"][i], cols["dead"][i]
        text.append(f" {kinds[i][:7]:<7} {fmt(cols['act_mean'][i])} {fmt(cols['act_std'][i])} ")
        text.append(_pct(sat), style=_pct_style(sat, mono))
        text.append(" ")
        text.append(_pct(dead), style=_pct_style(dead, mono))
        text.append("  ")
        if spark_w >= 6:
            row = sat_hist[i] if not np.all(np.isnan(sat_hist[i])) else dead_hist[i]
            for v in row.tolist()[-spark_w:]:
                if not math.isfinite(v):
                    text.append(" ")
                else:
                    lv = min(len(SPARK) - 1, int(v * len(SPARK)))
                    text.append(SPARK[lv], style=None if mono else _pct_style(v, False))
        text.append("\n")
    return text


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
