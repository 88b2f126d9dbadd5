"""Held-out evaluation in the trainer: the numbers against an evaluation written here, the split
apart from training, and a training run that goes exactly as it would without it."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from vgtui.config import load_preset
from vgtui.data import SyntheticData, make_data
from vgtui.models import build_model, make_optimizer
from vgtui.records import StepRecord
from vgtui.trainer import HeldOut, run_to_completion

TINY = {"depth": 2, "width": 32, "batch_size": 16}


def tiny(name="relu-he", **changes):
    return load_preset(name).replace(**{**TINY, **changes})


def steps_of(records):
    return [r for r in records if isinstance(r, StepRecord)]


def independent_heldout(model: nn.Module, preset, n_batches: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the held-out draws, all examples at once."""
    source = SyntheticData(preset.seed, preset.batch_size, split="heldout")
    xs, ys = zip(*(source.batch(i) for i in range(n_batches)))
    x, y = torch.cat(xs), torch.cat(ys)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return (nn.functional.cross_entropy(logits, y).item(),
            (logits.argmax(1) == y).double().mean().item())


def test_heldout_numbers_equal_an_independent_evaluation():
    preset = tiny(eval_every=5, eval_batches=3)
    records = steps_of(run_to_completion(preset, 11))
    # A bare loop with the same recipe (no vgtui probe): the held-out numbers at each eval step.
    built = build_model(preset)
    model = built.model
    optimizer = make_optimizer(model.parameters(), preset)
    train = SyntheticData(preset.seed, preset.batch_size)
    expected = {}
    for step in range(11):
        if step % 5 == 0:
            expected[step] = independent_heldout(model, preset, 3)
        x, y = train.batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    by_step = {r.step: r for r in records}
    for step, (loss, acc) in expected.items():
        assert by_step[step].heldout_loss == pytest.approx(loss, rel=1e-5)
        assert by_step[step].heldout_accuracy == pytest.approx(acc, abs=1e-6)  # float32
    others = [r for r in records if r.step not in expected]
    assert others and all(math.isnan(r.heldout_loss) and math.isnan(r.heldout_accuracy) for r in others)


def test_heldout_is_not_training_data_and_differs_from_the_training_loss():
    preset = tiny(eval_every=1, eval_batches=2)
    held = [make_data("synthetic", preset.seed, preset.batch_size, "cpu", split="heldout").batch(i) for i in range(2)]
    train = SyntheticData(preset.seed, preset.batch_size)
    for i in range(50):
        x, _ = train.batch(i)
        assert all(not torch.equal(x, hx) for hx, _ in held)
    records = steps_of(run_to_completion(preset, 3))
    assert all(r.heldout_loss != r.loss for r in records)  # same weights, other examples


def test_an_evaluation_at_an_unsampled_step_rides_on_the_next_record():
    records = steps_of(run_to_completion(tiny(eval_every=5, sample_every=3), 13))
    carried = {r.step: r.heldout_loss for r in records if not math.isnan(r.heldout_loss)}
    assert sorted(carried) == [0, 6, 12]  # evaluated at 0, 5, 10: the next record each time


@pytest.mark.parametrize("name", ["sigmoid-batchnorm", "relu-he"])
def test_evaluation_leaves_the_training_run_unchanged(name):
    """Eval on every step vs never, same seed: the same losses, norms and final weights (batch
    norm's running statistics included: eval mode does not update them)."""
    preset = tiny(name)
    on = run_to_completion(preset.replace(eval_every=1), 8)
    off = run_to_completion(preset.replace(eval_every=0), 8)
    on_steps, off_steps = steps_of(on), steps_of(off)
    assert [r.loss for r in on_steps] == [r.loss for r in off_steps]
    assert [r.grad_norm_total for r in on_steps] == [r.grad_norm_total for r in off_steps]
    for a, b in zip(on_steps, off_steps):
        np.testing.assert_array_equal(a.layers["act_grad_norm"], b.layers["act_grad_norm"])
    assert all(math.isnan(r.heldout_loss) for r in off_steps)
    assert all(math.isfinite(r.heldout_loss) for r in on_steps)


def test_evaluate_restores_the_mode_draws_no_random_numbers_and_builds_no_graph():
    preset = tiny("sigmoid-batchnorm")
    built = build_model(preset)
    model = built.model
    batches = [SyntheticData(0, 16, split="heldout").batch(i) for i in range(2)]
    running = {k: v.clone() for k, v in model.state_dict().items()}
    evaluator = HeldOut(batches, built.loss_fn, autoencoder=False, every=1)
    rng = torch.get_rng_state()
    model.train()
    evaluator.evaluate(model)
    assert model.training
    model.eval()
    evaluator.evaluate(model)
    assert not model.training
    assert torch.equal(rng, torch.get_rng_state())
    for key, value in model.state_dict().items():
        assert torch.equal(value, running[key]), key
    assert all(p.grad is None for p in model.parameters())
    taken = evaluator.take()
    assert set(taken) == {"heldout_loss", "heldout_accuracy"} and evaluator.take() == {}


def test_autoencoder_heldout_is_a_reconstruction_loss_without_accuracy():
    preset = load_preset("autoencoder-relu").replace(width=32, code_width=8, depth=2, batch_size=16,
                                                     eval_every=2)
    records = steps_of(run_to_completion(preset, 3))
    assert math.isfinite(records[0].heldout_loss) and records[0].heldout_loss > 0
    assert all(math.isnan(r.heldout_accuracy) for r in records)


def test_sequence_preset_evaluates_its_held_out_sequences():
    preset = load_preset("lstm").replace(width=16, seq_len=12, batch_size=8, eval_every=2, eval_batches=2)
    records = steps_of(run_to_completion(preset, 3))
    carried = [r for r in records if not math.isnan(r.heldout_loss)]
    assert [r.step for r in carried] == [0, 2]
    assert all(0.0 <= r.heldout_accuracy <= 1.0 for r in carried)


def test_csv_export_has_held_out_rows_at_the_evaluated_steps_in_the_same_columns(tmp_path):
    from vgtui.export import CSV_COLUMNS, export_csv, read_csv
    from vgtui.headless import run_headless
    from vgtui.jsonl import read_recording

    path, csv_path = tmp_path / "run.jsonl", tmp_path / "run.csv"
    preset = tiny(eval_every=4)
    assert run_headless(preset, 10, record=path, out=io.StringIO()) == 0
    records = [r for r in read_recording(path).records if isinstance(r, StepRecord)]
    export_csv(path, csv_path)
    assert open(csv_path).readline().strip() == ",".join(CSV_COLUMNS)
    rows = read_csv(csv_path)  # the reader of the old exports reads it unchanged
    held = {(step, metric): value for step, layer, metric, value in rows if metric.startswith("heldout")}
    expected = {(r.step, m): getattr(r, m) for r in records if not math.isnan(r.heldout_loss)
                for m in ("heldout_loss", "heldout_accuracy")}
    assert sorted({step for step, _ in expected}) == [0, 4, 8]
    assert held == pytest.approx(expected)


def test_a_failing_evaluation_is_reported_once_and_training_goes_on(monkeypatch):
    from vgtui.records import RunEvent

    def broken(self, model):
        raise RuntimeError("odd module output")

    monkeypatch.setattr(HeldOut, "evaluate", broken)
    records = run_to_completion(tiny(eval_every=2), 5)
    notices = [r for r in records if isinstance(r, RunEvent) and r.kind == "notice"]
    assert len(notices) == 1 and "odd module output" in notices[0].message
    assert [r.step for r in steps_of(records)] == [0, 1, 2, 3, 4]


def test_a_missing_test_set_trains_without_held_out(tmp_path):
    """Fashion-MNIST training files without the t10k ones: one notice, no held-out numbers."""
    import gzip
    import struct

    from vgtui.records import RunEvent

    images = np.random.default_rng(0).integers(0, 255, (64, 28, 28), dtype=np.uint8)
    labels = np.arange(64, dtype=np.uint8) % 10
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4B3I", 0, 0, 8, 3, 64, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4BI", 0, 0, 8, 1, 64) + labels.tobytes())
    records = run_to_completion(tiny(data="fashion-mnist"), 3, data_root=tmp_path)
    notices = [r.message for r in records if isinstance(r, RunEvent) and r.kind == "notice"]
    assert len(notices) == 1 and "no held-out evaluation" in notices[0] and "t10k" in notices[0]
    steps = steps_of(records)
    assert len(steps) == 3 and all(math.isnan(r.heldout_loss) for r in steps)
    from vgtui.headless import run_headless

    out, err = io.StringIO(), io.StringIO()
    assert run_headless(tiny(data="fashion-mnist"), 2, data_root=tmp_path, out=out, err=err) == 0
    assert err.getvalue().count("\n") == 1 and "vgtui: no held-out evaluation" in err.getvalue()
