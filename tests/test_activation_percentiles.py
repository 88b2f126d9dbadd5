"""Activation percentiles (act_p02 ... act_p98): measured on detail steps by the trainer's probe and
by vgtui.watch, checked against torch.quantile of the same evenly strided sample taken here."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vgtui
from vgtui.channel import Channel
from vgtui.config import load_preset
from vgtui.data import SyntheticData
from vgtui.jsonl import JsonlWriter, read_recording
from vgtui.models import build_model
from vgtui.probe import Probe
from vgtui.records import (ACT_PERCENTILE_METRICS, ACT_PERCENTILES, ACT_SAMPLE_ELEMENTS, HIST_BINS, LAYER_METRICS,
                           RunHeader, StepRecord)

Q = torch.tensor(ACT_PERCENTILES, dtype=torch.float64) / 100


def strided(h: torch.Tensor) -> torch.Tensor:
    flat = h.detach().reshape(-1).double()
    return flat[::max(1, math.ceil(flat.numel() / ACT_SAMPLE_ELEMENTS))]


def expected(samples: list[torch.Tensor]) -> np.ndarray:
    return torch.quantile(torch.cat(samples), Q).numpy()


def percentiles(record: StepRecord, i: int) -> np.ndarray:
    return np.array([record.layers[m][i] for m in ACT_PERCENTILE_METRICS])


def test_trainer_percentiles_match_torch_quantile_on_sigmoid_deep():
    """Wide enough (32 x 256 = 8192 entries) that the sample is strided, as on real layers."""
    preset = load_preset("sigmoid-deep").replace(depth=4, width=256, batch_size=32)
    built = build_model(preset)
    fresh = copy.deepcopy(built.model)
    probe = Probe(built.layers, list(built.model.parameters()), detail_every=2).attach()
    x, y = SyntheticData(0, preset.batch_size).batch(0)
    for step in range(2):  # a detail step, then one that is not
        probe.begin(True)
        loss = built.loss_fn(built.model(x), y)
        loss.backward()
        probe.after_backward()
        probe.clip("none")
        probe.finish(step, loss, None)
    detail, core = probe.poll(wait=True)
    assert detail.detail and not core.detail and probe.transfers == 2  # still one per measured step
    h = x
    with torch.no_grad():
        for i, block in enumerate(fresh.blocks):
            h = block(h)
            np.testing.assert_allclose(percentiles(detail, i), expected([strided(h)]), rtol=1e-5, atol=1e-7)
    assert detail.measured("act_p50").all()
    # sigmoid units: every percentile in (0, 1) and in order
    ps = np.stack([detail.layers[m] for m in ACT_PERCENTILE_METRICS])
    assert np.all(np.diff(ps, axis=0) >= 0) and np.all((ps[:, :-1] > 0) & (ps[:, :-1] < 1))
    for metric in ACT_PERCENTILE_METRICS:  # not a detail step: not measured, not a real NaN
        assert np.isnan(core.layers[metric]).all() and not core.measured(metric).any()


def test_watch_pools_the_micro_batches_of_a_step():
    """Gradient accumulation: the percentiles of the step are those of every micro-batch's
    strided sample, pooled."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 48), nn.Sigmoid(), nn.Linear(48, 2))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    channel = Channel(1000)
    watcher = vgtui.watch(model, channel=channel, optimizer=opt, detail_every=1, overhead_budget=None,
                          diagnose=False)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(40, 5, generator=g) * 2, torch.randn(40, 2, generator=g)) for _ in range(2)]
    for x, y in batches:
        (F.mse_loss(model(x), y) / 2).backward()
    watcher.step(opt, torch.tensor(0.0))
    opt.step()
    watcher.close()
    (record,) = [r for r in channel.drain() if isinstance(r, StepRecord)]
    samples: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        for x, _ in batches:
            a = torch.tanh(ref[0](x))
            b = torch.sigmoid(ref[2](a))
            for k, h in enumerate((a, b, ref[4](b))):
                samples[k].append(strided(h))
    assert samples[0][0].numel() < 40 * 64  # strided
    for i in range(3):
        np.testing.assert_allclose(percentiles(record, i), expected(samples[i]), rtol=1e-5, atol=1e-7)


def test_watch_resnet18_percentiles_of_what_each_layer_outputs():
    """Real model: ReLU(inplace=True) after bn1, ``out += identity`` after bn2, both rewriting
    the tensor the layer returned; the sample is the layer's activation as it was."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    channel = Channel(1000)
    watcher = vgtui.watch(model, channel=channel, optimizer=opt, detail_every=1, overhead_budget=None,
                          diagnose=False)
    F.cross_entropy(model(x), y).backward()
    watcher.step(opt, torch.tensor(0.0))
    watcher.close()
    records = channel.drain()
    header = next(r for r in records if isinstance(r, RunHeader))
    (record,) = [r for r in records if isinstance(r, StepRecord)]
    outs = {}

    def keep(name):
        def hook(module, inputs, output):
            outs.setdefault(name, output.detach().clone())  # as it was, before any in-place op
        return hook

    hooks = [ref.get_submodule(n).register_forward_hook(keep(n)) for n in header.layers]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    for i, (name, kind) in enumerate(zip(header.layers, header.layer_kinds)):
        h = F.relu(outs[name]) if kind == "relu" else outs[name]
        np.testing.assert_allclose(percentiles(record, i), expected([strided(h)]), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    assert record.layers["act_p02"][header.layers.index("bn1")] == 0.0  # after its ReLU


def _record(layers: dict, unmeasured: dict, detail: bool = True) -> StepRecord:
    return StepRecord(step=0, loss=1.0, accuracy=float("nan"), grad_norm_total=1.0, grad_norm_clipped=1.0,
                      clipped=False, layers=layers, hist=None, detail=detail, unmeasured=unmeasured)


@pytest.mark.parametrize("version", [1, 2])
def test_percentiles_round_trip_and_an_unmeasured_step_writes_none(tmp_path, version):
    header = RunHeader(preset={}, layers=["a", "b"], layer_kinds=["sigmoid", "relu"], device="cpu")
    layers = {m: np.array([0.25, 1.5]) for m in LAYER_METRICS}
    layers["act_p98"] = np.array([0.9912, np.nan])  # a real NaN stays one
    off = {m: np.ones(2, dtype=bool) for m in ACT_PERCENTILE_METRICS}
    quiet = {m: np.full(2, np.nan) for m in LAYER_METRICS}
    path = tmp_path / "run.jsonl"
    with JsonlWriter(path, version=version) as writer:
        writer.write_all([header, _record(layers, {}), _record(quiet, off, detail=False)])
    lines = path.read_text().splitlines()
    if version == 2:
        assert "act_p50" in json.loads(lines[1])["columns"] and "act_p50" not in lines[2]
    result = read_recording(path)
    assert result.problems == []
    _, measured, skipped = result.records
    assert measured.layers["act_p16"].tolist() == [0.25, 1.5] and measured.measured("act_p98").all()
    assert measured.layers["act_p98"][0] == 0.9912 and np.isnan(measured.layers["act_p98"][1])
    for metric in ACT_PERCENTILE_METRICS:
        assert np.isnan(skipped.layers[metric]).all() and not skipped.measured(metric).any()


def test_a_recording_from_before_the_percentiles_reads_them_as_not_measured(tmp_path):
    header = RunHeader(preset={}, layers=["a", "b"], layer_kinds=["tanh", "linear"], device="cpu")
    layers = {m: np.array([0.5, 2.0]) for m in LAYER_METRICS}
    path = tmp_path / "old.jsonl"
    with JsonlWriter(path) as writer:
        writer.write_all([header, _record(layers, {})])
    lines = path.read_text().splitlines()
    step = json.loads(lines[1])
    for metric in ACT_PERCENTILE_METRICS:  # as written before the metrics existed
        del step["columns"][metric]
    path.write_text(lines[0] + "\n" + json.dumps(step) + "\n")
    result = read_recording(path)
    assert result.problems == []
    _, record = result.records
    assert record.layers["act_mean"].tolist() == [0.5, 2.0] and record.measured("act_mean").all()
    for metric in ACT_PERCENTILE_METRICS:
        assert np.isnan(record.layers[metric]).all() and not record.measured(metric).any()


# -- the activations view -----------------------------------------------------------------------
def _state(kind: str, steps: int, p: list[float], lo_span: float = 0.0):
    from vgtui.tui.state import RunState

    header = RunHeader(preset={"name": "t"}, layers=["a"], layer_kinds=[kind], device="cpu")
    records = []
    for step in range(steps):
        layers = {m: np.array([0.1]) for m in LAYER_METRICS}
        for metric, value in zip(ACT_PERCENTILE_METRICS, p):
            layers[metric] = np.array([value])
        unmeasured = {m: np.isnan(layers[m]) for m in ACT_PERCENTILE_METRICS if np.isnan(layers[m]).any()}
        records.append(dataclasses.replace(_record(layers, unmeasured), step=step, hist=np.zeros((1, HIST_BINS))))
    state = RunState()
    state.feed([header] + records)
    return state


def test_the_view_draws_the_band_median_on_top_on_the_sigmoid_range():
    """A sigmoid layer pinned near 1 (Glorot & Bengio's saturated top layer, mirrored): on the
    0..1 axis with 4 lines, the median in the top line, p16-p84 under it, p2-p98 lowest."""
    from vgtui.tui import render as R

    state = _state("sigmoid", 8, [0.30, 0.62, 0.97, 0.99, 1.0])
    lines = R.activations(state, 120, 0, True, height=6).plain.splitlines()
    chart = [line[54:] for line in lines[1:5]]  # past the numbers and the axis
    assert lines[1].split()[0] == "a" and "1" in lines[1][46:54] and "0" in lines[4][46:54]
    assert "▔" in chart[0] or "━" in chart[0]  # the median 0.97 in the top quarter
    assert "▓" in chart[1] and "░" in chart[2] and "░" not in chart[3] and "▓" not in chart[3]


def test_one_line_per_layer_shows_the_newest_distribution_across_its_range():
    from vgtui.tui import render as R

    state = _state("tanh", 3, [-0.9, -0.5, 0.0, 0.5, 0.9])
    line = R.activations(state, 120, 0, True, height=3).plain.splitlines()[1]
    band = line[line.index("░"): line.rindex("░") + 1]
    assert band.count("┃") == 1 and band.index("┃") in range(len(band) // 2 - 2, len(band) // 2 + 3)
    assert band.strip("░").strip("▓┃") == "" and "▓" in band


def test_a_recording_without_percentiles_still_draws_the_mean():
    from vgtui.tui import render as R

    state = _state("sigmoid", 3, [np.nan] * 5)  # as read from a recording older than the metrics
    text = R.activations(state, 120, 0, True, height=10).plain
    assert "mean over time" in text and "distribution" not in text


def test_csv_export_has_the_percentiles_and_an_old_recording_gains_none(tmp_path):
    from vgtui.export import export_csv

    header = RunHeader(preset={}, layers=["a"], layer_kinds=["tanh"], device="cpu")
    layers = {m: np.array([0.5]) for m in LAYER_METRICS}
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    with JsonlWriter(new) as writer:
        writer.write_all([header, _record(layers, {})])
    step = json.loads(new.read_text().splitlines()[1])
    for metric in ACT_PERCENTILE_METRICS:
        del step["columns"][metric]
    old.write_text(new.read_text().splitlines()[0] + "\n" + json.dumps(step) + "\n")
    export_csv(new, tmp_path / "new.csv")
    export_csv(old, tmp_path / "old.csv")
    assert "0,a,act_p50,0.5" in (tmp_path / "new.csv").read_text()
    assert "act_p" not in (tmp_path / "old.csv").read_text()
