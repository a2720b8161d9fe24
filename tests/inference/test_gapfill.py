"""Issue 7: embeddings of cloudy dates (gap-fill layers), the daily cube, and a third sensor added by
retraining the fusion layers only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from stembed.config import (
    AEStageConfig,
    DataConfig,
    EmbedConfig,
    FusionStageConfig,
    GapFillStageConfig,
    SamplingConfig,
    SplitConfig,
    SyntheticSource,
    TrainConfig,
)
from stembed.data.build import matched_arrays, matched_s1_arrays, sensor_arrays
from stembed.data.datasets import SensorArrays
from stembed.inference.daily import FLAG_LINEAR, FLAG_MODEL, FLAG_NONE, FLAG_OBSERVED
from stembed.inference.engine import centre_valid, embed_block, embed_block_dense
from stembed.inference.run import embed_cube
from stembed.io.cube import open_scene, save_scene
from stembed.io.embeddings import open_embeddings
from stembed.models.bundle import load_bundle
from stembed.models.fusion import FusionModel
from stembed.models.gapfill import GapFillModel
from stembed.sensors import PLUGINS, SENSORS, register_sensor
from stembed.testing import random_fusion_bundle, synthetic_scene, toy_sensor_plugin
from stembed.training.run import train_autoencoder, train_fusion, train_gapfill


def _padded(scene, r):
    """The whole scene as one block (S2, and S1 matched within 6 days), reflect-padded by ``r``."""
    pad = ((0, 0), (0, 0), (r, r), (r, r))
    arrays = {"s2": sensor_arrays(scene, "s2"), "s1": matched_s1_arrays(scene, 6.0)}
    return {k: SensorArrays(np.pad(a.values, pad, mode="reflect"), a.days) for k, a in arrays.items()}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["patch", "dense"])
def test_hidden_centre_frame_is_never_read(tmp_path, one_torch_thread, variant):
    """With the S2 centre frame hidden, changing that frame's values changes nothing (both encoder variants)."""
    preset = "tiny" if variant == "patch" else "tiny-dense"
    model = load_bundle(random_fusion_bundle(tmp_path / "b.pt", preset=preset, gapfill=True)).build_model()
    assert isinstance(model, GapFillModel)
    scene = synthetic_scene(seed=3, height_px=6, width_px=6, n_days=120)
    block = _padded(scene, model.fusion.anchor.cfg.context_px)
    s2, d2 = block["s2"].values, block["s2"].days
    embed: Callable[..., np.ndarray] = embed_block if variant == "patch" else embed_block_dense
    t = len(d2) // 2
    targets = np.zeros((len(d2), 6, 6), bool)
    targets[t] = True

    def run(block: dict[str, SensorArrays], hide: bool = True) -> np.ndarray:
        return embed(model.filler, block, batch_size=16, device=torch.device("cpu"), targets=targets,
                     hide_s2_centre=hide)

    a = run(block)
    values = s2.copy()
    values[t] = np.clip(values[t] + 0.3, 0, 1)  # only the target date's frame
    changed = {**block, "s2": SensorArrays(values, d2)}
    b = run(changed)
    assert np.isfinite(a[t]).all()
    np.testing.assert_array_equal(a, b)
    seen = run(changed, hide=False)
    assert np.abs(seen[t] - a[t]).max() > 1e-6  # not hidden, the frame moves the output (random weights: slightly)


@pytest.mark.slow
def test_dense_and_patch_paths_agree_with_the_centre_hidden(tmp_path, one_torch_thread):
    model = load_bundle(random_fusion_bundle(tmp_path / "b.pt", preset="tiny-dense", gapfill=True)).build_model()
    assert isinstance(model, GapFillModel)
    scene = synthetic_scene(seed=4, height_px=5, width_px=5, n_days=120)
    block = _padded(scene, model.fusion.anchor.cfg.context_px)
    cloudy = ~centre_valid(block["s2"].values, model.fusion.anchor.cfg.context_px)
    assert cloudy.any()
    cpu = torch.device("cpu")
    ref = embed_block(model.filler, block, batch_size=8, device=cpu, targets=cloudy, hide_s2_centre=True)
    dense = embed_block_dense(model.filler, block, batch_size=8, device=cpu, targets=cloudy, hide_s2_centre=True)
    assert np.isfinite(ref[np.broadcast_to(cloudy[:, None], ref.shape)]).all()
    np.testing.assert_allclose(dense, ref, atol=1e-4, equal_nan=True)


@pytest.mark.slow
def test_embed_daily_flags_and_values(tmp_path):
    """--daily: observed dates equal the per-date store, cloudy dates are model-based, other days linear."""
    scene = synthetic_scene(seed=5, height_px=12, width_px=12, n_days=90)
    cube = save_scene(scene, tmp_path / "scene.zarr")
    bundle = random_fusion_bundle(tmp_path / "g.pt", tiny=True, gapfill=True)
    base = EmbedConfig(tile_px=8, workers=1)
    embed_cube(cube, bundle, tmp_path / "dates.zarr", base, progress=False)
    embed_cube(cube, bundle, tmp_path / "daily.zarr", base.model_copy(update={"daily": True}), progress=False)
    dates, daily = open_embeddings(tmp_path / "dates.zarr").load(), open_embeddings(tmp_path / "daily.zarr").load()

    t2 = dates["time"].values.astype("datetime64[D]")
    days = daily["time"].values.astype("datetime64[D]")
    assert days[0] == t2[0] and days[-1] == t2[-1] and (np.diff(days) == np.timedelta64(1, "D")).all()
    flag = daily["flag"].values
    on_dates = np.isin(days, t2)
    d = daily.sel(time=dates["time"].values.astype("datetime64[D]").astype("datetime64[ns]"))
    observed = dates["valid"].values
    np.testing.assert_array_equal(d["flag"].values == FLAG_OBSERVED, observed)
    np.testing.assert_array_equal(  # bit-identical to the per-date store where observed
        np.where(observed[:, None], d["embedding"].values, 0), np.where(observed[:, None], dates["embedding"].values, 0)
    )
    assert ((d["flag"].values == FLAG_MODEL) == ~observed).all()  # every cloudy S2 pixel-date is model-based
    assert set(np.unique(flag[~on_dates])) <= {FLAG_LINEAR, FLAG_NONE}
    assert (flag[~on_dates] == FLAG_LINEAR).all()  # both ends are S2 dates with a value at every pixel

    # one pixel, one day between two S2 dates: the linear interpolation of its neighbours' values
    i = int(np.flatnonzero(~on_dates)[0])
    before, after = days[:i][np.isin(days[:i], t2)][-1], days[i:][np.isin(days[i:], t2)][0]
    w = (days[i] - before) / (after - before)
    e = daily["embedding"].values[:, :, 3, 4]
    lo, hi = e[days == before][0], e[days == after][0]
    np.testing.assert_allclose(e[i], (1 - w) * lo + w * hi, rtol=1e-5, atol=1e-6)
    assert daily.attrs["daily"]["model_fill"] is True

    # point sampling of a daily store carries the point pixel's flag
    import pandas as pd

    from stembed.io.sample import sample_points

    x, y = float(daily["x"].values[4]), float(daily["y"].values[3])
    table = sample_points(daily, pd.DataFrame({"id": ["p"], "x": [x], "y": [y]}))
    np.testing.assert_array_equal(table["flag"].to_numpy(), flag[:, 3, 4])


@pytest.mark.slow
def test_embed_daily_with_a_plain_fusion_bundle_says_model_fill_is_off(tmp_path):
    scene = synthetic_scene(seed=6, height_px=8, width_px=8, n_days=120)
    cube = save_scene(scene, tmp_path / "scene.zarr")
    bundle = random_fusion_bundle(tmp_path / "f.pt", tiny=True)
    res = embed_cube(cube, bundle, tmp_path / "daily.zarr", EmbedConfig(daily=True, workers=1), progress=False)
    assert any("no gap-fill layers" in n for n in res.notes)
    flag = open_embeddings(tmp_path / "daily.zarr")["flag"].values
    assert FLAG_MODEL not in np.unique(flag) and FLAG_LINEAR in np.unique(flag)


def _data(**kw) -> DataConfig:
    return DataConfig(
        source=SyntheticSource(n_sites=1, height_px=32, width_px=32, n_days=365, seed=11),
        sampling=SamplingConfig(window_dates=14, window_stride=3, spatial_stride=8),
        split=SplitConfig(by="block", blocks=2, fractions=(0.5, 0.25, 0.25), seed=0),
        **kw,
    )


FAST = TrainConfig(batch_size=16, max_epochs=1, lr=1e-3, warmup_steps=5, progress_bar=False, accelerator="cpu")


@pytest.fixture
def toy_registered():
    before_s, before_p = dict(SENSORS), dict(PLUGINS)
    register_sensor(toy_sensor_plugin())
    yield
    SENSORS.clear()
    SENSORS.update(before_s)
    PLUGINS.clear()
    PLUGINS.update(before_p)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict[str, Path]:
    """The S1 and S2 autoencoders of :func:`_data` (trained once: both stage-2 tests start from them)."""
    out = tmp_path_factory.mktemp("stage1")
    return {
        s: train_autoencoder(
            AEStageConfig(sensor=s, preset="tiny", data=_data(), train=FAST, out_dir=str(out)), run_dir=out / s
        ).bundle
        for s in ("s1", "s2")
    }


def _state(bundle_path, prefix=""):
    sd = load_bundle(bundle_path).state_dict
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_third_sensor_retrains_only_the_fusion_layers(tmp_path, toy_registered, stage1):
    """A registered companion sensor: its AE, then a fusion run whose S1/S2 AEs stay bit-identical."""
    cfg = AEStageConfig(sensor="toy", preset="tiny", data=_data(extra_sensors=("toy",)), train=FAST,
                        out_dir=str(tmp_path))
    runs = {**stage1, "toy": train_autoencoder(cfg, run_dir=tmp_path / "toy").bundle}
    fcfg = FusionStageConfig(
        bundles={"s1": str(runs["s1"]), "s2": str(runs["s2"]), "toy": str(runs["toy"])},
        preset="tiny", data=_data(extra_sensors=("toy",)), train=FAST, out_dir=str(tmp_path),
    )
    res = train_fusion(fcfg, run_dir=tmp_path / "fusion3")
    fused = load_bundle(res.bundle)
    for sensor, prefix in (("s1", "autoencoders.s1."), ("s2", "autoencoders.s2."), ("toy", "autoencoders.toy.")):
        stage1, after = _state(runs[sensor]), _state(res.bundle, prefix)
        assert stage1.keys() == after.keys()
        for k in stage1:  # encoder and decoder weights, buffers included
            assert torch.equal(stage1[k], after[k]), (sensor, k)
    assert fused.sensors["toy"].bands == ("SEASON", "TEXTURE")
    assert {"s1", "s2", "toy"} <= set(res.metrics["splits"]["test"])
    model = fused.build_model()
    assert isinstance(model, FusionModel) and model.type_embedding.num_embeddings == 3

    # a fusion stage without a bundle for a named companion is refused before training
    bad = fcfg.model_copy(update={"bundles": {k: v for k, v in fcfg.bundles.items() if k != "toy"}})
    with pytest.raises(Exception, match="bundles names companion sensors"):
        train_fusion(bad, run_dir=tmp_path / "bad")

    # the three-sensor bundle embeds a scene that carries the toy cube, and refuses one without it
    scene = synthetic_scene(seed=12, height_px=10, width_px=10, n_days=60)
    plain = save_scene(scene, tmp_path / "plain.zarr")
    with pytest.raises(Exception, match="companion sensor 'toy'"):
        embed_cube(plain, res.bundle, tmp_path / "x.zarr", EmbedConfig(workers=1), progress=False)
    assert not (tmp_path / "x.zarr").exists()
    from dataclasses import replace

    with_toy = replace(scene, sensors={**scene.sensors, "toy": toy_sensor_plugin().load(scene, None)})
    cube = save_scene(with_toy, tmp_path / "toy.zarr")
    assert set(open_scene(cube).extra) == {"toy"}
    embed_cube(cube, res.bundle, tmp_path / "e.zarr", EmbedConfig(workers=1, tile_px=5), progress=False)
    e = open_embeddings(tmp_path / "e.zarr")
    assert e.attrs["companion_sensors"] == ["toy"]
    valid = e["valid"].values
    assert valid.any() and np.isfinite(e["embedding"].values.transpose(0, 2, 3, 1)[valid]).all()
    assert matched_arrays(with_toy, "toy", 0.5).values.shape[0] == scene.s2.sizes["time"]


@pytest.mark.slow
def test_gapfill_stage_trains_the_filler_only(tmp_path, stage1):
    data = _data()
    runs = stage1
    fusion = train_fusion(
        FusionStageConfig(bundles={k: str(v) for k, v in runs.items()}, preset="tiny", data=data, train=FAST,
                          out_dir=str(tmp_path)),
        run_dir=tmp_path / "fusion",
    ).bundle
    res = train_gapfill(GapFillStageConfig(fusion_bundle=str(fusion), data=data, train=FAST), run_dir=tmp_path / "gap")
    before, after = _state(fusion), _state(res.bundle, "fusion.")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    filler = _state(res.bundle, "filler.")
    assert not any(k.startswith(("s1.", "s2.")) for k in filler)  # the shared autoencoders are stored once
    assert any(not torch.equal(filler[k], before[k]) for k in filler)  # the filler's layers trained
    test = res.metrics["splits"]["test"]
    assert test["n_patches"] > 0 and np.isfinite(test["gap_fill_embedding_mae"])
    assert np.isfinite(test["zero_shot_embedding_mae"])

    # the report runs the hidden-date experiment on the bundle's test block
    from stembed.eval.report import ReportInputs, write_report

    # the training scene's grid (the bundle's test block lies on it) over a shorter period: the page is checked
    cube = save_scene(synthetic_scene(seed=11, height_px=32, width_px=32, n_days=120), tmp_path / "scene.zarr")
    page = write_report(tmp_path / "report", ReportInputs(cube=cube, gapfill_bundle=res.bundle,
                                                          gapfill_run_lengths=(1,))).read_text()
    assert "## Cloudy dates" in page and "model_based MAE" in page
    g = res.metrics["data"]["splits"]["test"]["groups"][0]
    assert str([[g["y"][0], g["y"][1]], [g["x"][0], g["x"][1]]]) in page  # the bundle's own test block

    # the data section must be the fusion stage's (its test split must stay unseen)
    other = data.model_copy(update={"split": SplitConfig(by="block", blocks=2, seed=1)})
    with pytest.raises(Exception, match="data differs"):
        train_gapfill(GapFillStageConfig(fusion_bundle=str(fusion), data=other, train=FAST), run_dir=tmp_path / "g2")
    assert not (tmp_path / "g2").exists()


@pytest.mark.slow
def test_gap_fill_experiment_counts_every_hidden_observed_pixel_date(tmp_path):
    from stembed.eval.gapfill import GapFillEvalError, hide_schedule
    from stembed.eval.gapfill_run import evaluate_gap_fill

    scene = synthetic_scene(seed=7, height_px=10, width_px=10, n_days=200)
    cube = save_scene(scene, tmp_path / "scene.zarr")
    bundle = random_fusion_bundle(tmp_path / "g.pt", tiny=True, gapfill=True)
    with pytest.raises(GapFillEvalError, match="no test blocks"):
        evaluate_gap_fill(cube, bundle)  # a random bundle records no split
    with pytest.raises(GapFillEvalError, match="gap-fill bundle"):
        evaluate_gap_fill(cube, random_fusion_bundle(tmp_path / "f.pt", tiny=True), regions=[(slice(0, 4), slice(0, 4))])

    region = (slice(2, 8), slice(3, 9))
    res = evaluate_gap_fill(cube, bundle, run_lengths=(1, 2), offsets=1, regions=[region])
    all_rows = res.table[res.table["gap_days"] == "all"].set_index("method")
    assert set(all_rows.index) == {"model_based", "zero_shot", "linear", "savgol"}

    # expected targets: pixels of the region whose S2 centre is observed on a hidden date
    observed = np.isfinite(scene.s2.values[:, :, region[0], region[1]]).any(axis=1)  # (time, 6, 6)
    n_dates = observed.shape[0]
    expected = sum(int(observed[hide_schedule(n_dates, k)].sum()) for k in (1, 2))
    for method, row in all_rows.iterrows():
        assert row["n"] + row["n_missing"] == expected, method
    assert all_rows.loc["model_based", "n_missing"] == 0  # the model fills every hidden date
    assert all_rows.loc["model_based", "mae"] != all_rows.loc["zero_shot", "mae"]
