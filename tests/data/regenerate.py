"""Re-record the fixed streams the TUI tests replay (run after changing what the engine measures).

    .venv/bin/python tests/data/regenerate.py

Each is a short headless run with the overhead budget off (every requested step measured), the
verdicts the trainer attached kept, their evidence dicts dropped to keep the files small. Then run
the whole suite with --snapshot-update and review the report.
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
}


def main() -> None:
    for name, (preset_name, steps, changes) in FIXTURES.items():
        preset = load_preset(preset_name).replace(**changes)
        records = run_to_completion(preset, steps, run_id=1)  # run 1, as `vgtui run` numbers it
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
