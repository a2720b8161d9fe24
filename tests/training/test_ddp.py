"""Scale-out training (issue 15, item 6): DDP over CPU processes (gloo) on the real Belgian patch.

Only CPU DDP is exercised here (two processes on one machine). Multi-GPU (NCCL, bf16-mixed on CUDA) and
multi-node runs go through the same Lightning strategy but are not tested (docs/guide/scale-out.md "Training on several
GPUs or nodes").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from stembed.config import AEStageConfig, ConfigError, TrainConfig, dump_config, load_config
from stembed.data.build import build_sensor_data
from stembed.data.datasets import SensorPatches, patch_loader
from stembed.data.scenes import load_scenes
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import load_bundle
from stembed.training.modules import AutoencoderModule
from stembed.training.run import check_scale_out, follower_rank

# tiny per-patch S2 autoencoder on the real patch: a few seconds of training per process
STAGE: dict[str, Any] = {
    "sensor": "s2",
    "preset": "tiny",
    "loss": {"mae": 1.0},
    "data": {
        "sampling": {"window_dates": 20, "window_stride": 8, "spatial_stride": 8},
        "split": {"by": "block", "blocks": 2, "fractions": [0.5, 0.25, 0.25], "seed": 0},
    },
    "train": {"batch_size": 8, "max_epochs": 1, "limit_train_batches": 2, "warmup_steps": 0, "seed": 0,
              "progress_bar": False},
}


def _stage(belgian_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw = {**STAGE, "data": {**STAGE["data"], "source": {"kind": "worldcereal", "paths": [str(belgian_dir)]}}}
    return {**raw, **sections}


# ----------------------------------------------------------------------------- the CLI, two CPU processes
@pytest.mark.slow
def test_cli_ddp_on_two_cpu_processes_writes_one_bundle_that_embeds(belgian_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "s2.yaml"
    config.write_text(yaml.safe_dump(_stage(belgian_dir)))
    run_dir = tmp_path / "runs" / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # Lightning's ddp launcher runs this same command again for rank 1 (LOCAL_RANK=1), which must neither hit
    # rank 0's run-folder lock nor write anything
    proc = subprocess.run(
        [sys.executable, "-m", "stembed.cli", "train", "s2", "--config", str(config), "--run-dir", str(run_dir),
         "--set", "train.devices=2", "--set", "train.accelerator=cpu", "--set", "train.strategy=ddp"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bundle: ") == 1, proc.stdout  # one rank reports
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]  # no lock left, no second folder
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["bundle.pt", "checkpoints", "config.yaml", "logs", "metrics.json"], names
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"]
    assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()

    bundle = load_bundle(run_dir / "bundle.pt", expect_kind="autoencoder", expect_sensor="s2")
    assert bundle.config["stage"]["train"]["devices"] == 2
    assert all(v.dtype == torch.float32 for v in bundle.state_dict.values() if v.is_floating_point())
    split = bundle.metrics["splits"]["test"]["s2"]
    assert split["n_patches"] > 0 and np.isfinite(split["centre_mae"])

    # embed the real patch's test block with the bundle
    cfg = load_config(AEStageConfig, config)
    model = bundle.build_model().eval()
    assert isinstance(model, SensorAutoencoder)
    data = build_sensor_data(load_scenes(cfg.data), "s2", cfg.data, np.random.default_rng(0),
                             context_px=model.cfg.context_px)
    batch = next(iter(patch_loader(data.datasets["test"], batch_size=16)))
    with torch.no_grad():
        z = model.encode(batch.encoder_input, batch.gaps)
    assert z.shape == (batch.x.shape[0], model.cfg.latent_dim) and torch.isfinite(z).all()


@pytest.mark.slow
def test_fusion_stage_under_ddp_writes_a_bundle_that_embeds_a_cube(belgian_dir: Path, tmp_path: Path) -> None:
    """The fusion stage (frozen autoencoders, dense tiles) on 2 CPU processes, then `stembed embed` with its
    bundle on a crop of the real patch: the path a user takes from a multi-GPU run to an embedding store."""
    from typer.testing import CliRunner

    from stembed.cli import app
    from stembed.config import ae_preset
    from stembed.io.cube import Scene, save_scene
    from stembed.io.embeddings import open_embeddings
    from stembed.io.worldcereal import read_worldcereal
    from stembed.models.bundle import save_bundle
    from stembed.sensors import get_sensor

    torch.manual_seed(0)
    bundles = {}
    for sensor in ("s1", "s2"):  # untrained stage-1 bundles: what fusion does with them is the test
        cfg = ae_preset("tiny-dense", sensor)
        bundles[sensor] = save_bundle(tmp_path / f"{sensor}.pt", kind="autoencoder", sensor=sensor,
                                      model=SensorAutoencoder(cfg), config={"model": dump_config(cfg), "stage": {}},
                                      sensors={sensor: get_sensor(sensor)}, provenance={"note": "random"})
    config = tmp_path / "fusion.yaml"
    config.write_text(yaml.safe_dump({
        "s1_bundle": str(bundles["s1"]), "s2_bundle": str(bundles["s2"]), "preset": "tiny-dense",
        "data": {**STAGE["data"], "source": {"kind": "worldcereal", "paths": [str(belgian_dir)]}},
        "dense_training": {"crop_px": 16, "latents": 32, "render_frames": 2},
        "train": {**STAGE["train"], "batch_size": 16, "devices": 2, "accelerator": "cpu", "strategy": "ddp"},
    }))
    run_dir = tmp_path / "fusion"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "stembed.cli", "train", "fusion", "--config", str(config), "--run-dir", str(run_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bundle: ") == 1, proc.stdout
    bundle = load_bundle(run_dir / "bundle.pt", expect_kind="fusion")
    assert bundle.config["stage"]["train"]["devices"] == 2 and np.isfinite(
        bundle.metrics["splits"]["test"]["s2"]["centre_mae"])

    scene = read_worldcereal(belgian_dir)
    crop = {"y": slice(0, 24), "x": slice(0, 24)}  # the smallest cube the 23 px halo reflects in
    small = {"s2": scene.s2.isel(crop).isel(time=slice(0, 16)), "s1": scene.s1.isel(crop)}
    cube = save_scene(Scene(site=scene.site, sensors=small), tmp_path / "crop.zarr")
    res = CliRunner().invoke(app, ["embed", "--cube", str(cube), "--bundle", str(run_dir / "bundle.pt"),
                                   "--out", str(tmp_path / "emb.zarr"), "--quiet"])
    assert res.exit_code == 0, res.output
    emb = open_embeddings(tmp_path / "emb.zarr")
    valid = emb["valid"].values
    assert valid.any() and np.isfinite(emb["embedding"].values.transpose(1, 0, 2, 3)[:, valid]).all()


# ----------------------------------------------------------------------------- DDP step == full-batch step
LR = 0.5


class _SGDModule(AutoencoderModule):
    """The training module with plain SGD at a fixed rate, so one step is ``w - lr * grad``."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.model.parameters(), lr=LR)


def _one_step(module: AutoencoderModule, items: list[SensorPatches], devices: int) -> None:
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        gradient_clip_val=None,
    )
    # the shard as one batch (a list is a map-style dataset to the DataLoader, if not to its annotations)
    loader = patch_loader(items, batch_size=len(items), shuffle=False)  # type: ignore[arg-type]
    trainer.fit(module, loader)


def _ddp_worker(rank: int, world: int, port: int, setup: str, out: str) -> None:
    """One rank: the shared start, then one DDP step on this rank's half of the global batch."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "NODE_RANK": "0", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    s = torch.load(setup, weights_only=False)
    module = _SGDModule(*s["hparams"])
    module.load_state_dict(s["state"])
    _one_step(module, s["shards"][rank], devices=world)
    torch.save(module.model.state_dict(), out.format(rank=rank))


@pytest.mark.slow
def test_one_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(
    belgian_dir: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    """DDP averages the two ranks' gradients; the loss is a mean over the batch (MAE: a sum over valid entries
    divided by the batch size, SSIM: a mean), so the average of the halves' gradients is the whole batch's."""
    cfg = AEStageConfig.model_validate(_stage(belgian_dir, loss={"mae": 1.0, "ssim": 0.03}))
    model_cfg = cfg.resolved_model().model_copy(update={"dropout": 0.0, "enc_dropout2d": 0.0,
                                                        "dec_dropout2d": 0.0})  # no random masks
    data = build_sensor_data(load_scenes(cfg.data), "s2", cfg.data, np.random.default_rng(0),
                             context_px=model_cfg.context_px)
    ds = data.datasets["train"]
    items = [ds[i] for i in range(8)]  # the fixed global batch
    assert sum(bool(it.valid.all()) for it in items) < 8  # real gaps: the masked MAE is exercised
    torch.manual_seed(0)
    hparams = (model_cfg, cfg.resolved_loss(), cfg.train)
    start = _SGDModule(*hparams)
    init = {k: v.clone() for k, v in start.model.state_dict().items()}
    setup = tmp_path / "setup.pt"
    torch.save({"hparams": hparams, "state": start.state_dict(), "shards": [items[:4], items[4:]]}, setup)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank{rank}.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(setup), out), nprocs=2, join=True)
    ranks = [torch.load(out.format(rank=r), weights_only=True) for r in range(2)]

    single = _SGDModule(*hparams)
    single.load_state_dict(start.state_dict())
    _one_step(single, items, devices=1)
    whole = single.model.state_dict()
    half = _SGDModule(*hparams)  # control: a step on one half only (what a rank alone would take)
    half.load_state_dict(start.state_dict())
    _one_step(half, items[:4], devices=1)

    moved = max(float((whole[k] - init[k]).abs().max()) for k in init)
    off_half = max(float((half.model.state_dict()[k] - whole[k]).abs().max()) for k in init)
    assert moved > 1e-3 and off_half > 1e-4  # the step and the halves' difference are far above the tolerance
    for k in init:
        for r in range(2):
            torch.testing.assert_close(ranks[r][k], whole[k], rtol=1e-5, atol=1e-6, msg=f"rank {r}: {k}")


# ----------------------------------------------------------------------------- config and devices
@pytest.mark.parametrize("override, field", [
    ("train.devices=0", "train.devices"), ("train.devices=-1", "train.devices"), ("train.devices=two", "train.devices"),
    ("train.num_nodes=0", "train.num_nodes"), ("train.strategy=fsdp", "train.strategy"),
    ("train.precision=bf16", "train.precision"), ("train.precision=16-true", "train.precision"),
])
def test_scale_out_fields_are_checked_at_load(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(AEStageConfig, None, ["sensor=s2", override])


def test_scale_out_fields_reach_the_config() -> None:
    cfg = load_config(AEStageConfig, None, ["sensor=s2", "train.devices=auto", "train.num_nodes=2",
                                            "train.strategy=ddp", "train.precision=bf16-mixed"]).train
    assert (cfg.devices, cfg.num_nodes, cfg.strategy, cfg.precision) == ("auto", 2, "ddp", "bf16-mixed")
    assert cfg.distributed and not TrainConfig().distributed


def test_devices_this_machine_lacks_are_refused_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU.*train.accelerator=cpu"):
        check_scale_out(TrainConfig(devices=4))
    with pytest.raises(ConfigError, match="accelerator is 'gpu'"):
        check_scale_out(TrainConfig(devices=2, accelerator="gpu"))
    with pytest.raises(ConfigError, match="16-mixed needs a CUDA GPU.*bf16-mixed"):
        check_scale_out(TrainConfig(precision="16-mixed"))
    with pytest.raises(ConfigError, match="cores"):
        check_scale_out(TrainConfig(devices=(os.cpu_count() or 1) + 1, accelerator="cpu"))
    check_scale_out(TrainConfig(devices=2, accelerator="cpu", precision="bf16-mixed"))  # CPU DDP: allowed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"train.devices=4 but torch sees 2 CUDA GPU\(s\).*train.devices=2"):
        check_scale_out(TrainConfig(devices=4))
    check_scale_out(TrainConfig(devices=2, precision="16-mixed"))


def test_devices_error_from_the_cli_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from stembed.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(app, ["train", "s2", "--run-dir", str(tmp_path / "run"), "--set", "train.devices=4"])
    assert res.exit_code == 2 and "train.devices=4 but torch sees no CUDA GPU" in res.output
    assert list(tmp_path.iterdir()) == []


def test_only_ranks_other_than_zero_of_a_distributed_run_are_followers(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    ddp = TrainConfig(devices=2, accelerator="cpu")
    assert not follower_rank(ddp)
    monkeypatch.setenv("LOCAL_RANK", "0")  # Lightning's launcher sets it in rank 0 too
    assert not follower_rank(ddp)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert follower_rank(ddp) and not follower_rank(TrainConfig())  # a one-process run ignores stray variables
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # rank 0 of the second node
    assert follower_rank(TrainConfig(num_nodes=2))
