"""``stembed eval gpp``: GPP regression at a flux tower from an embedding store and its scene store, or at
several towers, each held out in turn (:func:`gpp_leave_one_site_out`, ``--towers``).

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
import warnings
from collections.abc import Sequence
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
    SiteSplit,
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
    split: YearSplit | None = None  # None: leave-one-site-out
    n_dropped_overlap: int = 0
    split_info: dict[str, object] | None = None  # what gpp_split.json says


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
    _check_years(split, windows, years)
    end_year = windows.end_date.year.to_numpy()
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


def _check_years(split: YearSplit, windows: Windows, years: list[int]) -> None:
    """Refuse years in more than one set, no held-out set, and a set without a window of this cube."""
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


def _min_distance(days: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each of ``days``, the distance in days to the nearest of the sorted ``others`` (inf if none)."""
    if others.size == 0:
        return np.full(days.shape, np.inf)
    i = np.searchsorted(others, days)
    left = np.abs(days - others[np.clip(i - 1, 0, others.size - 1)])
    right = np.abs(others[np.clip(i, 0, others.size - 1)] - days)
    return np.minimum(left, right).astype(np.float64)


def tower_windows(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    flux_csv: str | Path,
    *,
    tower_lonlat: tuple[float, float] | None,
    window_px: int = 15,
    interpolation: Literal["linear", "savgol"] = "linear",
    stride_days: int = 10,
    cfg: GPPConfig | None = None,
    site: str | None = None,
) -> tuple[str, dict[str, Windows]]:
    """One tower's windows for each feature set, on identical end dates: ``(site, {feature set: windows})``.

    ``site`` names the windows (default: the flux file's site id).

    Raises:
        GPPRunError: no window of the cube ends on a day with quality-checked GPP.
    """
    cfg = cfg or GPPConfig()
    flux = load_fluxnet_daily(flux_csv)
    site = site or str(flux.attrs.get("site", Path(flux_csv).stem))
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
    if len(sets["embedding"][site]) == 0:
        raise GPPRunError(
            f"no {cfg.window_days}-day window of the cube ({start.date()}..{end.date()}) ends on a day with "
            f"quality-checked GPP at {site} (flux {gpp.index.min().date()}..{gpp.index.max().date()}); "
            "fix: use a cube and flux file that overlap by more than the window length"
        )
    return site, {name: by_site[site] for name, by_site in sets.items()}


def _write_outputs(
    out_dir: Path, metrics: pd.DataFrame, preds: pd.DataFrame, split_info: dict[str, object]
) -> tuple[Path, Path, list[Path]]:
    """``gpp_split.json``, ``gpp_metrics.csv``, ``gpp_predictions.csv`` and one PNG per feature set and site."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpp_split.json").write_text(json.dumps(split_info, indent=2))
    metrics_csv, preds_csv = out_dir / "gpp_metrics.csv", out_dir / "gpp_predictions.csv"
    metrics.to_csv(metrics_csv, index=False)
    preds.to_csv(preds_csv, index=False)
    sites = sorted(preds["site"].unique())
    plots = []
    for (fs, site), p in preds.groupby(["feature_set", "site"]):
        obs = p[p["model"] == p["model"].iloc[0]].sort_values("end_date")
        lines = {
            m: g.sort_values("end_date")["pred"].to_numpy()
            for m, g in p.groupby("model")
            if len(g) == len(obs)
        }
        name = f"gpp_{fs}.png" if len(sites) == 1 else f"gpp_{fs}_{site}.png"
        plots.append(plot_gpp_series(pd.DatetimeIndex(obs["end_date"]), obs["obs"].to_numpy(), lines,
                                     out_dir / name, title=f"{site}: GPP from {fs}"))
    return metrics_csv, preds_csv, plots


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
    site, by_set = tower_windows(embeddings, s2, flux_csv, tower_lonlat=tower_lonlat, window_px=window_px,
                                 interpolation=interpolation, stride_days=stride_days, cfg=cfg)
    split, keep = resolve_split(by_set["embedding"], split, cfg.window_days)
    sets = {name: {site: w.take(keep)} for name, w in by_set.items()}
    n_dropped = int((~keep).sum())
    metrics, preds = run_gpp_experiment(sets, split, cfg, seed, return_predictions=True)
    info = {
        **asdict(split), "windows": int(keep.sum()), "held_out_windows_dropped_for_overlap": n_dropped,
        "rule": f"held-out windows sharing any of their {cfg.window_days} days with training are dropped",
    }
    metrics_csv, preds_csv, plots = _write_outputs(Path(out_dir), metrics, preds, info)
    return GPPRun(metrics, metrics_csv, preds_csv, plots, int(keep.sum()), split, n_dropped, info)


# ----------------------------------------------------------------------------- several towers
@dataclass(frozen=True)
class Tower:
    """One row of a towers table: a flux tower, its embedding store, the scene store it came from."""

    site: str
    embeddings: Path
    cube: Path
    flux: Path
    lonlat: tuple[float, float] | None  # None: the whole cube is the footprint


TOWER_COLUMNS = ("site", "embeddings", "cube", "flux", "lon", "lat")


def read_towers(path: str | Path) -> list[Tower]:
    """Read and check a towers CSV (columns ``site, embeddings, cube, flux, lon, lat``; empty ``lon`` and
    ``lat``: the whole cube). Relative paths resolve from the CSV's folder. Every row is checked before
    anything runs.

    Raises:
        GPPRunError: the file is missing or unreadable, a column is missing, a site id repeats, a
            coordinate is not a number, or a named file does not exist; the message names the row.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise GPPRunError(f"towers table {path} does not exist; fix: pass a CSV with columns "
                          f"{', '.join(TOWER_COLUMNS)}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, IsADirectoryError) as e:
        raise GPPRunError(f"towers table {path} is not a readable CSV ({type(e).__name__}); fix: write it with "
                          f"the header {','.join(TOWER_COLUMNS)}") from None
    missing = [c for c in TOWER_COLUMNS if c not in table.columns]
    if missing:
        raise GPPRunError(f"towers table {path} lacks the columns {missing}; fix: give the header "
                          f"{','.join(TOWER_COLUMNS)} (lon and lat may be empty: the whole cube)")
    dup = sorted(table["site"][table["site"].duplicated()].unique())
    if dup:
        raise GPPRunError(f"towers table {path} names the sites {dup} more than once; fix: one row per tower")
    towers = []
    for i, row in table.iterrows():
        where = f"towers table {path}, row {int(i) + 2} (site {row['site']!r})"  # + header, 1-based
        if not row["site"].strip():
            raise GPPRunError(f"{where}: the site is empty; fix: give every tower an id")
        lon, lat = row["lon"].strip(), row["lat"].strip()
        lonlat = None
        if lon or lat:
            try:
                lonlat = (float(lon), float(lat))
            except ValueError:
                raise GPPRunError(f"{where}: lon {lon!r} / lat {lat!r} are not numbers; fix: WGS84 degrees, "
                                  "or both empty for the whole cube") from None
            if not (-180 <= lonlat[0] <= 180 and -90 <= lonlat[1] <= 90):
                raise GPPRunError(f"{where}: lon {lon} / lat {lat} are not WGS84 degrees; fix: lon first, "
                                  "then lat")
        files = {}
        for col in ("embeddings", "cube", "flux"):
            p = Path(row[col].strip())
            p = p if p.is_absolute() else path.parent / p
            if not row[col].strip() or not p.exists():
                raise GPPRunError(f"{where}: {col} {str(p)!r} does not exist; fix: paths are relative to the "
                                  "table's folder")
            files[col] = p
        towers.append(Tower(row["site"].strip(), files["embeddings"], files["cube"], files["flux"], lonlat))
    if len(towers) < 2:
        raise GPPRunError(f"towers table {path} holds {len(towers)} tower(s); leave-one-site-out needs at least "
                          "2; fix: add towers, or run one tower with --embeddings/--cube/--flux")
    return towers


def gpp_leave_one_site_out(
    towers: list[Tower],
    out_dir: str | Path,
    *,
    window_px: int = 15,
    val_years: tuple[int, ...] = (),
    interpolation: Literal["linear", "savgol"] = "linear",
    stride_days: int = 10,
    cfg: GPPConfig | None = None,
    seed: int = 0,
) -> GPPRun:
    """GPP at several towers, each scored by models trained on the other towers only (``SiteSplit``).

    ``val_years``: windows of the training towers ending in these years stop the transformer early (none:
    it trains ``max_epochs``); the held-out tower is never seen in training or early stopping. Every
    tower's windows are made (and checked) before any model is fitted.
    """
    from stembed.io.cube import open_scene
    from stembed.io.embeddings import open_embeddings

    cfg = cfg or GPPConfig()
    sets: dict[str, dict[str, Windows]] = {}
    for t in towers:
        try:
            site, by_set = tower_windows(open_embeddings(t.embeddings), open_scene(t.cube, check_values=False).s2,
                                         t.flux, tower_lonlat=t.lonlat, window_px=window_px,
                                         interpolation=interpolation, stride_days=stride_days, cfg=cfg, site=t.site)
        except UserError as e:
            raise GPPRunError(f"tower {t.site}: {e}") from e
        for name, w in by_set.items():
            sets.setdefault(name, {})[site] = w
    split = SiteSplit(tuple(val_years))
    if val_years:
        for site in sets["embedding"]:
            rest = Windows.concat([w for s, w in sets["embedding"].items() if s != site])
            if not np.isin(rest.end_date.year.to_numpy(), list(val_years)).any():
                raise GPPRunError(f"with tower {site} held out, no window of the other towers ends in the "
                                  f"validation years {list(val_years)}; fix: pick --val-years the cubes cover, or "
                                  "omit them (no early stopping)")
    with warnings.catch_warnings():
        if not val_years:  # said once, in gpp_split.json and by the CLI, not once per fit
            warnings.filterwarnings("ignore", message="fit_gpp: no validation windows", category=UserWarning)
        metrics, preds = run_gpp_experiment(sets, split, cfg, seed, return_predictions=True)
    n = {site: len(w) for site, w in sets["embedding"].items()}
    info = {
        "split": "leave-one-site-out", "sites": list(n), "windows_per_site": n, "val_years": list(val_years),
        "early_stopping": bool(val_years), "max_epochs": cfg.max_epochs,
        "rule": "each tower is scored by models fitted on the other towers' windows only",
    }
    metrics_csv, preds_csv, plots = _write_outputs(Path(out_dir), metrics, preds, info)
    return GPPRun(metrics, metrics_csv, preds_csv, plots, sum(n.values()), None, 0, info)


def year_split(
    train_years: Sequence[int] | None, val_years: Sequence[int] | None, test_years: Sequence[int] | None
) -> YearSplit | None:
    """The year split ``--train-years``, ``--val-years`` and ``--test-years`` give; None (adapt to the cube:
    :func:`resolve_split`) when no years are given.

    Raises:
        GPPRunError: test years without train and val years, or only one of train and val years.
    """
    if train_years is None and val_years is None:
        if test_years:
            raise GPPRunError("--test-years needs --train-years and --val-years too; fix: give all three")
        return None
    if train_years is None or val_years is None:
        raise GPPRunError(
            "give both --train-years and --val-years, or neither (then the latest year of the cube's windows "
            "validates and the earlier years train)"
        )
    return YearSplit(tuple(train_years), tuple(val_years), tuple(test_years or ()))


def evaluate_gpp(
    out_dir: str | Path,
    *,
    embeddings: str | Path | None = None,
    cube: str | Path | None = None,
    flux: str | Path | None = None,
    towers: str | Path | None = None,
    tower_lonlat: tuple[float, float] | None = None,
    whole_cube: bool = False,
    window_px: int = 15,
    train_years: Sequence[int] | None = None,
    val_years: Sequence[int] | None = None,
    test_years: Sequence[int] | None = None,
    interpolation: Literal["linear", "savgol"] = "linear",
    stride_days: int = 10,
    max_epochs: int | None = None,
    seed: int = 0,
) -> GPPRun:
    """``stembed eval gpp``: :func:`gpp_at_tower` of the stores ``embeddings`` and ``cube`` and the ``flux`` CSV
    (at ``tower_lonlat``, or over the whole cube), or :func:`gpp_leave_one_site_out` of the ``towers`` table;
    ``max_epochs``: the transformer's (None: :class:`GPPConfig`'s).

    Raises:
        GPPRunError: inputs of both kinds, or lacking; both or neither of ``tower_lonlat`` and ``whole_cube``;
            and every error of the run.
    """
    from stembed.io.outputs import check_output_folder

    check_output_folder(out_dir)
    cfg = GPPConfig() if max_epochs is None else GPPConfig(max_epochs=max_epochs)
    if towers is not None:
        given = [o for o, v in (("--embeddings", embeddings), ("--cube", cube), ("--flux", flux),
                                ("--tower", tower_lonlat), ("--train-years", train_years),
                                ("--test-years", test_years)) if v is not None] + (["--whole-cube"] if whole_cube else [])
        if given:
            raise GPPRunError(f"--towers takes each tower's files and position from its table, so {given} "
                              "cannot be given too; fix: drop them (--val-years may stop training early)")
        return gpp_leave_one_site_out(read_towers(towers), out_dir, window_px=window_px,
                                      val_years=tuple(val_years or ()), interpolation=interpolation,
                                      stride_days=stride_days, cfg=cfg, seed=seed)
    if embeddings is None or cube is None or flux is None:
        lacking = [o for o, v in (("--embeddings", embeddings), ("--cube", cube), ("--flux", flux)) if v is None]
        raise GPPRunError(f"missing {', '.join(lacking)}; fix: give --embeddings, --cube and --flux for one "
                          "tower, or --towers TABLE.csv for several")
    if (tower_lonlat is None) == (not whole_cube):
        raise GPPRunError("give the tower's position (--tower LON LAT) or --whole-cube, not both")
    from stembed.io.cube import open_scene
    from stembed.io.embeddings import open_embeddings

    return gpp_at_tower(open_embeddings(embeddings), open_scene(cube, check_values=False).s2, flux, out_dir,
                        tower_lonlat=tower_lonlat, window_px=window_px,
                        split=year_split(train_years, val_years, test_years), interpolation=interpolation,
                        stride_days=stride_days, cfg=cfg, seed=seed)
