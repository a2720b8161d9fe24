"""Linear and random-forest probes: do the embeddings separate the reference labels better than same-size baselines?

For one labelled scene (e.g. a WorldCereal patch with ``LC``/``CT`` codes) every pixel-date that has an
embedding, all 10 S2 bands and a label is a sample. Each sample is described by the embedding's first k
features (``embedding<k>``, one per requested prefix k) and by baselines of the same size that see what the
model sees (:data:`FEATURE_SETS`):

- ``date_s2``, ``date_s2_pca<k>``: the date's 10 S2 bands, and PCA-k of them;
- ``date_s2s1_pca<k>``: PCA-k of those bands and the VV, VH of the nearest S1 date, each standardised: the
  context-free bound of a fused embedding;
- ``window_pca<k>``: PCA-k of the pixel's S2 bands over the model's window around the date (the store's
  ``window`` attribute, else the paper's 11 consecutive dates); ``window11_pca<k>`` adds the paper's window
  when the store has another one;
- ``season_raw``, ``season_pca<k>``: the pixel's monthly mean S2 series over the whole period (the same for
  every date of a pixel: an upper reference, not a per-date feature).

Logistic regression and a random forest are scored on each with spatially blocked cross-validation, next to
a majority-class baseline. So "the embedding wins" cannot just mean "fewer, decorrelated inputs" or "it saw
other dates".

Why blocked: neighbouring pixels (and all dates of one pixel) share a parcel, so a random split leaks
the parcel into the test set and rewards memorising it. Samples are grouped into ``block_px`` x
``block_px`` blocks and whole blocks go to one fold. A class living in a single block cannot be both
trained and tested, so classes must span >= 2 blocks (and ``min_class_pixels`` pixels) or are dropped.

Every choice that could favour one feature set is shared: one set of pixel-dates, one subsample, one
fold assignment; PCA and feature scaling are fitted inside each training fold (sklearn pipelines).
The arrays are loaded into memory: this is meant for labelled patches, not whole embedding stores
(``region`` probes one box of a larger one).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from pydantic import ValidationError
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from stembed.config import WindowConfig
from stembed.data.sampling import day_numbers
from stembed.data.windows import NONE, window_dates
from stembed.errors import UserError
from stembed.io.embeddings import grid_mismatch
from stembed.sensors import S1, S2
from stembed.types import BAND, FEATURE, TIME, X, Y

FEATURE_SETS = (
    "embedding<k>", "date_s2_pca<k>", "date_s2s1_pca<k>", "window_pca<k>", "window11_pca<k>", "season_pca<k>",
    "date_s2", "season_raw",
)
"""The feature sets, ``<k>`` = each requested embedding prefix; summary rows come in this order (per k first)."""
RENAMED = {"raw_bands": "date_s2", "raw_pca<k>": "date_s2_pca<k>", "embedding": "embedding<k>"}
"""Names of older probe outputs -> today's (the markdown says so, for reading old and new side by side)."""
MODELS = ("logistic_regression", "random_forest")
BASELINE = ("none", "majority_class")  # (feature_set, model) of the chance-level row
MIN_CLASS_BLOCKS = 2  # a class in one block cannot appear in both a training and a test fold
TABLE_COLUMNS = ("feature_set", "model", "fold", "macro_f1", "accuracy", "n_train", "n_test")
PAPER_WINDOW_DATES = 11  # the paper's window: 11 consecutive dates centred on the date
_TIME_TOL = pd.Timedelta(seconds=60)  # embedding and S2 times agree within this
_LR_MAX_ITER = 5000
_FILL_CHUNK_PX = 1024
_REGION_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*$")


class ProbeError(UserError):
    """Inputs a probe cannot use (missing label, mismatched grids, too few classes); the message says the fix."""


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe_table` measured.

    Attributes:
        table: one row per feature set, model and fold, plus a ``fold == "mean"`` row per pair
            (columns :data:`TABLE_COLUMNS`; ``fold`` is a string: ``"0"``, ``"1"``, ..., ``"mean"``).
        summary: one row per feature set and model: mean and std (over folds, ddof=1) of macro-F1
            and accuracy, ``n_features`` (what the classifier sees: PCA components or columns) and
            ``n_columns`` (the set's columns before any PCA).
        meta: the run's facts: classes kept and dropped (with pixel, pixel-date and block counts and
            the reason), sample counts, blocks, CV scheme, how each baseline was built, seeds and parameters.
        samples: the pixel-dates used, one row each: positions ``it``, ``iy``, ``ix`` in the embedding
            store (not the region), ``label``, ``block`` and ``fold`` (the fold it is tested in). Identical
            for every feature set and model.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)

    def markdown(self) -> str:
        """The summary for a report (:func:`probe_markdown`)."""
        return probe_markdown(self)

    def save(self, out: str | Path) -> Path:
        """``probe_<label>.csv`` (every fold), ``probe_<label>_summary.csv`` and ``probe_<label>.md`` in ``out``;
        shared by ``stembed eval probe`` and ``stembed report``. Returns the summary's path."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        label = self.meta["label"]
        self.table.to_csv(out / f"probe_{label}.csv", index=False)
        self.summary.to_csv(out / f"probe_{label}_summary.csv", index=False)
        (out / f"probe_{label}.md").write_text(self.markdown() + "\n")
        return out / f"probe_{label}_summary.csv"


@dataclass(frozen=True)
class FeatureSet:
    """One feature set's matrix and how its pipeline reduces it (fitted per training fold).

    Attributes:
        name: e.g. ``"date_s2s1_pca7"``.
        x: ``(n_samples, n_columns)`` float32, one row per sample.
        n_pca: PCA components fitted inside the pipeline, None for no PCA.
        scale: standardise every column before the PCA (columns in different units).
    """

    name: str
    x: np.ndarray
    n_pca: int | None = None
    scale: bool = False

    @property
    def n_features(self) -> int:
        """What the classifier sees: the PCA components, else the columns."""
        return self.x.shape[1] if self.n_pca is None else self.n_pca


@dataclass(frozen=True)
class ProbeFeatures:
    """Every feature set of a list of pixel-dates (:func:`probe_features`).

    Attributes:
        samples: one row per pixel-date: ``it``, ``iy``, ``ix`` (positions in the embedding store), ``label``.
        sets: feature sets by name, rows in ``samples`` order, in :data:`FEATURE_SETS` order.
        meta: how each baseline was built (window source, fills, months, S1 matching).
        skipped: baselines that could not be built, with the reason.
    """

    samples: pd.DataFrame
    sets: dict[str, FeatureSet]
    meta: dict[str, Any]
    skipped: dict[str, str]


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class _Arrays:
    embedding: np.ndarray  # (time, feature, y, x) float32, the store's dates
    s2: np.ndarray  # (s2 time, band, y, x) float32, the S2 cube's whole series, S2 band order
    s2_days: np.ndarray  # (s2 time,) int64 day numbers
    s2_times: np.ndarray  # (s2 time,) datetime64[ns]
    pos: np.ndarray  # (time,) position of each store date in the S2 series
    label: np.ndarray  # (y, x)
    mask: np.ndarray  # (time, y, x) bool: the usable pixel-dates
    s1: np.ndarray | None  # (s1 time, band, y, x) float32 VV, VH on the S1 cube's own dates
    s1_times: np.ndarray | None  # (s1 time,) datetime64[ns]
    origin: tuple[int, int]  # (y0, x0) of the region in the store's grid

    @property
    def date_s2(self) -> np.ndarray:
        """``(time, band, y, x)``: the S2 bands on the store's dates."""
        return self.s2[self.pos]


def _nodata_values(nodata: float | Sequence[float] | None) -> list[float]:
    if nodata is None:
        return []
    if isinstance(nodata, str) or not isinstance(nodata, Sequence):
        return [nodata]
    return list(nodata)


def _check_grid(name: str, obj: xr.Dataset | xr.DataArray, ref: xr.Dataset) -> None:
    problem = grid_mismatch(ref, obj, name)
    if problem:
        raise ProbeError(f"{problem}; fix: pass the scene store (S2 cube and labels) the embeddings were made from")


def _s2_positions(s2: xr.DataArray, times: np.ndarray) -> np.ndarray:
    """Position in the S2 cube of each embedding date; every one must be there."""
    pos = pd.DatetimeIndex(s2[TIME].values).get_indexer(
        pd.DatetimeIndex(times), method="nearest", tolerance=_TIME_TOL
    )
    if (pos < 0).any():
        absent = ", ".join(str(pd.Timestamp(t)) for t in np.asarray(times)[pos < 0][:5])
        raise ProbeError(
            f"the S2 cube has no acquisition at {absent} (dates of the embedding store); fix: pass the "
            "scene store the embeddings were made from"
        )
    return pos


def parse_region(text: str) -> tuple[int, int, int, int]:
    """``"y0:y1,x0:x1"`` (pixel rows and columns of the store's grid, ends excluded) -> ``(y0, y1, x0, x1)``.

    Raises:
        ProbeError: the text is not of that form.
    """
    m = _REGION_RE.match(text)
    if m is None:
        raise ProbeError(
            f"region {text!r} is not y0:y1,x0:x1; fix: give pixel rows and columns of the store's grid, "
            "e.g. --region 32:64,32:64"
        )
    y0, y1, x0, x1 = (int(v) for v in m.groups())
    return y0, y1, x0, x1


def _check_region(region: Sequence[int] | None, height: int, width: int) -> tuple[int, int, int, int]:
    """The box to probe, whole grid for None; refuses an empty or out-of-grid box."""
    if region is None:
        return 0, height, 0, width
    if len(region) != 4 or not all(isinstance(v, int | np.integer) for v in region):
        raise ProbeError(f"region must be 4 integers (y0, y1, x0, x1), got {region!r}")
    y0, y1, x0, x1 = (int(v) for v in region)
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ProbeError(
            f"region {y0}:{y1},{x0}:{x1} is empty or outside the store's grid of {height} x {width} px; fix: "
            f"give 0 <= y0 < y1 <= {height} and 0 <= x0 < x1 <= {width}"
        )
    return y0, y1, x0, x1


def _check_inputs(
    embeddings: xr.Dataset, s2: xr.DataArray, labels: xr.Dataset, label: str, s1: xr.DataArray | None
) -> None:
    """Refuse a missing label or band, another grid, a label that is not per pixel, unsorted S2 dates."""
    if label not in labels.data_vars:
        raise ProbeError(
            f"the labels have no variable {label!r} (they hold {sorted(map(str, labels.data_vars))}); "
            "fix: pass label= one of those"
        )
    if "embedding" not in embeddings.data_vars:
        raise ProbeError(
            "the embeddings Dataset has no 'embedding' variable; fix: open the store with "
            "stembed.io.embeddings.open_embeddings"
        )
    missing = [b for b in S2.bands if b not in s2[BAND].values] if BAND in s2.dims else list(S2.bands)
    if missing:
        raise ProbeError(f"the S2 cube lacks band(s) {missing}; fix: pass the scene's S2 cube (scene.s2)")
    _check_grid("S2 cube", s2, embeddings)
    _check_grid("labels", labels, embeddings)
    if s1 is not None:
        missing = [b for b in S1.bands if b not in s1[BAND].values] if BAND in s1.dims else list(S1.bands)
        if missing:
            raise ProbeError(f"the S1 cube lacks band(s) {missing}; fix: pass the scene's S1 cube (scene.s1)")
        _check_grid("S1 cube", s1, embeddings)
    if set(labels[label].dims) != {Y, X}:
        raise ProbeError(
            f"label {label!r} has dims {tuple(labels[label].dims)}; a probe needs one label per pixel (y, x)"
        )
    s2_times = np.asarray(s2[TIME].values, dtype="datetime64[ns]")
    if (np.diff(s2_times) <= np.timedelta64(0)).any():
        raise ProbeError("the S2 cube's dates are not increasing; fix: pass the cube sorted by time (sortby('time'))")


def _load(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    labels: xr.Dataset,
    label: str,
    nodata: list[float],
    *,
    s1: xr.DataArray | None = None,
    region: Sequence[int] | None = None,
) -> _Arrays:
    """The region's arrays, and which pixel-dates are usable (embedding valid, S2 finite, labelled)."""
    _check_inputs(embeddings, s2, labels, label, s1)
    lab_da = labels[label]
    s2_times = np.asarray(s2[TIME].values, dtype="datetime64[ns]")
    y0, y1, x0, x1 = _check_region(region, embeddings.sizes[Y], embeddings.sizes[X])
    box = {Y: slice(y0, y1), X: slice(x0, x1)}
    emb_da = embeddings["embedding"].isel(box).transpose(TIME, FEATURE, Y, X)
    pos = _s2_positions(s2, emb_da[TIME].values)
    emb = np.asarray(emb_da.values, dtype=np.float32)
    s2_all = np.asarray(s2.isel(box).sel({BAND: list(S2.bands)}).transpose(TIME, BAND, Y, X).values, dtype=np.float32)
    lab = np.asarray(lab_da.isel(box).transpose(Y, X).values)

    mask = np.isfinite(emb).all(axis=1) & np.isfinite(s2_all[pos]).all(axis=1)
    if "valid" in embeddings.data_vars:
        mask &= np.asarray(embeddings["valid"].isel(box).transpose(TIME, Y, X).values, dtype=bool)
    has_label = ~np.isin(lab, nodata)
    if np.issubdtype(lab.dtype, np.floating):
        has_label &= np.isfinite(lab)
    mask &= has_label[None]
    s1_all = s1_times = None
    if s1 is not None:
        s1_all = np.asarray(s1.isel(box).sel({BAND: list(S1.bands)}).transpose(TIME, BAND, Y, X).values,
                            dtype=np.float32)
        s1_times = np.asarray(s1[TIME].values, dtype="datetime64[ns]")
    return _Arrays(
        embedding=emb, s2=s2_all, s2_days=day_numbers(s2_times), s2_times=s2_times, pos=pos, label=lab, mask=mask,
        s1=s1_all, s1_times=s1_times, origin=(y0, x0),
    )


def pixel_date_mask(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    labels: xr.Dataset,
    *,
    label: str,
    nodata: float | Sequence[float] | None = 0,
) -> xr.DataArray:
    """The pixel-dates a probe may use, ``(time, y, x)`` bool on the embedding store's grid.

    True where the embedding is valid and finite, all 10 S2 bands are finite and the label is not
    ``nodata`` (nor NaN). Class filtering (:func:`probe_table`'s ``min_class_pixels``) comes on top.

    Raises:
        ProbeError: the label variable is missing, S2 bands are missing, or the grids or dates differ.
    """
    a = _load(embeddings, s2, labels, label, _nodata_values(nodata))
    return xr.DataArray(
        a.mask, dims=(TIME, Y, X),
        coords={TIME: embeddings[TIME].values, Y: embeddings[Y].values, X: embeddings[X].values},
    )


def _prefixes(embeddings: xr.Dataset, features: Sequence[int] | None, n_features: int) -> list[int]:
    """The embedding prefixes to probe: ``features``, else the store's ``nested`` attribute, else all features."""
    source = "features"
    if features is None:
        nested = embeddings.attrs.get("nested")
        is_ints = isinstance(nested, list | tuple) and all(
            isinstance(k, int | np.integer) and not isinstance(k, bool) for k in nested
        )
        if is_ints and nested:
            features, source = list(nested), "the store's 'nested' attribute"
        else:
            return [n_features]
    ks = []
    for k in features:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_features:
            raise ProbeError(
                f"embedding prefix {k!r} (from {source}) is not between 1 and {n_features}, the store's number of "
                f"features; fix: ask for prefixes k with 1 <= k <= {n_features} (--features K)"
            )
        if int(k) not in ks:
            ks.append(int(k))
    if not ks:
        raise ProbeError(f"no embedding prefix asked for; fix: give features= with values in 1..{n_features}")
    return ks


def _store_window(embeddings: xr.Dataset) -> WindowConfig | None:
    """The model's context window from the store's ``window`` attribute; None: the paper's 11 consecutive dates."""
    raw = embeddings.attrs.get("window")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProbeError(
            f"the store's 'window' attribute is a {type(raw).__name__}, not a dict of WindowConfig fields; fix: "
            "write the store with a current stembed, or delete the attribute if the model used the paper's window"
        )
    try:
        return WindowConfig.model_validate(raw)
    except ValidationError as e:
        raise ProbeError(
            f"the store's 'window' attribute {raw} is not a valid WindowConfig ({e.errors()[0]['msg']}); fix: "
            "write the store with the stembed that trained its model"
        ) from None


# ----------------------------------------------------------------------------- baselines
def fill_linear(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fill the NaN of each series along the last axis linearly between its finite values, flat beyond them.

    ``values`` ``(..., n)``, ``x`` ``(n,)`` increasing: the same as ``np.interp(x, x[ok], v[ok])`` for every
    series ``v`` (``ok`` its finite entries), vectorised. A series with no finite value stays NaN.
    """
    v = np.asarray(values)
    x = np.asarray(x, dtype=np.float64)
    n = v.shape[-1]
    ok = np.isfinite(v)
    idx = np.arange(n)
    prev = np.maximum.accumulate(np.where(ok, idx, -1), axis=-1)  # last finite index at or before each entry
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(ok, idx, n), -1), axis=-1), -1)  # first at or after
    lo = np.clip(np.where(prev >= 0, prev, nxt), 0, n - 1)  # before the first finite value: flat
    hi = np.clip(np.where(nxt < n, nxt, prev), 0, n - 1)  # after the last: flat
    v_lo, v_hi = np.take_along_axis(v, lo, -1), np.take_along_axis(v, hi, -1)
    x_lo, x_hi = x[lo], x[hi]
    span = np.where(x_hi > x_lo, x_hi - x_lo, 1.0)
    w = np.where(x_hi > x_lo, (x - x_lo) / span, 0.0)
    return np.where(ok, v, v_lo + w * (v_hi - v_lo)).astype(v.dtype, copy=False)


def paper_window(n_dates: int, t: np.ndarray, n_frames: int = PAPER_WINDOW_DATES) -> np.ndarray:
    """``(N, n_frames)`` date indices of the consecutive window centred on each date ``t`` ``(N,)``.

    Reflected at the series ends like :func:`stembed.inference.engine.window_days` (frame -k is date k), so
    the date is always the centre frame; needs ``n_dates > n_frames // 2``.
    """
    half = n_frames // 2
    if n_dates <= half:
        raise ProbeError(f"a window of {n_frames} consecutive dates needs >= {half + 1} dates, the series has {n_dates}")
    o = np.asarray(t, dtype=np.int64)[:, None] + np.arange(-half, half + 1)[None]  # (N, n_frames)
    o = np.where(o < 0, -o, o)
    return np.where(o > n_dates - 1, 2 * (n_dates - 1) - o, o)


def monthly_series(series: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, pd.PeriodIndex]:
    """Calendar-month means of ``series`` ``(..., time)`` from the month of the first date to that of the last.

    Each month is the mean of the series' finite values in it; a month without one is filled linearly between
    the observed months (flat beyond the first and last). Returns ``(..., month)`` and the months.
    """
    stamps = pd.DatetimeIndex(times)
    mon = np.asarray(stamps.year * 12 + stamps.month - 1, dtype=np.int64)
    m = mon - mon.min()
    n_months = int(m.max()) + 1
    onehot = (m[:, None] == np.arange(n_months)[None]).astype(np.float64)  # (time, month)
    ok = np.isfinite(series)
    sums = np.where(ok, series, 0.0).astype(np.float64) @ onehot  # (..., month)
    counts = ok.astype(np.float64) @ onehot
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, np.nan)
    months = pd.period_range(stamps.min(), stamps.max(), freq="M")
    return fill_linear(means, np.arange(n_months)).astype(np.float32), months


def _match_s1(
    s1: np.ndarray, s1_times: np.ndarray, s2_times: np.ndarray, ts: np.ndarray, inv: np.ndarray, uy: np.ndarray,
    ux: np.ndarray,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """``(N, 2)`` VV, VH of each row's pixel at the S1 date nearest its S2 date ``s2_times[ts]``, per band: where
    the pixel's band is not finite there, its nearest date where it is (ties: the earlier date). None (and
    the reason) when a band has no finite value at all."""
    if s1_times.size == 0:
        return None, {"reason": "the S1 cube has no dates"}
    order = np.argsort(s1_times, kind="stable")
    s1, t1 = s1[order], s1_times[order]
    s1p = s1[:, :, uy, ux]  # (T1, band, P)
    gap = np.abs((s2_times[:, None] - t1[None, :]) / np.timedelta64(1, "D"))  # (T2, T1) days
    d = gap[ts]  # (N, T1)
    nearest = np.argmin(d, axis=1)
    rows = np.arange(ts.size)
    out = np.full((ts.size, len(S1.bands)), np.nan, dtype=np.float32)
    used_gap = np.full((ts.size, len(S1.bands)), np.nan)
    moved = np.zeros(ts.size, dtype=bool)
    filled: dict[str, int] = {}
    for b, name in enumerate(S1.bands):
        finite = np.isfinite(s1p[:, b, :]).T  # (P, T1)
        db = np.where(finite[inv], d, np.inf)
        pick = np.argmin(db, axis=1)
        ok = np.isfinite(db[rows, pick])
        out[ok, b] = s1p[pick[ok], b, inv[ok]]
        used_gap[ok, b] = db[rows[ok], pick[ok]]
        moved |= ok & (pick != nearest)
        if not ok.all():
            everywhere = s1[:, b][np.isfinite(s1[:, b])]
            if everywhere.size == 0:
                return None, {"reason": f"the S1 cube has no finite {name} value in the probed region"}
            out[~ok, b] = np.median(everywhere)
            filled[name] = int((~ok).sum())
    info = {
        "rule": "per band, the S1 date nearest the S2 date (no tolerance); where the pixel's band is not finite "
        "there, its nearest date where it is (ties: the earlier date)",
        "gap_days_median": float(np.nanmedian(used_gap)) if np.isfinite(used_gap).any() else None,
        "gap_days_max": float(np.nanmax(used_gap)) if np.isfinite(used_gap).any() else None,
        "rows_not_on_nearest_date": int(moved.sum()),
        "rows_without_s1_filled_with_band_median": filled,
    }
    return out, info


def _build_features(
    a: _Arrays, it: np.ndarray, iy: np.ndarray, ix: np.ndarray, prefixes: Sequence[int], window: WindowConfig | None
) -> tuple[dict[str, FeatureSet], dict[str, Any], dict[str, str]]:
    """Every feature set of the rows ``it, iy, ix`` (store dates, region pixels); their meta; the sets skipped."""
    width = a.label.shape[1]
    ts = a.pos[it]  # (N,) the rows' dates in the S2 series
    upix, inv = np.unique(iy * width + ix, return_inverse=True)
    uy, ux = np.divmod(upix, width)
    series = np.moveaxis(a.s2[:, :, uy, ux], -1, 0)  # (P, T2, band): each row pixel's whole S2 series
    own = a.s2[ts, :, iy, ix]  # (N, band)
    meta: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    date_s2s1 = _date_s2s1(a, own, ts, inv, uy, ux, meta, skipped)
    window_x, window11_x = _window_features(a, series, own, ts, inv, window, meta, skipped)
    season_x = _season(a, series, inv, meta)
    bases = {"date_s2_pca": (own, False), "date_s2s1_pca": (date_s2s1, True), "window_pca": (window_x, False),
             "window11_pca": (window11_x, False), "season_pca": (season_x, False)}
    sets: dict[str, FeatureSet] = {}
    for k in prefixes:
        sets[f"embedding{k}"] = FeatureSet(f"embedding{k}", a.embedding[it, :k, iy, ix])
        for base, (x, scale) in bases.items():
            if x is not None:
                sets[f"{base}{k}"] = FeatureSet(f"{base}{k}", x, n_pca=min(k, x.shape[1]), scale=scale)
    sets["date_s2"] = FeatureSet("date_s2", own)
    sets["season_raw"] = FeatureSet("season_raw", season_x)
    return sets, meta, skipped


def _date_s2s1(
    a: _Arrays, own: np.ndarray, ts: np.ndarray, inv: np.ndarray, uy: np.ndarray, ux: np.ndarray,
    meta: dict[str, Any], skipped: dict[str, str],
) -> np.ndarray | None:
    """``(N, band + 2)``: the date's S2 bands, then the matched S1 date's VV, VH; None (and why, in ``skipped``)
    without S1. Its meta goes to ``meta``."""
    if a.s1 is None or a.s1_times is None:
        skipped["date_s2s1_pca<k>"] = "no S1 cube given (s1=None)"
        return None
    s1_rows, info = _match_s1(a.s1, a.s1_times, a.s2_times, ts, inv, uy, ux)
    if s1_rows is None:
        skipped["date_s2s1_pca<k>"] = info["reason"]
        return None
    meta["date_s2s1"] = {
        "columns": f"the date's {own.shape[1]} S2 bands, then {', '.join(S1.bands)}",
        "scaling": "StandardScaler on each column, then PCA (fitted per training fold); S1 cube values "
        "are (dB + 30) / 35, so standardised they equal standardised dB",
        **info,
    }
    return np.concatenate([own, s1_rows], axis=1)


_PAPER_NOTE = (
    f"the paper's window: {PAPER_WINDOW_DATES} consecutive S2 dates centred on the date (the date's own bands "
    "are the centre frame), reflected at the series ends like inference.engine.window_days; cloudy "
    "(non-finite) values filled by linear interpolation in time along the pixel's own series (per band, "
    "np.interp over its finite dates, flat beyond the ends)"
)


def _consecutive(series: np.ndarray, s2_days: np.ndarray, ts: np.ndarray, inv: np.ndarray) -> np.ndarray | None:
    """``(N, 11 * band)``, frame-major: the paper's window of each row, gaps filled linearly; None if the series
    is too short for it."""
    n_pixels, n_time = series.shape[:2]
    if n_time <= PAPER_WINDOW_DATES // 2:
        return None
    filled = np.empty_like(series)  # (P, T2, band), in chunks of pixels: fill_linear's index arrays are big
    for chunk in np.array_split(np.arange(n_pixels), max(1, n_pixels // _FILL_CHUNK_PX)):
        filled[chunk] = np.moveaxis(fill_linear(np.moveaxis(series[chunk], 1, -1), s2_days), -1, 1)
    frames = paper_window(n_time, ts)  # (N, 11)
    return filled[inv[:, None], frames].reshape(ts.size, -1)


def _window_features(
    a: _Arrays, series: np.ndarray, own: np.ndarray, ts: np.ndarray, inv: np.ndarray, window: WindowConfig | None,
    meta: dict[str, Any], skipped: dict[str, str],
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The model's window of each row (the paper's without a stored ``window``), and the paper's 11 consecutive
    dates beside a stored window (else None); their meta to ``meta``, a set that cannot be built to ``skipped``."""
    consecutive = _consecutive(series, a.s2_days, ts, inv)
    too_short = (f"the S2 series has {series.shape[1]} dates; {PAPER_WINDOW_DATES} consecutive dates reflected at "
                 f"the ends need >= {PAPER_WINDOW_DATES // 2 + 1}")
    paper_meta = {"rule": _PAPER_NOTE, "values_filled": int((~np.isfinite(series)).sum())}
    if window is None:
        if consecutive is None:
            skipped["window_pca<k>"] = too_short
        else:
            meta["window"] = {"source": "paper (the store has no 'window' attribute)", **paper_meta}
        return consecutive, None
    observed = np.isfinite(series).all(axis=2)[inv]  # (N, T2): the pixel has all bands on the date
    idx = window_dates(window, a.s2_days, observed, ts)  # (N, dates)
    empty = idx == NONE
    ctx = series[inv[:, None], np.where(empty, 0, idx)]  # (N, dates, band)
    ctx = np.where(empty[..., None], own[:, None, :], ctx)
    meta["window"] = {
        "source": "the store's 'window' attribute",
        "config": window.model_dump(mode="json"),
        "rule": f"the date's own {own.shape[1]} bands, then those of the {window.dates} dates "
        "data.windows.window_dates picks (observed = all 10 S2 bands finite); a slot without a date (-1) "
        "holds the date's own bands",
        "empty_slots": int(empty.sum()),
    }
    if consecutive is None:
        skipped["window11_pca<k>"] = too_short
    else:
        meta["window11"] = paper_meta
    return np.concatenate([own, ctx.reshape(ts.size, -1)], axis=1), consecutive


def _season(a: _Arrays, series: np.ndarray, inv: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """``(N, month * band)``, month-major: the pixel's calendar-month means (the same for each of its dates)."""
    months_x, months = monthly_series(np.moveaxis(series, 1, -1), a.s2_times)  # (P, band, month)
    meta["season"] = {
        "months": [str(m) for m in months],
        "rule": "the pixel's whole S2 series as calendar-month means per band (finite values of the month), from "
        "the month of the cube's first S2 date to that of its last; months without an observation filled "
        "linearly between the observed months (flat beyond the ends); the same for every date of a pixel: an "
        "upper reference, not a per-date feature",
    }
    return np.moveaxis(months_x, 1, 2).reshape(months_x.shape[0], -1)[inv]


def probe_features(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    labels: xr.Dataset,
    *,
    label: str,
    s1: xr.DataArray | None = None,
    features: Sequence[int] | None = None,
    region: Sequence[int] | None = None,
    nodata: float | Sequence[float] | None = 0,
) -> ProbeFeatures:
    """Every feature set of every usable pixel-date (:func:`pixel_date_mask`), as :func:`probe_table` builds them.

    For inspecting the baselines; the arguments are :func:`probe_table`'s. Rows are in (time, y, x) order.

    Raises:
        ProbeError: as :func:`probe_table`.
    """
    a = _load(embeddings, s2, labels, label, _nodata_values(nodata), s1=s1, region=region)
    prefixes = _prefixes(embeddings, features, a.embedding.shape[1])
    it, iy, ix = np.nonzero(a.mask)
    sets, meta, skipped = _build_features(a, it, iy, ix, prefixes, _store_window(embeddings))
    samples = pd.DataFrame({"it": it, "iy": iy + a.origin[0], "ix": ix + a.origin[1], "label": a.label[iy, ix]})
    return ProbeFeatures(samples=samples, sets=sets, meta=meta, skipped=skipped)


# ----------------------------------------------------------------------------- folds
def spatial_blocks(iy: np.ndarray, ix: np.ndarray, *, width_px: int, block_px: int) -> np.ndarray:
    """Block id of each pixel: ``block_px`` x ``block_px`` squares numbered row by row."""
    if block_px < 1:
        raise ProbeError(f"block_px must be >= 1, got {block_px}")
    n_x = -(-width_px // block_px)
    return (np.asarray(iy) // block_px) * n_x + np.asarray(ix) // block_px


def spatial_folds(
    y: np.ndarray, blocks: np.ndarray, *, n_folds: int, seed: int
) -> tuple[np.ndarray, str]:
    """Test fold of each sample, whole blocks per fold; and the scheme used.

    StratifiedGroupKFold (shuffled with ``seed``) keeps class shares similar across folds; if it leaves
    a fold empty or a training fold with fewer than 2 classes, plain GroupKFold (shuffled) is used.

    Raises:
        ProbeError: fewer blocks than folds, or no scheme gives every fold 2+ training classes.
    """
    y, blocks = np.asarray(y), np.asarray(blocks)
    n_blocks = np.unique(blocks).size
    if n_folds < 2:
        raise ProbeError(f"n_folds must be >= 2, got {n_folds}")
    if n_blocks < n_folds:
        raise ProbeError(
            f"only {n_blocks} spatial block(s) hold samples, fewer than n_folds={n_folds}; "
            "fix: use a smaller block_px or fewer folds"
        )
    schemes = [
        (f"StratifiedGroupKFold(n_splits={n_folds}, shuffle=True, random_state={seed})",
         StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)),
        (f"GroupKFold(n_splits={n_folds}, shuffle=True, random_state={seed})",
         GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)),
    ]
    for name, cv in schemes:
        fold = np.full(y.size, -1, dtype=np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class has < n_splits members"
            for k, (_, test) in enumerate(cv.split(np.zeros((y.size, 1)), y, groups=blocks)):
                fold[test] = k
        ok = all(
            (fold == k).any() and np.unique(y[fold != k]).size >= 2 for k in range(n_folds)
        )
        if ok:
            return fold, name
    raise ProbeError(
        f"no blocked {n_folds}-fold split gives every training fold 2+ classes (classes sit in too few "
        "blocks); fix: use a smaller block_px, fewer folds or a larger min_class_pixels"
    )


# ----------------------------------------------------------------------------- models
def _pipeline(fs: FeatureSet, model: str, *, seed: int, n_estimators: int, n_jobs: int) -> Pipeline:
    """The estimator for one cell; scaling and PCA sit inside it, so they are fitted on training rows only."""
    steps: list[Any] = [StandardScaler()] if fs.scale else []
    if fs.n_pca is not None:
        steps.append(PCA(n_components=fs.n_pca, random_state=seed))
    if model == "logistic_regression":
        steps += [StandardScaler(), LogisticRegression(max_iter=_LR_MAX_ITER)]
    elif model == "random_forest":
        steps += [RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs)]
    else:
        raise ProbeError(f"unknown model {model!r}; choose from {MODELS}")
    return make_pipeline(*steps)


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    # macro-F1 over the classes in the test fold's truth or predictions (sklearn's default labels)
    return {
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# ----------------------------------------------------------------------------- probe
def probe_table(
    embeddings: xr.Dataset, s2: xr.DataArray, labels: xr.Dataset, *, label: str, s1: xr.DataArray | None = None,
    features: Sequence[int] | None = None, region: Sequence[int] | None = None, block_px: int = 16, n_folds: int = 4,
    max_samples: int = 20000, min_class_pixels: int = 50, seed: int = 0, nodata: float | Sequence[float] | None = 0,
    n_estimators: int = 200, n_jobs: int = 1, only: Sequence[str] | None = None,
) -> ProbeResult:
    """Score embedding prefixes against same-size baselines (:data:`FEATURE_SETS`) on one label, blocked CV.

    Args:
        embeddings: an embedding store (:func:`stembed.io.embeddings.open_embeddings`); its ``window`` attribute
            names the model's window (absent: the paper's 11 consecutive dates), its ``nested`` the default prefixes.
        s2: the scene's S2 cube ``(time, band, y, x)``: same grid, an acquisition at every embedding date; the
            window and season baselines read its whole series.
        labels: per-pixel labels on the same grid (``scene.labels``); ``label``: the variable, e.g. ``"LC"``.
        s1: the scene's S1 cube on its own dates, for ``date_s2s1_pca<k>`` (None: listed in ``meta["skipped"]``).
        features: the prefixes k (``embedding<k>`` and each ``*_pca<k>``); None: the store's ``nested``, else all.
        region: ``(y0, y1, x0, x1)`` pixel box of the store's grid (ends excluded), e.g. a held-out block; spatial
            blocks count from its corner. None: the whole grid.
        block_px, n_folds: side of the square blocks that go to one fold whole; the folds.
        max_samples: pixel-dates kept after class filtering, drawn uniformly before the folds are assigned (so
            every feature set and model sees the same ones).
        min_class_pixels: a class needs this many pixels with a usable date, in >= 2 blocks, or it is dropped.
        seed: the only source of randomness: the subsample, the fold shuffle, PCA and the forest all use it.
        nodata: label value(s) meaning "no label" (WorldCereal ``LC``: ``(0, 99)``, 99 = unknown).
        n_estimators, n_jobs: random-forest size and threads.
        only: score only these feature sets (when the others were scored on the same pixel-dates and folds).

    Returns:
        A :class:`ProbeResult`; the majority-class baseline is ``feature_set="none"``, ``model="majority_class"``.

    Raises:
        ProbeError: missing label or bands, different grids or dates, a prefix outside 1..n_features, a bad
            region, fewer than 2 classes left, or too few blocks for ``n_folds``.
    """
    if max_samples < n_folds:
        raise ProbeError(f"max_samples must be >= n_folds ({n_folds}), got {max_samples}")
    nodata_values = _nodata_values(nodata)
    a = _load(embeddings, s2, labels, label, nodata_values, s1=s1, region=region)
    prefixes = _prefixes(embeddings, features, a.embedding.shape[1])
    kept, dropped = _classes(a, label, block_px=block_px, min_class_pixels=min_class_pixels)
    sample = _draw_sample(a, kept, max_samples=max_samples, block_px=block_px, n_folds=n_folds, seed=seed)
    sets, built, skipped = _build_features(a, sample.it, sample.iy, sample.ix, prefixes, _store_window(embeddings))
    sets = _only(sets, only)
    folds = _cross_validate(sets, sample.y, sample.fold, n_folds=n_folds, seed=seed, n_estimators=n_estimators,
                            n_jobs=n_jobs)
    sizes = {BASELINE[0]: (0, 0)} | {name: (fs.n_features, fs.x.shape[1]) for name, fs in sets.items()}
    table, summary = _tables(folds, sizes, n_folds)
    meta = {
        "label": label, "nodata": [_py(v) for v in nodata_values], "classes_kept": kept, "classes_dropped": dropped,
        **_sample_meta(a, sample, region=region, block_px=block_px, n_folds=n_folds, min_class_pixels=min_class_pixels),
        "prefixes": prefixes, **_method_meta(sets, skipped, built, n_estimators=n_estimators, seed=seed),
        "seed": seed, "max_samples": max_samples, "min_class_pixels": min_class_pixels,
    }
    y0, x0 = a.origin
    samples = pd.DataFrame({"it": sample.it, "iy": sample.iy + y0, "ix": sample.ix + x0, "label": sample.y,
                            "block": sample.blocks, "fold": sample.fold})
    return ProbeResult(table=table, summary=summary, meta=meta, samples=samples)


@dataclass(frozen=True)
class _Sample:
    """The pixel-dates every feature set and model sees (store date, region row and column, label), their
    spatial blocks and folds, and how many pixel-dates of the kept classes they were drawn from."""

    it: np.ndarray
    iy: np.ndarray
    ix: np.ndarray
    y: np.ndarray
    blocks: np.ndarray
    fold: np.ndarray
    cv: str
    n_eligible: int


def _draw_sample(
    a: _Arrays, kept: dict[Any, Any], *, max_samples: int, block_px: int, n_folds: int, seed: int
) -> _Sample:
    """One sample for all: the kept classes' pixel-dates, subsampled uniformly, then assigned to folds."""
    it, iy, ix, y, n_eligible = _subsample(a, kept, max_samples, np.random.default_rng(seed))
    blocks = spatial_blocks(iy, ix, width_px=a.label.shape[1], block_px=block_px)
    fold, cv = spatial_folds(y, blocks, n_folds=n_folds, seed=seed)
    return _Sample(it=it, iy=iy, ix=ix, y=y, blocks=blocks, fold=fold, cv=cv, n_eligible=n_eligible)


def _only(sets: dict[str, FeatureSet], only: Sequence[str] | None) -> dict[str, FeatureSet]:
    """The feature sets named in ``only`` (all for None); an unknown name is refused."""
    if only is None:
        return sets
    unknown = sorted(set(only) - set(sets))
    if unknown:
        raise ProbeError(f"no feature set(s) {unknown} here; this probe builds {list(sets)}")
    return {name: fs for name, fs in sets.items() if name in only}


def _sample_meta(
    a: _Arrays, s: _Sample, *, region: Sequence[int] | None, block_px: int, n_folds: int, min_class_pixels: int,
) -> dict[str, Any]:
    """The record of which pixel-dates were probed and how they were split."""
    height, width = a.label.shape
    y0, x0 = a.origin
    return {
        "class_rule": f"a class needs >= {min_class_pixels} pixels (min_class_pixels) with a usable date, "
        f"in >= {MIN_CLASS_BLOCKS} spatial blocks: a class living in one block cannot be in both a "
        "training and a test fold, so it cannot be cross-validated; dropped classes' pixel-dates are "
        "left out, not merged",
        "selection": "embedding valid and finite, all 10 S2 bands finite, label not nodata",
        "n_pixel_dates_usable": int(a.mask.sum()),
        "n_pixel_dates_kept_classes": s.n_eligible,
        "n_pixel_dates": int(s.y.size),
        "n_pixels": int(np.unique(s.iy * width + s.ix).size),
        "n_blocks": int(np.unique(s.blocks).size),
        "grid_px": [height, width],
        "region": None if region is None else [y0, y0 + height, x0, x0 + width],
        "block_px": block_px,
        "n_folds": n_folds,
        "cv": s.cv,
        "fold_sizes": {str(k): int((s.fold == k).sum()) for k in range(n_folds)},
    }


def _method_meta(
    sets: dict[str, FeatureSet], skipped: dict[str, str], built: dict[str, Any], *, n_estimators: int, seed: int
) -> dict[str, Any]:
    """The record of the feature sets (built and skipped) and the models that scored them."""
    return {
        "feature_sets": {name: {"n_features": fs.n_features, "n_columns": int(fs.x.shape[1]),
                                "pca": fs.n_pca, "standardised": fs.scale} for name, fs in sets.items()},
        "skipped": skipped,
        "renamed": RENAMED,
        "baselines": {
            "embedding<k>": "the first k features of the store's embedding",
            "date_s2": "the date's 10 S2 bands (reflectance)",
            "pca": "PCA(k) fitted on each training fold only, k capped at the set's columns; on the raw "
            "reflectances except date_s2s1 (StandardScaler first)",
            **built,
        },
        "models": {
            "logistic_regression": f"StandardScaler + LogisticRegression(max_iter={_LR_MAX_ITER})",
            "random_forest": f"RandomForestClassifier(n_estimators={n_estimators}, random_state={seed})",
        },
        "macro_f1": "mean F1 over the classes present in a test fold's truth or predictions",
    }


def _classes(
    a: _Arrays, label: str, *, block_px: int, min_class_pixels: int
) -> tuple[dict[Any, dict[str, int]], dict[Any, dict[str, Any]]]:
    """The classes kept and dropped (with their pixel, pixel-date and block counts, and why), counted on
    pixels with any usable date and the blocks those pixels fall in.

    Raises:
        ProbeError: fewer than 2 classes are kept.
    """
    width = a.label.shape[1]
    _, iy, ix = np.nonzero(a.mask)
    y_all = a.label[iy, ix]
    pixel_has_date = a.mask.any(axis=0)
    py, px = np.nonzero(pixel_has_date)
    p_label, p_block = a.label[py, px], spatial_blocks(py, px, width_px=width, block_px=block_px)
    kept: dict[Any, dict[str, int]] = {}
    dropped: dict[Any, dict[str, Any]] = {}
    for c in np.unique(p_label):
        info = {
            "pixels": int((p_label == c).sum()),
            "pixel_dates": int((y_all == c).sum()),
            "blocks": int(np.unique(p_block[p_label == c]).size),
        }
        reasons = []
        if info["pixels"] < min_class_pixels:
            reasons.append(f"{info['pixels']} pixels < min_class_pixels={min_class_pixels}")
        if info["blocks"] < MIN_CLASS_BLOCKS:
            reasons.append(f"in {info['blocks']} block(s) < {MIN_CLASS_BLOCKS}")
        if reasons:
            dropped[_py(c)] = info | {"reason": "; ".join(reasons)}
        else:
            kept[_py(c)] = info
    if len(kept) < 2:
        raise ProbeError(
            f"only {len(kept)} class(es) of {label!r} remain ({list(kept)}; dropped: "
            f"{ {k: v['reason'] for k, v in dropped.items()} }) and a probe needs 2; fix: lower "
            "min_class_pixels, use a smaller block_px, or probe a label with more classes"
        )
    return kept, dropped


def _subsample(
    a: _Arrays, kept: dict[Any, Any], max_samples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The usable pixel-dates of the kept classes, at most ``max_samples`` drawn uniformly: ``it, iy, ix``,
    their labels, and how many were eligible.

    Raises:
        ProbeError: the subsample holds one class only.
    """
    it, iy, ix = np.nonzero(a.mask)
    y_all = a.label[iy, ix]
    keep = np.isin(y_all, list(kept))
    it, iy, ix, y_all = it[keep], iy[keep], ix[keep], y_all[keep]
    n_eligible = int(y_all.size)
    if n_eligible > max_samples:
        pick = np.sort(rng.choice(n_eligible, size=max_samples, replace=False))
        it, iy, ix, y_all = it[pick], iy[pick], ix[pick], y_all[pick]
    if np.unique(y_all).size < 2:
        raise ProbeError(
            f"the subsample of {y_all.size} pixel-dates holds one class only; fix: raise max_samples"
        )
    return it, iy, ix, y_all, n_eligible


def _cross_validate(
    sets: dict[str, FeatureSet], y_all: np.ndarray, fold: np.ndarray, *, n_folds: int, seed: int,
    n_estimators: int, n_jobs: int,
) -> pd.DataFrame:
    """One row per fold, feature set and model (plus the majority-class baseline): columns :data:`TABLE_COLUMNS`."""
    rows = []
    for k in range(n_folds):
        train, test = fold != k, fold == k
        y_train, y_test = y_all[train], y_all[test]
        n = {"n_train": int(train.sum()), "n_test": int(test.sum())}
        values, counts = np.unique(y_train, return_counts=True)
        majority = values[np.argmax(counts)]
        rows.append({"feature_set": BASELINE[0], "model": BASELINE[1], "fold": str(k),
                     **_scores(y_test, np.full(y_test.shape, majority)), **n})
        for name, fs in sets.items():
            for model in MODELS:
                est = _pipeline(fs, model, seed=seed, n_estimators=n_estimators, n_jobs=n_jobs)
                est.fit(fs.x[train], y_train)
                rows.append({"feature_set": name, "model": model, "fold": str(k),
                             **_scores(y_test, est.predict(fs.x[test])), **n})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _tables(
    folds: pd.DataFrame, sizes: dict[str, tuple[int, int]], n_folds: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fold table with a ``mean`` row per feature set and model, and the summary (mean and std over
    folds, ``n_features`` and ``n_columns`` per set from ``sizes``) in the order of ``sizes``."""
    order = list(sizes)
    g = folds.groupby(["feature_set", "model"], sort=False)
    metrics = ["macro_f1", "accuracy", "n_train", "n_test"]
    means = g[metrics].mean().reset_index().assign(fold="mean")
    table = pd.concat([folds, means[list(TABLE_COLUMNS)]], ignore_index=True)
    summary = (
        g[["macro_f1", "accuracy"]].agg(["mean", "std"]).pipe(
            lambda d: d.set_axis([f"{m}_{s}" for m, s in d.columns], axis=1)
        ).reset_index()
    )
    summary["n_features"] = summary["feature_set"].map(lambda s: sizes[s][0])
    summary["n_columns"] = summary["feature_set"].map(lambda s: sizes[s][1])
    summary["n_folds"] = n_folds
    summary = summary.sort_values("feature_set", key=lambda s: s.map(order.index), kind="stable")
    summary = summary.reset_index(drop=True)
    return table, summary


def probe_markdown(result: ProbeResult) -> str:
    """Markdown summary for a report: mean ± std over folds per feature set and model, then the classes."""
    m = result.meta
    region = m.get("region")
    where = f" in region {region[0]}:{region[1]},{region[2]}:{region[3]}" if region else ""
    renamed = ", ".join(f"`{old}` -> `{new}`" for old, new in m.get("renamed", RENAMED).items())
    lines = [
        f"Probe of `{m['label']}`{where}: {m['n_pixel_dates']} pixel-dates ({m['n_pixels']} pixels, {m['n_blocks']} "
        f"blocks of {m['block_px']} px), {m['n_folds']}-fold spatially blocked CV ({m['cv']}).",
        "",
        "| features (inputs) | model | macro-F1 | accuracy |",
        "|---|---|---|---|",
    ]
    for r in result.summary.itertuples(index=False):
        cols = getattr(r, "n_columns", r.n_features)
        inputs = f"{r.n_features}" if cols == r.n_features else f"{r.n_features} of {cols}"
        lines.append(
            f"| {r.feature_set} ({inputs}) | {r.model} | {r.macro_f1_mean:.3f} ± {r.macro_f1_std:.3f} | "
            f"{r.accuracy_mean:.3f} ± {r.accuracy_std:.3f} |"
        )
    lines += [
        "",
        "(n of m): PCA-n of m columns, fitted per training fold. `embedding<k>`: the embedding's first k "
        "features; `date_*`: the date alone; `window*`: the model's window of dates; `season*`: the pixel's "
        "monthly series (an upper reference, the same for every date).",
        f"Feature sets were renamed ({renamed}), so older probe outputs can be read side by side.",
    ]
    if m.get("skipped"):
        lines.append("Not built: " + "; ".join(f"`{k}` ({v})" for k, v in m["skipped"].items()) + ".")
    kept = ", ".join(f"{c} ({v['pixels']} px)" for c, v in m["classes_kept"].items())
    lines += ["", f"Classes kept: {kept}."]
    if m["classes_dropped"]:
        dropped = ", ".join(f"{c} ({v['reason']})" for c, v in m["classes_dropped"].items())
        lines.append(f"Classes dropped: {dropped}.")
    return "\n".join(lines)
