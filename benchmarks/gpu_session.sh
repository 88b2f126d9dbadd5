#!/usr/bin/env bash
# Everything vgtui checks and measures on a GPU, in one go (a lent GPU machine is held briefly):
# the CUDA tests, probe overhead and its tiers, and a headless run under the overhead budget.
#     bash benchmarks/gpu_session.sh [OUTDIR]
# Needs python3 with torch (CUDA) and numpy; textual & co. only for the headless CLI and the suite.
set -u
out=${1:-${OUT:-/tmp/vgtui-gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
section() { echo; echo "=== $* ==="; }
{
section environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
nproc

section CUDA tests
timeout 300 $py -m pytest -q -p no:cacheprovider -s tests/test_cuda.py "tests/test_api.py::test_no_device_sync_on_cuda" 2>&1 | tail -25

section probe overhead on CUDA
if [ -n "${QUICK:-}" ]; then
  timeout 300 $py benchmarks/overhead.py --device cuda --pairs 80 --floor --only batch
  timeout 200 $py benchmarks/overhead.py --device cuda --pairs 80 --aa --only batch
else
  timeout 420 $py benchmarks/overhead.py --device cuda --pairs 100 --floor
fi

section probe tiers on CUDA
timeout 120 $py benchmarks/probe_tiers.py --device cuda --rounds 7 --steps 30
timeout 180 $py benchmarks/probe_tiers.py --device cuda --rounds 7 --steps 20 --preset relu-he --set depth=20,width=2048,batch_size=2048

section TUI on CUDA: steps/s drawing vs not drawing, alternating every 2 s
for preset in sigmoid-deep relu-30-he; do
  timeout 120 $py benchmarks/tui_bench.py --ab --device cuda --preset $preset --steps 6000 2>&1 | tail -2
done

section headless runs on CUDA under the default 2 % budget
cat > "$out/busy.toml" <<'TOML'
description = "20x2048 ReLU, He init, batch 2048: keeps an H100 busy"
depth = 20
width = 2048
activation = "relu"
init = "kaiming_normal"
batch_size = 2048
lr = 0.001
momentum = 0.9
TOML
for preset in sigmoid-deep "$out/busy.toml"; do
  steps=3000; [ "$preset" = sigmoid-deep ] || steps=600
  echo "--- $preset, $steps steps"
  timeout 240 $py -m vgtui run --preset "$preset" --device cuda --steps $steps --record "$out/run.jsonl" 2>&1 | tail -4
  timeout 60 $py - "$out/run.jsonl" <<'PY'
import json, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if r.get("type") == "step"]
print(len(steps), "step records")
for r in steps[:: max(1, len(steps) // 10)] + steps[-1:]:
    num = lambda key: float(r[key]) if isinstance(r.get(key), (int, float, str)) else float("nan")  # noqa: E731
    print(f"step {r['step']:>5}  every {r['sample_every']:>3}  probe share {num('probe_overhead'):.4f}"
          f"  steps/s {num('steps_per_sec'):.1f}")
PY
done
} 2>&1 | tee "$out/gpu_session.log"
