"""Training-step time with and without the glibc allocator tuning (stembed.runtime.tune_allocator).

Each variant runs in its own fresh process (mallopt settings are per process), alternating, on the
same seeded model and batch; the script prints the per-variant median step time and their ratio.
Last line: one JSON object.

    .venv/bin/python benchmarks/allocator.py [--preset small] [--batch 32] [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
tune = sys.argv[1] == "1"
if tune:
    from stembed.runtime import tune_allocator
    assert tune_allocator()
from stembed.config import ae_preset, s2_stage1_loss
from stembed.losses import reconstruction_loss
from stembed.models.autoencoder import SensorAutoencoder
preset, batch, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
gen = torch.Generator().manual_seed(0)
torch.manual_seed(0)
model = SensorAutoencoder(ae_preset(preset, "s2"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
w, c = model.cfg.input_px, model.cfg.context_px  # a dense encoder reads a wider window than the patch
x_in = torch.rand(batch, 11, 10, w, w, generator=gen)
x = x_in[..., c - 7 : c + 8, c - 7 : c + 8]
valid = torch.ones_like(x, dtype=torch.bool)
gaps = torch.full((batch, 10), 5.0)
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    x_hat, _ = model(x_in, gaps)
    loss = reconstruction_loss(x_hat, x, valid, s2_stage1_loss())["loss"]
    opt.zero_grad(); loss.backward(); opt.step()
    if i >= 2:  # skip warm-up steps
        times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def main() -> None:
    """Time both variants, alternating, in fresh processes; print the medians and their ratio, then the JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    times: dict[str, list[float]] = {"default": [], "tuned": []}
    for _ in range(a.rounds):
        for name, flag in (("default", "0"), ("tuned", "1")):
            out = subprocess.run([sys.executable, "-c", CHILD, flag, a.preset, str(a.batch), str(a.steps)],
                                 capture_output=True, text=True, check=True)
            times[name] += json.loads(out.stdout.strip().splitlines()[-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["default"] / med["tuned"]
    print(f"preset={a.preset} batch={a.batch}: median step default {med['default']:.3f} s, "
          f"tuned {med['tuned']:.3f} s, speed-up x{ratio:.2f}")
    print(json.dumps({"preset": a.preset, "batch": a.batch, "median_step_s": med, "speedup_tuned": round(ratio, 3),
                      "n_steps_each": len(times["default"])}))


if __name__ == "__main__":
    main()
