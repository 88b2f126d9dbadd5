"""vgtui in a Lightning run: one callback, nothing else changes.

    python examples/lightning_callback.py          # writes run.jsonl, then: vgtui replay run.jsonl

A small classifier on synthetic data, trained by Lightning's own Trainer with gradient clipping
and gradient accumulation. The callback records per-layer ‖∂L/∂W‖ before Lightning clips, the
global norm after it clips and whether it did, the step's loss and the accuracy the module logs.
(``pytorch_lightning`` users: ``from vgtui.integrations.pytorch_lightning import VgtuiCallback``.)
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

from vgtui.integrations.lightning import VgtuiCallback


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("train_acc", (logits.argmax(1) == y).float().mean())  # recorded as the accuracy
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def synthetic(n: int = 4096) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4  # learnable, not trivially
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--record", default="run.jsonl")
    args = parser.parse_args()
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, gradient_clip_val=1.0,
                        accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[VgtuiCallback(record=args.record, sample_every=5)])
    trainer.fit(Classifier(), synthetic())
    print(f"recorded {args.record}: vgtui replay {args.record}")


if __name__ == "__main__":
    main()
