"""What an output path may be, and what --overwrite may delete (stembed.io.outputs; issue 14, items 1, 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stembed.cube_build import CubeBuildError, CubeRequest, build_cube, staging_dir
from stembed.io.cube import CubeError, save_scene
from stembed.io.outputs import (
    RUN_CONFIG_HEADER,
    OutputError,
    check_file_output,
    check_output_folder,
    check_run_dir,
    check_store_output,
    is_stembed_store,
)
from stembed.io.stac import utm_grid
from stembed.testing import synthetic_scene


def _someones_folder(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work\n")
    return path


def _request() -> CubeRequest:
    return CubeRequest(grid=utm_grid(bbox=(3.0, 50.8, 3.01, 50.81)), start="2020-03-01", end="2020-10-31",
                       site="be", catalog="http://127.0.0.1:9/")


def test_cube_overwrite_never_deletes_a_folder_of_someones_files(tmp_path: Path) -> None:
    out = _someones_folder(tmp_path / "out")
    with pytest.raises(OutputError, match="not a stembed scene store, so --overwrite will not delete it"):
        build_cube(_request(), out, overwrite=True, progress=False)
    assert (out / "thesis.tex").read_text() == "years of work\n"
    assert not staging_dir(out).exists()


def test_cube_overwrite_never_deletes_a_plain_file(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    out.write_text("mine\n")
    with pytest.raises(OutputError, match="is a file"):
        build_cube(_request(), out, overwrite=True, progress=False)
    assert out.read_text() == "mine\n"
    assert not staging_dir(out).exists()


def test_cube_never_deletes_a_foreign_folder_named_like_its_staging(tmp_path: Path) -> None:
    out = tmp_path / "be.zarr"
    stage = _someones_folder(staging_dir(out))
    with pytest.raises(CubeBuildError, match="not a staged stembed cube build"):
        build_cube(_request(), out, overwrite=True, progress=False)
    assert (stage / "thesis.tex").exists()


def test_save_scene_replaces_a_scene_but_not_someones_folder(tmp_path: Path) -> None:
    scene = synthetic_scene(height_px=8, width_px=8, n_days=60)
    path = save_scene(scene, tmp_path / "scene.zarr")
    assert is_stembed_store(path, "scene") and not is_stembed_store(path, "embeddings")
    save_scene(scene, path, overwrite=True)  # our own kind: replaced
    foreign = _someones_folder(tmp_path / "foreign")
    with pytest.raises(CubeError, match="not a stembed scene store"):
        save_scene(scene, foreign, overwrite=True)
    assert (foreign / "thesis.tex").exists()
    assert check_store_output(path, "scene", overwrite=True) is True
    with pytest.raises(OutputError, match="already exists; fix: pass --overwrite"):
        check_store_output(path, "scene", overwrite=False)


def test_file_and_folder_outputs(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    assert check_file_output(table, overwrite=False) is False
    table.write_text("x\n")
    with pytest.raises(OutputError, match="already exists"):
        check_file_output(table, overwrite=False)
    assert check_file_output(table, overwrite=True) is True
    with pytest.raises(OutputError, match="is a folder"):
        check_file_output(tmp_path, overwrite=True)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_file_output(table / "inner.csv", overwrite=False)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_folder(table)
    check_output_folder(tmp_path / "new" / "deeper")  # may be created
    assert not (tmp_path / "new").exists()


def test_run_dir_must_be_new_empty_or_a_runs_own(tmp_path: Path) -> None:
    run = tmp_path / "run"
    check_run_dir(run)
    run.mkdir()
    check_run_dir(run)
    (run / "config.yaml").write_text("a: 1\n")
    with pytest.raises(OutputError, match="config.yaml that `stembed train` did not write"):
        check_run_dir(run)  # a user's own config alone: a run would replace it
    (run / "config.yaml").write_text(f"{RUN_CONFIG_HEADER}\na: 1\n")
    check_run_dir(run)  # a run killed after writing its config: rerunning into it finishes it
    (run / "config.yaml").write_text("a: 1\n")
    (run / "checkpoints").mkdir()
    check_run_dir(run)  # a run's own files (one from before the header): rerunning into it is allowed
    (run / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputError, match=r"not a stembed run's \(notes.txt\)"):
        check_run_dir(run)
