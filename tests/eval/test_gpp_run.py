"""``stembed eval gpp`` harness: three feature sets on identical windows, outputs written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stembed.eval.gpp import GPPConfig, Windows, YearSplit
from stembed.eval.gpp_run import GPPRunError, feature_series, gpp_at_tower, resolve_split
from stembed.testing import synthetic_scene
from stembed.types import FEATURE, TIME, X, Y

TINY = GPPConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_epochs=2, batch_size=32, warmup_steps=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[xr.Dataset, xr.DataArray, Path]:
    scene = synthetic_scene(seed=1, height_px=12, width_px=12, n_days=730)
    s2 = scene.s2
    t = pd.DatetimeIndex(s2[TIME].values)
    # a stand-in embedding: NDVI-like signal in E1, noise elsewhere (the harness, not a model, is tested)
    red, nir = s2.sel(band="B04").values, s2.sel(band="B08").values
    e = np.random.default_rng(0).normal(size=(len(t), 7, 12, 12)).astype(np.float32)
    e[:, 0] = (nir - red) / (nir + red)
    valid = np.isfinite(e).all(axis=1)
    ds = xr.Dataset(
        {"embedding": ((TIME, FEATURE, Y, X), e), "valid": ((TIME, Y, X), valid)},
        coords={TIME: t, FEATURE: [f"E{i}" for i in range(1, 8)], Y: s2[Y].values, X: s2[X].values},
        attrs={"crs": s2.attrs["crs"]},
    )
    days = pd.date_range(t.min().normalize() - pd.Timedelta(days=30), t.max().normalize(), freq="D")
    gpp = 5 + 4 * np.sin(2 * np.pi * (days.dayofyear - 100) / 365)
    flux = tmp_path_factory.mktemp("flux") / "FLX_XX-Syn_FLUXDATAKIT_FULLSET_DD_2020_2021_1-1.csv"
    pd.DataFrame(
        {"TIMESTAMP": days.strftime("%Y-%m-%d"), "GPP_NT_VUT_REF": gpp, "NEE_VUT_REF_QC": 1.0}
    ).to_csv(flux, index=False)
    return ds, s2, flux


@pytest.mark.slow
def test_three_feature_sets_on_identical_windows_and_outputs_written(inputs, tmp_path: Path) -> None:
    ds, s2, flux = inputs
    run = gpp_at_tower(
        ds,
        s2,
        flux,
        tmp_path,
        tower_lonlat=None,
        split=YearSplit((2020,), (2021,)),
        stride_days=10,
        cfg=TINY,
        seed=0,
    )
    m = run.metrics
    assert set(m["feature_set"]) == {"embedding", "raw_bands", "ndvi"}
    assert {"transformer", "ridge", "climatology"} <= set(m["model"])
    pooled = m[(m["site"] == "pooled")]
    # every feature set and model is scored on the same number of windows per split
    assert pooled.groupby("split")["n"].nunique().eq(1).all()
    assert run.metrics_csv.is_file() and run.predictions_csv.is_file() and len(run.plots) == 3
    preds = pd.read_csv(run.predictions_csv)
    ends = preds.groupby("feature_set")["end_date"].apply(lambda s: tuple(sorted(set(s))))
    assert ends.nunique() == 1
    # windows end only on days whose 89 preceding days lie within the imagery
    first = pd.Timestamp(ds[TIME].values.min()).normalize()
    assert pd.to_datetime(preds["end_date"]).min() >= first + pd.Timedelta(days=89)


def test_tower_window_differs_from_the_whole_cube_and_outside_tower_is_refused(inputs) -> None:
    ds, s2, _ = inputs
    import pyproj

    to_ll = pyproj.Transformer.from_crs(ds.attrs["crs"], "EPSG:4326", always_xy=True)
    lon, lat = to_ll.transform(float(ds[X].values[1]), float(ds[Y].values[1]))
    near = feature_series(ds, s2, tower_lonlat=(lon, lat), window_px=3)["embedding"]
    whole = feature_series(ds, s2, tower_lonlat=None)["embedding"]
    expected = ds["embedding"].where(ds["valid"]).isel(y=slice(0, 3), x=slice(0, 3)).mean(dim=("y", "x"))
    np.testing.assert_allclose(near.to_numpy(), expected.transpose(TIME, FEATURE).values, rtol=1e-5)
    assert not np.allclose(near.to_numpy(), whole.to_numpy(), equal_nan=True)
    with pytest.raises(GPPRunError, match="outside the cube.*--whole-cube"):
        feature_series(ds, s2, tower_lonlat=(10.4521, 51.0794))


def test_harness_runs_on_the_real_de_hai_gpp(shared_data_root: Path, tmp_path: Path) -> None:
    # imagery of 2019-2020 (synthetic, so only the harness is checked) against the real tower file
    scene = synthetic_scene(seed=4, height_px=8, width_px=8, n_days=730, start="2019-01-01")
    s2 = scene.s2
    e = np.stack([s2.values[:, i] for i in range(7)], axis=1).astype(np.float32)
    ds = xr.Dataset(
        {"embedding": ((TIME, FEATURE, Y, X), e), "valid": ((TIME, Y, X), np.isfinite(e).all(axis=1))},
        coords={TIME: s2[TIME].values, FEATURE: [f"E{i}" for i in range(1, 8)], Y: s2[Y].values, X: s2[X].values},
        attrs={"crs": s2.attrs["crs"]},
    )
    flux = shared_data_root / "fluxnet_daily_gpp" / "FLX_DE-Hai_FLUXDATAKIT_FULLSET_DD_2000_2020_2-3.csv"
    run = gpp_at_tower(ds, s2, flux, tmp_path, tower_lonlat=None, split=None, cfg=TINY)
    # no years given: they adapt to this cube's windows, and the 2020 windows reading 2019 days are dropped
    assert run.split == YearSplit((2019,), (2020,), ()) and run.n_dropped_overlap > 0
    pooled = run.metrics[(run.metrics["site"] == "pooled") & (run.metrics["split"] == "val")]
    assert set(pooled["feature_set"]) == {"embedding", "raw_bands", "ndvi"}
    # 2020 windows end on QC-passed days only: at most the 264 such days, every 10th candidate day
    assert 0 < pooled["n"].iloc[0] <= 37
    preds = pd.read_csv(run.predictions_csv)
    assert set(preds["site"]) == {"DE-Hai"} and (preds["obs"] >= 0).all()


# ----------------------------------------------------------------------------- honest splits (issue 15)
def _windows(ends: pd.DatetimeIndex) -> Windows:
    n = len(ends)
    x = np.zeros((n, 90, 2), np.float32)
    return Windows(x, np.broadcast_to(np.arange(90), (n, 90)).copy(), np.ones(n, np.float32), ends,
                   np.full(n, "S", dtype=object))


def test_default_split_adapts_to_the_cube_and_drops_boundary_windows() -> None:
    ends = pd.date_range("2019-04-01", "2021-12-31", freq="10D")
    split, keep = resolve_split(_windows(ends), None, 90)
    assert split == YearSplit((2019, 2020), (2021,), ())
    val = ends.year == 2021
    # validation windows whose 90 days reach back into 2020's training windows are dropped, none later
    dropped = ends[val & ~keep]
    assert len(dropped) > 0 and dropped.max() < pd.Timestamp("2021-04-01")
    train_ends = ends[ends.year < 2021]
    for e in ends[val & keep]:
        assert ((e - train_ends).days >= 90).all()  # no kept validation window shares a day with training
    assert keep[~val].all()


def test_splits_that_would_score_in_sample_are_refused() -> None:
    w = _windows(pd.date_range("2020-04-01", "2020-12-31", freq="10D"))
    with pytest.raises(GPPRunError, match="needs two years or more"):
        resolve_split(w, None, 90)
    with pytest.raises(GPPRunError, match=r"years \[2020\] are in more than one"):
        resolve_split(w, YearSplit((2020,), (2020,)), 90)
    with pytest.raises(GPPRunError, match=r"no window of this cube ends in the val years \[2021\]"):
        resolve_split(w, YearSplit((2020,), (2021,)), 90)
    with pytest.raises(GPPRunError, match="no validation or test years"):
        resolve_split(w, YearSplit((2020,), ()), 90)
    # validation windows that all lie within 90 days of training ones: nothing is held out
    short = _windows(pd.DatetimeIndex(["2020-10-01", "2020-12-31", "2021-01-10", "2021-02-20"]))
    with pytest.raises(GPPRunError, match="every validation window .* shares days with training"):
        resolve_split(short, YearSplit((2020,), (2021,)), 90)


def test_gpp_at_tower_records_the_split_and_what_it_dropped(inputs, tmp_path: Path) -> None:
    import json

    ds, s2, flux = inputs
    run = gpp_at_tower(ds, s2, flux, tmp_path, tower_lonlat=None, split=None, cfg=TINY)
    assert run.split == YearSplit((2020,), (2021,), ()) and run.n_dropped_overlap > 0
    preds = pd.read_csv(run.predictions_csv)
    val_ends = pd.to_datetime(preds.loc[preds["split"] == "val", "end_date"])
    train_ends = pd.to_datetime(preds.loc[preds["split"] == "train", "end_date"])
    assert val_ends.min() >= train_ends.max() + pd.Timedelta(days=90)  # no shared day
    recorded = json.loads((tmp_path / "gpp_split.json").read_text())
    assert recorded["held_out_windows_dropped_for_overlap"] == run.n_dropped_overlap


# ----------------------------------------------------------------------------- several towers (issue 15)
def _tower(root: Path, seed: int, amplitude: float) -> dict[str, str]:
    """A synthetic tower: scene store, stand-in embedding store (7 of the bands) and a flux CSV."""
    from stembed.io.cube import save_scene
    from stembed.testing import write_embedding_store

    scene = synthetic_scene(seed=seed, height_px=8, width_px=8, n_days=730, site=f"T{seed}")
    s2 = scene.s2
    folder = root / f"t{seed}"
    cube = save_scene(scene, folder / "scene.zarr")
    write_embedding_store(folder / "emb.zarr", s2, s2.values[:, :7].astype(np.float32), tile_px=8, time_chunk=64,
                          attrs={"fingerprint": {}, "input": {"site": scene.site}})
    days = pd.date_range("2019-10-01", "2021-12-31", freq="D")
    pd.DataFrame({"TIMESTAMP": days.strftime("%Y%m%d"),
                  "GPP_NT_VUT_REF": 5 + amplitude * np.sin(2 * np.pi * (days.dayofyear - 100) / 365),
                  "NEE_VUT_REF_QC": 1.0}).to_csv(folder / "flux.csv", index=False)
    return {"site": f"T{seed}", "embeddings": f"t{seed}/emb.zarr", "cube": str(cube.relative_to(root)),
            "flux": f"t{seed}/flux.csv", "lon": "", "lat": ""}


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("towers")
    rows = [_tower(root, seed, amp) for seed, amp in ((1, 1.0), (2, 3.0), (3, 5.0))]
    pd.DataFrame(rows).to_csv(root / "towers.csv", index=False)
    return root / "towers.csv"


@pytest.mark.slow
def test_leave_one_site_out_scores_each_tower_with_models_of_the_others(towers: Path, tmp_path: Path) -> None:
    from stembed.eval.gpp import fit_climatology
    from stembed.eval.gpp_run import gpp_leave_one_site_out, read_towers, tower_windows
    from stembed.io.cube import open_scene
    from stembed.io.embeddings import open_embeddings

    table = read_towers(towers)
    assert [t.site for t in table] == ["T1", "T2", "T3"] and all(t.lonlat is None for t in table)
    run = gpp_leave_one_site_out(table, tmp_path, cfg=TINY)
    preds = pd.read_csv(run.predictions_csv)
    assert set(preds["split"]) == {"test"} and (preds["fold"] == preds["site"]).all()
    # the held-out tower's climatology is the other towers' (amplitudes 1, 3, 5 tell them apart)
    w = {t.site: tower_windows(open_embeddings(t.embeddings), open_scene(t.cube).s2, t.flux, tower_lonlat=None,
                               cfg=TINY, site=t.site)[1]["embedding"] for t in table}
    for held in w:
        clim = fit_climatology(Windows.concat([v for s, v in w.items() if s != held]))
        got = preds[(preds["site"] == held) & (preds["model"] == "climatology") & (preds["feature_set"] == "ndvi")]
        np.testing.assert_allclose(got.sort_values("end_date")["pred"].to_numpy(), clim.predict(w[held].end_date))
    m = run.metrics
    assert {"T1", "T2", "T3", "pooled"} == set(m["site"]) and set(m["feature_set"]) == {"embedding", "raw_bands",
                                                                                          "ndvi"}
    assert len(run.plots) == 9 and all(p.is_file() for p in run.plots)


@pytest.mark.slow
def test_eval_gpp_towers_from_the_cli_and_its_bad_tables(towers: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stembed.cli import app

    runner = CliRunner()
    out = tmp_path / "loso"
    r = runner.invoke(app, ["eval", "gpp", "--towers", str(towers), "--out", str(out), "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "3 towers" in r.output and (out / "gpp_metrics.csv").is_file()
    table = pd.read_csv(towers, dtype=str, keep_default_na=False)
    bad = {
        "lacks the columns": table.drop(columns=["flux"]),
        "more than once": pd.concat([table, table.iloc[:1]]),
        "does not exist": table.assign(cube=["t1/nope.zarr", *table["cube"][1:]]),
        "not numbers": table.assign(lon="east", lat="north"),
        "needs at least 2": table.iloc[:1],
    }
    for expect, frame in bad.items():
        path = towers.parent / "bad.csv"
        frame.to_csv(path, index=False)
        r = runner.invoke(app, ["eval", "gpp", "--towers", str(path), "--out", str(tmp_path / "bad")])
        assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output, (expect, r.output)
        assert not (tmp_path / "bad").exists()
    r = runner.invoke(app, ["eval", "gpp", "--towers", str(towers), "--flux", str(towers), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "cannot be given too" in r.output
    r = runner.invoke(app, ["eval", "gpp", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--towers" in r.output
