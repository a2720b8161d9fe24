"""The seeded synthetic scene: deterministic, valid, cloudy, and carrying a learnable signal."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stembed.io.cube import Scene
from stembed.testing import LAND_COVER, synthetic_scene


def test_same_seed_same_scene_other_seed_other_scene(tiny_scene: Scene) -> None:
    again = synthetic_scene(seed=0)
    xr.testing.assert_identical(again.s2, tiny_scene.s2)
    xr.testing.assert_identical(again.s1, tiny_scene.s1)
    assert again.labels is not None and tiny_scene.labels is not None
    xr.testing.assert_identical(again.labels, tiny_scene.labels)
    other = synthetic_scene(seed=1)
    assert other.site == "synthetic-1" and tiny_scene.site == "synthetic-0"
    assert other.s2.shape != tiny_scene.s2.shape or not np.array_equal(other.s2.values, tiny_scene.s2.values)


def test_global_numpy_rng_is_untouched() -> None:
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    synthetic_scene(seed=5)
    np.testing.assert_array_equal(np.random.random(3), expected)


def test_passes_the_contract(tiny_scene: Scene) -> None:
    tiny_scene.validate()
    assert tiny_scene.s2.sizes["y"] == tiny_scene.s2.sizes["x"] == 48
    assert 45 <= tiny_scene.s2.sizes["time"] <= 73
    assert tiny_scene.s2.attrs["crs"] == "EPSG:32631"
    prov = json.loads(tiny_scene.s2.attrs["provenance"])
    assert prov["synthetic"] is True and prov["seed"] == 0


def test_clouds_leave_gaps_and_overcast_dates_are_dropped(tiny_scene: Scene) -> None:
    valid = tiny_scene.s2.notnull().mean(("band", "y", "x")).values
    assert (valid < 0.9).sum() >= 10  # partly cloudy dates
    assert (valid == 1.0).sum() >= 5  # clear dates
    assert valid.min() >= 0.03
    assert json.loads(tiny_scene.s2.attrs["provenance"])["raw_dates"] > tiny_scene.s2.sizes["time"]
    assert not tiny_scene.s1.isnull().any()  # radar sees through clouds


def test_several_land_cover_types_in_parcels(tiny_scene: Scene) -> None:
    labels = tiny_scene.labels
    assert labels is not None
    assert labels.attrs["land_cover_names"] == list(LAND_COVER)
    assert len(np.unique(labels["land_cover"].values)) >= 4
    assert len(np.unique(labels["parcel"].values)) >= 6
    small = synthetic_scene(seed=3, height_px=16, width_px=16, n_days=100)
    small.validate()
    assert small.labels is not None and len(np.unique(small.labels["land_cover"].values)) >= 4


def test_s1_has_its_own_calendar(tiny_scene: Scene) -> None:
    t1 = pd.DatetimeIndex(tiny_scene.s1["time"].values)
    t2 = pd.DatetimeIndex(tiny_scene.s2["time"].values)
    assert t1.is_unique and t1.is_monotonic_increasing
    assert not set(t1) & set(t2)
    assert set(np.diff(t1.normalize()).astype("timedelta64[D]").astype(int)) <= {5, 7, 10, 12, 14}
    assert 50 <= len(t1) <= 62


def _class_mean(cube: xr.DataArray, labels: xr.Dataset, name: str, band: str, months: list[int]) -> float:
    mask = labels["land_cover"].values == LAND_COVER.index(name)
    when = pd.DatetimeIndex(cube["time"].values).month.isin(months)
    values = cube.sel(band=band).values[when][:, mask]
    return float(np.nanmean(values))


def test_phenology_and_radar_signal(tiny_scene: Scene) -> None:
    s2, s1, labels = tiny_scene.s2, tiny_scene.s1, tiny_scene.labels
    assert labels is not None
    nir, red = s2.sel(band="B08"), s2.sel(band="B04")
    ndvi = ((nir - red) / (nir + red)).expand_dims(band=["ndvi"], axis=1)

    def mean(cube: xr.DataArray, name: str, band: str, months: list[int]) -> float:
        return _class_mean(cube, labels, name, band, months)

    assert mean(ndvi, "summer_crop", "ndvi", [7]) > mean(ndvi, "summer_crop", "ndvi", [2]) + 0.3
    assert mean(ndvi, "water", "ndvi", [6, 7]) < 0
    assert mean(s1, "water", "VH", [6, 7]) < mean(s1, "deciduous_forest", "VH", [6, 7])
    assert mean(s1, "summer_crop", "VH", [8]) > mean(s1, "summer_crop", "VH", [3])  # biomass raises VH


def test_fast_enough() -> None:
    synthetic_scene(seed=7)
    start = time.perf_counter()
    synthetic_scene(seed=8)
    assert time.perf_counter() - start < 1.0


def test_rejects_empty_grid() -> None:
    with pytest.raises(ValueError, match="need height_px, width_px, n_days >= 1"):
        synthetic_scene(height_px=0)
