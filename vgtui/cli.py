"""Command line: `vgtui` (the TUI), `vgtui run`, `vgtui presets`, and the recording tools.

torch and textual are imported only inside the commands that need them, so `vgtui --help` and
bad-input errors answer at once. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError

EXIT_USAGE = 2


def _add_training_options(parser: argparse.ArgumentParser, preset_default: str | None) -> None:
    parser.add_argument("--preset", default=preset_default, metavar="NAME|PATH",
                        help="built-in preset name or path to a preset TOML file (default: %(default)s)")
    parser.add_argument("--device", default="auto", metavar="cpu|cuda|auto",
                        help="where to train (default: %(default)s: CUDA when available)")
    parser.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                        help="folder with the data set's files (default: the data set's usual place)")
    parser.add_argument("--download", action="store_true",
                        help="allow torchvision to download MNIST (needs internet)")
    parser.add_argument("--data", default=None, choices=("synthetic", "fashion-mnist", "mnist"),
                        help="data set (overrides the preset)")
    parser.add_argument("--sample-every", type=int, default=None, metavar="N",
                        help="measure every N-th step (overrides the preset)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (overrides the preset)")
    parser.add_argument("--budget", type=float, default=2.0, metavar="PCT",
                        help="probe overhead budget in %% of training time: the sampling interval "
                             "widens to stay under it (0 = off, sample exactly as asked; default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_PRESET

    parser = argparse.ArgumentParser(
        prog="vgtui",
        description="Watch gradients vanish and explode, layer by layer, while a network trains.",
        epilog="Run `vgtui` with no command to open the live monitor.",
    )
    _add_training_options(parser, DEFAULT_PRESET)
    parser.add_argument("--mono", action="store_true", help="monochrome display (also when NO_COLOR is set)")
    parser.add_argument("--paused", action="store_true", help="open paused: press space to start")
    parser.add_argument("--no-break", action="store_true",
                        help="train on past the first non-finite step instead of pausing there ('!' toggles it)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="train without a UI, print per-layer tables, optionally record",
        epilog="exit codes: 0 done; 1 training failed; 2 bad input; 3 the recording stopped (disk "
               "full, ...), training went on unrecorded; 4 stopped at the first non-finite step "
               "(--stop-on-nonfinite); 128+N stopped by signal N")
    _add_training_options(run, DEFAULT_PRESET)
    run.add_argument("--steps", type=int, default=500, help="training steps (default: %(default)s)")
    run.add_argument("--record", type=Path, default=None, metavar="FILE.jsonl", help="record every sampled step")
    run.add_argument("--print-every", type=int, default=None, metavar="N",
                     help="print a line every N steps, from the newest measured step (default: steps/20)")
    run.add_argument("--stop-on-nonfinite", action="store_true",
                     help="stop after the first step with a NaN/inf (exit code 4; the recording is complete)")

    sub.add_parser("presets", help="list the built-in presets")

    show = sub.add_parser("show", help="print a preset's resolved settings as TOML")
    show.add_argument("preset", metavar="NAME|PATH")

    for name, help_text in (("replay", "open a finished recording in the monitor"),
                            ("attach", "follow a recording that another process is writing")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("file", type=Path, metavar="FILE.jsonl")
        p.add_argument("--mono", action="store_true", help="monochrome display")

    compare = sub.add_parser("compare", help="train two presets side by side on the same batches "
                                               "(or open two recordings side by side)")
    compare.add_argument("a", metavar="A", help="preset name or file, or a recording (.jsonl)")
    compare.add_argument("b", metavar="B")
    compare.add_argument("--device", default="auto", metavar="cpu|cuda|auto",
                         help="where to train (default: %(default)s: CUDA when available)")
    compare.add_argument("--mono", action="store_true", help="monochrome display")

    export = sub.add_parser("export", help="convert a recording to CSV or TensorBoard")
    export.add_argument("file", type=Path, metavar="FILE.jsonl")
    export.add_argument("--csv", type=Path, default=None, metavar="OUT.csv", help="tidy CSV: step,layer,metric,value")
    export.add_argument("--tensorboard", type=Path, default=None, metavar="DIR", help="TensorBoard event files")
    return parser


def _load(args) -> "object":
    from .config import load_preset

    preset = load_preset(args.preset)
    changes = {}
    if getattr(args, "sample_every", None) is not None:
        changes["sample_every"] = args.sample_every
    if getattr(args, "data", None) is not None:
        changes["data"] = args.data
    if getattr(args, "seed", None) is not None:
        changes["seed"] = args.seed
    return preset.replace(**changes) if changes else preset


def _budget(args) -> float | None:
    if not 0 <= args.budget <= 100:
        raise UserError(f"--budget: must be a percentage in 0..100, got {args.budget:g}")
    return args.budget / 100 if args.budget else None


def _check_device(name: str) -> None:
    if name not in ("cpu", "cuda", "auto") and not name.startswith("cuda:"):
        raise UserError(f"--device: must be cpu, cuda, cuda:N or auto; got {name!r}")


def cmd_presets(args) -> int:
    from .config import builtin_names, load_preset

    names = builtin_names()
    width = max(len(n) for n in names)
    for index, name in enumerate(names):
        key = str(index + 1) if index < 9 else " "
        print(f"{key} {name:<{width}}  {load_preset(name).description}")
    return 0


def cmd_show(args) -> int:
    from .config import load_preset

    preset = load_preset(args.preset)
    for key, value in preset.to_dict().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        print(f"{key} = {text}")
    return 0


def cmd_run(args) -> int:
    _check_device(args.device)
    if args.steps < 1:
        raise UserError(f"--steps: must be at least 1, got {args.steps}")
    if args.print_every is not None and args.print_every < 1:
        raise UserError(f"--print-every: must be at least 1, got {args.print_every}")
    preset = _load(args)
    from .headless import run_headless

    return run_headless(preset, args.steps, record=args.record, device=args.device,
                        print_every=args.print_every, data_root=args.data_root, download=args.download,
                        overhead_budget=_budget(args), stop_on_nonfinite=args.stop_on_nonfinite)


def _tui_entry(name: str):
    """The TUI's entry points live in vgtui.tui (textual is imported only when needed)."""
    from . import tui

    return getattr(tui, name)


def cmd_tui(args) -> int:
    _check_device(args.device)
    preset = _load(args)
    return _tui_entry("run_live")(preset, device=args.device, mono=args.mono, paused=args.paused,
                                  data_root=args.data_root, download=args.download,
                                  overhead_budget=_budget(args), break_on_nonfinite=not args.no_break)


def cmd_replay(args, follow: bool) -> int:
    if not follow and not args.file.exists():
        raise UserError(f"{args.file}: no such recording")
    return _tui_entry("run_replay")(args.file, follow=follow, mono=args.mono)


def cmd_compare(args) -> int:
    from .config import load_preset

    recordings = [_is_recording(x) for x in (args.a, args.b)]
    if all(recordings):
        for path in (args.a, args.b):
            if not Path(path).exists():
                raise UserError(f"{path}: no such recording")
        return _tui_entry("run_compare_recordings")(Path(args.a), Path(args.b), mono=args.mono)
    if any(recordings):
        raise UserError("compare: give two presets (trained side by side) or two recordings, not one of each")
    _check_device(args.device)
    return _tui_entry("run_compare")(load_preset(args.a), load_preset(args.b), device=args.device,
                                     mono=args.mono)


def _is_recording(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz"))


def cmd_export(args) -> int:
    from .export import export_csv, export_tensorboard

    if not args.file.exists():
        raise UserError(f"{args.file}: no such recording")
    if not args.csv and not args.tensorboard:
        raise UserError("export: give --csv OUT.csv and/or --tensorboard DIR")
    if args.csv:
        rows, problems = export_csv(args.file, args.csv)
        for problem in problems:
            print(f"vgtui: {problem}", file=sys.stderr)
        print(f"wrote {rows} rows to {args.csv}")
    if args.tensorboard:
        count = export_tensorboard(args.file, args.tensorboard)
        print(f"wrote {count} steps to {args.tensorboard}")
    return 0


def _exit_now(code: int) -> None:
    """Leave at once after the TUI has closed. By then the trainers are stopped and joined and the
    terminal restored; what remains is the interpreter tearing torch down, which takes about a
    second, and the user is waiting for the prompt."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"vgtui {__version__}")
        return 0
    from .config import PresetError

    try:
        if args.command == "presets":
            return cmd_presets(args)
        if args.command == "show":
            return cmd_show(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command in ("replay", "attach"):
            code = cmd_replay(args, follow=args.command == "attach")
        elif args.command == "compare":
            code = cmd_compare(args)
        else:
            code = cmd_tui(args)
        _exit_now(code)
    except (PresetError, UserError) as exc:
        print(f"vgtui: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vgtui presets | head`
        sys.stderr.close()
        return 0
    except Exception as exc:
        from .data import DataError

        if isinstance(exc, (DataError, FileNotFoundError)):
            print(f"vgtui: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
