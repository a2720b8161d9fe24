"""Training data from scene stores (``data.source.kind: scene``), as ``stembed cube`` and ``save_scene`` write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stembed.config import DataConfig, SceneSource, ZarrSource
from stembed.data.scenes import load_scenes
from stembed.io.cube import CubeError, save_cube, save_scene
from stembed.testing import synthetic_scene


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("scenes")
    for i in range(3):
        scene = synthetic_scene(seed=10 + i, height_px=16, width_px=16, n_days=200)
        save_scene(scene, d / f"site{i}.zarr")
    return d


def test_scene_stores_by_path_and_glob_load_every_site(stores: Path) -> None:
    cfg = DataConfig(source=SceneSource(paths=(str(stores / "site0.zarr"), str(stores / "site[12].zarr"))))
    scenes = load_scenes(cfg)
    assert len(scenes) == 3 and len({s.site for s in scenes}) == 3
    ref = synthetic_scene(seed=11, height_px=16, width_px=16, n_days=200)
    assert np.array_equal(scenes[1].s2.values, ref.s2.values, equal_nan=True)
    assert np.array_equal(scenes[1].s1.values, ref.s1.values, equal_nan=True)


def test_a_pattern_that_matches_nothing_or_a_store_named_twice_is_refused(stores: Path) -> None:
    with pytest.raises(CubeError, match="matches no scene store"):
        load_scenes(DataConfig(source=SceneSource(paths=(str(stores / "nope*.zarr"),))))
    with pytest.raises(CubeError, match="twice"):
        load_scenes(DataConfig(source=SceneSource(paths=(str(stores / "site0.zarr"), str(stores / "site0.zarr")))))


def test_a_scene_store_given_as_a_single_sensor_cube_says_which_kind_to_use(stores: Path, tmp_path: Path) -> None:
    with pytest.raises(CubeError, match="kind: scene"):
        load_scenes(DataConfig(source=ZarrSource(s2_paths=(str(stores / "site0.zarr"),))))
    s2 = save_cube(synthetic_scene(seed=1, height_px=16, width_px=16, n_days=80).s2, tmp_path / "s2.zarr")
    with pytest.raises(CubeError, match="both sensors are needed"):
        load_scenes(DataConfig(source=ZarrSource(s2_paths=(str(s2),), s1_paths=(str(s2), str(s2)))))


def test_stembed_train_runs_on_scene_stores(stores: Path, tmp_path: Path) -> None:
    """The stores `stembed cube` writes train with no other step (a two-batch run, split by site)."""
    import yaml
    from typer.testing import CliRunner

    from stembed.cli import app
    from stembed.models.bundle import load_bundle

    cfg = tmp_path / "s2.yaml"
    cfg.write_text(yaml.safe_dump({
        "preset": "tiny",
        "data": {"source": {"kind": "scene", "paths": [str(stores / "site*.zarr")]},
                 "sampling": {"window_dates": 12, "window_stride": 6, "spatial_stride": 4},
                 "split": {"by": "site", "fractions": [0.34, 0.33, 0.33], "seed": 0}},
        "train": {"batch_size": 8, "max_epochs": 1, "limit_train_batches": 2, "progress_bar": False},
    }))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "s2", "--config", str(cfg), "--run-dir", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    bundle = load_bundle(run / "bundle.pt")
    assert sorted(bundle.provenance["data_ids"]) == sorted(
        str(synthetic_scene(seed=10 + i, height_px=16, width_px=16, n_days=200).site) for i in range(3)
    )
    # and the bundle scores on a scene store through `stembed eval recon --bundle --cube`
    out = tmp_path / "recon"
    res = CliRunner().invoke(app, ["eval", "recon", "--bundle", str(run / "bundle.pt"), "--cube",
                                   str(stores / "site0.zarr"), "--cube", str(stores / "site1.zarr"),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    import pandas as pd

    table = pd.read_csv(out / "recon.csv")
    assert list(table["sensor"]) == ["s2"] and int(table["n_patches"].iloc[0]) > 0
    row = table.iloc[0]
    assert 0 < row["centre_mae"] and 0 < row["baseline_patch_mean_centre_mae"] and 0 < row["ssim"] <= 1
    for bad in (["--bundle", str(run / "bundle.pt")], ["--bundle", str(run / "bundle.pt"), str(run), "--cube",
                str(stores / "site0.zarr")], ["--cube", str(stores / "site0.zarr")]):
        res = CliRunner().invoke(app, ["eval", "recon", *bad, "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2 and "--bundle" in res.output, res.output
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("spatial_stride", [None, 4], ids=["as-trained", "stride-4"])
def test_recon_of_a_bundle_trained_with_the_papers_sampling(stores: Path, tmp_path: Path, spatial_stride) -> None:
    """A bundle whose training config left data.sampling out (the paper's sampling, as configs/s1_ae.yaml
    does) scores through `eval recon --bundle`; it used to fail on the missing sampling."""
    from stembed.config import ae_preset, dump_config
    from stembed.eval.recon_bundle import bundle_recon
    from stembed.models.autoencoder import SensorAutoencoder
    from stembed.models.bundle import save_bundle
    from stembed.sensors import S2

    cfg = ae_preset("tiny", "s2")
    data = DataConfig(source=SceneSource(paths=(str(stores / "site0.zarr"),)))
    assert data.sampling is None
    bundle = save_bundle(tmp_path / "bundle.pt", kind="autoencoder", sensor="s2", model=SensorAutoencoder(cfg),
                         config={"model": dump_config(cfg), "stage": {"data": dump_config(data)}},
                         sensors={"s2": S2}, provenance={})
    table = bundle_recon(bundle, [stores / "site1.zarr"], spatial_stride=spatial_stride)
    assert list(table["sensor"]) == ["s2"] and int(table["n_patches"].iloc[0]) > 0
