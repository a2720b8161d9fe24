"""``open_run``: a finished run folder reopened (config, bundle, the splits training saw), and what is not one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import stembed
from stembed.config import (
    AEStageConfig,
    DataConfig,
    FusionStageConfig,
    SamplingConfig,
    SplitConfig,
    SyntheticSource,
    TrainConfig,
    ae_preset,
)
from stembed.data.datasets import FusionPatchDataset, patch_loader
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import save_bundle
from stembed.models.fusion import FusionModel
from stembed.sensors import PLUGINS, SENSORS, get_sensor, register_sensor
from stembed.testing import random_fusion_bundle, toy_sensor_plugin
from stembed.training.evaluate import evaluate_split
from stembed.training.run import fusion_reconstruct, train_autoencoder, train_fusion
from stembed.training.run_folder import RunError, open_run

DATA = DataConfig(
    source=SyntheticSource(n_sites=1, height_px=32, width_px=32, n_days=365, seed=11),
    sampling=SamplingConfig(window_dates=14, window_stride=3, spatial_stride=8),
    split=SplitConfig(by="block", blocks=2, fractions=(0.5, 0.25, 0.25), seed=0),
)
FAST = TrainConfig(batch_size=16, max_epochs=1, lr=1e-3, warmup_steps=5, progress_bar=False, accelerator="cpu",
                   limit_train_batches=2, seed=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A trained S2 autoencoder run, and a fusion run with the toy companion sensor on stage-1 autoencoders
    with random weights (what is reopened is the run folder, not what the model learnt)."""
    before_s, before_p = dict(SENSORS), dict(PLUGINS)
    register_sensor(toy_sensor_plugin())
    d = tmp_path_factory.mktemp("runs")
    s2 = train_autoencoder(AEStageConfig(sensor="s2", preset="tiny", data=DATA, train=FAST), run_dir=d / "s2")
    torch.manual_seed(0)
    stage1 = {"s2": s2.bundle}
    for k in ("s1", "toy"):
        a = ae_preset("tiny", k)
        stage1[k] = save_bundle(d / f"{k}.pt", kind="autoencoder", sensor=k, model=SensorAutoencoder(a),
                                config={"model": a.model_dump(mode="json")}, sensors={k: get_sensor(k)},
                                provenance={"note": "random weights"})
    fusion = train_fusion(
        FusionStageConfig(bundles={k: str(v) for k, v in stage1.items()}, preset="tiny",
                          data=DATA.model_copy(update={"extra_sensors": ("toy",)}), train=FAST),
        run_dir=d / "fusion",
    )
    yield {"s2": s2.run_dir, "fusion": fusion.run_dir}
    SENSORS.clear()
    SENSORS.update(before_s)
    PLUGINS.clear()
    PLUGINS.update(before_p)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_a_stage1_run_reopens_with_its_config_bundle_and_splits(runs: dict[str, Path]) -> None:
    run = stembed.open_run(runs["s2"])
    assert isinstance(run.config, AEStageConfig) and run.config.sensor == "s2" and run.config.train.seed == 3
    assert run.config.data == DATA
    assert run.bundle.kind == "autoencoder" and run.bundle.sensor == "s2"
    assert run.data().info == metrics(runs["s2"])["data"]  # the same patches in the same splits


@pytest.mark.slow
def test_a_fusion_run_rebuilds_its_companion_sensor_and_the_test_metrics(runs: dict[str, Path]) -> None:
    run = open_run(runs["fusion"])
    assert isinstance(run.config, FusionStageConfig) and run.config.data.extra_sensors == ("toy",)
    assert run.bundle.kind == "fusion"
    data = run.data()
    recorded = metrics(runs["fusion"])
    assert data.info == recorded["data"]
    test_data = data.datasets["test"]
    assert isinstance(test_data, FusionPatchDataset) and set(test_data.sensors) == {"s2", "s1", "toy"}
    model = run.bundle.build_model()
    assert isinstance(model, FusionModel)
    test = evaluate_split(patch_loader(test_data, batch_size=64), fusion_reconstruct(model))
    assert set(test) == {"s1", "s2", "toy"}
    for sensor, m in test.items():  # the figures training wrote, from the rebuilt patches
        assert m["n_patches"] == recorded["splits"]["test"][sensor]["n_patches"]
        assert m["centre_mae"] == pytest.approx(recorded["splits"]["test"][sensor]["centre_mae"], rel=1e-5)


def test_a_folder_that_is_not_a_finished_run_is_named_with_the_fix(tmp_path: Path) -> None:
    def refused(folder: Path, match: str) -> None:
        with pytest.raises(RunError, match=match) as e:
            open_run(folder)
        assert "\n" not in str(e.value) and "fix:" in str(e.value)

    refused(tmp_path / "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "has no config.yaml")
    header = "# stembed run config: the resolved stage config of this run folder (written by `stembed train`)\n"
    for name, config in (("foreign", "stage: embed\ntile_px: 64\n"), ("notes", "- a\n- b\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(config)
        refused(tmp_path / name, "is not a training stage's config")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(header + yaml.safe_dump({"stage": "ae", "sensor": "s2"}))
    refused(unfinished, "has no bundle.pt: its training did not finish")
    random_fusion_bundle(unfinished / "bundle.pt", tiny=True)
    refused(unfinished, "mixes two runs: config.yaml is a stage 'ae' config for s2 but bundle.pt holds a fusion bundle")
