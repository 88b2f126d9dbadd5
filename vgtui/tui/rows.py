"""What the rows of a per-layer view are: layers, or blocks of layers, and the names they show.
No Textual here.

Deep models are read by block (``transformer.h.7``, ``layer3.1``, ``encoder.layers.2``): a block
is the run of consecutive layers under the same repeated container (the module path up to its
first numeric component). A collapsed block is one row whose ‖∂L/∂W‖ is the root-sum-square of
its layers' (the norm of all its weights' gradient together) and whose ‖∂L/∂h‖ is that of its
last measured layer (its output: what it hands back to the blocks before it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Models deeper than this open in block mode (when they have blocks).
BLOCKS_FROM = 40


def common_prefix(names: list[str], share: float = 0.8) -> str:
    """The longest dotted prefix (``"transformer."``) that at least ``share`` of the names start
    with and that is never a whole name; "" when there is none. GPT-2's ``lm_head`` sits outside
    ``transformer.``: the rest still lose the prefix."""
    if len(names) < 2:
        return ""
    best = ""
    candidates = {".".join(n.split(".")[:k]) + "." for n in names for k in range(1, n.count(".") + 1)}
    for prefix in candidates:
        under = [n[len(prefix):] for n in names if n.startswith(prefix)]
        if any(rest[:1].isdigit() for rest in under):
            continue  # keep a block's container in its label: "h.3", not "3"
        hits = len(under)
        if hits >= max(2, share * len(names)) and len(prefix) > len(best):
            best = prefix
    return best


def shorten(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, cut from the middle so the end (which sub-module)
    and the start survive: ``transformer.h.11.attn.c_attn`` -> ``t….h.11.attn.c_attn``."""
    if len(name) <= width:
        return name
    if width <= 1:
        return name[:width]
    if width <= 3:
        return name[: width - 1] + "…"
    head = name[0] + "…"
    room = width - len(head)
    tail = name[-room:]
    dot = tail.find(".")
    # prefer a tail that starts at a component boundary when that keeps most of it
    if 0 < dot < room // 2 and len(tail) - dot >= 4:
        tail = tail[dot:]
    return head + tail


def block_key(name: str) -> str | None:
    """The repeated container a layer belongs to: its path up to the first numeric component."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return None


@dataclass(frozen=True)
class Row:
    """One row of a per-layer view: a layer, or a block of consecutive layers."""

    label: str  # the full name (a layer's module path, or the block's container path)
    first: int  # layer indices covered, inclusive
    last: int
    block: bool  # a block row (collapsed or the header of an expanded one)
    depth: int = 0  # 1 for a layer shown inside an expanded block
    parent: str = ""  # the expanded block's path, which the layer's label leaves out

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


def blocks(names: list[str]) -> list[Row]:
    """Consecutive layers grouped by :func:`block_key`; a layer outside any block stays alone."""
    out: list[Row] = []
    i = 0
    while i < len(names):
        key = block_key(names[i])
        j = i
        if key is not None:
            while j + 1 < len(names) and block_key(names[j + 1]) == key:
                j += 1
        if key is not None and j > i:
            out.append(Row(key, i, j, True))
        else:
            out.append(Row(names[i], i, i, False))
        i = j + 1
    return out


def has_blocks(names: list[str]) -> bool:
    return any(r.block for r in blocks(names))


def plan(names: list[str], by_block: bool, expanded: frozenset[str] = frozenset()) -> list[Row]:
    """The rows to draw: every layer, or blocks with the ``expanded`` ones opened in place."""
    if not by_block:
        return [Row(n, i, i, False) for i, n in enumerate(names)]
    out: list[Row] = []
    for row in blocks(names):
        out.append(row)
        if row.block and row.label in expanded:
            out.extend(Row(names[i], i, i, False, depth=1, parent=row.label) for i in row.layers)
    return out


def row_of(rows: list[Row], layer: int) -> int:
    """The row that shows ``layer``: the innermost (a layer row inside an expanded block wins)."""
    best = 0
    for r, row in enumerate(rows):
        if row.first <= layer <= row.last:
            best = r
            if not row.block:
                return r
    return best


# -- values of a row -------------------------------------------------------------------------------

def _measured_last(values: np.ndarray, measured: np.ndarray | None) -> np.ndarray:
    """Per column, the value of the last measured row (NaN where none was)."""
    if measured is None:
        return values[-1]
    out = np.full(values.shape[1:], np.nan)
    done = np.zeros(values.shape[1:], dtype=bool)
    for r in range(values.shape[0] - 1, -1, -1):
        take = measured[r] & ~done
        out = np.where(take, values[r], out)
        done |= measured[r]
    return out


def aggregate(values: np.ndarray, rows: list[Row], metric: str,
              measured: np.ndarray | None = None) -> np.ndarray:
    """(L, ...) per-layer values -> (R, ...) per-row values. ``measured`` (L, ...) bool marks
    what was measured; a row with nothing measured is NaN (the caller marks it not measured)."""
    out = np.empty((len(rows),) + values.shape[1:])
    for r, row in enumerate(rows):
        if not row.block:
            out[r] = values[row.first]
            continue
        chunk = values[row.first: row.last + 1]
        mask = None if measured is None else measured[row.first: row.last + 1]
        if metric == "weight_grad_norm":
            with np.errstate(over="ignore", invalid="ignore"):
                squares = np.where(mask, chunk, 0.0) ** 2 if mask is not None else chunk ** 2
                total = np.sqrt(squares.sum(axis=0))
            if mask is not None:
                total = np.where(mask.any(axis=0), total, np.nan)
            out[r] = total
        elif metric == "act_grad_norm":
            out[r] = _measured_last(chunk, mask)
        elif metric in ("saturated", "dead"):
            out[r] = np.where(np.isnan(chunk), -np.inf, chunk).max(axis=0)
            out[r] = np.where(out[r] == -np.inf, np.nan, out[r])
        else:  # means, stds, ratios: the last measured layer's (the block's output)
            out[r] = _measured_last(chunk, mask)
    return out


def aggregate_mask(measured: np.ndarray, rows: list[Row]) -> np.ndarray:
    """(L, ...) measured -> (R, ...): a row is measured if any of its layers was."""
    return np.stack([measured[row.first: row.last + 1].any(axis=0) for row in rows]) if rows \
        else np.zeros((0,) + measured.shape[1:], dtype=bool)


def label_width(rows: list[Row], width: int, prefix: str, share: float = 0.3,
                floor: int = 8) -> int:
    """How many columns the labels get: their natural width up to ``share`` of the view."""
    natural = max((len(display_name(r, prefix)) for r in rows), default=5)
    return max(min(natural, floor), min(natural, int(width * share)))


def _name(row: Row, prefix: str) -> str:
    """What a row calls its layer: inside an open block, the path below the block (the block's
    row just above says the rest, and the selected layer's full name is on screen); otherwise the
    path without the shared prefix."""
    if row.parent and row.label.startswith(row.parent + "."):
        return row.label[len(row.parent) + 1:]
    return row.label[len(prefix):] if prefix and row.label.startswith(prefix) else row.label


def display_name(row: Row, prefix: str) -> str:
    name = _name(row, prefix)
    if row.block:
        n = row.last - row.first + 1
        return f"▸ {name} ({n})"
    return ("  " * row.depth) + name


def row_label(row: Row, prefix: str, width: int, expanded: frozenset[str] = frozenset()) -> str:
    """The row's label fitted to ``width``: ``▸``/``▾`` marks a collapsed/expanded block."""
    name = _name(row, prefix)
    if row.block:
        mark = "▾" if row.label in expanded else "▸"
        count = f"({row.last - row.first + 1})"
        room = max(1, width - len(count) - 3)
        return f"{mark} {shorten(name, room)} {count}"
    indent = "  " * row.depth
    return indent + shorten(name, max(1, width - len(indent)))


def span_label(rows: list[Row], first: int, last: int, prefix: str, width: int) -> str:
    """The label of one text line that packs rows ``first..last`` (a deep heatmap), so that no
    packed row goes unnamed: rows inside consecutive blocks of one container read as the range of
    blocks and how many rows the line holds (``layers.4–5 (7)``, ``layers.3 (4)``); anything else
    as its first row and how many more there are (``embed_tokens +1``)."""
    if first == last:
        return row_label(rows[first], prefix, width)
    chunk = rows[first: last + 1]
    keys = [r.label if r.block else block_key(r.label) for r in chunk]
    if all(keys):
        split = [k.rpartition(".") for k in keys]
        if len({c for c, _, _ in split}) == 1:
            container = _name(Row(split[0][0] + ".", 0, 0, False), prefix).rstrip(".")
            a, b = split[0][2], split[-1][2]
            span = a if a == b else f"{a}–{b}"
            count = "" if all(r.block for r in chunk) else f" ({len(chunk)})"
            return shorten(f"{container}.{span}", max(1, width - len(count))) + count
    more = f" +{last - first}"
    return shorten(_name(chunk[0], prefix), max(1, width - len(more))) + more


def finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else float("nan")
