"""Score any autoencoder or fusion bundle's reconstructions on scene stores it was not trained on.

``stembed eval recon`` reads a training run's ``metrics.json``; this scores a bundle on a user's own
held-out sites: every patch of every store, drawn as the bundle's own training data was (its sampling
config: window, strides; ``spatial_stride`` overrides), all in one split, with the same metrics and
trivial baselines as training (:mod:`stembed.training.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stembed.config import DataConfig, DenseTrainingConfig, SamplingConfig, SceneSource, SplitConfig
from stembed.data.context import context_crops
from stembed.data.datasets import patch_loader
from stembed.data.scenes import load_scenes
from stembed.eval.recon import COLUMNS, ReconError
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import load_bundle
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import ANCHOR, FusionModel
from stembed.pretrained import resolve_bundle
from stembed.training.context import evaluate_context, split_latents
from stembed.training.evaluate import evaluate_split
from stembed.training.run import autoencoder_reconstruct, fusion_reconstruct
from stembed.training.run_folder import split_data


def bundle_recon(
    bundle: str | Path, cubes: Sequence[str | Path], *, spatial_stride: int | None = None, batch_size: int = 64
) -> pd.DataFrame:
    """One row per sensor: centre MAE, centre SAM, SSIM and both trivial baselines of ``bundle`` on ``cubes``.

    Raises:
        ReconError: the bundle is not an autoencoder or fusion bundle, or records no training data config.
        CubeError, SamplingError: a store is missing or breaks the contract, or yields no patch.
    """
    path = resolve_bundle(bundle)
    b = load_bundle(path)
    if b.kind not in ("autoencoder", "fusion"):
        raise ReconError(f"{bundle} is a {b.kind} bundle; fix: pass an autoencoder or fusion bundle")
    stage = b.cfg.stage
    if "data" not in stage:
        raise ReconError(f"{bundle} records no training data config (an older bundle); fix: retrain it")
    data = DataConfig.model_validate(stage["data"])
    sampling = data.sampling
    if spatial_stride:  # data.sampling None is the paper's sampling for the sensor (S2 drives fusion's)
        paper = data.resolved_sampling(ANCHOR if b.kind == "fusion" else str(b.sensor))
        sampling = SamplingConfig.model_validate({**paper.model_dump(), "spatial_stride": spatial_stride})
    data = data.model_copy(update={
        "source": SceneSource(paths=tuple(str(c) for c in cubes)),
        "split": SplitConfig(by="site", fractions=(0.0, 0.0, 1.0)),  # every site scored, one split
        "sampling": sampling,
    })
    scenes = load_scenes(data)
    model = b.build_model().eval()
    rng = np.random.default_rng(0)
    run = f"{bundle} on {', '.join(s.site for s in scenes)}"
    split = split_data(b.cfg, scenes, data, rng)
    if isinstance(model, ContextFusionModel):
        dense = DenseTrainingConfig.model_validate(stage.get("dense_training") or {})
        return _context_rows(run, model, split.datasets["test"].sensors,  # type: ignore[attr-defined]
                             split.regions["test"], dense.crop_px)
    if isinstance(model, FusionModel):  # b.kind == "fusion"
        reconstruct = fusion_reconstruct(model)
    else:
        assert isinstance(model, SensorAutoencoder)  # b.kind == "autoencoder", checked above
        reconstruct = autoencoder_reconstruct(model, str(b.sensor))

    metrics = evaluate_split(patch_loader(split.datasets["test"], batch_size=batch_size), reconstruct)
    rows = [{"run": run, "stage": b.kind, "split": "test", "sensor": sensor, **m} for sensor, m in metrics.items()]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _context_rows(run: str, model: ContextFusionModel, sensors: Any, regions: Any, crop_px: int) -> pd.DataFrame:
    """A context fusion scored as it was in training (:func:`stembed.training.context.evaluate_context`: every
    pixel-date of the stores, its window drawn from the store's own dates): one row per sensor and nested prefix;
    SAM and SSIM are not measured for it (it rebuilds the centre pixel, not the patch)."""
    crops = context_crops(sensors, regions, crop_px, model.anchor.cfg.context_px)
    metrics, _ = evaluate_context(model.eval(), {"test": (crops, split_latents(model, crops))})
    rows = [
        {"run": run, "stage": f"fusion ({n} features)", "split": "test", "sensor": sensor,
         "n_patches": m["n_pixel_dates"], "centre_mae": m[f"centre_mae_{n}"],
         **{k: m.get(k) for k in ("baseline_patch_mean_centre_mae", "baseline_temporal_neighbours_centre_mae")}}
        for sensor, m in metrics["test"].items() for n in model.prefixes
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))
