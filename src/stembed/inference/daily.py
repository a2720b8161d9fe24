"""A daily series from per-date embeddings, with a flag on every value saying where it came from.

Input is the per-date embedding cube ``(time, feature, y, x)`` plus a ``(time, y, x)`` flag: the
embedding of a date whose S2 centre pixel was observed (:data:`FLAG_OBSERVED`), one the gap-fill
model inferred for a cloudy date (:data:`FLAG_MODEL`), or no value (:data:`FLAG_NONE`, NaN). The
output has one value per calendar day; every day gets one CF-style flag code (:data:`FLAG_MEANINGS`,
index = code, so ``flag_values``/``flag_meanings`` attributes can be written straight from them):

- a day that is one of the input dates with a known value keeps that value and flag bit for bit;
- any other day between the pixel's first and last known value is filled by linear interpolation
  in time (:data:`FLAG_LINEAR`), or with ``method="savgol"`` by a Savitzky-Golay smoothing of that
  linear daily series (:data:`FLAG_SAVGOL`);
- before the pixel's first and after its last known value there is no value (NaN, :data:`FLAG_NONE`):
  nothing is extrapolated.

Pixels are independent, so the work runs over blocks of pixels to bound the temporary memory; the
result itself is ``day x feature x y x x`` float32.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import convolve1d
from scipy.signal import savgol_coeffs

from stembed.data.sampling import day_numbers
from stembed.errors import UserError

FLAG_NONE = 0
"""No value: before the pixel's first or after its last known value (or no known value at all)."""
FLAG_OBSERVED = 1
"""The embedding of a date whose S2 centre pixel was observed."""
FLAG_MODEL = 2
"""Model-based: the embedding of a cloudy S2 date inferred by the gap-fill model."""
FLAG_LINEAR = 3
"""Linear interpolation in time between the pixel's neighbouring known values."""
FLAG_SAVGOL = 4
"""Savitzky-Golay smoothing (``scipy.signal.savgol_filter``) of the linear daily series."""
FLAG_MEANINGS = ("none", "observed", "model_based", "linear", "savgol")
"""CF ``flag_meanings``; index = flag code."""
FILL_METHODS = ("linear", "savgol")

_INPUT_FLAGS = (FLAG_NONE, FLAG_OBSERVED, FLAG_MODEL)
_BLOCK_VALUES = 4_000_000  # day x feature x pixel values per block (16 MB per float32 temporary)


class DailyError(UserError):
    """Per-date values, flags or dates that cannot be turned into a daily series."""


def daily_dates(daily_days: np.ndarray) -> np.ndarray:
    """``datetime64[ns]`` of day numbers (days since 1970-01-01), e.g. for an xarray ``time`` coordinate."""
    return np.asarray(daily_days, dtype=np.int64).astype("datetime64[D]").astype("datetime64[ns]")


def fill_daily(
    values: np.ndarray,
    flags: np.ndarray,
    days: np.ndarray,
    *,
    method: str = "linear",
    savgol_window_days: int = 31,
    savgol_order: int = 2,
    first_day: int | None = None,
    last_day: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every day from ``first_day`` to ``last_day``: known values kept, gaps filled, each value flagged.

    Observed and model-based values both count as known (both anchor the interpolation). Known
    values outside ``[first_day, last_day]`` still anchor it; they are just not in the output.

    With ``method="savgol"`` the linear daily series over each pixel's span (first to last known
    day) is smoothed with ``savgol_filter(..., mode="interp")``: "interp" fits the polynomial to the
    first/last window of the span itself, so no padded values (mirror, constant, ...) that are not
    data bend the ends. The smoothed values replace only the non-known days; known days keep their
    exact value. A pixel whose span is shorter than the window cannot be fitted that way and is
    filled linearly (flagged :data:`FLAG_LINEAR`). All pixels are smoothed at once; the numbers are
    those of ``scipy.signal.savgol_filter`` run on each pixel's span (``tests/inference/test_daily.py`` checks it).

    Args:
        values: ``(time, feature, y, x)`` float, NaN where there is no value.
        flags: ``(time, y, x)`` uint8, :data:`FLAG_OBSERVED`, :data:`FLAG_MODEL` or :data:`FLAG_NONE`;
            NONE exactly where ``values`` is NaN (all features).
        days: ``(time,)`` day numbers (days since 1970-01-01, see
            :func:`stembed.data.sampling.day_numbers`; ``datetime64`` is converted with it), strictly
            increasing.
        method: ``"linear"`` or ``"savgol"``.
        savgol_window_days: Savitzky-Golay window in days (odd, >= 3, > ``savgol_order``).
        savgol_order: Savitzky-Golay polynomial order.
        first_day: first day of the output (default ``days[0]``).
        last_day: last day of the output, inclusive (default ``days[-1]``).

    Returns:
        ``(daily_values, daily_flags, daily_days)``: ``(day, feature, y, x)`` float32,
        ``(day, y, x)`` uint8 codes of :data:`FLAG_MEANINGS`, ``(day,)`` int64 day numbers.
    """
    values, flags, days = _check_inputs(values, flags, days)
    lo, hi = _output_range(days, method, savgol_window_days, savgol_order, first_day, last_day)
    n_time, n_feat, ny, nx = values.shape
    out_days = np.arange(lo, hi + 1, dtype=np.int64)
    out, out_flags = _fill_pixel_blocks(
        values.reshape(n_time, n_feat, ny * nx),
        flags.reshape(n_time, ny * nx),
        days,
        lo,
        hi,
        method,
        savgol_window_days,
        savgol_order,
    )
    return out.reshape(out_days.size, n_feat, ny, nx), out_flags.reshape(out_days.size, ny, nx), out_days


def _output_range(
    days: np.ndarray,
    method: str,
    savgol_window_days: int,
    savgol_order: int,
    first_day: int | None,
    last_day: int | None,
) -> tuple[int, int]:
    """Check the fill method and its settings; the output's first and last day (defaults: the input's)."""
    if method not in FILL_METHODS:
        raise DailyError(f"unknown fill method {method!r}; use one of {', '.join(FILL_METHODS)}")
    if method == "savgol":
        check_savgol(savgol_window_days, savgol_order)
    lo = int(days[0]) if first_day is None else int(first_day)
    hi = int(days[-1]) if last_day is None else int(last_day)
    if hi < lo:
        raise DailyError(f"last_day {hi} is before first_day {lo}; pass last_day >= first_day")
    return lo, hi


def _fill_pixel_blocks(
    vals: np.ndarray,
    flat_flags: np.ndarray,
    days: np.ndarray,
    lo: int,
    hi: int,
    method: str,
    savgol_window_days: int,
    savgol_order: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Days ``lo..hi`` of ``(time, feature, pixel)`` values, filled in blocks of pixels (bounded memory)."""
    _, n_feat, n_pix = vals.shape
    n_days = hi - lo + 1
    # savgol needs each pixel's whole span, so it works on a grid covering every input date too
    g_lo, g_hi = (min(lo, int(days[0])), max(hi, int(days[-1]))) if method == "savgol" else (lo, hi)
    grid = np.arange(g_lo, g_hi + 1, dtype=np.int64)
    keep = slice(lo - g_lo, hi - g_lo + 1)
    known = flat_flags != FLAG_NONE
    out = np.empty((n_days, n_feat, n_pix), dtype=np.float32)
    out_flags = np.empty((n_days, n_pix), dtype=np.uint8)
    direct = grid.size == n_days  # else work on the wider grid and keep the requested days

    block = max(1, _BLOCK_VALUES // (grid.size * max(n_feat, 1)))
    for p0 in range(0, n_pix, block):
        p = slice(p0, min(p0 + block, n_pix))
        v = out[:, :, p] if direct else np.empty((grid.size, n_feat, p.stop - p0), dtype=np.float32)
        f = _fill_block(
            v,
            vals[:, :, p],
            known[:, p],
            flat_flags[:, p],
            days,
            grid,
            method,
            savgol_window_days,
            savgol_order,
        )
        if not direct:
            out[:, :, p] = v[keep]
        out_flags[:, p] = f[keep]
    return out, out_flags


def known_neighbours(known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per ``(time, pixel)``: the index of the last known date at or before it, and of the first at or after.

    ``-1`` / ``time`` where there is none on that side (``known`` is ``(time, ...)`` bool).
    """
    n_time = known.shape[0]
    t = np.arange(n_time).reshape((n_time,) + (1,) * (known.ndim - 1))
    prev = np.maximum.accumulate(np.where(known, t, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(known, t, n_time)[::-1], axis=0)[::-1]
    return prev, nxt


def _fill_block(
    out: np.ndarray,
    vals: np.ndarray,
    known: np.ndarray,
    flags: np.ndarray,
    days: np.ndarray,
    grid: np.ndarray,
    method: str,
    window: int,
    order: int,
) -> np.ndarray:
    """Fill ``out`` ``(day, feature, pixel)`` for one block of pixels; return its flags ``(day, pixel)``.

    Work is done per *slot* (the days from one input date up to the next share, per pixel, the same
    pair of known neighbours), so the gathers are ``time``-sized and only cheap row copies are daily.
    """
    n_time, n_feat, n_pix = vals.shape
    prev_t, next_t = known_neighbours(known)  # (time, pixel)
    # slot k + 1 = days in [days[k], days[k + 1]); slot 0 = days before the first date (no value)
    nxt_slot = np.concatenate([next_t[1:], np.full((1, n_pix), n_time)])  # first known date > days[k]
    valid = (prev_t >= 0) & (nxt_slot < n_time)  # (time, pixel): both neighbours exist
    p_c, n_c = np.clip(prev_t, 0, n_time - 1), np.clip(nxt_slot, 0, n_time - 1)
    f_idx, p_idx = np.arange(n_feat)[None, :, None], np.arange(n_pix)[None, None, :]
    v_prev = vals[p_c[:, None, :], f_idx, p_idx]  # (time, feature, pixel)
    dv = vals[n_c[:, None, :], f_idx, p_idx] - v_prev
    no_value = ~np.broadcast_to(valid[:, None, :], v_prev.shape)
    v_prev[no_value], dv[no_value] = 0, 0  # finite until the end, where NaN marks "no value"
    d_prev, span = days[p_c], np.where(valid, days[n_c] - days[p_c], 1)

    zero_slot = np.zeros((1, n_feat, n_pix), dtype=np.float32)
    slot = np.searchsorted(days, grid, side="right")  # (day,) 1 + index of the last date <= day
    k = np.maximum(slot - 1, 0)
    w = ((grid[:, None] - d_prev[k]) / span[k]).astype(np.float32)  # (day, pixel)
    np.take(np.concatenate([zero_slot, v_prev]), slot, axis=0, out=out, mode="clip")
    out += np.take(np.concatenate([zero_slot, dv]), slot, axis=0) * w[:, None, :]

    on_known = ((slot > 0) & (days[k] == grid))[:, None] & known[k]  # (day, pixel): a date with a value
    inside = np.take(np.concatenate([np.zeros((1, n_pix), dtype=bool), valid]), slot, axis=0) | on_known
    # known days bit-identical: copied (the last known date has no right neighbour, so it is 0 above)
    day_i, pix_i = np.nonzero(on_known)
    out[day_i, :, pix_i] = vals[k[day_i], :, pix_i]
    out_flags = np.where(inside, FLAG_LINEAR, FLAG_NONE).astype(np.uint8)
    if method == "savgol":
        _smooth(out, out_flags, inside & ~on_known, prev_t, next_t, days, grid, window, order)
    out_flags[day_i, pix_i] = flags[k[day_i], pix_i]
    np.copyto(out, np.float32(np.nan), where=~inside[:, None, :])
    return out_flags


def _savgol_hat(window: int, order: int) -> np.ndarray:
    """``(window, window)`` least-squares polynomial fit over a window: row i = the fitted value at i.

    The centre row is the Savitzky-Golay filter; the first/last half rows are what
    ``savgol_filter(mode="interp")`` does at the ends.
    """
    pos = np.arange(window, dtype=np.float64) - window // 2
    q, _ = np.linalg.qr(np.vander(pos, order + 1, increasing=True))
    return q @ q.T


def _smooth(
    out: np.ndarray,
    out_flags: np.ndarray,
    fill: np.ndarray,
    prev_t: np.ndarray,
    next_t: np.ndarray,
    days: np.ndarray,
    grid: np.ndarray,
    window: int,
    order: int,
) -> None:
    """Savitzky-Golay of each pixel's span (``mode="interp"``), in place, on the ``fill`` days only.

    The same numbers as ``savgol_filter(span, window, order, mode="interp")`` pixel by pixel, without
    grouping pixels by span: the interior is one convolution over the whole block (zeros outside a
    span never reach a day whose window lies inside it), as ``savgol_filter`` itself does, and the
    days within half a window of a span's ends are refitted from the span's first/last window.
    """
    n_time = prev_t.shape[0]
    n_day, n_feat, n_pix = out.shape
    half = window // 2
    first, last = next_t[0], prev_t[-1]  # (pixel,) first and last known date index
    has = first < n_time
    s = np.where(has, days[np.clip(first, None, n_time - 1)] - grid[0], 0)  # span start/end in grid days
    e = np.where(has, days[np.clip(last, 0, None)] - grid[0], -1)
    ok = has & (e - s + 1 >= window)  # shorter spans stay linear
    if not ok.any():
        return
    s, e = np.where(ok, s, 0), np.where(ok, e, window - 1)  # any in-range window for the others
    x = out  # finite everywhere (0 outside a span); read before it is overwritten below
    smooth = convolve1d(x, savgol_coeffs(window, order).astype(np.float32), axis=0, mode="constant")
    hat = _savgol_hat(window, order).astype(np.float32)
    f_idx, p_idx = np.arange(n_feat)[None, :, None], np.arange(n_pix)[None, None, :]
    for start, rows in ((s, slice(0, half)), (e - window + 1, slice(window - half, window))):
        t = start[None, :] + np.arange(window)[:, None]  # (window, pixel) the span's first/last window
        fitted = np.einsum("ij,jfp->ifp", hat[rows], x[t[:, None, :], f_idx, p_idx])
        smooth[t[rows][:, None, :], f_idx, p_idx] = fitted
    use = fill & ok[None, :]
    np.copyto(out, smooth, where=use[:, None, :])
    out_flags[use] = FLAG_SAVGOL


def check_savgol(window: int, order: int) -> None:
    """Refuse a Savitzky-Golay window/order that scipy cannot use (callers check before writing anything)."""
    if int(order) != order or order < 0:
        raise DailyError(f"savgol_order must be a non-negative integer, got {order!r}; 2 is the usual choice")
    if int(window) != window or window < 3 or window % 2 == 0 or window <= order:
        raise DailyError(
            f"savgol_window_days must be an odd integer >= 3 and > savgol_order ({order}), got {window!r}; "
            "pick e.g. 31"
        )


def _check_inputs(values: np.ndarray, flags: np.ndarray, days: np.ndarray) -> tuple[np.ndarray, ...]:
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        raise DailyError(f"values must be a float array (NaN = no value), got dtype {values.dtype}")
    values = values.astype(np.float32, copy=False)
    flags = np.asarray(flags)
    days = np.asarray(days)
    if np.issubdtype(days.dtype, np.datetime64):
        days = day_numbers(days)
    if values.ndim != 4 or flags.ndim != 3 or days.ndim != 1:
        raise DailyError(
            f"expected values (time, feature, y, x), flags (time, y, x) and days (time,); got shapes "
            f"{values.shape}, {flags.shape} and {days.shape}"
        )
    n_time, _, ny, nx = values.shape
    if flags.shape != (n_time, ny, nx) or days.shape != (n_time,):
        raise DailyError(
            f"flags {flags.shape} and days {days.shape} do not match values {values.shape}; "
            "flags must be (time, y, x) and days (time,) of the same cube"
        )
    if n_time == 0:
        raise DailyError("no dates: values has an empty time axis; pass at least one date")
    if not np.issubdtype(days.dtype, np.integer):
        raise DailyError(
            f"days must be integer day numbers (see stembed.data.sampling.day_numbers), got {days.dtype}"
        )
    days = days.astype(np.int64, copy=False)
    if np.any(np.diff(days) <= 0):
        raise DailyError("dates must be sorted and unique; merge same-day acquisitions first")
    bad = ~np.isin(flags, _INPUT_FLAGS)
    if bad.any():
        raise DailyError(
            f"{int(bad.sum())} flags have codes other than NONE/OBSERVED/MODEL "
            f"({FLAG_NONE}/{FLAG_OBSERVED}/{FLAG_MODEL}), e.g. {int(flags[bad][0])}; input flags say only "
            "whether a date's value is observed, model-based or absent"
        )
    flags = flags.astype(np.uint8, copy=False)
    is_none = flags == FLAG_NONE
    n_finite = np.isfinite(values).sum(axis=1)  # (time, y, x) features with a value
    n_nan = np.isnan(values).sum(axis=1)
    n_feat = values.shape[1]
    known_missing = ~is_none & (n_finite < n_feat)
    if known_missing.any():
        raise DailyError(
            f"{int(known_missing.sum())} pixel-dates flagged observed/model have NaN or infinite features; "
            "flag them FLAG_NONE (and set all features NaN), or supply their values"
        )
    none_valued = is_none & (n_nan < n_feat)
    if none_valued.any():
        raise DailyError(
            f"{int(none_valued.sum())} pixel-dates flagged FLAG_NONE have non-NaN features; set them to NaN, "
            "or flag them FLAG_OBSERVED/FLAG_MODEL if the value is real"
        )
    return values, flags, days
