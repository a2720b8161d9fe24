"""Training-patch sampling (spec §1.4) and grouped train/val/test splits.

A patch is ``n_frames`` dates x ``patch_px`` x ``patch_px`` pixels. Dates come from windows of
``window_dates`` consecutive cube dates (stride ``window_stride``); from each window the sampler
draws ``n_frames`` of them without replacement and sorts them. Positions step by
``spatial_stride``. A patch is kept only if its centre pixel on its centre frame has at least one
valid band and its dates span fewer than ``max_span_days`` days.

Every random draw comes from the ``numpy.random.Generator`` passed in; nothing global is touched.
Samplers return indices (:class:`PatchIndex`), never pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stembed.config import SamplingConfig, SplitConfig
from stembed.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PatchIndex:
    """Where one patch lies: a site (cube) index, its sorted frame indices, its top-left pixel, and the
    ``(y_start, y_stop, x_start, x_stop)`` of its split region (an encoder's extra context is read
    inside it, so no pixel of another split is ever an input)."""

    site: int
    frames: tuple[int, ...]
    y0: int
    x0: int
    bounds: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class Region:
    """A rectangle of one site that patches must lie wholly inside (a split group)."""

    site: int
    y: tuple[int, int]  # [start, stop)
    x: tuple[int, int]


class SamplingError(UserError):
    """The data cannot give the patches or the split that was asked for."""


def day_numbers(times: np.ndarray) -> np.ndarray:
    """Integer calendar days since 1970-01-01 (times truncated to the day, as in the spec)."""
    return np.asarray(times, dtype="datetime64[D]").astype(np.int64)


def sample_patches(
    centre_ok: np.ndarray,
    days: np.ndarray,
    region: Region,
    cfg: SamplingConfig,
    rng: np.random.Generator,
) -> list[PatchIndex]:
    """Sample patch indices inside one region.

    Args:
        centre_ok: ``(time, y, x)`` bool, True where at least one band is valid.
        days: ``(time,)`` integer day numbers of the cube's dates (sorted).
        region: the site and rectangle the patches must stay inside.
        cfg: patch geometry and strides.
        rng: the only source of randomness.
    """
    n_time = centre_ok.shape[0]
    p, c = cfg.patch_px, cfg.patch_px // 2
    centre_frame = cfg.n_frames // 2
    out: list[PatchIndex] = []
    bounds = (region.y[0], region.y[1], region.x[0], region.x[1])
    for t0 in range(0, n_time - cfg.window_dates + 1, cfg.window_stride):
        for y0 in range(region.y[0], region.y[1] - p + 1, cfg.spatial_stride):
            for x0 in range(region.x[0], region.x[1] - p + 1, cfg.spatial_stride):
                frames = np.sort(rng.choice(cfg.window_dates, size=cfg.n_frames, replace=False)) + t0
                if days[frames[-1]] - days[frames[0]] >= cfg.max_span_days:
                    continue
                if not centre_ok[frames[centre_frame], y0 + c, x0 + c]:
                    continue
                out.append(PatchIndex(region.site, tuple(int(f) for f in frames), y0, x0, bounds))
    return out


def make_regions(shapes: Sequence[tuple[int, int]], split: SplitConfig, patch_px: int) -> list[Region]:
    """Split groups: one region per site, or ``blocks x blocks`` disjoint blocks per site."""
    regions: list[Region] = []
    for site, (h, w) in enumerate(shapes):
        if split.by == "site":
            regions.append(Region(site, (0, h), (0, w)))
            continue
        ys = np.linspace(0, h, split.blocks + 1).astype(int)
        xs = np.linspace(0, w, split.blocks + 1).astype(int)
        for i in range(split.blocks):
            for j in range(split.blocks):
                if ys[i + 1] - ys[i] < patch_px or xs[j + 1] - xs[j] < patch_px:
                    raise SamplingError(
                        f"site {site} is {h}x{w} px: {split.blocks}x{split.blocks} blocks are smaller than a "
                        f"{patch_px} px patch; set data.split.blocks lower"
                    )
                regions.append(Region(site, (int(ys[i]), int(ys[i + 1])), (int(xs[j]), int(xs[j + 1]))))
    return regions


def assign_splits(n_groups: int, split: SplitConfig) -> dict[str, list[int]]:
    """Shuffle groups (seeded by ``split.seed``) and deal them to train/val/test by ``split.fractions``.

    Each split with a non-zero fraction gets at least one group, so no split is silently empty.
    """
    needed = sum(f > 0 for f in split.fractions)
    if n_groups < needed:
        raise SamplingError(
            f"a grouped split needs at least {needed} groups (sites or blocks) but the data has {n_groups}; "
            "add sites, or set data.split.by=block to cut each site into disjoint spatial blocks"
        )
    order = np.random.default_rng(split.seed).permutation(n_groups)
    counts = [int(round(f * n_groups)) for f in split.fractions]
    for i, f in enumerate(split.fractions):  # no non-empty fraction ends with zero groups
        if f > 0 and counts[i] == 0:
            counts[i] = 1
    while sum(counts) > n_groups:  # take back from the largest split
        counts[int(np.argmax(counts))] -= 1
    counts[0] += n_groups - sum(counts)
    bounds = np.cumsum([0, *counts])
    return {name: sorted(int(g) for g in order[bounds[i] : bounds[i + 1]]) for i, name in enumerate(SPLITS)}
