"""AgERA5 daily weather as a third sensor (``"agera5"``): the companion-sensor plugin built into stembed.

Source: the ``AgERA5_DAILY_1000m_*.nc`` file of a WorldCereal extraction folder, next to its S2/S1
files (Copernicus C3S AgERA5 agrometeorological indicators, resampled by the extraction). It holds one
cell, shape (timestamp, y=1, x=1), daily, float32, fill -9999, whose ``bounds`` attribute is the
extraction's patch: the one value describes the whole 640 m patch.

Preprocessing (also the spec's ``normalisation`` text, so it travels in every bundle):

1. fill (-9999, the variable's ``_FillValue``) and non-finite values -> NaN;
2. *antecedent weather*: each day's value is the mean of that day and the 9 calendar days before it
   (a trailing 10-day window on the complete daily calendar). All 10 days must be present, else the
   day is NaN, so the first 9 days of a file (and any window touching a gap) are missing rather than
   averaged over fewer days: a partial mean would shift the value's meaning (e.g. rain totals);
3. each band's fixed physical range (:data:`RANGES`) mapped linearly to [0, 1] and clipped. The
   ranges are fixed (not data statistics) so that one model sees one scale at every site; they cover
   both development sites (West Flanders 2017-18 and Arusha, Tanzania 2019-21, raw daily extremes:
   temperatures 259-308 K, precipitation <= 69 mm/d, solar <= 2.9e7 J m-2 d-1, vapour pressure
   <= 24 hPa, wind <= 9 m/s) with room to spare; 10-day means hit the clip only in extreme climates;
4. the daily series is broadcast to every pixel of the scene's 10 m S2 grid (``resolution_m`` 10 is
   that grid, not the ~10 km of AgERA5). A broadcast cube costs days x 8 bands x pixels x 4 bytes,
   e.g. 487 x 8 x 64 x 64 x 4 = 64 MB for the Belgian patch: accepted to keep the one cube contract.

The cube's ``time`` holds the file's daily timestamps (00:00 UTC). With the plugin's
``match_max_gap_days`` of 0.5 a fusion frame takes the day whose 00:00 lies within 12 h of the S2
acquisition: the same UTC day for overpasses before 12:00 UTC (Europe, Africa, Asia), the next day
for sites west of about 22 W (local solar 10:30 after 12:00 UTC).

Importing this module registers the sensor (:func:`stembed.sensors.register_sensor`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stembed.contract import CubeError, Scene, make_cube
from stembed.sensors import SensorPlugin, SensorSpec, register_sensor
from stembed.types import TIME, X, Y

FILE_PATTERN = "AgERA5_DAILY_*.nc"
WINDOW_DAYS = 10  # the day itself and the 9 before it
SOURCE = "AgERA5 daily agrometeorological indicators (Copernicus C3S), WorldCereal extraction"

# band -> (NetCDF variable, unit, physical value mapped to 0, physical value mapped to 1)
RANGES: dict[str, tuple[str, str, float, float]] = {
    "TMEAN": ("temperature_mean", "K", 240.0, 320.0),
    "TMIN": ("temperature_min", "K", 240.0, 320.0),
    "TMAX": ("temperature_max", "K", 240.0, 320.0),
    "DEWPOINT": ("dewpoint_temperature", "K", 240.0, 320.0),
    "PRECIP": ("precipitation_flux", "mm d-1", 0.0, 50.0),
    "SOLAR": ("solar_radiation_flux", "J m-2 d-1", 0.0, 3.5e7),
    "VAPOUR": ("vapour_pressure", "hPa", 0.0, 45.0),
    "WIND": ("wind_speed", "m s-1", 0.0, 20.0),
}
_NODATA = -9999.0
_BOUNDS_TOL_M = 0.5

AGERA5 = SensorSpec(
    name="agera5",
    bands=tuple(RANGES),
    valid_range=(0.0, 1.0),
    normalisation=(
        "AgERA5 daily (WorldCereal AgERA5_DAILY_*.nc, one cell per patch): -9999 -> NaN; "
        "trailing 10-day mean (the day and the 9 before it, all 10 required, else NaN); "
        "then (v - lo) / (hi - lo) clipped to [0, 1] with lo..hi = "
        + ", ".join(f"{b} {var} {lo:g}..{hi:g} {unit}" for b, (var, unit, lo, hi) in RANGES.items())
        + "; broadcast to every pixel of the 10 m S2 grid"
    ),
    resolution_m=10.0,
)


def load_agera5(scene: Scene, site_folder: Path | None) -> xr.DataArray:
    """The plugin's loader: ``scene``'s AgERA5 cube from the one ``AgERA5_DAILY_*.nc`` in ``site_folder``.

    Raises:
        CubeError: no folder, no file or several files, or the file does not fit the scene
            (see :func:`agera5_cube`).
    """
    where = (
        "the agera5 sensor reads AgERA5_DAILY_*.nc next to the WorldCereal S2/S1 files; fix: use a "
        "WorldCereal data source (data.source.kind: worldcereal) whose folders hold that file, or drop "
        "'agera5' from data.extra_sensors"
    )
    if site_folder is None:
        raise CubeError(f"scene {scene.site!r} has no source folder (synthetic or zarr data source): {where}")
    folder = Path(site_folder)
    matches = sorted(folder.glob(FILE_PATTERN))
    if not matches:
        raise CubeError(f"no file matching {FILE_PATTERN} in {folder}: {where}")
    if len(matches) > 1:
        raise CubeError(
            f"several files match {FILE_PATTERN} in {folder}: {[m.name for m in matches]}; "
            "fix: keep the one from the same extraction as the S2/S1 files"
        )
    return agera5_cube(matches[0], scene)


def read_agera5_daily(path: str | Path) -> xr.DataArray:
    """The raw daily weather of one AgERA5 file as ``(time, band)`` in physical units (NaN = missing).

    Raises:
        CubeError: the file is unreadable, lacks a variable, has more than one cell, or repeats a day.
    """
    path = Path(path)
    try:
        with xr.open_dataset(path, mask_and_scale=False) as ds:
            ds = ds.load()
    except (OSError, ValueError) as e:
        raise CubeError(
            f"{path} is not a readable NetCDF file ({type(e).__name__}: {e}); fix: check the file"
        ) from e
    missing = [var for var, *_ in RANGES.values() if var not in ds.data_vars]
    if missing:
        raise CubeError(
            f"{path.name} lacks the AgERA5 variables {missing} (has {sorted(map(str, ds.data_vars))}); "
            "fix: use the AgERA5_DAILY file of a WorldCereal extraction"
        )
    columns = []
    for var, *_ in RANGES.values():
        da = ds[var]
        if da.sizes.get(Y, 1) != 1 or da.sizes.get(X, 1) != 1 or set(da.dims) - {"timestamp", Y, X}:
            raise CubeError(
                f"{path.name}: {var} has dims {dict(da.sizes)}, expected (timestamp, y=1, x=1), "
                "one cell per patch; "
                "fix: this reader takes the WorldCereal single-cell extraction"
            )
        v = da.values.reshape(-1).astype(np.float64)
        fill = float(da.attrs.get("_FillValue", _NODATA))
        columns.append(np.where((v == fill) | (v == _NODATA) | ~np.isfinite(v), np.nan, v))
    times = pd.DatetimeIndex(ds["timestamp"].values)
    if not times.normalize().is_unique:
        raise CubeError(f"{path.name} has several timestamps on one day; fix: expected one value per day")
    order = np.argsort(times.asi8, kind="stable")
    out = xr.DataArray(
        np.stack(columns, axis=1)[order],
        dims=(TIME, "band"),
        coords={TIME: np.asarray(times[order], dtype="datetime64[ns]"), "band": list(RANGES)},
        attrs={k: ds.attrs[k] for k in ("location_id", "epsg", "bounds") if k in ds.attrs},
    )
    return out


def antecedent_mean(daily: xr.DataArray, window_days: int = WINDOW_DAYS) -> xr.DataArray:
    """Trailing mean over ``window_days`` calendar days (the day and the ones before it); all must be present.

    Works on the complete calendar, so a day absent from the input counts as missing, not as skipped.
    """
    times = pd.DatetimeIndex(daily[TIME].values)
    days = times.normalize()
    calendar = pd.date_range(days.min(), days.max(), freq="D")
    frame = pd.DataFrame(daily.values, index=days).reindex(calendar)
    rolled = frame.rolling(window_days, min_periods=window_days).mean().loc[days]
    return daily.copy(data=rolled.to_numpy())


def normalise_agera5(daily: xr.DataArray) -> xr.DataArray:
    """Physical ``(time, band)`` -> antecedent 10-day means mapped to [0, 1] by :data:`RANGES` (NaN kept)."""
    mean = antecedent_mean(daily)
    lo = np.array([RANGES[b][2] for b in mean["band"].values])
    hi = np.array([RANGES[b][3] for b in mean["band"].values])
    scaled = np.clip((mean.values - lo) / (hi - lo), 0.0, 1.0)
    return mean.copy(data=scaled.astype(np.float32))


def agera5_cube(path: str | Path, scene: Scene) -> xr.DataArray:
    """Read, preprocess and broadcast one AgERA5 file onto ``scene``'s S2 grid: a cube for :data:`AGERA5`.

    Raises:
        CubeError: the file's CRS or bounds do not cover the scene grid, or its period misses the S2 dates.
    """
    path = Path(path)
    daily = read_agera5_daily(path)
    s2 = scene.s2
    y, x = s2[Y].values.astype(np.float64), s2[X].values.astype(np.float64)
    crs = str(s2.attrs.get("crs"))
    _check_covers(path, daily.attrs, crs, y, x)
    s2_times = pd.DatetimeIndex(s2[TIME].values)
    t = pd.DatetimeIndex(daily[TIME].values)
    if t.max() < s2_times.min() - pd.Timedelta(days=1) or t.min() > s2_times.max() + pd.Timedelta(days=1):
        raise CubeError(
            f"{path.name} covers {t.min().date()}..{t.max().date()} but the scene's S2 dates span "
            f"{s2_times.min().date()}..{s2_times.max().date()}; "
            "fix: use the AgERA5 file of the same extraction"
        )
    norm = normalise_agera5(daily)
    values = np.ascontiguousarray(
        np.broadcast_to(norm.values[:, :, None, None], (*norm.shape, y.size, x.size)), dtype=np.float32
    )  # (time, band, y, x): one cell for every pixel; a real copy, so the cube is writable
    complete = int(np.isfinite(norm.values).all(axis=1).sum())
    provenance: dict[str, Any] = {
        "source": SOURCE,
        "reader": "stembed.io.agera5.load_agera5",
        "files": {path.name: _sha256(path)},
        "location_id": str(daily.attrs.get("location_id", "")),
        "bounds": daily.attrs.get("bounds"),
        "variables": {
            b: {"variable": var, "unit": unit, "range": [lo, hi]} for b, (var, unit, lo, hi) in RANGES.items()
        },
        "preprocessing": AGERA5.normalisation,
        "window_days": WINDOW_DAYS,
        "days_in_file": int(t.size),
        "days_with_all_bands": complete,
    }
    return make_cube(
        values,
        times=norm[TIME].values,
        bands=AGERA5.bands,
        y=y,
        x=x,
        crs=crs,
        sensor=AGERA5.name,
        site=scene.site,
        provenance=provenance,
    )


def _check_covers(path: Path, attrs: dict[str, Any], crs: str, y: np.ndarray, x: np.ndarray) -> None:
    """The file's one cell stands for its ``bounds``: the scene grid must lie inside them, in the same CRS."""
    epsg = attrs.get("epsg")
    if epsg is not None:
        import pyproj

        try:
            same = pyproj.CRS.from_user_input(f"EPSG:{int(epsg)}") == pyproj.CRS.from_user_input(crs)
        except (pyproj.exceptions.CRSError, ValueError, TypeError):
            same = False
        if not same:
            raise CubeError(
                f"{path.name} is in EPSG:{epsg} but the scene grid is in {crs}; "
                "fix: use the AgERA5 file of the scene's own extraction folder"
            )
    bounds = attrs.get("bounds")
    if bounds is None:
        return
    try:
        xmin, ymin, xmax, ymax = (float(b) for b in np.asarray(bounds).reshape(-1))
    except (TypeError, ValueError):
        raise CubeError(
            f"{path.name} has an unreadable 'bounds' attribute {bounds!r}; expected [xmin, ymin, xmax, ymax]"
        ) from None
    half_x = abs(float(x[1] - x[0])) / 2 if x.size > 1 else 5.0
    half_y = abs(float(y[1] - y[0])) / 2 if y.size > 1 else 5.0
    left, right, bottom, top = x.min() - half_x, x.max() + half_x, y.min() - half_y, y.max() + half_y
    tol = _BOUNDS_TOL_M
    if left < xmin - tol or right > xmax + tol or bottom < ymin - tol or top > ymax + tol:
        raise CubeError(
            f"the scene grid (x {left:g}..{right:g}, y {bottom:g}..{top:g}) is not inside the area of "
            f"{path.name} "
            f"(x {xmin:g}..{xmax:g}, y {ymin:g}..{ymax:g}), whose one weather cell describes only that area; "
            "fix: use the AgERA5 file of the scene's own extraction folder"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


PLUGIN = SensorPlugin(spec=AGERA5, latent_dim=3, reduced_tokens=6, match_max_gap_days=0.5, load=load_agera5)
register_sensor(PLUGIN)
