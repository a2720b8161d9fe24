"""What a trailing window costs at inference: one block embedded by the same context fusion with a centred and a
trailing window, side by side in one process, and the trailing run's cost when only the newest dates are asked for
(``embed --extend``). A trailing window reads each date's recent stage-1 latents as they stood on the date
(:func:`stembed.inference.engine.iter_asof`): the temporal transformer runs n_frames // 2 + 1 times per date
instead of once, the frame CNN still once per frame. Random weights (the cost does not depend on them). Last line:
one JSON object.

    .venv/bin/python benchmarks/trailing.py [--px 32] [--days 365] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Literal

import numpy as np
import torch

from stembed.config import FusionConfig, WindowConfig, ae_preset
from stembed.inference.blocks import read_block
from stembed.inference.engine import embed_block_context, sensor_present
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.context import ContextFusionModel
from stembed.testing import synthetic_scene


def model(side: Literal["centred", "trailing"]) -> ContextFusionModel:
    """The Belgian context fusion's shape with random weights, its window centred or trailing."""
    torch.manual_seed(0)
    aes = {k: SensorAutoencoder(ae_preset("tiny-dense", k)) for k in ("s1", "s2")}
    window = WindowConfig(dates=24 if side == "trailing" else 48, span_days=400, side=side)  # the Belgian configs'
    cfg = FusionConfig(embed_dim=16, nested=(7, 16), window=window, n_layers=3, dropout=0.0, direct_path=True,
                       calendar=True)
    return ContextFusionModel(aes, cfg).eval()


def main() -> None:
    """Time the three variants, alternating, and print their medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--px", type=int, default=32)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scene = synthetic_scene(seed=0, height_px=args.px, width_px=args.px, n_days=args.days)
    r = ae_preset("tiny-dense", "s2").context_px
    block = read_block(scene, slice(0, args.px), slice(0, args.px), r, {"s1": 6.0})
    observed = sensor_present(block, r)["s2"]
    newest = observed.copy()
    newest[:-2] = False  # embed --extend by two dates: only they are embedded
    models = {"centred": model("centred"), "trailing": model("trailing")}
    runs: dict[str, tuple[Literal["centred", "trailing"], np.ndarray | None]] = {
        "centred": ("centred", None), "trailing": ("trailing", None), "trailing_last2": ("trailing", newest)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):  # alternating, so drift hits every variant alike
        for name, (side, targets) in runs.items():
            t0 = time.perf_counter()
            embed_block_context(models[side], block, batch_size=256, device=torch.device("cpu"), targets=targets)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_dates = int(observed.shape[0])
    print(f"block {args.px} x {args.px} px, {n_dates} S2 dates, {args.threads} threads, median of {args.rounds}")
    for k, v in med.items():
        print(f"  {k:15s} {v:7.2f} s")
    ratio = med["trailing"] / med["centred"]
    print(f"  trailing / centred: {ratio:.2f}; trailing, last 2 dates / whole trailing: "
          f"{med['trailing_last2'] / med['trailing']:.2f}")
    print(json.dumps({"px": args.px, "dates": n_dates, "threads": args.threads, "seconds": med,
                      "trailing_over_centred": ratio, "last2_over_trailing": med["trailing_last2"] / med["trailing"],
                      "pixel_dates": int(np.count_nonzero(observed))}))


if __name__ == "__main__":
    main()
