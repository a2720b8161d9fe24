"""The WorldCereal reader against the real Belgian patch (raw values re-read here with netCDF4)."""

from __future__ import annotations

import json
from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stembed.io.cube import CubeError, Scene, cube_transform
from stembed.io.worldcereal import read_worldcereal, shared_data_dir
from stembed.preprocess import merge_same_day
from stembed.sensors import S1, S2

TZA_SITE = "2021_TZA_COPERNICUS-GEOGLAM_POLY_1101950"


def raw(folder: Path, prefix: str, *names: str) -> dict[str, np.ndarray]:
    """Raw stored integers (no scaling, no masking) and the timestamps of one file."""
    (path,) = folder.glob(f"{prefix}*.nc")
    with netCDF4.Dataset(path) as nc:
        nc.set_auto_maskandscale(False)
        out = {n: np.asarray(nc.variables[n][...]) for n in names}
        t = nc.variables["timestamp"]
        stamps = np.asarray(netCDF4.num2date(t[:], t.units, only_use_cftime_datetimes=False))
    out["time"] = pd.to_datetime([s.isoformat() for s in stamps]).values
    return out


def test_belgian_scene_shape_bands_and_dates(belgian_scene: Scene) -> None:
    s2, s1 = belgian_scene.s2, belgian_scene.s1
    assert belgian_scene.site == "00002806639B424A"
    assert s2.sizes == {"time": 73, "band": 10, "y": 64, "x": 64}  # 118 dates, 73 with >= 3 % valid values
    assert s1.sizes == {"time": 159, "band": 2, "y": 64, "x": 64}
    assert list(s2["band"].values) == list(S2.bands)
    assert list(s1["band"].values) == list(S1.bands)
    for c in (s2, s1):
        assert c.dtype == np.float32
        assert 0.0 <= float(c.min()) and float(c.max()) <= 1.0
        assert pd.DatetimeIndex(c["time"].values).is_monotonic_increasing
    assert s2.attrs["crs"] == "EPSG:32631"
    assert cube_transform(s2) == (501360.0, 10.0, 0.0, 5629680.0, 0.0, -10.0)
    assert s2.rio.transform().to_gdal() == cube_transform(s2)  # CF spatial_ref, as rioxarray reads it
    assert float(s2.isnull().mean()) > 0.05  # clouds are masked, not filled
    belgian_scene.validate()


def test_s2_pixel_equals_raw_dn_times_1e4(belgian_scene: Scene, belgian_dir: Path) -> None:
    r10 = raw(belgian_dir, "S2_L2A_10m", "B04")
    r20 = raw(belgian_dir, "S2_L2A_20m", "B11", "SCL")
    kept = np.isin(r10["time"], belgian_scene.s2["time"].values)
    n_clear = np.where(kept, np.isin(r20["SCL"], (4, 5)).sum(axis=(1, 2)), -1)
    k = int(n_clear.argmax())  # the clearest kept date
    t = r10["time"][k]
    candidates = np.argwhere(np.isin(r20["SCL"][k], (4, 5)) & (r20["B11"][k] < 10_000))
    i, j = candidates[len(candidates) // 2]
    y, x = 2 * i + 1, 2 * j  # a 10 m pixel inside the 20 m pixel (i, j)
    cube = belgian_scene.s2.sel(time=t)
    assert float(cube.sel(band="B04")[y, x]) == np.float32(r10["B04"][k, y, x] * 1e-4)
    assert float(cube.sel(band="B11")[y, x]) == np.float32(r20["B11"][k, i, j] * 1e-4)


def test_20m_bands_and_scl_align_with_the_10m_grid(belgian_scene: Scene, belgian_dir: Path) -> None:
    r20 = raw(belgian_dir, "S2_L2A_20m", "B8A", "SCL")
    cube = belgian_scene.s2
    for t in cube["time"].values[::10]:
        k = int(np.flatnonzero(r20["time"] == t)[0])
        b8a = cube.sel(time=t, band="B8A").values
        expected = np.where(r20["B8A"][k] == 0, np.nan, np.minimum(r20["B8A"][k] * 1e-4, 1.0))
        masked20 = np.isin(r20["SCL"][k], (0, 1, 3, 8, 9, 10))
        expected = np.where(masked20, np.nan, expected).astype(np.float32)
        for dy in (0, 1):
            for dx in (0, 1):
                np.testing.assert_array_equal(b8a[dy::2, dx::2], expected)
        # a native 10 m band is masked by the same 2x2 SCL blocks but is not blocky itself
        b04 = cube.sel(time=t, band="B04").values
        np.testing.assert_array_equal(np.isnan(b04[1::2, 0::2]), masked20)
    b04_all = cube.sel(band="B04").values
    assert not np.array_equal(b04_all[:, 0::2, 0::2], b04_all[:, 1::2, 1::2], equal_nan=True)


def test_s1_matches_hand_computation(belgian_scene: Scene, belgian_dir: Path) -> None:
    r = raw(belgian_dir, "S1_GRD", "VV", "VH")
    np.testing.assert_array_equal(belgian_scene.s1["time"].values, r["time"])
    i, j = 7, 11

    def expected(band: str, frames: list[int]) -> float:
        linear = 10 ** (r[band][frames, i, j] * 1e-4 / 10)
        db = np.clip(10 * np.log10(linear.mean()), -30, 5)
        return float((db + 30) / 35)

    s1 = belgian_scene.s1
    vh, vv = s1.sel(band="VH").values, s1.sel(band="VV").values
    assert vh[50, 2 * i + 1, 2 * j] == pytest.approx(expected("VH", [49, 50, 51]), abs=1e-6)
    assert vv[50, 2 * i, 2 * j + 1] == pytest.approx(expected("VV", [49, 50, 51]), abs=1e-6)
    assert vv[0, 2 * i, 2 * j] == pytest.approx(expected("VV", [0, 1]), abs=1e-6)  # first date: two frames


def test_provenance_and_labels(belgian_scene: Scene) -> None:
    p2 = json.loads(belgian_scene.s2.attrs["provenance"])
    p1 = json.loads(belgian_scene.s1.attrs["provenance"])
    assert p2["source"] == "WorldCereal worldcereal-classification test resources"
    assert p2["files"]["S2_L2A_10m_00002806639B424A_32631_2017-08-01_2018-11-30.nc"] == (
        "bb05037f25daf029c850cd6dc79c73b178502392b3e1d9b4f8258001ed550841"
    )
    assert (p2["dates_in_file"], p2["dates_kept"]) == (118, 73)
    assert "GRD sigma0 (not RTC gamma0), ascending" in p1["product"]
    labels = belgian_scene.labels
    assert labels is not None and set(labels.data_vars) == {"LC", "CT"}
    assert labels["LC"].dims == ("y", "x")
    np.testing.assert_array_equal(labels["x"].values, belgian_scene.s2["x"].values)
    assert 11 in np.unique(labels["LC"].values)  # annual cropland


def test_stricter_date_filter_keeps_fewer_dates(belgian_dir: Path) -> None:
    strict = read_worldcereal(belgian_dir, min_valid_fraction=0.5)
    assert 30 < strict.s2.sizes["time"] < 73
    assert float(strict.s2.notnull().mean(("band", "y", "x")).min()) >= 0.5


def test_tza_missing_10m_file_is_named(shared_data: Path) -> None:
    expected = (r"S2 10 m file \(B02, B03, B04, B08\) not found in .*TZA.*"
                r"this location cannot be read: the reader needs all 10 S2 bands")
    with pytest.raises(FileNotFoundError, match=expected):
        read_worldcereal(shared_data / TZA_SITE)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_worldcereal(tmp_path / "nowhere")


def test_20m_grid_that_does_not_nest_is_refused(belgian_dir: Path, tmp_path: Path) -> None:
    for f in belgian_dir.glob("*.nc"):
        if not f.name.startswith("S2_L2A_20m_"):
            (tmp_path / f.name).symlink_to(f)
    (p20,) = belgian_dir.glob("S2_L2A_20m_*.nc")
    with xr.open_dataset(p20, mask_and_scale=False) as ds:
        shifted = ds.load().assign_coords(x=ds["x"] + 10.0)
    shifted.to_netcdf(tmp_path / p20.name)
    with pytest.raises(CubeError, match="does not nest in the 10 m grid"):
        read_worldcereal(tmp_path)


def test_same_day_acquisitions_merge_to_first_valid() -> None:
    times = np.array(["2020-01-01T08:00:47", "2020-01-01T08:00:54", "2020-01-06T08:00:50"], "datetime64[ns]")
    a = np.arange(3 * 2 * 1 * 2, dtype=np.float32).reshape(3, 2, 1, 2)  # (time, band, y, x)
    valid = np.array([[[False, True]], [[True, True]], [[True, False]]])
    (merged,), out_times = merge_same_day([a], times, valid)
    np.testing.assert_array_equal(out_times, times[[0, 2]])
    np.testing.assert_array_equal(merged[0, :, 0, 0], a[1, :, 0, 0])  # first acquisition invalid there
    np.testing.assert_array_equal(merged[0, :, 0, 1], a[0, :, 0, 1])  # first acquisition valid: kept
    np.testing.assert_array_equal(merged[1], a[2])


def test_shared_data_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEMBED_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.delenv("STEMBED_SHARED_DATA")
    assert shared_data_dir().name == "data" and shared_data_dir().parent.name == "shared"
