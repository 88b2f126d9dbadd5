"""What the step window (StepRecord.window: every step's loss and global gradient norm) costs an
unmeasured trainer step: Probe.count timed inside the trainer's own step, median over 100 steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/window_cost.py
"""
import statistics, time, torch
from vgtui.models import build_model, make_optimizer
from vgtui.config import load_preset
from vgtui.data import SyntheticData
from vgtui.probe import Probe
for name in ("relu-30-he", "sigmoid-deep"):
    p = load_preset(name); b = build_model(p); opt = make_optimizer(b.model.parameters(), p)
    probe = Probe(b.layers, list(b.model.parameters()), owns_backward=True, window=True)
    data = SyntheticData(p.seed, p.batch_size); steps, counts = [], []
    for i in range(120):
        x, y = data.batch(i % 8)
        t0 = time.perf_counter()
        probe.begin(False); opt.zero_grad(set_to_none=True)
        loss = b.loss_fn(probe.forward(b.model, x), y); probe.backward(loss); probe.after_backward()
        probe.clip(p.clip, p.clip_threshold)
        t1 = time.perf_counter(); probe.count(i, loss); t2 = time.perf_counter()
        opt.step(); t3 = time.perf_counter()
        if i >= 20:
            steps.append(t3 - t0 - (t2 - t1)); counts.append(t2 - t1)
    print(f"{name}: unsampled step {statistics.median(steps)*1e3:.1f} ms, count() {statistics.median(counts)*1e3:.3f} ms = {statistics.median(counts)/statistics.median(steps)*100:.2f} %")
