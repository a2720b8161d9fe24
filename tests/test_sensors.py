"""Companion sensors: the registry, the AgERA5 sensor on the real Belgian patch, scenes and data plumbing."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stembed import sensors
from stembed.config import (
    AEStageConfig,
    ConfigError,
    DataConfig,
    SyntheticSource,
    WorldCerealSource,
    ae_preset,
    load_config,
)
from stembed.data.build import matched_arrays, matched_s1_arrays, sensor_arrays
from stembed.data.sampling import SamplingError
from stembed.data.scenes import load_scenes
from stembed.errors import UserError
from stembed.io.agera5 import AGERA5, RANGES, agera5_cube, load_agera5
from stembed.io.cube import CubeError, Scene, open_scene, save_scene, validate_cube
from stembed.sensors import SensorError, SensorPlugin, SensorSpec, get_plugin, get_sensor, register_sensor
from stembed.testing import synthetic_scene, toy_sensor_plugin

AGERA5_SHA256 = "2fd17353d92f83a76cc9a0a5bfd70d7182341affd5e08c13bc789e50defabfdb"  # PROVENANCE.md


@pytest.fixture
def registry() -> Iterator[None]:
    """Restore the global sensor registry after a test that registers sensors."""
    plugins, specs = dict(sensors.PLUGINS), dict(sensors.SENSORS)
    yield
    sensors.PLUGINS.clear()
    sensors.PLUGINS.update(plugins)
    sensors.SENSORS.clear()
    sensors.SENSORS.update(specs)


@pytest.fixture
def toy(registry: None) -> SensorPlugin:
    plugin = toy_sensor_plugin()
    register_sensor(plugin)
    return plugin


@pytest.fixture(scope="module")
def belgian_agera5(belgian_scene: Scene, belgian_dir: Path) -> xr.DataArray:
    return load_agera5(belgian_scene, belgian_dir)


def raw_agera5(folder: Path, var: str) -> tuple[np.ndarray, pd.DatetimeIndex]:
    """One variable of the AgERA5 file as stored (no masking), read with netCDF4, and its days."""
    (path,) = folder.glob("AgERA5_DAILY_*.nc")
    with netCDF4.Dataset(path) as nc:
        nc.set_auto_maskandscale(False)
        values = np.asarray(nc.variables[var][...], dtype=np.float64).reshape(-1)
        t = nc.variables["timestamp"]
        stamps = np.asarray(netCDF4.num2date(t[:], t.units, only_use_cftime_datetimes=False))
    return values, pd.to_datetime([s.isoformat() for s in stamps])


# ----------------------------------------------------------------------------- registry
def test_registry_refuses_core_reserved_duplicate_and_non_plugins(registry: None) -> None:
    toy = toy_sensor_plugin()
    for name in ("s1", "s2", "labels", "Bad-Name"):
        with pytest.raises(SensorError, match="fix:"):
            register_sensor(dataclasses.replace(toy, spec=dataclasses.replace(toy.spec, name=name)))
    with pytest.raises(SensorError, match="SensorPlugin"):
        register_sensor(toy.spec)  # type: ignore[arg-type]
    register_sensor(toy)
    register_sensor(toy_sensor_plugin())  # the same definition again: a no-op
    bigger = dataclasses.replace(toy, latent_dim=5)
    with pytest.raises(SensorError, match="already registered.*replace=True"):
        register_sensor(bigger)
    register_sensor(bigger, replace=True)
    assert get_plugin("toy").latent_dim == 5 and get_sensor("toy") is toy.spec
    with pytest.raises(SensorError, match="latent_dim"):
        dataclasses.replace(toy, latent_dim=0)


def test_unknown_names_give_errors_listing_sensors_and_how_to_register() -> None:
    with pytest.raises(SensorError) as e:
        get_plugin("nope")
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert "'nope'" in msg and "agera5" in msg and "s1" in msg and "import stembed.io.agera5" in msg
    with pytest.raises(SensorError, match="unknown sensor 'nope'"):
        get_sensor("nope")
    with pytest.raises(SensorError, match="built into the pipeline"):
        get_plugin("s1")
    assert get_sensor("s1") is sensors.S1  # the old lookups keep working


def test_sensors_module_stays_import_light() -> None:
    code = "import sys, stembed.sensors; print([m for m in ('xarray', 'torch', 'numpy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_builtin_agera5_is_found_without_importing_it_first() -> None:
    # a fresh interpreter, in which nothing has imported stembed.io.agera5 yet
    code = "from stembed.sensors import get_plugin as g; p = g('agera5'); print(p.spec.n_bands, p.latent_dim)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["8", "3"]


def test_config_accepts_plugins_and_lists_known_sensors() -> None:
    ae = ae_preset("tiny", "agera5")
    assert (ae.sensor, ae.in_channels, ae.latent_dim, ae.reduced_tokens) == ("agera5", 8, 3, 6)
    assert ae.stem_channels == ae_preset("tiny", "s2").stem_channels  # the preset's sizes
    cfg = load_config(AEStageConfig, None, ["sensor=agera5", "preset=tiny"])
    assert cfg.resolved_model().in_channels == 8
    assert cfg.resolved_loss().mae == 1.0 and cfg.resolved_loss().sam == 0.0
    assert cfg.data.resolved_sampling("agera5") == cfg.data.resolved_sampling("s2")
    with pytest.raises(ConfigError, match=r"unknown sensor 'nope'.*agera5"):
        load_config(AEStageConfig, None, ["sensor=nope"])
    with pytest.raises(ValueError, match="unknown sensor 'nope'"):
        ae_preset("tiny", "nope")
    assert load_config(DataConfig, None, ["extra_sensors=[agera5]"]).extra_sensors == ("agera5",)


# ----------------------------------------------------------------------------- AgERA5 on the Belgian patch
def test_agera5_cube_contract_and_range(belgian_agera5: xr.DataArray, belgian_scene: Scene) -> None:
    c = belgian_agera5
    validate_cube(c, AGERA5)
    assert c.dims == ("time", "band", "y", "x") and c.dtype == np.float32
    assert c.sizes == {"time": 487, "band": 8, "y": 64, "x": 64}
    assert list(c["band"].values) == list(AGERA5.bands)
    np.testing.assert_array_equal(c["y"].values, belgian_scene.s2["y"].values)
    np.testing.assert_array_equal(c["x"].values, belgian_scene.s2["x"].values)
    assert c.attrs["sensor"] == "agera5" and c.attrs["site"] == belgian_scene.site
    assert c.attrs["crs"] == belgian_scene.s2.attrs["crs"]
    v = c.values
    finite = v[np.isfinite(v)]
    assert finite.min() >= 0.0 and finite.max() <= 1.0
    assert np.isnan(v[:9]).all() and np.isfinite(v[9:]).all()  # the first 9 days lack a full 10-day window
    assert (v == v[:, :, :1, :1]).all(axis=(2, 3))[9:].all()  # one weather cell for every pixel
    prov = json.loads(c.attrs["provenance"])
    assert list(prov["files"].values()) == [AGERA5_SHA256]
    assert prov["preprocessing"] == AGERA5.normalisation and "10-day mean" in AGERA5.normalisation


def test_agera5_ten_day_mean_by_hand(belgian_agera5: xr.DataArray, belgian_dir: Path) -> None:
    var, _, lo, hi = RANGES["PRECIP"]
    raw, days = raw_agera5(belgian_dir, var)
    day = pd.Timestamp("2018-05-20")
    i = days.get_loc(day)
    expected = (raw[i - 9 : i + 1].mean() - lo) / (hi - lo)
    got = belgian_agera5.sel(time=day, band="PRECIP").values
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    tvar, _, tlo, thi = RANGES["TMAX"]
    traw, _ = raw_agera5(belgian_dir, tvar)
    np.testing.assert_allclose(
        belgian_agera5.sel(time=day, band="TMAX").values[0, 0],
        (traw[i - 9 : i + 1].mean() - tlo) / (thi - tlo),
        rtol=1e-5,
    )


def test_agera5_missing_day_blanks_the_ten_windows_that_contain_it(
    belgian_scene: Scene, belgian_dir: Path, tmp_path: Path
) -> None:
    (src,) = belgian_dir.glob("AgERA5_DAILY_*.nc")
    folder = tmp_path / "site"
    folder.mkdir()
    with xr.open_dataset(src, mask_and_scale=False) as ds:
        ds = ds.load()
    for v in ds.variables.values():
        v.attrs.pop("bounds", None)  # xarray reads a variable's "bounds" as CF cell bounds when writing
    ds["wind_speed"].values[200, 0, 0] = -9999.0
    ds.to_netcdf(folder / src.name)
    c = agera5_cube(folder / src.name, belgian_scene).isel(y=0, x=0)
    wind = c.sel(band="WIND").values
    assert np.isnan(wind[200:210]).all() and np.isfinite(wind[[199, 210]]).all()
    assert np.isfinite(c.sel(band="TMEAN").values[200:210]).all()  # only that band's windows


def test_agera5_loader_errors_name_the_file_and_fix(
    belgian_scene: Scene, belgian_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(CubeError, match=r"AgERA5_DAILY_\*\.nc next to the WorldCereal.*fix:"):
        load_agera5(belgian_scene, None)
    with pytest.raises(CubeError, match="no file matching"):
        load_agera5(belgian_scene, tmp_path)
    (src,) = belgian_dir.glob("AgERA5_DAILY_*.nc")
    shutil.copy(src, tmp_path / src.name)
    shutil.copy(src, tmp_path / src.name.replace(".nc", "_copy.nc"))
    with pytest.raises(CubeError, match="several files"):
        load_agera5(belgian_scene, tmp_path)
    elsewhere = synthetic_scene(seed=0, height_px=16, width_px=16, n_days=60)  # same UTM zone, 100 km away
    with pytest.raises(CubeError, match="not inside the area"):
        agera5_cube(src, elsewhere)


def test_agera5_matches_each_s2_date_to_its_utc_day(
    belgian_scene: Scene, belgian_agera5: xr.DataArray
) -> None:
    scene = dataclasses.replace(belgian_scene, sensors={**belgian_scene.sensors, "agera5": belgian_agera5})
    m = matched_arrays(scene, "agera5", get_plugin("agera5").match_max_gap_days)
    s2_days = sensor_arrays(scene, "s2").days
    assert m.values.shape == (belgian_scene.s2.sizes["time"], 8, 64, 64)
    np.testing.assert_array_equal(m.days, s2_days)
    assert np.isfinite(m.values).all()  # every S2 date has 9 AgERA5 days before it
    own = sensor_arrays(scene, "agera5")
    i = np.searchsorted(own.days, s2_days[5])
    np.testing.assert_array_equal(m.values[5], own.values[i])


# ----------------------------------------------------------------------------- scenes
def test_scene_with_agera5_round_trips_through_zarr(
    belgian_scene: Scene, belgian_agera5: xr.DataArray, tmp_path: Path
) -> None:
    scene = dataclasses.replace(belgian_scene, sensors={**belgian_scene.sensors, "agera5": belgian_agera5})
    scene.validate()
    path = save_scene(scene, tmp_path / "scene.zarr")
    assert (path / "agera5").is_dir()
    back = open_scene(path)
    assert list(back.extra) == ["agera5"]
    xr.testing.assert_identical(back.extra["agera5"].load(), belgian_agera5)
    xr.testing.assert_identical(back.s1.load(), belgian_scene.s1)


def test_open_scene_without_extras_and_with_an_unregistered_sensor(toy: SensorPlugin, tmp_path: Path) -> None:
    plain = synthetic_scene(seed=1, height_px=16, width_px=16, n_days=60)
    old = save_scene(plain, tmp_path / "old.zarr")
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["extra_sensors"]  # a store written before companion sensors existed
    (old / "zarr.json").write_text(json.dumps(meta))
    assert open_scene(old).extra == {}
    scene = dataclasses.replace(plain, sensors={**plain.sensors, "toy": toy.load(plain, None)})
    path = save_scene(scene, tmp_path / "toy.zarr")
    assert open_scene(path).extra["toy"].sizes["band"] == 2
    del sensors.PLUGINS["toy"], sensors.SENSORS["toy"]
    with pytest.raises(CubeError, match=r"\['toy'\].*import the module that registers it"):
        open_scene(path)


def test_scene_validate_checks_extra_cubes(toy: SensorPlugin) -> None:
    scene = synthetic_scene(seed=2, height_px=16, width_px=16, n_days=60)
    cube = toy.load(scene, None)
    for bad, pattern in [
        ({"toy": cube.isel(x=slice(0, 8))}, "toy grid is 16x8 px but S2 is 16x16 px"),
        ({"toy": cube.assign_attrs(site="elsewhere")}, "site"),
        ({"nope": cube}, "no sensor of that name is registered"),
        ({"toy": cube * 3}, "outside the valid range"),
    ]:
        with pytest.raises(CubeError, match=pattern):
            dataclasses.replace(scene, sensors={**scene.sensors, **bad}).validate()
    # keyed scenes cannot hold s1 twice; the separate-cubes constructor refuses s1 among the companions
    with pytest.raises(CubeError, match="Scene.extra holds a 's1' cube"):
        Scene.from_cubes(scene.site, s2=scene.s2, s1=scene.s1, extra={"s1": scene.s1}).validate()


def test_load_scenes_adds_agera5_to_worldcereal_sites(
    belgian_dir: Path, belgian_agera5: xr.DataArray
) -> None:
    cfg = DataConfig(source=WorldCerealSource(paths=(str(belgian_dir),)), extra_sensors=("agera5",))
    (scene,) = load_scenes(cfg)
    xr.testing.assert_identical(scene.extra["agera5"], belgian_agera5)


def test_load_scenes_with_the_toy_sensor_on_synthetic_data(toy: SensorPlugin) -> None:
    cfg = DataConfig(
        source=SyntheticSource(n_sites=2, height_px=24, width_px=24, n_days=120), extra_sensors=("toy",)
    )
    a, b = load_scenes(cfg)
    again = load_scenes(cfg)[0]
    for scene in (a, b):
        cube = scene.extra["toy"]
        assert cube.attrs["site"] == scene.site and cube.sizes["time"] > scene.s2.sizes["time"]
        assert float(cube.std(dim=("y", "x")).mean()) > 0.01  # varies in space, not only in time
    np.testing.assert_array_equal(a.extra["toy"].values, again.extra["toy"].values)  # seeded
    assert not np.allclose(a.extra["toy"].values[:20], b.extra["toy"].values[:20], equal_nan=True)
    m = matched_arrays(a, "toy", toy.match_max_gap_days)
    assert m.values.shape == (a.s2.sizes["time"], 2, 24, 24)
    s1 = matched_s1_arrays(a, cfg.s1_max_gap_days)  # the S1 path is unchanged
    assert s1.values.shape == (a.s2.sizes["time"], 2, 24, 24)
    with pytest.raises(SamplingError, match="add 'agera5' to data.extra_sensors"):
        sensor_arrays(a, "agera5")


def test_load_scenes_rejects_unknown_and_folderless_sensors() -> None:
    src = SyntheticSource(n_sites=1, height_px=16, width_px=16, n_days=60)
    with pytest.raises(SensorError, match=r"unknown sensor 'nope'.*import the module that registers it"):
        load_scenes(DataConfig(source=src, extra_sensors=("nope",)))
    with pytest.raises(CubeError, match="no source folder.*data.source.kind: worldcereal"):
        load_scenes(DataConfig(source=src, extra_sensors=("agera5",)))


def test_a_custom_sensor_registers_without_touching_s1_s2_code(registry: None) -> None:
    spec = SensorSpec(
        name="ndvi_only", bands=("NDVI",), valid_range=(0.0, 1.0), normalisation="(NDVI + 1) / 2"
    )

    def load(scene: Scene, folder: Path | None) -> xr.DataArray:
        s2 = scene.s2
        nir, red = s2.sel(band="B08"), s2.sel(band="B04")
        ndvi = ((nir - red) / (nir + red + 1e-6) + 1) / 2
        return (
            ndvi.expand_dims(band=["NDVI"], axis=1)
            .clip(0, 1)
            .astype("float32")
            .assign_attrs({**s2.attrs, "sensor": "ndvi_only"})
            .rename("ndvi_only")
        )

    register_sensor(
        SensorPlugin(spec=spec, latent_dim=1, reduced_tokens=3, match_max_gap_days=0.0, load=load)
    )
    (scene,) = load_scenes(
        DataConfig(
            source=SyntheticSource(n_sites=1, height_px=16, width_px=16, n_days=60),
            extra_sensors=("ndvi_only",),
        )
    )
    assert ae_preset("small", "ndvi_only").in_channels == 1
    m = matched_arrays(scene, "ndvi_only", 0.0)
    np.testing.assert_array_equal(m.values, sensor_arrays(scene, "ndvi_only").values)


# ----------------------------------------------------------------------------- no "s1"/"s2" outside the registry
SRC = Path(sensors.__file__).parent
# Where "s1"/"s2" may be written out: the registry, the configs' defaults and presets, code about one of the two
# sensors, the bundle format from before sensors were keyed, and the user's commands. Everywhere else the code asks
# stembed.sensors (ANCHOR, PAIRED, CORE_SENSORS, SCENE_SENSORS, companions). file -> its top-level names that may
# hold them (None: the whole file).
SENSOR_LITERALS_ALLOWED: dict[str, set[str] | None] = {
    "sensors.py": None,  # the registry
    "config.py": None,  # config defaults, the presets, the old config keys
    "cli.py": None,  # the commands `stembed train s1` and `stembed train s2`
    "cube_build/build.py": None,  # S2 and S1 from their STAC collections
    "cube_build/pieces.py": None,  # (S2's cloud mask)
    "cube_build/extend.py": None,  # a store's S2 and S1 grown from their STAC collections, as build.py builds them
    "io/worldcereal.py": None,  # WorldCereal's S2 and S1 files
    "data/synthetic.py": None,  # the synthetic S2 and S1 cubes
    "contract.py": {"value_problems", "validate_pair"},  # S2 DN and S1 dB hints; the S1-S2 pair
    "data/build.py": {"matched_s1_arrays"},
    "preprocess/prepare.py": {"match_s1_to_s2"},
    "models/bundle.py": {"_NAMES", "_upgrade_fusion_config"},  # display names; bundles before sensors were keyed
    "demo.py": {"demo_configs"},  # the demo's own settings for each sensor
}


def _top_level_name(node: ast.stmt) -> str:
    """A module's top-level def or class name, or the name a top-level assignment binds ("" for other statements)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name
    if isinstance(node, ast.Assign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return next((t.id for t in targets if isinstance(t, ast.Name)), "")
    return ""


def sensor_literals(path: Path) -> list[tuple[str, int]]:
    """(top-level name, line) of every string constant "s1" or "s2" in a module (docstrings and messages that
    mention them inside longer text do not count)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        (_top_level_name(stmt), node.lineno)
        for stmt in tree.body
        for node in ast.walk(stmt)
        if isinstance(node, ast.Constant) and node.value in ("s1", "s2")
    ]


def test_sensor_names_come_from_the_registry() -> None:
    """Generic code names no sensor: a literal "s1"/"s2" outside the allow-list is one the registry can say."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        allowed = SENSOR_LITERALS_ALLOWED.get(path.relative_to(SRC).as_posix(), set())
        if allowed is None:
            continue
        found += [f"{path.relative_to(SRC)}:{line} ({name or 'module'})"
                  for name, line in sensor_literals(path) if name not in allowed]
    assert not found, (
        f"{len(found)} literal sensor names outside the registry: {found}; fix: use stembed.sensors (ANCHOR, "
        "PAIRED, CORE_SENSORS, SCENE_SENSORS, companions), or add the file or function to SENSOR_LITERALS_ALLOWED "
        "if the code is about that one sensor"
    )
    assert all((SRC / f).is_file() for f in SENSOR_LITERALS_ALLOWED), "an allowed file no longer exists"


def test_sensor_literal_count_sees_constants_only(tmp_path: Path) -> None:
    code = 'def f(k):\n    """Use "s1" here."""\n    return k == "s2" or f"{k}" == "s1_time"\nX = {"s1": 1}\n'
    (tmp_path / "m.py").write_text(code)
    assert sensor_literals(tmp_path / "m.py") == [("f", 3), ("X", 4)]
