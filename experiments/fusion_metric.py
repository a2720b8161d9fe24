"""Which directions should a 7-d fusion keep? The linear start in two metrics, on the validation block only.

The linear start (``init: linear``) is PCA of the training latents in the decoders' metric ``E[J^T J]``
of the *centre pixel of the centre date*. Here a second metric weighs the Jacobian of the whole decoded
patch with the context weights (spatial decay 0.1, temporal decay ``--time-decay``, the loss's centre
weight), so directions that carry the neighbouring dates count too. For each start, on the run's
validation block: the centre MAE of the fusion reconstruction, and the blocked probe (LC, CT) of its
7-d embedding beside PCA-7 of the raw bands. No training: both are closed-form starts on the frozen
autoencoders of the run. Last line: JSON.

    .venv/bin/python experiments/fusion_metric.py runs/belgium/fusion_td03 --time-decay 0.3
    .venv/bin/python experiments/fusion_metric.py runs/belgium/fusion --metrics centre --s1-weights 0.5 0.2 0.05
    .venv/bin/python experiments/fusion_metric.py runs/belgium/fusion_td03 --metrics patch --space-decay 0.0001 \
        --time-decay 1.0   # the centre pixel's own 11 dates, equal weights
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from probe_latents import LABELS, crop  # the same block and labels as the probe script (experiments/)

from stembed.config import FusionStageConfig
from stembed.data.build import matched_s1_arrays, sensor_arrays
from stembed.data.datasets import SensorArrays, patch_loader
from stembed.eval.probe import probe_table
from stembed.inference.engine import embed_any
from stembed.inference.reference import embedding_dataset
from stembed.io.cube import open_scene
from stembed.losses import context_weights
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.fusion import FusionModel
from stembed.training.evaluate import evaluate_split
from stembed.training.fusion_init import centre_jacobian_metric, init_linear_fusion, training_latents
from stembed.training.run import fusion_reconstruct
from stembed.training.run_folder import open_run

Metric = Callable[[SensorAutoencoder, torch.Tensor, torch.Tensor], torch.Tensor]  # (ae, latents, gaps) -> (L, L)


def patch_metric(time_decay: float, centre_weight: float, space_decay: float = 0.1) -> Metric:
    """``E[J^T W J]`` over the whole decoded patch, ``W`` the context weights. ``J`` by central differences
    (step 1e-2 of each latent's spread): forward-mode autodiff does not reach through torch's CPU attention."""

    def metric(ae: SensorAutoencoder, z: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        L = z.shape[1]
        steps = 1e-2 * z.std(0).clamp_min(1e-6)  # (L,)
        out = torch.zeros(L, L, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, z.shape[0], 128):
                zb, gb = z[i : i + 128], gaps[i : i + 128]
                cols = []
                for k in range(L):
                    d = torch.zeros_like(zb)
                    d[:, k] = steps[k]
                    jv = (ae.decode(zb + d, gb).double() - ae.decode(zb - d, gb).double()) / (2 * float(steps[k]))
                    cols.append(jv)  # (B, T, C, H, W): d out / d z_k
                T, H = cols[0].shape[1], cols[0].shape[3]
                w = context_weights(T, H, decay=space_decay, time_decay=time_decay, centre_weight=centre_weight,
                                    normalised=False, dtype=torch.float64)[None, :, None]  # (1, T, 1, H, W)
                for a in range(L):
                    for b in range(a, L):
                        out[a, b] += (cols[a] * cols[b] * w).sum()
                        out[b, a] = out[a, b]
        return (out / z.shape[0]).float()

    return metric


def main() -> None:
    """Print one row per start and S1 weight as it is scored, then all rows as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--time-decay", type=float, default=0.3)
    ap.add_argument("--space-decay", type=float, default=0.1,
                    help="spatial decay of the patch metric (near 0: the centre pixel's own time series)")
    ap.add_argument("--cube", type=Path, default=Path("runs/belgium/scene.zarr"))
    ap.add_argument("--region", default="0:32,32:64", help="the validation block, y0:y1,x0:x1")
    ap.add_argument("--block-px", type=int, default=8)
    ap.add_argument("--s1-weights", type=float, nargs="+", default=None,
                    help="S1 branch weights of the metric to try (default: the run's loss.s1_weight); S2 keeps its own")
    ap.add_argument("--metrics", nargs="+", choices=("centre", "patch"), default=["centre", "patch"])
    a = ap.parse_args()
    torch.manual_seed(0)
    run = open_run(a.run)
    bundle = run.bundle
    trained = bundle.build_model()
    if not isinstance(run.config, FusionStageConfig) or not isinstance(trained, FusionModel):
        ap.error(f"{a.run} is not a fusion run (of the paper's fusion model, no window)")
    cfg = run.config
    data = run.data()
    train = list(patch_loader(data.datasets["train"], batch_size=64))
    val = list(patch_loader(data.datasets["val"], batch_size=64))
    z, gaps = training_latents(trained, train)
    s1_weights = a.s1_weights or [cfg.loss.s1_weight]
    centre_w = {"s1": cfg.loss.s1.centre_weight, "s2": cfg.loss.s2.centre_weight}

    scene = crop(open_scene(a.cube), a.region)
    if scene.labels is None:
        ap.error(f"{a.cube} holds no labels to probe (LC, CT); pass a scene store with labels")
    s2, s1 = sensor_arrays(scene, "s2"), matched_s1_arrays(scene, cfg.data.s1_max_gap_days)
    r = trained.anchor.cfg.context_px
    pad = ((0, 0), (0, 0), (r, r), (r, r))
    block = {k: SensorArrays(np.pad(a.values, pad, mode="reflect"), a.days) for k, a in (("s2", s2), ("s1", s1))}
    valid = np.isfinite(s2.values).any(axis=1)

    patch = {k: patch_metric(a.time_decay, centre_w[k], a.space_decay) for k in ("s1", "s2")}
    metrics: dict[str, tuple[str, Metric]] = {"centre": ("centre pixel (init: linear)", centre_jacobian_metric),
               "patch": (f"patch, time decay {a.time_decay}, space decay {a.space_decay}",
                         lambda ae, zz, gg: patch[ae.cfg.sensor](ae, zz, gg))}
    rows = []
    for (name, metric), s1_weight in ((metrics[m], w) for m in a.metrics for w in s1_weights):
        model = copy.deepcopy(trained)
        init_linear_fusion(model, z, gaps, {"s1": s1_weight, "s2": cfg.loss.s2_weight}, metric=metric)
        name = f"{name}, S1 weight {s1_weight}"
        recon = {k: m["centre_mae"] for k, m in evaluate_split(val, fusion_reconstruct(model)).items()}
        with torch.no_grad():
            values = embed_any(model, block, batch_size=512, device=torch.device("cpu"), precision="float32")
        ds = embedding_dataset(values, valid, scene, bundle)
        row: dict[str, Any] = {"start": name, "val_centre_mae": {k: round(v, 4) for k, v in recon.items()}}
        for label, nodata in LABELS.items():
            res = probe_table(ds, scene.s2, scene.labels, label=label, nodata=nodata, block_px=a.block_px)
            t = res.table[res.table["fold"] == "mean"].set_index(["feature_set", "model"])["macro_f1"]
            for model_name in ("logistic_regression", "random_forest"):
                row[f"{label} {model_name} embedding"] = round(float(t[("embedding", model_name)]), 3)
                row[f"{label} {model_name} PCA-7"] = round(float(t[("raw_pca7", model_name)]), 3)
        rows.append(row)
        print(row, flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
