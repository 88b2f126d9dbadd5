"""Record the deep real-model streams the TUI tests replay: a 24-block Llama (`llama24`), a
torchvision resnet18 (`resnet18`) and a two-layer tanh RNN (`rnn`), each watched with
`vgtui.watch` in an ordinary training loop on synthetic data (fixed seeds, random init, no
downloads, a handful of steps).

    OMP_NUM_THREADS=1 .venv/bin/python tests/data/regenerate_models.py [llama24 resnet18 rnn]

Through time (`rnn`): `vgtui.watch` on this branch does not measure ‖∂L/∂h_t‖ yet, so the script
computes it itself on every measured step: the RNN layers' output sequences are kept from the
same forward pass, `torch.autograd.grad` of the same loss gives ∂L/∂h_t, and its norm over batch
and features per time step t goes into the record's `time_act_grad_norm` (the field's meaning in
`vgtui/records.py`). Recurrent weights are scaled so the gradient visibly fades toward t = 0.

Tied weights (`llama24`): `vgtui.watch` lists lm_head and embed_tokens in the header's `tied`
itself (one tensor, measured once).

Verdict evidence dicts are dropped to keep the files small. Then update the snapshots
(`pytest tests/test_tui_snapshots.py --snapshot-update`) and look at them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import vgtui  # noqa: E402
from vgtui.jsonl import JsonlWriter, read_recording  # noqa: E402
from vgtui.records import StepRecord  # noqa: E402


def _shrink(path: Path) -> None:
    lines = []
    for line in path.read_text().splitlines():
        data = json.loads(line)
        for verdict in data.get("verdicts", []):
            verdict["evidence"] = {}
        lines.append(json.dumps(data, separators=(",", ":")))
    path.write_text("\n".join(lines) + "\n")
    print(f"{path.name}: {len(lines)} lines, {path.stat().st_size // 1024} KB")


def llama24(steps: int = 6) -> None:
    """A 24-block Llama decoder: nine layers per block (input_layernorm, q/k/v/o_proj,
    post_attention_layernorm, gate/up/down_proj) make 218 with embed_tokens, the final norm and
    the tied lm_head, past the 150 a deep transformer has. Llama rather than GPT-2 (six per
    block, 148 in all) or GPT-J (seven): the most common decoder layout today, and the deepest
    per block of the three."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=24, hidden_size=16, intermediate_size=32,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                         max_position_embeddings=16, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)  # lm_head tied to embed_tokens
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    path = HERE / "llama24.jsonl"
    with vgtui.watch(model, record=path, optimizer=opt, sample_every=1, run_id=1, name="llama24") as w:
        for _ in range(steps):
            ids = torch.randint(0, 64, (4, 16), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            w.step(loss=loss)
            opt.step()
    _shrink(path)


def resnet18(steps: int = 6) -> None:
    from torchvision.models import resnet18 as build

    torch.manual_seed(0)
    model = build(weights=None, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    path = HERE / "resnet18.jsonl"
    with vgtui.watch(model, record=path, optimizer=opt, run_id=1, name="resnet18") as w:
        for _ in range(steps):
            x = torch.randn(8, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            acc = (out.argmax(1) == y).float().mean()
            w.step(loss=loss, accuracy=acc)
            opt.step()
    _shrink(path)


class Recurrent(nn.Module):
    """Two stacked tanh RNNs; the last step's state goes to a linear head."""

    def __init__(self, features: int = 4, hidden: int = 32, classes: int = 2, scale: float = 1.0):
        super().__init__()
        self.rnn1 = nn.RNN(features, hidden, batch_first=True)
        self.rnn2 = nn.RNN(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            for rnn in (self.rnn1, self.rnn2):
                rnn.weight_hh_l0.mul_(scale)

    def forward(self, x):
        h1, _ = self.rnn1(x)
        h2, _ = self.rnn2(h1)
        return self.head(h2[:, -1])

    def unrolled(self, x) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The same computation written as a loop over t with the same parameters, keeping every
        h_t: the output tensor of nn.RNN only carries the direct path, not the one through time."""
        states: dict[str, list[torch.Tensor]] = {}
        inputs = list(x.unbind(1))
        for name in ("rnn1", "rnn2"):
            rnn = getattr(self, name)
            h = x.new_zeros(x.shape[0], rnn.hidden_size)
            out = []
            for x_t in inputs:
                h = torch.tanh(x_t @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T
                               + rnn.bias_hh_l0)
                out.append(h)
            states[name], inputs = out, out
        # functional, so that the watcher's hooks on head see only the real forward pass
        return nn.functional.linear(inputs[-1], self.head.weight, self.head.bias), states


def rnn(steps: int = 12, length: int = 60) -> None:
    torch.manual_seed(0)
    model = Recurrent()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    path = HERE / "rnn.jsonl"
    through_time: dict[int, dict[str, np.ndarray]] = {}
    with vgtui.watch(model, record=path, optimizer=opt, run_id=1, name="rnn-tanh") as w:
        for step in range(steps):
            x = torch.randn(16, length, 4, generator=gen)
            y = (x[:, 0, 0] > 0).long()  # the label is decided by the FIRST time step
            out_unrolled, states = model.unrolled(x)
            loss_unrolled = nn.functional.cross_entropy(out_unrolled, y)
            flat = [h for name in states for h in states[name]]
            grads = torch.autograd.grad(loss_unrolled, flat)
            through_time[step] = {name: torch.stack([g.norm() for g in grads[i * length:(i + 1) * length]])
                                  .detach().double().numpy() for i, name in enumerate(states)}
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            w.step(loss=loss, accuracy=(out.argmax(1) == y).float().mean())
            opt.step()
    recs = read_recording(path).records
    recs = [dataclasses.replace(r, time_act_grad_norm=through_time.get(r.step, {}))
            if isinstance(r, StepRecord) else r for r in recs]
    with JsonlWriter(path) as writer:
        writer.write_all(recs)
    _shrink(path)


FIXTURES = {"llama24": llama24, "resnet18": resnet18, "rnn": rnn}

if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or FIXTURES:
        FIXTURES[name]()
