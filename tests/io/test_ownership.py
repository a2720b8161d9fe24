"""Runs own their output (issue 14, items 3-4): ``OUT.lock`` with the owner's pid and host.

A second run into an output being written refuses with one line; ``--overwrite`` never deletes a store
another live run holds; a dead owner's lock is taken over with a note; what a run killed while it
created or replaced a store leaves is cleaned by the next run, with ``--resume`` or ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stembed.cli import app
from stembed.config import EmbedConfig
from stembed.cube_build import CubeRequest, build_cube, staging_dir
from stembed.inference.run import embed_cube
from stembed.io.cube import save_scene
from stembed.io.embeddings import open_embeddings
from stembed.io.outputs import OutputError, creating_path, lock_output, lock_path, remove_leftovers
from stembed.io.stac import utm_grid
from stembed.testing import random_fusion_bundle, synthetic_scene

BATCH = 64


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _fake_lock(out: Path, pid: int, host: str | None = None) -> Path:
    path = lock_path(out)
    path.write_text(json.dumps({
        "stembed_output_lock": 1, "pid": pid, "host": host or socket.gethostname(), "command": "embed",
        "started": "2026-01-01T00:00:00+0000",
    }))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("own")
    scene = synthetic_scene(seed=3, height_px=12, width_px=12, n_days=60)
    return {
        "cube": save_scene(scene, d / "scene.zarr"),
        "bundle": random_fusion_bundle(d / "fusion.pt", seed=0, tiny=True),
        "dir": d,
    }


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def store(world: dict[str, Path], scheduler: str) -> Path:
    out = world["dir"] / "done.zarr"
    embed_cube(world["cube"], world["bundle"], out, EmbedConfig(tile_px=6, batch_size=BATCH),
               scheduler=scheduler, progress=False)
    return out


def _embed(world: dict[str, Path], out: Path, *extra: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, [
        "embed", "--cube", str(world["cube"]), "--bundle", str(world["bundle"]), "--out", str(out), "--quiet",
        "--set", "tile_px=6", "--set", f"batch_size={BATCH}", "--set", "threads_per_worker=1", *extra,
    ])
    return r.exit_code, r.output


# ----------------------------------------------------------------------------- the lock itself
def test_the_lock_is_exclusive_and_released_with_the_folders_it_made(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "e.zarr"
    with lock_output(out, command="embed") as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        refused = rf"is being written by another stembed run \(pid {os.getpid()}"
        with pytest.raises(OutputError, match=refused):
            lock_output(out, command="embed")
        assert sorted(p.name for p in out.parent.iterdir()) == ["e.zarr.lock"]  # no temporary left
    assert list(tmp_path.iterdir()) == []  # lock gone, and the folders it had to create


def test_a_dead_owners_lock_is_taken_over_with_a_note(tmp_path: Path) -> None:
    out = tmp_path / "e.zarr"
    dead = _dead_pid()
    _fake_lock(out, dead)
    said: list[str] = []
    with lock_output(out, command="embed", echo=said.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"took over {lock_path(out)}" in said[0] and f"pid {dead}" in said[0]
    assert said[0].count("\n") == 0 and "no longer running" in said[0]
    assert list(tmp_path.iterdir()) == []


def test_a_live_or_foreign_hosts_or_foreign_lock_is_refused(tmp_path: Path, live_pid: int) -> None:
    out = tmp_path / "e.zarr"
    for host, pid in ((None, live_pid), ("elsewhere", _dead_pid())):  # another host's pid cannot be checked
        path = _fake_lock(out, pid, host)
        before = path.read_text()
        with pytest.raises(OutputError, match="being written by another stembed run") as e:
            lock_output(out, command="embed")
        assert f"remove {path}" in str(e.value) and "\n" not in str(e.value)
        assert path.read_text() == before
    path.write_text("someone's notes\n")
    with pytest.raises(OutputError, match="is not a stembed lock file"):
        lock_output(out, command="embed")
    assert path.read_text() == "someone's notes\n"


def test_leftovers_beside_the_output_are_ours_only_if_they_hold_zarr(tmp_path: Path) -> None:
    out = tmp_path / "e.zarr"
    left = creating_path(out)
    (left / "embedding" / "c" / "0").mkdir(parents=True)
    (left / "zarr.json").write_text("{")
    (left / "embedding" / "c" / "0" / "0").write_bytes(b"\0")
    remove_leftovers(out)
    assert not left.exists()
    left.mkdir()
    (left / "thesis.tex").write_text("years of work\n")
    with pytest.raises(OutputError, match="is not a store a stembed run left"):
        remove_leftovers(out)
    assert (left / "thesis.tex").is_file()


# ----------------------------------------------------------------------------- embed and cube respect it
@pytest.mark.slow
def test_a_second_embed_refuses_a_store_another_run_writes(
    world: dict[str, Path], store: Path, live_pid: int
) -> None:
    _fake_lock(store, live_pid)
    try:
        before = _tree(world["dir"])
        for flags in ((), ("--resume",), ("--overwrite",)):
            code, msg = _embed(world, store, *flags)
            assert code == 2, msg
            assert "is being written by another stembed run" in msg and f"pid {live_pid}" in msg, msg
            assert len([ln for ln in msg.splitlines() if ln.strip()]) == 1, msg
        assert _tree(world["dir"]) == before  # --overwrite deleted nothing
        fresh = world["dir"] / "fresh.zarr"
        _fake_lock(fresh, live_pid)
        code, msg = _embed(world, fresh)
        assert code == 2 and "being written" in msg and not fresh.exists()
        lock_path(fresh).unlink()
    finally:
        lock_path(store).unlink()


@pytest.mark.slow
def test_a_kill_while_the_store_is_created_leaves_what_resume_and_overwrite_accept(
    world: dict[str, Path], store: Path, scheduler: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # what a run killed inside create_store leaves: its lock (dead pid) and a half-made store beside --out
    expected = open_embeddings(store)
    for flag in ("resume", "overwrite"):
        out = world["dir"] / f"killed_{flag}.zarr"
        _fake_lock(out, _dead_pid())
        half = creating_path(out)
        half.mkdir()
        (half / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
        res = embed_cube(world["cube"], world["bundle"], out, EmbedConfig(tile_px=6, batch_size=BATCH),
                         scheduler=scheduler, progress=False, **{flag: True})
        assert res.tiles_written == 4
        assert "took over" in capsys.readouterr().err
        got = open_embeddings(out)
        assert np.array_equal(got["embedding"].values, expected["embedding"].values, equal_nan=True)
        assert sorted(p.name for p in world["dir"].iterdir() if p.name.startswith(f"killed_{flag}")) == [
            out.name
        ]
        assert not half.exists() and not lock_path(out).exists()


def test_cube_refuses_an_output_another_run_writes(tmp_path: Path, live_pid: int) -> None:
    out = tmp_path / "be.zarr"
    _fake_lock(out, live_pid)
    request = CubeRequest(grid=utm_grid(bbox=(3.0, 50.8, 3.01, 50.81)), start="2020-03-01", end="2020-10-31",
                          site="be", catalog="http://127.0.0.1:9/")
    with pytest.raises(OutputError, match="being written by another stembed run"):
        build_cube(request, out, overwrite=True, progress=False)
    assert not staging_dir(out).exists() and not out.exists() and lock_path(out).is_file()


# ----------------------------------------------------------------------------- every other writer respects it too
@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("table.csv", ["sample", "--embeddings", "{store}", "--points", "{points}", "--out", "{out}"]),
        ("tifs", ["export", "--embeddings", "{store}", "--out", "{out}"]),
        ("emb.nc", ["export", "--embeddings", "{store}", "--format", "netcdf", "--out", "{out}"]),
        ("run", ["train", "s2", "--run-dir", "{out}", "--quiet"]),
    ],
    ids=["sample", "export-geotiff", "export-netcdf", "train"],
)
@pytest.mark.slow
def test_sample_export_and_train_refuse_an_output_another_run_writes(
    world: dict[str, Path], store: Path, live_pid: int, tmp_path: Path, name: str, args: list[str]
) -> None:
    points = tmp_path / "points.csv"
    points.write_text("id,lon,lat\na,3.0,50.8\n")
    out = tmp_path / "sub" / name
    out.parent.mkdir()
    _fake_lock(out, live_pid)
    before = _tree(tmp_path)
    for flags in ((), ("--overwrite",)) if args[0] != "train" else ((),):
        cmd = [a.format(store=store, points=points, out=out) for a in args] + list(flags)
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 2, r.output
        assert "is being written by another stembed run" in r.output and f"pid {live_pid}" in r.output, r.output
        assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1, r.output
        assert _tree(tmp_path) == before


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_how_to_resume(tmp_path: Path) -> None:
    """Ctrl-C signals the whole process group: the dask workers must stay quiet (issue 14, item 9)."""
    import signal
    import sys
    import time

    cube = save_scene(synthetic_scene(seed=3, height_px=48, width_px=48, n_days=200), tmp_path / "scene.zarr")
    bundle = random_fusion_bundle(tmp_path / "fusion.pt", seed=0, tiny=True)
    out = tmp_path / "e.zarr"
    exe = Path(sys.executable).with_name("stembed")
    proc = subprocess.Popen(
        [str(exe), "embed", "--cube", str(cube), "--bundle", str(bundle), "--out", str(out), "--workers", "2",
         "--set", "tile_px=12", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # as from a terminal: a test runner started in the background (CI, nohup) hands its children an ignored
        # SIGINT, which Ctrl-C could then never interrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # the store exists: the workers run tiles. As a terminal does: SIGINT to the whole group, once
    # (the seconds in which the workers start, when a Ctrl-C is lost, are covered by the test below)
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before it could be interrupted; give it more tiles"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["interrupted; tiles written so far are kept: rerun with --resume to finish the store"], err


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal dispositions from /proc (Linux)")
def test_local_workers_ignore_ctrl_c_and_this_process_does_not() -> None:
    """The deterministic half of the test above: the workers' SIGINT is ignored, ours is not."""
    import multiprocessing
    import signal

    from stembed.cluster import connect as _connect

    def ignores_sigint(pid: int | str) -> bool:
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("SigIgn:"))
        return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))

    # as in a process started from a terminal (a test runner in the background may ignore SIGINT itself)
    runner_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    others = {p.pid for p in multiprocessing.active_children()}  # other tests' clusters
    try:
        client, cluster = _connect(None, 1, 30)
        try:
            workers = [p.pid for p in multiprocessing.active_children() if p.pid not in others]
            assert workers and all(pid is not None and ignores_sigint(pid) for pid in workers)
            assert not ignores_sigint("self") and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        finally:
            client.close()
            cluster.close()
    finally:
        signal.signal(signal.SIGINT, runner_handler)
