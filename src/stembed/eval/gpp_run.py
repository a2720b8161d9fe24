"""``stembed eval gpp``: GPP regression at one flux tower from an embedding store and its scene store.

Three feature sets on identical windows (spec §6, section A fixes): the 7-d embedding, the 10 raw
S2 bands and NDVI, each the mean over a window of pixels around the tower (or over the whole cube),
interpolated to days and cut into 90-day windows whose target is GPP on the last day. Each set is
regressed by the GPP transformer (with its time encoding), ridge regression and a day-of-year
climatology (:mod:`stembed.eval.gpp`). Writes a metrics CSV, a predictions CSV and one PNG per
feature set.

Daily features span only the cube's own dates (first to last observation): the windows never read
flat-extended values beyond the imagery.

Held-out numbers are held out (:func:`resolve_split`): with no years given, the latest year of the
cube's windows validates and the earlier years train; given years must each hold windows and be
disjoint. A validation or test window whose 90 days overlap a training window's days (the windows
at a year boundary) is dropped, and the count reported, so no held-out window shares a day with
training data; a split left with no held-out window is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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
    split: YearSplit | None = None
    n_dropped_overlap: int = 0


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


def _years(windows: Windows) -> list[int]:
    return sorted({int(y) for y in windows.end_date.year})


def resolve_split(
    windows: Windows, split: YearSplit | None, window_days: int
) -> tuple[YearSplit, np.ndarray]:
    """The year split to run on ``windows``, and a mask dropping held-out windows that share training days.

    ``split=None`` adapts to the windows: the latest end year validates, the earlier years train.
    A window covers ``window_days`` days up to its end date; a validation or test window is dropped
    when those days meet a training window's days (test windows likewise against validation ones).

    Raises:
        GPPRunError: the years overlap, a named set holds no window of this cube, there is no
            held-out set, or every held-out window overlaps training windows in time.
    """
    years = _years(windows)
    if split is None:
        if len(years) < 2:
            raise GPPRunError(
                f"the GPP windows end in {years} only, and a train/validation split by year needs two "
                "years or more (one year would be scored in-sample); fix: use a cube and flux file that "
                "overlap over two years or more"
            )
        split = YearSplit(tuple(years[:-1]), (years[-1],), ())
    named = {"train": split.train_years, "val": split.val_years, "test": split.test_years}
    flat = [y for ys in named.values() for y in ys]
    shared = sorted({y for y in flat if flat.count(y) > 1})
    if shared:
        raise GPPRunError(
            f"years {shared} are in more than one of train {list(split.train_years)}, "
            f"val {list(split.val_years)} and test {list(split.test_years)}, so held-out numbers would be "
            "in-sample; fix: give disjoint "
            "--train-years, --val-years and --test-years"
        )
    if not split.val_years and not split.test_years:
        raise GPPRunError(
            "no validation or test years: every number would be in-sample; fix: pass --val-years"
        )
    end_year = windows.end_date.year.to_numpy()
    for name, ys in named.items():
        if ys and not np.isin(end_year, list(ys)).any():
            opt = {"train": "--train-years", "val": "--val-years", "test": "--test-years"}[name]
            raise GPPRunError(
                f"no window of this cube ends in the {name} years {list(ys)}: the windows end in {years}; "
                f"fix: pass {opt} with years among {years} (or omit the years: the latest then validates)"
            )
    keep = np.ones(len(windows), dtype=bool)
    ends = windows.end_date.to_numpy().astype("datetime64[D]").astype(np.int64)
    earlier = np.sort(ends[np.isin(end_year, list(split.train_years))])
    for ys in (split.val_years, split.test_years):
        part = np.isin(end_year, list(ys)) if ys else np.zeros(len(windows), dtype=bool)
        if part.any():
            keep[part] = _min_distance(ends[part], earlier) >= window_days  # spans of equal length meet
            earlier = np.sort(np.concatenate([earlier, ends[part & keep]]))
    for name, ys in (("validation", split.val_years), ("test", split.test_years)):
        part = np.isin(end_year, list(ys)) if ys else np.zeros(len(windows), dtype=bool)
        if part.any() and not (part & keep).any():
            raise GPPRunError(
                f"every {name} window (years {list(ys)}) shares days with training windows (each "
                f"window reads {window_days} days), so none is held out; fix: leave a gap year, or use a "
                "longer cube"
            )
    return split, keep


def _min_distance(days: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each of ``days``, the distance in days to the nearest of the sorted ``others`` (inf if none)."""
    if others.size == 0:
        return np.full(days.shape, np.inf)
    i = np.searchsorted(others, days)
    left = np.abs(days - others[np.clip(i - 1, 0, others.size - 1)])
    right = np.abs(others[np.clip(i, 0, others.size - 1)] - days)
    return np.minimum(left, right).astype(np.float64)


def gpp_at_tower(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    flux_csv: str | Path,
    out_dir: str | Path,
    *,
    tower_lonlat: tuple[float, float] | None,
    window_px: int = 15,
    split: YearSplit | None = None,
    interpolation: Literal["linear", "savgol"] = "linear",
    stride_days: int = 10,
    cfg: GPPConfig | None = None,
    seed: int = 0,
) -> GPPRun:
    """Run the GPP experiment at one tower and write ``gpp_metrics.csv``, ``gpp_predictions.csv`` and PNGs.

    ``split=None`` adapts the years to the cube (see :func:`resolve_split`, which also drops held-out
    windows sharing days with training ones); the split used is written to ``gpp_split.json``.
    """
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
    split, keep = resolve_split(sets["embedding"][site], split, cfg.window_days)
    sets = {name: {k: w.take(keep) for k, w in by_site.items()} for name, by_site in sets.items()}
    n_dropped = int((~keep).sum())
    metrics, preds = run_gpp_experiment(sets, split, cfg, seed, return_predictions=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpp_split.json").write_text(json.dumps({
        **asdict(split), "windows": int(keep.sum()), "held_out_windows_dropped_for_overlap": n_dropped,
        "rule": f"held-out windows sharing any of their {cfg.window_days} days with training are dropped",
    }, indent=2))
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
    return GPPRun(metrics, metrics_csv, preds_csv, plots, int(keep.sum()), split, n_dropped)
