"""The Python API (``stembed.embed`` & co.): light to import, the command line's checks and errors, and the
command line's bits for an in-memory scene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

import stembed
from stembed.cli import app
from stembed.config import ConfigError
from stembed.contract import CubeError, Scene
from stembed.errors import UserError
from stembed.io.cube import save_scene
from stembed.testing import random_fusion_bundle, synthetic_scene

# 9 tiles on the 12 x 12 px scene, as tests/inference/test_embed.py
SETTINGS: dict[str, Any] = {"tile_px": 5, "batch_size": 64}


@pytest.fixture(scope="module")
def scene() -> Scene:
    return synthetic_scene(seed=3, height_px=12, width_px=12, n_days=60)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, scene: Scene) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("api")
    return {"cube": save_scene(scene, d / "scene.zarr"), "bundle": random_fusion_bundle(d / "fusion.pt", tiny=True),
            "dir": d}


@pytest.fixture(scope="module")
def cli_store(files: dict[str, Path]) -> xr.Dataset:
    """``stembed embed`` on the scene store, as a user types it (its default local cluster)."""
    out = files["dir"] / "cli.zarr"
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    r = CliRunner().invoke(app, ["embed", "--cube", str(files["cube"]), "--bundle", str(files["bundle"]),
                                 "--out", str(out), "--quiet", *sets])
    assert r.exit_code == 0, r.output
    return stembed.open_embeddings(out).load()


def same(a: xr.Dataset, b: xr.Dataset) -> None:
    assert np.array_equal(a["embedding"].values, b["embedding"].values, equal_nan=True)
    np.testing.assert_array_equal(a["valid"].values, b["valid"].values)
    for dim in ("time", "feature", "y", "x"):
        np.testing.assert_array_equal(a[dim].values, b[dim].values)


def test_import_stembed_loads_neither_torch_nor_dask() -> None:
    code = ("import sys, stembed; stembed.open_scene; "
            "print(sorted(m for m in ('torch', 'dask', 'distributed', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_and_the_public_names() -> None:
    from importlib.metadata import version

    assert stembed.__version__ == version("stembed")
    assert set(stembed.__all__) == {"__version__", "embed", "embed_store", "extend_store", "load_bundle", "open_embeddings",
                                    "open_run", "open_scene", "save_scene"}
    for name in stembed.__all__:
        assert getattr(stembed, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'embd'"):
        stembed.embd  # noqa: B018


def test_in_memory_scene_equals_the_cli_on_its_store_bit_for_bit(
    scene: Scene, files: dict[str, Path], cli_store: xr.Dataset
) -> None:
    """A Scene, a Dataset of its cubes, and the store path, embedded in memory, give the CLI's store bit for bit."""
    from_scene = stembed.embed(scene, files["bundle"], **SETTINGS)
    same(from_scene, cli_store)
    as_dataset = xr.Dataset({"s2": scene.s2, "s1": scene.s1})  # xarray aligns dates and bands of the two
    same(stembed.embed(as_dataset, stembed.load_bundle(files["bundle"]), **SETTINGS), cli_store)
    same(stembed.embed(files["cube"], files["bundle"], **SETTINGS), cli_store)
    assert from_scene["valid"].any() and not from_scene["valid"].all()  # clouds: NaN where not observed
    assert from_scene.rio.crs is not None and from_scene.attrs["crs"] == cli_store.attrs["crs"]


def test_embed_to_a_store_is_the_cli_run(files: dict[str, Path], cli_store: xr.Dataset) -> None:
    out = files["dir"] / "api.zarr"
    ds = stembed.embed(files["cube"], files["bundle"], out, **SETTINGS)
    same(ds.load(), cli_store)
    assert ds.attrs["fingerprint"] == cli_store.attrs["fingerprint"]
    with pytest.raises(FileExistsError, match="--resume"):  # the CLI's message, word for word
        stembed.embed(files["cube"], files["bundle"], out, **SETTINGS)


def test_the_cli_checks_and_messages(scene: Scene, files: dict[str, Path]) -> None:
    """Bad input gets the command line's error: same class, same message (the scene named instead of its path)."""
    short = synthetic_scene(seed=3, height_px=12, width_px=12, n_days=8)
    path = save_scene(short, files["dir"] / "short.zarr")
    r = CliRunner().invoke(app, ["embed", "--cube", str(path), "--bundle", str(files["bundle"]),
                                 "--out", str(files["dir"] / "short_emb.zarr"), "--quiet"])
    assert r.exit_code == 2 and "too short in time" in r.output
    with pytest.raises(CubeError) as from_store:
        stembed.embed(path, files["bundle"])
    assert str(from_store.value) in " ".join(r.output.split())
    with pytest.raises(CubeError) as in_memory:
        stembed.embed(short, files["bundle"])
    assert str(in_memory.value) == str(from_store.value).replace(str(path), f"the scene {short.site!r}")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda s, b: stembed.embed(xr.Dataset({"s2": s.s2}), b), CubeError, "no s1 variable"),
        (lambda s, b: stembed.embed(xr.Dataset({"s2": s.s2.transpose("time", "y", "x", "band"), "s1": s.s1}), b),
         CubeError, r"fix: ds\['s2'\].transpose"),
        (lambda s, b: stembed.embed(s.s2, b), TypeError, "xr.Dataset"),
        (lambda s, b: stembed.embed(s, b, "out.zarr"), UserError, "save_scene"),
        (lambda s, b: stembed.embed(s, b, resume=True), UserError, "out=PATH"),
        (lambda s, b: stembed.embed(s, b, dtype="int8"), UserError, "out=PATH"),
        (lambda s, b: stembed.embed(s, b, tile_pix=4), ConfigError, "tile_pix"),
        (lambda s, b: stembed.embed(s, b, features=3), UserError, "--features"),
        (lambda s, b: stembed.embed(s, "pretrained:nowhere"), UserError, "pretrained:belgium"),
    ],
    ids=["no-s1", "dims", "not-a-scene", "scene-with-out", "resume-in-memory", "dtype-in-memory",
         "unknown-setting", "features", "unknown-pretrained"],
)
def test_bad_input_is_one_clear_error(scene: Scene, files: dict[str, Path], call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(scene, files["bundle"])


def test_daily_in_memory_has_a_flag_per_value(scene: Scene, files: dict[str, Path]) -> None:
    ds = stembed.embed(scene, files["bundle"], daily=True, **SETTINGS)
    days = scene.s2.time.values.astype("datetime64[D]")
    n_days = int((days[-1] - days[0]) / np.timedelta64(1, "D")) + 1
    assert ds.sizes["time"] == n_days and ds["flag"].dtype == np.uint8
    assert set(np.unique(ds["flag"].values)) <= {0, 1, 3}  # none, observed, linear: no gap-fill layers here
    observed = ds["flag"].values == 1
    np.testing.assert_array_equal(observed, ds["valid"].values & observed)


@pytest.mark.slow
def test_the_dense_builtin_bundle_in_memory_equals_the_cli(tmp_path: Path) -> None:
    """A dense bundle's sums round by thread count: the in-memory run takes the threads a one-worker CLI run
    gives its worker, so the bits agree here too (``pretrained:belgium``, 4 tiles of the 26 x 26 px scene)."""
    scene = synthetic_scene(seed=1, height_px=26, width_px=26, n_days=60)
    path = save_scene(scene, tmp_path / "scene.zarr")
    r = CliRunner().invoke(app, ["embed", "--cube", str(path), "--bundle", "pretrained:belgium", "--out",
                                 str(tmp_path / "emb.zarr"), "--quiet", "--set", "tile_px=16"])
    assert r.exit_code == 0, r.output
    same(stembed.embed(scene, "pretrained:belgium", tile_px=16), stembed.open_embeddings(tmp_path / "emb.zarr"))
