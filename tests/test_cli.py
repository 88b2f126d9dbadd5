"""The command line: fast help, headless runs, user errors as one line."""

import io
import subprocess
import sys
from pathlib import Path

from vgtui.cli import main
from vgtui.config import builtin_names, load_preset
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
