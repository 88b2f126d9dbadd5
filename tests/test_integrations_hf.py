"""VgtuiCallback under the Hugging Face Trainer (tiny GPT-2, no downloads), checked against autograd.

The Trainer clips before any callback hook; the callback must still record per-layer norms
before clipping. The test keeps its own copy of every micro-batch (a forward pre-hook) and of the
weights at each step's start (its own TrainerCallback), then recomputes each step's loss (mean
next-token cross-entropy over the step's tokens), gradients and clip with torch.autograd.grad.
"""

from __future__ import annotations

import copy
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vgtui.channel import Channel
from vgtui.jsonl import iter_steps, read_recording
from vgtui.records import RunHeader, StepRecord

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from vgtui.integrations.hf import VgtuiCallback

STEPS, ACCUM, BATCH, CLIP, VOCAB, LENGTH = 4, 2, 4, 1.0, 64, 16


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(11)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)  # random init, lm_head tied to wte


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, VOCAB, (STEPS * ACCUM * BATCH, LENGTH), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        # GPT-2 shifts the labels itself: position 0 is never predicted. Marking it -100 makes the
        # Trainer's token count (labels != -100, shifted or not depending on the version and on
        # the model's loss_type) the count of predicted tokens, so the Trainer's loss is the mean
        # next-token cross-entropy of the step.
        labels = self.ids[i].clone()
        labels[0] = -100
        return {"input_ids": self.ids[i], "labels": labels}


class Snapshots(TrainerCallback):
    """The test's own record of the weights at the start of every optimiser step."""

    def __init__(self):
        self.states: list[dict] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states.append(copy.deepcopy(model.state_dict()))


def train(tmp_path, trainer_class=Trainer, **arg_options):
    model = make_model()
    batches: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["input_ids"].clone()) if m.training else None, with_kwargs=True)
    channel, snapshots = Channel(maxlen=10_000), Snapshots()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_grad_norm=CLIP, max_steps=STEPS, learning_rate=2e-2, lr_scheduler_type="constant",
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=4, **arg_options)
    trainer = trainer_class(model=model, args=args, train_dataset=Tokens(),
                            callbacks=[snapshots, VgtuiCallback(channel=channel)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    records = channel.drain()
    header = next(r for r in records if isinstance(r, RunHeader))
    steps = [r for r in records if isinstance(r, StepRecord)]
    trainer.vgtui_warnings = [str(w.message) for w in caught if str(w.message).startswith("vgtui")]
    return trainer, header, steps, batches, snapshots.states


def reference(batches, state, layers):
    """Loss, per-layer ‖∂L/∂W‖ (layer order of the header), global norm before and after clip."""
    model = make_model()
    model.load_state_dict(state)
    ids = torch.cat(batches)
    logits = model(input_ids=ids).logits
    # Mean next-token cross-entropy over every predicted token of the step's micro-batches.
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    params = list(model.parameters())  # tied weights once, as the Trainer clips them
    grads = dict(zip(params, torch.autograd.grad(loss, params)))
    per_layer = layer_norms(model, layers, grads)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
    return loss.item(), per_layer, total, total * min(1.0, CLIP / (total + 1e-6))


def layer_norms(model, layers, grads) -> list[float]:
    """‖∂L/∂W‖ per layer as vgtui promises it: every parameter the layer's module owns (weights and
    biases) as one vector; a tensor tied to an earlier layer (GPT-2's lm_head = wte) counted there
    only, so a layer left with none is not measured (NaN)."""
    claimed: set[int] = set()
    norms = []
    for name in layers:
        module = model.get_submodule(name)
        mine = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in claimed]
        claimed.update(id(p) for p in mine)
        norms.append(torch.linalg.vector_norm(torch.stack([grads[p].norm() for p in mine])).item()
                     if mine else float("nan"))
    return norms


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("hf"))


def test_hf_records_pre_clip_norms_post_clip_norm_and_loss(hf_run):
    trainer, header, steps, batches, states = hf_run
    assert [r.step for r in steps] == list(range(STEPS))
    assert len(batches) == STEPS * ACCUM and len(states) == STEPS
    clipped = []
    for record in steps:
        micro = batches[record.step * ACCUM:(record.step + 1) * ACCUM]
        loss, per_layer, total, after = reference(micro, states[record.step], header.layers)
        assert np.isfinite(record.loss) and record.loss == pytest.approx(loss, rel=1e-5)
        np.testing.assert_allclose(record.layers["weight_grad_norm"], per_layer, rtol=1e-4)
        assert record.grad_norm_total == pytest.approx(total, rel=1e-5)
        assert record.grad_norm_clipped == pytest.approx(after, rel=1e-5)
        assert record.clipped == (total > CLIP)
        clipped.append(record.clipped)
    assert any(clipped) and not all(clipped)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose([r.loss for r in steps], logged, rtol=1e-6)  # the Trainer's own log


def test_hf_header_and_restored_trainer(hf_run):
    trainer, header, _, _, _ = hf_run
    preset = header.preset
    assert preset["integration"] == "transformers" and preset["name"] == "GPT2LMHeadModel"
    assert preset["grad_norm_measured"] == "before_clip"
    assert preset["clip"] == "norm" and preset["clip_threshold"] == CLIP
    assert preset["gradient_accumulation_steps"] == ACCUM and preset["precision"] == "fp32"
    assert trainer.vgtui_warnings == []
    for name in ("training_step",):
        assert name not in trainer.__dict__
    for name in ("clip_grad_norm_", "unscale_gradients"):
        assert name not in trainer.accelerator.__dict__


class ClipsByItself(Trainer):
    """A Trainer that clips without accelerator.clip_grad_norm_ (as SageMaker MP does)."""

    def _clip_grad_norm(self, model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)


def test_hf_gradients_read_after_clipping_are_labelled_so(tmp_path):
    trainer, header, steps, batches, states = train(tmp_path, ClipsByItself)
    assert len(trainer.vgtui_warnings) == 1 and "read after clipping" in trainer.vgtui_warnings[0]
    assert header.preset["grad_norm_measured"] == "after_clip"
    for record in steps:
        micro = batches[record.step * ACCUM:(record.step + 1) * ACCUM]
        _, _, _, after = reference(micro, states[record.step], header.layers)
        assert record.grad_norm_total == pytest.approx(after, rel=1e-5)  # what it says: after


def test_hf_bf16_loss_and_norms(tmp_path):
    trainer, header, steps, batches, states = train(tmp_path, bf16=True)
    assert header.preset["precision"] == "bf16"
    for record in steps[:2]:
        micro = batches[record.step * ACCUM:(record.step + 1) * ACCUM]
        loss, per_layer, total, _ = reference(micro, states[record.step], header.layers)
        assert record.loss == pytest.approx(loss, rel=2e-2)
        np.testing.assert_allclose(record.layers["weight_grad_norm"], per_layer, rtol=5e-2)
        assert record.grad_norm_total == pytest.approx(total, rel=5e-2)


def test_example_hf_trainer_runs(tmp_path, monkeypatch):
    """examples/hf_trainer.py, shortened: it trains and writes a recording with finite losses."""
    path = tmp_path / "run.jsonl"
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py", "--steps", "6", "--record", str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(Path(__file__).parents[1] / "examples" / "hf_trainer.py"), run_name="__main__")
    steps = list(iter_steps(read_recording(path).records))
    assert [s.step for s in steps] == [0, 5] and all(np.isfinite(s.loss) for s in steps)


def test_hf_watch_binds_the_trainer_explicitly(tmp_path):
    from vgtui.integrations.hf import watch

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=make_model(), args=args, train_dataset=Tokens())
    channel = Channel(maxlen=1000)
    callback = watch(trainer, channel=channel)
    assert callback.trainer is trainer and callback in trainer.callback_handler.callbacks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    steps = [r for r in channel.drain() if isinstance(r, StepRecord)]
    assert [r.step for r in steps] == [0, 1] and all(np.isfinite(r.loss) for r in steps)
