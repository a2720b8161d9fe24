"""Preprocessing on small hand-computed arrays (spec §1.2-1.3)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from numpy.typing import ArrayLike

from stembed.io.cube import CubeError, make_cube
from stembed.preprocess import mask_s2, match_s1_to_s2, prepare_s1, prepare_s2, valid_date_fraction
from stembed.sensors import S1, S2


def days(*d: str) -> np.ndarray:
    return np.array(d, dtype="datetime64[ns]")


def s2_raw(values: np.ndarray, times: np.ndarray | None = None) -> xr.DataArray:
    """A (time, 10 bands, y, x) reflectance array on a 10 m grid."""
    t = values.shape[0]
    times = days(*[f"2020-01-{1 + 5 * i:02d}" for i in range(t)]) if times is None else times
    return make_cube(values, times=times, bands=S2.bands, y=100.0 - 10 * np.arange(values.shape[2]),
                     x=10.0 * np.arange(values.shape[3]), crs="EPSG:32631", sensor="s2", site="t")


def scl_of(codes: np.ndarray, refl: xr.DataArray) -> xr.DataArray:
    return xr.DataArray(codes.astype(np.uint8), dims=("time", "y", "x"),
                        coords={"time": refl["time"], "y": refl["y"], "x": refl["x"]})


def s1_from_db(db: ArrayLike, times: np.ndarray) -> xr.DataArray:
    """An S1 linear-power array from a per-date dB series (same value in both bands, one pixel)."""
    lin = 10.0 ** (np.asarray(db, dtype=np.float64) / 10.0)
    values = np.broadcast_to(lin[:, None, None, None], (len(lin), 2, 1, 1))
    return make_cube(values, times=times, bands=S1.bands, y=[5.0], x=[5.0], crs="EPSG:32631",
                     sensor="s1", site="t")


def normalised(db: float) -> float:
    return (db + 30.0) / 35.0


# ----------------------------------------------------------------------------- Sentinel-2
def test_mask_s2_masks_all_bands_of_masked_classes_only() -> None:
    refl = s2_raw(np.full((2, 10, 2, 2), 0.2))
    codes = np.array([[[4, 9], [3, 5]], [[10, 6], [8, 0]]])
    out = mask_s2(refl, scl_of(codes, refl), masked_classes=(0, 3, 8, 9, 10))
    expected_nan = np.isin(codes, (0, 3, 8, 9, 10))
    assert np.array_equal(out.isnull().all("band").values, expected_nan)
    assert np.array_equal(out.isnull().any("band").values, expected_nan)
    assert float(out.isel(time=0, y=0, x=0, band=3)) == pytest.approx(0.2)
    assert out.attrs == refl.attrs


def test_mask_s2_rejects_mismatched_scl() -> None:
    refl = s2_raw(np.full((2, 10, 2, 2), 0.2))
    scl = xr.DataArray(np.zeros((3, 2, 2), np.uint8), dims=("time", "y", "x"))
    with pytest.raises(CubeError, match=r"scl has shape \(3, 2, 2\).*reflectance has \(2, 2, 2\)"):
        mask_s2(refl, scl, (0,))
    with pytest.raises(CubeError, match=r"dims \('time', 'y', 'x'\)"):
        mask_s2(refl, scl.transpose("y", "time", "x"), (0,))


def test_prepare_s2_clips_keeps_nan_and_drops_cloudy_dates() -> None:
    values = np.full((4, 10, 10, 10), 0.1)
    values[0, 0, 0, 0] = 1.3
    values[0, 1, 0, 0] = -0.02
    values[0, 2, 0, 0] = np.nan
    refl = s2_raw(values)
    codes = np.full((4, 10, 10), 9)
    codes[0] = 4  # clear
    codes[1].flat[:3] = 4  # 3 of 100 pixels valid = 3 %: kept
    codes[2].flat[:2] = 5  # 2 % valid: dropped
    # date 3: fully cloudy: dropped
    out = prepare_s2(refl, scl_of(codes, refl))
    assert list(out["time"].values) == list(refl["time"].values[:2])
    assert out.dtype == np.float32
    assert float(out[0, 0, 0, 0]) == 1.0 and float(out[0, 1, 0, 0]) == 0.0
    assert np.isnan(float(out[0, 2, 0, 0]))
    assert float(out[0, 3, 0, 0]) == pytest.approx(0.1)
    assert int(out.isel(time=1).notnull().all("band").sum()) == 3
    assert out.attrs == refl.attrs


def test_prepare_s2_never_keeps_an_empty_date() -> None:
    refl = s2_raw(np.full((2, 10, 2, 2), 0.1))
    codes = np.array([np.full((2, 2), 4), np.full((2, 2), 9)])
    out = prepare_s2(refl, scl_of(codes, refl), min_valid_fraction=0.0)
    assert out.sizes["time"] == 1


def test_prepare_s2_refuses_digital_numbers() -> None:
    refl = s2_raw(np.full((1, 10, 2, 2), 0.1)) * 10_000
    with pytest.raises(CubeError, match="looks like digital numbers.*multiply by 1e-4"):
        prepare_s2(refl, scl_of(np.full((1, 2, 2), 4), refl))


def test_valid_date_fraction() -> None:
    values = np.full((2, 10, 2, 2), 0.1)
    values[1, :, 0, 0] = np.nan
    values[1, 0, 1, 1] = np.nan
    frac = valid_date_fraction(s2_raw(values))
    assert frac.dims == ("time",)
    np.testing.assert_allclose(frac.values, [1.0, 1 - 11 / 40])


# ----------------------------------------------------------------------------- Sentinel-1
T5 = days("2020-01-01", "2020-01-07", "2020-01-13", "2020-01-19", "2020-01-25")


def test_prepare_s1_averages_in_linear_power_not_db() -> None:
    out = prepare_s1(s1_from_db([-10, -20, -10, -20, -10], T5))
    centre_db = 10 * np.log10((0.1 + 0.01 + 0.1) / 3)  # -11.55 dB; a dB mean would give -13.33
    assert float(out[1, 0, 0, 0]) == pytest.approx(normalised(centre_db), abs=1e-6)
    assert float(out[1, 0, 0, 0]) != pytest.approx(normalised(-40 / 3), abs=1e-3)
    assert out.dtype == np.float32
    assert out.dims == ("time", "band", "y", "x")


def test_prepare_s1_edges_use_two_frames() -> None:
    out = prepare_s1(s1_from_db([-10, -20, -10, -20, -10], T5))
    first_db = 10 * np.log10((0.1 + 0.01) / 2)
    last_db = 10 * np.log10((0.01 + 0.1) / 2)
    assert float(out[0, 1, 0, 0]) == pytest.approx(normalised(first_db), abs=1e-6)
    assert float(out[-1, 1, 0, 0]) == pytest.approx(normalised(last_db), abs=1e-6)


def test_prepare_s1_nan_frame_does_not_poison_neighbours_and_stays_missing() -> None:
    out = prepare_s1(s1_from_db([-10, -20, np.nan, -10, -10], T5))
    assert float(out[1, 0, 0, 0]) == pytest.approx(normalised(10 * np.log10((0.1 + 0.01) / 2)), abs=1e-6)
    assert np.isnan(float(out[2, 0, 0, 0]))
    assert float(out[3, 0, 0, 0]) == pytest.approx(normalised(-10.0), abs=1e-6)


def test_prepare_s1_normalisation_and_clip() -> None:
    t = T5[:1]
    assert float(prepare_s1(s1_from_db([-30.0], t))[0, 0, 0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(prepare_s1(s1_from_db([5.0], t))[0, 0, 0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert float(prepare_s1(s1_from_db([-12.5], t))[0, 0, 0, 0]) == pytest.approx(0.5, abs=1e-6)
    assert float(prepare_s1(s1_from_db([-45.0], t))[0, 0, 0, 0]) == 0.0
    assert float(prepare_s1(s1_from_db([12.0], t))[0, 0, 0, 0]) == 1.0
    zero = s1_from_db([0.0], t) * 0.0
    assert float(prepare_s1(zero)[0, 0, 0, 0]) == 0.0  # 0 power = -inf dB, clipped


def test_prepare_s1_refuses_db_input() -> None:
    db = s1_from_db([-10.0, -12.0], T5[:2])
    db.values[:] = -10.0
    with pytest.raises(CubeError, match=r"expects linear power.*looks like dB.*10 \*\* \(dB / 10\)"):
        prepare_s1(db)


def test_prepare_s1_keeps_attrs() -> None:
    lin = s1_from_db([-10.0, -12.0], T5[:2])
    assert prepare_s1(lin).attrs == lin.attrs


# ----------------------------------------------------------------------------- matching
S1_TIMES = days("2020-01-01T17:00", "2020-01-03T17:00", "2020-01-09T17:00", "2020-01-30T17:00")


def s1_cube() -> xr.DataArray:
    values = np.arange(4, dtype=np.float32)[:, None, None, None] / 10 * np.ones((1, 2, 1, 1), np.float32)
    return make_cube(values, times=S1_TIMES, bands=S1.bands, y=[5.0], x=[5.0], crs="EPSG:32631",
                     sensor="s1", site="t")


def test_match_picks_nearest_and_shares_scenes() -> None:
    s2_times = days("2020-01-01T10:00", "2020-01-03T10:00", "2020-01-04T10:00", "2020-01-08T10:00")
    m = match_s1_to_s2(s1_cube(), s2_times)
    assert list(m["time"].values) == list(s2_times)
    np.testing.assert_array_equal(m["s1_time"].values, S1_TIMES[[0, 1, 1, 2]])
    np.testing.assert_allclose(m.values[:, 0, 0, 0], [0.0, 0.1, 0.1, 0.2])
    assert m.dims == ("time", "band", "y", "x") and m.dtype == np.float32


def test_match_tie_goes_to_the_earlier_s1_date() -> None:
    m = match_s1_to_s2(s1_cube(), days("2020-01-02T17:00", "2020-01-06T17:00"))
    np.testing.assert_array_equal(m["s1_time"].values, S1_TIMES[[0, 1]])


def test_a_trailing_match_takes_only_s1_dates_on_or_before_the_s2_date() -> None:
    s2_times = days("2020-01-01T10:00", "2020-01-03T17:00", "2020-01-08T10:00", "2020-01-09T10:00")
    both = match_s1_to_s2(s1_cube(), s2_times)
    np.testing.assert_array_equal(both["s1_time"].values, S1_TIMES[[0, 1, 2, 2]])  # 7 h and 31 h after: nearer
    m = match_s1_to_s2(s1_cube(), s2_times, trailing=True)
    # Jan 1 10:00: the only S1 date is 7 h later (none before); Jan 3 17:00: the same instant is on the date
    assert np.isnat(m["s1_time"].values[0]) and np.isnan(m.values[0]).all()
    np.testing.assert_array_equal(m["s1_time"].values[1:], S1_TIMES[[1, 1, 1]])
    assert np.isnat(match_s1_to_s2(s1_cube(), days("2020-01-15T17:00"), trailing=True, max_gap_days=5.0)["s1_time"])


def test_match_beyond_tolerance_is_nan_and_nat() -> None:
    s2_times = days("2020-01-15T17:00", "2020-01-16T17:00", "2020-01-20T12:00", "2020-02-10T17:00")
    m = match_s1_to_s2(s1_cube(), s2_times, max_gap_days=6.0)
    # gaps: exactly 6 d (kept), 7 d, 9.8 d, 11 d
    assert m["s1_time"].values[0] == S1_TIMES[2]
    assert np.isnat(m["s1_time"].values[1:]).all()
    assert np.isnan(m.values[1:]).all() and not np.isnan(m.values[0]).any()
    wide = match_s1_to_s2(s1_cube(), s2_times, max_gap_days=12.0)
    assert not np.isnat(wide["s1_time"].values).any()


def test_match_rejects_unsorted_s1() -> None:
    s1 = s1_cube().isel(time=[1, 0, 2, 3])
    with pytest.raises(CubeError, match="sorted and unique"):
        match_s1_to_s2(s1, days("2020-01-02"))
