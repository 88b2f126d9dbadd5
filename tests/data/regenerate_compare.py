"""Re-record the two recurrent runs the compare screen's tests put side by side: a vanilla tanh RNN
(its gradient through time vanishes) and an LSTM (it survives), same seed, same batches.

    OMP_NUM_THREADS=1 .venv/bin/python tests/data/regenerate_compare.py

Headless runs of 500 steps with the overhead budget off, every 25th step measured: by then the
LSTM has learnt the task (loss ~0.5) and the RNN has not (~2.3). The verdicts are kept, their
evidence dicts dropped to keep the files small. Then update the snapshots of
tests/test_tui_compare.py with --snapshot-update and look at them.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from vgtui.config import load_preset  # noqa: E402
from vgtui.jsonl import JsonlWriter  # noqa: E402
from vgtui.trainer import run_to_completion  # noqa: E402

FIXTURES = {"compare-rnn-tanh": "rnn-tanh", "compare-lstm": "lstm"}  # file name: preset
STEPS, SAMPLE_EVERY = 500, 25


def main() -> None:
    for name, preset_name in FIXTURES.items():
        preset = load_preset(preset_name).replace(sample_every=SAMPLE_EVERY)
        records = run_to_completion(preset, STEPS, run_id=1, device="cpu")
        path = HERE / f"{name}.jsonl"
        with JsonlWriter(path) as writer:
            writer.write_all(records)
        lines = []
        for line in path.read_text().splitlines():
            data = json.loads(line)
            for verdict in data.get("verdicts", []):
                verdict["evidence"] = {}
            lines.append(json.dumps(data, separators=(",", ":")))
        path.write_text("\n".join(lines) + "\n")
        print(f"{path.name}: {len(lines)} lines, {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
