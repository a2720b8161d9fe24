"""Per-patch reference embedding: the trained model evaluated on each pixel-date's own patch.

This is the semantics of training applied to every pixel and date, and the correctness oracle
for any faster path. It is slow by design (one full patch per pixel-date), so use it on small
areas. Edges lose nothing:

- **time**: the window of a date is the ``n_frames`` dates centred on it; past either end of the
  series the dates are *reflected* (frame ``-k`` is date ``k``, placed ``day_k - day_0`` days before
  the first date), so the target date always sits on the centre frame, where the model was trained
  to describe it. Day offsets beyond the model's position table are clamped by the model.
- **space**: patches of border pixels read the cube reflected by ``patch_px // 2`` pixels.

A pixel-date gets an embedding when its S2 centre pixel has at least one valid band (the training
filter); it is NaN elsewhere, with ``valid`` False. Patches are filled exactly as in training (the
per-band mean of the patch's observed values). The compute is :func:`stembed.inference.engine.embed_block`
on the whole cube, reflect-padded; ``stembed embed`` runs the same function tile by tile.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from stembed.config import dump_config
from stembed.contract import CubeError, Scene, cube_transform
from stembed.data.build import match_gap_days, matched_arrays, sensor_arrays
from stembed.data.datasets import SensorArrays
from stembed.inference.engine import embed_block, embed_block_context, resolve_device
from stembed.models.bundle import Bundle, BundleError
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import FusionBase, paper_fusion
from stembed.models.gapfill import GapFillModel
from stembed.sensors import ANCHOR, CORE_SENSORS
from stembed.types import FEATURE, TIME, X, Y


def check_bundle_for_scene(scene: Scene, bundle: Bundle) -> None:
    """Refuse a bundle that cannot embed, or cubes whose bands are not the bundle's, in its order.

    A companion sensor the bundle was trained with must be in the scene (``Scene.extra``).
    """
    if bundle.kind not in ("fusion", "gapfill"):
        raise BundleError(
            f"embedding needs a fusion bundle (or a gap-fill bundle); {bundle.path} is {bundle.kind} ({bundle.sensor})"
        )
    companions = bundle.cfg.companions
    for key in companions:
        if key not in scene.sensors:
            raise CubeError(
                f"the bundle was trained with the companion sensor {key!r} but the scene has "
                f"{sorted(scene.extra) or 'no companion sensors'}; fix: build the scene with its {key} cube "
                f"(data.extra_sensors / Scene.extra) or use a bundle trained without it"
            )
    for key in (*CORE_SENSORS, *companions):
        cube = scene.sensors[key]
        if tuple(cube["band"].values) != bundle.sensors[key].bands:
            raise CubeError(
                f"the {key} cube has bands {[str(b) for b in cube['band'].values]} but the bundle was trained on "
                f"{list(bundle.sensors[key].bands)}; fix: select and order them with cube.sel(band=[...])"
            )


def embed_reference(
    scene: Scene,
    bundle: Bundle,
    *,
    max_gap_days: float = 6.0,  # S1's matching tolerance; a companion's comes from its plugin
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> xr.Dataset:
    """Embed every pixel and S2 date of ``scene`` with the fusion ``bundle``, one patch at a time (a context
    fusion: the whole cube as one block, no tiling).

    Returns a Dataset with ``embedding`` ``(time, feature, y, x)`` float32 (NaN where not valid) and
    ``valid`` ``(time, y, x)`` bool, on the S2 cube's grid and dates, with its CRS and transform.
    """
    check_bundle_for_scene(scene, bundle)
    scene.validate()
    model = bundle.build_model()
    if isinstance(model, GapFillModel):  # observed dates: its fusion model
        model = model.fusion
    if not isinstance(model, FusionBase):  # pragma: no cover - kind checked above
        raise TypeError("expected a fusion model")
    dev = resolve_device(device)
    model.to(dev)
    arrays = {ANCHOR: sensor_arrays(scene, ANCHOR)}
    arrays |= {k: matched_arrays(scene, k, gap, trailing=model.cfg.trailing)
               for k, gap in match_gap_days(model.sensors, max_gap_days).items()}
    r = model.anchor.cfg.context_px
    pad = ((0, 0), (0, 0), (r, r), (r, r))
    block = {k: SensorArrays(np.pad(a.values, pad, mode="reflect"), a.days) for k, a in arrays.items()}
    if isinstance(model, ContextFusionModel):
        out = embed_block_context(model, block, batch_size=batch_size, device=dev)
    else:
        out = embed_block(paper_fusion(model, "the per-patch reference"), block, batch_size=batch_size, device=dev)
    return embedding_dataset(out, np.isfinite(arrays[ANCHOR].values).any(axis=1), scene, bundle)


def embedding_dataset(values: np.ndarray, valid: np.ndarray, scene: Scene, bundle: Bundle) -> xr.Dataset:
    """Wrap ``(time, feature, y, x)`` embeddings with the S2 cube's coordinates and georeference."""
    s2 = scene.s2
    features = [f"E{i + 1}" for i in range(values.shape[1])]
    ds = xr.Dataset(
        {
            "embedding": ((TIME, FEATURE, Y, X), values),
            "valid": ((TIME, Y, X), valid & np.isfinite(values).all(axis=1)),
        },
        coords={TIME: s2[TIME].values, FEATURE: features, Y: s2[Y].values, X: s2[X].values},
    )
    ds.attrs.update({
        "crs": s2.attrs["crs"],
        "transform": list(cube_transform(s2)),
        "site": scene.site,
        "bundle": str(bundle.path) if bundle.path else "",
        "method": "per-patch reference (stembed.inference.reference)",
    })
    model = bundle.cfg.fusion_model
    if model is not None and model.window is not None:  # as an embedding store records it (the probe reads it)
        ds.attrs["window"] = dump_config(model.window)
    if model is not None and model.nested is not None:
        ds.attrs["nested"] = [n for n in model.nested if n <= values.shape[1]]
    return ds
