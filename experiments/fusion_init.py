"""The linear fusion start against a trained fusion run, on the run's own validation and test blocks.

Rebuilds the run's data (its config.yaml and seed), encodes every patch with the frozen stage-1
autoencoders, and prints the centre-pixel MAE per sensor of:

- ``autoencoders``: each sensor's own latent decoded (the floor any fusion of these latents stands on);
- ``run``: the run's fusion bundle;
- ``linear, decoder metric``: PCA of the training latents in the decoders' metric
  (:func:`stembed.training.fusion_init.init_linear_fusion`, what ``init: linear`` starts from);
- ``linear, standardised``: plain PCA of the standardised latents, same size (the metric's effect).

Then how many of the linear start's components each sensor holds (their sum is the embedding size).

    .venv/bin/python experiments/fusion_init.py runs/belgium/fusion
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from stembed.config import FusionStageConfig
from stembed.data.datasets import FusionPatches, patch_loader
from stembed.models.fusion import FusionModel
from stembed.training.evaluate import centre_abs_error, evaluate_split
from stembed.training.fusion_init import (
    centre_jacobian_metric,
    init_linear_fusion,
    linear_fusion,
    training_latents,
)
from stembed.training.run import fusion_reconstruct
from stembed.training.run_folder import open_run


def centre_mae(
    model: FusionModel, z: dict[str, torch.Tensor], gaps: dict[str, torch.Tensor], batches: list[FusionPatches]
) -> dict[str, float]:
    """Centre MAE of decoding latents ``z`` (per sensor, rows in dataset order) against the patches' centres."""
    out = {}
    for k, ae in model.sensor_autoencoders().items():
        err, n, i = 0.0, 0.0, 0
        for batch in batches:
            b = batch.size
            with torch.no_grad():
                x_hat = ae.decode(z[k][i : i + b], gaps[k][i : i + b])
            e, c = centre_abs_error(x_hat, batch[k].x, batch[k].valid)
            err, n, i = err + float(e), n + float(c), i + b
        out[k] = err / n
    return out


def sensor_shares(
    z: dict[str, torch.Tensor], gaps: dict[str, torch.Tensor], model: FusionModel, weights: dict[str, float], k: int
) -> dict[str, float]:
    """How many of the linear start's k components each sensor holds: the squared loadings of the k
    principal directions (in the decoder metric, as :func:`init_linear_fusion` computes them) summed per
    sensor block (they sum to k)."""
    aes = model.sensor_autoencoders()
    metric = torch.block_diag(*[weights[s] * centre_jacobian_metric(aes[s], z[s], gaps[s]) for s in z]).double()
    w, u = torch.linalg.eigh(metric)
    root = u @ torch.diag(w.clamp_min(w.max() * 1e-10).sqrt()) @ u.T
    zz = torch.cat(list(z.values()), dim=1).double()
    _, _, vt = torch.linalg.svd((zz - zz.mean(0)) @ root, full_matrices=False)
    edges = np.cumsum([0, *(z[s].shape[1] for s in z)])
    return {s: float((vt[:k, edges[i] : edges[i + 1]] ** 2).sum()) for i, s in enumerate(z)}


def main() -> None:
    """Print the table of the starts on the run's validation and test blocks, then the sensors' shares."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path)
    a = ap.parse_args()
    run = open_run(a.run)
    trained = run.bundle.build_model()
    if not isinstance(run.config, FusionStageConfig) or not isinstance(trained, FusionModel):
        ap.error(f"{a.run} is not a fusion run (of the paper's fusion model, no window)")
    cfg = run.config
    data = run.data()
    loaders = {s: list(patch_loader(data.datasets[s], batch_size=64)) for s in ("train", "val", "test")}
    latents = {s: training_latents(trained, loaders[s]) for s in loaders}
    weights = {k: cfg.loss.branch(k)[1] for k in trained.sensors}

    linear = copy.deepcopy(trained)
    init_linear_fusion(linear, *latents["train"], weights)
    z_train = torch.cat(list(latents["train"][0].values()), dim=1)
    std = torch.diag(1.0 / z_train.std(0) ** 2)
    mean, enc, dec = linear_fusion(z_train, std, trained.cfg.embed_dim)
    widths = [z.shape[1] for z in latents["train"][0].values()]

    rows = {}
    for s in ("val", "test"):
        z, gaps = latents[s]
        zz = torch.cat(list(z.values()), dim=1)
        zs = dict(zip(z, ((zz - mean) @ enc @ dec + mean).split(widths, dim=1), strict=True))
        rows[s] = {
            "autoencoders": centre_mae(trained, z, gaps, loaders[s]),
            "run": {k: m["centre_mae"] for k, m in evaluate_split(loaders[s], fusion_reconstruct(trained)).items()},
            "linear, decoder metric": {
                k: m["centre_mae"] for k, m in evaluate_split(loaders[s], fusion_reconstruct(linear)).items()
            },
            "linear, standardised": centre_mae(trained, zs, gaps, loaders[s]),
        }
    sensors = list(trained.sensors)
    print("| model | " + " | ".join(f"{s} {k}" for s in ("val", "test") for k in sensors) + " |")
    print("|---|" + "---:|" * (2 * len(sensors)))
    for name in rows["val"]:
        print(f"| {name} | " + " | ".join(f"{rows[s][name][k]:.4f}" for s in ("val", "test") for k in sensors) + " |")
    shares = sensor_shares(*latents["train"], trained, weights, trained.cfg.embed_dim)
    print("components of the linear start held by each sensor: "
          + ", ".join(f"{s} {v:.2f}" for s, v in shares.items()))
    print(json.dumps({**rows, "sensor_shares": shares}))


if __name__ == "__main__":
    main()
