"""Reconstruction of trained runs beside their trivial baselines and a linear model of the same size.

For each run folder (stage 1 or fusion) it rebuilds the run's data exactly (its config.yaml, its
seed, so the same patches) and prints, per split and sensor, the centre-pixel MAE of the model (from
the run's metrics.json), of the two trivial baselines (patch mean, temporal neighbours) and of PCA-k
of the centre spectrum fitted on the *training* split's centre values (`stembed.training.evaluate.PCABaseline`,
which runs since this script was written also write into their metrics.json): k = the latent size for an
autoencoder (9 for S2, 2 for S1), and for fusion PCA-7 of the joint [S2 | S1] centre vector (what a
linear 7-d embedding could keep of both). Last line: one JSON object.

    .venv/bin/python experiments/recon_table.py runs/belgium/s2 runs/belgium/s1 runs/belgium/fusion
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from stembed.data.datasets import FusionPatches
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.fusion import FusionBase
from stembed.training.evaluate import PCABaseline
from stembed.training.run_folder import Run, open_run


def centres(ds: Dataset[Any], sensors: list[str]) -> dict[str, np.ndarray]:
    """Centre values (N, C) per sensor of every patch of a dataset, NaN where not observed."""
    out: dict[str, list[np.ndarray]] = {s: [] for s in sensors}
    for i in range(len(ds)):  # type: ignore[arg-type]  # torch's Dataset declares no __len__; ours all have one
        item = ds[i]
        for s in sensors:
            p = item[s] if isinstance(item, FusionPatches) else item
            x, v = p.x.numpy(), p.valid.numpy()
            t, c = x.shape[0] // 2, x.shape[-1] // 2
            out[s].append(np.where(v[t, :, c, c], x[t, :, c, c], np.nan))
    return {s: np.stack(v) for s, v in out.items()}


def run_table(run: Run, model: FusionBase | SensorAutoencoder) -> dict[str, Any]:
    """The rows of one stage-1 or fusion run (``model``: its trained model): test figures, PCA-k beside them."""
    metrics = json.loads((run.path / "metrics.json").read_text())
    if isinstance(model, FusionBase):
        keys, k = ["s2", "s1"], model.cfg.embed_dim
    else:
        keys, k = [model.cfg.sensor], model.cfg.latent_dim
    data = run.data()
    per = {name: centres(data.datasets[name], keys) for name in ("train", "test")}
    pca = PCABaseline.fit(per["train"], k).centre_mae(per["test"])
    rows = {}
    for s, p in pca.items():
        m = metrics["splits"]["test"][s]
        rows[s] = {
            "model": m["centre_mae"],
            "patch_mean": m["baseline_patch_mean_centre_mae"],
            "temporal_neighbours": m["baseline_temporal_neighbours_centre_mae"],
            f"pca_{k}": p,
            "n_patches": m["n_patches"],
            "val_model": metrics["splits"]["val"][s]["centre_mae"],
        }
    return {"stage": metrics["stage"], "k": k, "rows": rows, "train_seconds": metrics.get("train_seconds")}


def main() -> None:
    """Print the table of the runs given, then its JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    a = ap.parse_args()
    out = {}
    print("| run | sensor | val model | test model | test patch mean | test temporal neighbours | test PCA-k | "
          "model / best baseline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path in a.runs:
        run = open_run(path)
        model = run.bundle.build_model()
        if not isinstance(model, FusionBase | SensorAutoencoder):
            ap.error(f"{path} is a {run.config.stage} run; pass stage-1 or fusion runs")
        t = run_table(run, model)
        out[str(path)] = t
        for s, r in t["rows"].items():
            pca = r[f"pca_{t['k']}"]
            best = min(r["patch_mean"], r["temporal_neighbours"])
            print(f"| {t['stage']} | {s} | {r['val_model']:.4f} | **{r['model']:.4f}** | {r['patch_mean']:.4f} | "
                  f"{r['temporal_neighbours']:.4f} | {pca:.4f} (k={t['k']}) | {best / r['model']:.1f}x better |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
