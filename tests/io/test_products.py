"""Products made from an embedding store: PCA maps, point samples, GeoTIFF export, and their commands."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyproj
import pytest
import rasterio
from typer.testing import CliRunner

from stembed.cli import app
from stembed.eval.pca import pca_maps
from stembed.io.cube import CubeError, Scene, cube_transform, save_scene
from stembed.io.embeddings import EmbeddingStoreError, open_embeddings
from stembed.io.export import export_geotiffs
from stembed.io.sample import SampleError, read_points, sample_points, write_table
from stembed.testing import synthetic_scene, write_embedding_store_at

runner = CliRunner()
CRS = "EPSG:32632"
TRANSFORM = [431_230.0, 10.0, 0.0, 5_123_450.0, 0.0, -10.0]  # not a multiple of the tile size anywhere
FEATURES = [f"E{i}" for i in range(1, 8)]


def make_store(
    path: Path,
    values: np.ndarray,
    *,
    times: np.ndarray,
    transform: list[float] = TRANSFORM,
    crs: str = CRS,
) -> Path:
    """A complete float32 store of ``values`` ``(time, feature, y, x)``; NaN pixel-dates are not valid."""
    n_t, n_f, h, w = values.shape
    valid = np.isfinite(values).all(axis=1)
    values = np.where(valid[:, None], values, np.nan).astype(np.float32)
    x = transform[0] + transform[1] * (np.arange(w) + 0.5)
    y = transform[3] + transform[5] * (np.arange(h) + 0.5)
    return write_embedding_store_at(
        path, values, time=np.asarray(times, "datetime64[ns]"), y=y, x=x, crs=crs, transform=transform,
        valid=valid, tile_px=8, time_chunk=2, attrs={"fingerprint": "test"},
    )


def random_values(n_t: int = 3, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_t, 7, h, w)).astype(np.float32)


TIMES = pd.to_datetime(["2021-05-01T10:30:00", "2021-06-03T10:31:00", "2021-07-12T10:29:00"]).values


# ----------------------------------------------------------------------------- sampling
@pytest.fixture()
def sample_store(tmp_path: Path) -> tuple[Path, np.ndarray]:
    values = random_values()
    values[1, :, 5, 7] = np.nan  # one missing pixel inside the window of point "a"
    values[2, :, 9:12, 0:3] = np.nan  # the whole window of point "b" missing on the last date
    return make_store(tmp_path / "emb.zarr", values, times=TIMES), values


def _hand_mean(values: np.ndarray, t: int, rows: slice, cols: slice) -> tuple[np.ndarray, int]:
    win = values[t, :, rows, cols].reshape(7, -1).astype(np.float64)
    ok = np.isfinite(win).all(axis=0)
    return (win[:, ok].mean(axis=1) if ok.any() else np.full(7, np.nan)), int(ok.sum())


def test_sample_xy_window_means_and_n_valid(sample_store: tuple[Path, np.ndarray]) -> None:
    path, values = sample_store
    x0, y0 = TRANSFORM[0], TRANSFORM[3]
    # "a" lies inside pixel (row 5, col 6), off its centre; "b" in pixel (10, 1), at the grid's corner area
    pts = pd.DataFrame({"id": ["a", "b"], "x": [x0 + 63.0, x0 + 11.0], "y": [y0 - 57.0, y0 - 109.0]})
    got = sample_points(open_embeddings(path), pts, window_px=3)
    assert list(got.columns) == ["id", "time", "x", "y", *FEATURES, "n_valid"]
    assert len(got) == 2 * len(TIMES)
    for pid, (r, c) in {"a": (5, 6), "b": (10, 1)}.items():
        rows = got[got["id"] == pid].reset_index(drop=True)
        assert rows["x"].iloc[0] == x0 + 10 * c + 5 and rows["y"].iloc[0] == y0 - 10 * r - 5
        assert (rows["time"].to_numpy() == TIMES).all()
        for t in range(len(TIMES)):
            mean, n = _hand_mean(values, t, slice(r - 1, r + 2), slice(c - 1, c + 2))
            assert rows.loc[t, "n_valid"] == n
            np.testing.assert_allclose(rows.loc[t, FEATURES].to_numpy(np.float64), mean, rtol=1e-6, atol=1e-6)
    a, b = got[got["id"] == "a"], got[got["id"] == "b"]
    assert a["n_valid"].tolist() == [9, 8, 9]
    assert b["n_valid"].tolist() == [9, 9, 0] and b[FEATURES].iloc[2].isna().all()

    one = sample_points(open_embeddings(path), pts.iloc[:1], window_px=1)
    np.testing.assert_allclose(one[FEATURES].to_numpy(np.float64)[0], values[0, :, 5, 6], rtol=1e-6)


def test_sample_lon_lat_matches_x_y(sample_store: tuple[Path, np.ndarray]) -> None:
    path, _ = sample_store
    ds = open_embeddings(path)
    x, y = TRANSFORM[0] + 10 * 6 + 5, TRANSFORM[3] - 10 * 5 - 5
    lon, lat = pyproj.Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(x, y)
    by_xy = sample_points(ds, pd.DataFrame({"x": [x], "y": [y]}), window_px=3)
    by_ll = sample_points(ds, pd.DataFrame({"lon": [lon], "lat": [lat]}), window_px=3)
    pd.testing.assert_frame_equal(by_xy, by_ll)
    assert by_ll["id"].tolist() == [0, 0, 0]  # no id column: the row index


def test_sample_errors_name_the_point_and_the_fix(sample_store: tuple[Path, np.ndarray]) -> None:
    ds = open_embeddings(sample_store[0])
    x0, y0 = TRANSFORM[0], TRANSFORM[3]
    far = pd.DataFrame({"id": ["in", "far"], "x": [x0 + 55, x0 - 5], "y": [y0 - 55, y0 - 55]})
    with pytest.raises(SampleError, match=r"points 'far' lie outside the embedding grid .*fix: drop them"):
        sample_points(ds, far)
    edge = pd.DataFrame({"id": ["edge"], "x": [x0 + 15], "y": [y0 - 55]})  # column 1: 5x5 overhangs by 1
    with pytest.raises(SampleError, match=r"5x5 window of points 'edge' \(1 px past the border\).*at most 3"):
        sample_points(ds, edge, window_px=5)
    for k in (2, 0, -1):
        with pytest.raises(SampleError, match="window_px must be an odd whole number"):
            sample_points(ds, edge, window_px=k)
    with pytest.raises(SampleError, match="need columns lon, lat .* or x, y"):
        sample_points(ds, pd.DataFrame({"lon": [1.0], "y": [2.0]}))
    with pytest.raises(SampleError, match="'p' .*appear more than once"):
        sample_points(ds, pd.DataFrame({"id": ["p", "p"], "x": [x0 + 55] * 2, "y": [y0 - 55] * 2}))


def test_tables_round_trip_and_parquet_needs_pyarrow(
    tmp_path: Path, sample_store: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = tmp_path / "pts.csv"
    csv.write_text(f"id, x, y\nq,{TRANSFORM[0] + 55},{TRANSFORM[3] - 55}\n")
    pts = read_points(csv)
    assert list(pts.columns) == ["id", "x", "y"]
    table = sample_points(open_embeddings(sample_store[0]), pts)
    back = pd.read_csv(write_table(table, tmp_path / "out" / "t.csv"), parse_dates=["time"])
    assert (back["time"].to_numpy() == TIMES).all()
    np.testing.assert_allclose(back[FEATURES].to_numpy(), table[FEATURES].to_numpy(), rtol=1e-6)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "pyarrow" else real_find_spec(n, *a)
    )
    with pytest.raises(SampleError, match="pip install pyarrow"):
        write_table(table, tmp_path / "t.parquet")
    with pytest.raises(SampleError, match=r"\.csv or \.parquet"):
        write_table(table, tmp_path / "t.xlsx")


# ----------------------------------------------------------------------------- GeoTIFF export
def test_geotiffs_keep_crs_transform_bands_and_nan(tmp_path: Path) -> None:
    values = random_values()
    values[1, :, 3, 4] = np.nan
    path = make_store(tmp_path / "emb.zarr", values, times=TIMES)
    files = export_geotiffs(open_embeddings(path), tmp_path / "tif")
    days = ("2021-05-01", "2021-06-03", "2021-07-12")
    assert [f.name for f in files] == [f"embedding_{d}.tif" for d in days]
    for t, f in enumerate(files):
        with rasterio.open(f) as src:
            assert src.crs.to_epsg() == 32632
            assert src.transform.to_gdal() == tuple(TRANSFORM)
            assert src.count == 7 and src.dtypes == ("float32",) * 7
            assert src.descriptions == tuple(FEATURES)
            assert np.isnan(src.nodata) and src.compression.value == "DEFLATE"
            assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
            np.testing.assert_array_equal(src.read(), values[t])  # NaN in the same places, values exact
    assert np.isnan(rasterio.open(files[1]).read(2)[3, 4])


def test_geotiff_names_dates_and_overwrite_refusal(tmp_path: Path) -> None:
    times = pd.to_datetime(["2021-06-03T10:30:00", "2021-06-03T10:35:07", "2021-06-08T10:30:00"]).values
    ds = open_embeddings(make_store(tmp_path / "emb.zarr", random_values(), times=times))
    out = tmp_path / "tif"
    files = export_geotiffs(ds, out, dates=["2021-06-03"])
    assert [f.name for f in files] == ["embedding_2021-06-03T103000.tif", "embedding_2021-06-03T103507.tif"]

    with pytest.raises(FileExistsError, match="2 GeoTIFF.*already exist.*overwrite=True"):
        export_geotiffs(ds, out)
    assert sorted(p.name for p in out.iterdir()) == [f.name for f in files]  # nothing new was written
    assert len(export_geotiffs(ds, out, overwrite=True)) == 3

    nearest = r"no date 2021-06-05 .*nearest available: 2021-06-03, 2021-06-08"
    with pytest.raises(EmbeddingStoreError, match=nearest):
        export_geotiffs(ds, out, dates=["2021-06-05"], overwrite=True)


# ----------------------------------------------------------------------------- PCA maps
@pytest.fixture(scope="module")
def scene() -> Scene:
    return synthetic_scene(seed=1, height_px=12, width_px=16, n_days=40)


def scene_store(path: Path, scene: Scene, values: np.ndarray) -> Path:
    s2 = scene.s2
    return make_store(path, values, times=s2["time"].values, transform=list(cube_transform(s2)),
                      crs=s2.attrs["crs"])


def rank2_values(n_t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Embeddings = mean + a * u + b * v: two directions of variation, so PC3 explains nothing."""
    rng = np.random.default_rng(seed)
    u, v, mean = rng.normal(size=(3, 7))
    a, b = rng.normal(size=(2, n_t, 1, h, w)) * np.array([3.0, 1.0])[:, None, None, None, None]
    f = (None, slice(None), None, None)  # a (feature,) vector as (1, feature, 1, 1)
    return (mean[f] + a * u[f] + b * v[f]).astype(np.float32)


def test_pca_maps_of_a_rank_two_store(tmp_path: Path, scene: Scene) -> None:
    n_t, h, w = scene.s2.shape[0], scene.s2.sizes["y"], scene.s2.sizes["x"]
    assert n_t == 6
    values = rank2_values(n_t, h, w)
    values[1, :, :6] = np.nan  # half the pixels missing
    values[2] = np.nan  # no pixel at all
    values[4, :, 1:, :] = np.nan  # one row left
    ds = open_embeddings(scene_store(tmp_path / "emb.zarr", scene, values))
    res = pca_maps(ds, scene.s2, dates=None, out_dir=tmp_path / "pca", n_samples=400, seed=3)

    report = json.loads(res["json"].read_text())
    ratio = report["explained_variance_ratio"]
    assert sum(ratio) <= 1 + 1e-9 and ratio == sorted(ratio, reverse=True)
    assert ratio[2] < 1e-6  # exact rank 2: nothing left for component 3
    assert ratio[0] + ratio[1] > 1 - 1e-6
    labels = [str(d)[:10] for d in scene.s2["time"].values]
    assert report["dates"] == [labels[i] for i in (0, 1, 3, 5)]  # the 4 best-covered dates, in time order
    assert report["n_samples"] == 400 and sum(report["samples_per_date"].values()) == 400
    assert labels[2] not in report["samples_per_date"]
    stretch = report["stretch"]
    assert len(stretch["low"]) == 3 and np.all(np.less(stretch["low"], stretch["high"]))
    assert [p.name for p in res["pngs"]] == [f"pca_{d}.png" for d in report["dates"]]
    for p in res["pngs"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = pca_maps(ds, scene.s2, dates=[labels[4]], out_dir=tmp_path / "pca2", n_samples=400, seed=3)
    assert [p.name for p in again["pngs"]] == [f"pca_{labels[4]}.png"]
    assert json.loads(again["json"].read_text())["components"] == report["components"]  # same seed, same fit


def test_pca_errors(tmp_path: Path, scene: Scene) -> None:
    n_t, h, w = scene.s2.shape[0], scene.s2.sizes["y"], scene.s2.sizes["x"]
    ds = open_embeddings(scene_store(tmp_path / "emb.zarr", scene, random_values(n_t, h, w)))
    with pytest.raises(EmbeddingStoreError, match="no date 2019-01-01 .*nearest available: "):
        pca_maps(ds, scene.s2, dates=["2019-01-01"], out_dir=tmp_path / "p")
    with pytest.raises(CubeError, match="S2 cube's x grid .*differs"):
        pca_maps(ds, scene.s2.isel(x=slice(1, None)), dates=None, out_dir=tmp_path / "p")
    with pytest.raises(CubeError, match="S2 cube has no acquisition at"):
        pca_maps(ds, scene.s2.isel(time=slice(1, None)), dates=None, out_dir=tmp_path / "p")


# ----------------------------------------------------------------------------- commands
def test_commands_pca_sample_export(tmp_path: Path, scene: Scene) -> None:
    cube = save_scene(scene, tmp_path / "scene.zarr")
    n_t, h, w = scene.s2.shape[0], scene.s2.sizes["y"], scene.s2.sizes["x"]
    emb = scene_store(tmp_path / "emb.zarr", scene, rank2_values(n_t, h, w))
    day = str(scene.s2["time"].values[2])[:10]

    res = runner.invoke(app, ["pca", "--embeddings", str(emb), "--cube", str(cube), "--dates", day,
                              "--out", str(tmp_path / "pca"), "--samples", "300", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pca" / f"pca_{day}.png").is_file()
    assert str(tmp_path / "pca" / "pca.json") in res.output

    x0, y0 = cube_transform(scene.s2)[0], cube_transform(scene.s2)[3]
    (tmp_path / "pts.csv").write_text(f"id,x,y\nfield,{x0 + 55},{y0 - 55}\n")
    res = runner.invoke(app, ["sample", "--embeddings", str(emb), "--points", str(tmp_path / "pts.csv"),
                              "--window-px", "3", "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "s.csv")) == n_t and str(tmp_path / "s.csv") in res.output
    res = runner.invoke(app, ["sample", "--embeddings", str(emb), "--points", str(tmp_path / "pts.csv"),
                              "--window-px", "4", "--out", str(tmp_path / "s.csv"), "--overwrite"])
    assert res.exit_code == 2 and "odd whole number" in res.output
    res = runner.invoke(app, ["sample", "--embeddings", str(emb), "--points", str(tmp_path / "pts.csv"),
                              "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 2 and "already exists; fix: pass --overwrite" in res.output

    res = runner.invoke(app, ["export", "--embeddings", str(emb), "--out", str(tmp_path / "tif"),
                              "--dates", day])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tif" / f"embedding_{day}.tif").is_file()
    res = runner.invoke(app, ["export", "--embeddings", str(emb), "--out", str(tmp_path / "tif")])
    assert res.exit_code == 2 and "--overwrite" in res.output

    res = runner.invoke(app, ["export", "--embeddings", str(cube), "--out", str(tmp_path / "tif2")])
    assert res.exit_code == 2 and "not a stembed embedding store" in res.output
    res = runner.invoke(app, ["pca", "--embeddings", str(tmp_path / "nope.zarr"), "--cube", str(cube),
                              "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "no embedding store at" in res.output
