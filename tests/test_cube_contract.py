"""The cube contract: every violation is caught with a message naming the problem and the fix."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from stembed.io.cube import (
    CubeError,
    LegacyStoreWarning,
    Scene,
    cube_transform,
    make_cube,
    open_cube,
    open_scene,
    save_cube,
    save_scene,
    validate_cube,
    validate_pair,
    with_georef,
)
from stembed.sensors import S1, S2, SensorSpec

TIMES = np.array(["2020-01-01T10:50", "2020-01-06T10:50", "2020-01-11T10:50"], dtype="datetime64[ns]")
Y0, X0 = 5_629_675.0, 501_365.0  # pixel centres of the top-left pixel


def cube(sensor: str = "s2", *, ny: int = 4, nx: int = 5, crs: str = "EPSG:32631", site: str = "a",
         dx: float = 0.0, dy: float = 0.0) -> xr.DataArray:
    spec = S2 if sensor == "s2" else S1
    values = np.random.default_rng(0).uniform(0.0, 1.0, (len(TIMES), spec.n_bands, ny, nx))
    return make_cube(values, times=TIMES, bands=spec.bands, y=Y0 + dy - 10.0 * np.arange(ny),
                     x=X0 + dx + 10.0 * np.arange(nx), crs=crs, sensor=sensor, site=site,
                     provenance={"test": True})


def check(da: object, spec: SensorSpec = S2, match: str = "", **kw: int) -> None:
    with pytest.raises(CubeError, match=match):
        validate_cube(da, spec, **kw)  # type: ignore[arg-type]


def with_coord(da: xr.DataArray, name: str, values: object) -> xr.DataArray:
    out = da.assign_coords({name: values})
    out.attrs = dict(da.attrs)
    return out


# ----------------------------------------------------------------------------- construction
def test_make_cube_builds_a_valid_cube_with_cf_spatial_ref() -> None:
    c = cube()
    validate_cube(c, S2)
    assert c.dims == ("time", "band", "y", "x")
    assert c.dtype == np.float32
    assert c["time"].dtype == np.dtype("datetime64[ns]")
    assert cube_transform(c) == (X0 - 5.0, 10.0, 0.0, Y0 + 5.0, 0.0, -10.0)
    assert "transform" not in c.attrs  # rioxarray would read it in Affine order
    assert c.rio.crs.to_epsg() == 32631 and c.rio.transform().to_gdal() == cube_transform(c)
    assert json.loads(c.attrs["provenance"]) == {"test": True}


def test_synthetic_cubes_pass(tiny_scene: Scene) -> None:
    validate_cube(tiny_scene.s2, S2, min_dates=20, patch_px=15)
    validate_cube(tiny_scene.s1, S1, min_dates=20, patch_px=15)


# ----------------------------------------------------------------------------- structure
def test_not_a_dataarray() -> None:
    check(np.zeros((3, 10, 4, 5), np.float32), match="expected an xarray.DataArray cube, got ndarray")
    check(cube().to_dataset(name="s2"), match=r"got Dataset; fix: pick the variable: ds\['s2'\]")


def test_wrong_dim_order_names_the_transpose() -> None:
    c = cube().transpose("band", "time", "y", "x")
    check(c, match=r"dims are \('band', 'time', 'y', 'x'\).*cube.transpose")


def test_wrong_dim_names() -> None:
    check(cube().rename(band="channel"), match=r"dims are .*'channel'.*fix: rename the dims")


def test_missing_bands_are_named() -> None:
    check(cube().sel(band=list(S2.bands[:-2])), match=r"missing bands \['B11', 'B12'\].*needs all of")


def test_extra_bands_are_named() -> None:
    c = cube()
    extra = xr.concat([c, c.sel(band=["B02"]).assign_coords(band=["B01"])], dim="band")
    extra.attrs = dict(c.attrs)
    check(extra, match=r"extra bands \['B01'\].*fix: cube.sel\(band=\['B02'")


def test_misordered_bands_show_expected_order_and_fix() -> None:
    c = cube().sel(band=list(reversed(S2.bands)))
    check(c, match=r"bands are in the order \['B12', .*expected \['B02', .*fix: cube.sel\(band=\['B02'")


def test_duplicate_bands() -> None:
    c = with_coord(cube(), "band", ["B02", *S2.bands[:-1]])
    check(c, match=r"duplicate bands \['B02'\]")


# ----------------------------------------------------------------------------- values
def test_non_float32_dtype() -> None:
    check(cube().astype(np.float64), match="dtype is float64, expected float32")


def test_s2_digital_numbers_are_recognised() -> None:
    c = (cube() * 10_000).round().astype(np.uint16)
    check(c, match=r"dtype is uint16.*\n.*looks like digital numbers.*multiply by 1e-4.*BOA_ADD_OFFSET")


def test_s2_slightly_out_of_range_asks_for_clipping() -> None:
    c = cube()
    c[0, 0, 0, 0] = 1.2
    check(c, match=r"values range over \[.*, 1.2\], outside the valid range \[0, 1\]; fix: clip")


def test_s1_db_values_point_to_prepare_s1() -> None:
    c = cube("s1") * 20 - 25  # dB-like
    c.attrs = cube("s1").attrs
    check(c, S1, match=r"looks like dB or linear power.*stembed.preprocess.prepare_s1")


def test_s1_linear_power_above_one_is_caught() -> None:
    c = cube("s1")
    c[1, 0, 2, 2] = 3.0
    check(c, S1, match="looks like dB or linear power")


def test_infinite_and_all_nan_values() -> None:
    c = cube()
    c[0, 0, 0, 0] = np.inf
    check(c, match="infinite values")
    check(cube() * np.nan, match="every value is NaN")


def test_nan_is_allowed_as_missing() -> None:
    c = cube()
    c[0] = np.nan
    validate_cube(c, S2)


# ----------------------------------------------------------------------------- time
def test_duplicate_times_are_named() -> None:
    c = with_coord(cube(), "time", TIMES[[0, 1, 1]])
    check(c, match=r"duplicate times \['2020-01-06 10:50:00'\].*merge or drop")


def test_unsorted_times() -> None:
    c = with_coord(cube(), "time", TIMES[[1, 0, 2]])
    check(c, match=r"not sorted; fix: cube.sortby\('time'\)")


def test_time_must_be_datetime() -> None:
    check(with_coord(cube(), "time", [1, 2, 3]), match="time coordinate has dtype int64, expected datetime64")


def test_too_few_dates_for_a_window() -> None:
    check(cube(), min_dates=20, match="a window needs 20 dates; the cube has 3; fix: extend the period")


# ----------------------------------------------------------------------------- grid and attrs
def test_crs_missing_or_unparseable_or_geographic() -> None:
    c = cube()
    del c.attrs["crs"]
    check(c, match=r"no 'crs' attribute; fix: cube.attrs\['crs'\] = 'EPSG:<code>'")
    check(cube(crs="EPSG:99999999"), match="cannot be parsed by pyproj; fix: use a string such as 'EPSG:")
    check(cube(crs="EPSG:4326"), match="is not projected")


def test_spacing_must_be_regular_10m() -> None:
    c = cube()
    coarse = with_coord(c, "x", X0 + 20.0 * np.arange(5))
    check(coarse, match=r"x spacing is 20 m, expected a regular 10 m; fix: resample")
    irregular = with_coord(c, "y", Y0 - np.array([0.0, 10.0, 20.0, 35.0]))
    check(irregular, match=r"y spacing is irregular \(steps \[10.0, 15.0\] m\)")


def test_axis_directions() -> None:
    c = cube()
    flipped_x = c.isel(x=slice(None, None, -1))
    check(flipped_x, match=r"x coordinate does not increase.*fix: cube.sortby\('x'\)")
    flipped_y = c.isel(y=slice(None, None, -1))
    check(flipped_y, match=r"y coordinate does not decrease.*fix: cube.sortby\('y', ascending=False\)")


def test_legacy_transform_attribute_must_match_coords() -> None:
    c = cube()
    c.attrs["transform"] = [X0, 10.0, 0.0, Y0, 0.0, -10.0]  # pixel centre instead of corner
    check(c, match="does not match the x/y coordinates.*with_georef")
    c.attrs["transform"] = list(cube_transform(c))  # a matching legacy attribute is tolerated
    validate_cube(c, S2)


def test_spatial_ref_must_name_the_cube_crs() -> None:
    c = cube()
    c.attrs["crs"] = "EPSG:32632"
    check(c, match="spatial_ref coordinate's CRS is not attrs\\['crs'\\].*with_georef")
    validate_cube(with_georef(c), S2)


def test_grid_smaller_than_patch() -> None:
    check(cube(), patch_px=15, match="cube is 4x5 px, smaller than a 15x15 patch; fix: enlarge the area")


def test_sensor_site_and_provenance_attrs() -> None:
    check(cube("s1"), S2, match=r"attrs\['sensor'\] is 's1' but the cube is checked as 's2'")
    c = cube()
    c.attrs["site"] = ""
    c.attrs["provenance"] = {"not": "a string"}
    check(c, match=r"(?s)attrs\['site'\] is ''.*provenance'\] must be a JSON string")


def test_all_problems_are_reported_together() -> None:
    c = cube().astype(np.float64)
    c.attrs["crs"] = "nonsense"
    with pytest.raises(CubeError) as err:
        validate_cube(c, S2, min_dates=5)
    msg = str(err.value)
    assert "dtype is float64" in msg and "cannot be parsed" in msg and "a window needs 5 dates" in msg


# ----------------------------------------------------------------------------- pairs and scenes
def test_validate_pair_accepts_a_shared_grid() -> None:
    validate_pair(cube("s1"), cube("s2"))


def test_validate_pair_names_crs_mismatch() -> None:
    with pytest.raises(CubeError, match=r"CRS: EPSG:32632 vs EPSG:32631.*reproject/resample S1 onto the S2"):
        validate_pair(cube("s1", crs="EPSG:32632"), cube("s2"))


def test_validate_pair_names_shape_mismatch() -> None:
    with pytest.raises(CubeError, match="S1 grid is 4x6 px but S2 is 4x5 px"):
        validate_pair(cube("s1", nx=6), cube("s2"))


def test_validate_pair_names_offset() -> None:
    with pytest.raises(CubeError, match=r"S1 grid is offset by \(5, -10\) m \(dx, dy\) from S2"):
        validate_pair(cube("s1", dx=5.0, dy=-10.0), cube("s2"))


def test_validate_pair_catches_swapped_arguments_and_sites() -> None:
    with pytest.raises(CubeError, match="S1 cube first"):
        validate_pair(cube("s2"), cube("s1"))
    with pytest.raises(CubeError, match="from site 'b' but S2 from site 'a'"):
        validate_pair(cube("s1", site="b"), cube("s2"))


def test_scene_validate_and_frozen(tiny_scene: Scene) -> None:
    tiny_scene.validate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_scene.site = "x"  # type: ignore[misc]
    with pytest.raises(CubeError, match="Scene.site is 'other'"):
        dataclasses.replace(tiny_scene, site="other").validate()
    assert tiny_scene.labels is not None
    shifted = tiny_scene.labels.assign_coords(x=tiny_scene.labels.x + 10.0)
    with pytest.raises(CubeError, match="labels x coordinates differ"):
        dataclasses.replace(tiny_scene, labels=shifted).validate()


# ----------------------------------------------------------------------------- storage
def test_zarr_round_trip_keeps_everything(tmp_path: Path) -> None:
    c = cube("s1")
    c[0, 0, 0, 0] = np.nan
    c = c.assign_coords(s1_time=("time", np.array(["2020-01-01T17:32", "NaT", "2020-01-12T17:40"],
                                                 dtype="datetime64[ns]")))
    save_cube(c, tmp_path / "s1.zarr")
    back = open_cube(tmp_path / "s1.zarr")
    xr.testing.assert_identical(back.load(), c)
    assert "transform" not in back.attrs
    assert json.loads(back.attrs["provenance"]) == {"test": True}


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "s2.zarr"
    save_cube(cube(), path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_cube(cube(), path)
    replaced = cube(site="b")
    save_cube(replaced, path, overwrite=True)
    assert open_cube(path).attrs["site"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["s2.zarr"]


def test_failed_write_leaves_no_cube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = xr.Dataset.to_zarr

    def write_then_fail(self: xr.Dataset, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_cube(cube(), tmp_path / "s2.zarr")
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_invalid_cube(tmp_path: Path) -> None:
    with pytest.raises(CubeError, match="dtype is float64"):
        save_cube(cube().astype(np.float64), tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()


def test_open_cube_errors(tmp_path: Path) -> None:
    with pytest.raises(CubeError, match="no cube at"):
        open_cube(tmp_path / "missing.zarr")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises(CubeError, match="is not a readable zarr store"):
        open_cube(tmp_path / "junk")
    xr.Dataset({"foo": ("a", [1, 2])}).to_zarr(tmp_path / "other.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(CubeError, match=r"not a stembed cube \(variables \['foo'\]"):
        open_cube(tmp_path / "other.zarr")


def test_io_preprocess_testing_do_not_import_torch() -> None:
    code = (
        "import sys, stembed.io.cube, stembed.io.worldcereal, stembed.preprocess, stembed.testing; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------------------------- georeferencing (spatial_ref)
def test_scene_store_cube_writes_a_geotiff_where_its_grid_is(tmp_path: Path, belgian_scene: Scene) -> None:
    """A cube read back from a scene store goes to GeoTIFF with rioxarray at its own x/y bounds."""
    import rasterio

    save_scene(belgian_scene, tmp_path / "site.zarr")
    s2 = open_scene(tmp_path / "site.zarr").s2
    assert "transform" not in s2.attrs and "spatial_ref" in s2.coords
    one = s2.isel(time=0)
    one.rio.to_raster(tmp_path / "s2.tif")
    x, y = s2["x"].values, s2["y"].values
    expected = (x[0] - 5.0, y[-1] - 5.0, x[-1] + 5.0, y[0] + 5.0)  # pixel centres +- half a 10 m pixel
    with rasterio.open(tmp_path / "s2.tif") as src:
        assert src.crs.to_epsg() == 32631
        np.testing.assert_allclose(tuple(src.bounds), expected, atol=1e-6)
        np.testing.assert_array_equal(src.read(3), one.sel(band="B04").values)
    import odc.geo.xr  # noqa: F401  (registers the .odc accessor)

    bbox = s2.odc.geobox.extent.boundingbox  # odc-geo reads the same CF grid mapping
    assert s2.odc.crs.epsg == 32631
    np.testing.assert_allclose((bbox.left, bbox.bottom, bbox.right, bbox.top), expected, atol=1e-6)
    # a crop keeps the original spatial_ref in memory; stores and rasters follow the coordinates
    crop = s2.isel(y=slice(10, 20), x=slice(5, 15), time=0)
    crop.rio.to_raster(tmp_path / "crop.tif")
    with rasterio.open(tmp_path / "crop.tif") as src:
        assert src.bounds.left == crop["x"].values[0] - 5.0 and src.bounds.top == crop["y"].values[0] + 5.0


def test_legacy_store_opens_with_one_warning(tmp_path: Path, tiny_scene: Scene) -> None:
    """Stores from before spatial_ref: the old attribute is checked, replaced; one warning names the fix."""
    import warnings

    import zarr

    path = save_scene(tiny_scene, tmp_path / "old.zarr")
    for group in ("s2", "s1"):  # make it look like an old store: a GDAL-order attribute, no spatial_ref
        arr = zarr.open_array(path / group / group, mode="r+")
        attrs = {k: v for k, v in arr.attrs.items() if k not in ("grid_mapping", "coordinates")}
        attrs["transform"] = list(cube_transform(tiny_scene.s2))
        arr.attrs.clear()
        arr.attrs.update(attrs)
        zarr.open_group(path / group, mode="r+").__delitem__("spatial_ref")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scene = open_scene(path)
    legacy = [w for w in caught if issubclass(w.category, LegacyStoreWarning)]
    assert len(legacy) == 1 and "save_scene(open_scene(old), new)" in str(legacy[0].message)
    assert "transform" not in scene.s2.attrs
    assert scene.s2.rio.transform().to_gdal() == cube_transform(tiny_scene.s2)
    # a legacy attribute that disagrees with the coordinates is refused, not trusted
    arr = zarr.open_array(path / "s1" / "s1", mode="r+")
    arr.attrs["transform"] = [0.0, 10.0, 0.0, 0.0, 0.0, -10.0]
    with pytest.raises(CubeError, match="does not match the x/y coordinates"):
        open_scene(path)
