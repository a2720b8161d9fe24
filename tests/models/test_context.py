"""The context fusion: which dates its window reads, the model's masking and batch independence, training end to
end on a small synthetic scene, and embedding with it (tiled = the whole-cube reference, nested prefixes, the
store's window and nesting, model-based cloudy dates)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stembed.config import (
    AEStageConfig,
    DataConfig,
    DenseTrainingConfig,
    EmbedConfig,
    FusionConfig,
    FusionStageConfig,
    LossConfig,
    SamplingConfig,
    SplitConfig,
    SyntheticSource,
    TrainConfig,
    WindowConfig,
    ae_preset,
)
from stembed.data.windows import NONE, select_dates, target_offsets, window_dates
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.context import ContextFusionModel
from stembed.training.run import RunResult, train_autoencoder, train_fusion


# ----------------------------------------------------------------------------- windows
def test_each_target_takes_the_nearest_free_observed_date() -> None:
    days = np.array([0, 10, 20, 30, 40, 50, 60])
    observed = np.array([[1, 1, 0, 1, 1, 1, 1]], dtype=bool)  # day 20 is cloudy
    # the date is day 30 (index 3); targets 25, 35, 5, 55 in that order
    out = select_dates(days, observed, np.array([3]), np.array([-5.0, 5.0, -25.0, 25.0]))
    # 25: days 10 and 40 tie at 15 -> the earlier (10); 35: 40; 5: 0 (10 is taken); 55: 50 and 60 tie -> 50
    assert out.tolist() == [[1, 4, 0, 5]]


def test_a_window_holds_only_observed_other_dates_each_once_and_marks_what_it_lacks() -> None:
    rng = np.random.default_rng(0)
    days = np.cumsum(rng.integers(2, 12, 60))
    observed = rng.random((200, 60)) < 0.5
    t = rng.integers(0, 60, 200)
    cfg = WindowConfig(dates=8, span_days=90, density=2.0)
    for draw in (None, rng):
        win = window_dates(cfg, days, observed, t, draw)
        for i in range(200):
            picked = win[i][win[i] != NONE]
            assert t[i] not in picked and observed[i, picked].all() and len(set(picked)) == picked.size
            free = observed[i].sum() - observed[i, t[i]]
            assert picked.size == min(8, free)  # a slot stays empty only when the pixel has no date left
    few = np.zeros((1, 60), dtype=bool)
    few[0, [3, 40]] = True
    assert (window_dates(cfg, days, few, np.array([3])) == NONE).sum() == 7


def test_targets_are_cell_centres_at_inference_and_inside_their_cells_in_training() -> None:
    cfg = WindowConfig(dates=4, span_days=100, density=2.0)
    centre = target_offsets(cfg)[0]
    np.testing.assert_allclose(centre, [-100 * 0.25**2, 100 * 0.25**2, -100 * 0.75**2, 100 * 0.75**2])
    drawn = target_offsets(cfg, np.random.default_rng(1), n=500)
    near, far = np.abs(drawn[:, :2]), np.abs(drawn[:, 2:])
    assert (near <= 100 * 0.5**2).all() and (far >= 100 * 0.5**2).all() and (far <= 100).all()
    assert (drawn[:, ::2] < 0).all() and (drawn[:, 1::2] > 0).all()


def test_window_config_is_checked() -> None:
    with pytest.raises(ValueError, match="even"):
        WindowConfig(dates=5)
    with pytest.raises(ValueError, match="nested"):
        FusionConfig(embed_dim=16, nested=(7, 12))
    with pytest.raises(ValueError, match="direct_path"):
        FusionConfig(window=WindowConfig())
    # embedding_dim, the other name of embed_dim, as a config file gives it
    assert FusionConfig.model_validate({"embedding_dim": 16, "nested": (7, 16)}).prefixes == (7, 16)


# ----------------------------------------------------------------------------- the model
def _model(dropout: float = 0.0) -> ContextFusionModel:
    torch.manual_seed(0)
    aes = {k: SensorAutoencoder(ae_preset("tiny-dense", k)) for k in ("s1", "s2")}
    cfg = FusionConfig(embed_dim=6, nested=(3, 6), window=WindowConfig(dates=4), d_model=16, n_heads=2, n_layers=1,
                       d_ff=32, dropout=dropout, direct_path=True, season_hidden=8)
    return ContextFusionModel(aes, cfg)


def _inputs(B: int = 6, S: int = 5, seed: int = 0) -> tuple[dict, dict, dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = {"s1": torch.randn(B, S, 2, generator=g), "s2": torch.randn(B, S, 9, generator=g)}
    present = {k: torch.rand(B, S, generator=g) < 0.8 for k in z}
    present["s2"][:, 0] = True
    dt = {"s1": torch.randn(B, S, generator=g) * 3}
    offset = torch.randn(B, S, generator=g) * 60
    offset[:, 0] = 0
    return z, present, dt, offset


def test_an_absent_slot_changes_nothing_and_train_mode_equals_eval_mode() -> None:
    model = _model().eval()
    z, present, dt, offset = _inputs()
    for k in present:
        present[k][0, 3] = False  # slot 3 of window 0 is empty...
    with torch.no_grad():
        e = model.fuse(z, present, dt, offset)
        z2 = {k: v.clone() for k, v in z.items()}
        for v in z2.values():
            v[0, 3] = 1e3  # ...so whatever its latents hold does not matter
        assert torch.equal(model.fuse(z2, present, dt, offset), e)
    model.train()
    np.testing.assert_allclose(model.fuse(z, present, dt, offset).detach(), e, atol=1e-5)


def test_a_window_is_embedded_alike_alone_and_among_others() -> None:
    model = _model().eval()
    z, present, dt, offset = _inputs(B=8)
    with torch.no_grad():
        batch = model.fuse(z, present, dt, offset)
        alone = model.fuse({k: v[5:6] for k, v in z.items()}, {k: v[5:6] for k, v in present.items()},
                           {k: v[5:6] for k, v in dt.items()}, offset[5:6])
    np.testing.assert_allclose(alone[0], batch[5], atol=1e-6)


def test_hiding_the_date_reaches_the_embedding_and_prefixes_decode() -> None:
    model = _model().eval()
    z, present, dt, offset = _inputs()
    hidden = {k: v.clone() for k, v in present.items()}
    hidden["s2"][:, 0] = False
    with torch.no_grad():
        e, e_hidden = model.fuse(z, present, dt, offset), model.fuse(z, hidden, dt, offset)
        assert not torch.allclose(e, e_hidden)
        for n in (3, 6):
            assert model.decode_latents(e[:, :n])["s2"].shape == (6, 9)
            assert model.season_values(e[:, :n], offset[:, 1:])["s1"].shape == (6, 4, 2)
    with pytest.raises(ValueError, match="decodes"):
        model.decode_latents(e[:, :4])


# ----------------------------------------------------------------------------- training and embedding
SOURCE = SyntheticSource(n_sites=1, height_px=48, width_px=48, n_days=300, seed=0)
SPLIT = SplitConfig(by="block", blocks=2, fractions=(0.5, 0.25, 0.25), seed=0)
DATA = DataConfig(source=SOURCE, split=SPLIT, sampling=SamplingConfig(window_dates=20, window_stride=8,
                                                                     spatial_stride=4))
DENSE = DenseTrainingConfig(crop_px=16, subsets=1, latents=64, render_frames=2)
TRAIN = TrainConfig(batch_size=32, max_epochs=1, limit_train_batches=2, lr=2e-3, warmup_steps=1, seed=0,
                    progress_bar=False)


@pytest.fixture(scope="module")
def context_run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    out = tmp_path_factory.mktemp("context")
    for k in ("s1", "s2"):
        train_autoencoder(AEStageConfig(sensor=k, preset="tiny-dense", data=DATA, loss=LossConfig(), train=TRAIN,
                                        dense_training=DENSE), run_dir=out / k)
    model = FusionConfig(embed_dim=6, nested=(3, 6), window=WindowConfig(dates=4, span_days=90), d_model=16,
                         n_heads=2, n_layers=1, d_ff=32, dropout=0.0, direct_path=True, season_hidden=8)
    cfg = FusionStageConfig.model_validate({
        "bundles": {k: str(out / k / "bundle.pt") for k in ("s1", "s2")}, "model": model.model_dump(),
        "data": DATA.model_dump(), "dense_training": DENSE.model_dump(), "init": "linear",
        "loss": {"context": {"agreement": 0.5, "hide_date": 0.5}},
        "train": TRAIN.model_copy(update={"limit_train_batches": 3, "val_windows": 64,
                                          "metric_samples": 500}).model_dump(),
    })
    return train_fusion(cfg, run_dir=out / "context")


@pytest.mark.slow
def test_training_leaves_a_bundle_with_metrics_beside_the_baselines(context_run: RunResult) -> None:
    from stembed.models.bundle import load_bundle

    metrics = json.loads((context_run.run_dir / "metrics.json").read_text())
    assert metrics["context"]["prefixes"] == [3, 6] and metrics["linear_start"]["prefix"] == 3
    for split in ("train", "val", "test"):
        for k in ("s1", "s2"):
            m = metrics["splits"][split][k]
            for key in ("centre_mae_3", "centre_mae_6", "season_mae_3", "season_mae_6",
                        "baseline_patch_mean_centre_mae", "baseline_temporal_neighbours_centre_mae",
                        "baseline_date_season_mae", "baseline_pca3_centre_mae", "baseline_pca6_centre_mae"):
                assert m[key] is not None and m[key] >= 0, (split, k, key)
    fusion = load_bundle(context_run.bundle, expect_kind="fusion")
    for k in ("s1", "s2"):  # the autoencoders stayed frozen
        stage1 = load_bundle(context_run.run_dir.parent / k / "bundle.pt")
        for name, v in stage1.state_dict.items():
            assert torch.equal(fusion.state_dict[f"autoencoders.{k}.{name}"], v)
    assert isinstance(fusion.build_model(), ContextFusionModel)


@pytest.mark.slow
def test_tiled_embedding_equals_the_whole_cube_and_prefixes_are_the_first_features(
    context_run: RunResult, tmp_path: Path
) -> None:
    from stembed.errors import UserError
    from stembed.inference.reference import embed_reference
    from stembed.inference.run import embed_cube
    from stembed.io.cube import open_scene, save_scene
    from stembed.io.embeddings import open_embeddings
    from stembed.models.bundle import load_bundle
    from stembed.testing import synthetic_scene

    cube = tmp_path / "scene.zarr"
    save_scene(synthetic_scene(seed=3, height_px=32, width_px=32, n_days=200), cube)  # 4 tiles of 16 px
    full = embed_cube(cube, context_run.bundle, tmp_path / "e.zarr", EmbedConfig(tile_px=16), progress=False)
    short = embed_cube(cube, context_run.bundle, tmp_path / "e3.zarr", EmbedConfig(tile_px=16, features=3),
                       progress=False)
    a, b = open_embeddings(full.out), open_embeddings(short.out)
    assert a.sizes["feature"] == 6 and b.sizes["feature"] == 3
    assert a.attrs["nested"] == [3, 6] and b.attrs["nested"] == [3]
    assert WindowConfig.model_validate(a.attrs["window"]) == WindowConfig(dates=4, span_days=90)
    np.testing.assert_array_equal(a.embedding.values[:, :3], b.embedding.values)
    ref = embed_reference(open_scene(cube), load_bundle(context_run.bundle))
    np.testing.assert_array_equal(np.isnan(ref.embedding.values), np.isnan(a.embedding.values))
    np.testing.assert_allclose(a.embedding.values, ref.embedding.values, atol=1e-4)
    with pytest.raises(UserError, match=r"complete embeddings of \[3, 6\]"):
        embed_cube(cube, context_run.bundle, tmp_path / "e4.zarr", EmbedConfig(features=4), progress=False)
    assert not (tmp_path / "e4.zarr").exists()


@pytest.mark.slow
def test_daily_cloudy_dates_come_from_the_context_model(context_run: RunResult, tmp_path: Path) -> None:
    from stembed.inference.daily import FLAG_MODEL, FLAG_OBSERVED
    from stembed.inference.run import embed_cube
    from stembed.io.cube import save_scene
    from stembed.io.embeddings import open_embeddings
    from stembed.testing import synthetic_scene

    cube = tmp_path / "scene.zarr"
    scene = synthetic_scene(seed=4, height_px=32, width_px=32, n_days=200)
    save_scene(scene, cube)
    res = embed_cube(cube, context_run.bundle, tmp_path / "d.zarr", EmbedConfig(tile_px=32, daily=True),
                     progress=False)
    ds = open_embeddings(res.out)
    flags = ds["flag"].values
    s2 = scene.s2.transpose("time", "band", "y", "x").values
    cloudy = ~np.isfinite(s2).any(axis=1)  # (date, y, x)
    days = (scene.s2.time.values.astype("datetime64[D]") - ds.time.values[0].astype("datetime64[D]")).astype(int)
    assert (flags[days][cloudy] == FLAG_MODEL).all() and (flags[days][~cloudy] == FLAG_OBSERVED).all()
    assert np.isfinite(ds.embedding.values[days][:, 0][cloudy]).all()


@pytest.mark.slow
def test_the_gap_fill_experiment_takes_a_context_bundle(context_run: RunResult, tmp_path: Path) -> None:
    from stembed.eval.gapfill import hide_schedule
    from stembed.eval.gapfill_run import evaluate_gap_fill
    from stembed.io.cube import save_scene
    from stembed.testing import synthetic_scene

    scene = synthetic_scene(seed=7, height_px=24, width_px=24, n_days=300)
    cube = save_scene(scene, tmp_path / "scene.zarr")
    region = (slice(2, 14), slice(3, 15))
    res = evaluate_gap_fill(cube, context_run.bundle, run_lengths=(1, 3), offsets=1, regions=[region])
    rows = res.table[res.table["gap_days"] == "all"].set_index("method")
    assert set(rows.index) == {"model_based", "linear", "savgol"}  # no zero_shot: the model was trained for it
    observed = np.isfinite(scene.s2.values[:, :, region[0], region[1]]).any(axis=1)
    expected = sum(int(observed[hide_schedule(observed.shape[0], k)].sum()) for k in (1, 3))
    assert rows.loc["model_based", "n"] == expected and rows.loc["model_based", "n_missing"] == 0


@pytest.mark.slow
def test_eval_recon_scores_a_context_run_and_its_bundle_on_a_new_store_per_prefix(
    context_run: RunResult, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from stembed.cli import app
    from stembed.io.cube import save_scene
    from stembed.testing import synthetic_scene

    cube = save_scene(synthetic_scene(seed=8, height_px=24, width_px=24, n_days=150), tmp_path / "new.zarr")
    runner = CliRunner()
    for args in ([str(context_run.run_dir)], ["--bundle", str(context_run.bundle), "--cube", str(cube)]):
        out = tmp_path / f"recon{len(args)}"
        res = runner.invoke(app, ["eval", "recon", *args, "--out", str(out)])
        assert res.exit_code == 0, res.output
        table = pd.read_csv(out / "recon.csv")
        test = table[table["split"] == "test"].set_index(["stage", "sensor"])
        for n in (3, 6):
            for k in ("s1", "s2"):
                row = test.loc[(f"fusion ({n} features)", k)]
                assert row["centre_mae"] > 0 and row["baseline_patch_mean_centre_mae"] > 0, (args, n, k)
        assert "| fusion (3 features) | s2 |" in res.output
