"""Recordings: one JSON object per line, flushed as written, readable after a crash.

Line 1 is the header (``"type": "header"``), then one ``"step"`` line per sampled step, plus
``"event"`` and ``"error"`` lines. Non-finite floats are the strings "nan", "inf", "-inf" so that
every line is strict JSON; a value that was not measured is ``null`` (never "nan"). The reader keeps every good line and reports each bad one with its
line number instead of giving up on the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from .records import (
    LAYER_METRICS,
    Record,
    RunError,
    RunEvent,
    RunHeader,
    StepRecord,
    StepWindow,
    Verdict,
    jsonable,
    unjson,
)

FORMAT_VERSION = 1


def to_json(record: Record, layer_names: list[str] | None = None) -> dict:
    """The JSON object for one record (``layer_names`` is needed for step records)."""
    if isinstance(record, RunHeader):
        return {
            "type": "header",
            "version": FORMAT_VERSION,
            "preset": jsonable(record.preset),
            "layers": list(record.layers),
            "layer_kinds": list(record.layer_kinds),
            "device": record.device,
            "run_id": record.run_id,
            "params": record.params,
            "hist_edges": jsonable(record.hist_edges),
            "source": record.source,
        } | ({"tied": {k: list(v) for k, v in record.tied.items()}} if record.tied else {})
    if isinstance(record, StepRecord):
        count = len(record.layers[LAYER_METRICS[0]])
        names = layer_names or [f"layer{i}" for i in range(count)]
        unmeasured = {metric: record.unmeasured.get(metric) for metric in LAYER_METRICS}
        layers = {
            name: {metric: None if unmeasured[metric] is not None and unmeasured[metric][i]
                   else jsonable(record.layers[metric][i]) for metric in LAYER_METRICS}
            | ({"hist": jsonable(record.hist[i])} if record.hist is not None else {})
            | ({"time_act_grad_norm": jsonable(record.time_act_grad_norm[name])}
               if name in record.time_act_grad_norm else {})
            for i, name in enumerate(names)
        }
        extra = {}
        if record.window is not None:
            extra["window"] = jsonable(dataclasses.asdict(record.window))
        if not math.isnan(record.heldout_loss) or not math.isnan(record.heldout_accuracy):
            extra["heldout_loss"] = jsonable(record.heldout_loss)
            extra["heldout_accuracy"] = jsonable(record.heldout_accuracy)
        return {
            "type": "step",
            "step": record.step,
            "run_id": record.run_id,
            "phase": record.phase,
            "time": jsonable(record.time),
            "steps_per_sec": jsonable(record.steps_per_sec),
            "sample_every": record.sample_every,
            "probe_overhead": jsonable(record.probe_overhead),
            "loss": jsonable(record.loss),
            "accuracy": jsonable(record.accuracy),
            "grad_norm_total": jsonable(record.grad_norm_total),
            "grad_norm_clipped": jsonable(record.grad_norm_clipped),
            "clipped": record.clipped,
            "detail": record.detail,
            "nonfinite": list(record.nonfinite) if record.nonfinite else None,
            "layers": layers,
            "verdicts": [v.to_json() for v in record.verdicts],
        } | extra
    if isinstance(record, RunEvent):
        return {"type": "event", "kind": record.kind, "message": record.message,
                "step": record.step, "run_id": record.run_id}
    if isinstance(record, RunError):
        return {"type": "error", "message": record.message, "traceback": record.traceback,
                "step": record.step, "run_id": record.run_id}
    raise TypeError(f"not a record: {type(record).__name__}")


def from_json(data: dict, layer_names: list[str] | None) -> Record:
    """Inverse of :func:`to_json`. Raises KeyError/TypeError/ValueError on a malformed object."""
    kind = data["type"]
    if kind == "header":
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported format version {version!r} (this vgtui reads {FORMAT_VERSION})")
        layers = [str(n) for n in data["layers"]]
        return RunHeader(
            preset=unjson(data.get("preset", {})),
            layers=layers,
            layer_kinds=list(data.get("layer_kinds", ["linear"] * len(layers))),
            device=str(data.get("device", "?")),
            run_id=int(data.get("run_id", 0)),
            params=int(data.get("params", 0)),
            hist_edges=np.asarray(unjson(data["hist_edges"]), dtype=float) if "hist_edges" in data
            else RunHeader.__dataclass_fields__["hist_edges"].default_factory(),
            source=str(data.get("source", "vgtui")),
            tied={str(k): [str(n) for n in v] for k, v in data.get("tied", {}).items()},
        )
    if kind == "step":
        names = layer_names if layer_names is not None else list(data["layers"])
        per_layer = data["layers"]
        if set(per_layer) != set(names):
            raise ValueError("step layers do not match the header's layers")
        columns, unmeasured = {}, {}
        for metric in LAYER_METRICS:
            raw = [per_layer[n].get(metric, "nan") for n in names]
            columns[metric] = np.array([_num(v) for v in raw], dtype=float)
            missing = np.array([v is None for v in raw], dtype=bool)
            if missing.any():
                unmeasured[metric] = missing
        time_grads = {n: np.asarray(unjson(per_layer[n]["time_act_grad_norm"]), dtype=float)
                      for n in names if per_layer[n].get("time_act_grad_norm") is not None}
        window = data.get("window")
        hist = None
        if names and all("hist" in per_layer[n] for n in names):
            rows = [unjson(per_layer[n]["hist"]) for n in names]
            if len({len(r) for r in rows}) != 1:
                raise ValueError("histograms of different lengths")
            hist = np.array(rows, dtype=float).reshape(len(names), len(rows[0]))
        nonfinite = data.get("nonfinite")
        return StepRecord(
            step=int(data["step"]),
            loss=_num(data["loss"]),
            accuracy=_num(data.get("accuracy", "nan")),
            grad_norm_total=_num(data.get("grad_norm_total", "nan")),
            grad_norm_clipped=_num(data.get("grad_norm_clipped", "nan")),
            clipped=bool(data.get("clipped", False)),
            layers=columns,
            hist=hist,
            detail=bool(data.get("detail", hist is not None)),
            nonfinite=(str(nonfinite[0]), str(nonfinite[1])) if nonfinite else None,
            phase=str(data.get("phase", "train")),
            run_id=int(data.get("run_id", 0)),
            time=_num(data.get("time", 0.0)),
            steps_per_sec=_num(data.get("steps_per_sec", "nan")),
            sample_every=int(data.get("sample_every", 1)),
            probe_overhead=_num(data.get("probe_overhead", "nan")),
            verdicts=[Verdict.from_json(v) for v in data.get("verdicts", [])],
            unmeasured=unmeasured,
            time_act_grad_norm=time_grads,
            window=StepWindow(**unjson(window)) if window else None,
            heldout_loss=_num(data.get("heldout_loss", "nan")),
            heldout_accuracy=_num(data.get("heldout_accuracy", "nan")),
        )
    if kind == "event":
        return RunEvent(str(data["kind"]), str(data.get("message", "")), int(data.get("step", 0)),
                        int(data.get("run_id", 0)))
    if kind == "error":
        return RunError(str(data["message"]), str(data.get("traceback", "")), int(data.get("step", 0)),
                        int(data.get("run_id", 0)))
    raise ValueError(f"unknown record type {kind!r}")


def _num(value) -> float:
    value = unjson(value)
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


class JsonlWriter:
    """Appends records to a file, one line each, flushed per line (a killed run loses nothing
    finished). ``fsync_every`` lines also reach the disk, for runs that may lose power."""

    def __init__(self, path: str | Path, fsync_every: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(self.path, "w", encoding="utf-8")
        self._layers: dict[int, list[str]] = {}
        self._fsync_every = fsync_every
        self.lines = 0

    def write(self, record: Record) -> None:
        if isinstance(record, RunHeader):
            self._layers[record.run_id] = list(record.layers)
        names = self._layers.get(getattr(record, "run_id", 0))
        line = json.dumps(to_json(record, names), separators=(",", ":"), allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()
        self.lines += 1
        if self._fsync_every and self.lines % self._fsync_every == 0:
            os.fsync(self._file.fileno())

    def write_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: what is wrong"


class JsonlReader:
    """Reads a recording incrementally: call :meth:`read_new` again to pick up appended lines.

    A last line without its newline is left for the next call (the writer may be mid-line);
    :meth:`finish` then judges it: a truncated last line is reported, not fatal.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._line_no = 0
        self._partial = b""
        self._layers: dict[int, list[str]] = {}

    def read_new(self) -> ReadResult:
        result = ReadResult()
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return result
        if not chunk:
            return result
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._line_no += 1
            self._parse(raw, self._line_no, result)
        return result

    def finish(self) -> ReadResult:
        """Read what is left, including a final line with no newline."""
        result = self.read_new()
        if self._partial.strip():
            self._line_no += 1
            raw, self._partial = self._partial, b""
            self._parse(raw, self._line_no, result, last=True)
        return result

    def _parse(self, raw: bytes, line_no: int, result: ReadResult, last: bool = False) -> None:
        if not raw.strip():
            return
        where = f"{self.path}:{line_no}"
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or "type" not in data:
                raise ValueError("not a record object")
            run_id = int(data.get("run_id", 0))
            record = from_json(data, self._layers.get(run_id))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, IndexError) as exc:
            if isinstance(exc, json.JSONDecodeError) and last:
                result.problems.append(f"{where}: truncated last line skipped")
            else:
                result.problems.append(f"{where}: skipped ({exc})")
            return
        if isinstance(record, RunHeader):
            self._layers[record.run_id] = record.layers
        elif isinstance(record, StepRecord) and record.run_id not in self._layers:
            result.problems.append(f"{where}: step before any header skipped")
            return
        result.records.append(record)


def read_recording(path: str | Path) -> ReadResult:
    """Every good record of a finished (or killed) recording, and what was wrong with the rest."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such recording")
    return JsonlReader(path).finish()


def iter_steps(records: Iterable[Record]) -> Iterator[StepRecord]:
    return (r for r in records if isinstance(r, StepRecord))
