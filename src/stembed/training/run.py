"""Stage drivers: data -> Lightning fit -> best weights -> metrics.json + bundle.pt in one run folder.

A run folder holds ``config.yaml`` (the resolved stage config), ``checkpoints/{best,last}.ckpt``
(Lightning, for resuming), ``logs/version_N/metrics.csv`` (per-epoch log; N counts resumes), ``metrics.json`` (per split) and
``bundle.pt`` (weights + config + sensors + provenance; the file later stages and ``embed`` read).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from stembed.config import (
    AEConfig,
    AEStageConfig,
    ConfigError,
    DataConfig,
    DenseTrainingConfig,
    FusionStageConfig,
    GapFillStageConfig,
    SamplingConfig,
    TrainConfig,
    WindowConfig,
    dump_config,
)
from stembed.contract import Scene
from stembed.data.build import SplitData, band_stats, train_spectra
from stembed.data.context import ContextBatches, ContextCrops, SplitLatents, context_crops
from stembed.data.datasets import FusionPatchDataset, FusionPatches, SensorPatches, collate, patch_loader
from stembed.data.sampling import SPLITS, SamplingError
from stembed.data.scenes import load_scenes
from stembed.data.tiles import TileDataset, collate_tiles, sample_tiles
from stembed.io.outputs import RUN_CONFIG_HEADER
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import Bundle, BundleConfig, load_bundle, save_bundle, stage1_bundle
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import ANCHOR, FusionBase, FusionModel
from stembed.models.gapfill import GapFillModel
from stembed.repro import config_hash, file_sha256, provenance
from stembed.sensors import CORE_SENSORS, get_sensor
from stembed.training.centre_init import init_centre_pca
from stembed.training.context import (
    ContextFusionModule,
    evaluate_context,
    init_linear_context,
    latent_stats,
    split_latents,
)
from stembed.training.evaluate import evaluate_split, with_pca_baseline
from stembed.training.fusion_init import init_linear_fusion, training_latents
from stembed.training.modules import (
    AutoencoderModule,
    FusionModule,
    GapFillModule,
    fusion_inputs,
    fusion_monitor,
    fusion_targets,
)
from stembed.training.run_folder import StageConfig, split_data


@dataclass(frozen=True)
class RunResult:
    """Where a finished stage left its outputs.

    ``lead`` is False on DDP ranks other than global rank 0: they wrote nothing (``metrics`` is empty) and
    ``run_dir`` is only what that process was given.
    """

    run_dir: Path
    bundle: Path
    metrics: dict[str, Any]
    lead: bool = True


def _follower_result(run_dir: Path) -> RunResult:
    return RunResult(run_dir, run_dir / "bundle.pt", {}, lead=False)


def default_run_dir(cfg: StageConfig) -> Path:
    """``<out_dir>/<stage>/<YYYYmmdd-HHMMSS>-<confighash8>``."""
    stage = f"train-{cfg.sensor}" if isinstance(cfg, AEStageConfig) else f"train-{cfg.stage}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out_dir) / stage / f"{stamp}-{config_hash(dump_config(cfg))}"


def tile_dataset(
    data: SplitData, sampling: SamplingConfig, dense: DenseTrainingConfig, model: AEConfig, rng: np.random.Generator
) -> TileDataset:
    """Dense training: tiles over the training split's regions, on the arrays of its patch dataset."""
    if model.variant != "dense":
        raise ConfigError(
            f"dense_training needs a dense autoencoder but the model is '{model.variant}'; fix: use a dense preset "
            "(e.g. preset: tiny-dense) or drop dense_training"
        )
    ds = data.datasets["train"]
    if isinstance(ds, FusionPatchDataset):  # S2 drives the tiles; S1 and companions are on its dates
        sensors, anchor = ds.sensors, ds.anchor
    else:  # stage 1: the model's own sensor alone
        sites = ds.sites  # type: ignore[attr-defined]  # a per-sensor PatchDataset here
        sensors, anchor = {model.sensor: sites}, model.sensor
    days = [s.days for s in sensors[anchor]]
    tiles = sample_tiles(days, data.regions["train"], sampling, dense.crop_px, dense.subsets, rng)
    return TileDataset(sensors, tiles, sampling.window_dates, dense.crop_px, model.context_px, anchor=anchor,
                       batch_size=dense.tiles_per_batch)


def _as_is(batch: Any) -> Any:
    """A context dataset yields whole batches: nothing to stack."""
    return batch


def _loaders(data: SplitData, cfg: TrainConfig) -> dict[str, DataLoader[Any]]:
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffling order comes from the config seed
    out: dict[str, DataLoader[Any]] = {}
    for name, ds in data.datasets.items():
        if isinstance(ds, ContextBatches):  # draws its own batches, seeded (see stembed.data.context)
            out[name] = DataLoader(ds, batch_size=None, num_workers=0, collate_fn=_as_is)
            continue
        out[name] = DataLoader(
            ds, batch_size=getattr(ds, "batch_size", cfg.batch_size), shuffle=name == "train",
            generator=gen if name == "train" else None,
            num_workers=cfg.num_workers, drop_last=False,
            # typed items are stacked into batches of their type
            collate_fn=collate_tiles if isinstance(ds, TileDataset) else collate,
        )
    return out


# set by Lightning's DDP launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK, GROUP_RANK) or srun (SLURM_PROCID)
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def follower_rank(cfg: TrainConfig) -> bool:
    """This process is a rank other than global rank 0 of a distributed run, known before the trainer exists.

    Lightning's ``ddp`` launcher runs the same command again for ranks 1.., torchrun and srun start every
    rank themselves; all of them set the rank variables above. Only global rank 0 owns the run folder
    (lock, ``config.yaml``, checkpoints, ``metrics.json``, ``bundle.pt``); the others train and write nothing.
    Read only when ``cfg`` asks for several processes, so a stray variable cannot silence a one-process run.
    """
    if not cfg.distributed:
        return False
    return any(os.environ.get(k, "0").strip() not in ("", "0") for k in _RANK_VARS)


def check_scale_out(cfg: TrainConfig) -> None:
    """Refuse devices or a precision this machine cannot give, before anything is written.

    Raises:
        ConfigError: more GPUs than torch sees, several devices with no GPU and ``accelerator: auto`` (ambiguous:
            CPU processes were rarely meant), more CPU processes than cores, or ``16-mixed`` without a GPU.
    """
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and n_gpus > 0)
    devices = cfg.devices
    if cfg.accelerator == "gpu" and n_gpus == 0:
        raise ConfigError("train.accelerator is 'gpu' but torch sees no CUDA GPU; fix: --set train.accelerator=auto "
                          "(or cpu)")
    if on_gpu and isinstance(devices, int) and devices > n_gpus:
        raise ConfigError(
            f"train.devices={devices} but torch sees {n_gpus} CUDA GPU(s) on this node; fix: --set "
            f"train.devices={n_gpus} (or auto: all of them), or run on a node with {devices} GPUs"
        )
    if not on_gpu:
        if isinstance(devices, int) and devices > 1 and cfg.accelerator == "auto":
            raise ConfigError(
                f"train.devices={devices} but torch sees no CUDA GPU; fix: run on a node with {devices} GPUs, or "
                f"--set train.accelerator=cpu to train with {devices} CPU processes"
            )
        cores = os.cpu_count() or 1
        if isinstance(devices, int) and devices > cores:
            raise ConfigError(
                f"train.devices={devices} CPU processes but this machine has {cores} cores; fix: --set "
                f"train.devices={cores} (or fewer)"
            )
        if cfg.precision == "16-mixed":
            raise ConfigError(
                "train.precision=16-mixed needs a CUDA GPU (CPU autocast has no float16 training); fix: --set "
                "train.precision=bf16-mixed (or 32-true)"
            )


def _trainer(run_dir: Path, cfg: TrainConfig, n_train_batches: int, monitor: str) -> L.Trainer:
    callbacks: list[L.Callback] = [
        EarlyStopping(monitor=monitor, mode="min", patience=cfg.early_stop_patience),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="min",
                        save_top_k=1, save_last=True),
    ]
    if cfg.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, n_train_batches // 10)))
    return L.Trainer(
        max_epochs=cfg.max_epochs,
        max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None,
        check_val_every_n_epoch=cfg.val_every_n_epochs,
        accelerator="auto" if cfg.accelerator == "auto" else cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        gradient_clip_val=cfg.grad_clip,
        logger=CSVLogger(save_dir=run_dir, name="logs"),  # logs/version_N: a resume starts a new file
        callbacks=callbacks,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, n_train_batches)),
        limit_train_batches=cfg.limit_train_batches,
        num_sanity_val_steps=0,
    )


def _prepare_run_dir(run_dir: Path, cfg_dict: dict[str, Any], resume: Path | None, train: TrainConfig) -> None:
    check_scale_out(train)
    if follower_rank(train):  # global rank 0 checked and wrote the run folder
        return
    if resume is None and (run_dir / "bundle.pt").exists():
        raise FileExistsError(
            f"{run_dir} already holds a finished run (bundle.pt); choose another --run-dir or resume with "
            f"--resume {run_dir / 'checkpoints' / 'last.ckpt'}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(RUN_CONFIG_HEADER + "\n" + yaml.safe_dump(cfg_dict, sort_keys=False))


_Stage = TypeVar("_Stage", AutoencoderModule, FusionModule, GapFillModule, ContextFusionModule)


def _fit(module: _Stage, data: SplitData, cfg: TrainConfig, run_dir: Path, resume: Path | None) -> _Stage | None:
    """Fit, then load the best checkpoint's weights back into ``module``.

    Returns None on DDP ranks other than global rank 0: they trained their share and stop there (only rank 0
    evaluates and writes metrics.json and bundle.pt, so no rank waits on another after the fit).
    """
    if len(data.datasets["val"]) == 0:  # type: ignore[arg-type]  # torch's Dataset declares no __len__; ours all have one
        raise SamplingError("the validation split is empty; early stopping needs one (check data.split.fractions)")
    loaders = _loaders(data, cfg)
    trainer = _trainer(run_dir, cfg, len(loaders["train"]), module.monitor)
    if resume is not None and not resume.is_file():
        raise FileNotFoundError(f"checkpoint {resume} does not exist; resume from a run's checkpoints/last.ckpt")
    with warnings.catch_warnings():
        # DDP: some conv weights are channels-last, so their gradients are copied into the all-reduce buckets
        # (a little slower, not wrong); said once per rank and step otherwise
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=str(resume) if resume else None)
    if not trainer.is_global_zero:
        return None
    ckpt = trainer.checkpoint_callback
    best = Path(ckpt.best_model_path) if isinstance(ckpt, ModelCheckpoint) else None
    if best and best.is_file():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return module.cpu().eval()


def _split_metrics(data: SplitData, cfg: TrainConfig, reconstruct: Any, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every split's metrics with the PCA-``k`` baseline fitted on the train split (k: the model's size), and
    what that baseline was."""
    loaders = {
        name: patch_loader(ds, batch_size=max(cfg.batch_size, 64), shuffle=False) for name, ds in data.datasets.items()
    }
    centres: dict[str, dict[str, np.ndarray]] = {}
    splits = {
        name: evaluate_split(loaders[name], reconstruct, centres.setdefault(name, {}))
        for name in SPLITS
        if len(data.datasets[name])  # type: ignore[arg-type]  # torch's Dataset declares no __len__; ours all have one
    }
    return splits, with_pca_baseline(splits, centres, k)


def _write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _start_run(cfg: StageConfig, run_dir: Path | None, resume: Path | None) -> Path:
    """The run folder (``run_dir``, the resumed checkpoint's, or a new default one), prepared by global rank 0, and
    the run's seeds set (the run boundary: init and dropout draws)."""
    run_dir = Path(run_dir) if run_dir else (resume.parent.parent if resume else default_run_dir(cfg))
    _prepare_run_dir(run_dir, dump_config(cfg), resume, cfg.train)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    return run_dir


def _train_on_tiles(data: SplitData, sampling: SamplingConfig, dense: DenseTrainingConfig, model: AEConfig,
                    seed: int) -> None:
    """Dense training: the train split becomes tiles over its regions (callers keep its patches for the metrics)."""
    data.datasets["train"] = tile_dataset(data, sampling, dense, model, np.random.default_rng(seed))
    data.info["splits"]["train"]["n_tiles"] = len(data.datasets["train"])  # type: ignore[arg-type]  # torch's Dataset declares no __len__; ours all have one


def train_autoencoder(
    cfg: AEStageConfig, *, run_dir: Path | None = None, resume: Path | None = None
) -> RunResult:
    """Stage 1 for one sensor."""
    run_dir = _start_run(cfg, run_dir, resume)
    scenes = load_scenes(cfg.data)
    model_cfg = cfg.resolved_model()
    data = split_data(BundleConfig(kind="autoencoder", models={cfg.sensor: model_cfg}), scenes, cfg.data,
                      np.random.default_rng(cfg.train.seed))
    if cfg.standardise_inputs and model_cfg.input_mean is None:
        mean, std = band_stats(data)
        model_cfg = AEConfig.model_validate({**model_cfg.model_dump(), "input_mean": mean, "input_std": std})
    spectra = train_spectra(data) if cfg.init == "centre_pca" and resume is None else None
    patch_train = data.datasets["train"]  # the train split's metrics stay per patch
    if cfg.dense_training is not None:
        _train_on_tiles(data, cfg.data.resolved_sampling(cfg.sensor), cfg.dense_training, model_cfg, cfg.train.seed)
    module = AutoencoderModule(model_cfg, cfg.resolved_loss(), cfg.train, cfg.dense_training)
    start = init_centre_pca(module.model, spectra, cfg.init_scale) if spectra is not None else {}
    started = time.perf_counter()
    fitted = _fit(module, data, cfg.train, run_dir, resume)
    if fitted is None:
        return _follower_result(run_dir)
    model = fitted.model
    data.datasets["train"] = patch_train

    splits, pca = _split_metrics(data, cfg.train, autoencoder_reconstruct(model, cfg.sensor), model_cfg.latent_dim)
    metrics = {
        "stage": f"ae-{cfg.sensor}",
        "train_seconds": round(time.perf_counter() - started, 1),
        **({"centre_pca_start": start} if start else {}),
        "splits": splits,
        "baseline_pca": pca,
        "data": data.info,
    }
    _write_metrics(run_dir, metrics)
    bundle = save_bundle(
        run_dir / "bundle.pt", kind="autoencoder", sensor=cfg.sensor, model=model,
        config=BundleConfig(kind="autoencoder", models={cfg.sensor: model_cfg}, stage=dump_config(cfg)).to_dict(),
        sensors={cfg.sensor: get_sensor(cfg.sensor)},
        provenance=provenance([s.site for s in scenes], {"sites": {s.site: s.s2.attrs.get("provenance") for s in scenes}}),
        metrics=metrics,
    )
    return RunResult(run_dir, bundle, metrics)


def _stage1_bundles(cfg: FusionStageConfig) -> dict[str, Bundle]:
    """Every sensor's stage-1 bundle, in token order: S1, S2, then the companions in data.extra_sensors order;
    all must read windows of one size (the anchor's)."""
    if set(cfg.companions) != set(cfg.data.extra_sensors):
        raise ConfigError(
            f"bundles names companion sensors {sorted(cfg.companions)} but data.extra_sensors names "
            f"{sorted(cfg.data.extra_sensors)}; fix: give one stage-1 bundle per companion sensor, same keys"
        )
    stage1 = {
        k: stage1_bundle(cfg.bundles[k], k) for k in (*CORE_SENSORS, *cfg.data.extra_sensors)
    }
    anchor = stage1[ANCHOR].cfg.models[ANCHOR]
    for key, b in stage1.items():
        a = b.cfg.models[key]
        if a.context_px != anchor.context_px:
            raise ConfigError(
                f"the {key.upper()} autoencoder ({b.path}) reads {a.input_px} px windows but the S2 one "
                f"({cfg.bundles[ANCHOR]}) reads {anchor.input_px} px; fix: train all with the same variant (e.g. all "
                "'tiny-dense')"
            )
    return stage1


_Fusion = TypeVar("_Fusion", bound=FusionBase)


def _frozen(model: _Fusion, stage1: dict[str, Bundle]) -> _Fusion:
    """``model`` with its autoencoders' weights from the stage-1 bundles (they stay frozen)."""
    for k, b in stage1.items():
        model.autoencoders[k].load_state_dict(b.state_dict)
    return model


@dataclass(frozen=True)
class _LinearStart:
    """A fusion's linear start: what it was (metrics.json's ``linear_start``, its validation metrics under ``val``)
    and its weights."""

    info: dict[str, Any]
    state: dict[str, torch.Tensor]


def _linear_start(model: FusionModel, patches: Any, val: Any, cfg: FusionStageConfig) -> _LinearStart:
    """``init: linear``: fit the linear fusion on the training split's latents (``patches``: its patch dataset) and
    score it on ``val``; its weights are kept, as training may not improve on it."""
    batch_size = max(cfg.train.batch_size, 64)
    z, gaps = training_latents(model, patch_loader(patches, batch_size=batch_size, shuffle=False))
    weights = {k: cfg.loss.branch(k)[1] for k in model.sensors}
    start: dict[str, Any] = {"n_latents": int(z[ANCHOR].shape[0]), **init_linear_fusion(model, z, gaps, weights)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    start["val"] = evaluate_split(patch_loader(val, batch_size=batch_size), fusion_reconstruct(model.eval()))
    return _LinearStart(start, state)


def autoencoder_reconstruct(model: SensorAutoencoder, sensor: str) -> Any:
    """batch -> {sensor: (x_hat, x, valid)} for :func:`evaluate_split` (x_in: a dense encoder's wider window)."""

    def reconstruct(batch: SensorPatches) -> dict[str, Any]:
        x_hat, _ = model(batch.encoder_input, batch.gaps)
        return {sensor: (x_hat, batch.x, batch.valid)}

    return reconstruct


def fusion_reconstruct(model: FusionModel) -> Any:
    """batch -> {sensor: (x_hat, x, valid)} for :func:`evaluate_split`."""

    def reconstruct(batch: FusionPatches) -> dict[str, Any]:
        rec, _ = model(fusion_inputs(batch, model))
        return {k: (rec[k], *xv) for k, xv in fusion_targets(batch, model).items()}

    return reconstruct


def _monitor(split: dict[str, Any]) -> float:
    """A fusion split's monitor, as training's (:func:`fusion_monitor`), from its metrics."""
    return float(fusion_monitor({k: torch.tensor(m["centre_mae"], dtype=torch.float64) for k, m in split.items()}))


def _fusion_metrics(
    model: FusionModel, data: SplitData, cfg: FusionStageConfig, start: _LinearStart | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every split's metrics and the PCA baseline; where training did not improve on the linear start on validation,
    the start is the model (chosen on validation: its ``info`` then says ``kept``)."""
    k = cfg.resolved_model().embed_dim
    splits, pca = _split_metrics(data, cfg.train, fusion_reconstruct(model), k)
    if start is not None and _monitor(start.info["val"]) < _monitor(splits["val"]):
        model.load_state_dict(start.state)
        splits, pca = _split_metrics(data, cfg.train, fusion_reconstruct(model), k)
        start.info["kept"] = True
    return splits, pca


def train_fusion(cfg: FusionStageConfig, *, run_dir: Path | None = None, resume: Path | None = None) -> RunResult:
    """Stage 2: fusion layers on the stage-1 bundles named in ``cfg`` (S1, S2, companions)."""
    stage1 = _stage1_bundles(cfg)
    run_dir = _start_run(cfg, run_dir, resume)
    scenes = load_scenes(cfg.data)
    models = {k: b.cfg.models[k] for k, b in stage1.items()}
    fusion_cfg = cfg.resolved_model()
    data = split_data(BundleConfig(kind="fusion", models=models, fusion_model=fusion_cfg), scenes, cfg.data,
                      np.random.default_rng(cfg.train.seed))
    if fusion_cfg.window is not None:
        return _train_context(cfg, stage1, scenes, data, run_dir, resume)
    patch_train = data.datasets["train"]  # the train split's metrics stay per patch
    if cfg.dense_training is not None:
        _train_on_tiles(data, cfg.data.resolved_sampling(ANCHOR), cfg.dense_training, models[ANCHOR], cfg.train.seed)
    module = FusionModule(models, fusion_cfg, cfg.loss, cfg.train, cfg.dense_training)
    _frozen(module.model, stage1)
    started = time.perf_counter()
    start: _LinearStart | None = None
    if cfg.init == "linear" and resume is None:
        start = _linear_start(module.model, patch_train, data.datasets["val"], cfg)
    fitted = _fit(module, data, cfg.train, run_dir, resume)
    if fitted is None:
        return _follower_result(run_dir)
    data.datasets["train"] = patch_train
    splits, pca = _fusion_metrics(fitted.model, data, cfg, start)
    metrics = {
        "stage": "fusion",
        "train_seconds": round(time.perf_counter() - started, 1),
        **({"linear_start": start.info} if start else {}),
        "splits": splits,
        "baseline_pca": pca,
        "data": data.info,
    }
    return _save_fusion(run_dir, cfg, stage1, scenes, fitted.model, metrics)


def _save_fusion(
    run_dir: Path, cfg: FusionStageConfig, stage1: dict[str, Bundle], scenes: list[Scene], model: FusionBase,
    metrics: dict[str, Any],
) -> RunResult:
    """Write a fusion run's metrics.json and bundle.pt (the stage-1 models' configs, the fusion layers')."""
    _write_metrics(run_dir, metrics)
    models = {k: b.cfg.models[k] for k, b in stage1.items()}
    config = BundleConfig(kind="fusion", models=models, fusion_model=cfg.resolved_model(), stage=dump_config(cfg))
    bundle = save_bundle(
        run_dir / "bundle.pt", kind="fusion", sensor=None, model=model, config=config.to_dict(),
        sensors={k: v for b in stage1.values() for k, v in b.sensors.items()},
        provenance=provenance(
            [s.site for s in scenes], {f"{k}_bundle_sha256": file_sha256(b.path or cfg.bundles[k]) for k, b in stage1.items()},
        ),
        metrics=metrics,
    )
    return RunResult(run_dir, bundle, metrics)


_CropLatents = dict[str, tuple[ContextCrops, SplitLatents]]
"""Each split's crops and the frozen latents of their every pixel-date (``training.context.split_latents``)."""


def _split_latents(model: ContextFusionModel, data: SplitData, crop_px: int) -> _CropLatents:
    """The crops of every split that has regions, and their frozen latents."""
    sensors = data.datasets["train"].sensors  # type: ignore[attr-defined]  # the fusion split's FusionPatchDataset
    out = {}
    for name in SPLITS:
        if data.regions[name]:
            crops = context_crops(sensors, data.regions[name], crop_px, model.anchor.cfg.context_px)
            out[name] = (crops, split_latents(model, crops))
    return out


def _context_batches(
    model: ContextFusionModel, splits: _CropLatents, window: WindowConfig, cfg: FusionStageConfig
) -> tuple[ContextBatches, ContextBatches]:
    """The train and val windows: train draws about one window per observed anchor pixel-date each epoch, val a
    fixed ``train.val_windows``."""
    n_frames, B = model.anchor.cfg.n_frames, cfg.train.batch_size
    train = ContextBatches(*splits["train"], window, cfg.loss.context, n_frames, batch_size=B,
                           batches=max(1, int(np.ceil(splits["train"][1].present[ANCHOR].sum() / B))),
                           seed=cfg.train.seed, train=True)
    val = ContextBatches(*splits["val"], window, cfg.loss.context, n_frames, batch_size=B,
                         batches=max(1, -(-cfg.train.val_windows // B)), seed=cfg.train.seed, train=False)
    return train, val


def _train_context(
    cfg: FusionStageConfig, stage1: dict[str, Bundle], scenes: list[Scene], data: SplitData, run_dir: Path,
    resume: Path | None,
) -> RunResult:
    """Stage 2 with a window (:mod:`stembed.training.context`): the frozen latents of every pixel-date of each split
    once, then the fusion layers on windows of them; metrics beside the trivial and PCA-k baselines."""
    fusion_cfg = cfg.resolved_model()
    window = fusion_cfg.window
    assert window is not None  # train_fusion's branch
    dense = cfg.dense_training or DenseTrainingConfig()
    module = ContextFusionModule({k: b.cfg.models[k] for k, b in stage1.items()}, fusion_cfg, cfg.loss, cfg.train,
                                 dense)
    model = _frozen(module.model, stage1)
    started = time.perf_counter()
    splits = _split_latents(model, data, dense.crop_px)
    latent_seconds = round(time.perf_counter() - started, 1)
    if resume is None:  # a resumed run restores them from its checkpoint
        mean, std = latent_stats(splits["train"][1], model.sensors)
        model.latent_mean.copy_(mean)
        model.latent_std.copy_(std)
    train, val = _context_batches(model, splits, window, cfg)
    start: dict[str, Any] = {}
    if cfg.init == "linear" and resume is None:
        start = init_linear_context(model, train, {k: cfg.loss.branch(k)[1] for k in model.sensors},
                                    seed=cfg.train.seed)
    fit_data = SplitData({"train": train, "val": val}, data.patches, data.regions, data.info)
    fitted = _fit(module, fit_data, cfg.train, run_dir, resume)
    if fitted is None:
        return _follower_result(run_dir)
    model = fitted.model
    train_seconds = round(time.perf_counter() - started, 1)
    split_metrics, pca = evaluate_context(model, splits, max_samples=cfg.train.metric_samples, seed=cfg.train.seed)
    metrics = {
        "stage": "fusion",
        "context": {"window": dump_config(window), "prefixes": list(model.prefixes),
                    "latent_seconds": latent_seconds, "train_windows_per_epoch": len(train) * cfg.train.batch_size},
        "train_seconds": train_seconds,
        **({"linear_start": start} if start else {}),
        "splits": split_metrics,
        "baseline_pca": pca,
        "data": data.info,
    }
    return _save_fusion(run_dir, cfg, stage1, scenes, model, metrics)


def _gapfill_fusion(cfg: GapFillStageConfig) -> Bundle:
    """The fusion bundle the gap-fill layers train on, checked to have been trained on the same data (its companion
    sensors and its data section: another split could put its test patches into this training)."""
    fb = load_bundle(cfg.fusion_bundle, expect_kind="fusion")
    extra = fb.cfg.companions
    if tuple(cfg.data.extra_sensors) != extra:
        raise ConfigError(
            f"the fusion bundle {cfg.fusion_bundle} uses companion sensors {list(extra)} but data.extra_sensors is "
            f"{list(cfg.data.extra_sensors)}; fix: use the fusion stage's data section"
        )
    if fb.cfg.stage.get("data") and DataConfig.model_validate(fb.cfg.stage["data"]) != cfg.data:
        raise ConfigError(
            f"data differs from the data the fusion bundle {cfg.fusion_bundle} was trained on, so its test split "
            "could leak into training; fix: copy the fusion stage's data section (its config.yaml)"
        )
    return fb


@torch.no_grad()
def _gapfill_errors(model: GapFillModel, loader: DataLoader[Any]) -> dict[str, float]:
    """A split's mean embedding error, against the fusion's embedding of the observed date, of the filler and of
    the fusion itself (``zero_shot``), both with the S2 centre frame hidden."""
    sums = {"gap_fill": 0.0, "zero_shot": 0.0}
    n = 0
    for batch in loader:
        target = model.fusion.embed(fusion_inputs(batch, model.fusion))
        hidden = fusion_inputs(batch, model.fusion, hide_s2_centre=True)
        sums["gap_fill"] += float((model.filler.embed(hidden) - target).abs().mean(1).sum())
        sums["zero_shot"] += float((model.fusion.embed(hidden) - target).abs().mean(1).sum())
        n += target.shape[0]
    return {f"{k}_embedding_mae": v / max(n, 1) for k, v in sums.items()} | {"n_patches": n}


def train_gapfill(cfg: GapFillStageConfig, *, run_dir: Path | None = None, resume: Path | None = None) -> RunResult:
    """Stage 2b: fusion layers for cloudy dates on a trained fusion bundle (see :mod:`stembed.models.gapfill`).

    metrics.json holds, per split, the embedding MAE of the trained filler and of the fusion model
    itself run with the S2 centre frame hidden (``zero_shot``): what the training bought.
    """
    fb = _gapfill_fusion(cfg)
    fusion = fb.cfg
    run_dir = _start_run(cfg, run_dir, resume)
    scenes = load_scenes(cfg.data)
    assert fusion.fusion_model is not None  # a fusion bundle (expect_kind)
    module = GapFillModule(fusion.models, fusion.fusion_model, cfg.train)
    module.model.fusion.load_state_dict(fb.state_dict)
    module.model.filler.load_state_dict(fb.state_dict)  # start from the trained fusion layers
    data = split_data(fusion, scenes, cfg.data, np.random.default_rng(cfg.train.seed))
    started = time.perf_counter()
    fitted = _fit(module, data, cfg.train, run_dir, resume)
    if fitted is None:
        return _follower_result(run_dir)
    metrics = {
        "stage": "gapfill",
        "train_seconds": round(time.perf_counter() - started, 1),
        "splits": {
            name: _gapfill_errors(fitted.model, patch_loader(ds, batch_size=max(cfg.train.batch_size, 64)))
            for name, ds in data.datasets.items() if len(ds)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; ours all have one
        },
        "data": data.info,
    }
    _write_metrics(run_dir, metrics)
    bundle = save_bundle(
        run_dir / "bundle.pt", kind="gapfill", sensor=None, model=fitted.model,
        config={"fusion": fusion.to_dict(), "stage": dump_config(cfg)},
        sensors=fb.sensors,
        provenance=provenance(
            [s.site for s in scenes],
            {"fusion_bundle_sha256": file_sha256(cfg.fusion_bundle), "fusion_provenance": fb.provenance},
        ),
        metrics=metrics,
    )
    return RunResult(run_dir, bundle, metrics)
