"""``stembed cube`` offline: a STAC API on 127.0.0.1 serving COGs made from the real WorldCereal patch.

Design of the offline test bed (no test touches the internet):

* The catalog (``stembed.testing.worldcereal_stac_catalog``) is built at test time from the NetCDFs in
  ``../shared/data``: a subset of 20 S2 dates (one item each, uint16 DN COGs per band, 20 m bands and
  SCL on their native 20 m grid, a synthesised ``MTD_TL.xml`` holding each date's real scene-mean sun
  and view angles; every third item claims processing baseline 04.00 and stores DN + 1000) and 40 S1
  dates (float32 linear-power COGs converted from the GRD dB values).
* ``stembed.testing.StacTestServer`` serves it as a minimal STAC API: ``/search`` filters the static
  items by collection, bbox and datetime and pages with ``next`` links, and ``/files`` serves the COGs
  with HTTP Range, so the code path is exactly the one used against Planetary Computer (pystac-client
  search, odc-stac reads over HTTP via GDAL), minus the signing.
* The search layer is also checked against recorded responses (``tests/data/stac/*.json``): pages in
  the shape of Planetary Computer's ``sentinel-2-l2a`` / ``sentinel-1-rtc`` search responses, written by
  hand after its published item layout (there is no network here to record real ones), replayed by the
  same server, including a ``next`` link.

The reference for the equality test reads the NetCDF files directly and runs the same preprocessing
functions (``dn_to_reflectance`` with the same BRDF c-factor, ``prepare_s2``, ``prepare_s1``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from stembed.cli import app
from stembed.config import CubeConfig, load_config
from stembed.cube_build import CubeBuildError, CubeRequest, build_cube, shared_settings, staging_dir
from stembed.io.cube import open_scene
from stembed.io.stac import (
    RetryPolicy,
    StacError,
    is_planetary_computer,
    item_epsg,
    period_pieces,
    search_items,
    utm_grid,
)
from stembed.preprocess import SCLMask, dn_to_reflectance, nbar_c_factor, prepare_s1, prepare_s2
from stembed.sensors import S1, S2
from stembed.testing import StacTestServer, random_fusion_bundle, worldcereal_stac_catalog
from stembed.types import BAND, CUBE_DIMS, TIME, X, Y

DATA = Path(__file__).parents[1] / "data" / "stac"
FAST = RetryPolicy(retries=3, backoff_s=0.01)
PATCH = dict(epsg=32631, x_left=501_360.0, y_top=5_629_680.0, size_px=64)  # the WorldCereal patch grid
S2_EVERY, S1_EVERY = 6, 4  # subset of dates: every 6th S2 (20 dates) and every 4th S1 (40 dates)


# ----------------------------------------------------------------------------- fixtures
def _netcdf(folder: Path, pattern: str) -> xr.Dataset:
    (path,) = sorted(folder.glob(pattern))
    with xr.open_dataset(path, mask_and_scale=False) as ds:
        return ds.load()


@pytest.fixture(scope="module")
def netcdf(belgian_dir: Path) -> dict[str, xr.Dataset]:
    return {
        k: _netcdf(belgian_dir, p)
        for k, p in (
            ("s2_10m", "S2_L2A_10m_*.nc"),
            ("s2_20m", "S2_L2A_20m_*.nc"),
            ("s1", "S1_GRD-ASCENDING_20m_*.nc"),
        )
    }


@pytest.fixture(scope="module")
def times(netcdf: dict[str, xr.Dataset]) -> dict[str, pd.DatetimeIndex]:
    return {
        "s2": pd.DatetimeIndex(netcdf["s2_10m"]["timestamp"].values)[::S2_EVERY],
        "s1": pd.DatetimeIndex(netcdf["s1"]["timestamp"].values)[::S1_EVERY],
    }


@pytest.fixture(scope="module")
def catalog(
    tmp_path_factory: pytest.TempPathFactory, belgian_dir: Path, times: dict[str, pd.DatetimeIndex]
) -> Path:
    root = tmp_path_factory.mktemp("stac")
    return worldcereal_stac_catalog(belgian_dir, root, s2_times=times["s2"], s1_times=times["s1"]).parent


@pytest.fixture
def server(catalog: Path):
    with StacTestServer(catalog) as srv:
        yield srv


def lonlat_centre(x: float, y: float) -> tuple[float, float]:
    import pyproj

    return pyproj.Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True).transform(x, y)


def patch_grid(size_px: int = 64, offset_px: tuple[int, int] = (0, 0)):
    """The grid of (a square part of) the patch, through the user's --point/--size-m path."""
    x0 = PATCH["x_left"] + 10 * offset_px[1]
    y0 = PATCH["y_top"] - 10 * offset_px[0]
    lon, lat = lonlat_centre(x0 + 5 * size_px, y0 - 5 * size_px)
    return utm_grid(point=(lon, lat), size_m=10 * size_px)


def request(server: StacTestServer, **kw) -> CubeRequest:
    base = dict(
        grid=patch_grid(),
        start="2017-08-01",
        end="2018-11-30",
        site="BE-patch",
        catalog=server.api,
        retry=FAST,
    )
    return CubeRequest(**(base | kw))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, catalog: Path) -> Path:
    """The whole patch and period, built once through the local STAC API."""
    out = tmp_path_factory.mktemp("cube") / "cube.zarr"
    with StacTestServer(catalog) as srv:
        build_cube(request(srv), out, progress=False)
    return out


def reference(
    netcdf: dict[str, xr.Dataset], times: dict[str, pd.DatetimeIndex]
) -> tuple[xr.DataArray, xr.DataArray]:
    """The same dates read straight from the NetCDFs, through the same preprocessing functions."""
    ds10, ds20, ds1 = netcdf["s2_10m"], netcdf["s2_20m"], netcdf["s1"]
    up = lambda a: np.repeat(np.repeat(a, 2, axis=-1), 2, axis=-2)  # noqa: E731  20 m -> 10 m, nested grid
    i2 = pd.DatetimeIndex(ds10["timestamp"].values).get_indexer(times["s2"])
    dn = np.stack(
        [
            ds10[b].values[i2] if b in ("B02", "B03", "B04", "B08") else up(ds20[b].values[i2])
            for b in S2.bands
        ],
        axis=1,
    )
    refl = np.empty(dn.shape, np.float32)
    for k, i in enumerate(i2):
        angles = _angles(
            *(
                float(ds20[v].values[i])
                for v in ("sunZenithAngles", "sunAzimuthAngles", "viewZenithMean", "viewAzimuthMean")
            )
        )
        c = nbar_c_factor(angles).values[:, None, None]
        refl[k] = dn_to_reflectance(dn[k], boa_add_offset=0.0, c_factor=c)
    coords = {TIME: times["s2"].values, Y: ds10[Y].values, X: ds10[X].values}
    s2 = prepare_s2(
        xr.DataArray(refl, dims=CUBE_DIMS, coords=coords | {BAND: list(S2.bands)}),
        xr.DataArray(up(ds20["SCL"].values[i2]), dims=(TIME, Y, X), coords=coords),
        masked_classes=SCLMask().masked_classes(),
    )
    i1 = pd.DatetimeIndex(ds1["timestamp"].values).get_indexer(times["s1"])
    raw = np.stack([up(ds1[b].values[i1]) for b in S1.bands], axis=1)
    linear = np.where(raw == 0, np.nan, 10.0 ** (raw.astype(np.float64) * 1e-4 / 10.0))
    s1 = prepare_s1(
        xr.DataArray(linear, dims=CUBE_DIMS, coords=coords | {TIME: times["s1"].values, BAND: list(S1.bands)})
    )
    return s2, s1


def _angles(sun_zenith: float, sun_azimuth: float, view_zenith: float, view_azimuth: float) -> xr.DataArray:
    bands = ["Sun", *S2.bands]
    values = [[sun_zenith, sun_azimuth]] + [[view_zenith, view_azimuth]] * len(S2.bands)
    return xr.DataArray(
        np.array(values, np.float64),
        dims=("band", "angle"),
        coords={"band": bands, "angle": ["Zenith", "Azimuth"]},
    )


def no_store(out: Path) -> None:
    """Nothing at ``out`` that could pass for a cube."""
    assert not out.exists(), f"{out} exists after a failed build"


# ----------------------------------------------------------------------------- the acceptance tests
def test_built_cube_equals_direct_netcdf_read(built: Path, netcdf, times) -> None:
    """Values, dates, grid and CRS equal the NetCDF read through the same preprocessing.

    S2 gets atol 1e-6: the BRDF c-factor is interpolated (float64) from the 23 x 23 angle grid of
    MTD_TL.xml, while the reference computes it from the same angles directly, so the two differ in
    the last bits of a double before the one rounding to float32. S1 gets atol 1e-6: the COG holds
    linear power as float32 (as RTC products do), the reference keeps the float64 of the dB conversion.
    """
    scene = open_scene(built)
    ref_s2, ref_s1 = reference(netcdf, times)
    for got, ref in ((scene.s2, ref_s2), (scene.s1, ref_s1)):
        np.testing.assert_array_equal(got[TIME].values, ref[TIME].values)
        np.testing.assert_array_equal(got[Y].values, ref[Y].values)
        np.testing.assert_array_equal(got[X].values, ref[X].values)
        assert [str(b) for b in got[BAND].values] == [str(b) for b in ref[BAND].values]
        assert got.attrs["crs"] == "EPSG:32631"
        np.testing.assert_array_equal(np.isnan(got.values), np.isnan(ref.values))
        np.testing.assert_allclose(got.values, ref.values, rtol=0, atol=1e-6)
    assert 6 <= scene.s2.sizes[TIME] < len(times["s2"])  # the 3 % date filter dropped some cloudy dates
    # without BRDF the S2 cube would differ by far more than the tolerance: the test can fail
    assert float(np.nanmax(np.abs(scene.s2.values - _no_brdf(ref_s2, netcdf, times)))) > 1e-3


def _no_brdf(ref_s2: xr.DataArray, netcdf, times) -> np.ndarray:
    ds10, ds20 = netcdf["s2_10m"], netcdf["s2_20m"]
    up = lambda a: np.repeat(np.repeat(a, 2, axis=-1), 2, axis=-2)  # noqa: E731
    i2 = pd.DatetimeIndex(ds10["timestamp"].values).get_indexer(ref_s2[TIME].values)
    dn = np.stack(
        [
            ds10[b].values[i2] if b in ("B02", "B03", "B04", "B08") else up(ds20[b].values[i2])
            for b in S2.bands
        ],
        axis=1,
    )
    return np.where(np.isnan(ref_s2.values), np.nan, np.clip(dn_to_reflectance(dn), 0, 1))


def test_provenance_records_items_baselines_orbit(built: Path, times) -> None:
    scene = open_scene(built)
    p2, p1 = json.loads(scene.s2.attrs["provenance"]), json.loads(scene.s1.attrs["provenance"])
    assert len(p2["items"]) == len(times["s2"]) and len(p1["items"]) == len(times["s1"])
    assert p2["processing_baselines"] == [
        "02.06",
        "04.00",
    ]  # both offsets were exercised (and equal the NetCDF)
    offsets = {
        b: o for d in p2["dates"] for b, o in zip(d["processing_baseline"], d["boa_add_offset"], strict=True)
    }
    assert offsets == {"02.06": 0.0, "04.00": -1000.0}
    assert p1["orbit_direction"] == "ascending" and p1["s1_max_gap_days"] == 6.0
    assert "B08 coefficients" in p2["brdf"]["B8A"]
    assert {"odc-stac", "sen2nbar", "pystac-client", "gdal"} <= set(p2["versions"])
    assert p2["pieces"] == ["2017-08-01_2017-12-31", "2018-01-01_2018-11-30"]
    # with these, every CubeConfig setting is in the provenance
    assert (p2["min_dates"], p2["s1_orbit"], p2["piece_months"], p2["retries"]) == (6, "auto", 12, FAST.retries)
    assert not staging_dir(built).exists()


@pytest.mark.slow
def test_embed_runs_on_the_built_cube(tmp_path: Path, catalog: Path) -> None:
    """`stembed cube` then `stembed embed`, both through the CLI.

    The bundle is an untrained `random_fusion_bundle` of the demo's `small` preset: training the demo
    bundle takes minutes, and embed only needs the demo's architecture and band contract. An 8 x 8 px
    corner (the smallest cube embed takes) over one season keeps the per-patch embedding to seconds.
    """
    lon, lat = lonlat_centre(PATCH["x_left"] + 40, PATCH["y_top"] - 40)
    cube = tmp_path / "scene.zarr"
    runner = CliRunner()
    with StacTestServer(catalog) as srv:
        res = runner.invoke(
            app,
            [
                "cube",
                "--point",
                str(lon),
                str(lat),
                "--size-m",
                "80",
                "--start",
                "2018-03-01",
                "--end",
                "2018-09-30",
                "--out",
                str(cube),
                "--catalog",
                srv.api,
                "--quiet",
            ],
        )
    assert res.exit_code == 0, res.output
    scene = open_scene(cube)
    assert scene.s2.sizes[Y] == scene.s2.sizes[X] == 8 and scene.s2.sizes[TIME] >= 6
    bundle = random_fusion_bundle(tmp_path / "fusion.pt", seed=0, preset="small")
    out = tmp_path / "emb.zarr"
    res = runner.invoke(
        app, ["embed", "--cube", str(cube), "--bundle", str(bundle), "--out", str(out), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    from stembed.io.embeddings import open_embeddings

    emb = open_embeddings(out)
    assert emb.sizes["time"] == scene.s2.sizes[TIME]
    assert (
        bool(emb["valid"].any())
        and np.isfinite(emb["embedding"].values[emb["valid"].values.nonzero()[0]]).any()
    )


# ----------------------------------------------------------------------------- resume, retries, offsets
@pytest.mark.slow
def test_interrupted_build_resumes_to_the_same_cube(
    tmp_path: Path, server: StacTestServer, built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stembed.cube_build.pieces as cb

    out = tmp_path / "cube.zarr"
    real = cb.s2_piece
    calls: list[int] = []

    def fail_second(items, *args, **kw):
        calls.append(len(items))
        if len(calls) == 2:
            raise CubeBuildError("simulated failure in the second piece")
        return real(items, *args, **kw)

    monkeypatch.setattr(cb, "s2_piece", fail_second)
    with pytest.raises(CubeBuildError, match="second piece"):
        build_cube(request(server), out, progress=False)
    no_store(out)
    staged = sorted(p.name for p in (staging_dir(out) / "pieces").iterdir())
    assert staged == ["2017-08-01_2017-12-31_s1.zarr", "2017-08-01_2017-12-31_s2.zarr"]

    monkeypatch.setattr(cb, "s2_piece", real)
    searches = server.hits("/api/search")
    res = build_cube(request(server), out, progress=False)
    assert (res.pieces_reused, res.pieces_loaded) == (2, 2)
    assert server.hits("/api/search") == searches  # the staged item lists were reused, not searched again
    a, b = open_scene(out), open_scene(built)
    for x, y in ((a.s2, b.s2), (a.s1, b.s1)):
        xr.testing.assert_identical(x.drop_attrs(), y.drop_attrs())
    assert not staging_dir(out).exists()


@pytest.mark.slow
def test_a_different_staged_build_is_not_mixed_in(
    tmp_path: Path, server: StacTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stembed.cube_build.build as cb

    out = tmp_path / "cube.zarr"
    real, calls = cb.build_piece, []

    def stop_after_one(*args, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise CubeBuildError("stop")
        return real(*args, **kw)

    small = dict(grid=patch_grid(16), start="2018-01-01", end="2018-11-30", min_dates=2)
    monkeypatch.setattr(cb, "build_piece", stop_after_one)
    with pytest.raises(CubeBuildError, match="stop"):
        build_cube(request(server, **small), out, progress=False)
    with pytest.raises(CubeBuildError, match="different settings.*--overwrite"):
        build_cube(request(server, **small | {"min_valid_fraction": 0.5}), out, progress=False)
    no_store(out)
    monkeypatch.setattr(cb, "build_piece", real)
    build_cube(request(server, **small | {"min_valid_fraction": 0.5}), out, overwrite=True, progress=False)
    assert json.loads(open_scene(out).s2.attrs["provenance"])["min_valid_fraction"] == 0.5


def test_http_5xx_are_retried(tmp_path: Path, server: StacTestServer) -> None:
    server.fail_next("/api/search", 2, 503)
    server.fail_next("/files/sentinel-2-l2a", 2, 502)
    server.fail_next("/files/sentinel-1-rtc", 1, 500)
    out = tmp_path / "cube.zarr"
    build_cube(request(server, start="2018-04-01", end="2018-08-31", min_dates=2), out, progress=False)
    assert open_scene(out).s2.sizes[TIME] >= 2
    failed = [f for f in server._faults if f[1] > 0]
    assert not failed, f"injected failures never hit: {failed}"


@pytest.mark.slow
def test_boa_offset_baseline_04(tmp_path: Path, belgian_dir: Path, times) -> None:
    """The same dates stored as baseline 04.00 with DN + 1000 give the same cube as baseline 02.06 DN."""
    s2, s1 = times["s2"][10:18], times["s1"][times["s1"] >= pd.Timestamp("2018-01-01")]
    cubes = []
    for every in (0, 1):  # 0: no item claims 04.00; 1: every item does
        root = worldcereal_stac_catalog(
            belgian_dir, tmp_path / f"cat{every}", s2_times=s2, s1_times=s1, baseline_04_every=every
        ).parent
        with StacTestServer(root) as srv:
            out = build_cube(
                request(
                    srv, grid=patch_grid(16, (20, 30)), start="2018-01-01", end="2018-11-30", min_dates=2
                ),
                tmp_path / f"cube{every}.zarr",
                progress=False,
            ).path
        cubes.append(open_scene(out).s2)
        assert json.loads(cubes[-1].attrs["provenance"])["processing_baselines"] == (
            ["04.00"] if every else ["02.06"]
        )
    xr.testing.assert_identical(cubes[0].drop_attrs(), cubes[1].drop_attrs())


def test_spurious_reproject_warning_is_hidden_and_no_other(tmp_path: Path, server: StacTestServer, monkeypatch) -> None:
    """odc-stac's threaded reprojects now and then raise rasterio's "no geotransform" warning on georeferenced
    sources (odc-geo#131); `cube` hides it from that call site only. Made deterministic here: every reproject
    raises it, attributed to rasterio.warp as rasterio does, plus one attributed elsewhere that must show."""
    import warnings

    import rasterio.warp
    from rasterio.errors import NotGeoreferencedWarning

    real = rasterio.warp.reproject
    calls = []

    def noisy(*args, **kwargs):
        calls.append(1)
        for module in ("rasterio.warp", "rasterio"):
            warnings.warn_explicit(f"Dataset has no geotransform ({module})", NotGeoreferencedWarning,
                                   rasterio.warp.__file__, 387, module=module)
        return real(*args, **kwargs)

    monkeypatch.setattr(rasterio.warp, "reproject", noisy)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_cube(request(server, grid=patch_grid(size_px=16), end="2018-03-31", min_dates=2), tmp_path / "c.zarr",
                   progress=False)
    assert calls, "the 20 m bands no longer go through rasterio.warp.reproject: this test checks nothing"
    shown = [str(w.message) for w in seen if issubclass(w.category, NotGeoreferencedWarning)]
    assert shown and all(m.endswith("(rasterio)") for m in shown), shown


# ----------------------------------------------------------------------------- errors leave no store
def test_empty_search(tmp_path: Path, server: StacTestServer) -> None:
    out = tmp_path / "cube.zarr"
    with pytest.raises(CubeBuildError, match="found no 'sentinel-2-l2a' items.*fix"):
        build_cube(request(server, start="2020-01-01", end="2020-12-31"), out, progress=False)
    no_store(out)


def test_no_s1_coverage(tmp_path: Path, server: StacTestServer) -> None:
    out = tmp_path / "cube.zarr"
    with pytest.raises(CubeBuildError, match="no S1 coverage.*sentinel-1-grd"):
        build_cube(request(server, s1_collection="sentinel-1-grd"), out, progress=False)
    with pytest.raises(CubeBuildError, match="no S1 coverage in the descending"):
        build_cube(request(server, s1_orbit="descending"), out, progress=False)
    no_store(out)


def test_period_too_short_for_a_window(tmp_path: Path, server: StacTestServer) -> None:
    out = tmp_path / "cube.zarr"
    with pytest.raises(CubeBuildError, match="too short for a window: 2 S2 acquisition dates.*--start/--end"):
        build_cube(request(server, start="2018-06-01", end="2018-07-10"), out, progress=False)
    no_store(out)


@pytest.mark.slow
def test_failed_asset_read_is_reported_not_zero_filled(
    tmp_path: Path, server: StacTestServer, catalog: Path
) -> None:
    out = tmp_path / "cube.zarr"
    victim = sorted((catalog / "sentinel-2-l2a").glob("*/B11.tif"))[-1]
    server.missing.add("/files/" + str(victim.relative_to(catalog)))
    with pytest.raises(CubeBuildError, match="reading S2 assets.*failed.*rerun"):
        build_cube(request(server), out, progress=False)
    no_store(out)
    # the 2017 piece finished and is kept for the rerun; the failing 2018 S2 piece left nothing
    assert not list((staging_dir(out) / "pieces").glob("2018*_s2.zarr"))


def test_bbox_across_two_utm_zones_picks_one_and_says_so() -> None:
    grid = utm_grid(bbox=(5.95, 50.80, 6.10, 50.85))  # 6 deg E is the 31/32 boundary; the centre is in 32
    assert grid.epsg == 32632 and "EPSG:32631" in grid.note and "EPSG:32632" in grid.note
    assert utm_grid(bbox=(3.0, 50.8, 3.01, 50.81)).note == ""
    with pytest.raises(StacError, match="W S E N"):
        utm_grid(bbox=(3.01, 50.8, 3.0, 50.81))


def test_cli_errors_are_clean(tmp_path: Path, server: StacTestServer) -> None:
    lon, lat = lonlat_centre(501_680, 5_629_360)
    out = tmp_path / "cube.zarr"
    res = CliRunner().invoke(
        app,
        [
            "cube",
            "--point",
            str(lon),
            str(lat),
            "--size-m",
            "640",
            "--start",
            "2020-01-01",
            "--end",
            "2020-03-01",
            "--out",
            str(out),
            "--catalog",
            server.api,
            "--quiet",
        ],
    )
    assert res.exit_code == 2 and "found no 'sentinel-2-l2a' items" in res.output
    no_store(out)


def test_cube_config_defaults_are_the_requests() -> None:
    """One set of defaults: a CubeConfig left as it is asks for what a bare CubeRequest does."""
    bare = CubeRequest(grid=patch_grid(8), start="2018-01-01", end="2018-12-31", site="a")
    from_config = CubeRequest(grid=bare.grid, start=bare.start, end=bare.end, site="a",
                              **shared_settings(CubeConfig()))
    assert from_config == bare


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        ("min_dates: 0\n", [], "--min-dates is 0; use at least 1"),
        ("min_dates: 0\n", ["--min-dates", "3"], "cannot open the STAC API"),  # the option wins over the file
        ("min_dates: 3\n", ["--set", "min_dates=0"], "--min-dates is 0"),  # --set wins over the file
        ("min_dates: 3\n", ["--set", "min_dates=0", "--min-dates", "4"], "cannot open the STAC API"),
        ("scl_classes: [1, 2]\ncloud_mask: my.masks:Mask\n", [], "--scl-classes only applies"),
        ("min_date: 3\n", [], "invalid CubeConfig in"),
    ],
    ids=["file", "option-over-file", "set-over-file", "option-over-set", "file-scl", "unknown-key"],
)
def test_cube_config_file_set_and_options(tmp_path: Path, config: str, args: list[str], message: str) -> None:
    """``--config`` and ``--set`` fill the shared settings; the options given win (values checked before any
    search, so the unreachable catalog is only reached when they are good)."""
    (tmp_path / "cube.yaml").write_text(config)
    out = tmp_path / "be.zarr"
    res = CliRunner().invoke(app, [
        "cube", "--bbox", "3.00", "50.80", "3.01", "50.81", "--start", "2020-03-01", "--end", "2020-10-31",
        "--out", str(out), "--catalog", "http://127.0.0.1:9/", "--retries", "0", "--quiet",
        "--config", str(tmp_path / "cube.yaml"), *args,
    ])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    no_store(out)


def test_the_shipped_cube_config_is_the_defaults() -> None:
    assert load_config(CubeConfig, Path(__file__).resolve().parents[2] / "configs" / "cube.yaml") == CubeConfig()


# ----------------------------------------------------------------------------- the search layer
def test_grid_of_the_patch_and_pieces() -> None:
    g = patch_grid()
    assert (g.epsg, g.x_left, g.y_top, g.width_px, g.height_px) == (32631, 501_360.0, 5_629_680.0, 64, 64)
    assert [p.name for p in period_pieces("2017-08-01", "2019-02-03")] == [
        "2017-08-01_2017-12-31",
        "2018-01-01_2018-12-31",
        "2019-01-01_2019-02-03",
    ]
    assert len(period_pieces("2018-01-01", "2018-12-31", months=3)) == 4


def test_recorded_planetary_computer_responses() -> None:
    """Replayed PC-shaped search pages: paging, proj:code vs proj:epsg, baselines, orbit states."""
    pages = [json.loads((DATA / f"pc_search_s2_page{i}.json").read_text()) for i in (1, 2)]
    with StacTestServer(recorded=pages) as srv:
        items = search_items(
            srv.api, "sentinel-2-l2a", (3.0, 50.8, 3.1, 50.9), "2023-06-01", "2023-06-30", policy=FAST
        )
    assert [it.id for it in items] == sorted((it.id for it in items), key=lambda i: i.split("_")[2])
    assert len(items) == 3 and srv.hits("/api/search") == 2
    assert {item_epsg(it) for it in items} == {32631}
    assert {it.properties["s2:processing_baseline"] for it in items} == {"05.09"}
    assert all("granule-metadata" in it.assets for it in items)
    s1 = json.loads((DATA / "pc_search_s1.json").read_text())
    with StacTestServer(recorded=[s1]) as srv:
        items = search_items(
            srv.api, "sentinel-1-rtc", (3.0, 50.8, 3.1, 50.9), "2023-06-01", "2023-06-30", policy=FAST
        )
    assert {it.properties["sat:orbit_state"] for it in items} == {"ascending", "descending"}
    assert is_planetary_computer("https://planetarycomputer.microsoft.com/api/stac/v1")
    assert not is_planetary_computer(srv.api)


def test_search_gives_up_with_a_clear_error(server: StacTestServer) -> None:
    server.fail_next("/api/search", 100, 503)
    with pytest.raises(StacError, match="search.*failed.*fix"):
        search_items(
            server.api, "sentinel-2-l2a", (3.0, 50.8, 3.1, 50.9), "2018-01-01", "2018-02-01", policy=FAST
        )
