"""`vgtui run`: train without a UI, print compact per-layer tables, optionally record JSONL.

The main thread is the consumer: it drains the channel, writes the recording and prints. Signals
(SIGINT, SIGTERM, SIGHUP when an SSH session drops) stop the trainer after its current step; every
record that was produced is written before the process exits. Whatever happens in the consumer,
the trainer thread is stopped and joined before this returns or raises: a thread still inside
torch when the interpreter exits aborts the process ("terminate called without an active
exception", exit 134).

Exit codes (the README's command-line section lists them too): 0 done; 1 training failed;
3 the recording could not be written (disk full, ...): training went on unrecorded and the file
is valid up to its last complete line; 4 stopped at the first non-finite step
(``--stop-on-nonfinite``); 128 + N stopped by signal N. Bad input is 2 (``vgtui.cli``).
"""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from .channel import Channel
from .config import Preset
from .diagnosis import nonfinite_step
from .errors import UserError
from .formatting import fmt
from .jsonl import JsonlWriter
from .records import Record, RunError, RunEvent, RunHeader, StepRecord

EXIT_OK = 0
EXIT_TRAINING_ERROR = 1
#: Training ran on, but the recording stopped (disk full or another write error).
EXIT_RECORDING_FAILED = 3
#: ``--stop-on-nonfinite``: stopped after the first step with a non-finite value.
EXIT_NONFINITE = 4


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


def time_ratio(record: StepRecord) -> float | None:
    """Through time: ‖∂L/∂h_t‖ at the first measured time step over the last, of the recurrent
    layer where it is smallest (None without recurrent layers). Across layers an RNN is one layer
    deep and reads healthy; its gradient vanishes along time."""
    ratios = []
    for series in record.time_act_grad_norm.values():
        finite = np.asarray(series, dtype=float)
        finite = finite[np.isfinite(finite)]
        if len(finite) >= 2 and finite[-1] > 0:
            ratios.append(finite[0] / finite[-1])
    return min(ratios) if ratios else None


def heldout_text(heldout: StepRecord | None, at: int | None = None) -> str:
    """Held-out loss (and accuracy) of the newest evaluation, and the generalisation gap: held-out
    minus training loss, both at that step's weights. "" before the first evaluation."""
    if heldout is None:
        return ""
    acc = "" if math.isnan(heldout.heldout_accuracy) else f" acc {heldout.heldout_accuracy:6.1%}"
    gap = heldout.heldout_loss - heldout.loss
    older = f" (step {heldout.step})" if at is not None and at != heldout.step else ""
    return f"  held-out {fmt(heldout.heldout_loss).strip()}{acc} gap {gap:+.3g}{older}"


def step_line(record: StepRecord, at: int | None = None, heldout: StepRecord | None = None) -> str:
    """One line for ``record``; ``at``: the step this line stands for, when the record (the
    newest measured one) is older than that; ``heldout``: the newest record that carried a
    held-out evaluation."""
    acc = "" if math.isnan(record.accuracy) else f"  acc {record.accuracy:6.1%}"
    clip = "  clipped" if record.clipped else ""
    bad = f"  NON-FINITE at {record.nonfinite[0]} ({record.nonfinite[1]})" if record.nonfinite else ""
    phase = "" if record.phase == "train" else f"  [{record.phase}]"
    older = f"  (measured at step {record.step})" if at is not None and at != record.step else ""
    through_time = time_ratio(record)
    in_time = "" if through_time is None else f"  in time {fmt(through_time).strip()}"
    return (f"step {record.step if at is None else at:>6}  loss {fmt(record.loss)}{acc}"
            f"  |g| {fmt(record.grad_norm_total)}"
            f"  first/last |dL/dh| {fmt(first_last_ratio(record))}{in_time}"
            f"{heldout_text(heldout, record.step)}{clip}{bad}{phase}{older}")


class _StepPrinter:
    """A line at every ``every``-th step, from the newest record measured at or before it.

    Records arrive only for sampled steps, and the overhead budget widens the sampling interval
    as it likes, so the boundaries themselves are often not measured: testing ``step % every``
    on each record skipped them (steps 200 and 300 of a 600-step run were never printed)."""

    def __init__(self, every: int, out: TextIO):
        self.every, self.out = every, out
        self.next = 0
        self.previous: StepRecord | None = None
        self.printed: StepRecord | None = None
        self.heldout: StepRecord | None = None  # the newest record carrying a held-out evaluation

    def record(self, rec: StepRecord) -> None:
        if not math.isnan(rec.heldout_loss) or not math.isnan(rec.heldout_accuracy):
            self.heldout = rec
        while self.next <= rec.step:
            self._line(rec if rec.step == self.next else self.previous, self.next)
        self.previous = rec

    def finish(self, last_step: int) -> None:
        """Boundaries up to the last step trained, after the newest record."""
        while self.previous is not None and self.next <= last_step:
            self._line(self.previous, self.next)

    def _line(self, rec: StepRecord | None, at: int) -> None:
        self.next += self.every
        if rec is None:
            return
        if rec is self.printed:  # nothing measured since the previous line
            print(f"step {at:>6}  (no step measured since step {rec.step}; sampling every"
                  f" {rec.sample_every})", file=self.out)
            return
        print(step_line(rec, at, self.heldout if self.heldout is not None and self.heldout.step <= rec.step
                                  else None), file=self.out)
        self.printed = rec


class _Recorder:
    """The ``--record`` file. A write that fails (disk full, quota, a vanished mount) ends the
    recording, not training: one line names the file, the partial line is cut off so the file
    stays valid up to its last complete line, and training goes on unrecorded."""

    def __init__(self, path: Path, err: TextIO):
        self.path, self.err = path, err
        try:
            self.writer = JsonlWriter(path)
        except OSError as exc:  # before training: the user's path is the problem
            raise UserError(f"{path}: cannot record there: {exc.strerror or exc}") from None
        self.good_size = 0
        self.failed: str | None = None

    def write(self, record: Record) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(record)
            self.good_size = os.path.getsize(self.path)
        except Exception as exc:  # OSError above all (ENOSPC); anything else is ours, same rule
            step = getattr(record, "step", 0)
            self.failed = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                           else f"{type(exc).__name__}: {exc}")
            print(f"vgtui: {self.path}: recording stopped at step {step} ({self.failed});"
                  " training goes on unrecorded, the file is valid up to its last complete line",
                  file=self.err)
            self._abandon()

    def _abandon(self) -> None:
        writer, self.writer = self.writer, None
        try:
            writer.close()  # flushing the failed line fails again; the file is closed regardless
        except OSError:
            pass
        try:
            os.truncate(self.path, self.good_size)  # drop the partial line written before the error
        except OSError:
            pass

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()
        except OSError as exc:
            self.failed = exc.strerror or str(exc)
            print(f"vgtui: {self.path}: the last records could not be written ({self.failed})",
                  file=self.err)
            self.writer = None
            try:
                os.truncate(self.path, self.good_size)
            except OSError:
                pass


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
    device: str = "auto",
    print_every: int | None = None,
    out: TextIO | None = None,
    data_root: Path | None = None,
    download: bool = False,
    table_every: int | None = None,
    overhead_budget: float | None = None,
    stop_on_nonfinite: bool = False,
    err: TextIO | None = None,
) -> int:
    """Train ``steps`` steps; returns the process exit code (see the module docstring)."""
    from .trainer import TrainerController  # torch: only when training, never for fmt()

    out = out if out is not None else sys.stdout  # at call time: tests and callers swap it
    err = err if err is not None else sys.stderr
    channel: Channel = Channel(maxlen=100_000)
    controller = TrainerController(channel, device=device, data_root=data_root, download=download,
                                   max_steps=steps, overhead_budget=overhead_budget)
    print_every = print_every or max(1, steps // 20)
    table_every = table_every or max(print_every, steps // 4)
    recorder = _Recorder(record, err) if record else None
    printer = _StepPrinter(print_every, out)
    next_table = table_every
    header: RunHeader | None = None
    last: StepRecord | None = None
    last_detail: StepRecord | None = None
    error: RunError | None = None
    stopped_at: int | None = None  # --stop-on-nonfinite: the first non-finite step
    code = EXIT_OK
    seen_nonfinite = False
    with _SignalStop() as signals:
        controller.start(preset)
        trainer = controller.trainer
        try:
            while True:
                alive = trainer.is_alive()
                channel.wait(0.2)
                for rec in channel.drain():
                    if recorder:
                        recorder.write(rec)
                    if isinstance(rec, RunHeader):
                        header = rec
                        print(f"vgtui: {preset.name} — {preset.description}", file=out)
                        print(f"  {len(rec.layers)} layers, {rec.params:,} parameters, device {rec.device}",
                              file=out)
                    elif isinstance(rec, StepRecord):
                        last = rec
                        if rec.detail:
                            last_detail = rec
                        bad_step = nonfinite_step(rec)
                        first_bad = bad_step is not None and not seen_nonfinite
                        seen_nonfinite = seen_nonfinite or bad_step is not None
                        printer.record(rec)
                        if first_bad and printer.printed is not rec:
                            print(step_line(rec), file=out)
                        if header and rec.step >= next_table:
                            print(layer_table(header, rec, last_detail), file=out)
                            next_table = (rec.step // table_every + 1) * table_every
                        if first_bad and stop_on_nonfinite and stopped_at is None:
                            stopped_at = bad_step
                            trainer.stop()
                    elif isinstance(rec, RunEvent) and rec.kind == "notice":
                        print(f"vgtui: {rec.message}", file=err)  # e.g. no held-out evaluation
                    elif isinstance(rec, RunError):
                        error = rec
                        print(f"vgtui: training failed at step {rec.step}: {rec.message}", file=err)
                if signals.received is not None and trainer.is_alive():
                    trainer.stop()
                if not alive and not len(channel):
                    break
        finally:  # never leave the trainer running into interpreter exit (abort, exit 134)
            trainer.stop()
            trainer.join()
    if recorder and stopped_at is not None:
        recorder.write(RunEvent("notice", f"stopped at the first non-finite step {stopped_at}"
                                f" (--stop-on-nonfinite)", step=stopped_at,
                                run_id=header.run_id if header else 0))
    if recorder:
        recorder.close()
    printer.finish(trainer.step - 1)
    if last is not None and header is not None:
        print(f"\nfinal (step {last.step}):", file=out)
        print(step_line(last), file=out)
        print(layer_table(header, last, last_detail), file=out)
        if printer.heldout is not None:
            held = printer.heldout
            acc = "" if math.isnan(held.heldout_accuracy) else f", accuracy {held.heldout_accuracy:.1%}"
            print(f"  held-out (step {held.step}): loss {fmt(held.heldout_loss).strip()}{acc};"
                  f" generalisation gap {held.heldout_loss - held.loss:+.3g}"
                  f" (held-out minus training loss {fmt(held.loss).strip()})", file=out)
        for verdict in last.verdicts:
            print(f"  [{verdict.severity}] {verdict.kind}: {verdict.summary}", file=out)
            if verdict.suggestions:
                print(f"      try: {', '.join(verdict.suggestions)}", file=out)
    if last is not None and overhead_budget:
        share = ("not measured (the run ended inside the budget's first window)"
                 if math.isnan(last.probe_overhead) else f"{last.probe_overhead:.1%} of wall time")
        print(f"  probe overhead {share}; budget {overhead_budget:.0%}, "
              f"sampling every {last.sample_every} step(s)", file=out)
    if channel.dropped:
        print(f"  ({channel.dropped} records dropped by a slow consumer)", file=out)
    if stopped_at is not None:
        print(f"  stopped at the first non-finite step ({stopped_at}): --stop-on-nonfinite", file=out)
    if recorder:
        state = (f"recording stopped early ({recorder.failed}); valid up to its last complete line"
                 if recorder.failed else "recorded")
        print(f"  {state}: {record}", file=out)
    if signals.received is not None:
        code = 128 + signals.received
    elif error is not None:
        code = EXIT_TRAINING_ERROR
    elif stopped_at is not None:
        code = EXIT_NONFINITE
    elif recorder and recorder.failed:
        code = EXIT_RECORDING_FAILED
    try:
        out.flush()
    except OSError:
        pass
    return code
