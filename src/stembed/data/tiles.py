"""Training tiles for dense training: one crop of a split region, all dates of one time window.

A per-patch training item holds one centre pixel-date. A tile item holds a ``crop_px`` x ``crop_px``
crop of centre pixels with the dense encoder's context margin around it, over ``window_dates``
consecutive dates, plus ``subsets`` draws of ``n_frames`` of those dates (sorted, as the paper
samples a patch's frames). One pass of the frame CNN over the tile then gives the tokens of every
centre pixel on every date, and every (subset, pixel) pair whose centre value is observed is a
training window: ``subsets * crop_px**2`` of them share one encoder pass.

Reads stay inside the crop's split region and are reflected at its edges (the same rule as
:func:`stembed.data.datasets.cut_window`), so no pixel of another split is ever an input;
``inside`` marks the pixels that really lie in the region, so a reconstruction target never
counts a reflected pixel. Every random draw comes from the generator passed in.

Items are typed (:class:`Tiles`: a :class:`TileWindow` per sensor, keyed by sensor name, plus the
frame draws and the inside mask), and :func:`collate_tiles` stacks them into batches of the same type
(pass it to the ``DataLoader``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from stembed.config import SamplingConfig
from stembed.data.datasets import SensorArrays, fold_index
from stembed.data.sampling import Region, SamplingError
from stembed.sensors import ANCHOR


@dataclass(frozen=True)
class TileIndex:
    """One training tile: the site, its first date, its ``(subsets, n_frames)`` frame draws (indices into
    the tile's dates), the top-left centre pixel and the split region it must read inside."""

    site: int
    t0: int
    subsets: tuple[tuple[int, ...], ...]
    y0: int
    x0: int
    region: Region


def crop_starts(lo: int, hi: int, crop: int) -> list[int]:
    """Crop origins covering ``[lo, hi)`` with crops of ``crop`` px; the last one shifted inward to end at ``hi``."""
    starts = list(range(lo, hi - crop + 1, crop))
    if starts[-1] + crop < hi:
        starts.append(hi - crop)
    return starts


def sample_tiles(
    days: Sequence[np.ndarray], regions: Sequence[Region], cfg: SamplingConfig, crop_px: int, subsets: int,
    rng: np.random.Generator,
) -> list[TileIndex]:
    """Tile indices over ``regions`` (all of one split): every crop x every time window, ``subsets`` frame draws each.

    A draw whose dates span ``cfg.max_span_days`` or more is redrawn (up to 20 times, then dropped), as
    the per-patch sampler drops such patches.
    """
    out: list[TileIndex] = []
    for r in regions:
        h, w = r.y[1] - r.y[0], r.x[1] - r.x[0]
        if min(h, w) < crop_px:
            raise SamplingError(
                f"a split region of site {r.site} is {h} x {w} px, smaller than a {crop_px} px training tile; "
                f"fix: set dense_training.crop_px <= {min(h, w)}"
            )
        n_time = len(days[r.site])
        for t0 in range(0, n_time - cfg.window_dates + 1, cfg.window_stride):
            for y0 in crop_starts(r.y[0], r.y[1], crop_px):
                for x0 in crop_starts(r.x[0], r.x[1], crop_px):
                    draws = []
                    for _ in range(subsets):
                        for _try in range(20):
                            f = np.sort(rng.choice(cfg.window_dates, size=cfg.n_frames, replace=False))
                            if days[r.site][t0 + f[-1]] - days[r.site][t0 + f[0]] < cfg.max_span_days:
                                draws.append(tuple(int(i) for i in f))
                                break
                    if draws:
                        draws += [draws[-1]] * (subsets - len(draws))  # equal shapes for batching
                        out.append(TileIndex(r.site, t0, tuple(draws), y0, x0, r))
    return out


@dataclass
class TileWindow:
    """One sensor's part of a tile: one item of :class:`TileDataset`, or a batch (a leading axis B on every field).

    Attributes:
        window: (D, C, Hp, Wp) float32 raw values on the tile's D dates, NaN = missing (the dense encoder
            fills per pixel); Hp = Wp = crop_px + 2 * margin.
        days: (D,) float32 the sensor's acquisition day for each tile date, in days since the anchor's
            first date (the anchor's own dates for the anchor).
    """

    window: torch.Tensor
    days: torch.Tensor


@dataclass
class Tiles:
    """Tiles of every sensor by sensor name, the anchor among them (an item or a batch, like :class:`TileWindow`).

    Attributes:
        sensors: each sensor's :class:`TileWindow` by sensor name: stage 1 its own sensor alone, fusion the
            S2 anchor and the other sensors on its dates.
        subsets: (K, n_frames) long, K draws of sorted indices into the tile's D dates.
        inside: (Hp, Wp) bool, True where the pixel lies in the tile's split region (not reflected).
        anchor_key: the sensor whose dates drive the tile and whose observed centre values make the
            training windows.
    """

    sensors: dict[str, TileWindow]
    subsets: torch.Tensor
    inside: torch.Tensor
    anchor_key: str

    def __getitem__(self, sensor: str) -> TileWindow:
        return self.sensors[sensor]

    @property
    def anchor(self) -> TileWindow:
        """The anchor sensor's window and days."""
        return self.sensors[self.anchor_key]


def collate_tiles(items: Sequence[Tiles]) -> Tiles:
    """Stack :class:`TileDataset` items into a batch (pass it to the ``DataLoader``)."""
    first = items[0]
    return Tiles(
        sensors={
            k: TileWindow(torch.stack([it[k].window for it in items]), torch.stack([it[k].days for it in items]))
            for k in first.sensors
        },
        subsets=torch.stack([it.subsets for it in items]),
        inside=torch.stack([it.inside for it in items]),
        anchor_key=first.anchor_key,
    )


class TileDataset(Dataset[Tiles]):
    """Tiles of one sensor (stage 1) or of S2 with other sensors matched to its dates (fusion); items are
    :class:`Tiles`, stacked into batches by :func:`collate_tiles`.

    ``sensors``: each sensor's sites by sensor name, the anchor among them (stage 1: its own sensor alone).
    The anchor's dates drive the tile (its ``days`` count from its first date); every other sensor is
    already matched to them (one frame per anchor date), its ``days`` its own acquisition days, same origin.
    """

    def __init__(
        self,
        sensors: Mapping[str, Sequence[SensorArrays]],
        tiles: Sequence[TileIndex],
        window_dates: int,
        crop_px: int,
        margin: int,
        anchor: str = ANCHOR,
        batch_size: int = 1,
    ) -> None:
        if anchor not in sensors:
            raise ValueError(f"no {anchor!r} sites among the sensors {list(sensors)}: the anchor's dates drive the tiles")
        self.batch_size = batch_size  # tiles per training batch (the loaders read it)
        self.sensors = {k: list(v) for k, v in sensors.items()}
        self.anchor = anchor
        self.tiles = list(tiles)
        self.window_dates, self.crop_px, self.margin = window_dates, crop_px, margin

    def __len__(self) -> int:
        return len(self.tiles)

    def _read(self, arrays: SensorArrays, t: TileIndex) -> np.ndarray:
        r, m, n = t.region, self.margin, self.crop_px
        yi = fold_index(t.y0 - m, t.y0 + n + m, r.y[0], r.y[1])
        xi = fold_index(t.x0 - m, t.x0 + n + m, r.x[0], r.x[1])
        return arrays.values[t.t0 : t.t0 + self.window_dates][:, :, yi[:, None], xi[None, :]]

    def __getitem__(self, i: int) -> Tiles:
        t = self.tiles[i]
        r, m, n = t.region, self.margin, self.crop_px
        origin = self.sensors[self.anchor][t.site].days[t.t0]
        ys, xs = np.arange(t.y0 - m, t.y0 + n + m), np.arange(t.x0 - m, t.x0 + n + m)
        inside = ((ys >= r.y[0]) & (ys < r.y[1]))[:, None] & ((xs >= r.x[0]) & (xs < r.x[1]))[None, :]
        windows = {}
        for k, sites in self.sensors.items():
            site = sites[t.site]
            windows[k] = TileWindow(
                window=torch.from_numpy(np.ascontiguousarray(self._read(site, t), dtype=np.float32)),
                days=torch.from_numpy((site.days[t.t0 : t.t0 + self.window_dates] - origin).astype(np.float32)),
            )
        return Tiles(
            sensors=windows,
            subsets=torch.tensor(t.subsets, dtype=torch.long),
            inside=torch.from_numpy(inside),
            anchor_key=self.anchor,
        )
