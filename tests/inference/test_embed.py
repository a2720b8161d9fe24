"""``stembed embed``: tiled, resumable, on dask.distributed, equal to the per-patch reference."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from stembed.cli import app
from stembed.config import EmbedConfig
from stembed.inference.reference import embed_reference
from stembed.inference.run import embed_cube
from stembed.io.cube import CubeError, Scene, cube_transform, save_scene
from stembed.io.embeddings import EmbeddingStoreError, feature_var, open_embeddings, read_attrs
from stembed.models.bundle import load_bundle
from stembed.sensors import S1, S2
from stembed.testing import random_fusion_bundle, synthetic_scene

BATCH = 64


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime: equal snapshots mean nothing was written."""
    if path.is_file():
        st = path.stat()
        return {str(path): (st.st_size, st.st_mtime_ns)}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


def values(out: Path) -> tuple[np.ndarray, np.ndarray]:
    ds = open_embeddings(out)
    return ds["embedding"].values, ds["valid"].values


@pytest.fixture(scope="module")
def scene() -> Scene:
    return synthetic_scene(seed=3, height_px=12, width_px=12, n_days=60)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, scene: Scene) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("embed")
    return {
        "cube": save_scene(scene, d / "scene.zarr"),
        "bundle": random_fusion_bundle(d / "fusion.pt", seed=0, tiny=True),
        "dir": d,
    }


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """A 2-worker local cluster shared by the tests (starting one costs seconds)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def untiled(files: dict[str, Path], scheduler: str) -> Path:
    """One tile covering the whole cube."""
    out = files["dir"] / "untiled.zarr"
    embed_cube(
        files["cube"],
        files["bundle"],
        out,
        EmbedConfig(tile_px=12, batch_size=BATCH),
        scheduler=scheduler,
        progress=False,
    )
    return out


def _embed_cli(
    files: dict[str, Path], out: Path, *extra: str, cube: Path | None = None, bundle: Path | None = None
) -> tuple[int, str]:
    r = CliRunner().invoke(
        app,
        [
            "embed",
            "--cube",
            str(cube or files["cube"]),
            "--bundle",
            str(bundle or files["bundle"]),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ],
    )
    return r.exit_code, r.output


def test_tiled_equals_untiled_and_the_reference_bit_for_bit(
    files: dict[str, Path], scheduler: str, untiled: Path, scene: Scene
) -> None:
    out = files["dir"] / "tiled.zarr"
    res = embed_cube(
        files["cube"],
        files["bundle"],
        out,
        EmbedConfig(tile_px=5, batch_size=BATCH),
        scheduler=scheduler,
        progress=False,
    )
    assert res.tiles_written == 9 and res.tiles_skipped == 0
    emb, valid = values(out)
    emb0, valid0 = values(untiled)
    np.testing.assert_array_equal(valid, valid0)
    assert np.array_equal(emb, emb0, equal_nan=True)
    ref = embed_reference(scene, load_bundle(files["bundle"]), batch_size=BATCH)
    assert np.array_equal(emb, ref["embedding"].values, equal_nan=True)
    # every pixel and date with an observed S2 centre, border and first/last dates included
    centre_ok = np.isfinite(scene.s2.values).any(axis=1)
    np.testing.assert_array_equal(valid, centre_ok)
    for t in (0, 1, -2, -1):
        assert valid[t].any() and (valid[t] == centre_ok[t]).all()
    assert valid[:, 0, :].any() and valid[:, -1, :].any() and valid[:, :, 0].any() and valid[:, :, -1].any()


@pytest.mark.slow
def test_two_workers_equal_one_and_the_cli_default_cluster(files: dict[str, Path], untiled: Path) -> None:
    one, two = files["dir"] / "one_worker.zarr", files["dir"] / "two_workers.zarr"
    for out, workers in ((one, "1"), (two, "2")):
        code, msg = _embed_cli(files, out, "--workers", workers, "--set", "tile_px=5", "--set", f"batch_size={BATCH}")
        assert code == 0, msg
        assert "9 tiles written" in msg
    e1, v1 = values(one)
    e2, v2 = values(two)
    assert np.array_equal(e1, e2, equal_nan=True) and np.array_equal(v1, v2)
    assert np.array_equal(e1, values(untiled)[0], equal_nan=True)


@pytest.mark.slow
def test_embeddings_do_not_depend_on_the_batch_size(
    files: dict[str, Path], scheduler: str, untiled: Path
) -> None:
    out = files["dir"] / "batch7.zarr"
    embed_cube(
        files["cube"],
        files["bundle"],
        out,
        EmbedConfig(tile_px=12, batch_size=7),
        scheduler=scheduler,
        progress=False,
    )
    e7, v7 = values(out)
    e64, v64 = values(untiled)
    np.testing.assert_array_equal(v7, v64)
    # other batch shapes round differently in float32 (module docstring of stembed.inference.engine)
    np.testing.assert_allclose(e7, e64, rtol=0, atol=1e-6)


def test_store_attributes_chunks_and_georeference(
    files: dict[str, Path], untiled: Path, scene: Scene
) -> None:
    out = files["dir"] / "tiled.zarr"
    if not out.exists():
        pytest.fail(
            "run after test_tiled_equals_untiled_and_the_reference_bit_for_bit (it writes tiled.zarr)"
        )
    ds = open_embeddings(out)
    a = ds.attrs
    assert a["complete"] is True and a["crs"] == scene.s2.attrs["crs"]
    assert a["transform"] == list(cube_transform(scene.s2))
    assert a["features"] == [f"E{i}" for i in range(1, 8)] and list(ds["feature"].values) == a["features"]
    assert a["bundle"]["sha256"] == a["fingerprint"]["bundle_sha256"] and len(a["bundle"]["sha256"]) == 64
    assert a["config"]["tile_px"] == 5 and a["input"]["site"] == scene.site
    assert a["input"]["s2_provenance"] == scene.s2.attrs["provenance"]
    assert ds.rio.crs.to_epsg() == int(scene.s2.attrs["crs"].split(":")[1])
    assert list(ds.rio.transform())[:6] == [
        10.0,
        0.0,
        cube_transform(scene.s2)[0],
        0.0,
        -10.0,
        cube_transform(scene.s2)[3],
    ]
    g = zarr.open_group(out, mode="r")
    embedding, valid = g["embedding"], g["valid"]
    assert isinstance(embedding, zarr.Array) and isinstance(valid, zarr.Array)
    assert embedding.chunks == (min(16, scene.s2.sizes["time"]), 7, 5, 5)
    assert valid.chunks[1:] == (5, 5)
    np.testing.assert_array_equal(ds["time"].values, scene.s2["time"].values)
    np.testing.assert_array_equal(ds["x"].values, scene.s2["x"].values)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_compact_storage_error_is_measured_and_recorded(
    files: dict[str, Path], scheduler: str, untiled: Path, dtype: Literal["int8", "float16"]
) -> None:
    out = files["dir"] / f"{dtype}.zarr"
    res = embed_cube(
        files["cube"],
        files["bundle"],
        out,
        EmbedConfig(tile_px=6, batch_size=BATCH, dtype=dtype),
        scheduler=scheduler,
        progress=False,
    )
    g = zarr.open_group(out, mode="r")
    e1 = g[feature_var("E1")]
    assert "embedding" not in g  # CF: one variable per feature
    assert isinstance(e1, zarr.Array) and str(e1.dtype) == dtype
    emb, valid = values(out)
    exact, valid0 = values(untiled)
    np.testing.assert_array_equal(valid, valid0)
    assert np.array_equal(np.isnan(emb), np.isnan(exact))
    err = np.abs(emb - exact).transpose(1, 0, 2, 3).reshape(7, -1)
    measured = np.nanmax(err, axis=1)
    recorded = read_attrs(out)["storage_error"]
    assert recorded == res.storage_error and recorded["dtype"] == dtype
    # the store decodes codes in float32 (eps 6e-8 at the embedding's ~0.5), the record in float64
    np.testing.assert_allclose(recorded["max_abs"], measured, rtol=1e-5, atol=2e-7)
    np.testing.assert_allclose(recorded["rmse"], np.sqrt(np.nanmean(err**2, axis=1)), rtol=1e-4, atol=1e-8)
    assert recorded["n_values_per_feature"] == int(valid.sum())
    spread = np.nanmax(exact, axis=(0, 2, 3)) - np.nanmin(exact, axis=(0, 2, 3))
    # int8: half a step of 254 over 1.5x the range; float16: ~1e-3 relative
    bound = spread * 1.5 / 254 / 2 * 1.01 if dtype == "int8" else np.maximum(spread, 1e-3) * 2e-3
    assert (measured <= bound + 1e-7).all() and (measured > 0).any()


def _start_embed(files: dict[str, Path], out: Path, tile_px: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "stembed.cli",
        "embed",
        "--cube",
        str(files["cube"]),
        "--bundle",
        str(files["bundle"]),
        "--out",
        str(out),
        "--workers",
        "1",
        "--set",
        f"tile_px={tile_px}",
        "--set",
        f"batch_size={BATCH}",
        "--set",
        "threads_per_worker=1",  # what the resume on the shared 1-thread cluster uses
        "--quiet",
    ]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _n_done(out: Path) -> int:
    """Tiles flagged done, by counting the flag's chunk files (chunks still at the fill value are absent)."""
    c = out / "tile_done" / "c"
    return sum(1 for p in c.rglob("*") if p.is_file()) if c.exists() else 0


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result_and_a_rerun_writes_nothing(
    files: dict[str, Path], scheduler: str, untiled: Path
) -> None:
    out = files["dir"] / "killed.zarr"
    total = 16  # 12 x 12 px in 3 px tiles
    proc = _start_embed(files, out, tile_px=3)
    deadline = time.monotonic() + 120
    try:
        while _n_done(out) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"embed ended or stalled before it could be killed: {proc.communicate()[0][-2000:]!r}"
                )
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: main process and its dask workers
        proc.wait()
    done_at_kill = _n_done(out)
    assert 2 <= done_at_kill < total, (
        f"{done_at_kill} tiles done when killed; the test needs an unfinished run"
    )
    with pytest.raises(EmbeddingStoreError, match="unfinished embedding run"):
        open_embeddings(out)

    res = embed_cube(
        files["cube"],
        files["bundle"],
        out,
        EmbedConfig(tile_px=3, batch_size=BATCH, threads_per_worker=1),
        resume=True,
        scheduler=scheduler,
        progress=False,
    )
    assert res.tiles_skipped >= done_at_kill and res.tiles_written + res.tiles_skipped == total
    emb, valid = values(out)
    emb0, valid0 = values(untiled)
    assert np.array_equal(emb, emb0, equal_nan=True) and np.array_equal(valid, valid0)

    before = snapshot(out)
    r = CliRunner().invoke(
        app,
        [
            "embed",
            "--cube",
            str(files["cube"]),
            "--bundle",
            str(files["bundle"]),
            "--out",
            str(out),
            "--resume",
            "--set",
            "tile_px=3",
            "--set",
            f"batch_size={BATCH}",
            "--set",
            "threads_per_worker=1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "nothing to write" in r.output
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- bad input
def test_existing_output_needs_resume_or_overwrite_and_stays_untouched(
    files: dict[str, Path], untiled: Path
) -> None:
    before = snapshot(untiled)
    code, msg = _embed_cli(files, untiled)
    assert code == 2 and "already exists" in msg and "--resume" in msg and "--overwrite" in msg
    code, msg = _embed_cli(
        files, untiled, "--resume", "--set", "tile_px=4"
    )  # other settings than the store's
    assert code == 2 and "tile_px: stored 12, now 4" in msg
    code, msg = _embed_cli(files, untiled, "--resume", "--overwrite")
    assert code == 2 and "contradict" in msg
    assert snapshot(untiled) == before


def test_resume_with_another_thread_count_is_refused(files: dict[str, Path], untiled: Path) -> None:
    # a dense model's sums round differently with another torch thread count, so tiles of two counts
    # must not mix in one store (issue 14 item 11); --workers sets it by splitting the cores
    before = snapshot(untiled)
    stored = read_attrs(untiled)["fingerprint"]["threads_per_worker"]
    assert stored is None  # made on a running scheduler, whose workers keep their own thread count
    common = ("--resume", "--set", "tile_px=12", "--set", f"batch_size={BATCH}")
    code, msg = _embed_cli(files, untiled, *common, "--workers", "1")
    cores = len(os.sched_getaffinity(0))
    assert code == 2 and f"threads_per_worker: stored None, now {cores}" in msg and "--workers" in msg, msg
    code, msg = _embed_cli(files, untiled, *common, "--set", "threads_per_worker=3")
    assert code == 2 and "threads_per_worker: stored None, now 3" in msg, msg
    assert snapshot(untiled) == before


def test_foreign_or_corrupt_output_is_refused_with_resume_and_overwrite(files: dict[str, Path]) -> None:
    d = files["dir"]
    corrupt = d / "corrupt.zarr"
    corrupt.mkdir()
    (corrupt / "zarr.json").write_text("{not json")
    plain = d / "notes.txt"
    plain.write_text("mine")
    for out in (files["cube"], corrupt, plain):  # a scene store is a zarr store, but not ours to replace
        before = snapshot(out)
        for flag in ("--resume", "--overwrite"):
            code, msg = _embed_cli(files, out, flag)
            assert code == 2, msg
            assert "not a stembed embedding store" in msg or "not a readable zarr store" in msg, msg
        assert snapshot(out) == before


def test_bundle_bands_must_match_the_cube(files: dict[str, Path]) -> None:
    spec = dataclasses.replace(S2, bands=tuple(reversed(S2.bands)))
    bundle = random_fusion_bundle(files["dir"] / "reversed.pt", tiny=True, sensors={"s1": S1, "s2": spec})
    out = files["dir"] / "bands.zarr"
    code, msg = _embed_cli(files, out, bundle=bundle)
    assert code == 2 and "the s2 cube has bands ['B02'" in msg and "trained on ['B12'" in msg
    assert not out.exists()


def test_s1_and_s2_on_different_grids_are_refused(files: dict[str, Path], scene: Scene) -> None:
    cube = files["dir"] / "shifted.zarr"
    save_scene(scene, cube)
    # move S1 10 m east, coordinates and transform together, as a resampling slip would
    x = zarr.open_array(cube / "s1" / "x", mode="r+")
    x[:] = np.asarray(x[:]) + 10.0
    sr = zarr.open_array(cube / "s1" / "spatial_ref", mode="r+")
    gt = [float(v) for v in str(sr.attrs["GeoTransform"]).split()]
    sr.attrs["GeoTransform"] = " ".join(str(v) for v in [gt[0] + 10.0, *gt[1:]])
    out = files["dir"] / "shifted_out.zarr"
    code, msg = _embed_cli(files, out, cube=cube)
    assert code == 2 and "S1 grid is offset by (10, 0) m" in msg and "reproject" in msg
    assert not out.exists()


def test_cube_too_short_in_time_is_refused(files: dict[str, Path]) -> None:
    short = synthetic_scene(seed=3, height_px=12, width_px=12, n_days=60)
    short = Scene(site=short.site, sensors={"s2": short.s2.isel(time=slice(0, 5)), "s1": short.s1})
    cube = save_scene(short, files["dir"] / "short.zarr")
    out = files["dir"] / "short_out.zarr"
    code, msg = _embed_cli(files, out, cube=cube)
    assert code == 2 and "5 S2 dates, too short in time" in msg and "at least 6" in msg
    assert not out.exists()


def test_unreachable_scheduler_is_named_and_nothing_is_written(files: dict[str, Path], untiled: Path) -> None:
    out = files["dir"] / "unreachable.zarr"
    code, msg = _embed_cli(files, out, "--scheduler", "tcp://127.0.0.1:9", "--set", "connect_timeout_s=2")
    assert code == 2 and "could not reach the dask scheduler at 'tcp://127.0.0.1:9'" in msg
    assert not out.exists()
    before = snapshot(untiled)
    code, msg = _embed_cli(
        files,
        untiled,
        "--overwrite",
        "--scheduler",
        "tcp://127.0.0.1:9",
        "--set",
        "connect_timeout_s=2",
        "--set",
        "tile_px=12",
        "--set",
        f"batch_size={BATCH}",
    )
    assert code == 2 and "could not reach" in msg
    assert snapshot(untiled) == before  # --overwrite deletes nothing until the run can start


def test_cube_values_are_checked_before_anything_is_written(
    files: dict[str, Path], scene: Scene, scheduler: str
) -> None:
    cube = files["dir"] / "bad_values.zarr"
    save_scene(scene, cube)
    # a value out of [0, 1], written around save_scene's validation as a foreign tool might
    zarr.open_array(cube / "s2" / "s2", mode="r+")[2, 0, 10, 10] = 3.0
    out = files["dir"] / "bad_out.zarr"
    with pytest.raises(CubeError, match=r"the s2 cube breaks the cube contract: values range over \[.*3\]"):
        embed_cube(cube, files["bundle"], out, EmbedConfig(tile_px=6), scheduler=scheduler, progress=False)
    assert not out.exists()  # refused before the store was created, not by a tile mid-run
    # a cube with no S1 value at all holds no data: refused as a whole, before anything is written
    nan_cube = save_scene(scene, files["dir"] / "no_s1.zarr")
    s1_values = zarr.open_array(nan_cube / "s1" / "s1", mode="r+")
    s1_values[:] = np.full(s1_values.shape, np.nan, np.float32)
    with pytest.raises(CubeError, match="the s1 cube breaks the cube contract: every value is NaN"):
        embed_cube(
            nan_cube, files["bundle"], out, EmbedConfig(tile_px=6), scheduler=scheduler, progress=False
        )
    assert not out.exists()


@pytest.mark.slow
def test_a_window_without_observations_embeds_as_no_data(
    files: dict[str, Path], scene: Scene, scheduler: str, untiled: Path
) -> None:
    # no S2 value on any date in the top-left quarter (a swath edge), no S1 value in the bottom-right
    # (an S1 gap): such windows are data, not a broken cube, whatever the tile size (issue 14 item 2)
    s2, s1 = scene.s2.copy(deep=True), scene.s1.copy(deep=True)
    s2[:, :, :6, :6] = np.nan
    s1[:, :, 6:, 6:] = np.nan
    cube = save_scene(Scene(site=scene.site, sensors={"s2": s2, "s1": s1}), files["dir"] / "no_data.zarr")
    results = {}
    for tile_px in (EmbedConfig().tile_px, 3):
        out = files["dir"] / f"no_data_{tile_px}.zarr"
        cfg = EmbedConfig(tile_px=tile_px, batch_size=BATCH)
        embed_cube(cube, files["bundle"], out, cfg, scheduler=scheduler, progress=False)
        results[tile_px] = values(out)
    (emb, valid), (emb3, valid3) = results.values()
    np.testing.assert_array_equal(valid, valid3)
    assert np.array_equal(emb, emb3, equal_nan=True)
    assert not valid[:, :6, :6].any() and np.isnan(emb[:, :, :6, :6]).all()
    assert valid[:, 6:, 6:].any() and valid[:, :6, 6:].any()
    assert np.isnan(emb.transpose(0, 2, 3, 1)[~valid]).all()


@pytest.mark.slow
def test_real_belgian_patch_equals_the_per_patch_reference(belgian_scene: Scene, tmp_path: Path) -> None:
    # an 8 x 8 px corner of the real patch (four 4 px tiles, each with an edge), every date: the plumbing is what
    # is tested, so a random-weight tiny model keeps it fast
    def crop(da: xr.DataArray) -> xr.DataArray:
        out = da.isel(y=slice(0, 8), x=slice(0, 8))
        out.attrs = dict(da.attrs)
        return out

    scene = Scene(site=belgian_scene.site, sensors={"s2": crop(belgian_scene.s2), "s1": crop(belgian_scene.s1)})
    cube = save_scene(scene, tmp_path / "belgium.zarr")
    bundle = random_fusion_bundle(tmp_path / "fusion.pt", seed=1, tiny=True)
    out = tmp_path / "belgium_emb.zarr"
    embed_cube(cube, bundle, out, EmbedConfig(tile_px=4, batch_size=128), progress=False)
    emb, valid = values(out)
    ref = embed_reference(scene, load_bundle(bundle), batch_size=128)
    np.testing.assert_array_equal(valid, ref["valid"].values)
    assert valid.sum() > 0.5 * valid.size
    np.testing.assert_allclose(emb, ref["embedding"].values, rtol=0, atol=1e-5)


def test_a_failed_tile_stops_the_run_named_with_how_to_finish() -> None:
    from stembed.contract import CubeError
    from stembed.inference.workers import RESUME, raise_tile_failure
    from stembed.io.embeddings import EmbedError

    class Future:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    others = [Future(), Future()]
    with pytest.raises(EmbedError, match=r"a tile failed \(ValueError: bad\).*fix the problem and rerun with --resume"):
        raise_tile_failure(ValueError("bad"), RESUME, others)
    assert all(f.cancelled for f in others)
    own = CubeError("the cube breaks the contract")
    with pytest.raises(CubeError) as caught:  # the library's own errors pass as they are
        raise_tile_failure(own, RESUME)
    assert caught.value is own
