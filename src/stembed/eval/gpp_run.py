"""``stembed eval gpp``: GPP regression at one flux tower from an embedding store and its scene store.

Three feature sets on identical windows (spec §6, section A fixes): the 7-d embedding, the 10 raw
S2 bands and NDVI, each the mean over a window of pixels around the tower (or over the whole cube),
interpolated to days and cut into 90-day windows whose target is GPP on the last day. Each set is
regressed by the GPP transformer (with its time encoding), ridge regression and a day-of-year
climatology (:mod:`stembed.eval.gpp`). Writes a metrics CSV, a predictions CSV and one PNG per
feature set.

Daily features span only the cube's own dates (first to last observation): the windows never read
flat-extended values beyond the imagery.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyproj
import xarray as xr

from stembed.errors import UserError
from stembed.eval.fluxnet import load_fluxnet_daily
from stembed.eval.gpp import (
    GPPConfig,
    Windows,
    YearSplit,
    common_windows,
    plot_gpp_series,
    run_gpp_experiment,
)
from stembed.eval.gpp_data import daily_series, make_windows, tower_series
from stembed.types import BAND, FEATURE, TIME, X, Y


class GPPRunError(UserError):
    """Inputs that cannot make GPP windows; the message names the problem and the fix."""


@dataclass(frozen=True)
class GPPRun:
    """Where ``gpp_at_tower`` wrote its outputs, and the metrics table."""

    metrics: pd.DataFrame
    metrics_csv: Path
    predictions_csv: Path
    plots: list[Path]
    n_windows: int


def _ndvi(s2: xr.DataArray) -> xr.DataArray:
    nir, red = s2.sel({BAND: "B08"}), s2.sel({BAND: "B04"})
    ndvi = (nir - red) / (nir + red)
    return ndvi.expand_dims({FEATURE: ["NDVI"]}).transpose(TIME, FEATURE, Y, X)


def feature_series(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    *,
    tower_lonlat: tuple[float, float] | None,
    window_px: int = 15,
) -> dict[str, pd.DataFrame]:
    """Per-date mean embedding, raw bands and NDVI around the tower (``tower_lonlat`` None: whole cube)."""
    if not (
        np.array_equal(s2[Y].values, embeddings[Y].values)
        and np.array_equal(s2[X].values, embeddings[X].values)
    ):
        raise GPPRunError(
            "the S2 cube is not on the embedding store's grid; fix: pass the scene the store was made from"
        )
    if tower_lonlat is None:
        x, y = float(embeddings[X].values.mean()), float(embeddings[Y].values.mean())
        win: int | None = None
    else:
        to_crs = pyproj.Transformer.from_crs("EPSG:4326", embeddings.attrs["crs"], always_xy=True)
        x, y = to_crs.transform(*tower_lonlat)
        win = window_px
        xs, ys = embeddings[X].values, embeddings[Y].values
        half = abs(float(xs[1] - xs[0])) / 2 if len(xs) > 1 else 5.0
        if not (xs.min() - half <= x <= xs.max() + half and ys.min() - half <= y <= ys.max() + half):
            lon, lat = to_crs.transform(  # the cube's corners, for a message in the units --tower takes
                [xs.min() - half, xs.max() + half], [ys.min() - half, ys.max() + half], direction="INVERSE"
            )
            raise GPPRunError(
                f"the tower at lon {tower_lonlat[0]}, lat {tower_lonlat[1]} is outside the cube (lon "
                f"{min(lon):.5f}..{max(lon):.5f}, lat {min(lat):.5f}..{max(lat):.5f}); fix: check --tower "
                "LON LAT (WGS84), build a cube around the tower, or pass --whole-cube"
            )
    emb = embeddings["embedding"].where(embeddings["valid"])
    bands = s2.rename({BAND: FEATURE}).assign_coords({FEATURE: [str(b) for b in s2[BAND].values]})
    out = {}
    for name, cube in (("embedding", emb), ("raw_bands", bands), ("ndvi", _ndvi(s2))):
        try:
            out[name] = tower_series(cube, x, y, window_px=win)  # reads only the window
        except ValueError as e:
            raise GPPRunError(f"{e}; or pass --whole-cube to average the whole cube") from e
    return out


def _check_years(windows: Windows, split: YearSplit) -> None:
    """Refuse a year split whose training years hold no window (the models would have nothing to fit)."""
    years = sorted({int(y) for y in windows.end_date.year})
    if isinstance(split, YearSplit) and not set(split.train_years) & set(years):
        raise GPPRunError(
            f"no window ends in the training years {list(split.train_years)}: the windows end in {years}; "
            f"fix: pass --train-years (and --val-years) with years among {years}"
        )


def gpp_at_tower(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    flux_csv: str | Path,
    out_dir: str | Path,
    *,
    tower_lonlat: tuple[float, float] | None,
    window_px: int = 15,
    split: YearSplit,
    interpolation: Literal["linear", "savgol"] = "linear",
    stride_days: int = 10,
    cfg: GPPConfig | None = None,
    seed: int = 0,
) -> GPPRun:
    """Run the GPP experiment at one tower and write ``gpp_metrics.csv``, ``gpp_predictions.csv`` and PNGs."""
    cfg = cfg or GPPConfig()
    out_dir = Path(out_dir)
    flux = load_fluxnet_daily(flux_csv)
    site = str(flux.attrs.get("site", Path(flux_csv).stem))
    gpp = flux["gpp"]
    series = feature_series(embeddings, s2, tower_lonlat=tower_lonlat, window_px=window_px)
    times = pd.DatetimeIndex(embeddings[TIME].values)
    start, end = times.min().normalize(), times.max().normalize()
    sets: dict[str, dict[str, Windows]] = {}
    for name, s in series.items():
        daily = daily_series(s, start, end, method=interpolation)
        x, t, ends = make_windows(daily, gpp, length_days=cfg.window_days, stride_days=stride_days)
        sets[name] = {site: Windows.from_make_windows((x, t, ends), site)}
    sets = common_windows(sets)
    n = len(sets["embedding"][site])
    if n == 0:
        raise GPPRunError(
            f"no {cfg.window_days}-day window of the cube ({start.date()}..{end.date()}) ends on a day with "
            f"quality-checked GPP at {site} (flux {gpp.index.min().date()}..{gpp.index.max().date()}); "
            "fix: use a cube and flux file that overlap by more than the window length"
        )
    _check_years(sets["embedding"][site], split)
    metrics, preds = run_gpp_experiment(sets, split, cfg, seed, return_predictions=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_csv, preds_csv = out_dir / "gpp_metrics.csv", out_dir / "gpp_predictions.csv"
    metrics.to_csv(metrics_csv, index=False)
    preds.to_csv(preds_csv, index=False)
    plots = []
    for fs, p in preds.groupby("feature_set"):
        obs = p[p["model"] == p["model"].iloc[0]].sort_values("end_date")
        lines = {
            m: g.sort_values("end_date")["pred"].to_numpy()
            for m, g in p.groupby("model")
            if len(g) == len(obs)
        }
        plots.append(
            plot_gpp_series(
                pd.DatetimeIndex(obs["end_date"]),
                obs["obs"].to_numpy(),
                lines,
                out_dir / f"gpp_{fs}.png",
                title=f"{site}: GPP from {fs}",
            )
        )
    return GPPRun(metrics, metrics_csv, preds_csv, plots, n)
