"""Split metrics for a run's ``metrics.json``: centre-pixel MAE, centre SAM, patch SSIM, and trivial baselines.

Sums and counts are accumulated over the whole split, so a split's MAE is the mean over its
observed centre values, not a mean of batch means. Only observed (valid) centre values count.

Baselines a useful autoencoder must beat, evaluated on the same centre values:

- ``patch_mean``: each band's mean over the patch's observed values (the fill value);
- ``temporal_neighbours``: the mean of the centre pixel on the two neighbouring frames (whichever
  are observed; the patch mean where neither is).

And the linear model of the same size (:class:`PCABaseline`): PCA-k of the training split's centre
values, k the model's latent or embedding size, every sensor of a patch in one vector (so a fusion's
is what a linear k-d embedding of both sensors keeps). A trained model is always shown beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import Tensor

from stembed.losses import spectral_angle, ssim_loss


def centre_abs_error(pred: Tensor, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of |pred - x| over observed centre values, and their count. ``pred`` is (B, C) or (B, T, C, H, W)."""
    t, c = x.shape[1] // 2, x.shape[-1] // 2
    target, v = x[:, t, :, c, c], valid[:, t, :, c, c]  # (B, C)
    if pred.dim() == 5:
        pred = pred[:, t, :, c, c]
    err = (pred - target).abs() * v
    return err.sum(), v.sum()


def baselines(x: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Trivial centre predictions ``(B, C)`` from the input patch alone (see module docstring)."""
    t, c = x.shape[1] // 2, x.shape[-1] // 2
    counts = valid.sum(dim=(1, 3, 4)).clamp(min=1)  # (B, C)
    patch_mean = (x * valid).sum(dim=(1, 3, 4)) / counts
    nb, nv = x[:, [t - 1, t + 1], :, c, c], valid[:, [t - 1, t + 1], :, c, c]  # (B, 2, C)
    n = nv.sum(dim=1)
    neighbours = torch.where(n > 0, (nb * nv).sum(dim=1) / n.clamp(min=1), patch_mean)
    return {"patch_mean": patch_mean, "temporal_neighbours": neighbours}


def centre_values(x: Tensor, valid: Tensor) -> np.ndarray:
    """The centre pixel of the centre date, (B, C), NaN where not observed."""
    t, c = x.shape[1] // 2, x.shape[-1] // 2
    return torch.where(valid[:, t, :, c, c].bool(), x[:, t, :, c, c], torch.nan).detach().cpu().double().numpy()


@dataclass(frozen=True)
class PCABaseline:
    """PCA-k of centre values, the sensors of a patch concatenated in ``widths`` order.

    Fitted on fully observed rows only; a partly observed row is rebuilt from the components that best
    fit its observed values (least squares), so it is scored on the same observed values as the model.
    """

    k: int
    widths: dict[str, int]
    mean: np.ndarray  # (F,)
    components: np.ndarray  # (k, F)
    n_fitted: int

    @classmethod
    def fit(cls, rows: Mapping[str, np.ndarray], k: int) -> PCABaseline:
        """Fit on a split's centre values ``{sensor: (N, C)}`` (rows aligned across sensors)."""
        x = np.concatenate(list(rows.values()), axis=1)
        x = x[np.isfinite(x).all(axis=1)]
        if x.shape[0] <= k or x.shape[1] < k:
            raise ValueError(f"PCA-{k} needs more than {k} fully observed rows of >= {k} values, got {x.shape}")
        pca = PCA(n_components=k, random_state=0).fit(x)
        return cls(k, {s: v.shape[1] for s, v in rows.items()}, pca.mean_, pca.components_, x.shape[0])

    def centre_mae(self, rows: Mapping[str, np.ndarray]) -> dict[str, float | None]:
        """Mean |reconstruction - value| per sensor over the observed values of ``{sensor: (N, C)}``."""
        x = np.concatenate([rows[s] for s in self.widths], axis=1)  # (N, F)
        seen = np.isfinite(x)
        rec = np.full_like(x, np.nan)
        for pattern in np.unique(seen, axis=0):  # rows with the same observed values share one solve
            if not pattern.any():
                continue
            at = (seen == pattern).all(axis=1)
            basis = self.components[:, pattern].T  # (F_seen, k)
            z = np.linalg.lstsq(basis, (x[at][:, pattern] - self.mean[pattern]).T, rcond=None)[0]  # (k, n)
            rec[at] = (self.components.T @ z).T + self.mean
        err = np.abs(rec - x)
        out: dict[str, float | None] = {}
        start = 0
        for s, w in self.widths.items():
            e = err[:, start : start + w][seen[:, start : start + w]]
            out[s] = float(e.mean()) if e.size else None
            start += w
        return out


class SplitAccumulator:
    """Accumulates one sensor's metrics over batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.centres: list[np.ndarray] = []  # (B, C) per batch, for the PCA baseline

    def _add(self, key: str, total: Tensor | float, count: Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(total)
        self.counts[key] = self.counts.get(key, 0.0) + float(count)

    def update(self, x_hat: Tensor, x: Tensor, valid: Tensor) -> None:
        """Add one batch: reconstructions and inputs ``(B, T, C, H, W)``."""
        self._add("centre_mae", *centre_abs_error(x_hat, x, valid))
        self.centres.append(centre_values(x, valid))
        for name, pred in baselines(x, valid).items():
            self._add(f"baseline_{name}_centre_mae", *centre_abs_error(pred, x, valid))
        t, c = x.shape[1] // 2, x.shape[-1] // 2
        angle = spectral_angle(x_hat[:, t, :, c, c, None, None], x[:, t, :, c, c, None, None])  # (B, 1, 1)
        all_valid = valid[:, t, :, c, c].all(dim=1)
        self._add("centre_sam", (angle.flatten() * all_valid).sum(), all_valid.sum())
        b = x.shape[0]
        self._add("ssim", (1.0 - ssim_loss(x_hat, x)) * b, b)

    def result(self) -> dict[str, float | None]:
        """Means (None where nothing was observed)."""
        return {k: (self.sums[k] / self.counts[k] if self.counts[k] else None) for k in self.sums}


@torch.no_grad()
def evaluate_split(
    batches: Iterable[Any],
    reconstruct: Callable[[Any], dict[str, tuple[Tensor, Tensor, Tensor]]],
    centres: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``reconstruct`` (batch -> {sensor: (x_hat, x, valid)}) over a split and return metrics per sensor.

    ``batches``: typed patch batches (:class:`~stembed.data.datasets.SensorPatches` or ``FusionPatches``).
    ``centres``: if given, filled with every sensor's centre values ``(N, C)`` (NaN unobserved), rows
    aligned across sensors, for :class:`PCABaseline`.
    """
    acc: dict[str, SplitAccumulator] = {}
    n = 0
    for batch in batches:
        for sensor, (x_hat, x, valid) in reconstruct(batch).items():
            acc.setdefault(sensor, SplitAccumulator()).update(x_hat, x, valid)
        n += batch.size
    if centres is not None:
        centres.update({s: np.concatenate(a.centres) for s, a in acc.items()})
    return {sensor: {"n_patches": n, **a.result()} for sensor, a in acc.items()}


def with_pca_baseline(
    splits: dict[str, dict[str, dict[str, Any]]], centres: Mapping[str, Mapping[str, np.ndarray]], k: int
) -> dict[str, Any]:
    """Add ``baseline_pca_centre_mae`` (PCA-k fitted on the train split's centres) to every split's sensors.

    Returns what the baseline was (``k``, rows it was fitted on) for the run's metrics; nothing is added
    when there is no train split or too few fully observed rows to fit it.
    """
    if "train" not in centres:
        return {}
    try:
        pca = PCABaseline.fit(centres["train"], k)
    except ValueError as err:
        return {"k": k, "skipped": str(err)}
    for name, rows in centres.items():
        for sensor, mae in pca.centre_mae(rows).items():
            splits[name][sensor]["baseline_pca_centre_mae"] = mae
    return {"k": k, "fitted_on": "train", "n_rows": pca.n_fitted, "sensors": list(pca.widths)}
