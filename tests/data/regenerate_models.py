"""Record the deep real-model streams the TUI tests replay: a 24-block Llama (`llama24`), a
torchvision resnet18 (`resnet18`) and a two-layer tanh RNN (`rnn`), each watched with
`vgtui.watch` in an ordinary training loop on synthetic data (fixed seeds, random init, no
downloads, a handful of steps).

    OMP_NUM_THREADS=1 .venv/bin/python tests/data/regenerate_models.py [llama24 resnet18 rnn]

Through time (`rnn`): `vgtui.watch` measures ‖∂L/∂h_t‖ of each fused `nn.RNN` itself (an exact
replay on every detail step, `vgtui/recurrent.py`), so its verdicts judge the run through time
too; every step is a detail step here. Recurrent weights are scaled so the gradient visibly fades
toward t = 0.

Tied weights (`llama24`): `vgtui.watch` lists lm_head and embed_tokens in the header's `tied`
itself (one tensor, measured once).

Verdict evidence dicts are dropped to keep the files small. Then update the snapshots
(`pytest tests/test_tui_snapshots.py --snapshot-update`) and look at them.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import vgtui  # noqa: E402
from regenerate import shrink  # noqa: E402  (tests/data/regenerate.py, beside this script)


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
    shrink(path)


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
    shrink(path)


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



def rnn(steps: int = 12, length: int = 60) -> None:
    torch.manual_seed(0)
    model = Recurrent()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    path = HERE / "rnn.jsonl"
    with vgtui.watch(model, record=path, optimizer=opt, run_id=1, name="rnn-tanh", detail_every=1,
                     overhead_budget=None) as w:
        for _ in range(steps):
            x = torch.randn(16, length, 4, generator=gen)
            y = (x[:, 0, 0] > 0).long()  # the label is decided by the FIRST time step
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            w.step(loss=loss, accuracy=(out.argmax(1) == y).float().mean())
            opt.step()
    shrink(path)


FIXTURES = {"llama24": llama24, "resnet18": resnet18, "rnn": rnn}

if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or FIXTURES:
        FIXTURES[name]()
