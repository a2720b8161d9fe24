"""``stembed eval ...`` and ``stembed report`` end to end on a small synthetic scene and store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from stembed.cli import app
from stembed.io.cube import save_scene
from stembed.testing import synthetic_scene, write_embedding_store

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report")
    scene = synthetic_scene(seed=2, height_px=32, width_px=32, n_days=730)
    cube = save_scene(scene, d / "scene.zarr")
    s2 = scene.s2
    # a stand-in store: 7 of the bands as "embedding" (the commands, not a model, are tested)
    write_embedding_store(d / "emb.zarr", s2, s2.values[:, :7].astype(np.float32), tile_px=16, time_chunk=8,
                          attrs={"fingerprint": {}, "input": {"site": scene.site}})
    run = d / "run"
    run.mkdir()
    m = {
        "n_patches": 5,
        "centre_mae": 0.02,
        "baseline_patch_mean_centre_mae": 0.03,
        "baseline_temporal_neighbours_centre_mae": 0.025,
        "centre_sam": 0.1,
        "ssim": 0.9,
    }
    (run / "metrics.json").write_text(json.dumps({"stage": "ae", "splits": {"test": {"s2": m}}}))
    days = pd.date_range("2019-10-01", "2021-12-31", freq="D")
    flux = d / "FLX_XX-Syn_FLUXDATAKIT_FULLSET_DD_2019_2021_1-1.csv"
    pd.DataFrame(
        {
            "TIMESTAMP": days.strftime("%Y-%m-%d"),
            "GPP_NT_VUT_REF": 5 + 4 * np.sin(2 * np.pi * (days.dayofyear - 100) / 365),
            "NEE_VUT_REF_QC": 1.0,
        }
    ).to_csv(flux, index=False)
    return {"dir": d, "cube": cube, "emb": d / "emb.zarr", "run": run, "flux": flux}


@pytest.mark.slow
def test_eval_commands_write_their_tables(inputs: dict[str, Path]) -> None:
    out = inputs["dir"] / "eval"
    r = runner.invoke(app, ["eval", "recon", str(inputs["run"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "recon.csv").is_file() and "0.0200" in r.output
    r = runner.invoke(
        app,
        [
            "eval",
            "probe",
            "--embeddings",
            str(inputs["emb"]),
            "--cube",
            str(inputs["cube"]),
            "--label",
            "land_cover",
            "--out",
            str(out),
            "--block-px",
            "8",
            "--folds",
            "2",
            "--samples",
            "1500",
            "--region",
            "0:32,0:24",
            "--features",
            "3",
            "--features",
            "7",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = pd.read_csv(out / "probe_land_cover_summary.csv")
    assert {"embedding3", "embedding7", "date_s2", "date_s2_pca3", "date_s2s1_pca7", "window_pca7", "season_raw"} <= set(
        summary["feature_set"]
    )
    assert "in region 0:32,0:24" in r.output and "Feature sets were renamed" in r.output
    r = runner.invoke(
        app,
        [
            "eval",
            "gpp",
            "--embeddings",
            str(inputs["emb"]),
            "--cube",
            str(inputs["cube"]),
            "--flux",
            str(inputs["flux"]),
            "--out",
            str(out),
            "--whole-cube",
            "--epochs",
            "1",
            "--train-years",
            "2020",
            "--val-years",
            "2021",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (out / "gpp_metrics.csv").is_file() and (out / "gpp_embedding.png").is_file()


def test_eval_probe_passes_region_prefixes_and_the_scenes_s1(
    inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stembed.eval import probe

    seen: dict[str, object] = {}

    def fake(embeddings: object, s2: object, labels: object, **kw: object) -> None:
        seen.update(kw)
        raise probe.ProbeError("stopped by the test")

    monkeypatch.setattr(probe, "probe_table", fake)
    r = runner.invoke(app, ["eval", "probe", "--embeddings", str(inputs["emb"]), "--cube", str(inputs["cube"]),
                            "--label", "land_cover", "--out", str(inputs["dir"] / "p"), "--region", "16:32,0:16", "--jobs", "2",
                            "--features", "7", "--features", "3"])
    assert r.exit_code == 2 and "stopped by the test" in r.output
    assert seen["region"] == (16, 32, 0, 16) and seen["features"] == [7, 3] and seen["label"] == "land_cover"
    assert seen["n_jobs"] == 2
    s1 = seen["s1"]
    assert isinstance(s1, xr.DataArray) and s1.dims == ("time", "band", "y", "x")
    assert list(s1["band"].values) == ["VV", "VH"]


def test_gpp_needs_a_tower_or_the_whole_cube_and_a_tower_inside(inputs: dict[str, Path]) -> None:
    base = [
        "eval",
        "gpp",
        "--embeddings",
        str(inputs["emb"]),
        "--cube",
        str(inputs["cube"]),
        "--flux",
        str(inputs["flux"]),
        "--out",
        str(inputs["dir"] / "x"),
    ]
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "--tower LON LAT" in r.output
    r = runner.invoke(app, [*base, "--tower", "10.4521", "51.0794"])
    assert r.exit_code == 2 and "outside the cube" in r.output and "--whole-cube" in r.output


@pytest.mark.slow
def test_report_says_plainly_when_gpp_only_checks_the_harness(inputs: dict[str, Path]) -> None:
    out = inputs["dir"] / "report"
    r = runner.invoke(
        app,
        [
            "report",
            "--out",
            str(out),
            "--run",
            str(inputs["run"]),
            "--embeddings",
            str(inputs["emb"]),
            "--cube",
            str(inputs["cube"]),
            "--label",
            "land_cover",
            "--flux",
            str(inputs["flux"]),
            "--tower",
            "10.4521",
            "51.0794",
            "--epochs",
            "1",
            "--samples",
            "1500",
            "--train-years",
            "2020",
            "--val-years",
            "2021",
            "--by-date",
            "--step-days",
            "365",
        ],
    )
    assert r.exit_code == 0, r.output
    page = (out / "report.md").read_text()
    assert "## Early-season curve: land_cover" in page and "(probe_land_cover_by_date.png)" in page
    for suffix in ("csv", "png", "md"):
        assert (out / f"probe_land_cover_by_date.{suffix}").is_file()
    assert "## Reconstruction" in page and "## Probe: land_cover" in page and "## GPP" in page
    assert "checks the harness, not the skill" in page
    assert "| feature_set | model | split | n | nrmse | rmse | r2 | bias |" in page
    for name in ("gpp_embedding.png", "gpp_raw_bands.png", "gpp_ndvi.png"):
        assert f"(gpp/{name})" in page and (out / "gpp" / name).is_file()
    # the report's eval files are the eval commands' files: one writer each (issue 16: no second copy)
    for name in ("recon.csv", "recon.md", "probe_land_cover.csv", "probe_land_cover_summary.csv",
                 "probe_land_cover.md"):
        assert (out / name).is_file(), name


def test_report_by_date_needs_a_label_and_step_days_needs_by_date(inputs: dict[str, Path]) -> None:
    base = ["report", "--out", str(inputs["dir"] / "r2"), "--embeddings", str(inputs["emb"]), "--cube",
            str(inputs["cube"])]
    r = runner.invoke(app, [*base, "--by-date"])
    assert r.exit_code == 2 and "--by-date draws each --label's early-season curve" in r.output
    r = runner.invoke(app, [*base, "--label", "land_cover", "--step-days", "30"])
    assert r.exit_code == 2 and "fix: add --by-date" in r.output
    assert not (inputs["dir"] / "r2").exists()
