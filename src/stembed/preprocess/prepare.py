"""From physical sensor values to contract cubes (spec §1.2-1.3); xarray in, xarray out, no torch.

* Sentinel-2: reflectance + SCL -> :func:`prepare_s2` (mask clouds/shadows, clip to [0, 1], drop
  dates with too few valid values).
* Sentinel-1: linear backscatter power on the S1's own dates -> :func:`prepare_s1` (3-frame rolling
  mean in linear power, dB, clip, scale to [0, 1]).
* :func:`match_s1_to_s2` then puts a prepared S1 cube on the S2 dates. It runs *after*
  :func:`prepare_s1` on purpose: the rolling mean must average consecutive S1 acquisitions, not S1
  scenes repeated onto several S2 dates.

All functions take and return ``(time, band, y, x)`` DataArrays (SCL: ``(time, y, x)``) and keep the
input's attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.contract import CubeError
from stembed.sensors import S1_DB_MAX, S1_DB_MIN
from stembed.types import BAND, CUBE_DIMS, TIME, X, Y

SCL_MASKED_DEFAULT = (0, 1, 3, 8, 9, 10)
"""SCL classes masked by default: no data, saturated/defective, cloud shadow, cloud (medium, high), cirrus."""

_S2_DN_MEAN = 1.5  # mean clear-sky reflectance is ~0.1-0.3; a mean above this means digital numbers


def _require_dims(da: xr.DataArray, dims: tuple[str, ...], what: str) -> None:
    if not isinstance(da, xr.DataArray) or tuple(da.dims) != dims:
        got = tuple(da.dims) if isinstance(da, xr.DataArray) else type(da).__name__
        raise CubeError(f"{what} must be a DataArray with dims {dims}, got {got}; fix: da.transpose{dims}")


def valid_date_fraction(cube: xr.DataArray) -> xr.DataArray:
    """Share of non-NaN values per date, over band x y x: the quantity the S2 date filter thresholds."""
    return cube.notnull().mean((BAND, Y, X))


def mask_s2(reflectance: xr.DataArray, scl: xr.DataArray, masked_classes: Sequence[int]) -> xr.DataArray:
    """Set every band of a pixel to NaN where its SCL class is in ``masked_classes``."""
    _require_dims(reflectance, CUBE_DIMS, "reflectance")
    _require_dims(scl, (TIME, Y, X), "scl")
    want = (reflectance.sizes[TIME], reflectance.sizes[Y], reflectance.sizes[X])
    if scl.shape != want:
        raise CubeError(
            f"scl has shape {scl.shape} (time, y, x) but reflectance has {want}; "
            "fix: read both for the same dates and grid"
        )
    if TIME in scl.coords and not np.array_equal(scl[TIME].values, reflectance[TIME].values):
        raise CubeError("scl and reflectance have different times; fix: select the same dates in both")
    keep = xr.DataArray(~np.isin(np.asarray(scl.values), list(masked_classes)), dims=(TIME, Y, X))
    out = reflectance.where(keep)
    out.attrs = dict(reflectance.attrs)
    return out


def prepare_s2(
    reflectance: xr.DataArray,
    scl: xr.DataArray,
    *,
    masked_classes: Sequence[int] = SCL_MASKED_DEFAULT,
    min_valid_fraction: float = 0.03,
) -> xr.DataArray:
    """Surface reflectance (not DN) and SCL -> the S2 part of a cube.

    Masks ``masked_classes``, clips to [0, 1] (NaN stays NaN), and keeps a date only if at least
    ``min_valid_fraction`` of its values (over band x y x) are valid (spec §1.2: 3 % for training).
    A date with no valid value is always dropped. Returns float32.

    Raises:
        CubeError: the input looks like digital numbers (DN) rather than reflectance.
    """
    masked = mask_s2(reflectance, scl, masked_classes)
    mean = float(masked.mean())
    if mean > _S2_DN_MEAN:
        raise CubeError(
            f"prepare_s2 got values with mean {mean:.4g}: this looks like digital numbers, not reflectance; "
            "fix: multiply by 1e-4 (for processing baseline >= 04.00 first add BOA_ADD_OFFSET: "
            "(DN - 1000) * 1e-4)"
        )
    clipped = masked.clip(0.0, 1.0)
    frac = valid_date_fraction(clipped).values
    keep = np.flatnonzero((frac >= min_valid_fraction) & (frac > 0))
    out = clipped.isel({TIME: keep}).astype(np.float32)
    out.attrs = dict(reflectance.attrs)
    return out


def prepare_s1(linear: xr.DataArray) -> xr.DataArray:
    """Linear backscatter power on the S1's own dates -> the S1 part of a cube (spec §1.3).

    Steps: 3-frame centred rolling mean along ``time`` in *linear* power (NaN-skipping, at least one
    valid frame, so the first/last dates average two frames and a missing frame does not poison its
    neighbours), then ``10 * log10``, clip to [S1_DB_MIN, S1_DB_MAX] = [-30, 5] dB, then
    ``(dB + 30) / 35``. Returns float32 in [0, 1].

    A pixel that is NaN on a date stays NaN on that date (its neighbours' mean is not copied in):
    the smoothing reduces speckle, it does not invent acquisitions. Run this before
    :func:`match_s1_to_s2`, on the S1 time axis.

    Raises:
        CubeError: negative values (the input looks like dB, not linear power).
    """
    _require_dims(linear, CUBE_DIMS, "S1 linear power")
    vmin = float(linear.min())
    if vmin < 0:
        raise CubeError(
            f"prepare_s1 expects linear power (>= 0) but found values down to {vmin:.4g}: "
            "this looks like dB; fix: pass 10 ** (dB / 10)"
        )
    lin = linear.astype(np.float64)
    smooth = lin.rolling({TIME: 3}, center=True, min_periods=1).mean().where(lin.notnull())
    with np.errstate(divide="ignore"):  # 0 power -> -inf dB, clipped to S1_DB_MIN below
        db = 10.0 * xr.ufuncs.log10(smooth)
    db = db.clip(S1_DB_MIN, S1_DB_MAX)
    out = ((db - S1_DB_MIN) / (S1_DB_MAX - S1_DB_MIN)).astype(np.float32).transpose(*CUBE_DIMS)
    out.attrs = dict(linear.attrs)
    return out


def match_s1_to_s2(
    s1: xr.DataArray, s2_times: Any, *, max_gap_days: float = 6.0, trailing: bool = False
) -> xr.DataArray:
    """Put an S1 cube (on its own dates) on the S2 time axis.

    Each S2 date takes the nearest S1 date (a tie goes to the earlier S1 date), so several S2 dates
    may share one S1 scene. Where the nearest S1 date is more than ``max_gap_days`` away, that
    date's S1 values are all NaN. The S1 acquisition used is kept as the coordinate ``s1_time``
    along ``time`` (NaT where none was close enough).

    Args:
        s1: S1 cube on its own, sorted, unique dates.
        s2_times: the target dates (array-like of datetimes, e.g. ``s2["time"].values``).
        max_gap_days: largest accepted |S1 date - S2 date|, in days (fractions count).
        trailing: only S1 dates on or before the S2 date (a trailing model reads nothing after its date, so an S1
            acquisition that arrives later never changes the match of a date already embedded).
    """
    _require_dims(s1, CUBE_DIMS, "s1")
    t1 = pd.DatetimeIndex(s1[TIME].values)
    if len(t1) == 0:
        raise CubeError("the S1 cube has no dates; fix: read S1 for the period of the S2 cube")
    if not (t1.is_unique and t1.is_monotonic_increasing):
        raise CubeError("S1 times must be sorted and unique; fix: s1.sortby('time'), merge duplicate dates")
    t2 = np.asarray(pd.DatetimeIndex(np.asarray(s2_times)), dtype="datetime64[ns]")
    n1 = t1.asi8
    n2 = t2.astype(np.int64)

    after = np.searchsorted(n1, n2, side="left")  # first S1 date >= the S2 date
    before = after - 1
    gap_before = np.where(before >= 0, n2 - n1[np.clip(before, 0, None)], np.inf)
    gap_after = np.where(after < len(n1), n1[np.clip(after, None, len(n1) - 1)] - n2, np.inf)
    if trailing:
        gap_after = np.where(gap_after == 0, 0.0, np.inf)  # the same instant is on the date; later is not
    pick = np.where(gap_before <= gap_after, before, after)
    close = np.minimum(gap_before, gap_after) <= max_gap_days * 86_400e9

    out = s1.isel({TIME: pick}).where(xr.DataArray(close, dims=TIME))
    s1_time = np.where(close, t1.values[pick], np.datetime64("NaT", "ns"))
    out = out.assign_coords({TIME: t2, "s1_time": (TIME, s1_time)})
    out.attrs = dict(s1.attrs)
    return out


def merge_same_day(
    arrays: list[np.ndarray], times: np.ndarray, valid: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Merge acquisitions that fall on one calendar day: per pixel, the first valid one (tile overlaps, same-day passes).

    ``arrays`` have time first and y, x last; ``valid`` is (time, y, x). Returns the merged arrays
    and the first timestamp of each day.
    """
    stamps = pd.DatetimeIndex(times)
    day_codes, days = pd.factorize(stamps.normalize())
    if len(days) == len(stamps):
        return arrays, times
    ny, nx = valid.shape[1:]
    pick = np.empty((len(days), ny, nx), dtype=np.intp)
    first = np.empty(len(days), dtype=np.intp)
    for g in range(len(days)):
        idx = np.flatnonzero(day_codes == g)
        first[g] = idx[0]
        pick[g] = idx[np.argmax(valid[idx], axis=0)]  # first valid acquisition, or the first if none is
    merged = []
    for a in arrays:
        index = pick.reshape(pick.shape[:1] + (1,) * (a.ndim - 3) + pick.shape[1:])
        merged.append(np.take_along_axis(a, index, axis=0))
    return merged, times[first]
