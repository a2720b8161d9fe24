"""Readable embedding stores (issue 15, item 5): CF scale/offset that xarray decodes, no bookkeeping in the
user's view, old-format stores still open, and a netCDF export that GDAL (rasterio) opens in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from stembed.io.embeddings import INT8_FILL, Quantisation, feature_var, open_embeddings
from stembed.io.export import export_netcdf
from stembed.testing import write_embedding_store_at

FEATURES = [f"E{i}" for i in range(1, 8)]
TRANSFORM = [400_000.0, 10.0, 0.0, 5_000_160.0, 0.0, -10.0]
CRS = "EPSG:32631"


def _values(seed: int = 0) -> np.ndarray:
    """(time, feature, y, x): features on very different scales, and some missing pixel-dates."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(3, 7, 16, 12)).astype(np.float32) * np.logspace(-2, 1, 7, dtype=np.float32)[:, None, None]
    v[1, :, :4, :5] = np.nan
    return v


def _store(path: Path, values: np.ndarray, dtype: str) -> tuple[Path, Quantisation]:
    n_t, n_f, h, w = values.shape
    valid = np.isfinite(values).all(axis=1)
    q = Quantisation.calibrate(dtype, values.transpose(0, 2, 3, 1).reshape(-1, n_f), margin=0.05)
    x = TRANSFORM[0] + 10.0 * (np.arange(w) + 0.5)
    y = TRANSFORM[3] - 10.0 * (np.arange(h) + 0.5)
    write_embedding_store_at(
        path, values, time=pd.date_range("2021-05-01", periods=n_t, freq="10D").values, y=y, x=x, crs=CRS,
        transform=TRANSFORM, valid=valid, quant=q, tile_px=8, time_chunk=2, attrs={"fingerprint": "test"},
    )
    return path, q


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_compact_stores_decode_in_plain_xarray_per_feature(tmp_path: Path, dtype: str) -> None:
    values = _values()
    path, q = _store(tmp_path / "emb.zarr", values, dtype)
    plain = xr.open_zarr(path, consolidated=False)
    for i, f in enumerate(FEATURES):
        var = plain[feature_var(f)]
        assert var.dims == ("time", "y", "x") and var.dtype.kind == "f"  # decoded, not codes
        assert var.encoding["scale_factor"] == pytest.approx(float(q.scale[i]))
        got = var.values
        assert np.array_equal(np.isnan(got), np.isnan(values[:, i]))
        step = float(q.scale[i]) * (0.5 if dtype == "int8" else 2e-3 * 127)
        np.testing.assert_allclose(got, values[:, i], atol=step * 1.01, rtol=0)
    if dtype == "int8":
        raw = zarr.open_array(path / feature_var("E1"), mode="r")
        assert raw.dtype == np.int8 and raw.attrs["_FillValue"] == INT8_FILL
    # open_embeddings stacks the features back, float32, and hides the bookkeeping
    ds = open_embeddings(path)
    assert set(ds.data_vars) == {"embedding", "valid"}
    assert ds["embedding"].dims == ("time", "feature", "y", "x") and ds["embedding"].dtype == np.float32
    assert list(ds["feature"].values) == FEATURES
    np.testing.assert_allclose(ds["embedding"].values, q.decode(q.encode(values)), rtol=1e-6, atol=1e-6)


def test_format_1_store_with_scale_and_offset_variables_still_opens(tmp_path: Path) -> None:
    """Stores written before the CF layout: int8 codes in one variable, separate scale/offset variables."""
    values = _values(1)
    path, q = _store(tmp_path / "old.zarr", values, "int8")
    g = zarr.open_group(path, mode="r+")
    codes = np.stack([np.asarray(zarr.open_array(path / feature_var(f), mode="r")[:]) for f in FEATURES], axis=1)
    for f in FEATURES:
        del g[feature_var(f)]
    g.create_array("embedding", shape=codes.shape, dtype="int8", chunks=(2, 7, 8, 8), fill_value=INT8_FILL,
                   dimension_names=("time", "feature", "y", "x"),
                   attributes={"grid_mapping": "spatial_ref", "_FillValue": INT8_FILL})[:] = codes
    for name, vals in (("scale", q.scale), ("offset", q.offset)):
        g.create_array(name, shape=(7,), dtype="float32", chunks=(7,), dimension_names=("feature",))[:] = vals
    g.attrs["stembed_embedding_format"] = "stembed-embedding/1"
    ds = open_embeddings(path)
    assert set(ds.data_vars) == {"embedding", "valid"}
    np.testing.assert_allclose(ds["embedding"].values, q.decode(codes), rtol=1e-6, atol=1e-6)


def test_netcdf_export_opens_in_gdal_at_the_store_grid(tmp_path: Path) -> None:
    import rasterio

    values = _values(2)
    path, q = _store(tmp_path / "emb.zarr", values, "int8")
    ds = open_embeddings(path)
    nc = export_netcdf(ds, tmp_path / "out" / "emb.nc", dates=["2021-05-11", "2021-05-21"])
    expected = ds["embedding"].values[1:]
    with rasterio.open(f'NETCDF:"{nc}":{feature_var("E3")}') as src:
        assert src.crs.to_epsg() == 32631
        assert src.count == 2  # the two dates
        w, h = values.shape[3], values.shape[2]
        assert tuple(src.bounds) == pytest.approx((400_000.0, 5_000_160.0 - 10.0 * h, 400_000.0 + 10.0 * w,
                                                   5_000_160.0))
        band = src.read(1)
        np.testing.assert_array_equal(np.isnan(band), np.isnan(expected[0, 2]))
        np.testing.assert_allclose(band, expected[0, 2], rtol=1e-6, equal_nan=True)
    back = xr.open_dataset(nc, decode_coords="all")  # as rioxarray recommends for CF grid mappings
    assert back.rio.crs.to_epsg() == 32631 and set(back.data_vars) >= {feature_var("E1"), "valid"}
    back.close()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_netcdf(ds, nc)


def test_export_command_writes_netcdf_and_lists_the_formats(tmp_path: Path) -> None:
    import rasterio
    from typer.testing import CliRunner

    from stembed.cli import app

    runner = CliRunner()
    path, _ = _store(tmp_path / "emb.zarr", _values(3), "float16")
    nc = tmp_path / "emb.nc"
    res = runner.invoke(app, ["export", "--embeddings", str(path), "--out", str(nc), "--format", "netcdf"])
    assert res.exit_code == 0, res.output
    with rasterio.open(f'NETCDF:"{nc}":{feature_var("E7")}') as src:
        assert src.count == 3 and src.crs.to_epsg() == 32631
    res = runner.invoke(app, ["export", "--embeddings", str(path), "--out", str(nc), "--format", "netcdf"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, ["export", "--embeddings", str(path), "--out", str(nc), "--format", "png"])
    assert res.exit_code == 2 and "geotiff" in res.output and "netcdf" in res.output


def test_embedding_store_goes_to_geotiff_at_its_grid_with_rioxarray(tmp_path: Path) -> None:
    """Embedding stores carry the CF spatial_ref too: one date's embedding lands where the store says."""
    import rasterio
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    values = _values(4)
    path, _ = _store(tmp_path / "emb.zarr", values, "float32")
    one = open_embeddings(path)["embedding"].isel(time=0)
    one.rio.to_raster(tmp_path / "e.tif")
    h, w = values.shape[2], values.shape[3]
    with rasterio.open(tmp_path / "e.tif") as src:
        assert src.crs.to_epsg() == 32631 and src.count == 7
        assert tuple(src.bounds) == pytest.approx((400_000.0, 5_000_160.0 - 10.0 * h, 400_000.0 + 10.0 * w,
                                                   5_000_160.0))
