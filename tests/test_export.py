"""`vgtui export`: the CSV round trip (every value back, exactly), and TensorBoard when installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vgtui
from vgtui.cli import main
from vgtui.export import CSV_COLUMNS, TENSORBOARD_HINT, export_csv, export_tensorboard, read_csv
from vgtui.jsonl import JsonlWriter, read_recording
from vgtui.records import HIST_BINS, LAYER_METRICS, RunHeader, StepRecord

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _step(step: int, blow_up: bool = False) -> StepRecord:
    rng = np.random.default_rng(step)
    layers = {m: rng.uniform(0.01, 2.0, 2) for m in LAYER_METRICS}
    layers["saturated"] = np.array([0.25, np.nan])  # sigmoid layer, then a ReLU layer: n/a
    layers["dead"] = np.array([np.nan, np.nan])  # never applies here: left out of the CSV
    if blow_up:
        layers["weight_grad_norm"] = np.array([np.inf, np.nan])
    hist = np.zeros((2, HIST_BINS))
    hist[0, 5:9] = [1, 4, 2, 1]
    return StepRecord(step=step, loss=float("nan") if blow_up else 1.0 / (step + 1), accuracy=float("nan"),
                      grad_norm_total=3.0, grad_norm_clipped=1.0, clipped=True, layers=layers, hist=hist)


@pytest.fixture
def recording(tmp_path):
    path = tmp_path / "run.jsonl"
    with JsonlWriter(path) as writer:
        writer.write(RunHeader(preset={"name": "t"}, layers=["hidden1", "hidden2"],
                               layer_kinds=["sigmoid", "relu"], device="cpu"))
        for step in (0, 10, 20):
            writer.write(_step(step, blow_up=step == 20))
    return path


def _expected_rows(path):
    """What the CSV must hold, computed from the reader's records (not from the exporter)."""
    records = read_recording(path).records
    header = records[0]
    rows = []
    for r in (r for r in records if isinstance(r, StepRecord)):
        rows += [(r.step, "", "loss", r.loss), (r.step, "", "grad_norm_total", r.grad_norm_total),
                 (r.step, "", "grad_norm_clipped", r.grad_norm_clipped), (r.step, "", "clipped", float(r.clipped))]
        for metric in LAYER_METRICS:
            for i, name in enumerate(header.layers):
                if metric == "dead" or (metric == "saturated" and i == 1):
                    continue  # never measured: not a row
                rows.append((r.step, name, metric, float(r.layers[metric][i])))
    return rows


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:3] == y[:3]
        assert (math.isnan(x[3]) and math.isnan(y[3])) or x[3] == y[3], (x, y)


def test_csv_round_trip_is_exact(recording, tmp_path):
    out = tmp_path / "out" / "run.csv"
    rows, problems = export_csv(recording, out)
    assert problems == []
    got = read_csv(out)
    assert rows == len(got)
    _same(sorted(got, key=repr), sorted(_expected_rows(recording), key=repr))
    assert out.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    # The blow-up is kept, spelled so that pandas/numpy/float() read it back.
    text = out.read_text()
    assert "20,hidden1,weight_grad_norm,inf" in text and "20,hidden2,weight_grad_norm,nan" in text
    assert "20,,loss,nan" in text and ",accuracy," not in text and ",dead," not in text


def test_csv_of_a_watched_model_via_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "watched.jsonl"
    with vgtui.watch(model, record=path, optimizer=opt, diagnose=False, detail_every=1) as watcher:
        for step in range(3):
            loss = F.mse_loss(model(torch.randn(5, 3)), torch.randn(5, 1))
            loss.backward()
            watcher.step(opt, loss)
            opt.step()
            opt.zero_grad()
    out = tmp_path / "watched.csv"
    assert main(["export", str(path), "--csv", str(out)]) == 0
    rows = read_csv(out)
    assert f"wrote {len(rows)} rows" in capsys.readouterr().out
    steps = [r for r in read_recording(path).records if isinstance(r, StepRecord)]
    by_key = {(s, layer, m): v for s, layer, m, v in rows}
    for r in steps:
        assert by_key[(r.step, "", "loss")] == r.loss
        for i, name in enumerate(["0", "2"]):
            for metric in ("weight_grad_norm", "act_grad_norm", "act_std", "weight_norm", "update_ratio"):
                assert by_key[(r.step, name, metric)] == r.layers[metric][i]
    assert {m for _, _, m, _ in rows} >= {"weight_grad_norm", "act_grad_norm", "update_ratio", "loss"}


def test_damaged_and_multi_run_recordings_report_problems(recording, tmp_path):
    with open(recording, "a") as handle:
        handle.write('{"type": "step", "step": 30, "broken\n')
    rows, problems = export_csv(recording, tmp_path / "a.csv")
    assert rows == len(_expected_rows(recording)) and len(problems) == 1 and ":5:" in problems[0]
    two = tmp_path / "two.jsonl"
    with JsonlWriter(two) as writer:
        for run_id in (1, 2):
            writer.write(RunHeader(preset={}, layers=["hidden1", "hidden2"], layer_kinds=["sigmoid", "relu"],
                                   device="cpu", run_id=run_id))
            record = _step(0)
            record.run_id = run_id
            writer.write(record)
    rows, problems = export_csv(two, tmp_path / "two.csv")
    assert rows == 2 * len(_expected_rows(recording)) // 3 and "holds 2 runs" in problems[0]


def test_tensorboard_missing_is_one_clear_line(recording, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["export", str(recording), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vgtui: {TENSORBOARD_HINT}"] and "install vgtui[tensorboard]" in err[0]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (optional extra vgtui[tensorboard])")
def test_tensorboard_round_trip(recording, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    outdir = tmp_path / "tb"
    assert export_tensorboard(recording, outdir) == 3
    events = EventAccumulator(str(outdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "weight_grad_norm/00_hidden1" in tags["scalars"] and "global/loss" in tags["scalars"]
    assert not any(t.startswith("dead/") for t in tags["scalars"]) and "global/accuracy" not in tags["scalars"]
    loss = [(e.step, e.value) for e in events.Scalars("global/loss")]
    assert [s for s, _ in loss] == [0, 10, 20] and loss[0][1] == 1.0 and math.isnan(loss[2][1])
    w = [e.value for e in events.Scalars("weight_grad_norm/01_hidden2")]
    expected = [float(r.layers["weight_grad_norm"][1]) for r in read_recording(recording).records[1:]]
    np.testing.assert_allclose(w, expected, rtol=1e-6)  # TensorBoard stores float32
    # Layer 0 has a histogram every step; layer 1's are empty and skipped, not written empty.
    assert tags["histograms"] == ["grad_log10/00_hidden1"]
    hist = events.Histograms("grad_log10/00_hidden1")
    assert len(hist) == 3 and hist[0].histogram_value.num == 8


def _old_export_rows(path) -> list[tuple]:
    """The CSV rows as the exporter wrote them before it streamed: every record in memory, runs
    grouped by id in order of first appearance, optional series kept where ever measured."""
    from vgtui.export import GLOBAL_METRICS, OPTIONAL_METRICS, _global_value, _heldout, _text

    runs: dict[int, tuple] = {}
    for record in read_recording(path).records:
        if isinstance(record, RunHeader):
            runs[record.run_id] = (record, [])
        elif isinstance(record, StepRecord) and record.run_id in runs:
            runs[record.run_id][1].append(record)
    rows = []
    for header, steps in runs.values():
        def measured(values):
            return any(not math.isnan(v) for v in values)

        globals_ = [m for m in GLOBAL_METRICS
                    if m not in OPTIONAL_METRICS or measured(_global_value(r, m) for r in steps)]
        per_layer = [(i, m) for m in LAYER_METRICS for i in range(len(header.layers))
                     if m not in OPTIONAL_METRICS or measured(float(r.layers[m][i]) for r in steps)]
        for r in steps:
            rows += [(str(r.step), "", m, _text(_global_value(r, m))) for m in globals_]
            rows += [(str(r.step), header.layers[i], m, _text(float(r.layers[m][i]))) for i, m in per_layer]
            rows += [(str(r.step), "", m, _text(v)) for m, v in _heldout(r)]  # re-recorded fixtures evaluate
    return rows


@pytest.mark.parametrize("name", ["exploding", "relu-30-xavier", "relu-he", "sigmoid-deep"])
def test_streamed_csv_equals_the_old_output_on_the_recorded_runs(name, tmp_path, monkeypatch):
    import csv

    import vgtui.jsonl

    path = Path(__file__).parent / "data" / f"{name}.jsonl"
    def whole(*_):
        raise AssertionError("the exporter read the recording whole")

    for method in ("finish", "read_new"):  # only the streaming iterator may be used
        monkeypatch.setattr(vgtui.jsonl.JsonlReader, method, whole)
    out = tmp_path / "out.csv"
    rows, problems = export_csv(path, out)
    monkeypatch.undo()
    expected = _old_export_rows(path)
    with open(out, newline="") as handle:
        got = [tuple(row) for row in csv.reader(handle)][1:]
    assert problems == [] and rows == len(got) == len(expected) and got == expected


def test_interleaved_runs_come_out_grouped_as_before(tmp_path):
    import csv

    path = tmp_path / "mixed.jsonl"
    with JsonlWriter(path) as writer:
        for run_id in (1, 2):
            writer.write(RunHeader(preset={}, layers=["hidden1", "hidden2"], layer_kinds=["sigmoid", "relu"],
                                   device="cpu", run_id=run_id))
        for step in range(4):
            for run_id in (2, 1):
                record = _step(step)
                writer.write(dataclasses.replace(record, run_id=run_id, step=step + 100 * run_id))
    out = tmp_path / "mixed.csv"
    export_csv(path, out)
    with open(out, newline="") as handle:
        got = [tuple(row) for row in csv.reader(handle)][1:]
    assert got == _old_export_rows(path)
    assert [r[0] for r in got][:1] == ["100"] and got[-1][0] == "203"
