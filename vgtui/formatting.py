"""Numbers as people read them, shared by the headless printer and the TUI (no torch here)."""

from __future__ import annotations

import math


def fmt(value: float | None, width: int = 8) -> str:
    """A short, fixed-width number: 3 significant digits, scientific when tiny or huge; "-" for
    a value that was not measured (None)."""
    if value is None:
        return "-".rjust(width)
    if math.isnan(value):
        return "nan".rjust(width)
    if math.isinf(value):
        return ("inf" if value > 0 else "-inf").rjust(width)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.2e}".rjust(width)
    return f"{value:.3g}".rjust(width)
