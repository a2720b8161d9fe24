"""PCA colour maps of an embedding store: a quick look at what the 7 features separate.

One PCA is fitted on a random sample of valid pixel-dates from the *whole* store, and one colour
stretch (the 2nd-98th percentile of each component over that sample) maps components 1-3 to red,
green and blue. Fit and stretch are shared by every date, so a colour means the same embedding
on every map and change over time shows as change of colour. Each map sits beside the S2 true
colour of the same date; missing pixels are light grey in both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyproj
import xarray as xr

from stembed.contract import CubeError
from stembed.io.embeddings import EmbeddingStoreError, grid_mismatch
from stembed.io.export import date_labels, select_dates
from stembed.types import BAND, FEATURE, TIME, X, Y

_PERCENTILES = (2.0, 98.0)
_N_DEFAULT_DATES = 4
_N_COMPONENTS = 3  # the PCA map shows components 1-3 as RGB
_MISSING_RGB = (0.85, 0.85, 0.85)  # light grey: no embedding / no S2 observation
_MAX_DISPLAY_PX = 2048  # larger maps are shown at every n-th pixel, keeping reads and PNGs small
_S2_TIME_TOL = pd.Timedelta(seconds=60)  # S2 cube and embedding store times agree within this
_TRUE_COLOUR = ("B04", "B03", "B02")


def _check_grid(embeddings: xr.Dataset, s2: xr.DataArray) -> None:
    fix = "fix: pass the scene store (--cube) the embeddings were made from"
    problem = grid_mismatch(embeddings, s2, "S2 cube")
    if problem:
        raise CubeError(f"{problem}; {fix}")
    s2_crs, store_crs = s2.attrs.get("crs"), embeddings.attrs.get("crs")
    if s2_crs and store_crs and pyproj.CRS(s2_crs) != pyproj.CRS(store_crs):
        raise CubeError(f"the S2 cube is in {s2_crs} but the embedding store in {store_crs}; {fix}")
    missing = [b for b in _TRUE_COLOUR if b not in s2[BAND].values]
    if missing:
        raise CubeError(f"the S2 cube lacks band(s) {missing} for the true colour; {fix}")


def _s2_time_index(s2: xr.DataArray, times: np.ndarray) -> list[int]:
    """Position in the S2 cube of each embedding time; every one must be there."""
    s2_times = pd.DatetimeIndex(s2[TIME].values)
    pos = s2_times.get_indexer(pd.DatetimeIndex(times), method="nearest", tolerance=_S2_TIME_TOL)
    if (pos < 0).any():
        absent = ", ".join(str(pd.Timestamp(t)) for t in np.asarray(times)[pos < 0])
        raise CubeError(
            f"the S2 cube has no acquisition at {absent}; fix: pass the scene store (--cube) the "
            "embeddings were made from"
        )
    return [int(p) for p in pos]


def _check_true_colour(s2: xr.DataArray, s2_pos: list[int], times: np.ndarray) -> None:
    """Refuse dates whose S2 has no pixel with all of B04/B03/B02, before anything is drawn: a blank true
    colour beside a PCA map means the S2 cube is not the one the embeddings were made from."""
    rgb = s2.isel({TIME: s2_pos}).sel({BAND: list(_TRUE_COLOUR)})
    observed = np.asarray(rgb.notnull().all(BAND).any((Y, X)).values)
    if not observed.all():
        empty = ", ".join(f"{pd.Timestamp(t):%Y-%m-%d}" for t in times[~observed])
        raise CubeError(
            f"the S2 cube has no observed B04/B03/B02 pixel on {empty}, so its true colour would be blank; fix: "
            "pass the scene store (--cube) the embeddings were made from"
        )


def _draw_sample(
    embeddings: xr.Dataset, counts: np.ndarray, n_samples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n_samples`` valid pixel-dates drawn uniformly without replacement: ``(n, feature)`` values
    and ``(n,)`` time indices. Reads the ``valid`` mask one date at a time."""
    width = embeddings.sizes[X]
    total = int(counts.sum())
    draws = np.sort(rng.choice(total, size=min(n_samples, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    t_of = np.searchsorted(starts, draws, side="right") - 1
    ts, rows, cols = [], [], []
    for t in np.unique(t_of):
        local = draws[t_of == t] - starts[t]
        flat = np.flatnonzero(np.asarray(embeddings["valid"].isel({TIME: int(t)}).values))[local]
        r, c = np.divmod(flat, width)
        ts.append(np.full(flat.size, t))
        rows.append(r)
        cols.append(c)
    t_idx = np.concatenate(ts)
    pick = {TIME: xr.DataArray(t_idx, dims="s"), Y: xr.DataArray(np.concatenate(rows), dims="s"),
            X: xr.DataArray(np.concatenate(cols), dims="s")}
    values = np.asarray(embeddings["embedding"].isel(pick).transpose("s", FEATURE).values, np.float64)
    keep = np.isfinite(values).all(axis=1)
    return values[keep], t_idx[keep]


def _stretch(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.clip((values - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)


def _true_colour(s2: xr.DataArray, t: int, stride: int) -> np.ndarray:
    """``(y, x, 3)`` RGB in [0, 1] from B04/B03/B02 with one 2-98 % stretch for the three bands (keeps the
    hue); pixels missing any band are grey."""
    win = {TIME: t, Y: slice(None, None, stride), X: slice(None, None, stride)}
    bands = s2.isel(win).sel({BAND: list(_TRUE_COLOUR)})
    rgb = np.asarray(bands.transpose(Y, X, BAND).values, np.float64)
    ok = np.isfinite(rgb).all(axis=2)
    out = np.empty(rgb.shape, np.float64)
    out[:] = _MISSING_RGB
    if ok.any():
        lo, hi = np.percentile(rgb[ok], _PERCENTILES)
        out[ok] = _stretch(rgb[ok], lo, hi)
    return out


def _pca_rgb(
    embeddings: xr.Dataset, t: int, stride: int, pca: Any, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """``(y, x, 3)`` RGB of components 1-3 of date ``t`` with the shared stretch; missing pixels grey."""
    win = {TIME: t, Y: slice(None, None, stride), X: slice(None, None, stride)}
    emb = np.asarray(embeddings["embedding"].isel(win).transpose(Y, X, FEATURE).values, np.float64)
    ok = np.asarray(embeddings["valid"].isel(win).transpose(Y, X).values, bool) & np.isfinite(emb).all(axis=2)
    out = np.empty((*emb.shape[:2], 3), np.float64)
    out[:] = _MISSING_RGB
    if ok.any():
        out[ok] = _stretch(pca.transform(emb[ok]), lo, hi)
    return out


def _save_panel(path: Path, left: np.ndarray, right: np.ndarray, title: str, right_title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = left.shape[:2]
    panel_w = 5.0
    fig = Figure(figsize=(2 * panel_w + 0.6, min(max(panel_w * h / w, 2.0), 12.0) + 1.0), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, img, sub in zip(axes, (left, right), ("S2 true colour (B04 B03 B02)", right_title), strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(sub, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, bbox_inches="tight")


def pca_maps(
    embeddings: xr.Dataset,
    s2: xr.DataArray,
    *,
    dates: Sequence[str] | None,
    out_dir: str | Path,
    n_samples: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit a 3-component PCA on the store and save, per date, S2 true colour beside the PCA colours.

    Args:
        embeddings: a store from :func:`stembed.io.embeddings.open_embeddings`.
        s2: the S2 cube of the same grid and dates (e.g. ``open_scene(path).s2``).
        dates: ISO days to map (every store date on such a day); None picks up to 4 dates with the
            most valid pixels, in time order.
        out_dir: folder for ``pca_<date>.png`` and ``pca.json`` (created if needed; files replaced).
        n_samples: at most this many valid pixel-dates, drawn over all dates, fit the PCA and stretch.
        seed: seeds the draw (``np.random.default_rng``).

    Returns:
        ``{"pngs": [paths], "json": path}``.

    Raises:
        EmbeddingStoreError: a date is not in the store, or the store has too few valid pixel-dates.
        CubeError: the S2 cube is on another grid or lacks a mapped date or a true-colour band.
    """
    _check_inputs(embeddings, s2, n_samples)
    times = embeddings[TIME].values
    labels = date_labels(times)
    counts = np.asarray(embeddings["valid"].sum(dim=(Y, X)).values, np.int64)
    chosen = _chosen_dates(times, counts, dates)
    s2_pos = _s2_time_index(s2, times[chosen])
    _check_true_colour(s2, s2_pos, times[chosen])
    pca, sample, sample_t, lo, hi = _fit_pca(embeddings, counts, int(n_samples), seed)
    ratio = pca.explained_variance_ratio_

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stride = max(1, math.ceil(max(embeddings.sizes[Y], embeddings.sizes[X]) / _MAX_DISPLAY_PX))
    var_text = " / ".join(f"{100 * r:.1f}" for r in ratio)
    pngs = []
    for t, t_s2 in zip(chosen, s2_pos, strict=True):
        path = out_dir / f"pca_{labels[t]}.png"
        _save_panel(
            path,
            _true_colour(s2, t_s2, stride),
            _pca_rgb(embeddings, t, stride, pca, lo, hi),
            f"{pd.Timestamp(times[t]):%Y-%m-%d %H:%M} UTC  ({int(counts[t])} valid pixels)",
            f"PCA RGB = PC1, PC2, PC3 (explained variance {var_text} %)",
        )
        pngs.append(path)

    per_date = np.bincount(sample_t, minlength=len(times))
    report = _report(embeddings, pca, lo, hi, labels, chosen, pngs, len(sample), n_samples, counts, per_date, seed,
                     stride)
    json_path = out_dir / "pca.json"
    json_path.write_text(json.dumps(report, indent=2))
    return {"pngs": pngs, "json": json_path}


def _check_inputs(embeddings: xr.Dataset, s2: xr.DataArray, n_samples: int) -> None:
    """Refuse a sample too small for 3 components, a store with fewer features, and an S2 cube on another grid."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 3:
        raise EmbeddingStoreError(f"n_samples must be a whole number >= 3, got {n_samples!r}")
    if embeddings.sizes[FEATURE] < _N_COMPONENTS:
        n_f = embeddings.sizes[FEATURE]
        raise EmbeddingStoreError(f"the store has {n_f} features; a PCA map needs >= {_N_COMPONENTS}")
    _check_grid(embeddings, s2)


def _chosen_dates(times: np.ndarray, counts: np.ndarray, dates: Sequence[str] | None) -> list[int]:
    """Indices of the dates to map: those asked for, or up to 4 with the most valid pixels, in time order."""
    if dates is None:
        ranked = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
        return sorted(ranked[:_N_DEFAULT_DATES])
    return select_dates(times, dates)


def _fit_pca(
    embeddings: xr.Dataset, counts: np.ndarray, n_samples: int, seed: int
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The PCA fitted on a seeded draw of valid pixel-dates, the draw and its dates, and the stretch."""
    from sklearn.decomposition import PCA

    sample, sample_t = np.empty((0, 0)), np.empty(0, np.int64)
    if counts.sum() >= _N_COMPONENTS:
        sample, sample_t = _draw_sample(embeddings, counts, n_samples, np.random.default_rng(seed))
    if len(sample) < _N_COMPONENTS:
        raise EmbeddingStoreError(
            f"the store has only {len(sample)} valid pixel-dates; a PCA needs >= {_N_COMPONENTS}; "
            "fix: embed a larger or less cloudy cube"
        )
    pca = PCA(n_components=_N_COMPONENTS, random_state=seed).fit(sample)
    lo, hi = np.percentile(pca.transform(sample), _PERCENTILES, axis=0)
    return pca, sample, sample_t, lo, hi


def _report(
    embeddings: xr.Dataset, pca: Any, lo: np.ndarray, hi: np.ndarray, labels: list[str], chosen: list[int],
    pngs: list[Path], n_drawn: int, n_samples: int, counts: np.ndarray, per_date: np.ndarray, seed: int,
    stride: int,
) -> dict[str, Any]:
    """``pca.json``: the fit, the stretch, the dates mapped and the sample's make-up."""
    return {
        "features": [str(f) for f in embeddings[FEATURE].values],
        "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_],
        "explained_variance": [float(v) for v in pca.explained_variance_],
        "components": [[float(v) for v in row] for row in pca.components_],
        "mean": [float(v) for v in pca.mean_],
        "stretch": {
            "percentiles": list(_PERCENTILES),
            "low": [float(v) for v in lo],
            "high": [float(v) for v in hi],
            "computed_on": "the fit sample, per component; shared by every date",
        },
        "dates": [labels[t] for t in chosen],
        "pngs": [p.name for p in pngs],
        "n_samples": n_drawn,
        "n_samples_requested": int(n_samples),
        "n_valid_pixel_dates": int(counts.sum()),
        "samples_per_date": {labels[i]: int(n) for i, n in enumerate(per_date) if n},
        "seed": int(seed),
        "display_stride_px": stride,
    }
