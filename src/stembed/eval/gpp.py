"""Daily flux-tower GPP from 90-day feature windows: the paper's transformer, baselines, splits, metrics (spec §6).

What a *window* is: :class:`Windows` holds ``N`` windows of ``T`` days and ``F`` features, each with the
offset of every day from the window's first day, the target (GPP on the window's last day), that end
date and the site. :meth:`Windows.from_make_windows` wraps the output of
:func:`stembed.eval.gpp_data.make_windows` (gap-free daily windows, so offsets are ``0..T-1``).

Differences from the authors' code (section A of the spec):

- the transformer is given its time encoding (a learned embedding of "days since window start"),
  which the authors' training and plotting never passed;
- GPP is standardised with the *training* windows' target mean and std (the authors hard-coded
  global constants), and so are the features (per feature, training windows); both are buffers of
  the model, so a fitted model predicts in the original units on its own;
- no 16-bit mixed precision: the model is small and float32 keeps CPU and CUDA fits alike.

Models compared on the *same* windows (same target days): the transformer, ridge regression on the
flattened window, and a day-of-year climatology of the training targets. :func:`run_gpp_experiment`
runs all three for several feature sets ("embedding", "raw_bands", "ndvi", ...) and returns one
tidy table of NRMSE (RMSE / range of observed GPP, original units), RMSE, R2 and bias, per site and
pooled.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

# ----------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Windows:
    """``N`` feature windows with their targets.

    Attributes:
        x: ``(N, T, F)`` float32 features, day by day.
        days: ``(N, T)`` int64 offset of each day from the window's first day (``0..T-1`` for
            gap-free daily windows); the transformer's time encoding reads these.
        target: ``(N,)`` float32 GPP on the window's last day.
        end_date: ``(N,)`` the date of that last day (the target day).
        site: ``(N,)`` site id of each window.
    """

    x: np.ndarray
    days: np.ndarray
    target: np.ndarray
    end_date: pd.DatetimeIndex
    site: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 3:
            raise ValueError(f"Windows.x must be (N, T, F), got shape {self.x.shape}")
        n, t, _ = self.x.shape
        if self.days.shape != (n, t):
            raise ValueError(f"Windows.days must be (N, T) = {(n, t)} like x, got {self.days.shape}")
        for name in ("target", "end_date", "site"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Windows.{name} has {len(getattr(self, name))} entries but x has {n} windows")

    @classmethod
    def from_make_windows(
        cls, made: tuple[np.ndarray, np.ndarray, pd.DatetimeIndex], site: str
    ) -> Windows:
        """Wrap ``make_windows(...)``'s ``(x, target, end_dates)`` for one site (daily windows: offsets 0..T-1)."""
        x, target, ends = made
        x = np.asarray(x, dtype=np.float32)
        days = np.broadcast_to(np.arange(x.shape[1], dtype=np.int64), x.shape[:2]).copy()
        return cls(x, days, np.asarray(target, dtype=np.float32), pd.DatetimeIndex(ends, name="date"),
                   np.full(len(x), site, dtype=object))

    @classmethod
    def concat(cls, parts: Sequence[Windows]) -> Windows:
        """All windows of ``parts`` in order (same window length and feature count required)."""
        if not parts:
            raise ValueError("nothing to concatenate: give at least one Windows")
        shapes = {p.x.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"windows differ in (days, features): {sorted(shapes)}; build them with one length and "
                             "one feature set")
        return cls(
            np.concatenate([p.x for p in parts]), np.concatenate([p.days for p in parts]),
            np.concatenate([p.target for p in parts]),
            pd.DatetimeIndex(np.concatenate([p.end_date.values for p in parts]), name="date"),
            np.concatenate([p.site for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.target)

    def take(self, which: np.ndarray) -> Windows:
        """The windows selected by a boolean mask or an index array."""
        return Windows(self.x[which], self.days[which], self.target[which], self.end_date[which], self.site[which])

    @property
    def n_features(self) -> int:
        """Features per date (F of the windows' (N, T, F) inputs)."""
        return int(self.x.shape[2])


def split_by_years(
    windows: Windows, train_years: Sequence[int], val_years: Sequence[int]
) -> tuple[Windows, Windows]:
    """Train and validation windows by the year of each window's END date (the target day), as the paper.

    A window that starts in December 2019 and ends in January 2020 belongs to 2020. Windows whose
    end year is in neither list are dropped.
    """
    overlap = sorted(set(train_years) & set(val_years))
    if overlap:
        raise ValueError(f"year(s) {overlap} are in both train_years and val_years; give disjoint years")
    year = windows.end_date.year.to_numpy()
    return windows.take(np.isin(year, list(train_years))), windows.take(np.isin(year, list(val_years)))


def leave_one_site_out(windows_by_site: Mapping[str, Windows]) -> Iterator[tuple[str, Windows, Windows]]:
    """``(held-out site, training windows of all other sites, the held-out site's windows)`` per site."""
    if len(windows_by_site) < 2:
        raise ValueError(f"leave-one-site-out needs at least 2 sites, got {list(windows_by_site)}")
    for site, test in windows_by_site.items():
        yield site, Windows.concat([w for s, w in windows_by_site.items() if s != site]), test


def common_windows(feature_sets: Mapping[str, Mapping[str, Windows]]) -> dict[str, dict[str, Windows]]:
    """Restrict every feature set to the (site, end date) pairs that all of them have.

    Feature sets skip different windows (a NaN in a raw band is not a NaN in the embedding); this
    makes them comparable on the same target days.
    """
    names = list(feature_sets)
    sites = sorted(set.intersection(*(set(feature_sets[n]) for n in names))) if names else []
    out: dict[str, dict[str, Windows]] = {n: {} for n in names}
    for site in sites:
        shared = set.intersection(*(set(feature_sets[n][site].end_date) for n in names))
        for n in names:
            w = feature_sets[n][site]
            out[n][site] = w.take(np.asarray(w.end_date.isin(sorted(shared))))
    return out


def check_same_windows(feature_sets: Mapping[str, Mapping[str, Windows]]) -> None:
    """Raise unless all feature sets hold the same sites, end dates and targets (so metrics compare)."""
    names = list(feature_sets)
    if not names:
        raise ValueError("no feature sets given; pass e.g. {'embedding': {site: Windows, ...}}")
    ref_name, ref = names[0], feature_sets[names[0]]
    fix = "build all feature sets from the same GPP and window settings, or call common_windows(feature_sets) first"
    for name in names[1:]:
        other = feature_sets[name]
        if set(other) != set(ref):
            raise ValueError(f"windows differ: feature set {name!r} has sites {sorted(other)} but {ref_name!r} has "
                             f"{sorted(ref)}; {fix}")
        for site in ref:
            a, b = ref[site], other[site]
            if not a.end_date.equals(b.end_date):
                raise ValueError(
                    f"windows differ at site {site!r}: {ref_name!r} has {len(a)} windows and {name!r} {len(b)}, "
                    f"with {len(a.end_date.symmetric_difference(b.end_date))} end dates not in both; {fix}"
                )
            if not np.array_equal(a.target, b.target, equal_nan=True):
                raise ValueError(f"windows differ at site {site!r}: same end dates but different GPP targets in "
                                 f"{ref_name!r} and {name!r}; {fix}")
            if a.x.shape[1] != b.x.shape[1]:
                raise ValueError(f"windows differ at site {site!r}: {a.x.shape[1]} days in {ref_name!r} but "
                                 f"{b.x.shape[1]} in {name!r}; {fix}")


# ----------------------------------------------------------------------------- metrics


def gpp_metrics(obs: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """NRMSE (RMSE / (max(obs) - min(obs)), the paper's), RMSE, R2 (1 - SSres/SStot), bias (mean(pred - obs)), n.

    All in original units; NRMSE is NaN when obs has no range, R2 when obs has no variance.
    """
    obs, pred = np.asarray(obs, dtype=np.float64).ravel(), np.asarray(pred, dtype=np.float64).ravel()
    if obs.shape != pred.shape:
        raise ValueError(f"obs has {obs.size} values but pred {pred.size}; pass predictions for the same days")
    if obs.size == 0:
        raise ValueError("no observations to score")
    err = pred - obs
    rmse = float(np.sqrt(np.mean(err**2)))
    span = float(obs.max() - obs.min())
    ss_tot = float(np.sum((obs - obs.mean()) ** 2))
    return {
        "n": int(obs.size),
        "nrmse": rmse / span if span > 0 else math.nan,
        "rmse": rmse,
        "r2": 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else math.nan,
        "bias": float(err.mean()),
    }


def metrics_table(results: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Metrics per site (``results[site] = (obs, pred)``) and a ``"pooled"`` row.

    Pooled = the metrics of all predictions concatenated (one RMSE and one range over every site),
    not the mean of the site metrics.
    """
    if not results:
        raise ValueError("no results to tabulate")
    rows = [{"site": site, **gpp_metrics(obs, pred)} for site, (obs, pred) in results.items()]
    obs_all = np.concatenate([np.ravel(o) for o, _ in results.values()])
    pred_all = np.concatenate([np.ravel(p) for _, p in results.values()])
    rows.append({"site": "pooled", **gpp_metrics(obs_all, pred_all)})
    return pd.DataFrame(rows, columns=["site", "n", "nrmse", "rmse", "r2", "bias"])


# ----------------------------------------------------------------------------- baselines


def _doy(dates: pd.DatetimeIndex) -> np.ndarray:
    return np.minimum(dates.dayofyear.to_numpy(), 365)  # 31 December of a leap year counts as day 365


@dataclass(frozen=True)
class Climatology:
    """Mean training GPP per day of year (``table[d - 1]`` for DOY ``d``, 1..365)."""

    table: np.ndarray

    @classmethod
    def fit(cls, end_dates: pd.DatetimeIndex, target: np.ndarray, *, half_window_days: int = 7) -> Climatology:
        """Climatology of the targets by the DOY of their (end) dates.

        1. mean GPP per DOY seen in training (DOY 366 counts as 365);
        2. circular moving average over ``±half_window_days``: the mean of the per-DOY means of the
           *seen* DOYs in reach (each seen DOY weighs the same; unseen DOYs are skipped, not zero);
        3. a DOY with no seen DOY in reach takes the smoothed value of the nearest seen DOY
           (circular distance; on a tie the earlier DOY).
        """
        if len(end_dates) == 0:
            raise ValueError("no training windows to build a day-of-year climatology from")
        if half_window_days < 0:
            raise ValueError(f"half_window_days must be >= 0, got {half_window_days}")
        doy = _doy(pd.DatetimeIndex(end_dates)) - 1
        sums = np.bincount(doy, weights=np.asarray(target, dtype=np.float64), minlength=365)
        counts = np.bincount(doy, minlength=365)
        seen = counts > 0
        daily = np.where(seen, sums / np.maximum(counts, 1), 0.0)
        offsets = np.arange(-half_window_days, half_window_days + 1)
        reach = (np.arange(365)[:, None] + offsets[None, :]) % 365  # (365, 2h+1) circular neighbours
        n_in = seen[reach].sum(axis=1)
        smooth = np.where(n_in > 0, daily[reach].sum(axis=1) / np.maximum(n_in, 1), np.nan)
        seen_idx = np.flatnonzero(seen)
        dist = np.abs(np.arange(365)[:, None] - seen_idx[None, :])
        dist = np.minimum(dist, 365 - dist)  # circular
        nearest = seen_idx[dist.argmin(axis=1)]  # argmin takes the first (earlier) DOY on a tie
        return cls(np.where(n_in > 0, smooth, smooth[nearest]))

    def predict(self, dates: pd.DatetimeIndex) -> np.ndarray:
        """The climatology's value on each date's day of year (day 366 reads day 365's)."""
        return self.table[_doy(pd.DatetimeIndex(dates)) - 1]


def fit_climatology(train: Windows, *, half_window_days: int = 7) -> Climatology:
    """Day-of-year climatology of the training windows' targets (by end date)."""
    return Climatology.fit(train.end_date, train.target, half_window_days=half_window_days)


def fit_ridge(train: Windows, *, alpha: float = 1.0) -> Any:
    """Ridge regression on the whole window flattened to ``T * F`` standardised features."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train) == 0:
        raise ValueError("no training windows for the ridge baseline")
    model = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    return model.fit(train.x.reshape(len(train), -1).astype(np.float64), train.target.astype(np.float64))


def predict_ridge(model: Any, windows: Windows) -> np.ndarray:
    """The ridge baseline's prediction for each window (the features flattened as in :func:`fit_ridge`)."""
    return np.asarray(model.predict(windows.x.reshape(len(windows), -1).astype(np.float64)), dtype=np.float64)


# ----------------------------------------------------------------------------- transformer


class GPPConfig(BaseModel):
    """The GPP transformer and its training; defaults = the authors' chosen checkpoint (spec §6)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_days: int = 90  # size of the day-offset embedding: offsets 0..window_days-1
    d_model: int = 96
    n_heads: int = 8
    n_layers: int = 3  # the paper's text says 4 (class default); the chosen checkpoint has 3
    d_ff: int = 1024
    dropout: float = 0.05
    time_encoding: bool = True  # False = the authors' code as run (no time encoding)
    standardise_features: bool = True  # per feature, training windows' mean/std (the authors: none)
    batch_size: int = 6
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 300  # LinearLR from warmup_start_factor x lr to lr over this many optimiser steps
    warmup_start_factor: float = 1e-3
    plateau_factor: float = 0.1
    plateau_patience: int = 7
    min_lr: float = 1e-7  # the class default; the grid search did not change it
    early_stopping_patience: int = 16  # epochs without a better val L1
    max_epochs: int = 150
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> GPPConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model < 2 or self.window_days < 1 or self.batch_size < 1 or self.max_epochs < 1:
            raise ValueError("d_model >= 2, window_days >= 1, batch_size >= 1 and max_epochs >= 1 are required")
        return self


class GPPTransformer(nn.Module):
    """Feature window -> standardised GPP on its last day (spec §6, with the time encoding passed).

    Input standardisation (features) and output scale (GPP) are buffers set from the training
    windows, so the model alone maps raw features to GPP in original units (:meth:`to_gpp`).
    """

    feature_mean: torch.Tensor  # buffers (register_buffer): declared so they type as tensors
    feature_std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(self, n_features: int, cfg: GPPConfig) -> None:
        super().__init__()
        self.cfg, self.n_features = cfg, n_features
        d = cfg.d_model
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.embed = nn.Linear(n_features, d)
        self.day_embed = nn.Embedding(cfg.window_days, d)  # learned "days since window start"
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="relu",
                                           batch_first=True, norm_first=False)  # post-norm
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, d // 2), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d // 2, 1)
        )

    def forward(self, x: torch.Tensor, days: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, F) raw features, ``days`` (B, T) int offsets -> (B,) standardised GPP."""
        x = (x - self.feature_mean) / self.feature_std  # (B, T, F)
        h = self.embed(x)  # (B, T, d)
        if self.cfg.time_encoding:
            h = h + self.day_embed(days)  # (B, T, d)
        h = self.encoder(h)  # (B, T, d)
        return self.head(h[:, -1]).squeeze(-1)  # last token (B, d) -> (B,)

    def to_gpp(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised output -> GPP in the training targets' units."""
        return z * self.target_std + self.target_mean


def _device(cfg: GPPConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("GPPConfig.device='cuda' but no CUDA device is visible; use device='cpu' or 'auto'")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def _tensors(model: GPPTransformer, w: Windows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if w.n_features != model.n_features:
        raise ValueError(f"windows have {w.n_features} features but the model was fitted on {model.n_features}; "
                         "use windows of the same feature set")
    if len(w) and (w.days.min() < 0 or w.days.max() >= model.cfg.window_days):
        raise ValueError(f"day offsets span {w.days.min()}..{w.days.max()} but the time encoding covers "
                         f"0..{model.cfg.window_days - 1}; set GPPConfig.window_days to the window length")
    return (torch.as_tensor(w.x, dtype=torch.float32, device=device),
            torch.as_tensor(w.days, dtype=torch.long, device=device))


@torch.no_grad()
def _predict_std(model: GPPTransformer, x: torch.Tensor, days: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    if len(x) == 0:
        return torch.empty(0, device=x.device)
    return torch.cat([model(x[i : i + batch], days[i : i + batch]) for i in range(0, len(x), batch)])


def fit_gpp(
    train: Windows, val: Windows | None, cfg: GPPConfig, *, seed: int
) -> tuple[GPPTransformer, pd.DataFrame]:
    """Fit the transformer with L1 loss on standardised GPP; keep the epoch with the best val L1.

    Deterministic for a seed on CPU (weights, dropout and shuffling come from ``seed``; the global
    RNG state is restored afterwards). With no validation windows it trains ``max_epochs``, keeps the
    last epoch, steps the plateau scheduler on the training loss, and warns.

    Returns:
        The fitted model (eval mode, on the training device) and the history, one row per epoch
        (``epoch, train_l1, val_l1, lr``; L1 in standardised units); ``history.attrs`` hold
        ``best_epoch``, ``best_val_l1``, ``stopped_early`` and ``note``.
    """
    if len(train) == 0:
        raise ValueError("no training windows; check the split (years, sites) and the window construction")
    has_val = val is not None and len(val) > 0
    if not has_val:
        warnings.warn(f"fit_gpp: no validation windows, so no early stopping: training all {cfg.max_epochs} epochs "
                      "and keeping the last", stacklevel=2)
    device = _device(cfg)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = GPPTransformer(train.n_features, cfg)
        x, days = _tensors(model, train, device)
        y = _set_scales(model, train, cfg)
        model.to(device)
        z = (y.to(device) - model.target_mean) / model.target_std  # standardised targets (N,)
        if val is not None and has_val:
            xv, dv = _tensors(model, val, device)
            zv = (torch.as_tensor(val.target, dtype=torch.float32, device=device) - model.target_mean) \
                / model.target_std

        opt, warmup, plateau = _optimiser(model, cfg)
        gen = torch.Generator().manual_seed(seed)  # shuffling order
        rows: list[dict[str, float]] = []
        best, best_epoch, best_state, since_best, step = math.inf, 0, None, 0, 0
        for epoch in range(1, cfg.max_epochs + 1):
            train_l1, step = _train_epoch(model, x, days, z, opt, warmup, gen, cfg, step)
            val_l1 = float((_predict_std(model, xv, dv) - zv).abs().mean()) if has_val else math.nan
            rows.append({"epoch": epoch, "train_l1": train_l1, "val_l1": val_l1, "lr": opt.param_groups[0]["lr"]})
            plateau.step(val_l1 if has_val else train_l1)
            if not has_val:
                continue
            if val_l1 < best:
                best, best_epoch, since_best = val_l1, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
                if since_best >= cfg.early_stopping_patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), _history(rows, cfg, best=best if has_val else None,
                                  best_epoch=best_epoch if best_state is not None else len(rows))


def _history(rows: list[dict[str, float]], cfg: GPPConfig, *, best: float | None, best_epoch: int) -> pd.DataFrame:
    """One row per epoch, with the kept epoch in ``attrs`` (``best``: None without validation windows)."""
    history = pd.DataFrame(rows, columns=["epoch", "train_l1", "val_l1", "lr"])
    has_val = best is not None
    history.attrs.update({
        "best_epoch": best_epoch,
        "best_val_l1": best if best is not None else math.nan,
        "stopped_early": has_val and len(rows) < cfg.max_epochs,
        "note": ("best val L1 epoch kept" if has_val else "no validation windows: no early stopping, last epoch kept"),
    })
    return history


def _train_epoch(
    model: GPPTransformer, x: torch.Tensor, days: torch.Tensor, z: torch.Tensor, opt: torch.optim.Optimizer,
    warmup: Any, gen: torch.Generator, cfg: GPPConfig, step: int,
) -> tuple[float, int]:
    """One epoch over the shuffled training windows: its mean L1 (standardised), and the optimiser steps so far."""
    model.train()
    total = 0.0
    for idx in torch.randperm(len(z), generator=gen).split(cfg.batch_size):
        idx = idx.to(z.device)
        loss = nn.functional.l1_loss(model(x[idx], days[idx]), z[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if warmup is not None and step <= cfg.warmup_steps:
            warmup.step()
        total += float(loss.detach()) * len(idx)
    return total / len(z), step


def _set_scales(model: GPPTransformer, train: Windows, cfg: GPPConfig) -> torch.Tensor:
    """Store the training target's mean and std (and, with ``standardise_features``, the features') in the
    model's buffers; the training targets as a tensor."""
    y = torch.as_tensor(train.target, dtype=torch.float32)
    x64 = train.x.reshape(-1, train.n_features).astype(np.float64)
    t_std = float(y.std()) if len(y) > 1 else 0.0
    model.target_mean.fill_(float(y.mean()))
    model.target_std.fill_(t_std if t_std > 0 else 1.0)
    if cfg.standardise_features:
        f_std = x64.std(axis=0)
        model.feature_mean.copy_(torch.as_tensor(x64.mean(axis=0)))
        model.feature_std.copy_(torch.as_tensor(np.where(f_std > 0, f_std, 1.0)))
    return y


def _optimiser(model: GPPTransformer, cfg: GPPConfig) -> tuple[Any, Any, Any]:
    """AdamW, its linear warm-up (None without warm-up steps) and the plateau scheduler."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = (torch.optim.lr_scheduler.LinearLR(opt, start_factor=cfg.warmup_start_factor, end_factor=1.0,
                                                total_iters=cfg.warmup_steps) if cfg.warmup_steps > 0 else None)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.plateau_factor,
                                                         patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    return opt, warmup, plateau


def predict_gpp(model: GPPTransformer, windows: Windows, *, batch_size: int = 512) -> np.ndarray:
    """GPP in original units (the training targets' units), one value per window."""
    device = next(model.parameters()).device
    x, days = _tensors(model, windows, device)
    z = _predict_std(model, x, days, batch_size)
    return model.to_gpp(z).cpu().numpy().astype(np.float64)


# ----------------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class YearSplit:
    """The paper's split by end-date year: train on ``train_years``, early-stop on ``val_years``.

    Metrics are reported for "train", "val" and, when ``test_years`` is given, "test". With no test
    years the "val" rows are the paper's 2020 numbers, measured on the early-stopping years.
    """

    train_years: tuple[int, ...] = (2017, 2018, 2019)
    val_years: tuple[int, ...] = (2020,)
    test_years: tuple[int, ...] = ()


@dataclass(frozen=True)
class SiteSplit:
    """Leave one site out: train on the other sites, report "test" on the held-out site (all its windows).

    ``val_years``: windows of the training sites ending in these years are held back for early
    stopping; empty = no early stopping (``max_epochs``).
    """

    val_years: tuple[int, ...] = ()


_METRIC_COLUMNS = ["feature_set", "model", "site", "split", "n", "nrmse", "rmse", "r2", "bias"]
_PRED_COLUMNS = ["feature_set", "model", "fold", "split", "site", "end_date", "obs", "pred"]


def _folds(by_site: Mapping[str, Windows], split: YearSplit | SiteSplit
           ) -> Iterator[tuple[str, Windows, Windows | None, dict[str, Windows]]]:
    """``(fold name, train, val or None, {split name: windows to score})``."""
    if isinstance(split, YearSplit):
        years = {"train": split.train_years, "val": split.val_years, "test": split.test_years}
        if len({y for ys in years.values() for y in ys}) != sum(len(ys) for ys in years.values()):
            raise ValueError(f"train, val and test years overlap: {years}; give disjoint years")
        all_w = Windows.concat(list(by_site.values()))
        end_year = all_w.end_date.year.to_numpy()
        if not split.train_years:
            raise ValueError("YearSplit.train_years is empty; name the years to train on, e.g. (2017, 2018, 2019)")
        parts = {name: all_w.take(np.isin(end_year, list(ys))) for name, ys in years.items() if ys}
        yield "years", parts["train"], parts.get("val"), parts
    elif isinstance(split, SiteSplit):
        for site, rest, test in leave_one_site_out(by_site):
            if split.val_years:
                val_mask = np.isin(rest.end_date.year.to_numpy(), list(split.val_years))
                train, val = rest.take(~val_mask), rest.take(val_mask)
            else:
                train, val = rest, None
            yield site, train, val, {"test": test}
    else:
        raise TypeError(f"split must be a YearSplit or a SiteSplit, got {type(split).__name__}")


def _pred_frame(fs: str, model: str, fold: str, part: str, w: Windows, pred: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"feature_set": fs, "model": model, "fold": fold, "split": part, "site": w.site,
                         "end_date": w.end_date, "obs": w.target.astype(np.float64), "pred": pred})


@overload
def run_gpp_experiment(
    feature_sets: Mapping[str, Mapping[str, Windows]], split: YearSplit | SiteSplit, cfg: GPPConfig, seed: int, *,
    ridge_alpha: float = ..., climatology_half_window_days: int = ..., return_predictions: Literal[False] = ...,
) -> pd.DataFrame: ...


@overload
def run_gpp_experiment(
    feature_sets: Mapping[str, Mapping[str, Windows]], split: YearSplit | SiteSplit, cfg: GPPConfig, seed: int, *,
    ridge_alpha: float = ..., climatology_half_window_days: int = ..., return_predictions: Literal[True],
) -> tuple[pd.DataFrame, pd.DataFrame]: ...


def run_gpp_experiment(
    feature_sets: Mapping[str, Mapping[str, Windows]],
    split: YearSplit | SiteSplit,
    cfg: GPPConfig,
    seed: int,
    *,
    ridge_alpha: float = 1.0,
    climatology_half_window_days: int = 7,
    return_predictions: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Transformer, ridge and climatology for each feature set, on identical windows; one tidy table.

    ``feature_sets[name][site]`` are that site's windows for feature set ``name`` (e.g. "embedding",
    "raw_bands", "ndvi"); every set must hold the same sites, end dates and targets
    (:func:`common_windows` makes them so). Models, each fitted on the pooled training windows of all
    (training) sites: ``transformer`` (:func:`fit_gpp` with ``seed``), ``ridge`` (flattened window),
    ``climatology`` (DOY climatology of the pooled training targets) and, for a :class:`YearSplit`,
    ``climatology_site`` (each site's own training targets; sites with no training windows get none).

    Returns:
        Metrics with columns ``feature_set, model, site, split, n, nrmse, rmse, r2, bias``: a row per
        site and a ``"pooled"`` row (all predictions of that feature set, model and split together).
        With ``return_predictions=True`` also the predictions
        (``feature_set, model, fold, split, site, end_date, obs, pred``).
    """
    check_same_windows(feature_sets)
    preds: list[pd.DataFrame] = []
    for fs, by_site in feature_sets.items():
        for fold, train, val, parts in _folds(by_site, split):
            if len(train) == 0:
                raise ValueError(f"fold {fold!r} of feature set {fs!r} has no training windows; check the split")
            net, _ = fit_gpp(train, val, cfg, seed=seed)
            ridge = fit_ridge(train, alpha=ridge_alpha)
            clim = fit_climatology(train, half_window_days=climatology_half_window_days)
            site_clim = {}
            if isinstance(split, YearSplit):
                for site in by_site:
                    mine = train.take(train.site == site)
                    if len(mine):
                        site_clim[site] = fit_climatology(mine, half_window_days=climatology_half_window_days)
            for part, w in parts.items():
                if len(w) == 0:
                    continue
                preds.append(_pred_frame(fs, "transformer", fold, part, w, predict_gpp(net, w)))
                preds.append(_pred_frame(fs, "ridge", fold, part, w, predict_ridge(ridge, w)))
                preds.append(_pred_frame(fs, "climatology", fold, part, w, clim.predict(w.end_date)))
                for site, c in site_clim.items():
                    mine = w.take(w.site == site)
                    if len(mine):
                        preds.append(_pred_frame(fs, "climatology_site", fold, part, mine, c.predict(mine.end_date)))
    predictions = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(columns=_PRED_COLUMNS)
    tables = []
    for (fs, model, part), g in predictions.groupby(["feature_set", "model", "split"], sort=False):
        per_site = {str(s): (gs["obs"].to_numpy(), gs["pred"].to_numpy()) for s, gs in g.groupby("site", sort=True)}
        tables.append(metrics_table(per_site).assign(feature_set=fs, model=model, split=part))
    metrics = (pd.concat(tables, ignore_index=True)[_METRIC_COLUMNS] if tables
               else pd.DataFrame(columns=_METRIC_COLUMNS))
    return (metrics, predictions) if return_predictions else metrics


# ----------------------------------------------------------------------------- plot


def plot_gpp_series(
    dates: Sequence[Any] | pd.DatetimeIndex,
    obs: np.ndarray,
    preds: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "",
    *,
    ylabel: str = "GPP",
    max_gap_days: int = 30,
) -> Path:
    """PNG of observed GPP (dots) and each model's predictions (lines), like the paper's Fig. 7.

    Lines break where consecutive dates are more than ``max_gap_days`` apart (e.g. a year without
    flux data), instead of drawing a straight line across the gap.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    when = pd.DatetimeIndex(dates)
    obs = np.asarray(obs, dtype=np.float64)
    for name, p in {"obs": obs, **preds}.items():
        if len(p) != len(when):
            raise ValueError(f"{name} has {len(p)} values but there are {len(when)} dates; pass one value per date")
    order = np.argsort(when.values, kind="stable")
    when, obs = when[order], obs[order]
    gap = np.r_[False, np.diff(when.values).astype("timedelta64[D]").astype(np.int64) > max_gap_days]

    def broken(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = when.values.astype("datetime64[ns]")
        at = np.flatnonzero(gap)  # insert a NaN before each gap so the line stops there
        return np.insert(t, at, t[at] - np.timedelta64(1, "D")), np.insert(values, at, np.nan)

    fig = Figure(figsize=(10, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(when, obs, "o", color="black", markersize=2.5, label="observed", zorder=3)
    for name, p in preds.items():
        t, v = broken(np.asarray(p, dtype=np.float64)[order])
        ax.plot(t, v, "-", linewidth=1.2, label=name)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(preds) + 1, 6), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
