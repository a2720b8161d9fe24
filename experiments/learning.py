"""Why did the autoencoders not learn? One batch of real patches, memorised, one change at a time.

A model that cannot memorise 32 patches cannot generalise from 150,000. Every variant starts from
the same seed and fits the same fixed batch of 32 real training patches of the Belgian WorldCereal
patch (``../shared/data``), AdamW, context-weighted MAE. Each row changes one thing against the
paper's design at the ``--preset``'s widths (``PAPER_DESIGN``: the preset without
``stembed.config.LEARNING_FIXES``); the last rows combine them. Printed: the
centre-pixel MAE of the batch (eval mode, so no dropout noise) after each block of steps, against
the patch-mean baseline and a per-pixel PCA of the latent's size fitted on the batch's own centre
spectra (the linear model a 9-d latent must beat). Last line: one JSON object.

    .venv/bin/python experiments/learning.py [--sensor s2] [--steps 400] [--variants all]
    .venv/bin/python experiments/learning.py --variant-set dense   # the same rows for the dense encoder
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stembed.config import (
    AEConfig,
    DataConfig,
    LossConfig,
    SamplingConfig,
    SplitConfig,
    WorldCerealSource,
    ae_preset,
    s2_stage1_loss,
)
from stembed.data.build import band_stats, build_sensor_data
from stembed.data.datasets import SensorPatches, collate
from stembed.data.scenes import load_scenes
from stembed.losses import reconstruction_loss
from stembed.models.autoencoder import SensorAutoencoder
from stembed.runtime import tune_allocator
from stembed.training.evaluate import baselines, centre_abs_error

BELGIUM = Path(__file__).resolve().parents[1].parent / "shared/data/worldcereal_s2_s1_patches/00002806639B424A"
NO_DROPOUT = {"dropout": 0.0, "enc_dropout2d": 0.0, "dec_dropout2d": 0.0}
FIXED = {**NO_DROPOUT, "centre_path": True, "temporal_norm_first": True, "latent_activation": "identity"}
# the paper's design at the preset's widths: what the small/tiny presets were before LEARNING_FIXES
PAPER_DESIGN = {"dropout": 0.1, "enc_dropout2d": 0.07, "dec_dropout2d": 0.1, "centre_path": False,
                "temporal_norm_first": False, "latent_activation": "softplus"}

# name -> (AEConfig overrides, training overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper design (tiny)": ({}, {}),
    "no dropout": (NO_DROPOUT, {}),
    "pre-norm transformer": ({"temporal_norm_first": True}, {}),
    "linear latent (no softplus)": ({"latent_activation": "identity"}, {}),
    "centre path": ({"centre_path": True}, {}),
    "lr 3e-3": ({}, {"lr": 3e-3}),
    "no standardisation": ({}, {"standardise": False}),
    "all four fixes": (FIXED, {}),
    "all four fixes, hybrid S2 loss": (FIXED, {"loss": "hybrid"}),
    "all but centre path": ({**FIXED, "centre_path": False}, {}),
    "all but no-dropout": ({**FIXED, **{k: PAPER_DESIGN[k] for k in NO_DROPOUT}}, {}),
}


def real_batch(
    sensor: str, n: int, context_px: int | None, seed: int
) -> tuple[SensorPatches, tuple[float, ...], tuple[float, ...]]:
    """``n`` training patches of the Belgian patch (dev configs' blocks and sampling) and the band stats."""
    cfg = DataConfig(
        source=WorldCerealSource(paths=(str(BELGIUM),)),
        sampling=SamplingConfig(window_dates=20, window_stride=4, spatial_stride=2)
        if sensor == "s2" else SamplingConfig(window_dates=20, window_stride=4, spatial_stride=2),
        split=SplitConfig(by="block", blocks=2, fractions=(0.5, 0.25, 0.25), seed=0),
    )
    data = build_sensor_data(load_scenes(cfg), sensor, cfg, np.random.default_rng(0), context_px=context_px)
    ds = data.datasets["train"]
    n_patches = len(ds)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; ours all have one
    pick = np.random.default_rng(seed).choice(n_patches, size=n, replace=False)
    items = [ds[int(i)] for i in pick]
    batch = collate(items)
    mean, std = band_stats(data)
    return batch, mean, std


def pca_centre_mae(x: torch.Tensor, valid: torch.Tensor, k: int) -> float:
    """MAE of a k-component PCA of the batch's own centre spectra (fitted on them: a lower bound for linear)."""
    t, c = x.shape[1] // 2, x.shape[-1] // 2
    ok = valid[:, t, :, c, c].all(dim=1)
    spec = x[ok][:, t, :, c, c].double()  # (N, C)
    mu = spec.mean(0)
    u, s, vt = torch.linalg.svd(spec - mu, full_matrices=False)
    rec = (spec - mu) @ vt[:k].T @ vt[:k] + mu
    return float((rec - spec).abs().mean())


def run_variant(
    base: AEConfig, over: dict[str, Any], train: dict[str, Any], batch: SensorPatches, steps: int, every: int,
    seed: int,
) -> list[float]:
    """Fit one variant (``over``: AEConfig fields, ``train``: lr, loss, standardise) to the batch; its centre MAE
    after every ``every`` steps."""
    cfg = AEConfig(**{**base.model_dump(), **over})
    if train.get("standardise") is False:
        cfg = AEConfig(**{**cfg.model_dump(), "input_mean": None, "input_std": None})
    loss_cfg = s2_stage1_loss() if train.get("loss") == "hybrid" else LossConfig()
    torch.manual_seed(seed)
    model = SensorAutoencoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=train.get("lr", 1e-3), weight_decay=1.5e-4)
    x, v, g = batch.x, batch.valid, batch.gaps
    x_in = batch.encoder_input
    curve = []
    for step in range(1, steps + 1):
        model.train()
        x_hat, _ = model(x_in, g)
        loss = reconstruction_loss(x_hat, x, v, loss_cfg)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0:
            model.eval()
            with torch.no_grad():
                s, c = centre_abs_error(model(x_in, g)[0], x, v)
            curve.append(float(s / c))
    return curve


def main() -> None:
    """Print the baselines, then one row per variant as it finishes, then all rows as JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sensor", default="s2", choices=["s1", "s2"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: timings stay honest beside other jobs)")
    ap.add_argument("--variants", nargs="*", default=None, help="names (default: all)")
    a = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(a.threads)
    probe = ae_preset(a.preset, a.sensor)
    batch, mean, std = real_batch(a.sensor, a.batch, probe.context_px if probe.variant == "dense" else None, a.seed)
    base = AEConfig(**{**probe.model_dump(), **PAPER_DESIGN, "input_mean": mean, "input_std": std})
    x, v = batch.x, batch.valid
    s, c = centre_abs_error(baselines(x, v)["patch_mean"], x, v)
    print(f"{a.sensor} {a.preset}, {a.batch} real training patches, {a.steps} steps; centre MAE of the batch")
    print(f"patch-mean baseline {float(s / c):.4f}; PCA-{base.latent_dim} of the centre spectra "
          f"{pca_centre_mae(x, v, base.latent_dim):.4f}")
    steps_cols = list(range(a.every, a.steps + 1, a.every))
    print(f"| variant | {' | '.join(f'step {k}' for k in steps_cols)} | s |")
    print("|---|" + "---:|" * (len(steps_cols) + 1))
    rows = {}
    for name, (over, train) in VARIANTS.items():
        if a.variants and name not in a.variants:
            continue
        if a.sensor == "s1" and train.get("loss") == "hybrid":
            continue
        t0 = time.perf_counter()
        curve = run_variant(base, over, train, batch, a.steps, a.every, a.seed)
        dt = time.perf_counter() - t0
        rows[name] = curve
        print(f"| {name} | {' | '.join(f'{m:.4f}' for m in curve)} | {dt:.0f} |", flush=True)
    print(json.dumps({"sensor": a.sensor, "preset": a.preset, "steps": steps_cols, "rows": rows}))


if __name__ == "__main__":
    main()
