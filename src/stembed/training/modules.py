"""LightningModules for the two stages. Only loops and logging live here; models and losses are imported."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from pydantic import BaseModel
from torch import Tensor, nn
from torchmetrics import MeanMetric

from stembed.config import (
    AEConfig,
    DenseTrainingConfig,
    FusionConfig,
    FusionLossConfig,
    LossConfig,
    TrainConfig,
    dump_config,
)
from stembed.data.datasets import FusionPatches, SensorPatches
from stembed.data.tiles import Tiles
from stembed.losses import fusion_loss, reconstruction_loss
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.fusion import ANCHOR, FusionModel, SensorInput, build_fusion, paper_fusion
from stembed.models.gapfill import GapFillModel, hide_centre_filled, hide_centre_raw
from stembed.sensors import CORE_SENSORS
from stembed.training.dense import (
    autoencoder_step,
    draw_windows,
    gather_tokens,
    reconstruct_windows,
    window_tokens,
)
from stembed.training.evaluate import centre_abs_error

MONITOR = "val_centre_mae"
GAP_FILL_MONITOR = "val_embedding_mae"
GAP_FILL_NEEDS = "gap-fill layers (a context fusion embeds cloudy dates itself, from its window)"


def fusion_inputs(
    batch: FusionPatches, model: FusionModel, *, hide_s2_centre: bool = False
) -> dict[str, SensorInput]:
    """A fusion batch as :meth:`FusionModel.embed`'s inputs by sensor (a dense encoder reads the wider ``x_in``
    windows).

    ``hide_s2_centre``: hide the S2 centre frame, as for a cloudy date (see :mod:`stembed.models.gapfill`).
    """
    inputs = {}
    for k in model.sensors:
        p = batch[k]
        x = p.encoder_input
        if k == ANCHOR and hide_s2_centre:
            # patch encoder: filled patches, refilled without the centre; dense: raw windows, filled in the encoder
            x = hide_centre_filled(p.x, p.valid) if p.x_in is None else hide_centre_raw(p.x_in)
        inputs[k] = SensorInput(x, p.gaps, p.dt)
    return inputs


def fusion_targets(batch: FusionPatches, model: FusionModel) -> dict[str, tuple[Tensor, Tensor]]:
    """Each sensor's patches and validity (B, T, C, P, P) in a fusion batch: what its reconstruction is scored on."""
    return {k: (batch[k].x, batch[k].valid) for k in model.sensors}


Batch = SensorPatches | FusionPatches | Tiles
"""A training batch: patches of one sensor (stage 1), of every sensor (fusion), or tiles (dense training)."""


def _centre_metrics(names: list[str]) -> nn.ModuleDict:
    """Epoch means of centre MAE weighted by the number of observed centre values (NaN-safe across batches)."""
    return nn.ModuleDict({f"{p}_{n}": MeanMetric() for p in ("train", "val") for n in names})


def _distributed() -> bool:
    """This process is one of several DDP ranks (so collectives must run on every rank alike)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


def fusion_monitor(centre_mae: Mapping[str, Tensor]) -> Tensor:
    """A fusion's monitor from its sensors' centre MAEs: the mean of S1's and S2's (the paper's). Companions are
    left out, so runs with and without them stop on the same criterion."""
    return torch.stack([centre_mae[k] for k in CORE_SENSORS]).mean()


def _log_centre(module: _StageModule, prefix: str) -> None:
    """Log the epoch's centre MAE(s) and reset them; a fusion also logs its monitor (:func:`fusion_monitor`).

    Under DDP ``compute()`` gathers every rank's sums (a collective), so every rank computes every metric,
    also one it never updated; the values (the monitor of early stopping, the plateau schedule and the best
    checkpoint) are then the same on all ranks.
    """
    values = {}
    for name, metric in module.centre.items():
        assert isinstance(metric, MeanMetric)  # a ModuleDict types its entries as Module
        if name.startswith(prefix + "_"):
            if metric.update_count or _distributed():
                with warnings.catch_warnings():  # a rank without updates: its share is empty, NaN if all are
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                    values[name] = metric.compute()
            else:
                values[name] = torch.tensor(float("nan"))
            metric.reset()
    if module.monitor == MONITOR and f"{prefix}_centre_mae" not in values:
        head = f"{prefix}_centre_mae_"
        per_sensor = {k.removeprefix(head): v for k, v in values.items() if k.startswith(head)}
        values[f"{prefix}_centre_mae"] = fusion_monitor(per_sensor)
    # already equal across ranks (torchmetrics synced them); sync_dist states it and keeps Lightning from warning
    module.log_dict(values, prog_bar=prefix == "val", sync_dist=True)


def _skip_step(module: nn.Module) -> Tensor | None:
    """A training step with nothing to learn from (no observed centre in the tiles).

    One process: None, and Lightning skips it. Under DDP every rank must run backward, because the
    gradient all-reduce is collective (a rank that skips hangs the others): a zero loss reaching every
    trainable parameter instead (zero gradients; AdamW still applies its weight decay on that step).
    """
    if not _distributed():
        return None
    return torch.stack([p.sum() for p in module.parameters() if p.requires_grad]).sum() * 0.0


def _update(metric: nn.Module, x_hat: Tensor, x: Tensor, valid: Tensor) -> None:
    assert isinstance(metric, MeanMetric)  # an entry of a module's ``centre`` (a ModuleDict types it as Module)
    total, count = centre_abs_error(x_hat, x, valid)
    if count > 0:
        metric.update(total / count, weight=count)


def _optimisers(params: list[Tensor], cfg: TrainConfig, monitor: str) -> Any:
    """AdamW, a per-step linear warm-up, and a per-epoch plateau schedule on the validation centre MAE."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=max(1, cfg.warmup_steps)
    )
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr,
        threshold=cfg.min_lr, threshold_mode="abs",
    )
    return (
        [opt],
        [
            {"scheduler": warmup, "interval": "step"},
            # stepped when validation runs (every val_every_n_epochs epochs), so its metric exists
            {"scheduler": plateau, "interval": "epoch", "frequency": cfg.val_every_n_epochs, "monitor": monitor,
             "reduce_on_plateau": True},
        ],
    )


def _plain(cfg: BaseModel | Mapping[str, BaseModel] | None) -> Any:
    """A config (or configs by sensor) as a checkpoint's hyperparameters hold it: plain dicts, None kept."""
    if isinstance(cfg, BaseModel):
        return dump_config(cfg)
    return None if cfg is None else {k: dump_config(v) for k, v in cfg.items()}


class _StageModule(L.LightningModule):
    """Shared loop of both stages: subclasses set ``model``, ``train_cfg``, ``centre`` and write ``_step``.

    ``configs``: the subclass's typed constructor arguments, saved as the checkpoint's hyperparameters in plain
    dicts (so a checkpoint loads with ``weights_only=True``).
    """

    model: nn.Module
    train_cfg: TrainConfig
    centre: nn.ModuleDict

    monitor = MONITOR  # what early stopping, the best checkpoint and the plateau schedule follow

    def __init__(self, **configs: BaseModel | Mapping[str, BaseModel] | None) -> None:
        super().__init__()
        self.save_hyperparameters({k: _plain(v) for k, v in configs.items()})

    def _step(self, batch: Any, prefix: str) -> Tensor | None:
        raise NotImplementedError

    def on_train_epoch_end(self) -> None:
        _log_centre(self, "train")

    def on_validation_epoch_end(self) -> None:
        _log_centre(self, "val")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        return _optimisers([p for p in self.model.parameters() if p.requires_grad], self.train_cfg, self.monitor)


class AutoencoderModule(_StageModule):
    """Stage 1: one sensor's autoencoder trained with the context-aware loss.

    ``dense``: a :class:`~stembed.config.DenseTrainingConfig`; training batches are then tiles
    (:mod:`stembed.training.dense`), validation batches stay patches.
    """

    model: SensorAutoencoder

    def __init__(
        self, model: AEConfig, loss: LossConfig, train: TrainConfig, dense: DenseTrainingConfig | None = None
    ) -> None:
        super().__init__(model=model, loss=loss, train=train, dense=dense)
        self.model = SensorAutoencoder(model)
        self.loss_cfg = loss
        self.train_cfg = train
        self.dense = dense
        self.gen = torch.Generator().manual_seed(self.train_cfg.seed)  # window and frame draws of dense steps
        self.centre = _centre_metrics(["centre_mae"])

    def _dense_step(self, batch: Tiles, prefix: str) -> Tensor | None:
        d = self.dense
        assert d is not None  # only dense training steps here
        step = autoencoder_step(self.model, batch, self.loss_cfg, d.latents, d.render_frames, self.gen)
        if step is None:  # no observed centre in these tiles: skip the step
            return _skip_step(self.model)
        rec, n = step.recon, step.windows.b.numel()  # the first n rendered pairs are the centre frames
        logs = {f"{prefix}_{k}": v for k, v in rec.parts.items() if torch.isfinite(v)}
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=n)
        _update(self.centre[f"{prefix}_centre_mae"], rec.x_hat[:n], rec.targets.x[:n], rec.targets.valid[:n])
        return rec.parts["loss"]

    def _step(self, batch: SensorPatches | Tiles, prefix: str) -> Tensor | None:
        if isinstance(batch, Tiles):
            return self._dense_step(batch, prefix)
        x, valid = batch.x, batch.valid  # (B, T, C, P, P)
        x_hat, _ = self.model(batch.encoder_input, batch.gaps)  # x_in: a dense encoder's wider window
        parts = reconstruction_loss(x_hat, x, valid, self.loss_cfg)
        logs = {f"{prefix}_{k}": v for k, v in parts.items() if torch.isfinite(v)}
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=x.shape[0])
        _update(self.centre[f"{prefix}_centre_mae"], x_hat, x, valid)
        return parts["loss"]



class FusionModule(_StageModule):
    """Stage 2: fusion layers trained on the stage-1 autoencoders (frozen unless the config says otherwise).

    The autoencoder weights are loaded by the caller from the stage-1 bundles right after
    construction; on resume Lightning restores everything from the checkpoint instead.
    """

    model: FusionModel

    def __init__(
        self,
        models: dict[str, AEConfig],
        model: FusionConfig,
        loss: FusionLossConfig,
        train: TrainConfig,
        dense: DenseTrainingConfig | None = None,
    ) -> None:
        super().__init__(models=models, model=model, loss=loss, train=train, dense=dense)
        self.model = paper_fusion(build_fusion(models, model), "FusionModule (a context fusion: ContextFusionModule)")
        self.loss_cfg = loss
        self.train_cfg = train
        self.dense = dense
        self.gen = torch.Generator().manual_seed(self.train_cfg.seed)  # window and frame draws of dense steps
        self.centre = _centre_metrics([f"centre_mae_{k}" for k in self.model.sensors])

    def _dense_step(self, batch: Tiles, prefix: str) -> Tensor | None:
        """Tiles: every sensor's frame CNN runs once over the tile; windows are drawn where the anchor's (S2's)
        centre is observed, and every other sensor is read at the same windows on its matched dates."""
        model, d = self.model, self.dense
        assert d is not None  # only dense training steps here
        aes = model.sensor_autoencoders()
        T, m = model.anchor.cfg.n_frames, model.anchor.cfg.context_px
        win = draw_windows(batch, m, d.latents, self.gen)
        if win.b.numel() == 0:  # no observed S2 centre in these tiles: skip the step
            return _skip_step(self.model)
        c = T // 2
        if batch.anchor_key != ANCHOR:
            raise ValueError(f"fusion tiles must be anchored on {ANCHOR!r} (the embedding's dates), got {batch.anchor_key!r}")
        windows = {k: batch[k].window for k in aes}
        gaps, dt = {ANCHOR: win.gaps}, {}
        anchor_days = torch.gather(batch.anchor.days[win.b], 1, win.frames)  # (N, T) the S2 dates
        for k in aes:
            if k != ANCHOR:
                days = torch.gather(batch[k].days[win.b], 1, win.frames)  # (N, T) the sensor's own days
                gaps[k], dt[k] = torch.diff(days, dim=1), (days[:, c] - anchor_days[:, c]).abs()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not model.frozen):
            z = {
                k: ae.encoder.latent_from_tokens(gather_tokens(window_tokens(ae, windows[k]), win), gaps[k])
                for k, ae in aes.items()
            }
        e = model.fuse(z, dt)
        heads = model.heads
        if prefix == "train" and self.global_step < d.latent_warmup_steps:
            # warm start: give back each frozen encoder's latent, standardised per dimension (nothing decoded)
            err = {k: ((heads[k](e) - z[k]) / z[k].std(dim=0).clamp_min(1e-6).detach()) ** 2 for k in aes}
            total = torch.stack([err[k].mean() for k in aes]).mean()
            self.log(f"{prefix}_latent_warmup", total, on_step=False, on_epoch=True, batch_size=e.shape[0])
            return total
        total = e.new_zeros(())
        logs: dict[str, Tensor] = {}
        for k, ae in aes.items():
            loss_cfg, weight = self.loss_cfg.branch(k)
            rec = reconstruct_windows(ae, heads[k](e), gaps[k], windows[k], batch.inside, win, loss_cfg,
                                      d.render_frames, self.gen)
            total = total + weight * rec.parts["loss"]
            logs |= {f"{prefix}_{k}/{name}": v for name, v in rec.parts.items() if torch.isfinite(v)}
            n = e.shape[0]  # the first n rendered pairs are the centre frames
            _update(self.centre[f"{prefix}_centre_mae_{k}"], rec.x_hat[:n], rec.targets.x[:n], rec.targets.valid[:n])
        self.log_dict({f"{prefix}_loss": total, **logs}, on_step=False, on_epoch=True, batch_size=e.shape[0])
        return total

    def _step(self, batch: FusionPatches | Tiles, prefix: str) -> Tensor | None:
        if isinstance(batch, Tiles):
            return self._dense_step(batch, prefix)
        targets = fusion_targets(batch, self.model)
        rec, e = self.model(fusion_inputs(batch, self.model))
        branches = {k: (rec[k], *targets[k]) for k in self.model.sensors}
        parts = fusion_loss(branches, self.loss_cfg)
        logs = {f"{prefix}_{k}": v for k, v in parts.items() if torch.isfinite(v)}
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=e.shape[0])
        for key, (x_hat, x, valid) in branches.items():
            _update(self.centre[f"{prefix}_centre_mae_{key}"], x_hat, x, valid)
        return parts["loss"]


class GapFillModule(_StageModule):
    """Stage 2b: the filler's fusion layers learn the embedding of a patch whose S2 centre frame is hidden.

    The target is the trained fusion model's embedding of the same patch with the frame visible
    (computed on the fly, no grad). The fusion weights are loaded by the caller after construction.
    """

    monitor = GAP_FILL_MONITOR
    model: GapFillModel

    def __init__(self, models: dict[str, AEConfig], model: FusionConfig, train: TrainConfig) -> None:
        super().__init__(models=models, model=model, train=train)
        self.model = GapFillModel(paper_fusion(build_fusion(models, model), GAP_FILL_NEEDS))
        self.train_cfg = train
        self.centre = nn.ModuleDict({f"{p}_embedding_mae": MeanMetric() for p in ("train", "val")})

    def _step(self, batch: FusionPatches, prefix: str) -> Tensor:
        fusion, filler = self.model.fusion, self.model.filler
        with torch.no_grad():
            target = fusion.embed(fusion_inputs(batch, fusion))  # (B, embed_dim)
        e = filler.embed(fusion_inputs(batch, filler, hide_s2_centre=True))  # (B, embed_dim)
        loss = nn.functional.l1_loss(e, target)
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, batch_size=e.shape[0])
        metric = self.centre[f"{prefix}_embedding_mae"]
        assert isinstance(metric, MeanMetric)  # a ModuleDict types its entries as Module
        metric.update(loss.detach(), weight=e.shape[0])
        return loss
