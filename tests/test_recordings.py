"""Recordings that scale: every field through both formats and gzip, today's files, a writer that
fails or is killed, and the index that replay/attach read long recordings through."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from vgtui.jsonl import (
    LAYER_DIGITS,
    LOSS_DIGITS,
    NORM_DIGITS,
    JsonlReader,
    JsonlWriter,
    RecordingError,
    RecordingIndex,
    iter_records,
    read_recording,
)
from vgtui.records import (
    HIST_BINS,
    LAYER_METRICS,
    RunError,
    RunEvent,
    RunHeader,
    StepRecord,
    StepWindow,
    Verdict,
)

DATA = Path(__file__).parent / "data"
NAMES = ["embed", "lstm", "head"]


def _header(run_id: int = 1) -> RunHeader:
    return RunHeader(preset={"name": "t", "lr": 0.1, "nested": {"a": [1, 2]}}, layers=list(NAMES),
                     layer_kinds=["linear", "tanh", "linear"], device="cuda:0", run_id=run_id,
                     params=1234, source="watch", tied={"head": ["embed"], "embed": ["head"]})


def _full_step(step: int, run_id: int = 1) -> StepRecord:
    """A record with every field set, awkward values included."""
    rng = np.random.default_rng(step)
    layers = {m: rng.lognormal(-3, 2, len(NAMES)) for m in LAYER_METRICS}
    layers["weight_grad_norm"][1] = np.inf
    layers["act_grad_norm"][0] = np.nan  # not measured (marked below)
    layers["update_ratio"][2] = np.nan  # a real NaN (not marked)
    layers["act_mean"][:] = -layers["act_mean"]
    layers["dead"][:] = np.nan
    unmeasured = {"act_grad_norm": np.array([True, False, False]), "dead": np.ones(3, dtype=bool)}
    hist = rng.integers(0, 500, (len(NAMES), HIST_BINS)).astype(float)
    window = StepWindow(steps=7, first_step=step - 6, loss_min=0.1234567891, loss_max=9.87654321e3,
                        loss_mean=1.5, loss_last=2.25, loss_max_step=step - 3, grad_norm_min=1e-9,
                        grad_norm_max=float("inf"), grad_norm_mean=3.3333333, grad_norm_last=0.5,
                        grad_norm_max_step=step - 1)
    verdict = Verdict("vanishing", "warning", "‖∂L/∂h‖ falls 4,370× — «quoted»", "why\nbecause",
                      {"ratio": 2.3456789e-4, "layers": ["embed", "lstm"], "values": [1.23456, float("nan")],
                       "n": 3, "flag": True}, ["relu-he", "sigmoid-batchnorm"])
    return StepRecord(step=step, loss=2.302585093, accuracy=0.1234567, grad_norm_total=12.3456789,
                      grad_norm_clipped=1.0, clipped=True, layers=layers, hist=hist,
                      nonfinite=("lstm", "backward"), phase="pretrain:embed", run_id=run_id, time=3601.23456,
                      steps_per_sec=33.333333, sample_every=4, probe_overhead=0.0456789,
                      verdicts=[verdict], detail=True, unmeasured=unmeasured,
                      time_act_grad_norm={"lstm": rng.lognormal(-2, 1, 17)}, window=window,
                      heldout_loss=2.5123456789, heldout_accuracy=0.875)


def _core_step(step: int, run_id: int = 1) -> StepRecord:
    """A sampled step without the detail tier: most columns not measured, no histogram."""
    layers = {m: np.full(len(NAMES), np.nan) for m in LAYER_METRICS}
    layers["weight_grad_norm"] = np.array([0.5, 0.25, 0.125])
    unmeasured = {m: np.ones(len(NAMES), dtype=bool) for m in LAYER_METRICS if m != "weight_grad_norm"}
    return StepRecord(step=step, loss=1.0, accuracy=float("nan"), grad_norm_total=0.6, grad_norm_clipped=0.6,
                      clipped=False, layers=layers, hist=None, run_id=run_id, detail=False, unmeasured=unmeasured)


def _stream() -> list:
    return [RunEvent("started", "t on cuda:0", 0, 1), _header(), _full_step(10), _core_step(11),
            RunError("boom", "Traceback ...", 11, 1), _full_step(12), RunEvent("finished", "3 steps", 13, 1)]


def _same(a, b, exact: bool) -> None:
    """``b`` read back equals ``a`` written: exactly, or to the significant digits version 2 keeps."""
    def close(x, y, digits):
        if x is None or y is None:  # a window field nothing was counted for (no grad norm kept)
            return x is None and y is None
        x, y = float(x), float(y)
        if not (math.isfinite(x) and math.isfinite(y)):
            return (math.isnan(x) and math.isnan(y)) or x == y
        return x == y if exact else abs(x - y) <= abs(x) * 0.5 * 10.0 ** (1 - digits)

    assert type(a) is type(b)
    if not isinstance(a, StepRecord):
        if isinstance(a, RunHeader):
            assert (a.preset, a.layers, a.layer_kinds, a.device, a.run_id, a.params, a.source, a.tied) == \
                   (b.preset, b.layers, b.layer_kinds, b.device, b.run_id, b.params, b.source, b.tied)
            np.testing.assert_array_equal(a.hist_edges, b.hist_edges)
        else:
            assert a == b
        return
    for name in ("step", "clipped", "nonfinite", "phase", "run_id", "sample_every", "detail"):
        assert getattr(a, name) == getattr(b, name), name
    for name, digits in (("loss", LOSS_DIGITS), ("accuracy", LOSS_DIGITS), ("heldout_loss", LOSS_DIGITS),
                         ("heldout_accuracy", LOSS_DIGITS), ("grad_norm_total", NORM_DIGITS),
                         ("grad_norm_clipped", NORM_DIGITS), ("steps_per_sec", LAYER_DIGITS),
                         ("probe_overhead", 3), ("time", 7)):
        assert close(getattr(a, name), getattr(b, name), digits), name
    for metric in LAYER_METRICS:
        assert all(close(x, y, LAYER_DIGITS) for x, y in zip(a.layers[metric], b.layers[metric])), metric
        np.testing.assert_array_equal(a.measured(metric), b.measured(metric))
    if a.hist is None:
        assert b.hist is None
    else:
        np.testing.assert_array_equal(a.hist, b.hist)
    assert a.time_act_grad_norm.keys() == b.time_act_grad_norm.keys()
    for name, values in a.time_act_grad_norm.items():
        assert all(close(x, y, LAYER_DIGITS) for x, y in zip(values, b.time_act_grad_norm[name]))
    if a.window is None:
        assert b.window is None
    else:
        for f in dataclasses.fields(StepWindow):
            x, y = getattr(a.window, f.name), getattr(b.window, f.name)
            assert type(x) is type(y)
            assert x is None or close(x, y, LOSS_DIGITS if f.name.startswith("loss") else NORM_DIGITS)  # None: not measured
    assert len(a.verdicts) == len(b.verdicts)
    for u, v in zip(a.verdicts, b.verdicts):
        assert (u.kind, u.severity, u.summary, u.explanation, u.suggestions) == \
               (v.kind, v.severity, v.summary, v.explanation, v.suggestions)
        assert u.evidence.keys() == v.evidence.keys()
        for key, x in u.evidence.items():
            y = v.evidence[key]
            if isinstance(x, float):
                assert close(x, y, LAYER_DIGITS), key
            elif isinstance(x, list):
                assert len(x) == len(y) and all(close(p, q, LAYER_DIGITS) if isinstance(p, float) else p == q
                                                for p, q in zip(x, y)), key
            else:
                assert x == y and type(x) is type(y), key


@pytest.mark.parametrize("name,version", [("run.jsonl", 2), ("run.jsonl", 1), ("run.jsonl.gz", 2)])
def test_every_field_round_trips(tmp_path, name, version):
    path = tmp_path / name
    with JsonlWriter(path, version=version) as writer:
        writer.write_all(_stream())
    result = read_recording(path)
    assert result.problems == []
    assert len(result.records) == len(_stream())
    for a, b in zip(_stream(), result.records):
        _same(a, b, exact=version == 1)
    index = RecordingIndex(path)  # the indexed reader agrees with the streaming one
    assert index.problems == [] and len(index) == len(result.records)
    for a, b in zip(result.records, index.records(range(len(index)))):
        _same(a, b, exact=True)
    if version == 2:
        raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
        core = json.loads(raw.decode().splitlines()[3])
        assert core["columns"]["act_mean"] is None  # a column no layer measured is one null
        assert core["columns"]["weight_grad_norm"] == [0.5, 0.25, 0.125] and "hist" not in core


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.jsonl")))
def test_todays_recordings_still_open(name):
    """The recordings the TUI tests replay (version 1 when the compact format came; regenerating
    them writes version 2), and a frozen copy of one in version 1 (v1-*), read both ways."""
    path = DATA / name
    if name.startswith("v1-"):
        assert json.loads(path.read_text().splitlines()[0])["version"] == 1
    result = read_recording(path)
    assert result.problems == [] and any(isinstance(r, StepRecord) for r in result.records)
    index = RecordingIndex(path)
    assert index.problems == [] and len(index) == len(result.records)
    for a, b in zip(result.records, index.records(range(len(index)))):
        _same(a, b, exact=True)


def test_a_version_1_line_of_the_old_writer_with_the_newest_fields(tmp_path):
    """null (not measured), window, held-out numbers, ‖∂L/∂h_t‖ and tied layers as version 1
    spelled them (the dict-per-layer layout, full precision)."""
    header = {"type": "header", "version": 1, "preset": {"name": "t"}, "layers": ["a", "b"],
              "layer_kinds": ["tanh", "linear"], "device": "cpu", "run_id": 0, "params": 7,
              "hist_edges": [0.0, 1.0], "source": "vgtui", "tied": {"b": ["a"]}}
    layer = {m: 0.5 for m in LAYER_METRICS}
    step = {"type": "step", "step": 3, "run_id": 0, "phase": "train", "time": 1.5, "steps_per_sec": "nan",
            "sample_every": 1, "probe_overhead": "nan", "loss": 0.123456789012, "accuracy": "nan",
            "grad_norm_total": 1.0, "grad_norm_clipped": 1.0, "clipped": False, "detail": True,
            "nonfinite": None,
            "layers": {"a": layer | {"act_grad_norm": None, "hist": [3.0], "time_act_grad_norm": [1.0, 2.0]},
                       "b": layer | {"update_ratio": "inf", "hist": [4.0]}},
            "verdicts": [],
            "window": {"steps": 2, "first_step": 2, "loss_min": 0.1, "loss_max": 0.2, "loss_mean": 0.15,
                       "loss_last": 0.2, "loss_max_step": 3, "grad_norm_min": 1.0, "grad_norm_max": 2.0,
                       "grad_norm_mean": 1.5, "grad_norm_last": 2.0, "grad_norm_max_step": 2},
            "heldout_loss": 0.25, "heldout_accuracy": "nan"}
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(header) + "\n" + json.dumps(step, separators=(",", ":")) + "\n")
    for reader in (lambda: read_recording(path).records, lambda: list(RecordingIndex(path))):
        head, rec = reader()
        assert head.tied == {"b": ["a"]}
        assert rec.loss == 0.123456789012 and rec.measured("act_grad_norm").tolist() == [False, True]
        assert rec.layers["update_ratio"][1] == math.inf and rec.hist.tolist() == [[3.0], [4.0]]
        assert rec.time_act_grad_norm["a"].tolist() == [1.0, 2.0] and rec.window.loss_max_step == 3
        assert rec.heldout_loss == 0.25 and math.isnan(rec.heldout_accuracy)


# -- a writer that fails or is killed ---------------------------------------------------------------
class _DiskFills:
    """A file whose disk fills after ``room`` bytes: the write that crosses it writes what fits
    and then fails, like write(2) on a full disk."""

    def __init__(self, raw, room: int):
        self.raw, self.room = raw, room

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        fits = bytes(data[: self.room])
        self.room -= len(fits)
        return self.raw.write(fits)

    def __getattr__(self, name):
        return getattr(self.raw, name)


@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_a_full_disk_leaves_complete_lines_and_raises_an_oserror(tmp_path, name):
    path = tmp_path / name
    writer = JsonlWriter(path)
    writer.write(_header())
    writer.write(_full_step(1))
    writer.flush()
    good = path.stat().st_size
    writer._file = _DiskFills(writer._file, room=100)
    with pytest.raises(OSError) as caught:
        writer.write(_full_step(2))
        writer.write(RunEvent("finished", "", 3, 1))  # gzip: the flush that meets the full disk
    assert isinstance(caught.value, RecordingError) and caught.value.errno == errno.ENOSPC
    assert str(path) in str(caught.value) and writer.failed and writer.error is caught.value
    assert path.stat().st_size == good  # the half-written line (member) is cut off again
    with pytest.raises(RecordingError):
        writer.write(_core_step(4))  # every later write says so too, and writes nothing
    writer.close()  # and closing does not raise it again
    result = read_recording(path)
    assert result.problems == [] and [type(r) for r in result.records] == [RunHeader, StepRecord]


def test_closing_never_raises_and_says_why_the_last_flush_failed(tmp_path):
    path = tmp_path / "run.jsonl.gz"
    writer = JsonlWriter(path)
    writer.write(_header())
    writer.write(_full_step(1))  # waits for the next member
    writer._file = _DiskFills(writer._file, room=0)
    writer.close()
    assert writer.failed and writer.error.errno == errno.ENOSPC
    assert [type(r) for r in read_recording(path).records] == [RunHeader]


def test_a_killed_gzip_writer_leaves_every_flushed_member_readable(tmp_path):
    path = tmp_path / "run.jsonl.gz"
    writer = JsonlWriter(path)
    writer.write(_header())  # not a step: flushed at once
    for step in range(5):
        writer.write(_full_step(step))  # steps wait for the next flush (a second, or 256 KB)
    writer.flush()
    writer.write(_core_step(5))  # still waiting when the process dies: lost
    data = path.read_bytes()  # what a SIGKILL leaves (the writer is never closed)
    assert len(gzip.decompress(data).splitlines()) == 6  # zcat reads every complete member
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[:-25])  # killed in the middle of writing the last member
    result = read_recording(cut)
    assert isinstance(result.records[0], RunHeader) and 1 <= len(result.records) <= 6
    assert any("ends early" in p for p in result.problems)
    writer.close()


def test_a_follower_reads_a_growing_gzip_recording(tmp_path):
    path = tmp_path / "run.jsonl.gz"
    with JsonlWriter(path) as writer:
        writer.write_all(_stream())
    data = path.read_bytes()
    live = tmp_path / "live.jsonl.gz"
    reader = JsonlReader(live)
    seen = []
    for end in range(0, len(data) + 1, 211):
        live.write_bytes(data[:end])
        seen += reader.read_new().records
    live.write_bytes(data)
    seen += reader.finish().records
    assert [type(r) for r in seen] == [type(r) for r in _stream()]


# -- the index --------------------------------------------------------------------------------------
def test_a_step_line_damaged_past_its_first_bytes_is_reported_when_read(tmp_path):
    path = tmp_path / "run.jsonl"
    with JsonlWriter(path) as writer:
        writer.write_all([_header()] + [_core_step(s) for s in range(5)])
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace('"loss":1.0', '"loss":[}')
    path.write_text("\n".join(lines) + "\n")
    index = RecordingIndex(path)
    assert len(index) == 6 and index.problems == []  # its first bytes look right
    assert index.record(3) is None and index.problems[0].startswith(f"{path}:4: skipped")
    assert [r.step for r in iter_records(path) if isinstance(r, StepRecord)] == [0, 1, 3, 4]


def test_the_index_reads_a_gzip_recording_at_random(tmp_path, monkeypatch):
    from vgtui import jsonl

    monkeypatch.setattr(jsonl._GzipBytes, "SPACING", 4096)  # many checkpoints on a small file
    monkeypatch.setattr(jsonl, "_GZIP_READ", 1024)
    monkeypatch.setattr(jsonl, "GZIP_FLUSH_BYTES", 10_000)  # and many members
    plain, packed = tmp_path / "run.jsonl", tmp_path / "run.jsonl.gz"
    stream = [_header()] + [_full_step(s) if s % 10 == 0 else _core_step(s) for s in range(200)]
    for path in (plain, packed):
        with JsonlWriter(path) as writer:
            writer.write_all(stream)
    a, b = RecordingIndex(plain), RecordingIndex(packed)
    assert len(b._bytes._points) > 3 and len(a) == len(b) == 201
    order = np.random.default_rng(0).permutation(len(a))
    for i in order[:60]:
        _same(a.record(int(i)), b.record(int(i)), exact=True)
    every_third = range(0, len(a), 3)  # many ranges in one forward walk, records skipped between
    for x, y in zip(a.records(every_third, cache=False), b.records(every_third, cache=False)):
        _same(x, y, exact=True)
    assert a.steps.tolist() == b.steps.tolist() and a.flags.tolist() == b.flags.tolist()
    os.remove(plain)


def test_vgtui_run_records_gzip_and_replay_export_read_it(tmp_path, capsys):
    from vgtui.cli import main
    from vgtui.export import read_csv
    from vgtui.tui.sources import ReplaySource

    path = tmp_path / "run.jsonl.gz"
    assert main(["run", "--preset", "shallow", "--steps", "12", "--budget", "0", "--record", str(path)]) == 0
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert [json.loads(line)["type"] for line in lines].count("header") == 1  # zcat reads it too
    steps = [r for r in read_recording(path).records if isinstance(r, StepRecord)]
    assert [r.step for r in steps] == list(range(12))
    source = ReplaySource(path)
    assert source.n_steps == 12 and source.at(11).step == 11 and source.problems == []
    assert main(["export", str(path), "--csv", str(tmp_path / "run.csv")]) == 0
    assert {s for s, _, _, _ in read_csv(tmp_path / "run.csv")} == set(range(12))
