"""The ``init: centre_pca`` start before any step: validation centre MAE of an S2 autoencoder per ``init_scale``.

Builds the stage config's data (same split and seed as training), the untrained model with the
training split's band statistics, and for a random start and each scale the start of
`stembed.training.centre_init`, then scores the validation split exactly as a run's metrics do. No
training. Last line: JSON.

    .venv/bin/python experiments/centre_init_scale.py configs/belgium_s2.yaml --scales 10 30 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from stembed.config import AEConfig, AEStageConfig, load_config
from stembed.data.build import band_stats, build_sensor_data, train_spectra
from stembed.data.datasets import patch_loader
from stembed.data.scenes import load_scenes
from stembed.models.autoencoder import SensorAutoencoder
from stembed.training.centre_init import init_centre_pca
from stembed.training.evaluate import evaluate_split
from stembed.training.run import autoencoder_reconstruct


def main() -> None:
    """Score the random start and each scale's start on the validation split."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--scales", type=float, nargs="+", default=[10.0, 30.0, 100.0])
    a = ap.parse_args()
    cfg = load_config(AEStageConfig, a.config)
    m = cfg.resolved_model()
    data = build_sensor_data(load_scenes(cfg.data), cfg.sensor, cfg.data, np.random.default_rng(cfg.train.seed),
                             context_px=m.context_px)
    mean, std = band_stats(data)
    m = AEConfig.model_validate({**m.model_dump(), "input_mean": mean, "input_std": std})
    spectra = train_spectra(data)
    val = patch_loader(data.datasets["val"], batch_size=64, shuffle=False)
    rows = []
    for scale in [None, *a.scales]:
        torch.manual_seed(cfg.train.seed)
        model = SensorAutoencoder(m).eval()
        if scale is not None:
            init_centre_pca(model, spectra, scale)
        r = evaluate_split(val, autoencoder_reconstruct(model, cfg.sensor))[cfg.sensor]
        rows.append({"start": "random" if scale is None else f"centre_pca, scale {scale:g}",
                     "val_centre_mae": round(r["centre_mae"], 4),
                     "val_patch_mean": round(r["baseline_patch_mean_centre_mae"], 4)})
        print(rows[-1], flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
