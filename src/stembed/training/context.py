"""Stage 2 with context: the fusion layers of :class:`~stembed.models.context.ContextFusionModel`, trained on the
frozen stage-1 latents of every pixel-date of each split (computed once: :func:`split_latents`), and the
metrics of a trained one beside the baselines every run shows.

The objective, per nested prefix of the embedding (``cfg.prefixes``; the two terms below weigh on each prefix as
``context.date_weights`` and ``context.season_weights`` say, equally by default), is

* the date's reconstruction: the paper's context-weighted loss of each sensor's patch on the date's stage-1
  window, decoded by the frozen autoencoders from the prefix (the centre frame plus sampled others,
  :func:`stembed.training.dense.reconstruct_windows`; a sample whose own S2 is hidden is rebuilt from its
  window alone);
* ``context.season`` x the centre pixel's bands on the window's dates, decoded from the prefix and each date's
  day offset (every sensor, MAE in cube units, each at its branch weight);

plus ``context.agreement`` x VICReg between the embeddings of two views on a slice of the features (by default
those past the first prefix): two random subsets of one date's window, or, with ``context.agreement_days``, the
windows of two dates of the pixel at most that many days apart, so that slice describes the season, not the date.
Each term's share is a config value, so the ablation table (docs/results/context.md) is a set of ``--set``
overrides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stembed.config import AEConfig, DenseTrainingConfig, FusionConfig, FusionLossConfig, TrainConfig
from stembed.data.context import ContextBatch, ContextBatches, ContextCrops, ContextView, SplitLatents
from stembed.data.windows import asof_depth
from stembed.inference.engine import asof_latents, block_latents, sensor_present
from stembed.losses import masked_mae, vicreg
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import ANCHOR, build_fusion
from stembed.training.dense import PatchStats, Windows, patch_stats, reconstruct_windows
from stembed.training.evaluate import PCABaseline
from stembed.training.fusion_init import centre_jacobian_metric, linear_fusion
from stembed.training.modules import _centre_metrics, _StageModule, _update


# ----------------------------------------------------------------------------- latents, once
@torch.no_grad()
def split_latents(model: ContextFusionModel, crops: ContextCrops, *, batch_size: int = 1024) -> SplitLatents:
    """Every sensor's frozen latent and presence at every pixel-date of a split's crops (padded dates absent); for a
    trailing window also the latents as they stood on each date (:class:`~stembed.data.context.SplitLatents`)."""
    R, T = crops.days[ANCHOR].shape
    P = crops.crop_px**2
    aes = model.sensor_autoencoders()
    z = {k: np.zeros((R, T, ae.cfg.latent_dim, P), dtype=np.float32) for k, ae in aes.items()}
    present = {k: np.zeros((R, T, P), dtype=bool) for k in z}
    trailing = model.cfg.window is not None and model.cfg.window.side == "trailing"
    depth = asof_depth(model.anchor.cfg.n_frames)
    recent = ({k: np.full((R, T, depth + 1, ae.cfg.latent_dim, P), np.nan, dtype=np.float32) for k, ae in aes.items()}
              if trailing else None)
    device = next(model.parameters()).device
    for r in range(R):
        block = crops.block(r)
        n = int(crops.n_time[r])
        if recent is None:
            for k, v in block_latents(model, block, batch_size=batch_size, device=device).items():
                z[k][r, :n] = v.reshape(n, v.shape[1], P)
        else:
            for k, v in asof_latents(model, block, batch_size=batch_size, device=device).items():
                rec = recent[k][r, :n] = v.reshape(n, depth + 1, v.shape[2], P)
                # the centred latent of date d is the one as of d + depth; the last dates' are never read as such
                # (a window of t reads `recent` within depth of t), so they keep their latent as of the end
                z[k][r, : n - depth] = rec[depth:, depth]
                z[k][r, n - depth : n] = rec[n - 1, depth - 1 :: -1]
        for k, v in sensor_present(block, crops.margin).items():
            present[k][r, :n] = v.reshape(n, P)
    return SplitLatents(z, present, recent)


def latent_stats(latents: SplitLatents, sensors: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of each latent dimension over the observed S2 pixel-dates (the concatenated
    latents in token order), to standardise the fusion's inputs."""
    seen = latents.present[ANCHOR]  # (R, T, P)
    cols = []
    for k in sensors:
        z = np.moveaxis(latents.z[k], 2, -1)[seen]  # (N, L)
        cols.append(z)
    x = np.concatenate(cols, axis=1).astype(np.float64)
    return torch.tensor(x.mean(0), dtype=torch.float32), torch.tensor(np.maximum(x.std(0), 1e-6), dtype=torch.float32)


@torch.no_grad()
def init_linear_context(model: ContextFusionModel, data: ContextBatches, weights: Mapping[str, float],
                        n: int = 4096, seed: int = 0) -> dict[str, Any]:
    """``init: linear`` for a context fusion: its first nested prefix starts as the best linear fusion of the
    date's own latents in the frozen decoders' metric (:func:`stembed.training.fusion_init.linear_fusion`), through
    the direct path and that prefix's heads (the whole embedding's heads read those features the same way and
    the rest at zero); the transformer path of those features starts at zero, the other features as built.

    Needs ``latent_mean``/``latent_std`` set: the direct path reads standardised latents.
    """
    pick = np.random.default_rng(seed).permutation(data.pool[0].size)[:n]
    batch = data.sample(pick)
    keys = list(model.sensors)
    aes = model.sensor_autoencoders()
    z = {k: batch.inputs.z[k][:, 0] for k in keys}  # (N, L_k) the date's own latents
    blocks = [weights[k] * centre_jacobian_metric(aes[k], z[k], batch.gaps[k]) for k in keys]
    k0 = model.prefixes[0]
    mean, enc, dec = linear_fusion(torch.cat([z[k] for k in keys], dim=1), torch.block_diag(*blocks), k0)
    mu, sd = model.latent_mean, model.latent_std  # (L,)
    model.direct.weight[:k0] = (sd[:, None] * enc).T  # scores = (z - mean) @ enc, z = zs * sd + mu
    model.direct.bias[:k0] = (mu - mean) @ enc
    model.to_embedding.weight[:k0] = 0.0
    model.to_embedding.bias[:k0] = 0.0
    start = 0
    for k in keys:
        width = z[k].shape[1]
        part = dec[:, start : start + width]  # (k0, L_k)
        for size in model.prefixes:
            head = model.head(k, size)
            assert isinstance(head, nn.Linear)  # the heads are linear maps
            head.weight.zero_()
            head.weight[:, :k0] = part.T
            head.bias.copy_(mean[start : start + width])
        start += width
    return {"n_latents": int(pick.size), "prefix": k0}


# ----------------------------------------------------------------------------- the objective
def _windows(batch: ContextBatch, repeat: int) -> Windows:
    """The batch's date windows as dense training's :class:`Windows` (one per sample), ``repeat`` times over."""
    b = batch.crop.repeat(repeat)
    return Windows(b, torch.zeros_like(b), batch.pixel.repeat(repeat), batch.frames.repeat(repeat, 1),
                   batch.gaps[ANCHOR].repeat(repeat, 1))


def _fuse(model: ContextFusionModel, view: ContextView) -> Tensor:
    return model.fuse(view.z, view.present, view.dt, view.offset, view.day)


def prefix_weights(weights: tuple[float, ...] | None, prefixes: tuple[int, ...], name: str) -> list[float]:
    """Each nested prefix's weight of a term (``weights``, or 1 each), normalised to sum 1."""
    w = list(weights) if weights is not None else [1.0] * len(prefixes)
    if len(w) != len(prefixes) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"loss.context.{name} needs one weight >= 0 per nested prefix {list(prefixes)}, got {w}")
    return [x / sum(w) for x in w]


def context_loss(
    model: ContextFusionModel, batch: ContextBatch, loss: FusionLossConfig, render_frames: float, gen: torch.Generator,
    stats: Mapping[str, PatchStats] | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, tuple[Tensor, Tensor, Tensor]]]:
    """The objective of one batch (module docstring): ``(total, logged parts, centre)``, where ``centre`` holds
    each sensor's (x_hat, x, valid) of the first prefix's centre frames on the samples whose date was visible.
    ``stats``: each sensor's :class:`~stembed.training.dense.PatchStats` of the batch's crops, if known."""
    terms, prefixes = loss.context, model.prefixes
    e = _fuse(model, batch.inputs)  # (B, E)
    offset, day = batch.inputs.offset[:, 1:], batch.inputs.day[:, 1:]  # (B, K) the window's dates
    win = _windows(batch, 1)
    total = e.new_zeros(())
    logs: dict[str, Tensor] = {}
    centre: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    seen = ~batch.hidden
    date_w = prefix_weights(terms.date_weights, prefixes, "date_weights")
    season_w = prefix_weights(terms.season_weights, prefixes, "season_weights")
    season = e.new_zeros(())
    for i, n in enumerate(prefixes):
        z = model.decode_latents(e[:, :n])  # sensor -> (B, L_k)
        for k, ae in model.sensor_autoencoders().items():
            cfg, weight = loss.branch(k)
            rec = reconstruct_windows(ae, z[k], batch.gaps[k], batch.crops.values[k], batch.crops.inside, win, cfg,
                                      render_frames, gen, None if stats is None else stats[k])
            total = total + date_w[i] * weight * rec.parts["loss"]
            logs |= {f"{k}/{name}_{n}": v for name, v in rec.parts.items() if torch.isfinite(v)}
            if i == 0:
                centre[k] = (rec.x_hat[: e.shape[0]][seen], rec.targets.x[: e.shape[0]][seen],
                             rec.targets.valid[: e.shape[0]][seen])
        if terms.season:
            values = model.season_values(e[:, :n], offset, day)  # sensor -> (B, K, C)
            part = torch.stack([loss.branch(k)[1] * masked_mae(values[k], batch.season[k]) for k in values]).sum()
            logs[f"season_mae_{n}"] = part
            season = season + season_w[i] * part
    if terms.season:
        total = total + terms.season * season
    if terms.agreement and batch.view_b is not None:
        lo, hi = agreement_slice(model, terms.agreement_features)
        parts = vicreg(e[:, lo:hi], _fuse(model, batch.view_b)[:, lo:hi])
        logs |= {f"agreement/{name}": v for name, v in parts.items()}
        total = total + terms.agreement * parts["loss"]
    logs["loss"] = total
    return total, logs, centre


def agreement_slice(model: ContextFusionModel, features: tuple[int, int] | None) -> tuple[int, int]:
    """The features the agreement term applies to: ``features``, or those past the first nested prefix (all
    features without nesting)."""
    E, prefixes = model.cfg.embed_dim, model.prefixes
    lo, hi = features if features is not None else ((prefixes[0], E) if len(prefixes) > 1 else (0, E))
    if not 0 <= lo < hi <= E:
        raise ValueError(f"agreement_features must be [start, stop) within the {E} features, got {(lo, hi)}")
    return lo, hi


class ContextFusionModule(_StageModule):
    """Stage 2 with context (module docstring); the autoencoders' weights are loaded by the caller, and the
    training batches come from :class:`~stembed.data.context.ContextBatches`."""

    monitor = "val_loss"
    model: ContextFusionModel
    _patch_stats: dict[tuple[int, ...], dict[str, PatchStats]]  # per crops (see _stats)

    def __init__(
        self,
        models: dict[str, AEConfig],
        model: FusionConfig,
        loss: FusionLossConfig,
        train: TrainConfig,
        dense: DenseTrainingConfig | None = None,
    ) -> None:
        super().__init__(models=models, model=model, loss=loss, train=train, dense=dense)
        fusion = build_fusion(models, model)
        if not isinstance(fusion, ContextFusionModel):
            raise ValueError("ContextFusionModule needs a fusion config with a window")
        self.model = fusion
        self.loss_cfg = loss
        self.train_cfg = train
        self.render_frames = (dense if dense is not None else DenseTrainingConfig()).render_frames
        self.gen = torch.Generator().manual_seed(self.train_cfg.seed)  # frames rendered per window
        self.centre = _centre_metrics([f"centre_mae_{k}" for k in self.model.sensors])
        self._patch_stats = {}

    def _stats(self, crops: ContextCrops) -> dict[str, PatchStats]:
        """The crops' patch statistics, computed on their first step (the crops are the same every step; a batch
        carries them by reference, so their storage identifies them)."""
        key = tuple(v.data_ptr() for v in crops.values.values())
        if key not in self._patch_stats:
            m, p = crops.margin, self.model.anchor.cfg.patch_px
            self._patch_stats[key] = {k: patch_stats(v, crops.inside, m, p) for k, v in crops.values.items()}
        return self._patch_stats[key]

    def _step(self, batch: ContextBatch, prefix: str) -> Tensor:
        total, logs, centre = context_loss(self.model, batch, self.loss_cfg, self.render_frames, self.gen,
                                           self._stats(batch.crops))
        self.log_dict({f"{prefix}_{k}": v for k, v in logs.items()}, on_step=False, on_epoch=True,
                      batch_size=batch.size, prog_bar=False)
        for k, (x_hat, x, valid) in centre.items():
            _update(self.centre[f"{prefix}_centre_mae_{k}"], x_hat, x, valid)
        return total


# ----------------------------------------------------------------------------- metrics of a trained model
def _centre_values(crops: ContextCrops, sensor: str, batch: ContextBatch) -> Tensor:
    """Each sample's centre pixel on every frame of its stage-1 window: (B, T, C), NaN missing."""
    c, m = crops.crop_px, crops.margin
    py, px = batch.pixel // c + m, batch.pixel % c + m
    v = crops.values[sensor][batch.crop[:, None], batch.frames, :, py[:, None], px[:, None]]  # (B, T, C)
    return v


def _trivial(crops: ContextCrops, stats: PatchStats, batch: ContextBatch, sensor: str) -> dict[str, Tensor]:
    """The trivial centre predictions (B, C) of :func:`stembed.training.evaluate.baselines` without gathering the
    patches: each band's mean over the window's observed patch values inside the split region (box sums), and the
    mean of the centre pixel on the two neighbouring frames (the patch mean where neither is observed)."""
    at = stats.per_date[batch.crop[:, None], batch.frames, :, (batch.pixel // crops.crop_px)[:, None],
                        (batch.pixel % crops.crop_px)[:, None]].sum(dim=1)  # (B, 2C)
    C = at.shape[1] // 2
    patch_mean = at[:, :C] / at[:, C:].clamp_min(1)
    centre = _centre_values(crops, sensor, batch)  # (B, T, C)
    t = centre.shape[1] // 2
    nb = centre[:, [t - 1, t + 1]]  # (B, 2, C)
    n = torch.isfinite(nb).sum(dim=1)
    neighbours = torch.where(n > 0, torch.nan_to_num(nb).sum(dim=1) / n.clamp_min(1), patch_mean)
    return {"patch_mean": patch_mean, "temporal_neighbours": neighbours}


@torch.no_grad()
def evaluate_context(
    model: ContextFusionModel,
    splits: Mapping[str, tuple[ContextCrops, SplitLatents]],
    *,
    max_samples: int = 20000,
    batch_size: int = 1024,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every split's centre-pixel MAE per sensor and nested prefix, and its season decoder's; beside the trivial
    baselines (patch mean, temporal neighbours; the date's own bands for the season) and PCA-k of the train split's
    centre values (k per prefix). Returns ``(splits, pca)``.

    At most ``max_samples`` observed pixel-dates per split (a seeded uniform draw), deterministic windows.
    """
    model = model.eval()
    aes = model.sensor_autoencoders()
    out: dict[str, Any] = {}
    centres: dict[str, dict[str, np.ndarray]] = {}
    patch_px = model.anchor.cfg.patch_px
    for name, (crops, latents) in splits.items():
        terms = FusionLossConfig().context.model_copy(update={"hide_date": 0.0, "agreement": 0.0})
        data = ContextBatches(crops, latents, model.cfg.window, terms,  # type: ignore[arg-type]  # set for a context model
                              model.anchor.cfg.n_frames, batch_size=batch_size, batches=1, seed=seed, train=False)
        n = data.pool[0].size
        order = np.random.default_rng(seed).permutation(n)[:max_samples]
        acc = _Accumulator()
        rows: dict[str, list[np.ndarray]] = {k: [] for k in aes}
        stats = {k: patch_stats(v, crops.inside, crops.margin, patch_px) for k, v in crops.values.items()}
        for i in range(0, order.size, batch_size):
            batch = data.sample(order[i : i + batch_size])  # the window's own targets, the date visible
            e = _fuse(model, batch.inputs)
            for k, ae in aes.items():
                centre = _centre_values(crops, k, batch)  # (B, T, C)
                target = centre[:, centre.shape[1] // 2]  # (B, C): the date's own centre pixel
                for n_f in model.prefixes:
                    z = model.head(k, n_f)(e[:, :n_f])
                    acc.add(k, f"centre_mae_{n_f}", ae.decode_centre(z, batch.gaps[k]), target)
                    season = model.season_values(e[:, :n_f], batch.inputs.offset[:, 1:], batch.inputs.day[:, 1:])[k]
                    acc.add(k, f"season_mae_{n_f}", season, batch.season[k])
                for b_name, pred in _trivial(crops, stats[k], batch, k).items():
                    acc.add(k, f"baseline_{b_name}_centre_mae", pred, target)
                # the season decoder's trivial baseline: the date's own bands on every date of its window
                acc.add(k, "baseline_date_season_mae", target[:, None, :].expand_as(batch.season[k]), batch.season[k])
                rows[k].append(target.double().numpy())
        out[name] = {k: {"n_pixel_dates": int(order.size), **acc.result(k)} for k in aes}
        centres[name] = {k: np.concatenate(v) for k, v in rows.items()}
    pca: dict[str, Any] = {}
    if "train" in centres:
        for n_f in model.prefixes:
            try:
                fitted = PCABaseline.fit(centres["train"], n_f)
            except ValueError as err:
                pca[str(n_f)] = {"skipped": str(err)}
                continue
            for name, rows_ in centres.items():
                for k, mae in fitted.centre_mae(rows_).items():
                    out[name][k][f"baseline_pca{n_f}_centre_mae"] = mae
            pca[str(n_f)] = {"k": n_f, "fitted_on": "train", "n_rows": fitted.n_fitted, "sensors": list(fitted.widths)}
    return out, pca


class _Accumulator:
    """Sums and counts of absolute errors over observed values, per sensor and metric."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str], float] = {}
        self.counts: dict[tuple[str, str], float] = {}

    def _add(self, key: tuple[str, str], err: Tensor) -> None:
        ok = torch.isfinite(err)
        self.sums[key] = self.sums.get(key, 0.0) + float(err[ok].sum())
        self.counts[key] = self.counts.get(key, 0.0) + float(ok.sum())

    def add(self, sensor: str, metric: str, pred: Tensor, target: Tensor) -> None:
        """|pred - target| over the finite targets (any shape: (B, C) centres, (B, K, C) window values)."""
        self._add((sensor, metric), (pred - target).abs())

    def result(self, sensor: str) -> dict[str, float | None]:
        """Every metric of a sensor: its mean (None where nothing was observed)."""
        return {m: (self.sums[(s, m)] / self.counts[(s, m)] if self.counts[(s, m)] else None)
                for (s, m) in self.sums if s == sensor}
