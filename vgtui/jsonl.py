"""Recordings: one JSON object per line, written a line at a time, readable after a crash.

Line 1 is the header (``"type": "header"``), then one ``"step"`` line per sampled step, plus
``"event"`` and ``"error"`` lines. Non-finite floats are the strings "nan", "inf", "-inf" so that
every line is strict JSON; a value that was not measured is ``null`` (never "nan"). The reader
keeps every good line and reports each bad one with its line number instead of giving up.

Format version 2 (written since long runs had to fit on disk) stores a step's per-layer values as
columns, ``"columns": {metric: [one value per layer]}``, and a column that is the same for every
layer as that one value (``"act_mean": null``: no layer measured). Numbers keep the digits that
carry information: per-layer values and verdict evidence 4 significant digits, global gradient
norms 6, loss and accuracy 7, histogram counts as integers. ``"window"`` is a list in the order
the header's ``"window_fields"`` names. Version 1 files (a dict per layer, full precision) are
still read, and :class:`JsonlWriter` can still write them (``version=1``).

A path ending in ``.gz`` is written as a series of complete gzip members, one per flush, so
``zcat`` and this reader see every flushed line of a killed run. Step lines are flushed by the
first write :data:`GZIP_FLUSH_SECONDS` after them (or at :data:`GZIP_FLUSH_BYTES`), headers,
events and errors at once, everything on close. Gzip is recognised by its first bytes when read.

Long recordings are read without loading them: :func:`iter_records` streams, and
:class:`RecordingIndex` finds every line in one pass (step number, run, detail and non-finite
flags from each line's first bytes, no parsing) and parses a step record only when asked for it.
"""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import json
import math
import os
import re
import time
import zlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import numpy as np

from .records import (
    ACT_PERCENTILE_METRICS,
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

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

#: Significant digits kept by format version 2 (the rest is measurement noise).
LAYER_DIGITS = 4  # per-layer norms and statistics, ‖∂L/∂h_t‖, verdict evidence
NORM_DIGITS = 6  # the global gradient norm before and after clipping
LOSS_DIGITS = 7  # loss, accuracy and their held-out twins: a plateau shows in the 5th digit

#: Fields of :class:`StepWindow` in the order version 2 lists them (the header names them).
WINDOW_FIELDS = tuple(f.name for f in dataclasses.fields(StepWindow))
_WINDOW_DIGITS = {name: LOSS_DIGITS if name.startswith("loss") else NORM_DIGITS for name in WINDOW_FIELDS}

#: A gzip recording is flushed as a complete member at least this often (seconds) ...
GZIP_FLUSH_SECONDS = 1.0
#: ... or when this many uncompressed bytes are waiting.
GZIP_FLUSH_BYTES = 256 * 1024

_CHUNK = 1 << 20
_GZIP_READ = 1 << 16  # compressed bytes read at a time (a checkpoint may fall between two reads)
_INF = float("inf")


class RecordingError(OSError):
    """Writing a recording failed (disk full, quota, I/O error). The file keeps every complete
    line written before the failure and nothing after it; ``errno`` is the original one."""


# -- encoding ---------------------------------------------------------------------------------------
def _fixed(value, digits: int):
    """``value`` rounded to ``digits`` significant digits, or its non-finite string."""
    value = float(value)
    if value != value:
        return "nan"
    if value == _INF or value == -_INF:
        return "inf" if value > 0 else "-inf"
    return float(f"{value:.{digits}g}")


def _fixed_list(values: np.ndarray, digits: int) -> list:
    spec = f"%.{digits}g"
    if np.isfinite(values).all():
        return [float(spec % v) for v in values.tolist()]
    return [_fixed(v, digits) for v in values.tolist()]


def _column(values: np.ndarray, unmeasured: np.ndarray | None, digits: int = LAYER_DIGITS):
    """A metric's column: a list, or one value standing for every layer (``null``: none measured)."""
    out = _fixed_list(np.asarray(values, dtype=float), digits)
    if unmeasured is not None and unmeasured.any():
        out = [None if missing else v for v, missing in zip(out, unmeasured.tolist())]
    if len(out) > 1 and all(v == out[0] for v in out) and (out[0] is None or isinstance(out[0], str)):
        return out[0]
    return out


def _omitted(record: StepRecord, metric: str) -> bool:
    """A percentile column measured for no layer (every step but the detail ones) is left out:
    readers take an absent column as not measured, and older readers never knew the metric."""
    if metric not in ACT_PERCENTILE_METRICS:
        return False
    mask = record.unmeasured.get(metric)
    return metric not in record.layers or (mask is not None and bool(mask.all()))


def _counts(hist: np.ndarray) -> list:
    """Histogram rows as integers when they are counts (they are), else rounded floats."""
    if np.isfinite(hist).all() and (hist == np.round(hist)).all():
        return hist.astype(np.int64).tolist()
    return [_fixed_list(row, LAYER_DIGITS) for row in hist]


def _evidence(value):
    if isinstance(value, (float, np.floating)):
        return _fixed(value, LAYER_DIGITS)
    if isinstance(value, np.ndarray):
        return _evidence(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_evidence(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _evidence(v) for k, v in value.items()}
    return jsonable(value)


def _header_json(record: RunHeader, version: int) -> dict:
    data = {
        "type": "header",
        "version": version,
        "preset": jsonable(record.preset),
        "layers": list(record.layers),
        "layer_kinds": list(record.layer_kinds),
        "device": record.device,
        "run_id": record.run_id,
        "params": record.params,
        "hist_edges": jsonable(record.hist_edges),
        "source": record.source,
    }
    if version >= 2:
        data["window_fields"] = list(WINDOW_FIELDS)
    return data | ({"tied": {k: list(v) for k, v in record.tied.items()}} if record.tied else {})


def _step_json_v2(record: StepRecord) -> dict:
    # The keys up to "nonfinite" come first and in this order: RecordingIndex reads them from
    # each line's first bytes without parsing the line.
    data = {
        "type": "step",
        "step": record.step,
        "run_id": record.run_id,
        "phase": record.phase,
        "detail": record.detail,
        "nonfinite": list(record.nonfinite) if record.nonfinite else None,
        "time": _fixed(round(record.time, 3), 15),
        "steps_per_sec": _fixed(record.steps_per_sec, LAYER_DIGITS),
        "sample_every": record.sample_every,
        "probe_overhead": _fixed(record.probe_overhead, 3),
        "loss": _fixed(record.loss, LOSS_DIGITS),
        "accuracy": _fixed(record.accuracy, LOSS_DIGITS),
        "grad_norm_total": _fixed(record.grad_norm_total, NORM_DIGITS),
        "grad_norm_clipped": _fixed(record.grad_norm_clipped, NORM_DIGITS),
        "clipped": record.clipped,
        "columns": {metric: _column(record.layers[metric], record.unmeasured.get(metric))
                    for metric in LAYER_METRICS if not _omitted(record, metric)},
    }
    if record.hist is not None:
        data["hist"] = _counts(np.asarray(record.hist, dtype=float))
    if record.time_act_grad_norm:
        data["time_act_grad_norm"] = {name: _fixed_list(np.asarray(v, dtype=float), LAYER_DIGITS)
                                      for name, v in record.time_act_grad_norm.items()}
    data["verdicts"] = [v.to_json() | {"evidence": _evidence(v.evidence)} for v in record.verdicts]
    if record.window is not None:
        data["window"] = [_fixed(v, _WINDOW_DIGITS[name]) if isinstance(v, float) else v
                          for name, v in ((n, getattr(record.window, n)) for n in WINDOW_FIELDS)]
    if not math.isnan(record.heldout_loss) or not math.isnan(record.heldout_accuracy):
        data["heldout_loss"] = _fixed(record.heldout_loss, LOSS_DIGITS)
        data["heldout_accuracy"] = _fixed(record.heldout_accuracy, LOSS_DIGITS)
    return data


def _step_json_v1(record: StepRecord, layer_names: list[str] | None) -> dict:
    count = len(record.layers[LAYER_METRICS[0]])
    names = layer_names or [f"layer{i}" for i in range(count)]
    metrics = [metric for metric in LAYER_METRICS if not _omitted(record, metric)]
    unmeasured = {metric: record.unmeasured.get(metric) for metric in metrics}
    layers = {
        name: {metric: None if unmeasured[metric] is not None and unmeasured[metric][i]
               else jsonable(record.layers[metric][i]) for metric in metrics}
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


def to_json(record: Record, layer_names: list[str] | None = None, version: int = FORMAT_VERSION) -> dict:
    """The JSON object for one record (version 1 needs ``layer_names`` for step records)."""
    if version not in READABLE_VERSIONS:
        raise ValueError(f"cannot write format version {version!r}")
    if isinstance(record, RunHeader):
        return _header_json(record, version)
    if isinstance(record, StepRecord):
        return _step_json_v2(record) if version >= 2 else _step_json_v1(record, layer_names)
    if isinstance(record, RunEvent):
        return {"type": "event", "kind": record.kind, "message": record.message,
                "step": record.step, "run_id": record.run_id}
    if isinstance(record, RunError):
        return {"type": "error", "message": record.message, "traceback": record.traceback,
                "step": record.step, "run_id": record.run_id}
    raise TypeError(f"not a record: {type(record).__name__}")


# -- decoding ---------------------------------------------------------------------------------------
def from_json(data: dict, layer_names: list[str] | None, window_fields: Sequence[str] | None = None) -> Record:
    """Inverse of :func:`to_json`, either version. Raises KeyError/TypeError/ValueError on a
    malformed object. ``window_fields``: the header's order of a version 2 ``"window"`` list."""
    kind = data["type"]
    if kind == "header":
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported format version {version!r} "
                             f"(this vgtui reads {', '.join(map(str, READABLE_VERSIONS))})")
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
        if "columns" in data:
            if layer_names is None:  # no header: as many layers as the first list says
                lists = [c for c in (data["columns"] or {}).values() if isinstance(c, list)]
                layer_names = [f"layer{i}" for i in range(len(lists[0]) if lists else 0)]
            columns, unmeasured, hist, time_grads = _columns_v2(data, layer_names)
        else:
            names = layer_names if layer_names is not None else list(data["layers"])
            columns, unmeasured, hist, time_grads = _columns_v1(data, names)
        window = data.get("window")
        if isinstance(window, list):
            window = dict(zip(window_fields or WINDOW_FIELDS, unjson(window)))
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
            window=StepWindow(**{k: unjson(v) for k, v in window.items() if k in WINDOW_FIELDS})
            if window else None,
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


def _columns_v1(data: dict, names: list[str]):
    per_layer = data["layers"]
    if set(per_layer) != set(names):
        raise ValueError("step layers do not match the header's layers")
    columns, unmeasured = {}, {}
    for metric in LAYER_METRICS:
        raw = [per_layer[n].get(metric) for n in names]  # absent (older recordings): not measured
        columns[metric] = np.array([_num(v) for v in raw], dtype=float)
        missing = np.array([v is None for v in raw], dtype=bool)
        if missing.any():
            unmeasured[metric] = missing
    time_grads = {n: np.asarray(unjson(per_layer[n]["time_act_grad_norm"]), dtype=float)
                  for n in names if per_layer[n].get("time_act_grad_norm") is not None}
    hist = None
    if names and all("hist" in per_layer[n] for n in names):
        rows = [unjson(per_layer[n]["hist"]) for n in names]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("histograms of different lengths")
        hist = np.array(rows, dtype=float).reshape(len(names), len(rows[0]))
    return columns, unmeasured, hist, time_grads


def _columns_v2(data: dict, names: list[str]):
    count = len(names)
    raw_columns = data["columns"]
    if not isinstance(raw_columns, dict):
        raise TypeError("columns is not an object")
    columns, unmeasured = {}, {}
    for metric in LAYER_METRICS:
        raw = raw_columns.get(metric)  # absent (a recording older than the metric): not measured
        if isinstance(raw, list):
            values = _floats(raw)  # None -> nan (and marked below), "nan"/"inf" parsed
            if values.shape != (count,):
                raise ValueError(f"{metric}: {len(raw)} values for {count} layers")
            columns[metric] = values
            if np.isnan(values).any() and None in raw:
                unmeasured[metric] = np.array([v is None for v in raw], dtype=bool)
        else:
            columns[metric] = np.full(count, _num(raw), dtype=float)
            if raw is None:
                unmeasured[metric] = np.ones(count, dtype=bool)
    hist = None
    if data.get("hist") is not None:
        hist = _floats(data["hist"])
        if hist.ndim != 2 or hist.shape[0] != count:
            raise ValueError("histograms do not match the header's layers")
    time_grads = {str(n): _floats(v) for n, v in (data.get("time_act_grad_norm") or {}).items()}
    return columns, unmeasured, hist, time_grads


def _floats(raw) -> np.ndarray:
    """A JSON list (of lists) of numbers, "nan"/"inf"/"-inf" and nulls as a float array."""
    if not isinstance(raw, list):
        raise TypeError(f"expected a list of numbers, got {type(raw).__name__}")
    return np.array(raw, dtype=float)


def _num(value) -> float:
    value = unjson(value)
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


# -- writing ----------------------------------------------------------------------------------------
class JsonlWriter:
    """Appends records to a file, one line each, each line handed to the OS in one write (a
    killed run loses nothing finished). ``fsync_every`` lines also reach the disk, for runs that
    may lose power. A ``.gz`` path (or ``compress=True``) is written as gzip members, see the
    module docstring.

    Failure (disk full, any OSError): the file is cut back to its last complete line (gzip: last
    complete member), :attr:`error` keeps a :class:`RecordingError` (an OSError, the original
    errno) and it is raised from that :meth:`write` / :meth:`flush` and from every later one.
    Callers catch OSError, say so once, and carry on without the recording. :meth:`close` never
    raises: after it, :attr:`error` (or :attr:`failed`) tells whether the recording is complete.
    """

    def __init__(self, path: str | Path, fsync_every: int = 0, *, compress: bool | None = None,
                 version: int = FORMAT_VERSION):
        if version not in READABLE_VERSIONS:
            raise ValueError(f"cannot write format version {version!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.compress = self.path.suffix == ".gz" if compress is None else bool(compress)
        self.version = version
        self._file: IO[bytes] = open(self.path, "wb", buffering=0)
        self._layers: dict[int, list[str]] = {}
        self._fsync_every = fsync_every
        self._pending: list[bytes] = []  # gzip: lines waiting for the next member
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._good = 0  # bytes of the file that hold complete lines (members)
        self.error: RecordingError | None = None
        self.lines = 0

    @property
    def failed(self) -> bool:
        return self.error is not None

    def write(self, record: Record) -> None:
        if self.error is not None:
            raise self.error
        if isinstance(record, RunHeader):
            self._layers[record.run_id] = list(record.layers)
        names = self._layers.get(getattr(record, "run_id", 0))
        data = to_json(record, names, self.version)
        line = (json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")
        if self.compress:
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(line)
            self._pending_bytes += len(line)
            if (self._pending_bytes >= GZIP_FLUSH_BYTES or not isinstance(record, StepRecord)
                    or time.monotonic() - self._pending_since >= GZIP_FLUSH_SECONDS):
                self.flush()
        else:
            self._put(line)
        self.lines += 1
        if self._fsync_every and self.lines % self._fsync_every == 0:
            self.flush()
            self._sync()

    def flush(self) -> None:
        """Gzip: write the waiting lines as one complete member now (plain files have none)."""
        if self._pending and self.error is None:
            member = gzip.compress(b"".join(self._pending), compresslevel=6, mtime=0)
            self._pending, self._pending_bytes = [], 0
            self._put(member)

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = self._file.write(view)
                view = view[written:]
        except OSError as exc:
            self._fail(exc)
        self._good += len(data)

    def _sync(self) -> None:
        try:
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        try:  # never leave half a line behind
            os.ftruncate(self._file.fileno(), self._good)
        except OSError:
            pass
        self.error = RecordingError(exc.errno, f"cannot write the recording ({exc.strerror or exc})",
                                    str(self.path))
        self._pending, self._pending_bytes = [], 0
        raise self.error from exc

    def write_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        """Flush and close. Never raises (closing runs on the way out of the user's loop): when
        this last gzip flush fails, the file keeps its complete members and :attr:`error` says why."""
        if self._file.closed:
            return
        try:
            self.flush()
        except RecordingError:
            pass  # kept in self.error
        finally:
            try:
                self._file.close()
            except OSError:
                pass

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- reading: bytes ---------------------------------------------------------------------------------
def is_gzip(path: str | Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"\x1f\x8b"
    except OSError:
        return False


class _Inflater:
    """Streaming gunzip across members: feed compressed bytes, get the bytes they decode to."""

    def __init__(self, state=None):
        self._d = state if state is not None else zlib.decompressobj(31)
        self.fed = False  # bytes of the current member seen (False: between members)

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            self.fed = True
            out.append(self._d.decompress(data))
            if self._d.eof:
                data = self._d.unused_data
                self._d = zlib.decompressobj(31)
                self.fed = False
            else:
                data = b""
        return b"".join(out)

    def state(self):
        return self._d.copy()


class _PlainBytes:
    def __init__(self, path: Path):
        self.path = path

    def read_ranges(self, ranges: list[tuple[int, int]]) -> Iterator[bytes]:
        """The bytes of each (start, end), in the order given (sorted by start)."""
        with open(self.path, "rb") as handle:
            for start, end in ranges:
                handle.seek(start)
                yield handle.read(end - start)


class _GzipBytes:
    """Random reads of a gzip file's decoded bytes: the index pass leaves a decompressor
    checkpoint every :attr:`SPACING` decoded bytes; a read starts at the one before it (the idea
    of zlib's zran.c)."""

    SPACING = 2 << 20

    def __init__(self, path: Path):
        self.path = path
        self._points: list[tuple[int, int, object]] = []  # (decoded offset, file offset, state)
        self._starts: list[int] = []
        self._walk: tuple = (None, 0, 0, b"")  # where read_ranges stopped

    def checkpoint(self, decoded: int, offset: int, state) -> None:
        if not self._starts or decoded - self._starts[-1] >= self.SPACING:
            self._points.append((decoded, offset, state))
            self._starts.append(decoded)

    def read_ranges(self, ranges: list[tuple[int, int]]) -> Iterator[bytes]:
        """The decoded bytes of each (start, end), sorted by start, in one forward walk that jumps
        to a later checkpoint only where that skips decoding. The walk is kept for the next call:
        stepping forward record by record decodes each byte once."""
        with open(self.path, "rb") as handle:
            inflater, offset, have, pending = self._walk  # pending: decoded bytes from ``have`` on
            for start, end in ranges:
                point = max(0, bisect.bisect_right(self._starts, start) - 1)
                if inflater is None or start < have or self._starts[point] > have + len(pending):
                    have, offset, state = self._points[point]
                    inflater, pending = _Inflater(state.copy() if state is not None else None), b""
                handle.seek(offset)
                while have + len(pending) < end:
                    raw = handle.read(_GZIP_READ)
                    if not raw:
                        break
                    offset += len(raw)
                    out = inflater.feed(raw)
                    if have + len(pending) + len(out) <= start:
                        have, pending = have + len(pending) + len(out), b""
                    else:
                        pending += out
                cut = max(0, start - have)
                pending, have = pending[cut:], have + cut
                self._walk = (inflater, offset, have, pending)
                yield pending[:end - start]


def _decoded_chunks(path: Path, inflater: _Inflater | None = None,
                    gz: _GzipBytes | None = None) -> Iterator[tuple[int, bytes]]:
    """(file bytes read so far, the bytes they decode to) a chunk at a time (decoded when
    ``inflater`` is given, leaving ``gz`` a checkpoint now and then)."""
    decoded = 0
    with open(path, "rb") as handle:
        while True:
            if gz is not None:
                gz.checkpoint(decoded, handle.tell(), inflater.state() if inflater.fed else None)
            raw = handle.read(_CHUNK if inflater is None else _GZIP_READ)
            if not raw:
                return
            out = raw if inflater is None else inflater.feed(raw)
            decoded += len(out)
            yield handle.tell(), out


# -- reading: records -------------------------------------------------------------------------------
@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: what is wrong"


class _Parser:
    """Line -> record, with the per-run state a step line needs (its header's layer names)."""

    def __init__(self, path: Path):
        self.path = path
        self.layers: dict[int, list[str]] = {}
        self.window_fields: dict[int, list[str]] = {}

    def parse(self, raw: bytes, line_no: int, problems: list[str], last: bool = False) -> Record | None:
        where = f"{self.path}:{line_no}"
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or "type" not in data:
                raise ValueError("not a record object")
            run_id = int(data.get("run_id", 0))
            record = from_json(data, self.layers.get(run_id), self.window_fields.get(run_id))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, IndexError) as exc:
            if isinstance(exc, json.JSONDecodeError) and last:
                problems.append(f"{where}: truncated last line skipped")
            else:
                problems.append(f"{where}: skipped ({exc})")
            return None
        if isinstance(record, RunHeader):
            self.layers[record.run_id] = record.layers
            self.window_fields[record.run_id] = list(data.get("window_fields", WINDOW_FIELDS))
        elif isinstance(record, StepRecord) and record.run_id not in self.layers:
            problems.append(f"{where}: step before any header skipped")
            return None
        return record


class JsonlReader:
    """Reads a recording incrementally: call :meth:`read_new` again to pick up appended lines.

    A last line without its newline is left for the next call (the writer may be mid-line);
    :meth:`finish` then judges it: a truncated last line is reported, not fatal. Gzip files are
    followed too (complete members as they arrive).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0  # bytes of the file consumed (compressed bytes for gzip)
        self._line_no = 0
        self._partial = b""
        self._inflater: _Inflater | None = None
        self._gzip: bool | None = None
        self._parser = _Parser(self.path)

    def resume(self, index: "RecordingIndex") -> None:
        """Go on after the lines ``index`` (built with ``growing=True``) covers."""
        self._offset, self._partial, inflater, fed = index.resume_at
        self._gzip, self._line_no = index.gzip, index.lines
        self._inflater = None
        if inflater is not None:
            self._inflater = _Inflater(inflater.state())
            self._inflater.fed = fed
        for header in index.headers.values():
            self._parser.layers[header.run_id] = header.layers
        self._parser.window_fields.update(index.window_fields)

    def iter_new(self, problems: list[str], final: bool = False) -> Iterator[Record]:
        """Records of the lines appended since the last call, streamed; problems go to ``problems``."""
        if self._gzip is None:
            if not self.path.exists() or self.path.stat().st_size < 2:
                if not final:
                    return
            self._gzip = is_gzip(self.path)
            self._inflater = _Inflater() if self._gzip else None
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return
        with handle:
            handle.seek(self._offset)
            while True:
                raw = handle.read(_CHUNK)
                if not raw:
                    break
                self._offset += len(raw)
                try:
                    data = self._inflater.feed(raw) if self._inflater is not None else raw
                except zlib.error as exc:
                    problems.append(f"{self.path}: compressed data damaged after byte "
                                    f"{self._offset - len(raw)} ({exc}); the rest is skipped")
                    self._offset = handle.seek(0, os.SEEK_END)
                    self._inflater = _Inflater()
                    break
                lines = (self._partial + data).split(b"\n")
                self._partial = lines.pop()
                for line in lines:
                    self._line_no += 1
                    if line.strip():
                        record = self._parser.parse(line, self._line_no, problems)
                        if record is not None:
                            yield record
        if final:
            if self._partial.strip():
                self._line_no += 1
                raw, self._partial = self._partial, b""
                record = self._parser.parse(raw, self._line_no, problems, last=True)
                if record is not None:
                    yield record
            if self._inflater is not None and self._inflater.fed:
                problems.append(f"{self.path}: the compressed data ends early (a killed writer?); "
                                "everything up to there was read")
                self._inflater = _Inflater()

    def read_new(self) -> ReadResult:
        result = ReadResult()
        result.records = list(self.iter_new(result.problems))
        return result

    def finish(self) -> ReadResult:
        """Read what is left, including a final line with no newline."""
        result = ReadResult()
        result.records = list(self.iter_new(result.problems, final=True))
        return result


def read_recording(path: str | Path) -> ReadResult:
    """Every good record of a finished (or killed) recording, and what was wrong with the rest.
    Holds the whole recording: long ones are better streamed (:func:`iter_records`) or indexed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such recording")
    return JsonlReader(path).finish()


def iter_records(path: str | Path, problems: list[str] | None = None) -> Iterator[Record]:
    """Every good record of a recording, one at a time (bounded memory); what was wrong with the
    rest is appended to ``problems``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such recording")
    yield from JsonlReader(path).iter_new(problems if problems is not None else [], final=True)


def iter_steps(records: Iterable[Record]) -> Iterator[StepRecord]:
    return (r for r in records if isinstance(r, StepRecord))


# -- reading: an index ------------------------------------------------------------------------------
HEADER, STEP, EVENT, ERROR = 0, 1, 2, 3
DETAIL, NONFINITE = 1, 2  # RecordingIndex.flags bits

_STEP_PREFIX = re.compile(rb'\{"type":"step","step":(-?\d+),"run_id":(-?\d+),')
_STEP_V2 = re.compile(rb'\{"type":"step","step":(-?\d+),"run_id":(-?\d+),"phase":"(?:[^"\\\n]|\\.)*",'
                      rb'"detail":(true|false),"nonfinite":(null|\[)')
_DETAIL = re.compile(rb'"detail":(true|false)')
_NONFINITE = re.compile(rb'"nonfinite":(null|\[)')


class RecordingIndex:
    """Where each record of a recording is, found in one streaming pass, so that any record can be
    read back in milliseconds without holding the file.

    Per record (ordinal = its place among the good records): the byte range of its line (decoded
    bytes for gzip), its line number, kind, step, run id and flags (:data:`DETAIL`,
    :data:`NONFINITE`). Step lines written by vgtui (either version) are recognised from their
    first bytes and parsed only when read; headers, events and errors (few) are parsed and kept.
    A step line that is damaged after its first bytes is found when it is read: :meth:`record`
    then returns None and adds the line to :attr:`problems`.
    """

    #: The scan keeps between SAMPLE and 2 x SAMPLE evenly spaced step lines (overviews read them).
    SAMPLE = 1000

    def __init__(self, path: str | Path, cache: int = 4096, *, growing: bool = False):
        self.path = Path(path)
        self.growing = growing  # a writer may be mid-line: leave a last line without newline alone
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such recording")
        self.problems: list[str] = []
        self.gzip = is_gzip(self.path)
        self._bytes = _GzipBytes(self.path) if self.gzip else _PlainBytes(self.path)
        self._parser = _Parser(self.path)
        self._kept: dict[int, Record] = {}  # headers, events, errors by ordinal
        self._cache: OrderedDict[int, Record | None] = OrderedDict()
        self._cache_size = cache
        self._build()

    def _build(self) -> None:
        starts, lengths, line_nos = array("q"), array("l"), array("l")
        kinds, steps, runs, flags = array("b"), array("q"), array("q"), array("b")
        inflater = _Inflater() if self.gzip else None
        offset, line_no, partial, raw_end = 0, 0, b"", 0
        parser = self._parser
        known_runs: set[int] = set()
        match_step, find_detail, find_nonfinite = _STEP_PREFIX.match, _DETAIL.search, _NONFINITE.search
        match_v2, finditer_v2 = _STEP_V2.match, _STEP_V2.finditer
        sampled: dict[int, tuple[int, bytes]] = {}  # ordinal -> (position, line): every stride-th step
        stride, n_steps = 1, 0

        def sample(position: int, ordinal: int, data: bytes, at: int, end: int) -> None:
            """Keep every ``stride``-th step line (at most 2 x SAMPLE of them), for overviews that
            need no second pass over the file."""
            nonlocal stride
            if position % stride:
                return
            sampled[ordinal] = (position, data[at:end])
            if len(sampled) > 2 * self.SAMPLE:
                stride *= 2
                for key in [k for k, (kept_at, _) in sampled.items() if kept_at % stride]:
                    del sampled[key]

        def add(data: bytes, at: int, end: int, base: int, last: bool = False) -> None:
            """The line data[at:end] (starting at byte ``base + at``); step lines are not copied."""
            nonlocal line_no, n_steps
            line_no += 1
            if end > at and data[end - 1] == 0x7D:  # "}": a complete line as vgtui writes them
                m = match_v2(data, at, end)
                if m is not None:
                    step, run_id, detail, nonfinite = m.groups()
                else:
                    m = match_step(data, at, end)
                    found = m and find_detail(data, at, end), m and find_nonfinite(data, at, end)
                    if m is not None and None not in found:
                        (step, run_id), detail, nonfinite = m.groups(), found[0].group(1), found[1].group(1)
                    else:
                        m = None
                if m is not None:
                    run_id = int(run_id)
                    if run_id not in known_runs:
                        self.problems.append(f"{self.path}:{line_no}: step before any header skipped")
                        return
                    sample(n_steps, len(kinds), data, at, end)
                    n_steps += 1
                    starts.append(base + at), lengths.append(end - at), line_nos.append(line_no)
                    kinds.append(STEP), steps.append(int(step)), runs.append(run_id)
                    flags.append((DETAIL if detail[0] == 0x74 else 0)  # "t"rue
                                 | (NONFINITE if nonfinite == b"[" else 0))
                    return
            line = data[at:end]
            if not line.strip():
                return
            start = base + at
            record = parser.parse(line, line_no, self.problems, last=last)
            if record is None:
                return
            ordinal = len(kinds)
            starts.append(start), lengths.append(len(line)), line_nos.append(line_no)
            run_id = getattr(record, "run_id", 0)
            if isinstance(record, StepRecord):  # a step line in another layout: keep it parsed
                n_steps += 1
                kinds.append(STEP), steps.append(record.step)
                flags.append((DETAIL if record.detail else 0) | (NONFINITE if record.nonfinite else 0))
            else:
                if isinstance(record, RunHeader):
                    known_runs.add(run_id)
                kinds.append(HEADER if isinstance(record, RunHeader) else
                             EVENT if isinstance(record, RunEvent) else ERROR)
                steps.append(getattr(record, "step", 0)), flags.append(0)
            runs.append(run_id)
            self._kept[ordinal] = record

        def bulk(data: bytes, last_newline: int, base: int) -> bool:
            """Index data[:last_newline] at once when every line in it is a version 2 step line of
            a known run (most chunks of a long recording); False leaves it to :func:`add`."""
            nonlocal line_no, n_steps
            newlines = np.flatnonzero(np.frombuffer(data, np.uint8, last_newline + 1) == 0x0A)
            line_starts = np.concatenate(([0], newlines[:-1] + 1))
            found = list(finditer_v2(data, 0, last_newline))
            if len(found) != len(newlines):
                return False
            at = np.fromiter((m.start() for m in found), np.int64, len(found))
            ends_ok = np.frombuffer(data, np.uint8)[newlines - 1] == 0x7D  # "}"
            if not (np.array_equal(at, line_starts) and ends_ok.all()):
                return False
            groups = [m.groups() for m in found]
            run_ids = np.fromiter((int(g[1]) for g in groups), np.int64, len(groups))
            if not known_runs.issuperset(np.unique(run_ids).tolist()):
                return False
            for i in np.flatnonzero((n_steps + np.arange(len(groups))) % stride == 0).tolist():
                sample(n_steps + i, len(kinds) + i, data, int(line_starts[i]), int(newlines[i]))
            n_steps += len(groups)
            starts.extend((line_starts + base).tolist()), lengths.extend((newlines - line_starts).tolist())
            line_nos.extend(range(line_no + 1, line_no + 1 + len(groups)))
            kinds.extend([STEP] * len(groups)), runs.extend(run_ids.tolist())
            steps.extend(int(g[0]) for g in groups)
            flags.extend((DETAIL if g[2] == b"true" else 0) | (NONFINITE if g[3] == b"[" else 0) for g in groups)
            line_no += len(groups)
            return True

        try:
            for raw_end, chunk in _decoded_chunks(self.path, inflater=inflater,
                                                  gz=self._bytes if self.gzip else None):
                data = partial + chunk
                base = offset - len(partial)
                at = 0
                last_newline = data.rfind(b"\n")
                if last_newline >= 0 and bulk(data, last_newline, base):
                    at = last_newline + 1
                while True:
                    end = data.find(b"\n", at)
                    if end < 0:
                        break
                    add(data, at, end, base)
                    at = end + 1
                partial = data[at:]
                offset += len(chunk)
        except zlib.error as exc:
            self.problems.append(f"{self.path}: compressed data damaged ({exc}); read up to there")
        #: where the newline-terminated lines end, and how many there are
        self.end, self.lines = offset - len(partial), line_no
        #: where a follower goes on: file bytes read, the decoded bytes after the last newline,
        #: the decompressor then (gzip)
        self.resume_at = (raw_end, partial, _Inflater(inflater.state()) if inflater is not None else None,
                          inflater is not None and inflater.fed)
        if partial.strip() and not self.growing:
            add(partial, 0, len(partial), offset - len(partial), last=True)
        if inflater is not None and inflater.fed and not self.growing:
            self.problems.append(f"{self.path}: the compressed data ends early (a killed writer?); "
                                 "everything up to there was read")
        self.starts = np.array(starts, dtype=np.int64)
        self.lengths = np.array(lengths, dtype=np.int64)
        self.line_nos = np.array(line_nos, dtype=np.int64)
        self.kinds = np.array(kinds, dtype=np.int8)
        self.steps = np.array(steps, dtype=np.int64)
        self.run_ids = np.array(runs, dtype=np.int64)
        self.flags = np.array(flags, dtype=np.int8)
        self._header_at = sorted(i for i, r in self._kept.items() if isinstance(r, RunHeader))
        self._sampled = {ordinal: line for ordinal, (_, line) in sampled.items()}
        #: positions (step records counted from 0) whose lines the scan kept: evenly spaced
        self.sampled_positions = np.array(sorted(p for p, _ in sampled.values()), dtype=np.int64)
        self.window_fields = dict(parser.window_fields)
        self.size = offset

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def headers(self) -> dict[int, RunHeader]:
        """Ordinal -> header, in file order."""
        return {i: r for i, r in self._kept.items() if isinstance(r, RunHeader)}

    def kept(self) -> dict[int, Record]:
        """Headers, events and errors by ordinal (parsed during the scan)."""
        return self._kept

    def header_for(self, ordinal: int) -> RunHeader | None:
        """The header of the run that the record at ``ordinal`` belongs to."""
        run_id = int(self.run_ids[ordinal])
        at = bisect.bisect_right(self._header_at, ordinal)
        for i in reversed(self._header_at[:at]):
            if self._kept[i].run_id == run_id:
                return self._kept[i]
        return None

    def record(self, ordinal: int) -> Record | None:
        return self.records([ordinal])[0]

    def records(self, ordinals: Sequence[int], cache: bool = True) -> list[Record | None]:
        """The records at ``ordinals`` (None where a line turned out damaged). Neighbouring
        ordinals are read in one go; recently read step records come from a bounded cache."""
        ordinals = [int(i) for i in ordinals]
        found: dict[int, Record | None] = {}
        missing = sorted({i for i in ordinals if i not in self._kept and i not in self._cache})
        for i in [i for i in missing if i in self._sampled]:
            found[i] = self._parse_step(self._sampled[i], i)
        missing = [i for i in missing if i not in found]
        groups = list(_runs_of(missing, self.starts, self.lengths))
        spans = [(int(self.starts[g[0]]), int(self.starts[g[-1]] + self.lengths[g[-1]])) for g in groups]
        for group, (base, _), blob in zip(groups, spans, self._bytes.read_ranges(spans)):
            for i in group:
                at = int(self.starts[i]) - base
                found[i] = self._parse_step(blob[at:at + int(self.lengths[i])], i)
        out = []
        for i in ordinals:
            if i in self._kept:
                out.append(self._kept[i])
            elif i in found:
                out.append(found[i])
            else:
                self._cache.move_to_end(i)
                out.append(self._cache[i])
        if cache:
            for i, record in found.items():
                self._cache[i] = record
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def _parse_step(self, raw: bytes, ordinal: int) -> Record | None:
        header = self.header_for(ordinal)
        if header is not None:  # a run id may be reused: the nearest header before it rules
            self._parser.layers[header.run_id] = header.layers
        return self._parser.parse(raw, int(self.line_nos[ordinal]), self.problems)

    def __iter__(self) -> Iterator[Record]:
        """Every good record in file order, read a block at a time (bypassing the cache)."""
        for block in range(0, len(self), 1024):
            for record in self.records(range(block, min(len(self), block + 1024)), cache=False):
                if record is not None:
                    yield record


def _runs_of(ordinals: list[int], starts: np.ndarray, lengths: np.ndarray, gap: int = 1 << 16,
             most: int = 8 << 20) -> Iterator[list[int]]:
    """Sorted ordinals grouped where their lines are close enough to read in one go."""
    group: list[int] = []
    for i in ordinals:
        if group:
            end = int(starts[group[-1]] + lengths[group[-1]])
            if int(starts[i]) - end > gap or int(starts[i] + lengths[i]) - int(starts[group[0]]) > most:
                yield group
                group = []
        group.append(i)
    if group:
        yield group
