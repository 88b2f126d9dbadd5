"""The command line: fast help, headless runs, user errors as one line."""

import io
import subprocess
import sys
from pathlib import Path

from vgtui.cli import main
from vgtui.config import builtin_names, load_preset
from vgtui.formatting import fmt
from vgtui.headless import run_headless

README = Path(__file__).resolve().parent.parent / "README.md"


def test_help_imports_neither_torch_nor_textual():
    code = ("import sys, vgtui.cli\n"
            "try:\n    vgtui.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'textual', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_tui_can_draw_before_torch_is_imported():
    """The first frame must not wait ~2 s for torch: the app and a live source import none."""
    code = ("import sys\nfrom vgtui.config import load_preset\nfrom vgtui.tui.app import make_app\n"
            "from vgtui.tui.sources import LiveSource\n"
            "make_app(LiveSource(load_preset('relu-he')))\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stderr


def test_malloc_settings_apply_on_linux_and_never_fail():
    from vgtui import memory

    assert memory.trim() == sys.platform.startswith("linux")
    stop = memory.start_trimming(0.01)
    assert (stop is not None) == sys.platform.startswith("linux")
    if stop is not None:
        stop.set()
    assert memory.start_trimming(0) is None


def test_frozen_long_lived_objects_leave_cycles_made_later_collectable():
    import gc
    import weakref

    from vgtui import memory

    thresholds = gc.get_threshold()
    try:
        memory.freeze_long_lived()
        assert gc.get_freeze_count() > 1000  # at least the interpreter's and the suite's modules
        assert gc.get_threshold()[2] == memory.FULL_COLLECTION_EVERY

        class Node:
            pass

        node = Node()
        node.cycle = node
        gone = weakref.ref(node)
        del node
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_headless_run_prints_layers_and_a_verdict():
    out = io.StringIO()
    preset = load_preset("sigmoid-deep").replace(width=64)
    assert run_headless(preset, 12, out=out, print_every=4) == 0
    text = out.getvalue()
    assert "step      0" in text and "step      8" in text
    assert "final (step 11)" in text
    for name in ("hidden1", "hidden5", "output"):
        assert name in text


def test_headless_training_error_is_one_line_and_exit_1(tmp_path, capsys):
    preset = load_preset("relu-he").replace(data="fashion-mnist", depth=2, width=16)
    code = run_headless(preset, 3, out=io.StringIO(), data_root=tmp_path)
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-images-idx3-ubyte" in err


def test_show_prints_resolved_toml(capsys):
    assert main(["show", "relu-he"]) == 0
    text = capsys.readouterr().out
    import tomllib

    assert tomllib.loads(text)["init"] == "kaiming_normal"


def test_bad_options_are_one_line_exit_2(capsys):
    assert main(["run", "--device", "tpu"]) == 2
    assert main(["run", "--budget", "150"]) == 2
    assert main(["replay", "/no/such/file.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err


def test_readme_lists_every_builtin_preset():
    text = README.read_text()
    for name in builtin_names():
        assert f"`{name}`" in text, name


# -- vgtui run: every N steps, the device, stopping at the NaN, a full disk ----------------------
def test_print_every_prints_every_boundary_from_the_newest_measured_step():
    """Sampled every 3rd step, printed every 4: the boundaries 4, 8, ... are mostly not measured
    (the bug: only steps that were both sampled and multiples of N were printed)."""
    out = io.StringIO()
    preset = load_preset("relu-he").replace(width=16, sample_every=3)
    assert run_headless(preset, 24, out=out, print_every=4, table_every=1000) == 0
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step")]
    printed = [int(line.split()[1]) for line in lines[:-1]]  # the last one is the final summary
    assert printed == [0, 4, 8, 12, 16, 20]
    assert "(measured at step 3)" in lines[1]  # step 4: the newest record is step 3's
    assert "(measured at step 12)" not in lines[3]  # step 12 was measured itself


def test_run_prints_held_out_loss_accuracy_and_the_gap_from_the_records(tmp_path):
    from vgtui.jsonl import read_recording
    from vgtui.records import StepRecord

    out = io.StringIO()
    path = tmp_path / "run.jsonl"
    preset = load_preset("relu-he").replace(width=16, eval_every=10, eval_batches=2)
    assert run_headless(preset, 25, record=path, out=out, print_every=5, table_every=1000) == 0
    held = {r.step: r for r in read_recording(path).records
            if isinstance(r, StepRecord) and r.heldout_loss == r.heldout_loss}
    assert sorted(held) == [0, 10, 20]
    lines = {int(line.split()[1]): line for line in out.getvalue().splitlines() if line.startswith("step")}
    for step in (0, 10, 20):
        r = held[step]
        assert f"held-out {fmt(r.heldout_loss).strip()} acc {r.heldout_accuracy:6.1%}" in lines[step]
        assert f"gap {r.heldout_loss - r.loss:+.3g}" in lines[step]
    assert "(step 10)" in lines[15]  # between evaluations: the newest, with its step
    final = out.getvalue().split("final (step")[1]
    r = held[20]
    assert (f"held-out (step 20): loss {fmt(r.heldout_loss).strip()}, accuracy {r.heldout_accuracy:.1%};"
            f" generalisation gap {r.heldout_loss - r.loss:+.3g}") in final


def test_eval_every_zero_prints_no_held_out():
    out = io.StringIO()
    assert run_headless(load_preset("relu-he").replace(width=16, eval_every=0), 6, out=out) == 0
    assert "held-out" not in out.getvalue()


def test_device_defaults_to_auto():
    from vgtui.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["run"]).device == "auto"
    assert parser.parse_args(["compare", "a", "b"]).device == "auto"


def test_stop_on_nonfinite_exits_4_with_a_complete_recording(tmp_path):
    from vgtui.headless import EXIT_NONFINITE
    from vgtui.jsonl import read_recording
    from vgtui.records import RunEvent, StepRecord

    path = tmp_path / "run.jsonl"
    out = io.StringIO()
    code = run_headless(load_preset("exploding").replace(sample_every=1), 60, record=path, out=out,
                        stop_on_nonfinite=True, print_every=1)
    assert code == EXIT_NONFINITE == 4
    result = read_recording(path)
    assert result.problems == []
    steps = [r for r in result.records if isinstance(r, StepRecord)]
    first_bad = next(r for r in steps if r.nonfinite is not None)
    assert first_bad.step == 5  # tests/test_diagnosis.py: hidden2 overflows at step 5
    assert steps[-1].step <= first_bad.step + 1  # stopped after that step (one more may finish)
    events = [(r.kind, r.message) for r in result.records if isinstance(r, RunEvent)]
    assert ("stopped", "") in events
    assert any(kind == "notice" and "non-finite step 5" in message for kind, message in events)
    assert "stopped at the first non-finite step (5)" in out.getvalue()


def _fill_after(lines_before_failure: int):
    """A JsonlWriter.write that, after some lines, writes half a line and then fails like a full
    disk (ENOSPC), as a real write does when the device fills mid-line."""
    import errno

    from vgtui.jsonl import JsonlWriter

    original = JsonlWriter.write

    def write(self, record):
        if self.lines >= lines_before_failure:
            self._file.write(b'{"type":"step","step":')
            self._file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, record)

    return write


def test_a_full_disk_ends_the_recording_not_training(tmp_path, monkeypatch, capsys):
    from vgtui.headless import EXIT_RECORDING_FAILED
    from vgtui.jsonl import JsonlWriter, read_recording

    monkeypatch.setattr(JsonlWriter, "write", _fill_after(6))
    path = tmp_path / "run.jsonl"
    out = io.StringIO()
    code = run_headless(load_preset("relu-he").replace(width=16), 20, record=path, out=out)
    assert code == EXIT_RECORDING_FAILED == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "No space left on device" in err
    assert "final (step 19)" in out.getvalue()  # training went on to the end
    result = read_recording(path)
    assert result.problems == []  # the partial line was cut off
    assert len(result.records) == 6


def test_an_unwritable_record_path_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--steps", "1", "--record", str(blocker / "run.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.jsonl" in err and "Traceback" not in err


def test_a_real_full_filesystem(tmp_path):
    """`vgtui run --record` on a 64 KiB tmpfs: one line, exit 3, no traceback and no abort
    (exit 134, "terminate called without an active exception"). Needs mount (root)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    try:
        path = mount_point / "run.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "vgtui", "run", "--preset", "sigmoid-deep", "--steps", "60",
             "--budget", "0", "--device", "cpu", "--record", str(path)],
            capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                              "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.count("\n") == 1 and str(path) in proc.stderr
        assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr
        assert "final (step 59)" in proc.stdout
        from vgtui.jsonl import read_recording

        result = read_recording(path)
        assert result.problems == [] and len(result.records) > 3
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_a_fault_in_the_consumer_still_stops_and_joins_the_trainer():
    """Whatever the consumer raises, the trainer thread does not outlive run_headless: a thread
    still inside torch at interpreter exit aborts the process (exit 134)."""
    import threading

    import pytest

    class Broken(io.StringIO):
        def write(self, text):
            if text.startswith("step"):
                raise RuntimeError("terminal went away")
            return super().write(text)

    preset = load_preset("relu-he").replace(width=16)
    with pytest.raises(RuntimeError, match="terminal went away"):
        run_headless(preset, 100_000, out=Broken(), print_every=1)
    assert not [t for t in threading.enumerate() if t.name.startswith("vgtui-trainer")]


def test_stop_on_nonfinite_from_the_command_line(capsys):
    assert main(["run", "--preset", "exploding", "--steps", "40", "--device", "cpu",
                 "--sample-every", "1", "--budget", "0", "--stop-on-nonfinite"]) == 4
    assert "stopped at the first non-finite step (5)" in capsys.readouterr().out


def test_no_break_reaches_the_live_app(monkeypatch):
    """The live app pauses at the first non-finite step unless --no-break says otherwise."""
    import vgtui.tui as tui
    from vgtui.cli import build_parser, cmd_tui  # main() leaves with os._exit after the TUI

    seen = []
    monkeypatch.setattr(tui, "run_live", lambda preset, **options: seen.append(options["break_on_nonfinite"]) or 0)
    parser = build_parser()
    assert cmd_tui(parser.parse_args(["--preset", "relu-he", "--device", "cpu"])) == 0
    assert cmd_tui(parser.parse_args(["--preset", "relu-he", "--device", "cpu", "--no-break"])) == 0
    assert seen == [True, False]
