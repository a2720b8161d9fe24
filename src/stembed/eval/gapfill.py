"""Bookkeeping of the gap-fill experiment: how good is each way of filling a cloudy date, by gap length.

On real data, whole clear S2 dates are hidden as if cloudy (:func:`hide_schedule`), every method
fills them (the gap-fill model is run by the caller; :func:`interpolate_at` gives the linear and
Savitzky-Golay fills of :func:`stembed.inference.daily.fill_daily`), and the error against the true
embedding is tabulated by the length of the gap each hidden pixel-date sits in (:func:`gap_lengths`,
:func:`error_table`, :func:`error_markdown`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from stembed.errors import UserError
from stembed.inference.daily import FLAG_NONE, FLAG_OBSERVED, fill_daily, known_neighbours

GAP_BINS_DAYS = (0, 10, 20, 40, 80, np.inf)
"""Right-closed bins of gap length in days: (0, 10], (10, 20], (20, 40], (40, 80], (80, inf)."""
ALL = "all"
OPEN = "open"
"""Gap label of hidden pixel-dates with no known date on one side (the series' ends)."""
_BLOCK_VALUES = 20_000_000  # day x feature x pixel values of fill_daily output per block (80 MB float32)


class GapFillEvalError(UserError):
    """A gap-fill evaluation request that cannot be carried out as given."""


def hide_schedule(n_dates: int, run_length: int, *, context: int = 5, offset: int = 0) -> np.ndarray:
    """Indices of dates to hide: runs of ``run_length`` consecutive dates, ``context`` kept dates apart.

    Why that spacing: a model window of ``2 * context + 1`` dates centred on any hidden date then
    holds no date of *another* run, so hiding one run never degrades another run's model input.
    Date 0 and the last date are always kept, so every run has a known date on both sides and
    interpolation is inside the series. ``offset`` shifts the first run (taken modulo the period
    ``run_length + context``), so calls with ``offset = 0 .. period - 1`` together hide every
    inner date.

    Returns:
        Sorted int64 indices (all runs are complete).
    """
    if int(run_length) != run_length or run_length < 1:
        raise GapFillEvalError(f"run_length must be an integer >= 1, got {run_length!r}")
    if int(context) != context or context < 1:
        raise GapFillEvalError(
            f"context must be an integer >= 1 (runs with no kept date between them merge into one), "
            f"got {context!r}"
        )
    period = run_length + context
    start = 1 + int(offset) % period
    starts = np.arange(start, n_dates - 1 - run_length + 1, period)  # last hidden date <= n_dates - 2
    if starts.size == 0:
        raise GapFillEvalError(
            f"no run of {run_length} dates fits in {n_dates} dates starting at index {start} with a kept "
            f"date at each end; use a shorter run_length, offset 0, or a series of at least "
            f"{start + run_length + 1} dates"
        )
    return (starts[:, None] + np.arange(run_length)[None, :]).ravel().astype(np.int64)


def gap_lengths(days: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Days between each unknown pixel-date's previous and next known date.

    Args:
        days: ``(time,)`` day numbers, strictly increasing.
        known: ``(time, y, x)`` bool.

    Returns:
        ``(time, y, x)`` float64; NaN for known pixel-dates and where one side has no known date.
    """
    days = np.asarray(days, dtype=np.int64)
    known = np.asarray(known, dtype=bool)
    if known.ndim < 1 or known.shape[0] != days.shape[0]:
        raise GapFillEvalError(
            f"known {known.shape} must be (time, ...) with time = len(days) = {days.shape[0]}"
        )
    n_time = days.shape[0]
    prev, nxt = known_neighbours(known)
    has_both = (prev >= 0) & (nxt < n_time) & ~known
    gap = (days[np.clip(nxt, 0, n_time - 1)] - days[np.clip(prev, 0, n_time - 1)]).astype(np.float64)
    return np.where(has_both, gap, np.nan)


def interpolate_at(
    values: np.ndarray,
    known: np.ndarray,
    days: np.ndarray,
    targets: np.ndarray,
    *,
    method: str,
    savgol_window_days: int = 31,
    savgol_order: int = 2,
) -> np.ndarray:
    """The daily fill of the series from its known dates only, read back at the ``targets``.

    Values at unknown pixel-dates are ignored (set to NaN before filling), so the truth can be passed
    as ``values`` with the hidden dates marked ``known=False``. Targets past a pixel's last (or before
    its first) known date get NaN: :func:`fill_daily` does not extrapolate.

    Args:
        values: ``(time, feature, y, x)``; every feature finite where ``known``.
        known: ``(time, y, x)`` bool, the dates a fill may use.
        days: ``(time,)`` day numbers, strictly increasing.
        targets: ``(time, y, x)`` bool, the pixel-dates to fill (all unknown).
        method: ``"linear"`` or ``"savgol"`` (see :func:`fill_daily`).
        savgol_window_days: Savitzky-Golay window in days.
        savgol_order: Savitzky-Golay polynomial order.

    Returns:
        ``(time, feature, y, x)`` float32: the fill at ``targets``, NaN elsewhere.
    """
    values = np.asarray(values, dtype=np.float32)
    known = np.asarray(known, dtype=bool)
    targets = np.asarray(targets, dtype=bool)
    days = np.asarray(days, dtype=np.int64)
    if values.ndim != 4 or known.shape != values.shape[:1] + values.shape[2:] or targets.shape != known.shape:
        raise GapFillEvalError(
            f"expected values (time, feature, y, x) with known and targets (time, y, x); got {values.shape}, "
            f"{known.shape} and {targets.shape}"
        )
    if (targets & known).any():
        raise GapFillEvalError(
            f"{int((targets & known).sum())} targets are marked known; a target must be hidden "
            "(known=False), or its 'fill' is just the true value"
        )
    n_time, n_feat, ny, nx = values.shape
    rows = max(1, _BLOCK_VALUES // max(1, int(days[-1] - days[0] + 1) * n_feat * nx)) if n_time else ny
    out = np.full(values.shape, np.nan, dtype=np.float32)
    for y0 in range(0, ny, rows):
        ys = slice(y0, min(y0 + rows, ny))
        k = known[:, ys]
        v = np.where(k[:, None], values[:, :, ys], np.nan).astype(np.float32)
        flags = np.where(k, FLAG_OBSERVED, FLAG_NONE).astype(np.uint8)
        daily, _, daily_days = fill_daily(
            v, flags, days, method=method, savgol_window_days=savgol_window_days, savgol_order=savgol_order
        )
        back = daily[days - daily_days[0]]
        out[:, :, ys] = np.where(targets[:, ys][:, None], back, np.nan)
    return out


def gap_labels(bins: Sequence[float] | np.ndarray = GAP_BINS_DAYS) -> list[str]:
    """Labels of right-closed bins: ``'≤10'``, ``'10–20'``, ..., ``'>80'``."""
    labels = []
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        if lo <= 0:
            labels.append(f"≤{hi:g}")
        elif np.isinf(hi):
            labels.append(f">{lo:g}")
        else:
            labels.append(f"{lo:g}–{hi:g}")
    return labels


def error_table(
    truth: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    targets: np.ndarray,
    gaps: np.ndarray,
    *,
    bins: Sequence[float] | np.ndarray = GAP_BINS_DAYS,
) -> pd.DataFrame:
    """Error of each method's fill against the truth, per gap-length bin and over all targets.

    A pixel-date counts where it is a target, its truth is finite (all features) and the method's
    prediction is finite (all features); targets whose truth is finite but the method gave no value
    (e.g. a gap at the end of the series, where interpolation has no right-hand side) are counted in
    ``n_missing``, so nothing is dropped silently. Targets whose gap is open on one side (NaN in
    ``gaps``) get their own ``'open'`` row if there are any; every row of bins is always present.

    Columns: ``method``, ``gap_days`` (bin label, ``'open'`` or ``'all'``), ``n``, ``n_missing``,
    ``mae`` (mean over pixel-dates of the mean |pred - truth| over features), ``rmse`` (root of the
    mean squared error over all values) and ``rel_mae``: ``mae`` divided by the natural spread of the
    truth, the mean |truth - its per-feature mean| over *all* target pixel-dates with finite truth.
    One spread for every row, so ``rel_mae`` compares across bins and methods: 0 = perfect, 1 = as far
    off on average as predicting every target with each feature's mean.

    Args:
        truth: ``(time, feature, y, x)`` true embeddings.
        predictions: method name -> ``(time, feature, y, x)`` fill (NaN = no value).
        targets: ``(time, y, x)`` bool, the hidden pixel-dates.
        gaps: ``(time, y, x)`` gap length in days (:func:`gap_lengths`).
        bins: right-closed bin edges in days.
    """
    truth = np.asarray(truth, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    gaps = np.asarray(gaps, dtype=np.float64)
    grid = truth.shape[:1] + truth.shape[2:] if truth.ndim == 4 else None
    if grid is None or targets.shape != grid or gaps.shape != grid:
        raise GapFillEvalError(
            f"expected truth (time, feature, y, x) with targets and gaps (time, y, x); got {truth.shape}, "
            f"{targets.shape} and {gaps.shape}"
        )
    bins = np.asarray(bins, dtype=np.float64)
    if bins.ndim != 1 or bins.size < 2 or np.any(np.diff(bins) <= 0):
        raise GapFillEvalError(f"bins must be at least two increasing edges, got {bins.tolist()}")
    labels = gap_labels(bins)

    base = targets & np.isfinite(truth).all(axis=1)  # (time, y, x)
    t_sel = np.moveaxis(truth, 1, -1)[base]  # (n, feature)
    spread = float(np.mean(np.abs(t_sel - t_sel.mean(axis=0)))) if t_sel.size else np.nan
    groups = _gap_groups(gaps[base], bins, labels)

    rows = []
    for name, pred in predictions.items():
        pred = np.asarray(pred, dtype=np.float64)
        if pred.shape != truth.shape:
            raise GapFillEvalError(
                f"prediction {name!r} has shape {pred.shape}; it must match truth {truth.shape}"
            )
        rows += _method_rows(name, np.moveaxis(pred, 1, -1)[base], t_sel, groups, spread)
    return pd.DataFrame(rows, columns=["method", "gap_days", "n", "n_missing", "mae", "rmse", "rel_mae"])


def _gap_groups(gap_sel: np.ndarray, bins: np.ndarray, labels: list[str]) -> list[tuple[str, np.ndarray]]:
    """The rows of :func:`error_table`: (label, member mask over ``gap_sel``) per bin, ``'open'`` if any
    gap is open, and ``'all'``."""
    bin_of = np.searchsorted(bins, gap_sel, side="left") - 1  # right-closed: (lo, hi] -> index of lo
    bin_of = np.where(np.isfinite(gap_sel) & (gap_sel > bins[0]) & (gap_sel <= bins[-1]), bin_of, -1)
    groups = [(lab, bin_of == i) for i, lab in enumerate(labels)]
    if np.isnan(gap_sel).any():
        groups.append((OPEN, np.isnan(gap_sel)))
    groups.append((ALL, np.ones(gap_sel.shape, dtype=bool)))
    return groups


def _method_rows(
    name: str, p_sel: np.ndarray, t_sel: np.ndarray, groups: list[tuple[str, np.ndarray]], spread: float
) -> list[dict[str, object]]:
    """One method's rows of :func:`error_table`: ``p_sel`` / ``t_sel`` are its ``(n, feature)`` fill and the
    truth at the counted targets."""
    has = np.isfinite(p_sel).all(axis=1)
    err = p_sel - t_sel
    rows: list[dict[str, object]] = []
    for label, member in groups:
        use = member & has
        e = err[use]
        mae = float(np.abs(e).mean(axis=1).mean()) if e.size else np.nan
        rows.append(
            {
                "method": name,
                "gap_days": label,
                "n": int(use.sum()),
                "n_missing": int((member & ~has).sum()),
                "mae": mae,
                "rmse": float(np.sqrt(np.mean(e**2))) if e.size else np.nan,
                "rel_mae": mae / spread if spread else np.nan,
            }
        )
    return rows


def error_markdown(df: pd.DataFrame) -> str:
    """A Markdown table of :func:`error_table`: one row per gap bin, the target count, each method's MAE.

    ``targets`` is ``n + n_missing`` (the same for every method); a ``<method> missing`` column is
    added for each method that left targets without a value.
    """
    methods = list(dict.fromkeys(df["method"]))
    bins = list(dict.fromkeys(df["gap_days"]))
    by = df.set_index(["method", "gap_days"])
    header = ["gap (days)", "targets"] + [f"{m} MAE" for m in methods]
    missing = [m for m in methods if by.loc[m, "n_missing"].sum() > 0]
    header += [f"{m} missing" for m in missing]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for b in bins:
        first = by.loc[(methods[0], b)]
        cells = [b, str(int(first["n"] + first["n_missing"]))]
        cells += ["–" if np.isnan(by.loc[(m, b), "mae"]) else f"{by.loc[(m, b), 'mae']:.4f}" for m in methods]
        cells += [str(int(by.loc[(m, b), "n_missing"])) for m in missing]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
