"""Re-record the fixed streams the TUI tests replay (run after changing what the engine measures).

    .venv/bin/python tests/data/regenerate.py [sigmoid-deep relu-he exploding relu-30-xavier
        sigmoid-deep-long compare-rnn-tanh compare-lstm]

Each is a short headless run with the overhead budget off (every requested step measured), the
verdicts the trainer attached kept, their evidence dicts dropped to keep the files small. Then run
the whole suite with --snapshot-update and review the report.

`sigmoid-deep-long` is the activations view's picture (Glorot & Bengio 2010, fig. 2): over 2,000
steps the top hidden sigmoid layer's activations sink from 0.5 toward 0 (median 0.50 -> 0.15, p98
0.64 -> 0.17) while the layers below stay near 0.5 (benchmarks/sigmoid_saturation.py prints the
numbers); one record in 40 steps, each with percentiles, keeps the file near 115 KB.

`compare-rnn-tanh` and `compare-lstm` are what tests/test_tui_compare.py puts side by side: a
vanilla tanh RNN (its gradient through time vanishes) and an LSTM (it survives), same seed, same
batches, 500 steps, every 25th measured: by then the LSTM has learnt the task (loss ~0.5) and the
RNN has not (~2.3).
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from vgtui.config import load_preset  # noqa: E402
from vgtui.jsonl import JsonlWriter  # noqa: E402
from vgtui.trainer import run_to_completion  # noqa: E402

FIXTURES = {  # name: (preset, steps, changes)
    "sigmoid-deep": ("sigmoid-deep", 60, {}),
    "relu-he": ("relu-he", 60, {}),
    "exploding": ("exploding", 20, {}),
    "relu-30-xavier": ("relu-30-xavier", 40, {"sample_every": 2}),
    "sigmoid-deep-long": ("sigmoid-deep", 2000, {"sample_every": 40, "detail_every": 1}),
    "compare-rnn-tanh": ("rnn-tanh", 500, {"sample_every": 25}),
    "compare-lstm": ("lstm", 500, {"sample_every": 25}),
}


def shrink(path: Path) -> None:
    """Drop the verdicts' evidence dicts (the files stay small; the TUI shows the words)."""
    lines = []
    for line in path.read_text().splitlines():
        data = json.loads(line)
        for verdict in data.get("verdicts", []):
            verdict["evidence"] = {}
        lines.append(json.dumps(data, separators=(",", ":")))
    path.write_text("\n".join(lines) + "\n")
    print(f"{path.name}: {len(lines)} lines, {path.stat().st_size // 1024} KB")


def main(names: list[str]) -> None:
    for name in names or FIXTURES:
        preset_name, steps, changes = FIXTURES[name]
        preset = load_preset(preset_name).replace(**changes)
        records = run_to_completion(preset, steps, run_id=1)  # run 1, as `vgtui run` numbers it
        path = HERE / f"{name}.jsonl"
        with JsonlWriter(path) as writer:
            writer.write_all(records)
        shrink(path)

if __name__ == "__main__":
    main(sys.argv[1:])
