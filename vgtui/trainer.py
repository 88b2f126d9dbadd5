"""The training thread: builds a preset, trains it, measures it, and pushes records to a channel.

Control flows the other way through a command queue (pause, resume, single step, stop, sampling
interval). The thread checks it between steps, so stop takes at most one step. Anything raised
inside becomes a RunError record: the consumer decides how to show it. Every ``eval_every`` steps
the preset's held-out split is evaluated (:class:`HeldOut`) and the next record carries it.
"""

from __future__ import annotations

import dataclasses
import inspect
import queue
import threading
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from . import memory
from .models import Built, build_model, count_params, make_optimizer
from .channel import Channel
from .config import Preset
from .data import DataError, heldout_batches, make_data
from .diagnosis import Diagnoser
from .engine import OverheadBudget, ProbeClock
from .probe import HostTransfer, Probe
from .records import RunError, RunEvent, RunHeader


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: CUDA is not available on this machine")
    return device


class HeldOut:
    """Loss and accuracy on a fixed set of held-out batches, in eval mode without gradients.

    The batch count is bounded (``eval_batches``) so that its cost stays a small share of the
    run. The results stay on the device and come back through their own transfer (no sync on
    CUDA); :meth:`take` hands the newest landed result to the next record, once.
    """

    def __init__(self, batches: list, loss_fn, autoencoder: bool, every: int):
        self.batches = batches
        self.loss_fn = loss_fn
        self.autoencoder = autoencoder
        self.every = every
        self.seconds = 0.0  # host time spent evaluating (all of it, on the CPU)
        self._transfer = HostTransfer()
        self._landed: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return bool(self.batches) and step % self.every == 0

    def evaluate(self, model: nn.Module) -> None:
        began = time.perf_counter()
        training = model.training
        model.train(False)  # eval mode (batch norm: running statistics, none updated)
        try:
            with torch.no_grad():
                loss_sum = correct = 0
                count = 0
                for x, y in self.batches:
                    out = model(x)
                    loss_sum = loss_sum + self.loss_fn(out, x if self.autoencoder else y).float() * len(x)
                    if not self.autoencoder:
                        correct = correct + (out.argmax(1) == y).sum()
                    count += len(x)
                accuracy = (correct / count if not self.autoencoder
                            else torch.full((), float("nan"), device=loss_sum.device))
                self._transfer.start(torch.stack([loss_sum / count, accuracy.float()]), None)
        finally:
            model.train(training)
        self.seconds += time.perf_counter() - began

    def take(self) -> dict[str, float]:
        """``heldout_loss``/``heldout_accuracy`` of the newest evaluation that has landed and not
        been handed on yet; empty otherwise."""
        for _, values in self._transfer.poll():
            self._landed = {"heldout_loss": float(values[0]), "heldout_accuracy": float(values[1])}
        landed, self._landed = self._landed, {}
        return landed


class Trainer(threading.Thread):
    """Trains one preset until stopped (or ``max_steps``), emitting records to ``channel``."""

    def __init__(
        self,
        preset: Preset,
        channel: Channel,
        *,
        device: str = "cpu",
        run_id: int = 0,
        max_steps: int | None = None,
        start_paused: bool = False,
        data_root: Path | None = None,
        download: bool = False,
        overhead_budget: float | None = None,
        window: bool | None = None,
    ):
        super().__init__(name=f"vgtui-trainer-{run_id}", daemon=True)
        self.window = window
        self.overhead_budget = overhead_budget
        self.preset = preset
        self.channel = channel
        self.device_name = device
        self.run_id = run_id
        self.max_steps = max_steps
        self.data_root = data_root
        self.download = download
        self.commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self.paused = start_paused
        self.sample_every = preset.sample_every
        self.step = 0
        self._stop_requested = threading.Event()
        self._single_steps = 0
        self._budget: OverheadBudget | None = None
        self.heldout: HeldOut | None = None

    # -- controls (any thread) ------------------------------------------------------------------
    def pause(self) -> None:
        self.commands.put(("pause", None))

    def resume(self) -> None:
        self.commands.put(("resume", None))

    def single_step(self) -> None:
        self.commands.put(("step", None))

    def set_sample_every(self, every: int) -> None:
        self.commands.put(("sample_every", max(1, int(every))))

    def stop(self) -> None:
        self._stop_requested.set()
        self.commands.put(("stop", None))

    def stop_and_join(self, timeout: float = 5.0) -> None:
        self.stop()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    # -- the thread ------------------------------------------------------------------------------
    def _emit(self, record) -> None:
        self.channel.put(record)

    def _handle(self, command: str, value: object) -> None:
        if command == "pause" and not self.paused:
            self.paused = True
            self._emit(RunEvent("paused", step=self.step, run_id=self.run_id))
        elif command == "resume" and self.paused:
            self.paused = False
            self._emit(RunEvent("resumed", step=self.step, run_id=self.run_id))
        elif command == "step":
            self._single_steps += 1
        elif command == "sample_every":
            self.sample_every = int(value)
            if self._budget is not None:
                self._budget.floor = self.sample_every
        elif command == "stop":
            self._stop_requested.set()

    def _wait_for_work(self) -> bool:
        """Apply pending commands; while paused, block on the queue. False when stopping."""
        while True:
            try:
                block = self.paused and not self._single_steps and not self._stop_requested.is_set()
                command, value = self.commands.get(block=block, timeout=0.2 if block else None)
                self._handle(command, value)
                continue
            except queue.Empty:
                pass
            if self._stop_requested.is_set():
                return False
            if not self.paused or self._single_steps:
                return True

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # delivered as a record: never printed raw, never lost
            self._emit(RunError(f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                                step=self.step, run_id=self.run_id))

    def _run(self) -> None:
        device = resolve_device(self.device_name)
        preset = self.preset
        built = build_model(preset, device)
        data = make_data(preset.data, preset.seed, preset.batch_size, device, self.data_root, self.download,
                         seq_len=preset.seq_len)
        self.built = built
        header = RunHeader(
            preset=preset.to_dict(),
            layers=[layer.name for layer in built.layers],
            layer_kinds=[layer.act_kind for layer in built.layers],
            device=str(device),
            run_id=self.run_id,
            params=count_params(built.model),
        )
        # The overhead budget's clock: the probe charges its own work to it.
        clock = ProbeClock(device) if self.overhead_budget else None
        probe = Probe(built.layers, list(built.model.parameters()), detail_every=preset.detail_every,
                      owns_backward=self._uses_taps(built.model), window=self.window, clock=clock)
        missing_heldout = None
        if preset.eval_every:
            try:
                batches = heldout_batches(preset, preset.eval_batches, device, self.data_root, self.download)
                self.heldout = HeldOut(batches, built.loss_fn, built.task == "autoencoder", preset.eval_every)
            except DataError as exc:  # no test set beside the training files: train without it
                missing_heldout = f"no held-out evaluation: {exc}"
        header = dataclasses.replace(header, tied={k: list(v) for k, v in probe.layout.tied.items()})
        self._emit(header)
        self._emit(RunEvent("started", f"{preset.name} on {device}", run_id=self.run_id))
        if missing_heldout:
            self._emit(RunEvent("notice", missing_heldout, run_id=self.run_id))
        if self.paused:
            self._emit(RunEvent("paused", step=0, run_id=self.run_id))
        memory.freeze_long_lived()
        diagnoser = Diagnoser(header)
        if self.overhead_budget:
            self._budget = OverheadBudget(self.overhead_budget, self.sample_every)
        self._t0 = time.perf_counter()
        self._rate = float("nan")
        self._last_time = self._t0
        try:
            for phase, step_fn in self._phases(built, data, probe):
                while True:
                    if self.max_steps is not None and self.step >= self.max_steps:
                        self._emit(RunEvent("finished", f"{self.step} steps", self.step, self.run_id))
                        return
                    if not self._wait_for_work():
                        self._emit(RunEvent("stopped", step=self.step, run_id=self.run_id))
                        return
                    if self._single_steps:
                        self._single_steps -= 1
                    more = step_fn()
                    self._publish(probe, diagnoser)
                    self.step += 1
                    if self._budget is not None:
                        self.sample_every = self._budget.update(self.sample_every, clock.seconds())
                    now = time.perf_counter()
                    dt = now - self._last_time
                    self._last_time = now
                    self._rate = 1.0 / dt if self._rate != self._rate else 0.9 * self._rate + 0.1 / max(dt, 1e-9)
                    if not more:
                        break
        finally:
            self._publish(probe, diagnoser, wait=True)
            probe.detach()

    def _publish(self, probe: Probe, diagnoser: Diagnoser, wait: bool = False) -> None:
        """Emit every finished measurement, diagnosed; the probe's time (its clock runs)."""
        if not probe.pending:
            return
        with probe.timed():
            for record in probe.poll(wait=wait):
                self._emit(diagnoser.diagnose(record))

    def _evaluate(self, heldout: HeldOut, model: nn.Module) -> None:
        """A failing evaluation is reported once and turned off; training goes on."""
        try:
            heldout.evaluate(model)
        except Exception as exc:
            self.heldout = None
            self._emit(RunEvent("notice", f"held-out evaluation turned off: {type(exc).__name__}: {exc}",
                                step=self.step, run_id=self.run_id))

    def _meta(self, phase: str) -> dict:
        return {
            "phase": phase,
            "run_id": self.run_id,
            "time": time.perf_counter() - self._t0,
            "steps_per_sec": self._rate,
            "sample_every": self.sample_every,
            "probe_overhead": self._budget.share if self._budget is not None else float("nan"),
            **(self.heldout.take() if self.heldout is not None and phase == "train" else {}),
        }

    @staticmethod
    def _uses_taps(model: nn.Module) -> bool:
        """Whether the model reports its layers itself (``forward(x, taps=...)``, vgtui's MLPs):
        then no hooks and one ``autograd.grad`` call; any other model is measured through hooks."""
        try:
            return "taps" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return False

    def _phases(self, built: Built, data, probe: Probe):
        """(phase name, step function) pairs: optional layer-wise pre-training, then training."""
        preset = self.preset
        if preset.task == "autoencoder" and preset.pretrain_steps > 0:
            for index in range(len(built.model.encoder)):
                yield self._pretrain_phase(built, data, probe, index)
        yield "train", self._train_step_fn(built, data, probe)

    def _train_step_fn(self, built: Built, data, probe: Probe):
        preset = self.preset
        model = built.model
        optimizer = make_optimizer(model.parameters(), preset)
        autoencoder = built.task == "autoencoder"
        model.train()
        taps = self._uses_taps(model)
        if taps:
            probe.detach()  # the model reports its layers' outputs itself (taps): no hooks
        else:
            probe.attach()  # any other model: hooks, on sampled steps only

        def step() -> bool:
            x, y = data.batch(self.step)
            sampled = self.step % self.sample_every == 0
            heldout = self.heldout
            if heldout is not None and heldout.due(self.step):
                probe.begin(False)  # the held-out forward is not measured
                self._evaluate(heldout, model)  # with the weights this step's training loss is computed at
            probe.begin(sampled)
            optimizer.zero_grad(set_to_none=True)
            out = probe.forward(model, x) if taps else model(x)
            loss = built.loss_fn(out, x if autoencoder else y)
            probe.backward(loss)
            probe.after_backward()
            probe.clip(preset.clip, preset.clip_threshold)
            probe.count(self.step, loss)
            probe.before_step(optimizer)
            optimizer.step()
            if sampled:
                accuracy = None if autoencoder else (out.detach().argmax(1) == y).float().mean()
                probe.finish(self.step, loss, accuracy, optimizer, **self._meta("train"))
            return True

        return step

    def _pretrain_phase(self, built: Built, data, probe: Probe, index: int):
        """Greedy layer-wise pre-training of encoder layer ``index`` as a shallow autoencoder
        that reconstructs the (frozen) codes of the layers below it (Hinton & Salakhutdinov 2006).

        The shallow autoencoder's decoder is the deep autoencoder's own mirror layer (the head for
        the first layer, else the decoder block of the same widths), so that fine-tuning starts
        from the "unrolled" pre-trained stack, decoder included, as in Hinton & Salakhutdinov."""
        preset = self.preset
        model = built.model
        block = model.encoder[index]
        mirror = len(model.encoder) - 1 - index
        if mirror < len(model.decoder):
            decoder = model.decoder[mirror]  # Linear -> (BN) -> activation, widths out -> in
            squash = False
        else:
            decoder = model.head  # the deep model squashes the head's output with a sigmoid
            squash = True
        optimizer = make_optimizer(list(block.parameters()) + list(decoder.parameters()), preset)
        name = built.layers[index].name
        remaining = [preset.pretrain_steps]
        probe.attach()  # a shallow stack of the model's own modules: hooks find them

        def step() -> bool:
            x, _ = data.batch(self.step)
            sampled = self.step % self.sample_every == 0
            probe.begin(sampled)
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                target = model.encode(x, upto=index)
            recon = decoder(block(target))
            if squash:
                recon = torch.sigmoid(recon)
            loss = nn.functional.mse_loss(recon, target)
            probe.backward(loss)
            probe.after_backward()
            probe.clip(preset.clip, preset.clip_threshold)
            probe.count(self.step, loss)
            probe.before_step(optimizer)
            optimizer.step()
            if sampled:
                probe.finish(self.step, loss, None, optimizer, **self._meta(f"pretrain:{name}"))
            remaining[0] -= 1
            return remaining[0] > 0

        return f"pretrain:{name}", step


def run_to_completion(preset: Preset, steps: int, **options) -> list:
    """Train ``steps`` steps in a Trainer thread and return every record it produced, in order
    (for scripts and tests that want a whole short run; nothing is dropped)."""
    channel = Channel(maxlen=1_000_000)
    trainer = Trainer(preset, channel, max_steps=steps, **options)
    trainer.start()
    trainer.join()
    return channel.drain()


class TrainerController:
    """Owns the current Trainer thread and the channel; switching presets replaces the thread.

    The UI and the headless runner both drive training through this one object, so the rules
    (old thread stopped and joined before a new one starts, run ids increase) live in one place.
    """

    def __init__(self, channel: Channel | None = None, *, device: str = "cpu", data_root=None,
                 download: bool = False, max_steps: int | None = None,
                 overhead_budget: float | None = None):
        self.overhead_budget = overhead_budget
        self.channel = channel if channel is not None else Channel()
        self.device = device
        self.data_root = data_root
        self.download = download
        self.max_steps = max_steps
        self.trainer: Trainer | None = None
        self.run_id = 0

    def start(self, preset: Preset, paused: bool = False) -> Trainer:
        self.stop()
        self.run_id += 1
        self.trainer = Trainer(preset, self.channel, device=self.device, run_id=self.run_id,
                               max_steps=self.max_steps, start_paused=paused,
                               data_root=self.data_root, download=self.download,
                               overhead_budget=self.overhead_budget)
        self.trainer.start()
        return self.trainer

    def stop(self, timeout: float = 5.0) -> None:
        if self.trainer is not None:
            self.trainer.stop_and_join(timeout)

    @property
    def alive(self) -> bool:
        return self.trainer is not None and self.trainer.is_alive()
