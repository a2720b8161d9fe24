"""GPP window construction on tiny series with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stembed.eval.gpp_data import daily_series, make_windows, tower_series


def test_daily_linear_interpolation_averages_duplicates_and_extends_flat() -> None:
    obs = pd.DataFrame({"E1": [1.0, 3.0, 5.0, 9.0]},
                       index=pd.DatetimeIndex(["2020-01-03", "2020-01-05", "2020-01-05", "2020-01-07"]))
    d = daily_series(obs, "2020-01-01", "2020-01-09")
    # 01-03: 1; 01-05: mean(3, 5) = 4; 01-07: 9; linear between, flat outside
    assert d["E1"].tolist() == [1, 1, 1, 2.5, 4, 6.5, 9, 9, 9]


def test_savgol_keeps_a_straight_line() -> None:
    days = pd.date_range("2020-01-01", periods=60, freq="D")
    obs = pd.DataFrame({"E1": np.arange(60.0)}, index=days)[::5]
    d = daily_series(obs, days[0], days[-1] - pd.Timedelta(days=4), method="savgol", savgol_window_days=11)
    np.testing.assert_allclose(d["E1"].to_numpy()[5:-5], np.arange(5.0, 51.0), atol=1e-9)


def test_windows_end_on_target_day_with_stride_and_skip_missing() -> None:
    days = pd.date_range("2020-01-01", periods=30, freq="D")
    feats = pd.DataFrame({"E1": np.arange(30.0), "E2": np.arange(30.0) * 10}, index=days)
    gpp = pd.Series(np.arange(30.0) + 100, index=days).drop(days[19])  # target of the 2nd window missing
    x, y, ends = make_windows(feats, gpp, length_days=10, stride_days=5)
    # window ends: day indices 9, 14, 19 (no target), 24, 29
    assert [d.day for d in ends] == [10, 15, 25, 30]
    assert y.tolist() == [109, 114, 124, 129]
    assert x.shape == (4, 10, 2) and x[0, :, 0].tolist() == list(range(10)) and x[1, -1, 1] == 140


def test_windows_with_non_finite_features_are_skipped_and_gaps_refused() -> None:
    days = pd.date_range("2020-01-01", periods=12, freq="D")
    feats = pd.DataFrame({"E1": np.arange(12.0)}, index=days)
    feats.iloc[3, 0] = np.nan
    x, y, ends = make_windows(feats, pd.Series(1.0, index=days), length_days=5, stride_days=1)
    # windows end at day indices 4..11; those covering index 3 (ends 4..7) are skipped
    assert [d.day - 1 for d in ends] == [8, 9, 10, 11] and len(y) == 4
    with pytest.raises(ValueError, match="daily without gaps"):
        make_windows(feats.drop(days[5]), pd.Series(1.0, index=days), length_days=5)


def test_tower_series_averages_the_window_and_skips_nan() -> None:
    values = np.arange(2 * 1 * 5 * 5, dtype=np.float32).reshape(2, 1, 5, 5)
    values[0, 0, 2, 2] = np.nan
    emb = xr.DataArray(values, dims=("time", "feature", "y", "x"),
                       coords={"time": pd.date_range("2020-01-01", periods=2), "feature": ["E1"],
                               "y": 100.0 - 10 * np.arange(5), "x": 10 * np.arange(5.0)})
    s = tower_series(emb, x=20.0, y=80.0, window_px=3)  # centre pixel (2, 2): rows/cols 1..3
    block0 = values[0, 0, 1:4, 1:4]
    assert s["E1"].iloc[0] == pytest.approx(np.nanmean(block0))
    assert s["E1"].iloc[1] == pytest.approx(values[1, 0, 1:4, 1:4].mean())
    assert tower_series(emb, 20.0, 80.0, window_px=None)["E1"].iloc[1] == pytest.approx(values[1].mean())
    with pytest.raises(ValueError, match="outside the cube"):
        tower_series(emb, x=500.0, y=80.0)
