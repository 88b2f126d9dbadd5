"""VgtuiCallback under Lightning's own Trainer (clipping, accumulation), checked against autograd.

The module keeps its own copy of every micro-batch it trains on and of its weights at the start
of every optimiser step; the test then recomputes each step's loss, gradients, clip and accuracy
with ``torch.autograd.grad`` on a fresh copy of the network, without vgtui or Lightning.
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
from torch import nn

from vgtui.channel import Channel
from vgtui.jsonl import iter_steps, read_recording
from vgtui.records import RunHeader, StepRecord

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lightning.pytorch as L
    import pytorch_lightning as PL

from vgtui.integrations.lightning import VgtuiCallback
from vgtui.integrations.pytorch_lightning import VgtuiCallback as PLVgtuiCallback

STEPS, ACCUM, CLIP, BATCH = 30, 2, 1.0, 4
LAYERS = ["net.0", "net.2", "net.4"]


def make_net() -> nn.Sequential:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        net[4].weight.mul_(3.0)  # confident, often wrong: global norms on both sides of the clip
    return net


def module_class(namespace):
    class Classifier(namespace.LightningModule):
        """Logs its accuracy; remembers its batches and its weights at each step's start."""

        def __init__(self):
            super().__init__()
            self.net = make_net()
            self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
            self.snapshots: list[dict] = []

        def on_train_batch_start(self, batch, batch_idx):
            if batch_idx % ACCUM == 0:
                self.snapshots.append(copy.deepcopy(self.net.state_dict()))

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.batches.append((x.clone(), y.clone()))
            out = self.net(x)
            self.log("train_acc", (out.argmax(1) == y).float().mean())
            return F.cross_entropy(out, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    return Classifier


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(5)
    n = STEPS * ACCUM * BATCH // 2  # two epochs: the window restarts at an epoch boundary
    x = torch.randn(n, 6, generator=g) * torch.linspace(0.5, 8.0, n).unsqueeze(1)  # some steps clip
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def fit(namespace, callback_class, steps: int, callback_options=None, **trainer_options):
    channel = Channel(maxlen=10_000)
    module = module_class(namespace)()
    trainer = namespace.Trainer(
        accelerator="cpu", max_steps=steps, gradient_clip_val=CLIP, accumulate_grad_batches=ACCUM,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback_class(channel=channel, **(callback_options or {}))], **trainer_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and logging
        trainer.fit(module, loader())
    records = channel.drain()
    header = next(r for r in records if isinstance(r, RunHeader))
    return module, header, [r for r in records if isinstance(r, StepRecord)]


def reference(module, step: int):
    """What one optimiser step should record, from plain autograd on a copy of the network."""
    net = make_net()
    net.load_state_dict(module.snapshots[step])
    micro = module.batches[step * ACCUM:(step + 1) * ACCUM]
    losses = [F.cross_entropy(net(x), y) for x, y in micro]
    loss = sum(losses) / len(losses)
    params = list(net.parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, params)))
    # ‖∂L/∂W‖ of a layer: every parameter it owns (weight and bias) as one vector
    per_layer = [torch.linalg.vector_norm(torch.stack([grads[p].norm() for p in
                                                        net.get_submodule(name.removeprefix("net.")).parameters()])).item()
                 for name in LAYERS]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
    after = total * min(1.0, CLIP / (total + 1e-6))  # torch.nn.utils.clip_grad_norm_
    with torch.no_grad():
        accuracy = np.mean([(net(x).argmax(1) == y).float().mean().item() for x, y in micro])
    return loss.item(), per_layer, total, after, accuracy


@pytest.fixture(scope="module")
def lightning_run():
    return fit(L, VgtuiCallback, STEPS)


def test_lightning_records_loss_norms_and_clip_of_every_step(lightning_run):
    module, header, steps = lightning_run
    assert [r.step for r in steps] == list(range(STEPS))
    assert len(module.snapshots) == STEPS and len(module.batches) == STEPS * ACCUM
    assert header.layers == LAYERS
    clipped = []
    for record in steps:
        loss, per_layer, total, after, accuracy = reference(module, record.step)
        assert record.loss == pytest.approx(loss, rel=1e-5)
        np.testing.assert_allclose(record.layers["weight_grad_norm"], per_layer, rtol=1e-5)
        assert record.grad_norm_total == pytest.approx(total, rel=1e-5)
        assert record.grad_norm_clipped == pytest.approx(after, rel=1e-5)
        assert record.clipped == (total > CLIP)
        assert record.accuracy == pytest.approx(accuracy)
        clipped.append(record.clipped)
    assert any(clipped) and not all(clipped)  # both sides of the threshold were exercised


def test_lightning_header_names_the_run(lightning_run):
    module, header, _ = lightning_run
    preset = header.preset
    assert preset["name"] == "Classifier" and preset["module"] == "Classifier"
    assert preset["integration"] == "lightning"
    assert preset["clip"] == "norm" and preset["clip_threshold"] == CLIP
    assert preset["accumulate_grad_batches"] == ACCUM
    assert preset["grad_norm_measured"] == "before_clip"
    assert "configure_gradient_clipping" not in module.__dict__  # the fit's wrapper is gone


def test_pytorch_lightning_namespace_records_the_same_numbers(lightning_run):
    _, _, expected = lightning_run
    module, header, steps = fit(PL, PLVgtuiCallback, 4)
    assert isinstance(PLVgtuiCallback(), PL.Callback) and header.layers == LAYERS
    for record, want in zip(steps, expected[:4], strict=True):
        assert record.loss == pytest.approx(want.loss, rel=1e-6)
        np.testing.assert_allclose(record.layers["weight_grad_norm"], want.layers["weight_grad_norm"], rtol=1e-6)
        assert record.grad_norm_clipped == pytest.approx(want.grad_norm_clipped, rel=1e-6)


def test_lightning_fp16_amp_records_unscaled_gradients_and_loss():
    """Lightning multiplies the loss by GradScaler's scale (2**16) before on_before_backward and
    unscales the gradients before on_before_optimizer_step: nothing recorded carries the scale.
    (Lightning maps precision="16-mixed" to bf16 on the CPU, so the plugin is given explicitly.)"""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    module, header, steps = fit(L, VgtuiCallback, 6, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert header.preset["precision"] == "16-mixed" and scaler.get_scale() >= 2.0**15
    for record in steps:
        loss, per_layer, total, after, _ = reference(module, record.step)  # float32, so: close
        assert record.loss == pytest.approx(loss, rel=1e-2)
        np.testing.assert_allclose(record.layers["weight_grad_norm"], per_layer, rtol=2e-2)
        assert record.grad_norm_total == pytest.approx(total, rel=2e-2)
        assert record.grad_norm_clipped == pytest.approx(after, rel=2e-2)


def test_example_lightning_callback_runs(tmp_path, monkeypatch):
    """examples/lightning_callback.py, shortened: it trains and writes a recording with finite losses."""
    path = tmp_path / "run.jsonl"
    monkeypatch.setattr(sys, "argv", ["lightning_callback.py", "--steps", "6", "--record", str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(Path(__file__).parents[1] / "examples" / "lightning_callback.py"), run_name="__main__")
    steps = list(iter_steps(read_recording(path).records))
    assert [s.step for s in steps] == [0, 5] and all(np.isfinite(s.loss) for s in steps)


def test_lightning_sampled_steps_hold_their_own_micro_batches_only():
    """Unmeasured steps still close their loss window: a measured step's loss is its own."""
    module, _, steps = fit(L, VgtuiCallback, 9, {"sample_every": 4})
    assert [r.step for r in steps] == [0, 4, 8]
    for record in steps:
        loss, per_layer, total, _, accuracy = reference(module, record.step)
        assert record.loss == pytest.approx(loss, rel=1e-5)
        assert record.accuracy == pytest.approx(accuracy)
        np.testing.assert_allclose(record.layers["weight_grad_norm"], per_layer, rtol=1e-5)
        assert record.grad_norm_total == pytest.approx(total, rel=1e-5)


# -- Lightning's DDP strategy under torchrun -------------------------------------------------------
DDP_WORKER = r'''
import copy, json, sys, warnings
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn

STEPS, BATCH, RANKS = 3, 4, 2  # BATCH: examples per rank and step


def make_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def main(out):
    warnings.simplefilter("ignore")
    import lightning.pytorch as L
    from vgtui.integrations.lightning import VgtuiCallback

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()
            self.batches, self.snapshots = [], []

        def on_train_batch_start(self, batch, batch_idx):
            self.snapshots.append(copy.deepcopy(self.net.state_dict()))

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.batches.append((x.clone(), y.clone()))
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    g = torch.Generator().manual_seed(5)
    n = STEPS * BATCH * RANKS
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g) * 3, torch.randint(0, 3, (n,), generator=g))
    module = Classifier()
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=RANKS, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[VgtuiCallback(record=Path(out) / "lightning_ddp.jsonl", diagnose=False)])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH))
    torch.save({"batches": module.batches, "snapshots": module.snapshots},
               Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
'''


def test_lightning_ddp_records_activation_gradients_of_the_combined_batch(tmp_path):
    """Lightning's DDP strategy hands callbacks the inner module; the callback reduces the
    activation sums over the wrapper's group: rank 0 records ‖∂L/∂h‖ of both ranks' examples."""
    from tests.test_ddp import RECORDED
    from tests.torchrun import run_two_ranks

    module = run_two_ranks(DDP_WORKER, tmp_path, "lightning_ddp_worker", timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    steps = [r for r in read_recording(tmp_path / "lightning_ddp.jsonl").records if isinstance(r, StepRecord)]
    assert [r.step for r in steps] == [0, 1, 2] and not list(tmp_path.glob("*.rank1.jsonl"))
    for record in steps:
        net = module.make_net()
        net.load_state_dict(ranks[0]["snapshots"][record.step])
        layers = [net[int(name.removeprefix("net."))] for name in LAYERS]
        params = list(net.parameters())
        loss, outputs = 0.0, []
        for rank in ranks:  # DDP averages the ranks' mean losses: the combined batch's mean
            x, y = rank["batches"][record.step]
            outs = {}
            handles = [m.register_forward_hook(lambda mod, i, o, k=k: outs.__setitem__(k, o)) for k, m in enumerate(layers)]
            loss = loss + F.cross_entropy(net(x), y) / len(ranks)
            for h in handles:
                h.remove()
            outputs += [outs[k] for k in range(len(layers))]
        grads = torch.autograd.grad(loss, outputs + params)
        act = [np.sqrt(sum(float(grads[r * len(layers) + k].double().norm()) ** 2 for r in range(len(ranks))))
               for k in range(len(layers))]
        by_param = dict(zip(params, grads[len(outputs):]))
        wgrad = [float(torch.linalg.vector_norm(torch.stack([by_param[p].norm() for p in m.parameters()])))
                 for m in layers]
        np.testing.assert_allclose(record.layers["act_grad_norm"], act, rtol=RECORDED)
        np.testing.assert_allclose(record.layers["weight_grad_norm"], wgrad, rtol=RECORDED)
        assert record.loss == pytest.approx(loss.item(), rel=1e-5)
