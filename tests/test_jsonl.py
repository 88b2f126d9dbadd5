"""Recordings: strict JSON on every line, round trip, and tolerance for damage."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vgtui.config import load_preset
from vgtui.jsonl import (
    FORMAT_VERSION,
    LAYER_DIGITS,
    LOSS_DIGITS,
    NORM_DIGITS,
    JsonlReader,
    JsonlWriter,
    read_recording,
)
from vgtui.records import LAYER_METRICS, RunHeader, StepRecord
from vgtui.trainer import run_to_completion


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A short exploding run (it reaches NaN), recorded."""
    path = tmp_path_factory.mktemp("rec") / "run.jsonl"
    records = run_to_completion(load_preset("exploding"), 10)
    with JsonlWriter(path) as writer:
        writer.write_all(records)
    return path, records


def test_every_line_is_strict_json_with_the_documented_keys(recorded):
    path, _ = recorded
    lines = path.read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) for line in lines]
    header = parsed[0]
    assert header["type"] == "header" and header["version"] == FORMAT_VERSION == 2
    assert header["layers"] == [f"hidden{i}" for i in range(1, 9)] + ["output"]
    assert header["preset"]["name"] == "exploding"
    steps = [p for p in parsed if p["type"] == "step"]
    for key in ("step", "loss", "grad_norm_total", "grad_norm_clipped", "columns"):
        assert key in steps[0]
    assert set(steps[0]["columns"]) == set(LAYER_METRICS)
    assert len(steps[0]["columns"]["weight_grad_norm"]) == 9 and len(steps[0]["hist"]) == 9
    assert all(isinstance(c, int) for c in steps[0]["hist"][0]), "histogram counts are integers"
    assert any(s["loss"] in ("nan", "inf") for s in steps), "non-finite values are strings"


def _close(a: float, b: float, digits: int) -> bool:
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= abs(a) * 0.5 * 10.0 ** (1 - digits)


def test_round_trip_keeps_the_significant_digits(recorded):
    path, records = recorded
    result = read_recording(path)
    assert result.problems == []
    assert len(result.records) == len(records)
    for a, b in zip(records, result.records):
        assert type(a) is type(b)
        if isinstance(a, StepRecord):
            assert a.step == b.step and a.nonfinite == b.nonfinite and a.detail == b.detail
            assert _close(a.loss, b.loss, LOSS_DIGITS) and _close(a.grad_norm_total, b.grad_norm_total, NORM_DIGITS)
            for metric, column in a.layers.items():
                assert all(_close(x, y, LAYER_DIGITS) for x, y in zip(column, b.layers[metric])), metric
            np.testing.assert_array_equal(a.hist, b.hist)
        if isinstance(a, RunHeader):
            assert a.layers == b.layers and a.preset == b.preset


def test_version_1_is_still_written_and_read_exactly(recorded, tmp_path):
    _, records = recorded
    path = tmp_path / "v1.jsonl"
    with JsonlWriter(path, version=1) as writer:
        writer.write_all(records)
    assert json.loads(path.read_text().splitlines()[0])["version"] == 1
    result = read_recording(path)
    assert result.problems == [] and len(result.records) == len(records)
    for a, b in zip(records, result.records):
        if isinstance(a, StepRecord):
            assert (math.isnan(a.loss) and math.isnan(b.loss)) or a.loss == b.loss
            for metric, column in a.layers.items():
                np.testing.assert_array_equal(column, b.layers[metric])
            np.testing.assert_array_equal(a.hist, b.hist)


def test_truncated_last_line_is_skipped_and_reported(recorded, tmp_path):
    path, records = recorded
    data = path.read_bytes()
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(data[: len(data) - 40])  # mid-way through the last line
    result = read_recording(cut)
    assert len(result.records) == len(records) - 1
    assert len(result.problems) == 1 and "truncated last line" in result.problems[0]


def test_garbage_and_wrong_version_lines_are_reported_with_line_numbers(recorded, tmp_path):
    path, records = recorded
    lines = path.read_text().splitlines()
    lines.insert(3, "this is not json")
    lines.insert(5, '{"type": "step", "step": "x"}')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = read_recording(bad)
    assert len(result.records) == len(records)
    assert [p.split(":")[1] for p in result.problems] == ["4", "6"]
    wrong = tmp_path / "v99.jsonl"
    header = json.loads(lines[0]) | {"version": 99}
    wrong.write_text(json.dumps(header) + "\n" + lines[1] + "\n")
    result = read_recording(wrong)
    assert "version 99" in result.problems[0]


def test_incremental_reader_follows_a_growing_file(recorded, tmp_path):
    path, records = recorded
    data = path.read_bytes()
    live = tmp_path / "live.jsonl"
    reader = JsonlReader(live)
    assert reader.read_new().records == []  # the writer has not started yet
    seen = []
    for end in range(0, len(data) + 1, 997):
        live.write_bytes(data[:end])
        seen += reader.read_new().records
    live.write_bytes(data)
    seen += reader.finish().records
    assert len(seen) == len(records)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_leaves_a_complete_recording(tmp_path, sig):
    """A stopped headless run (job killed, SSH dropped, ctrl-c) keeps every finished line."""
    path = tmp_path / "run.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vgtui", "run", "--preset", "shallow", "--steps", "100000",
         "--record", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count('"type":"step"') >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    proc.wait(30)
    assert proc.returncode == 128 + sig
    result = read_recording(path)
    assert result.problems == []
    text = path.read_text()
    assert text.endswith("\n")
    assert sum(isinstance(r, StepRecord) for r in result.records) >= 3
    assert "Traceback" not in proc.stderr.read()
