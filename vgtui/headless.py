"""`vgtui run`: train without a UI, print compact per-layer tables, optionally record JSONL.

The main thread is the consumer: it drains the channel, writes the recording and prints. Signals
(SIGINT, SIGTERM, SIGHUP when an SSH session drops) stop the trainer after its current step; every
record that was produced is written before the process exits.
"""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path
from typing import TextIO

from .channel import Channel
from .config import Preset
from .formatting import fmt
from .records import RunError, RunHeader, StepRecord


def layer_table(header: RunHeader, record: StepRecord, detail: StepRecord | None = None) -> str:
    """Per-layer table, input at the top: the gradient norms the literature talks about. The
    saturation, dead-unit and update columns come from ``detail``, the newest record that
    measured them (they are measured on every Nth sampled step only)."""
    detail = detail or record
    note = f" (sat/dead/upd at step {detail.step})" if detail.step != record.step else ""
    lines = [f"  {'layer':<10}{'|dL/dW|':>10}{'|dL/dh|':>10}{'sat%':>7}{'dead%':>7}{'upd/W':>10}{note}"]
    cols = {**detail.layers, "weight_grad_norm": record.layers["weight_grad_norm"],
            "act_grad_norm": record.layers["act_grad_norm"]}
    for i, name in enumerate(header.layers):
        sat, dead = cols["saturated"][i], cols["dead"][i]
        lines.append(
            f"  {name:<10}{fmt(cols['weight_grad_norm'][i], 10)}{fmt(cols['act_grad_norm'][i], 10)}"
            f"{fmt(100 * sat, 7) if not math.isnan(sat) else '-'.rjust(7)}"
            f"{fmt(100 * dead, 7) if not math.isnan(dead) else '-'.rjust(7)}"
            f"{fmt(cols['update_ratio'][i], 10)}"
        )
    return "\n".join(lines)


def first_last_ratio(record: StepRecord) -> float:
    """‖∂L/∂h‖ of the first measured layer over that of the last: ~1 healthy, << 1 vanishing."""
    return record.first_last_ratio().value


def step_line(record: StepRecord) -> str:
    acc = "" if math.isnan(record.accuracy) else f"  acc {record.accuracy:6.1%}"
    clip = "  clipped" if record.clipped else ""
    bad = f"  NON-FINITE at {record.nonfinite[0]} ({record.nonfinite[1]})" if record.nonfinite else ""
    phase = "" if record.phase == "train" else f"  [{record.phase}]"
    return (f"step {record.step:>6}  loss {fmt(record.loss)}{acc}  |g| {fmt(record.grad_norm_total)}"
            f"  first/last |dL/dh| {fmt(first_last_ratio(record))}{clip}{bad}{phase}")


class _SignalStop:
    """Turns SIGINT/SIGTERM/SIGHUP into a polite stop; restores the old handlers on exit."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (tests): leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_headless(
    preset: Preset,
    steps: int,
    *,
    record: Path | None = None,
    device: str = "cpu",
    print_every: int | None = None,
    out: TextIO = sys.stdout,
    data_root: Path | None = None,
    download: bool = False,
    table_every: int | None = None,
    overhead_budget: float | None = None,
) -> int:
    """Train ``steps`` steps; returns the process exit code (0, 1 on a training error,
    128 + signal number when stopped by a signal)."""
    from .jsonl import JsonlWriter
    from .trainer import TrainerController  # torch: only when training, never for fmt()

    channel: Channel = Channel(maxlen=100_000)
    controller = TrainerController(channel, device=device, data_root=data_root, download=download,
                                   max_steps=steps, overhead_budget=overhead_budget)
    print_every = print_every or max(1, steps // 20)
    table_every = table_every or max(print_every, steps // 4)
    writer = JsonlWriter(record) if record else None
    header: RunHeader | None = None
    last: StepRecord | None = None
    last_detail: StepRecord | None = None
    error: RunError | None = None
    code = 0
    seen_nonfinite = False
    with _SignalStop() as signals:
        controller.start(preset)
        trainer = controller.trainer
        while True:
            alive = trainer.is_alive()
            channel.wait(0.2)
            for rec in channel.drain():
                if writer:
                    writer.write(rec)
                if isinstance(rec, RunHeader):
                    header = rec
                    print(f"vgtui: {preset.name} — {preset.description}", file=out)
                    print(f"  {len(rec.layers)} layers, {rec.params:,} parameters, device {rec.device}",
                          file=out)
                elif isinstance(rec, StepRecord):
                    last = rec
                    if rec.detail:
                        last_detail = rec
                    first_bad = rec.nonfinite is not None and not seen_nonfinite
                    seen_nonfinite = seen_nonfinite or rec.nonfinite is not None
                    if rec.step % print_every == 0 or first_bad:
                        print(step_line(rec), file=out)
                    if header and rec.step and rec.step % table_every == 0:
                        print(layer_table(header, rec, last_detail), file=out)
                elif isinstance(rec, RunError):
                    error = rec
                    print(f"vgtui: training failed at step {rec.step}: {rec.message}", file=sys.stderr)
            if signals.received is not None and trainer.is_alive():
                trainer.stop()
            if not alive and not len(channel):
                break
        trainer.join()
    if writer:
        writer.close()
    if last is not None and header is not None:
        print(f"\nfinal (step {last.step}):", file=out)
        print(step_line(last), file=out)
        print(layer_table(header, last, last_detail), file=out)
        for verdict in last.verdicts:
            print(f"  [{verdict.severity}] {verdict.kind}: {verdict.summary}", file=out)
            if verdict.suggestions:
                print(f"      try: {', '.join(verdict.suggestions)}", file=out)
    if last is not None and overhead_budget:
        share = "not measured yet" if math.isnan(last.probe_overhead) else f"{last.probe_overhead:.1%}"
        print(f"  probe overhead {share} of wall time (budget {overhead_budget:.0%}), "
              f"sampling every {last.sample_every} step(s)", file=out)
    if channel.dropped:
        print(f"  ({channel.dropped} records dropped by a slow consumer)", file=out)
    if record:
        print(f"  recorded to {record}", file=out)
    if signals.received is not None:
        code = 128 + signals.received
    elif error is not None:
        code = 1
    out.flush()
    return code
