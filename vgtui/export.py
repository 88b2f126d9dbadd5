"""`vgtui export`: a recording (JSONL) to a tidy CSV, or to TensorBoard event files.

CSV: one row per observation, columns ``step,layer,metric,value``. Model-wide values (loss,
accuracy, the global gradient norm before and after clipping, whether clipping acted) have an
empty ``layer``; per-layer values use the layer names of the recording's header. Non-finite
values are written as ``nan``, ``inf``, ``-inf`` (what pandas, numpy and Python's float() read).
A metric that does not apply to a layer (saturation of a ReLU layer, dead units of a sigmoid one,
accuracy of an autoencoder) is NaN on every step: such series are left out. A measured value that
became NaN (a blow-up) is always written. Held-out loss and accuracy (``heldout_loss``,
``heldout_accuracy``, empty ``layer``) are rows only at the steps that carry an evaluation (every
``eval_every`` steps); the columns stay the same, so readers of older exports read these too.

TensorBoard (needs the optional ``tensorboard`` package): scalars ``<metric>/<NN>_<layer>`` (the
index keeps layers in input-to-output order in TensorBoard's alphabetical listing), model-wide
scalars under ``global/``, and the gradient histograms of log10|∂L/∂W| under ``grad_log10/``.
Histograms with no finite entries are skipped, never written empty (TensorBoard cannot show those).
"""

from __future__ import annotations

import csv
import importlib.util
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError
from .jsonl import iter_records
from .records import ACT_PERCENTILE_METRICS, LAYER_METRICS, RunHeader, StepRecord

GLOBAL_METRICS = ("loss", "accuracy", "grad_norm_total", "grad_norm_clipped", "clipped")
#: Evaluated every ``eval_every`` steps only: rows where a record carries an evaluation.
HELDOUT_METRICS = ("heldout_loss", "heldout_accuracy")
#: Metrics that are NaN by design where they do not apply, or that older recordings lack (the
#: activation percentiles); left out when never measured.
OPTIONAL_METRICS = frozenset({"accuracy", "saturated", "dead", *ACT_PERCENTILE_METRICS})
CSV_COLUMNS = ("step", "layer", "metric", "value")

TENSORBOARD_HINT = "--tensorboard needs the tensorboard package: install vgtui[tensorboard]"


@dataclass
class _Run:
    header: RunHeader
    header_at: int  # ordinal of the header line among the recording's records
    first: int = -1  # ordinals of its first and last step records
    last: int = -1
    steps: int = 0
    seen: set = field(default_factory=set)  # optional series with a measured value: (index, metric)


def _survey(path: str | Path) -> tuple[OrderedDict[int, _Run], list[str]]:
    """One streaming pass: the recording's runs in file order (run id -> what it holds), and the
    problems found. A run id that starts again (a second header) keeps only its newest steps."""
    problems: list[str] = []
    runs: OrderedDict[int, _Run] = OrderedDict()
    for ordinal, record in enumerate(iter_records(path, problems)):
        if isinstance(record, RunHeader):
            runs[record.run_id] = _Run(record, ordinal)  # a repeated id keeps its first place
        elif isinstance(record, StepRecord) and record.run_id in runs:
            run = runs[record.run_id]
            run.first = ordinal if run.first < 0 else run.first
            run.last = ordinal
            run.steps += 1
            for metric in OPTIONAL_METRICS:
                if metric in GLOBAL_METRICS:
                    if not math.isnan(_global_value(record, metric)):
                        run.seen.add((-1, metric))
                else:
                    for index in np.flatnonzero(~np.isnan(record.layers[metric])):
                        run.seen.add((int(index), metric))
    if len(runs) > 1:
        problems.append(f"{path}: holds {len(runs)} runs (ids {', '.join(map(str, runs))}); "
                        "their rows follow one another, each run's steps counted from its start")
    return runs, problems


def _steps(path: str | Path, runs: OrderedDict[int, _Run]) -> Iterator[tuple[_Run, StepRecord]]:
    """Each run's step records, run after run in file order, streamed: one more pass over the file
    for all runs when they follow one another (the usual case), else one pass per run."""
    ordered = [run for run in runs.values() if run.steps]
    spans = [(run.first, run.last) for run in ordered]
    apart = all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    by_id = {run.header.run_id: run for run in ordered}
    for wanted in ([None] if apart else [run.header.run_id for run in ordered]):
        for ordinal, record in enumerate(iter_records(path)):
            if not isinstance(record, StepRecord) or (wanted is not None and record.run_id != wanted):
                continue
            run = by_id.get(record.run_id)
            if run is not None and run.header_at < ordinal:
                yield run, record


def _global_value(record: StepRecord, metric: str) -> float:
    value = getattr(record, metric)
    return float(value) if not isinstance(value, bool) else float(int(value))


def _heldout(record: StepRecord) -> list[tuple[str, float]]:
    """(metric, value) of the held-out evaluation this record carries: none where it carries none,
    the loss always where it does (NaN there is a real one), the accuracy where there is one."""
    if record.heldout_loss != record.heldout_loss and record.heldout_accuracy != record.heldout_accuracy:
        return []
    values = [("heldout_loss", float(record.heldout_loss))]
    if record.heldout_accuracy == record.heldout_accuracy:
        values.append(("heldout_accuracy", float(record.heldout_accuracy)))
    return values


def _kept_series(run: _Run) -> tuple[list[str], list[tuple[int, str]]]:
    """Global metrics and (layer index, metric) pairs to export: all but never-measured optional ones."""
    globals_ = [m for m in GLOBAL_METRICS if m not in OPTIONAL_METRICS or (-1, m) in run.seen]
    per_layer = [(index, metric) for metric in LAYER_METRICS for index in range(len(run.header.layers))
                 if metric not in OPTIONAL_METRICS or (index, metric) in run.seen]
    return globals_, per_layer


def _text(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(float(value))  # shortest text that reads back to the same double


def export_csv(path: str | Path, out: str | Path) -> tuple[int, list[str]]:
    """Write the tidy CSV, streaming (two passes over the recording, one record in memory at a
    time); returns (data rows written, problems found in the recording)."""
    runs, problems = _survey(path)
    series = {id(run): _kept_series(run) for run in runs.values()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for run, record in _steps(path, runs):
            globals_, per_layer = series[id(run)]
            names = run.header.layers
            writer.writerows((record.step, "", metric, _text(_global_value(record, metric)))
                             for metric in globals_)
            writer.writerows((record.step, names[index], metric, _text(float(record.layers[metric][index])))
                             for index, metric in per_layer)
            heldout = _heldout(record)
            writer.writerows((record.step, "", metric, _text(value)) for metric, value in heldout)
            rows += len(globals_) + len(per_layer) + len(heldout)
    return rows, problems


def read_csv(path: str | Path) -> list[tuple[int, str, str, float]]:
    """The rows of an exported CSV as (step, layer, metric, value): for tests and notebooks."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        columns = next(reader)
        if tuple(columns) != CSV_COLUMNS:
            raise ValueError(f"{path}: columns {columns}, expected {list(CSV_COLUMNS)}")
        return [(int(s), layer, metric, float(v)) for s, layer, metric, v in reader]


def _tensorboard_writer():
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(TENSORBOARD_HINT)
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def _histogram_raw(counts: np.ndarray, edges: np.ndarray) -> dict | None:
    """add_histogram_raw's arguments for counts on log10 bins; None if there is nothing to show."""
    counts = np.nan_to_num(np.asarray(counts, dtype=float), nan=0.0)
    total = float(counts.sum())
    if total <= 0:
        return None
    nonzero = np.flatnonzero(counts)
    first, last = int(nonzero[0]), int(nonzero[-1])
    centres = (edges[:-1] + edges[1:]) / 2
    return {
        "min": float(edges[first]),
        "max": float(edges[last + 1]),
        "num": total,
        "sum": float((counts * centres).sum()),
        "sum_squares": float((counts * centres**2).sum()),
        "bucket_limits": [float(e) for e in edges[1:]],  # TensorBoard buckets: right edges
        "bucket_counts": [float(c) for c in counts],
    }


def export_tensorboard(path: str | Path, outdir: str | Path) -> int:
    """Write TensorBoard event files (one sub-folder per run when there are several), streaming;
    returns the number of steps written. Raises the CLI's UserError when tensorboard is not
    installed."""
    SummaryWriter = _tensorboard_writer()
    runs, _ = _survey(path)
    outdir = Path(outdir)
    written = 0
    writers = {run_id: SummaryWriter(log_dir=str(outdir / f"run{run_id}" if len(runs) > 1 else outdir))
               for run_id in runs}
    series = {id(run): _kept_series(run) for run in runs.values()}
    try:
        for run, record in _steps(path, runs):
            writer = writers[run.header.run_id]
            globals_, per_layer = series[id(run)]
            header = run.header
            edges = np.asarray(header.hist_edges, dtype=float)
            for metric in globals_:
                writer.add_scalar(f"global/{metric}", _global_value(record, metric), record.step)
            for metric, value in _heldout(record):
                writer.add_scalar(f"global/{metric}", value, record.step)
            for index, metric in per_layer:
                writer.add_scalar(f"{metric}/{index:02d}_{header.layers[index]}",
                                  float(record.layers[metric][index]), record.step)
            for index, name in enumerate(header.layers):
                if record.hist is None or index >= len(record.hist) or len(record.hist[index]) != len(edges) - 1:
                    continue
                hist = _histogram_raw(record.hist[index], edges)
                if hist is not None:
                    writer.add_histogram_raw(f"grad_log10/{index:02d}_{name}", global_step=record.step, **hist)
            written += 1
    finally:
        for writer in writers.values():
            writer.close()
    return written
