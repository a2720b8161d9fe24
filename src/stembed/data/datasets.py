"""Torch datasets over sampled patches, with the validity mask kept beside the filled values.

Items are typed, and :func:`collate` stacks them into batches of the same type (pass it to the
``DataLoader``, or use :func:`patch_loader`):

- sensor patches (:class:`SensorPatches`): ``x`` (T, C, P, P) float32 with NaNs filled, ``valid``
  (T, C, P, P) bool (True = observed), ``gaps`` (T-1,) float32 days between consecutive frames;
- fusion patches (:class:`FusionPatches`): the same for every sensor (``s1``, ``s2`` and each companion
  sensor, all on the S2 dates) by sensor name, and for every sensor but the S2 anchor ``dt`` () float32
  = |its date - S2 date| at the centre frame, in days.

NaNs are filled with the patch's per-band mean over (time, y, x) of its valid values (0 where a
band has none), as in the paper: the mask is taken before filling, so losses ignore filled values.

An encoder that reads more context than the patch (the ``dense`` variant, ``context_px`` > 7) also
gets ``x_in`` (T, C, W, W), W = 2 * context_px + 1: the raw window around the patch centre, NaN kept
(that encoder fills per pixel), read inside the patch's split region and reflected at its edges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stembed.data.sampling import PatchIndex
from stembed.sensors import ANCHOR


@dataclass(frozen=True)
class SensorArrays:
    """One site's cube as plain arrays: ``values`` (time, band, y, x) float32 and ``days`` (time,) int64."""

    values: np.ndarray
    days: np.ndarray


@dataclass
class SensorPatches:
    """One sensor's patches: one item of a dataset, or a batch of them (a leading batch axis B on every field).

    Attributes:
        x: (T, C, P, P) float32, NaNs filled with the patch's per-band mean.
        valid: (T, C, P, P) bool, True where observed.
        gaps: (T-1,) float32 days between consecutive frames.
        dt: () float32 days between this sensor's centre frame and the S2 date (fusion, every sensor but S2).
        x_in: (T, C, W, W) the raw window around the patch centre, NaN kept, for an encoder that reads more
            context than the patch (the ``dense`` variant); None otherwise.
    """

    x: torch.Tensor
    valid: torch.Tensor
    gaps: torch.Tensor
    dt: torch.Tensor | None = None
    x_in: torch.Tensor | None = None

    @property
    def encoder_input(self) -> torch.Tensor:
        """What the encoder reads: the wider raw window where there is one, else the filled patch."""
        return self.x if self.x_in is None else self.x_in

    @property
    def size(self) -> int:
        """Patches in a batch (its leading axis)."""
        return int(self.x.shape[0])


@dataclass
class FusionPatches:
    """Every sensor's patches on the S2 dates, by sensor name (an item or a batch, like :class:`SensorPatches`)."""

    sensors: dict[str, SensorPatches]

    def __getitem__(self, sensor: str) -> SensorPatches:
        return self.sensors[sensor]

    @property
    def size(self) -> int:
        """Patches in a batch."""
        return next(iter(self.sensors.values())).size


def _stack(items: Sequence[SensorPatches]) -> SensorPatches:
    values: dict[str, Any] = {}  # the fields' types differ (a tensor, or None for an absent optional one)
    for f in fields(SensorPatches):
        parts = [getattr(it, f.name) for it in items]
        values[f.name] = None if parts[0] is None else torch.stack(parts)
    return SensorPatches(**values)


def collate(items: Sequence[Any]) -> Any:
    """Stack dataset items into a batch of their type (:class:`SensorPatches` or :class:`FusionPatches`)."""
    first = items[0]
    if isinstance(first, SensorPatches):
        return _stack(items)
    if isinstance(first, FusionPatches):
        return FusionPatches({k: _stack([it.sensors[k] for it in items]) for k in first.sensors})
    raise TypeError(f"collate stacks SensorPatches or FusionPatches, got {type(first).__name__}")


def patch_loader(dataset: Dataset[Any], **kwargs: Any) -> DataLoader[Any]:
    """A ``DataLoader`` over a patch dataset that collates its typed items (``kwargs`` as for ``DataLoader``)."""
    return DataLoader(dataset, collate_fn=collate, **kwargs)


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


class PatchDataset(Dataset[SensorPatches]):
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

    def __getitem__(self, i: int) -> SensorPatches:
        p = self.patches[i]
        site = self.sites[p.site]
        x, valid = fill_patch(cut_patch(site.values, p, self.patch_px))
        wide = self.context_px > self.patch_px // 2
        return SensorPatches(
            x=torch.from_numpy(x),
            valid=torch.from_numpy(valid),
            gaps=torch.from_numpy(gaps(site.days[list(p.frames)])),
            x_in=torch.from_numpy(cut_window(site.values, p, self.patch_px, self.context_px)) if wide else None,
        )


class FusionPatchDataset(Dataset[FusionPatches]):
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
        anchor: str = ANCHOR,
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

    def __getitem__(self, i: int) -> FusionPatches:
        p = self.patches[i]
        frames = list(p.frames)
        c = len(frames) // 2
        anchor_day = self.sensors[self.anchor][p.site].days[frames[c]]
        wide = self.context_px > self.patch_px // 2
        out = {}
        for k, sites in self.sensors.items():
            site = sites[p.site]
            x, valid = fill_patch(cut_patch(site.values, p, self.patch_px))
            dt = abs(float(site.days[frames[c]] - anchor_day))
            out[k] = SensorPatches(
                x=torch.from_numpy(x),
                valid=torch.from_numpy(valid),
                gaps=torch.from_numpy(gaps(site.days[frames])),
                dt=None if k == self.anchor else torch.tensor(dt, dtype=torch.float32),
                x_in=torch.from_numpy(cut_window(site.values, p, self.patch_px, self.context_px)) if wide else None,
            )
        return FusionPatches(out)
