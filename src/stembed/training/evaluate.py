"""Split metrics for a run's ``metrics.json``: centre-pixel MAE, centre SAM, patch SSIM, and trivial baselines.

Sums and counts are accumulated over the whole split, so a split's MAE is the mean over its
observed centre values, not a mean of batch means. Only observed (valid) centre values count.

Baselines a useful autoencoder must beat, evaluated on the same centre values:

- ``patch_mean``: each band's mean over the patch's observed values (the fill value);
- ``temporal_neighbours``: the mean of the centre pixel on the two neighbouring frames (whichever
  are observed; the patch mean where neither is).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
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


class SplitAccumulator:
    """Accumulates one sensor's metrics over batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def _add(self, key: str, total: Tensor | float, count: Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(total)
        self.counts[key] = self.counts.get(key, 0.0) + float(count)

    def update(self, x_hat: Tensor, x: Tensor, valid: Tensor) -> None:
        """Add one batch: reconstructions and inputs ``(B, T, C, H, W)``."""
        self._add("centre_mae", *centre_abs_error(x_hat, x, valid))
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
) -> dict[str, dict[str, Any]]:
    """Run ``reconstruct`` (batch -> {sensor: (x_hat, x, valid)}) over a split and return metrics per sensor.

    ``batches``: typed patch batches (:class:`~stembed.data.datasets.SensorPatches` or ``FusionPatches``).
    """
    acc: dict[str, SplitAccumulator] = {}
    n = 0
    for batch in batches:
        for sensor, (x_hat, x, valid) in reconstruct(batch).items():
            acc.setdefault(sensor, SplitAccumulator()).update(x_hat, x, valid)
        n += batch.size
    return {sensor: {"n_patches": n, **a.result()} for sensor, a in acc.items()}
