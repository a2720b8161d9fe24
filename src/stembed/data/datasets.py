"""Torch datasets over sampled patches, with the validity mask kept beside the filled values.

Items are dicts of tensors:

- sensor patches: ``x`` (T, C, P, P) float32 with NaNs filled, ``valid`` (T, C, P, P) bool (True =
  observed), ``time_gaps`` (T-1,) float32 days between consecutive frames;
- fusion patches: the same for each sensor with suffixes ``1`` (S1) and ``2`` (S2), and
  ``dt_centre`` () float32 = |S1 date - S2 date| at the centre frame, in days; each companion
  sensor ``k`` (matched to the S2 dates like S1) adds ``x_k``, ``valid_k``, ``time_gaps_k`` and
  ``dt_k`` (|its date - S2 date| at the centre frame).

NaNs are filled with the patch's per-band mean over (time, y, x) of its valid values (0 where a
band has none), as in the paper: the mask is taken before filling, so losses ignore filled values.

An encoder that reads more context than the patch (the ``dense`` variant, ``context_px`` > 7) also
gets ``x_in`` (T, C, W, W), W = 2 * context_px + 1: the raw window around the patch centre, NaN kept
(that encoder fills per pixel), read inside the patch's split region and reflected at its edges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from stembed.data.sampling import PatchIndex


@dataclass(frozen=True)
class SensorArrays:
    """One site's cube as plain arrays: ``values`` (time, band, y, x) float32 and ``days`` (time,) int64."""

    values: np.ndarray
    days: np.ndarray


def fill_patch(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``raw`` (..., T, C, P, P) with NaN -> (filled copy, valid mask); fill = per-band patch mean, else 0."""
    valid = np.isfinite(raw)
    axes = (-4, -2, -1)  # time, y, x of each patch
    counts = valid.sum(axis=axes, keepdims=True)
    sums = np.where(valid, raw, 0.0).sum(axis=axes, keepdims=True)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return np.where(valid, raw, means).astype(np.float32), valid


def cut_patch(values: np.ndarray, p: PatchIndex, patch_px: int) -> np.ndarray:
    """Raw (unfilled) patch ``(T, C, P, P)`` of one site's ``(time, band, y, x)`` array."""
    return values[list(p.frames), :, p.y0 : p.y0 + patch_px, p.x0 : p.x0 + patch_px]


def fold_index(start: int, stop: int, lo: int, hi: int) -> np.ndarray:
    """Indices ``start..stop-1`` reflected (edge not repeated, as often as needed) into ``[lo, hi)``."""
    i = np.arange(start, stop) - lo
    n = hi - lo
    if n == 1:
        return np.full(i.shape, lo)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i > n - 1, period - i, i) + lo


def cut_window(values: np.ndarray, p: PatchIndex, patch_px: int, context_px: int) -> np.ndarray:
    """Raw window ``(T, C, W, W)``, W = 2 * context_px + 1, centred on the patch, inside ``p.bounds``."""
    if p.bounds is None:
        raise ValueError("a context window needs the patch's region bounds (PatchIndex.bounds)")
    c = patch_px // 2
    y0, y1, x0, x1 = p.bounds
    yi = fold_index(p.y0 + c - context_px, p.y0 + c + context_px + 1, y0, y1)
    xi = fold_index(p.x0 + c - context_px, p.x0 + c + context_px + 1, x0, x1)
    return values[list(p.frames)][:, :, yi[:, None], xi[None, :]]


def gaps(days: np.ndarray) -> np.ndarray:
    """Day gaps between consecutive frames, float32 ``(T-1,)``."""
    return np.diff(days).astype(np.float32)


class PatchDataset(Dataset[dict[str, torch.Tensor]]):
    """Patches of one sensor's cubes."""

    def __init__(
        self, sites: Sequence[SensorArrays], patches: Sequence[PatchIndex], patch_px: int, context_px: int | None = None
    ) -> None:
        self.sites = list(sites)
        self.patches = list(patches)
        self.patch_px = patch_px
        self.context_px = patch_px // 2 if context_px is None else context_px

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.patches[i]
        site = self.sites[p.site]
        x, valid = fill_patch(cut_patch(site.values, p, self.patch_px))
        item = {
            "x": torch.from_numpy(x),
            "valid": torch.from_numpy(valid),
            "time_gaps": torch.from_numpy(gaps(site.days[list(p.frames)])),
        }
        if self.context_px > self.patch_px // 2:
            item["x_in"] = torch.from_numpy(cut_window(site.values, p, self.patch_px, self.context_px))
        return item


class FusionPatchDataset(Dataset[dict[str, torch.Tensor]]):
    """Aligned S1+S2 patches: S1 already matched to the S2 dates (one S1 frame per S2 frame).

    ``s1_days`` holds the matched S1 acquisition day of each S2 date; where no S1 scene was within
    the matching tolerance it holds the S2 day itself (the frame is all-NaN, so it is mean-filled
    and masked out of the loss) and the centre gap counts as 0.
    """

    def __init__(
        self,
        s2: Sequence[SensorArrays],
        s1: Sequence[SensorArrays],
        patches: Sequence[PatchIndex],
        patch_px: int,
        context_px: int | None = None,
        extra: Mapping[str, Sequence[SensorArrays]] | None = None,
    ) -> None:
        self.extra = {k: list(v) for k, v in (extra or {}).items()}
        for name, sites in {"S1": s1, **self.extra}.items():
            if len(sites) != len(s2):
                raise ValueError(f"{len(sites)} {name} sites for {len(s2)} S2 sites")
        self.s2, self.s1 = list(s2), list(s1)
        self.patches = list(patches)
        self.patch_px = patch_px
        self.context_px = patch_px // 2 if context_px is None else context_px

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.patches[i]
        s1, s2 = self.s1[p.site], self.s2[p.site]
        frames = list(p.frames)
        x1, valid1 = fill_patch(cut_patch(s1.values, p, self.patch_px))
        x2, valid2 = fill_patch(cut_patch(s2.values, p, self.patch_px))
        c = len(frames) // 2
        dt = abs(float(s1.days[frames[c]] - s2.days[frames[c]]))
        item = {
            "x1": torch.from_numpy(x1),
            "valid1": torch.from_numpy(valid1),
            "time_gaps1": torch.from_numpy(gaps(s1.days[frames])),
            "x2": torch.from_numpy(x2),
            "valid2": torch.from_numpy(valid2),
            "time_gaps2": torch.from_numpy(gaps(s2.days[frames])),
            "dt_centre": torch.tensor(dt, dtype=torch.float32),
        }
        wide = self.context_px > self.patch_px // 2
        if wide:
            item["x1_in"] = torch.from_numpy(cut_window(s1.values, p, self.patch_px, self.context_px))
            item["x2_in"] = torch.from_numpy(cut_window(s2.values, p, self.patch_px, self.context_px))
        for k, sites in self.extra.items():
            sx = sites[p.site]
            xk, validk = fill_patch(cut_patch(sx.values, p, self.patch_px))
            item |= {
                f"x_{k}": torch.from_numpy(xk),
                f"valid_{k}": torch.from_numpy(validk),
                f"time_gaps_{k}": torch.from_numpy(gaps(sx.days[frames])),
                f"dt_{k}": torch.tensor(abs(float(sx.days[frames[c]] - s2.days[frames[c]])), dtype=torch.float32),
            }
            if wide:
                item[f"x_{k}_in"] = torch.from_numpy(cut_window(sx.values, p, self.patch_px, self.context_px))
        return item
