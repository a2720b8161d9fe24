"""One block of a scene: read with its halo (:func:`read_block`) and embedded (:func:`embed_tile`).

A block's halo holds real neighbours inside the cube and reflected pixels beyond its edge, exactly what the
per-patch reference sees, so a tile's embeddings do not depend on the tiling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr

from stembed.contract import CubeError, Scene, value_problems
from stembed.data.build import matched_arrays, sensor_arrays
from stembed.data.datasets import SensorArrays, fold_index
from stembed.inference.daily import (
    FLAG_MODEL,
    FLAG_NONE,
    FLAG_OBSERVED,
    fill_daily,
)
from stembed.inference.engine import embed_any
from stembed.inference.plan import DailyJob
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import FusionBase
from stembed.models.gapfill import GapFillModel
from stembed.sensors import ANCHOR, SCENE_SENSORS, SENSORS
from stembed.types import X, Y


def _block_index(
    scene: Scene, rows: slice, cols: slice, halo: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Row and column indices of a block with its halo (reflected at the cube's edges), and the
    bounding box ``(y0, y1, x0, x1)`` of the cube rows and columns they touch."""
    height, width = scene.s2.sizes[Y], scene.s2.sizes[X]
    yi = fold_index(rows.start - halo, rows.stop + halo, 0, height)
    xi = fold_index(cols.start - halo, cols.stop + halo, 0, width)
    return yi, xi, (int(yi.min()), int(yi.max()) + 1, int(xi.min()), int(xi.max()) + 1)


def read_block(
    scene: Scene, rows: slice, cols: slice, halo: int, max_gap_days: Mapping[str, float], *, trailing: bool = False
) -> dict[str, SensorArrays]:
    """Every sensor's values of a block with its halo, on the S2 dates, and their day numbers.

    Only the block and halo are read from the (lazy) cubes. Returns, by sensor name, S2's own values
    ``(time, band, h+2r, w+2r)`` and days, then each sensor of ``max_gap_days`` (S1, companions) matched to
    the S2 dates within its tolerance (days: the matched dates', see :func:`stembed.data.build.matched_arrays`).

    Raises:
        CubeError: a value in the block breaks the cube contract (named, with the block).
    """
    yi, xi, (y0, y1, x0, x1) = _block_index(scene, rows, cols, halo)
    window = {Y: slice(y0, y1), X: slice(x0, x1)}
    sub = Scene(site=scene.site, sensors={k: scene.sensors[k].isel(window) for k in (*SCENE_SENSORS, *max_gap_days)})
    arrays = {ANCHOR: sensor_arrays(sub, ANCHOR)}
    arrays |= {k: matched_arrays(sub, k, gap, trailing=trailing) for k, gap in max_gap_days.items() if k != ANCHOR}
    take = np.ix_(yi - y0, xi - x0)
    out = {}
    for key, arr in arrays.items():
        problems = value_problems(xr.DataArray(arr.values), SENSORS[key], allow_all_nan=True)
        if problems:
            raise CubeError(
                f"{key} cube rows {y0}:{y1}, columns {x0}:{x1} break the cube contract: " + "; ".join(problems)
            )
        out[key] = SensorArrays(np.ascontiguousarray(arr.values[:, :, take[0], take[1]]), arr.days)
    return out


def embed_tile(
    model: FusionBase | GapFillModel,
    block: Mapping[str, SensorArrays],
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    daily: DailyJob | None,
    features: int | None = None,
    progress: Callable[[int], None] | None = None,
    targets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A block's embeddings ``(time, feature, h, w)`` on the S2 dates, or with ``daily`` on every day
    from ``first_day`` to ``last_day`` together with their flags ``(day, h, w)``; ``features``: only the first
    that many (a nested prefix).

    ``progress`` is called with the number of pixel-dates of each batch of the per-date pass. ``targets``
    ``(time, h, w)``: embed only these pixel-dates (the others NaN; ``stembed embed --extend``), without ``daily``.
    """
    if targets is not None and daily is not None:  # pragma: no cover - the extension refuses daily stores first
        raise ValueError("targets are for the per-date pass; a daily fill reads every date")
    fusion = model.fusion if isinstance(model, GapFillModel) else model
    kw: dict[str, Any] = {"batch_size": batch_size, "device": device, "precision": precision}
    values = embed_any(fusion, block, progress=progress, targets=targets, **kw)[:, :features]
    if daily is None:
        return values, None
    observed = np.isfinite(values).all(axis=1)  # (time, h, w)
    flags = np.where(observed, FLAG_OBSERVED, FLAG_NONE).astype(np.uint8)
    filler = model.filler if isinstance(model, GapFillModel) else model if isinstance(model, ContextFusionModel) else None
    if daily.model_fill and filler is not None:
        cloudy = ~observed
        filled = embed_any(filler, block, targets=cloudy, hide_s2_centre=True, **kw)[:, :features]
        got = cloudy & np.isfinite(filled).all(axis=1)
        values = np.where(got[:, None], filled, values)
        flags[got] = FLAG_MODEL
    out, out_flags, _ = fill_daily(
        values, flags, block[ANCHOR].days, method=daily.method, savgol_window_days=daily.savgol_window_days,
        savgol_order=daily.savgol_order, first_day=daily.first_day, last_day=daily.last_day,
    )
    return out, out_flags
