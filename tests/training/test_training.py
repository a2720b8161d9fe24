"""End-to-end training: the demo's three stages (fewer epochs), bundles, metrics, resume, frozen AEs."""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

from stembed.config import (
    AEStageConfig,
    FusionLossConfig,
    LossConfig,
    TrainConfig,
    ae_preset,
    dump_config,
    fusion_preset,
)
from stembed.demo import demo_configs, run_demo
from stembed.models.bundle import BundleError, load_bundle, save_bundle
from stembed.models.fusion import FusionModel, SensorInput
from stembed.training.modules import AutoencoderModule, FusionModule
from stembed.training.run import RunResult, train_autoencoder


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunResult]:
    # the demo's flow on smaller sites, with fewer steps (the demo itself trains 4 epochs on 48 px sites)
    return run_demo(tmp_path_factory.mktemp("demo"), max_epochs=1, embed_px=24, site_px=32, limit_train_batches=4)


@pytest.mark.slow
def test_demo_leaves_three_bundles_and_metrics(demo_runs: dict[str, RunResult]) -> None:
    for stage in ("s1", "s2", "fusion"):
        run = demo_runs[stage]
        assert run.bundle == run.run_dir / "bundle.pt" and run.bundle.is_file()
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
        sensors = ("s1", "s2") if stage == "fusion" else (stage,)
        for split in ("train", "val", "test"):
            for sensor in sensors:
                m = metrics["splits"][split][sensor]
                assert m["n_patches"] > 0
                for key in ("centre_mae", "centre_sam", "ssim", "baseline_patch_mean_centre_mae",
                            "baseline_temporal_neighbours_centre_mae", "baseline_pca_centre_mae"):
                    assert m[key] is not None and m[key] >= 0, (stage, split, sensor, key)
        size = 7 if stage == "fusion" else {"s1": 2, "s2": 9}[stage]
        assert metrics["baseline_pca"]["k"] == size and metrics["baseline_pca"]["fitted_on"] == "train"
        assert (run.run_dir / "config.yaml").is_file()
        assert (run.run_dir / "logs" / "version_0" / "metrics.csv").is_file()
        assert (run.run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_demo_ends_with_an_embedding_cube_and_pca_maps_of_the_test_site(demo_runs: dict[str, RunResult]) -> None:
    from stembed.io.embeddings import open_embeddings

    out = demo_runs["fusion"].run_dir.parent / "embed"
    ds = open_embeddings(out / "embeddings.zarr")  # refuses an unfinished store
    test_site = demo_runs["fusion"].metrics["data"]["splits"]["test"]["groups"][0]["site"]
    assert ds.attrs["input"]["site"] == test_site
    assert ds["embedding"].sizes["y"] == 24 and ds["embedding"].sizes["x"] == 24
    assert ds["valid"].values.mean() > 0.5
    pngs = sorted((out / "pca").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert json.loads((out / "pca" / "pca.json").read_text())


@pytest.mark.slow
def test_splits_are_grouped_by_site(demo_runs: dict[str, RunResult]) -> None:
    splits = demo_runs["s2"].metrics["data"]["splits"]
    sites = {k: {g["site"] for g in v["groups"]} for k, v in splits.items()}
    assert sites["train"].isdisjoint(sites["val"]) and sites["train"].isdisjoint(sites["test"])
    assert sites["val"].isdisjoint(sites["test"])


@pytest.mark.slow
def test_fusion_training_leaves_stage1_weights_bit_identical(demo_runs: dict[str, RunResult]) -> None:
    fusion = load_bundle(demo_runs["fusion"].bundle, expect_kind="fusion")
    for sensor in ("s1", "s2"):
        stage1 = load_bundle(demo_runs[sensor].bundle, expect_kind="autoencoder", expect_sensor=sensor)
        prefix = f"autoencoders.{sensor}."
        fused = {k[len(prefix):]: v for k, v in fusion.state_dict.items() if k.startswith(prefix)}
        assert fused.keys() == stage1.state_dict.keys()
        for k, v in stage1.state_dict.items():
            assert torch.equal(fused[k], v), f"{sensor} weight {k} changed during fusion training"
    # ... while the fusion layers did train: they differ from a freshly initialised fusion model's
    assert fusion.provenance["s1_bundle_sha256"] and fusion.provenance["s2_bundle_sha256"]


@pytest.mark.slow
def test_bundles_rebuild_from_their_own_config(demo_runs: dict[str, RunResult]) -> None:
    b = load_bundle(demo_runs["fusion"].bundle)
    model = b.build_model()
    assert isinstance(model, FusionModel)
    assert b.sensors["s2"].bands[0] == "B02" and b.sensors["s1"].bands == ("VV", "VH")
    assert b.provenance["versions"]["torch"].startswith("2.13")
    batch = 3
    w = model.anchor.cfg.input_px  # the demo's models are dense: 47 px windows
    x1, x2 = torch.rand(batch, 11, 2, w, w), torch.rand(batch, 11, 10, w, w)
    gaps = torch.full((batch, 10), 5.0)
    with torch.no_grad():
        e = model.embed({"s1": SensorInput(x1, gaps, torch.zeros(batch)), "s2": SensorInput(x2, gaps)})
    assert e.shape == (batch, 7) and torch.isfinite(e).all()


@pytest.mark.slow
def test_wrong_sensor_and_unknown_format_are_refused(demo_runs: dict[str, RunResult], tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="holds an Sentinel-1 autoencoder, but an Sentinel-2 autoencoder is needed"):
        load_bundle(demo_runs["s1"].bundle, expect_kind="autoencoder", expect_sensor="s2")
    with pytest.raises(BundleError, match="holds a fusion model"):
        load_bundle(demo_runs["fusion"].bundle, expect_kind="autoencoder")
    raw = torch.load(demo_runs["s2"].bundle, weights_only=True)
    raw["format"] = "stembed-bundle/99"
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(BundleError, match="bundle format 'stembed-bundle/99'"):
        load_bundle(tmp_path / "future.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BundleError, match="is not a stembed bundle"):
        load_bundle(tmp_path / "junk.pt")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.pt")


def test_save_bundle_is_atomic(tmp_path: Path) -> None:
    class Unsaveable(torch.nn.Module):
        def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
            return {"w": torch.zeros(1)}

    target = tmp_path / "bundle.pt"
    target.write_bytes(b"previous")
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_bundle(target, kind="autoencoder", sensor="s2", model=Unsaveable(), config={"x": lambda: 0},
                    sensors={}, provenance={})
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]


def test_stage_modules_take_typed_configs_and_keep_plain_hyperparameters() -> None:
    """The checkpoint's hyperparameters stay plain dicts, so a checkpoint loads with ``weights_only=True``."""
    a1, a2 = ae_preset("tiny", "s1"), ae_preset("tiny", "s2")
    ae = AutoencoderModule(a2, LossConfig(), TrainConfig())
    assert ae.model.cfg is a2 and dict(ae.hparams) == {
        "model": dump_config(a2), "loss": dump_config(LossConfig()), "train": dump_config(TrainConfig()), "dense": None}
    fusion = FusionModule({"s1": a1, "s2": a2}, fusion_preset("tiny"), FusionLossConfig(), TrainConfig())
    assert fusion.hparams["models"] == {"s1": dump_config(a1), "s2": dump_config(a2)}
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(fusion.hparams)}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["hyper_parameters"] == dict(fusion.hparams)


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(tmp_path: Path) -> None:
    cfg = demo_configs(tmp_path, max_epochs=1, site_px=32, limit_train_batches=3)["s2"]
    first = train_autoencoder(cfg, run_dir=tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        train_autoencoder(cfg, run_dir=tmp_path / "run")
    longer = AEStageConfig.model_validate({**cfg.model_dump(), "train": {**cfg.train.model_dump(), "max_epochs": 2}})
    resumed = train_autoencoder(longer, resume=first.run_dir / "checkpoints" / "last.ckpt")
    assert resumed.run_dir == first.run_dir
    logs = sorted((first.run_dir / "logs").glob("version_*/metrics.csv"))
    assert len(logs) == 2  # the resumed run logs to a new file and leaves the first one intact
    epochs = []
    for log in logs:
        with open(log) as f:
            epochs.append({int(row["epoch"]) for row in csv.DictReader(f) if row.get("val_centre_mae")})
    assert epochs == [{0}, {1}]
