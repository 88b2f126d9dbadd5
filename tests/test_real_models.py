"""vgtui.watch (and the trainer) on the models people train, built from their own libraries with
random init and synthetic tensors. Every number is checked against an independent
``torch.autograd.grad`` computation written here, never against vgtui itself."""

from __future__ import annotations

import copy
import errno
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vgtui
from vgtui import LayerSpec
from vgtui.channel import Channel
from vgtui.jsonl import read_recording
from vgtui.records import RunError, RunHeader, StepRecord

RTOL = 1e-5


def _first(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    return None


def watched(model, loss_of, steps=1, optimizer=None, **kwargs):
    """The user's loop under vgtui.watch: every step measured, every tier, records returned."""
    channel = Channel(100_000)
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    options = dict(channel=channel, optimizer=opt, diagnose=False, detail_every=1, overhead_budget=None)
    watcher = vgtui.watch(model, **(options | kwargs))
    for step in range(steps):
        loss = loss_of(model, step)
        loss.backward()
        watcher.step(opt, loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    watcher.close()
    records = channel.drain()
    header = next(r for r in records if isinstance(r, RunHeader))
    return header, [r for r in records if isinstance(r, StepRecord)], watcher


def reference(model, loss_of, step, names):
    """By autograd.grad, no vgtui: per named module, ‖∂L/∂h‖ over all its calls, ∂L/∂h of each
    call, and ‖∂L/∂W‖ over the parameters it owns directly (a root parameter by its name)."""
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a parameter of the root model
        handles.append(module.register_forward_hook(
            lambda m, i, o, n=name: outs[n].append(_first(o)) if _first(o) is not None else None))
    loss = loss_of(model, step)
    for handle in handles:
        handle.remove()
    tensors = [(n, t) for n in names for t in outs[n] if t.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [t for _, t in tensors] + params, allow_unused=True)
    per_call = {n: [] for n in names}
    for (n, _), g in zip(tensors, grads):
        if g is not None:
            per_call[n].append(g)
    by_param = {id(p): g for p, g in zip(params, grads[len(tensors):])}
    act, wgrad = {}, {}
    for name in names:
        calls = per_call[name]
        act[name] = math.sqrt(sum(float(g.double().norm()) ** 2 for g in calls)) if calls else float("nan")
        try:
            owned = list(model.get_submodule(name).parameters(recurse=False))
        except AttributeError:
            owned = [model.get_parameter(name)]
        gs = [by_param.get(id(p)) for p in owned if p.requires_grad]
        gs = [g for g in gs if g is not None]
        wgrad[name] = math.sqrt(sum(float(g.double().norm()) ** 2 for g in gs)) if gs else float("nan")
    return loss, act, wgrad, per_call


def check(record, header, act, wgrad, names=None, skip_act=()):
    names = names or header.layers
    index = {n: i for i, n in enumerate(header.layers)}
    for name in names:
        i = index[name]
        if name not in skip_act and not math.isnan(act[name]):
            assert record.layers["act_grad_norm"][i] == pytest.approx(act[name], rel=RTOL), f"‖∂L/∂h‖ {name}"
        if not math.isnan(wgrad[name]):
            assert record.layers["weight_grad_norm"][i] == pytest.approx(wgrad[name], rel=RTOL), f"‖∂L/∂W‖ {name}"


def every_parameter_once(watcher, model):
    owned = [p for params in watcher.layout.layer_params for p in params]
    assert len({id(p) for p in owned}) == len(owned)
    assert {id(p) for p in owned} == {id(p) for p in model.parameters() if p.requires_grad}


# -- torchvision resnet18 ---------------------------------------------------------------------------
def test_resnet18_layers_activations_and_norms():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10)
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():  # the reference sees every h before an in-place ReLU rewrites it
        if isinstance(m, nn.ReLU):
            m.inplace = False
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)

    def loss_of(m, step):
        return F.cross_entropy(m(x), y)

    header, (record,), watcher = watched(model, loss_of)
    every_parameter_once(watcher, model)
    assert header.layers[:4] == ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1"]
    assert header.layers[-1] == "fc" and "layer2.0.downsample.0" in header.layers
    kinds = dict(zip(header.layers, header.layer_kinds))
    # ReLU(inplace=True) modules follow bn1 and each block's bn1; bn2 feeds the residual sum.
    assert kinds["bn1"] == kinds["layer1.0.bn1"] == kinds["layer4.1.bn1"] == "relu"
    assert kinds["layer1.0.bn2"] == kinds["conv1"] == kinds["layer2.0.downsample.1"] == "linear"
    _, act, wgrad, per_call = reference(ref_model, loss_of, 0, header.layers)
    check(record, header, act, wgrad)
    assert record.measured("act_grad_norm").all() and record.measured("weight_grad_norm").all()
    # Dead channels of bn1's ReLU: inactive on every example and position.
    i = header.layers.index("bn1")
    with torch.no_grad():
        h = ref_model.bn1(ref_model.conv1(x))
    expected = (F.relu(h).amax(dim=(0, 2, 3)) <= 0).float().mean().item()
    assert record.layers["dead"][i] == pytest.approx(expected, abs=1e-6)
    assert record.measured("dead")[i] and not record.measured("dead")[header.layers.index("conv1")]
    assert record.nonfinite is None


# -- nn.TransformerEncoder ------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x, pad):
        h = self.encoder(self.embed(x), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def test_transformer_encoder_out_proj_is_not_measured_and_keeps_its_place():
    torch.manual_seed(0)
    model = Encoder()
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 5, 6, generator=g), torch.randint(0, 3, (3,), generator=g)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])

    def loss_of(m, step):
        return F.cross_entropy(m(x, pad), y)

    header, (record,), watcher = watched(model, loss_of)
    every_parameter_once(watcher, model)
    block = ["encoder.layers.0." + n for n in ("self_attn", "self_attn.out_proj", "norm1", "linear1",
                                               "linear2", "norm2")]
    assert header.layers[:7] == ["embed"] + block and header.layers[-1] == "head"
    _, act, wgrad, _ = reference(ref_model, loss_of, 0, header.layers)
    check(record, header, act, wgrad)
    out_proj = header.layers.index("encoder.layers.0.self_attn.out_proj")
    # Called as a function inside MultiheadAttention: no ∂L/∂h, marked so; its weights measured.
    assert not record.measured("act_grad_norm")[out_proj] and record.nonfinite is None
    assert record.measured("weight_grad_norm")[out_proj]
    ratio = record.first_last_ratio()
    assert (ratio.first, ratio.last) == (0, len(header.layers) - 1)
    assert ratio.value == pytest.approx(act["embed"] / act["head"], rel=1e-4)


# -- recurrent layers -------------------------------------------------------------------------------
class Recurrent(nn.Module):
    def __init__(self, cls, batch_first, layers):
        super().__init__()
        self.rnn = cls(4, 8, num_layers=layers, batch_first=batch_first)
        self.head = nn.Linear(8, 2)
        self.batch_first = batch_first

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


@pytest.mark.parametrize("cls,batch_first,layers", [(nn.LSTM, True, 2), (nn.GRU, False, 1), (nn.RNN, True, 2)])
def test_recurrent_modules_cover_every_weight_and_every_time_step(cls, batch_first, layers):
    torch.manual_seed(0)
    model = Recurrent(cls, batch_first, layers)
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 4, generator=g)
    x = x if batch_first else x.transpose(0, 1)
    y = torch.randint(0, 2, (3,), generator=g)

    def loss_of(m, step):
        return F.cross_entropy(m(x), y)

    header, (record,), watcher = watched(model, loss_of)
    every_parameter_once(watcher, model)
    assert header.layers == ["rnn", "head"]
    _, act, wgrad, per_call = reference(ref_model, loss_of, 0, header.layers)
    check(record, header, act, wgrad)  # ‖∂L/∂W‖ over weight_ih/hh and biases of every layer
    (grad,) = per_call["rnn"]
    time_dim = 1 if batch_first else 0
    expected = grad.movedim(time_dim, 0).reshape(7, -1).norm(dim=1).numpy()
    # Through time: the total ∂L/∂h_t of every stacked layer (checked against an unrolled cell loop
    # in test_recurrent_time.py); at the last step, where the loss reads it, the output's gradient.
    keys = ["rnn"] if layers == 1 else [f"rnn.l{k}" for k in range(layers)]
    assert sorted(record.time_act_grad_norm) == keys
    np.testing.assert_allclose(record.time_act_grad_norm[keys[-1]][-1], expected[-1], rtol=RTOL)
    assert header.layer_kinds[0] == {nn.RNN: "tanh", nn.LSTM: "lstm", nn.GRU: "gru"}[cls]


class Unrolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.RNNCell(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


def test_unrolled_cell_gradient_per_call_in_call_order():
    torch.manual_seed(0)
    model = Unrolled()
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 6, 4, generator=g) for _ in range(2)]
    y = torch.tensor([0, 1])

    def loss_of(m, step):
        return F.cross_entropy(m(xs[step]), y)

    header, records, _ = watched(model, loss_of, steps=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    for step, record in enumerate(records):
        _, act, wgrad, per_call = reference(ref_model, loss_of, step, header.layers)
        check(record, header, act, wgrad)
        expected = [float(g.norm()) for g in per_call["cell"]]  # hooks append in call order
        np.testing.assert_allclose(record.time_act_grad_norm["cell"], expected, rtol=RTOL)
        assert expected[0] < expected[-1]  # the gradient reaching the first step is the smaller
    assert header.layer_kinds[0] == "tanh"


# -- a tiny GPT-2 from transformers, tied head ------------------------------------------------------
def test_gpt2_tied_head_is_measured_once_and_recorded():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))

    def loss_of(m, step):
        return m(ids, labels=ids).loss

    header, (record,), watcher = watched(model, loss_of)
    every_parameter_once(watcher, model)
    assert header.tied == {"transformer.wte": ["lm_head"], "lm_head": ["transformer.wte"]}
    assert header.layers[:2] == ["transformer.wte", "transformer.wpe"] and header.layers[-1] == "lm_head"
    kinds = dict(zip(header.layers, header.layer_kinds))
    assert kinds["transformer.h.0.mlp.c_fc"] == "gelu"  # transformers' NewGELUActivation module
    _, act, wgrad, _ = reference(ref_model, loss_of, 0, header.layers)
    head = header.layers.index("lm_head")
    # wte's ‖∂L/∂W‖ is the whole gradient of the shared tensor (both uses); lm_head's is not
    # measured a second time, its ‖∂L/∂h‖ (the logits) is.
    check(record, header, act, wgrad, names=[n for n in header.layers if n != "lm_head"])
    assert not record.measured("weight_grad_norm")[head] and not record.measured("update_ratio")[head]
    assert record.layers["act_grad_norm"][head] == pytest.approx(act["lm_head"], rel=RTOL)
    assert record.measured("act_grad_norm").all()


# -- frozen, shared, sometimes unused; a parameter of the model itself ------------------------------
class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.frozen = nn.Linear(4, 8).requires_grad_(False)
        self.shared = nn.Linear(8, 8)
        self.branch = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x, use_branch=True):
        h = torch.tanh(self.shared(torch.tanh(self.shared(F.relu(self.frozen(x))))))
        if use_branch:
            h = h + self.branch(h)
        return self.head(h) * self.scale


def test_frozen_shared_unused_and_root_parameters():
    torch.manual_seed(0)
    model = Odd()
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(3)]

    def loss_of(m, step):
        x, y = data[step]
        return F.mse_loss(m(x, use_branch=step == 0), y)

    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    header, records, watcher = watched(model, loss_of, steps=3,
                                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    every_parameter_once(watcher, model)
    assert header.layers == ["scale", "shared", "branch", "head"]  # frozen: nothing to measure
    branch = header.layers.index("branch")
    for step, record in enumerate(records):
        before = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        _, act, wgrad, _ = reference(ref_model, loss_of, step, header.layers)
        check(record, header, act, wgrad)  # shared: both calls; scale: its own gradient
        assert not record.measured("act_grad_norm")[0]  # a root parameter has no h
        # the reference's gradients came from autograd.grad: apply them as backward would
        loss = loss_of(ref_model, step)
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()
        moved = (ref_model.branch.weight.detach() - before["branch.weight"]).norm()
        if step > 0:
            # unused: no gradient (not measured), and it did not move (SGD skips it): ratio 0,
            # never lr·‖stale momentum buffer‖
            assert not record.measured("weight_grad_norm")[branch] and not record.measured("act_grad_norm")[branch]
            assert float(moved) == 0.0 and record.layers["update_ratio"][branch] == 0.0
            assert record.nonfinite is None
        else:
            assert record.layers["update_ratio"][branch] > 0


# -- activation checkpointing ---------------------------------------------------------------------
class Checkpointed(nn.Module):
    def __init__(self, checkpointed):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 2)
        self.checkpointed = checkpointed

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(x)


def test_activation_checkpointing_measures_what_a_plain_forward_does():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 8, generator=g), torch.randn(6, 2, generator=g)

    def loss_of(m, step):
        return F.mse_loss(m(x), y)

    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Checkpointed(checkpointed)
        ref_model = copy.deepcopy(model)
        header, (record,), _ = watched(model, loss_of)
        _, act, wgrad, _ = reference(ref_model, loss_of, 0, header.layers)
        check(record, header, act, wgrad)
        results.append(record)
    plain, ckpt = results
    assert ckpt.layers.keys() == plain.layers.keys()
    for metric, values in plain.layers.items():  # the recomputation inside backward counts nothing
        np.testing.assert_allclose(ckpt.layers[metric], values, rtol=RTOL, err_msg=metric)
    assert plain.measured("saturated")[:3].all()  # Tanh modules recognised after each Linear


# -- torch.compile: a compiled block inside an eager model ----------------------------------------
def test_compiled_submodule_is_not_measured_but_keeps_the_ratio_honest():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    ref_model = copy.deepcopy(model)
    model[2] = torch.compile(model[2], backend="aot_eager")
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)

    def loss_of(m, step):
        return F.mse_loss(m(x), y)

    header, (record,), _ = watched(model, loss_of)
    assert header.layers == ["0", "2", "4"]  # registration place, not after the output layer
    _, act, wgrad, _ = reference(ref_model, loss_of, 0, header.layers)
    check(record, header, act, wgrad, skip_act=("2",))
    assert list(record.measured("act_grad_norm")) == [True, False, True]
    ratio = record.first_last_ratio()
    assert (ratio.first, ratio.last) == (0, 2) and math.isfinite(ratio.value)
    assert record.nonfinite is None


# -- optimizers as users hold them ----------------------------------------------------------------
def _snapshot_ratio(module, before):
    after = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    return float((after - before).norm() / after.norm())


def test_accelerate_prepared_optimizer_and_lightning_optimizer():
    from accelerate import Accelerator
    from lightning.pytorch.core.optimizer import LightningOptimizer

    g = torch.Generator().manual_seed(9)
    data = [(torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)) for _ in range(3)]
    for wrapper in ("accelerate", "lightning"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if wrapper == "accelerate":
            accelerator = Accelerator(cpu=True)
            model, opt = accelerator.prepare(model, opt)
            backward = accelerator.backward
        else:
            opt = LightningOptimizer(opt)
            backward = torch.Tensor.backward
        channel = Channel()
        watcher = vgtui.watch(model, optimizer=opt, channel=channel, diagnose=False, detail_every=1,
                              overhead_budget=None)
        expected = []
        for x, y in data:
            backward(F.mse_loss(model(x), y))
            watcher.step(opt)
            before = [torch.cat([p.detach().reshape(-1) for p in model[i].parameters()]) for i in (0, 2)]
            if wrapper == "lightning":
                opt._optimizer.step()  # LightningOptimizer.step needs a Trainer's strategy
            else:
                opt.step()
            expected.append([_snapshot_ratio(model[i], b) for i, b in zip((0, 2), before)])
            opt.zero_grad()
        watcher.close()
        steps = [r for r in channel.drain() if isinstance(r, StepRecord)]
        assert len(steps) == 3
        for record, want in zip(steps, expected):
            np.testing.assert_allclose(record.layers["update_ratio"], want, rtol=1e-4, err_msg=wrapper)


# -- a monitor never takes training down ------------------------------------------------------------
class FullDisk(io.StringIO):
    """A file that takes ``lines`` lines and then fails as a full disk does."""

    def __init__(self, lines):
        super().__init__()
        self.room = lines

    def write(self, text):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= 1
        return super().write(text)


def _train(watcher, model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(10)
    for _ in range(steps):
        F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 2, generator=g)).backward()
        watcher.step(opt)
        opt.step()
        opt.zero_grad()
    return not all(torch.equal(a, b) for a, b in zip(start, model.parameters()))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def test_full_disk_through_a_file_object_warns_once_and_training_goes_on():
    model, channel, disk = _mlp(), Channel(), FullDisk(lines=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = vgtui.watch(model, record=disk, channel=channel, diagnose=False)
        assert _train(watcher, model)
        watcher.close()  # never raises
    messages = [str(w.message) for w in caught if "vgtui" in str(w.message)]
    assert len(messages) == 1 and "No space left" in messages[0]
    records = channel.drain()
    assert sum(isinstance(r, RunError) for r in records) == 1
    assert sum(isinstance(r, StepRecord) for r in records) == 3  # the channel still got every step
    assert disk.getvalue().count("\n") == 2  # what was written is whole lines


def test_full_disk_through_the_jsonl_writer(tmp_path, monkeypatch):
    from vgtui import jsonl

    real_write = jsonl.JsonlWriter.write

    def write(self, record):
        if self.lines >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, record)

    monkeypatch.setattr(jsonl.JsonlWriter, "write", write)
    model = _mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = vgtui.watch(model, record=tmp_path / "run.jsonl", diagnose=False)
        assert _train(watcher, model)
        watcher.close()
    assert sum("No space left" in str(w.message) for w in caught) == 1
    result = read_recording(tmp_path / "run.jsonl")
    assert result.problems == [] and len(result.records) == 3


def test_a_fault_inside_a_hook_is_reported_once_and_recorded(tmp_path, monkeypatch):
    from vgtui import api

    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(api._Accumulator, "add_grad", broken)
    model = _mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = vgtui.watch(model, record=tmp_path / "run.jsonl", diagnose=False)
        assert _train(watcher, model)
        watcher.close()
    assert sum("simulated fault" in str(w.message) for w in caught) == 1
    records = read_recording(tmp_path / "run.jsonl").records
    errors = [r for r in records if isinstance(r, RunError)]
    assert len(errors) == 1 and "simulated fault" in errors[0].message
    assert not any(m._forward_hooks for m in model.modules())


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8)

    def forward(self, x):
        return {"h": self.lin(x)}


class TupleOfThings(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return ("tag", 3, x * self.weight)


class Nothing(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))
        self.kept = None

    def forward(self, x):
        self.kept = x * self.weight
        return None


class OddOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = DictOut(), TupleOfThings(), Nothing(), nn.Linear(8, 2)

    def forward(self, x):
        h = self.b(self.a(x)["h"])[2]
        self.c(h)
        return self.head(self.c.kept)


def test_odd_module_outputs_are_measured_where_they_can_be():
    torch.manual_seed(0)
    model = OddOutputs()
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fault at all
        header, (record,), _ = watched(model, lambda m, s: F.mse_loss(m(x), y))
    assert header.layers == ["a.lin", "b", "c", "head"]
    assert list(record.measured("act_grad_norm")) == [True, False, False, True]
    assert record.measured("weight_grad_norm").all() and record.nonfinite is None


# -- one engine: the trainer and watch() give the same records -----------------------------------
def test_trainer_and_watch_give_identical_records():
    from vgtui.config import load_preset
    from vgtui.data import make_data
    from vgtui.models import build_model, make_optimizer
    from vgtui.trainer import run_to_completion

    preset = load_preset("relu-he").replace(depth=3, width=32, batch_size=8, detail_every=2, sample_every=2)
    steps = 8
    trained = [r for r in run_to_completion(preset, steps, window=True) if isinstance(r, StepRecord)]
    built = build_model(preset)
    data = make_data(preset.data, preset.seed, preset.batch_size, "cpu")
    opt = make_optimizer(built.model.parameters(), preset)
    channel = Channel()
    watcher = vgtui.watch(built.model, layers=built.layers, channel=channel, optimizer=opt, diagnose=False,
                          detail_every=preset.detail_every, overhead_budget=None, sample_every=2, window=True)
    losses, norms = [], []  # every step, for the windows
    for step in range(steps):
        x, y = data.batch(step)
        opt.zero_grad(set_to_none=True)
        out = built.model(x)
        loss = built.loss_fn(out, y)
        loss.backward()
        losses.append(float(loss.detach()))
        norms.append(float(torch.stack([p.grad.norm() for p in built.model.parameters()]).norm()))
        watcher.step(opt, loss, accuracy=(out.argmax(1) == y).float().mean())
        opt.step()
    watcher.close()
    watched_steps = [r for r in channel.drain() if isinstance(r, StepRecord)]
    assert [r.step for r in watched_steps] == [r.step for r in trained] == list(range(0, steps, 2))
    for a, b in zip(trained, watched_steps):
        # every step since the previous record, both ways, against the loop's own numbers
        first = max(0, a.step - 1)
        for w in (a.window, b.window):
            assert (w.steps, w.first_step) == (a.step - first + 1, first)
            span = slice(first, a.step + 1)
            assert w.loss_max == pytest.approx(max(losses[span]), rel=RTOL)
            assert w.loss_mean == pytest.approx(np.mean(losses[span]), rel=RTOL)
            assert w.grad_norm_min == pytest.approx(min(norms[span]), rel=RTOL)
            assert w.grad_norm_last == pytest.approx(norms[a.step], rel=RTOL)
            assert w.grad_norm_max_step == first + int(np.argmax(norms[span]))
        assert (a.detail, a.nonfinite, a.clipped) == (b.detail, b.nonfinite, b.clipped)
        for name in ("loss", "accuracy", "grad_norm_total", "grad_norm_clipped"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=RTOL), name
        assert a.unmeasured.keys() == b.unmeasured.keys()
        for metric, mask in a.unmeasured.items():
            np.testing.assert_array_equal(mask, b.unmeasured[metric], err_msg=metric)
        for metric, values in a.layers.items():
            np.testing.assert_allclose(values, b.layers[metric], rtol=RTOL, atol=1e-7, err_msg=metric)
        assert (a.hist is None) == (b.hist is None)
        if a.hist is not None:
            np.testing.assert_array_equal(a.hist, b.hist)


# -- the trainer on a recurrent model declared with LayerSpec(time_dim=...) ----------------------
class SequenceClassifier(nn.Module):
    """784 inputs read as 28 steps of 28 (how a recurrent preset sees Fashion-MNIST)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(28, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.lstm(x.view(-1, 28, 28))[0][:, -1])


def test_trainer_measures_a_recurrent_layer_through_time(monkeypatch):
    from vgtui import trainer as trainer_module
    from vgtui.config import load_preset
    from vgtui.data import make_data
    from vgtui.models import Built

    def build(preset, device):
        torch.manual_seed(preset.seed)
        model = SequenceClassifier().to(device)
        layers = [LayerSpec("lstm", model.lstm, model.lstm.weight_ih_l0, time_dim=1),
                  LayerSpec("output", model.head, model.head.weight)]
        return Built(model, layers, F.cross_entropy, "classifier")

    monkeypatch.setattr(trainer_module, "build_model", build)
    preset = load_preset("relu-he").replace(batch_size=8, detail_every=1)
    records = trainer_module.run_to_completion(preset, 1)
    header = next(r for r in records if isinstance(r, RunHeader))
    (record,) = [r for r in records if isinstance(r, StepRecord)]
    assert header.layers == ["lstm", "output"]
    model = build(preset, "cpu").model
    x, y = make_data(preset.data, preset.seed, preset.batch_size, "cpu").batch(0)
    out, _ = model.lstm(x.view(-1, 28, 28))
    loss = F.cross_entropy(model.head(out[:, -1]), y)
    grads = torch.autograd.grad(loss, [out, *model.lstm.parameters()])
    np.testing.assert_allclose(record.time_act_grad_norm["lstm"], grads[0].norm(dim=2).norm(dim=0).numpy(), rtol=RTOL)
    assert record.layers["act_grad_norm"][0] == pytest.approx(float(grads[0].norm()), rel=RTOL)
    wgrad = math.sqrt(sum(float(g.norm()) ** 2 for g in grads[1:]))
    assert record.layers["weight_grad_norm"][0] == pytest.approx(wgrad, rel=RTOL)


# -- cheap by default -----------------------------------------------------------------------------
def test_watch_hooks_exist_only_on_measured_steps():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = vgtui.watch(model, optimizer=opt, sample_every=3, overhead_budget=None, diagnose=False,
                          channel=Channel())
    hooks = []
    g = torch.Generator().manual_seed(12)
    for _ in range(7):
        hooks.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))
        F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 2, generator=g)).backward()
        watcher.step(opt)
        opt.step()
        opt.zero_grad()
    watcher.close()
    assert [h > 0 for h in hooks] == [True, False, False, True, False, False, True]
    assert watcher.transfers == 3


def test_watch_overhead_budget_widens_the_interval(monkeypatch):
    """Measuring made to cost 10 % of each step: the default 2 % budget widens the interval."""
    from vgtui import engine

    now = {"t": 0.0}
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now["t"])

    class Clock:  # the watcher's own time: 10 % of the wall time that passed
        cuda = False

        def start(self):
            pass

        def stop(self):
            pass

        def add(self, seconds):
            pass

        def seconds(self):
            return 0.1 * now["t"]

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = vgtui.watch(model, optimizer=opt, diagnose=False, channel=Channel())
    watcher._clock = Clock()
    g = torch.Generator().manual_seed(13)
    for _ in range(60):
        now["t"] += 0.1
        F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 2, generator=g)).backward()
        watcher.step(opt)
        opt.step()
        opt.zero_grad()
    watcher.close()
    assert watcher.sample_every >= 5 and watcher.transfers < 30


def test_zero_redundancy_optimizer(tmp_path):
    """ZeroRedundancyOptimizer (one gloo rank: its own process group, torn down after)."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
        channel = Channel()
        watcher = vgtui.watch(model, optimizer=opt, channel=channel, diagnose=False, detail_every=1,
                              overhead_budget=None)
        g = torch.Generator().manual_seed(14)
        expected = []
        for _ in range(3):
            F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 2, generator=g)).backward()
            watcher.step(opt)
            before = [torch.cat([p.detach().reshape(-1) for p in model[i].parameters()]) for i in (0, 2)]
            opt.step()
            opt.zero_grad()
            expected.append([_snapshot_ratio(model[i], b) for i, b in zip((0, 2), before)])
        watcher.close()
    finally:
        dist.destroy_process_group()
    steps = [r for r in channel.drain() if isinstance(r, StepRecord)]
    np.testing.assert_allclose([r.layers["update_ratio"] for r in steps], expected, rtol=1e-4)


def test_a_spike_between_measured_steps_is_in_the_next_record():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    channel = Channel()
    watcher = vgtui.watch(model, optimizer=opt, channel=channel, sample_every=4, overhead_budget=None,
                          diagnose=False, window=True)
    g = torch.Generator().manual_seed(15)
    losses = []
    for step in range(5):
        loss = F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 2, generator=g))
        if step == 2:
            loss = loss * 50  # a spike on a step that is not measured
        loss.backward()
        losses.append(float(loss.detach()))
        watcher.step(opt, loss)
        opt.step()
        opt.zero_grad()
    watcher.close()
    first, second = [r for r in channel.drain() if isinstance(r, StepRecord)]
    assert (first.step, first.window.steps) == (0, 1) and (second.step, second.window.steps) == (4, 4)
    window = second.window
    assert window.first_step == 1 and window.loss_max_step == 2 and window.grad_norm_max_step == 2
    assert window.loss_max == pytest.approx(losses[2], rel=RTOL) and window.loss_last == pytest.approx(losses[4], rel=RTOL)
