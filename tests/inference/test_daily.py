"""Daily series with per-value flags, and the gap-fill evaluation bookkeeping, on hand-made series."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.signal import savgol_filter

from stembed.data.sampling import day_numbers
from stembed.errors import UserError
from stembed.eval.gapfill import (
    GapFillEvalError,
    error_markdown,
    error_table,
    gap_lengths,
    hide_schedule,
    interpolate_at,
)
from stembed.inference.daily import (
    FLAG_LINEAR,
    FLAG_MEANINGS,
    FLAG_MODEL,
    FLAG_NONE,
    FLAG_OBSERVED,
    FLAG_SAVGOL,
    DailyError,
    daily_dates,
    fill_daily,
)

DAY0 = 18_262  # 2020-01-01


def _series(
    seed: int, n_time: int = 20, n_feat: int = 3, ny: int = 4, nx: int = 5, p_none: float = 0.3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random per-date values and flags on irregular dates; NaN exactly where the flag is NONE."""
    rng = np.random.default_rng(seed)
    days = DAY0 + np.cumsum(rng.integers(1, 12, n_time))
    flags = rng.choice(
        [FLAG_NONE, FLAG_OBSERVED, FLAG_MODEL], p=[p_none, 0.5, 0.5 - p_none], size=(n_time, ny, nx)
    )
    values = rng.normal(size=(n_time, n_feat, ny, nx)).astype(np.float32)
    values[np.broadcast_to((flags == FLAG_NONE)[:, None], values.shape)] = np.nan
    return values, flags.astype(np.uint8), days.astype(np.int64)


def _reference(values, flags, days, method, window=31, order=2):
    """Pixel by pixel, feature by feature: np.interp over the span, then scipy's savgol_filter."""
    n_time, n_feat, ny, nx = values.shape
    grid = np.arange(days[0], days[-1] + 1)
    out = np.full((grid.size, n_feat, ny, nx), np.nan)
    out_flags = np.zeros((grid.size, ny, nx), dtype=np.uint8)
    for y in range(ny):
        for x in range(nx):
            k = flags[:, y, x] != FLAG_NONE
            if not k.any():
                continue
            kd = days[k]
            i0, i1 = kd[0] - grid[0], kd[-1] - grid[0] + 1
            is_known = np.isin(grid[i0:i1], kd)
            for f in range(n_feat):
                lin = np.interp(grid[i0:i1], kd, values[k, f, y, x].astype(np.float64))
                if method == "savgol" and i1 - i0 >= window:
                    sm = savgol_filter(lin, window, order, mode="interp")
                    lin = np.where(is_known, lin, sm)
                out[i0:i1, f, y, x] = lin
            fill = FLAG_SAVGOL if method == "savgol" and i1 - i0 >= window else FLAG_LINEAR
            out_flags[i0:i1, y, x] = np.where(is_known, 0, fill)
            out_flags[kd - grid[0], y, x] = flags[k, y, x]
    return out, out_flags


def test_flag_meanings_index_by_code() -> None:
    codes = {FLAG_NONE: "none", FLAG_OBSERVED: "observed", FLAG_MODEL: "model_based"}
    codes |= {FLAG_LINEAR: "linear", FLAG_SAVGOL: "savgol"}
    assert all(FLAG_MEANINGS[c] == name for c, name in codes.items())


@pytest.mark.parametrize("method", ["linear", "savgol"])
def test_known_days_are_bit_identical_and_keep_their_flag(method: str) -> None:
    values, flags, days = _series(0, n_time=40)
    daily, dflags, ddays = fill_daily(values, flags, days, method=method, savgol_window_days=7)
    assert daily.dtype == np.float32 and dflags.dtype == np.uint8 and ddays.dtype == np.int64
    assert ddays.tolist() == list(range(days[0], days[-1] + 1))
    at = days - ddays[0]
    known = flags != FLAG_NONE
    kv = np.broadcast_to(known[:, None], values.shape)
    assert np.array_equal(daily[at][kv].view(np.uint32), values[kv].view(np.uint32))
    assert np.array_equal(dflags[at][known], flags[known])
    assert (dflags[at][known] == FLAG_MODEL).any()


def test_linear_is_exact_on_a_linear_series_and_none_outside_the_span() -> None:
    values, flags, days = _series(1, n_time=25, p_none=0.45)
    slope = np.linspace(-0.02, 0.03, values[0].size).reshape(values.shape[1:])
    truth = 0.5 + slope * (days - DAY0)[:, None, None, None]
    values = np.where(np.isnan(values), np.nan, truth).astype(np.float32)
    flags[:, 0, 0] = FLAG_NONE  # a pixel with no value at all
    values[:, :, 0, 0] = np.nan
    daily, dflags, ddays = fill_daily(values, flags, days)

    known = flags != FLAG_NONE
    for y, x in [(1, 2), (3, 4), (0, 1)]:
        kd = days[known[:, y, x]]
        span = (ddays >= kd[0]) & (ddays <= kd[-1])
        expect = 0.5 + slope[:, y, x][None] * (ddays[span] - DAY0)[:, None]
        np.testing.assert_allclose(daily[span, :, y, x], expect, atol=1e-6)
        assert np.isnan(daily[~span, :, y, x]).all() and (dflags[~span, y, x] == FLAG_NONE).all()
        gap_days = span & ~np.isin(ddays, kd)
        assert (dflags[gap_days, y, x] == FLAG_LINEAR).all()
    assert np.isnan(daily[:, :, 0, 0]).all() and (dflags[:, 0, 0] == FLAG_NONE).all()


def test_flags_per_day_on_a_hand_example() -> None:
    days = np.array([10, 12, 15, 16, 20])
    flags = np.array([FLAG_NONE, FLAG_OBSERVED, FLAG_NONE, FLAG_MODEL, FLAG_NONE], dtype=np.uint8)[
        :, None, None
    ]
    values = np.array([np.nan, 2.0, np.nan, 8.0, np.nan], dtype=np.float32)[:, None, None, None]
    daily, dflags, ddays = fill_daily(values, flags, days, first_day=8, last_day=21)
    assert ddays.tolist() == list(range(8, 22))
    n, o, m, li = FLAG_NONE, FLAG_OBSERVED, FLAG_MODEL, FLAG_LINEAR
    # days 8..21:         8  9 10 11 12  13  14  15  16 17 ... 21
    assert dflags[:, 0, 0].tolist() == [n, n, n, n, o, li, li, li, m] + [n] * 5
    np.testing.assert_allclose(daily[4:9, 0, 0, 0], [2, 3.5, 5, 6.5, 8])
    assert np.isnan(daily[[0, 1, 2, 3, 9, 13], 0, 0, 0]).all()


def test_output_range_narrower_than_the_dates_still_uses_outside_anchors() -> None:
    days = np.array([0, 10, 20])
    flags = np.full((3, 1, 1), FLAG_OBSERVED, dtype=np.uint8)
    values = np.array([0.0, 10.0, 40.0], dtype=np.float32)[:, None, None, None]
    for method in ("linear", "savgol"):
        daily, dflags, ddays = fill_daily(
            values, flags, days, method=method, savgol_window_days=5, first_day=5, last_day=14
        )
        ref, ref_flags = _reference(values, flags, days, method, window=5)
        np.testing.assert_allclose(daily[:, 0, 0, 0], ref[5:15, 0, 0, 0], rtol=1e-6)
        assert dflags[:, 0, 0].tolist() == ref_flags[5:15, 0, 0].tolist()
    assert ddays.tolist() == list(range(5, 15))


@pytest.mark.parametrize("window,order", [(7, 2), (11, 3), (5, 1)])
def test_savgol_matches_scipy_over_each_pixels_span(window: int, order: int) -> None:
    values, flags, days = _series(2, n_time=30, ny=5, nx=6, p_none=0.4)
    # a quadratic trend under the noise, a short span (linear), an empty pixel, a late start
    values = values + (0.002 * (days - days[0]) ** 2)[:, None, None, None].astype(np.float32)
    flags[:, 0, 0], values[:, :, 0, 0] = FLAG_NONE, np.nan
    flags[:, 0, 1], values[:, :, 0, 1] = FLAG_NONE, np.nan
    flags[[3, 4], 0, 1], values[3, :, 0, 1], values[4, :, 0, 1] = FLAG_OBSERVED, 1.0, 2.0
    days[4:] -= days[4] - days[3] - 2  # that span (3 days) is shorter than any window
    flags[:20, 1, 1], values[:20, :, 1, 1] = FLAG_NONE, np.nan
    flags[20, 1, 1], values[20, :, 1, 1] = FLAG_OBSERVED, 0.5
    daily, dflags, _ = fill_daily(
        values, flags, days, method="savgol", savgol_window_days=window, savgol_order=order
    )
    ref, ref_flags = _reference(values, flags, days, "savgol", window, order)
    np.testing.assert_allclose(daily, ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(dflags, ref_flags)
    assert (dflags[:, 0, 1] != FLAG_SAVGOL).all() and (dflags[:, 0, 1] == FLAG_LINEAR).any()
    assert (dflags == FLAG_SAVGOL).any()


def test_savgol_keeps_a_linear_series_exactly() -> None:
    days = np.arange(0, 200, 9)
    flags = np.full((days.size, 1, 2), FLAG_OBSERVED, dtype=np.uint8)
    flags[5:9] = FLAG_NONE
    values = (1.0 + 0.01 * days).astype(np.float32)[:, None, None, None] * np.ones((1, 2, 1, 2), np.float32)
    values[np.broadcast_to((flags == FLAG_NONE)[:, None], values.shape)] = np.nan
    daily, dflags, ddays = fill_daily(values, flags, days, method="savgol", savgol_window_days=31)
    np.testing.assert_allclose(daily[:, 0, 0, 0], 1.0 + 0.01 * ddays, atol=1e-6)
    assert (dflags[~np.isin(ddays, days[flags[:, 0, 0] != 0]), 0, 0] == FLAG_SAVGOL).all()


def test_quadratic_savgol_differs_from_linear_only_off_known_days() -> None:
    days = np.arange(0, 120, 6)
    q = (0.01 * (days - 60.0) ** 2).astype(np.float32)
    flags = np.full((days.size, 1, 1), FLAG_OBSERVED, dtype=np.uint8)
    values = q[:, None, None, None]
    lin, _, ddays = fill_daily(values, flags, days)
    sg, _, _ = fill_daily(values, flags, days, method="savgol", savgol_window_days=15)
    on = np.isin(ddays, days)
    assert np.array_equal(lin[on], sg[on])
    # the chords of a convex curve lie above it; the smoothing pulls the gap days back towards it
    truth = 0.01 * (ddays[~on] - 60.0) ** 2
    assert np.abs(sg[~on, 0, 0, 0] - truth).mean() < np.abs(lin[~on, 0, 0, 0] - truth).mean()


def test_input_errors_name_the_problem() -> None:
    values, flags, days = _series(3, n_time=6)
    with pytest.raises(DailyError, match="sorted and unique"):
        fill_daily(values, flags, days[::-1].copy())
    dup = days.copy()
    dup[2] = dup[1]
    with pytest.raises(DailyError, match="merge same-day"):
        fill_daily(values, flags, dup)
    bad = values.copy()
    t, y, x = np.argwhere(flags == FLAG_NONE)[0]
    bad[t, 0, y, x] = 1.0
    with pytest.raises(DailyError, match="FLAG_NONE have non-NaN"):
        fill_daily(bad, flags, days)
    bad = values.copy()
    t, y, x = np.argwhere(flags != FLAG_NONE)[0]
    bad[t, 1, y, x] = np.nan
    with pytest.raises(DailyError, match="NaN or infinite"):
        fill_daily(bad, flags, days)
    with pytest.raises(DailyError, match="codes other than"):
        fill_daily(values, np.where(flags == FLAG_MODEL, FLAG_LINEAR, flags).astype(np.uint8), days)
    for window in (30, 1, 2):
        with pytest.raises(DailyError, match="odd integer >= 3"):
            fill_daily(values, flags, days, method="savgol", savgol_window_days=window)
    with pytest.raises(DailyError, match="> savgol_order"):
        fill_daily(values, flags, days, method="savgol", savgol_window_days=5, savgol_order=5)
    with pytest.raises(DailyError, match="unknown fill method"):
        fill_daily(values, flags, days, method="spline")
    with pytest.raises(DailyError, match="before first_day"):
        fill_daily(values, flags, days, first_day=int(days[-1]), last_day=int(days[0]))
    with pytest.raises(DailyError, match="do not match"):
        fill_daily(values, flags[:-1], days)
    assert issubclass(DailyError, UserError)


def test_datetimes_and_day_numbers_round_trip() -> None:
    times = np.array(["2020-01-01T10:30", "2020-01-04T09:00", "2020-01-06T11:00"], dtype="datetime64[ns]")
    values = np.arange(3, dtype=np.float32)[:, None, None, None]
    flags = np.full((3, 1, 1), FLAG_OBSERVED, dtype=np.uint8)
    _, _, ddays = fill_daily(values, flags, times)
    dates = daily_dates(ddays)
    assert dates.dtype == np.dtype("datetime64[ns]") and dates[0] == np.datetime64("2020-01-01")
    assert np.array_equal(day_numbers(dates), ddays) and ddays.size == 6


def test_size_64px_73_dates_about_490_days() -> None:
    rng = np.random.default_rng(4)
    n_time, n_feat, n = 73, 7, 64
    days = DAY0 + np.round(np.linspace(0, 489, n_time)).astype(np.int64)
    flags = rng.choice([FLAG_NONE, FLAG_OBSERVED, FLAG_MODEL], p=[0.3, 0.5, 0.2], size=(n_time, n, n)).astype(
        np.uint8
    )
    values = rng.normal(size=(n_time, n_feat, n, n)).astype(np.float32)
    values[np.broadcast_to((flags == FLAG_NONE)[:, None], values.shape)] = np.nan
    for method in ("linear", "savgol"):
        daily, dflags, ddays = fill_daily(values, flags, days, method=method)
        assert daily.shape == (490, n_feat, n, n) and dflags.shape == (490, n, n)
        assert np.array_equal(np.isfinite(daily).all(axis=1), dflags != FLAG_NONE)


# --- gap-fill evaluation ------------------------------------------------------------------------


def test_hide_schedule_hand_example_and_offset() -> None:
    assert hide_schedule(30, 3).tolist() == [1, 2, 3, 9, 10, 11, 17, 18, 19, 25, 26, 27]
    assert hide_schedule(30, 3, offset=2).tolist() == [3, 4, 5, 11, 12, 13, 19, 20, 21]
    with pytest.raises(GapFillEvalError, match="shorter run_length"):
        hide_schedule(4, 3)
    with pytest.raises(GapFillEvalError, match="merge into one"):
        hide_schedule(30, 3, context=0)


@pytest.mark.parametrize(
    "n_dates,run,context,offset", [(73, 1, 5, 0), (73, 4, 5, 3), (40, 7, 5, 11), (20, 2, 1, 1)]
)
def test_hide_schedule_keeps_other_runs_out_of_every_window(
    n_dates: int, run: int, context: int, offset: int
) -> None:
    hidden = hide_schedule(n_dates, run, context=context, offset=offset)
    assert hidden.size and hidden[0] >= 1 and hidden[-1] <= n_dates - 2
    run_id = np.cumsum(np.diff(hidden, prepend=-10) > 1)
    assert (np.bincount(run_id)[1:] == run).all()  # complete runs of run_length consecutive dates
    for h, r in zip(hidden, run_id, strict=True):
        window = (hidden >= h - context) & (hidden <= h + context)
        assert (run_id[window] == r).all()


def test_offsets_together_hide_every_inner_date() -> None:
    covered = np.concatenate([hide_schedule(50, 3, offset=o) for o in range(8)])
    assert set(covered.tolist()) >= set(range(1, 46))


def test_gap_lengths_hand_example() -> None:
    days = np.array([0, 5, 12, 20, 30])
    known = np.array([[True, False], [False, True], [False, True], [True, False], [False, True]])[:, None, :]
    gaps = gap_lengths(days, known)
    np.testing.assert_array_equal(gaps[:, 0, 0], [np.nan, 20, 20, np.nan, np.nan])
    np.testing.assert_array_equal(gaps[:, 0, 1], [np.nan, np.nan, np.nan, 18, np.nan])


def test_interpolate_at_fills_targets_only_and_refuses_known_targets() -> None:
    days = np.array([0, 4, 10, 16, 20])
    truth = (2.0 + 0.5 * days).astype(np.float32)[:, None, None, None] * np.ones((1, 2, 1, 2), np.float32)
    known = np.ones((5, 1, 2), dtype=bool)
    known[[1, 2], 0, 0] = False
    known[4, 0, 1] = False  # the series end: nothing on the right
    targets = ~known
    pred = interpolate_at(truth, known, days, targets, method="linear")
    np.testing.assert_allclose(pred[[1, 2], :, 0, 0], truth[[1, 2], :, 0, 0], atol=1e-6)
    assert np.isnan(pred[4, :, 0, 1]).all()
    assert np.isnan(pred[np.broadcast_to(~targets[:, None], pred.shape)]).all()
    sg = interpolate_at(truth, known, days, targets, method="savgol", savgol_window_days=5)
    np.testing.assert_allclose(sg[[1, 2], :, 0, 0], truth[[1, 2], :, 0, 0], atol=1e-5)
    with pytest.raises(GapFillEvalError, match="marked known"):
        interpolate_at(truth, known, days, targets | known, method="linear")


def test_error_table_hand_example() -> None:
    nan = np.nan
    truth = np.zeros((3, 2, 1, 2))
    truth[1, :, 0, 0], truth[1, :, 0, 1], truth[2, :, 0, 0] = [1, 2], [3, 4], [5, 0]
    truth[0, :, 0, 1] = nan  # a target without truth: counted nowhere
    targets = np.zeros((3, 1, 2), dtype=bool)
    targets[1, 0, 0] = targets[1, 0, 1] = targets[2, 0, 0] = targets[0, 0, 1] = True
    gaps = np.full((3, 1, 2), nan)
    gaps[1, 0, 0], gaps[1, 0, 1], gaps[0, 0, 1] = 5, 15, 5  # (2, 0, 0) is open-ended
    a = np.full_like(truth, 99.0)  # off-target values never count
    a[1, :, 0, 0], a[1, :, 0, 1], a[2, :, 0, 0] = [2, 2], [3, 6], [nan, nan]
    b = np.full_like(truth, nan)
    b[1, :, 0, 0], b[1, :, 0, 1], b[2, :, 0, 0] = [1, 2], [nan, 4], [5, 1]
    df = error_table(truth, {"a": a, "b": b}, targets, gaps)

    assert list(df.columns) == ["method", "gap_days", "n", "n_missing", "mae", "rmse", "rel_mae"]
    labels = ["≤10", "10–20", "20–40", "40–80", ">80", "open", "all"]
    assert df["gap_days"].tolist() == labels * 2
    row = df.set_index(["method", "gap_days"])
    spread = (
        8 / 6
    )  # mean |truth - per-feature mean| over the 3 targets: f0 [1,3,5] -> 2,0,2; f1 [2,4,0] -> 0,2,2
    expect = {
        ("a", "≤10"): (1, 0, 0.5, np.sqrt(0.5)),
        ("a", "10–20"): (1, 0, 1.0, np.sqrt(2.0)),
        ("a", "open"): (0, 1, nan, nan),
        ("a", "all"): (2, 1, 0.75, np.sqrt(1.25)),
        ("b", "≤10"): (1, 0, 0.0, 0.0),
        ("b", "10–20"): (0, 1, nan, nan),
        ("b", "open"): (1, 0, 0.5, np.sqrt(0.5)),
        ("b", "all"): (2, 1, 0.25, 0.5),
        ("b", ">80"): (0, 0, nan, nan),
    }
    for key, (n, missing, mae, rmse) in expect.items():
        got = row.loc[key]
        assert (got["n"], got["n_missing"]) == (n, missing), key
        np.testing.assert_allclose([got["mae"], got["rmse"], got["rel_mae"]], [mae, rmse, mae / spread])

    md = error_markdown(df)
    lines = md.strip().splitlines()
    assert lines[0] == "| gap (days) | targets | a MAE | b MAE | a missing | b missing |"
    assert "| ≤10 | 1 | 0.5000 | 0.0000 | 0 | 0 |" in lines
    assert "| all | 3 | 0.7500 | 0.2500 | 1 | 1 |" in lines
    assert isinstance(df, pd.DataFrame)


def test_error_table_rejects_mismatched_shapes() -> None:
    truth = np.zeros((3, 2, 1, 2))
    t = np.ones((3, 1, 2), dtype=bool)
    with pytest.raises(GapFillEvalError, match="must match truth"):
        error_table(truth, {"a": np.zeros((3, 2, 2, 1))}, t, np.ones((3, 1, 2)))
    with pytest.raises(GapFillEvalError, match="targets and gaps"):
        error_table(truth, {}, t[:2], np.ones((3, 1, 2)))
