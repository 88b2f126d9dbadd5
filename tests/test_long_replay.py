"""Replaying and attaching to a long recording (5,000 records of relu-30-he, 31 layers, from
benchmarks/long_recording.py) in bounded memory: what is held is counted, never timed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from vgtui.jsonl import JsonlWriter, iter_records
from vgtui.records import RunEvent, RunHeader, StepRecord
from vgtui.tui.sources import FollowSource, ReplaySource
from vgtui.tui.state import RunState

RECORDS = 5000
HISTORY = 200
OVERVIEW = 100


def _generator():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "long_recording.py"
    spec = importlib.util.spec_from_file_location("long_recording", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def long(tmp_path_factory):
    """The same 5,000 records written plain and gzipped, and the records as written."""
    folder = tmp_path_factory.mktemp("long")
    records = list(_generator().records(RECORDS, nonfinite_at=0.9))
    for name in ("long.jsonl", "long.jsonl.gz"):
        with JsonlWriter(folder / name) as writer:
            writer.write_all(records)
    written = [r for r in records if isinstance(r, StepRecord)]
    return folder / "long.jsonl", folder / "long.jsonl.gz", written


def _equal(a: StepRecord, b: StepRecord) -> None:
    assert (a.step, a.detail, a.nonfinite, a.run_id) == (b.step, b.detail, b.nonfinite, b.run_id)
    assert a.loss == b.loss or (np.isnan(a.loss) and np.isnan(b.loss))
    for metric, column in a.layers.items():
        np.testing.assert_array_equal(column, b.layers[metric])
    if a.hist is None:
        assert b.hist is None
    else:
        np.testing.assert_array_equal(a.hist, b.hist)
    assert [v.to_json() for v in a.verdicts] == [v.to_json() for v in b.verdicts] and a.window == b.window


def test_a_relu_30_he_record_fits_in_2_kb(long):
    plain, packed, written = long
    assert plain.stat().st_size / len(written) <= 2048
    assert packed.stat().st_size < plain.stat().st_size / 3


def test_replay_holds_a_window_and_an_overview_not_the_recording(long):
    plain, _, written = long
    source = ReplaySource(plain, history=HISTORY, overview_size=OVERVIEW)
    assert source.n_steps == RECORDS and source.problems == []
    records = source.seek(source.n_steps - 1)
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert len(steps) == HISTORY and steps[-1].step == RECORDS - 1
    assert isinstance(records[0], RunHeader) and isinstance(records[-1], RunEvent)  # "finished" trails
    overview = source.overview(end=source.n_steps - 1)
    assert len(overview) <= OVERVIEW and overview[0].step == 0 and overview[-1].step == RECORDS - 1
    assert np.all(np.diff([r.step for r in overview]) > 0)
    detail = source.overview(detail=True)
    assert len(detail) <= OVERVIEW and all(r.detail for r in detail)
    for position in np.random.default_rng(1).integers(0, RECORDS, 20):
        RunState().feed(source.seek(int(position)))
    # what the source keeps parsed: a bounded cache, whatever was visited
    assert len(source.index._cache) <= 2 * HISTORY + OVERVIEW + 64
    assert source.index._kept.keys() == {0, 1, len(source.index) - 1}  # the events and the header


def test_the_record_at_any_position_is_the_one_written(long):
    plain, packed, written = long
    streamed = [r for r in iter_records(plain) if isinstance(r, StepRecord)]
    assert len(streamed) == len(written)
    for path in (plain, packed):
        source = ReplaySource(path, history=HISTORY, overview_size=OVERVIEW)
        for position in np.random.default_rng(2).integers(0, RECORDS, 12):
            state = RunState()
            state.feed(source.seek(int(position)))
            assert state.last.step == written[position].step == int(source.step_numbers[position])
            _equal(state.last, streamed[position])
            assert abs(state.last.loss - written[position].loss) <= 1e-6 * abs(written[position].loss) \
                or np.isnan(written[position].loss)
            assert len(state.steps) == min(HISTORY, position + 1)
        assert source.position_of(1234) == 1234 and source.seek_step(4321)[-1].step == 4321


def test_stepping_forward_feeds_what_seeking_there_would_show(long):
    plain, _, _ = long
    source = ReplaySource(plain, history=HISTORY, overview_size=OVERVIEW)
    moving = RunState(maxlen=HISTORY)
    moving.feed(source.seek(3000))
    for _ in range(7):
        moving.feed(source.step_forward())
    fresh = RunState(maxlen=HISTORY)
    fresh.feed(source.upto(3007))
    assert source.position == 3007
    assert [s.step for s in moving.steps] == [s.step for s in fresh.steps]
    source.seek(source.n_steps - 1)
    assert source.step_forward() == [] and source.position == source.n_steps - 1
    assert source.step_back()[-1].step == RECORDS - 2


def test_the_first_nonfinite_step_is_found_from_the_index(long):
    plain, _, written = long
    first = next(i for i, r in enumerate(written) if r.nonfinite is not None)
    source = ReplaySource(plain, history=HISTORY, overview_size=OVERVIEW)
    assert source.first_nonfinite() == first == int(RECORDS * 0.9)
    (step, layer, where), count = source.nonfinite_summary(source.n_steps - 1)
    assert (step, layer, where) == (written[first].step, "hidden15", "backward")
    assert count == RECORDS - first
    state = RunState()
    state.feed(source.seek(first))
    assert state.nonfinite == (step, layer, where)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
def test_attaching_to_a_long_recording_reads_its_end_then_follows(long, tmp_path, monkeypatch, packed):
    plain, gz, written = long
    data = (gz if packed else plain).read_bytes()
    cut = len(data) * 4 // 5 if packed else data.rindex(b"\n", 0, len(data) * 4 // 5) + 101
    live = tmp_path / ("live.jsonl.gz" if packed else "live.jsonl")
    live.write_bytes(data[:cut])  # the writer is mid-line (mid-member)
    monkeypatch.setattr(FollowSource, "CATCH_UP_BYTES", 1 << 20)
    source = FollowSource(live, history=HISTORY)
    first = source.poll()
    steps = [r for r in first if isinstance(r, StepRecord)]
    assert isinstance(first[0], RunHeader) and len(steps) == HISTORY and source.problems == []
    assert steps[-1].step > RECORDS // 2
    with open(live, "ab") as handle:
        handle.write(data[cut:])
    rest = [r for r in source.poll() if isinstance(r, StepRecord)]
    assert [r.step for r in rest] == list(range(steps[-1].step + 1, RECORDS))
    _equal(rest[-1], [r for r in iter_records(plain) if isinstance(r, StepRecord)][-1])
    assert written[-1].step == rest[-1].step and source.problems == []


def test_the_replay_screen_on_a_long_recording_holds_a_window(long):
    """The real app (Pilot): opens at the last step, home / f / end land where they should, and
    what the source keeps parsed stays bounded."""
    import asyncio

    from vgtui.tui.app import Dashboard, make_app

    plain, _, written = long
    source = ReplaySource(plain)
    first_nan = next(i for i, r in enumerate(written) if r.nonfinite is not None)

    async def drive() -> None:
        app = make_app(source)
        async with app.run_test(size=(100, 30)) as pilot:
            dash = next(s for s in app.screen_stack if isinstance(s, Dashboard))
            assert dash.state.last.step == RECORDS - 1 and len(dash.state.steps) <= source.history
            for key, step in (("home", 0), ("f", written[first_nan].step), ("end", RECORDS - 1)):
                await pilot.press(key)
                assert dash.state.last.step == step, key
            await pilot.press("left")
            assert dash.state.last.step == RECORDS - 2
            await pilot.press("q")

    asyncio.run(drive())
    assert len(source.index._cache) <= source.index._cache_size < RECORDS


def test_the_overview_comes_from_the_lines_the_index_pass_kept(long):
    plain, packed, written = long
    streamed = {r.step: r for r in iter_records(plain) if isinstance(r, StepRecord)}
    for path in (plain, packed):
        source = ReplaySource(path, history=HISTORY, overview_size=OVERVIEW)
        kept = source.index.sampled_positions
        assert 1000 <= len(kept) <= 2000 and len(set(np.diff(kept))) == 1  # evenly spaced
        overview = source.overview(end=source.n_steps - 1)
        steps = [r.step for r in overview]
        assert len(overview) <= OVERVIEW and steps[-1] == RECORDS - 1
        assert set(steps[:-1]) <= {written[p].step for p in kept}
        for record in overview:
            _equal(record, streamed[record.step])
        middle = source.overview(end=2500)  # up to a cursor in the middle: still spread over it
        assert middle[-1].step == 2500 and OVERVIEW // 2 <= len(middle) <= OVERVIEW
