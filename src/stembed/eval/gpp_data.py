"""From an embedding cube and a flux tower to GPP training windows (spec §6, with section A's fixes).

1. :func:`tower_series`: the mean embedding over a window of pixels around the tower (default
   15 x 15 px; ``window_px=None`` = the whole cube, as the authors did), per date, NaNs skipped.
2. :func:`daily_series`: same-day duplicates averaged, then a daily grid filled by linear
   interpolation (the paper) with flat extension at the ends, or additionally smoothed by a
   Savitzky-Golay filter (scipy).
3. :func:`make_windows`: 90-day windows with stride 10 whose target is GPP on the last day; a
   window is skipped if its target is missing or any feature value is not finite.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr
from scipy.signal import savgol_filter

from stembed.types import FEATURE, TIME, X, Y


def tower_series(embedding: xr.DataArray, x: float, y: float, *, window_px: int | None = 15) -> pd.DataFrame:
    """Mean ``(time, feature)`` embedding around map coordinate ``(x, y)`` (the cube's CRS, metres).

    Raises:
        ValueError: the tower lies outside the cube, or ``window_px`` is not a positive odd number.
    """
    xs, ys = embedding[X].values, embedding[Y].values
    res_x, res_y = abs(xs[1] - xs[0]), abs(ys[1] - ys[0])
    if not (xs.min() - res_x / 2 <= x <= xs.max() + res_x / 2 and ys.min() - res_y / 2 <= y <= ys.max() + res_y / 2):
        raise ValueError(
            f"tower at x={x}, y={y} is outside the cube (x {xs.min()}..{xs.max()}, y {ys.min()}..{ys.max()}); "
            "give coordinates in the cube's CRS or build a cube around the tower"
        )
    if window_px is None:
        region = embedding
    else:
        if window_px < 1 or window_px % 2 == 0:
            raise ValueError(f"window_px must be a positive odd number of pixels, got {window_px}")
        i, j = int(np.abs(ys - y).argmin()), int(np.abs(xs - x).argmin())
        h = window_px // 2
        region = embedding.isel({Y: slice(max(i - h, 0), i + h + 1), X: slice(max(j - h, 0), j + h + 1)})
    mean = region.mean(dim=(Y, X), skipna=True).transpose(TIME, FEATURE)
    return pd.DataFrame(mean.values, index=pd.DatetimeIndex(mean[TIME].values, name="date"),
                        columns=[str(f) for f in mean[FEATURE].values])


def daily_series(
    series: pd.DataFrame,
    start: str | pd.Timestamp,
    end: str | pd.Timestamp,
    *,
    method: Literal["linear", "savgol"] = "linear",
    savgol_window_days: int = 31,
    savgol_order: int = 2,
) -> pd.DataFrame:
    """A value per calendar day from ``start`` to ``end`` (inclusive) from irregular observations."""
    obs = series.dropna(how="all")
    obs = obs.groupby(obs.index.normalize()).mean()  # same-day duplicates averaged
    days = pd.date_range(pd.Timestamp(start).normalize(), pd.Timestamp(end).normalize(), freq="D", name="date")
    if obs.empty:
        return pd.DataFrame(np.nan, index=days, columns=series.columns)
    full = obs.reindex(obs.index.union(days)).interpolate(method="time", limit_area="inside")
    full = full.ffill().bfill().reindex(days)  # flat extension beyond the first and last observation
    if method == "savgol":
        full = pd.DataFrame(savgol_filter(full.to_numpy(), savgol_window_days, savgol_order, axis=0),
                            index=days, columns=full.columns)
    elif method != "linear":
        raise ValueError(f"unknown interpolation method {method!r}; use 'linear' or 'savgol'")
    return full


def make_windows(
    features: pd.DataFrame, gpp: pd.Series, *, length_days: int = 90, stride_days: int = 10
) -> tuple[np.ndarray, np.ndarray, pd.DatetimeIndex]:
    """Windows ``(N, length_days, F)``, targets ``(N,)`` (GPP on each window's last day) and the end dates.

    ``features`` must be on a gap-free daily index (see :func:`daily_series`).
    """
    idx = features.index
    if len(idx) > 1 and not (idx[1:] - idx[:-1] == pd.Timedelta(days=1)).all():
        raise ValueError("features must be daily without gaps; build them with daily_series()")
    values = features.to_numpy(dtype=np.float64)
    target = gpp.reindex(idx).to_numpy(dtype=np.float64)
    xs, ys, ends = [], [], []
    for e in range(length_days - 1, len(idx), stride_days):
        w = values[e - length_days + 1 : e + 1]
        if not np.isfinite(target[e]) or not np.isfinite(w).all():
            continue
        xs.append(w)
        ys.append(target[e])
        ends.append(idx[e])
    n_feat = values.shape[1]
    x = np.stack(xs) if xs else np.empty((0, length_days, n_feat))
    return x.astype(np.float32), np.asarray(ys, dtype=np.float32), pd.DatetimeIndex(ends, name="date")
