"""vgtui in a Hugging Face Trainer run: one callback, nothing else changes.

    python examples/hf_trainer.py                  # writes run.jsonl, then: vgtui replay run.jsonl

A tiny GPT-2 built from its config (random weights, nothing downloaded) learns a synthetic
sequence task with the Trainer's clipping (max_grad_norm) and gradient accumulation. The callback
records per-layer ‖∂L/∂W‖ before the Trainer clips (it observes ``accelerator.clip_grad_norm_``),
the global norm after, and the loss the Trainer logs.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from vgtui.integrations.hf import VgtuiCallback

VOCAB, LENGTH = 64, 32


class Counting(torch.utils.data.Dataset):
    """Sequences that count upwards modulo VOCAB from a random start: the next token is
    predictable, so the loss falls within a few dozen steps."""

    def __init__(self, n: int = 2048):
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[0] = -100  # never predicted (GPT-2 shifts labels itself): the loss is per predicted token
        return {"input_ids": self.ids[i], "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--record", default="run.jsonl")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=LENGTH))
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=16,
            gradient_accumulation_steps=2, max_grad_norm=1.0, learning_rate=3e-3, use_cpu=True,
            report_to=[], save_strategy="no", logging_steps=20, disable_tqdm=True)
        trainer = Trainer(model=model, args=training, train_dataset=Counting(),
                          callbacks=[VgtuiCallback(record=args.record, sample_every=5)])
        trainer.train()
    print(f"recorded {args.record}: vgtui replay {args.record}")


if __name__ == "__main__":
    main()
