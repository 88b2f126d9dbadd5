"""Presets and recordings are data: nothing in the package evaluates or unpickles what it reads."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vgtui"


def test_no_eval_exec_pickle_or_unsafe_torch_load():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"\beval\(", r"\bexec\(", r"\bpickle\b", r"\bmarshal\b", r"yaml\.load\("):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
    assert offenders == []


def test_core_modules_do_not_import_textual():
    """The engine stays free of the UI (the TUI lives in vgtui/tui/)."""
    for path in PACKAGE.glob("*.py"):
        assert not re.search(r"^\s*(from|import) textual", path.read_text(), re.M), path.name
