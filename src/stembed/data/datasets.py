"""Torch datasets over sampled patches, with the validity mask kept beside the filled values.

Items are dicts of tensors:

- sensor patches: ``x`` (T, C, P, P) float32 with NaNs filled, ``valid`` (T, C, P, P) bool (True =
  observed), ``time_gaps`` (T-1,) float32 days between consecutive frames;
- fusion patches: the same for every sensor ``k`` (``s1``, ``s2`` and each companion sensor, all on the S2
  dates) as ``x_k``, ``valid_k``, ``time_gaps_k``, and for every sensor but the S2 anchor ``dt_k`` () float32
  = |its date - S2 date| at the centre frame, in days.

NaNs are filled with the patch's per-band mean over (time, y, x) of its valid values (0 where a
band has none), as in the paper: the mask is taken before filling, so losses ignore filled values.

An encoder that reads more context than the patch (the ``dense`` variant, ``context_px`` > 7) also
gets ``x_in`` (fusion: ``x_k_in``) (T, C, W, W), W = 2 * context_px + 1: the raw window around the patch centre, NaN kept
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
    """Aligned patches of every sensor on the anchor's (S2's) dates: each other sensor already matched to them (one
    frame per S2 frame).

    ``sensors``: each sensor's sites by sensor name, the anchor among them. A matched sensor's ``days`` hold its
    acquisition day for each S2 date; where none was within the matching tolerance they hold the S2 day itself
    (the frame is all-NaN, so it is mean-filled and masked out of the loss) and the centre gap counts as 0.
    """

    def __init__(
        self,
        sensors: Mapping[str, Sequence[SensorArrays]],
        patches: Sequence[PatchIndex],
        patch_px: int,
        context_px: int | None = None,
        anchor: str = "s2",
    ) -> None:
        if anchor not in sensors:
            raise ValueError(f"no {anchor!r} sites among the sensors {list(sensors)}: the anchor's dates drive the patches")
        self.sensors = {k: list(v) for k, v in sensors.items()}
        self.anchor = anchor
        n = len(self.sensors[anchor])
        for name, sites in self.sensors.items():
            if len(sites) != n:
                raise ValueError(f"{len(sites)} {name} sites for {n} {anchor} sites")
        self.patches = list(patches)
        self.patch_px = patch_px
        self.context_px = patch_px // 2 if context_px is None else context_px

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.patches[i]
        frames = list(p.frames)
        c = len(frames) // 2
        anchor_day = self.sensors[self.anchor][p.site].days[frames[c]]
        wide = self.context_px > self.patch_px // 2
        item: dict[str, torch.Tensor] = {}
        for k, sites in self.sensors.items():
            site = sites[p.site]
            x, valid = fill_patch(cut_patch(site.values, p, self.patch_px))
            item |= {
                f"x_{k}": torch.from_numpy(x),
                f"valid_{k}": torch.from_numpy(valid),
                f"time_gaps_{k}": torch.from_numpy(gaps(site.days[frames])),
            }
            if k != self.anchor:
                item[f"dt_{k}"] = torch.tensor(abs(float(site.days[frames[c]] - anchor_day)), dtype=torch.float32)
            if wide:
                item[f"x_{k}_in"] = torch.from_numpy(cut_window(site.values, p, self.patch_px, self.context_px))
        return item
