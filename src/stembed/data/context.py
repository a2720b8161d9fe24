"""Training data of a context fusion: crops of a split's regions over every date, and batches of windows.

A context fusion reads the frozen stage-1 latents of a date and of its window of the pixel's other
observed dates (:mod:`stembed.data.windows`). The autoencoders are frozen, so every latent of a split is
computed once before training (the caller's job, ``stembed.inference.engine.block_latents``) and a step
only gathers them: no encoder runs during training. :class:`ContextCrops` holds a split's crops (every
date, the encoder's context margin reflected inside the region, as in dense training: no pixel of
another split is ever an input), and :class:`ContextBatches` draws typed batches of windows from them.

Every random draw (which pixel-dates, the window's jittered targets, hidden dates, the two views) comes
from a generator seeded by the config's seed, the process's rank and the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset

from stembed.config import ContextLossConfig, WindowConfig
from stembed.data.datasets import SensorArrays, fold_index
from stembed.data.sampling import Region, SamplingError
from stembed.data.tiles import crop_starts
from stembed.data.windows import NONE, asof_window_days, frame_days, min_dates, window_dates, window_days
from stembed.sensors import ANCHOR


@dataclass
class ContextCrops:
    """A split's crops over every date: ``R`` crops of ``crop_px`` centre pixels with a ``margin`` each side.

    Attributes:
        values: per sensor ``(R, T, C, Hp, Wp)`` float32, NaN missing, on the S2 dates (other sensors matched);
            T is the longest site's series, shorter ones padded with NaN.
        days: per sensor ``(R, T)`` day numbers (S2's own; another sensor's matched acquisition days);
            padded dates continue a day apart after the last real one (never observed, never read).
        n_time: ``(R,)`` real dates of each crop's site.
        inside: ``(R, Hp, Wp)`` bool, the pixel lies in the crop's split region (not reflected).
        crop_px, margin: centre pixels per edge, and the encoder's context on each side.
    """

    values: dict[str, torch.Tensor]
    days: dict[str, np.ndarray]
    n_time: np.ndarray
    inside: torch.Tensor
    crop_px: int
    margin: int

    @property
    def n_crops(self) -> int:
        """Crops in the split (R)."""
        return int(self.n_time.size)

    def block(self, r: int) -> dict[str, SensorArrays]:
        """Crop ``r`` as the engine's block (its real dates only)."""
        n = int(self.n_time[r])
        return {k: SensorArrays(v[r, :n].numpy(), self.days[k][r, :n]) for k, v in self.values.items()}


def context_crops(
    sensors: Mapping[str, Sequence[SensorArrays]], regions: Sequence[Region], crop_px: int, margin: int
) -> ContextCrops:
    """Cut every region of a split into ``crop_px`` crops (the last shifted inward), every date, reflected at the
    region's edges beyond it; ``sensors``: each sensor's sites (S2's own dates; the others matched to them)."""
    if not regions:
        raise SamplingError("a split has no region to cut context crops from")
    n_max = max(len(sensors[ANCHOR][r.site].days) for r in regions)
    values: dict[str, list[np.ndarray]] = {k: [] for k in sensors}
    days: dict[str, list[np.ndarray]] = {k: [] for k in sensors}
    inside, n_time = [], []
    for r in regions:
        h, w = r.y[1] - r.y[0], r.x[1] - r.x[0]
        if min(h, w) < crop_px:
            raise SamplingError(
                f"a split region of site {r.site} is {h} x {w} px, smaller than a {crop_px} px crop; "
                f"fix: set dense_training.crop_px <= {min(h, w)}"
            )
        for y0 in crop_starts(r.y[0], r.y[1], crop_px):
            for x0 in crop_starts(r.x[0], r.x[1], crop_px):
                yi = fold_index(y0 - margin, y0 + crop_px + margin, r.y[0], r.y[1])
                xi = fold_index(x0 - margin, x0 + crop_px + margin, r.x[0], r.x[1])
                ys, xs = np.arange(y0 - margin, y0 + crop_px + margin), np.arange(x0 - margin, x0 + crop_px + margin)
                inside.append(((ys >= r.y[0]) & (ys < r.y[1]))[:, None] & ((xs >= r.x[0]) & (xs < r.x[1]))[None, :])
                for k, sites in sensors.items():
                    a = sites[r.site]
                    n = a.values.shape[0]
                    v = np.full((n_max, a.values.shape[1], len(yi), len(xi)), np.nan, dtype=np.float32)
                    v[:n] = a.values[:, :, yi[:, None], xi[None, :]]
                    d = np.concatenate([a.days, a.days[-1] + 1 + np.arange(n_max - n)]).astype(np.float64)
                    values[k].append(v)
                    days[k].append(d)
                n_time.append(len(sensors[ANCHOR][r.site].days))
    return ContextCrops(
        values={k: torch.from_numpy(np.stack(v)) for k, v in values.items()},
        days={k: np.stack(v) for k, v in days.items()},
        n_time=np.asarray(n_time),
        inside=torch.from_numpy(np.stack(inside)),
        crop_px=crop_px,
        margin=margin,
    )


@dataclass
class SplitLatents:
    """Every sensor's frozen latent and presence at every pixel-date of a split's crops.

    Attributes:
        z: per sensor ``(R, T, L, P)`` float32, P = crop_px**2 centre pixels (row-major): each date's centred
            stage-1 latent.
        present: per sensor ``(R, T, P)`` bool: the sensor has a value there (S2: the centre pixel is observed).
        recent: a trailing window's: per sensor ``(R, T, J, L, P)``, ``[r, t, j]`` the latent of date ``t - j`` as
            it stood on t (:func:`stembed.inference.engine.asof_latents`, NaN where t has too little history); a
            window of date t reads these for its dates within ``J - 1`` of t, ``z`` for older ones. None: centred.
    """

    z: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    recent: dict[str, np.ndarray] | None = None


@dataclass
class ContextView:
    """The fusion's inputs of B windows (:meth:`ContextFusionModel.fuse`), S = 1 + K slots: latents ``z`` and
    ``present`` per sensor (B, S, L_k) and (B, S), ``dt`` per non-anchor sensor (B, S), ``offset`` (B, S) and
    ``day`` (B, S) the slots' day numbers."""

    z: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    dt: dict[str, torch.Tensor]
    offset: torch.Tensor
    day: torch.Tensor


@dataclass
class ContextBatch:
    """B windows of a context fusion, with what their losses need.

    Attributes:
        inputs: the fusion's inputs (:class:`ContextView`); slot 0 is the embedded date.
        view_b: the second view of each window (the agreement term), else None.
        season: per sensor ``(B, K, C)`` the centre pixel's values on the window's dates (NaN missing), the
            targets of the season decoder, whose offsets are ``inputs.offset[:, 1:]``.
        crop, pixel: ``(B,)`` crop index and flat centre pixel of each window (its date reconstruction's patch).
        frames: ``(B, n_frames)`` the date's stage-1 window (date indices) and ``gaps`` per sensor
            ``(B, n_frames - 1)`` the day gaps the frozen decoders are given.
        hidden: ``(B,)`` bool, the date's own S2 is hidden.
        crops: the split's crops the targets are read from.
    """

    inputs: ContextView
    view_b: ContextView | None
    season: dict[str, torch.Tensor]
    crop: torch.Tensor
    pixel: torch.Tensor
    frames: torch.Tensor
    gaps: dict[str, torch.Tensor]
    hidden: torch.Tensor
    crops: ContextCrops

    @property
    def size(self) -> int:
        """Windows in the batch."""
        return int(self.crop.shape[0])


class ContextBatches(IterableDataset[ContextBatch]):
    """``batches`` batches of ``batch_size`` windows per pass, drawn among the split's observed S2 pixel-dates.

    ``train``: jittered window targets, hidden dates and (with the agreement term) two views, freshly drawn
    every pass; otherwise (validation) the same deterministic batches every pass: the window's own targets,
    and hidden dates drawn from a fixed generator, so the monitored loss is comparable between epochs.
    """

    def __init__(
        self,
        crops: ContextCrops,
        latents: SplitLatents,
        window: WindowConfig,
        terms: ContextLossConfig,
        n_frames: int,
        *,
        batch_size: int,
        batches: int,
        seed: int,
        train: bool,
    ) -> None:
        self.crops, self.latents, self.window, self.terms = crops, latents, window, terms
        self.n_frames, self.batch_size, self.batches, self.seed, self.train = n_frames, batch_size, batches, seed, train
        self.trailing = window.side == "trailing"
        if self.trailing and latents.recent is None:
            raise ValueError("a trailing window reads as-of latents: compute the split's latents for it")
        # a trailing window embeds no date whose series up to it is too short for the stage-1 window
        self.first = min_dates(n_frames) - 1 if self.trailing else 0
        r, t, p = np.nonzero(latents.present[ANCHOR][:, self.first :])
        if r.size == 0:
            raise SamplingError("a split has no observed S2 pixel-date to train a context fusion on")
        self.pool = (r, t + self.first, p)
        self.epoch = 0
        self._frames, self._gaps = _stage1_frames(crops, n_frames, self.first)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[ContextBatch]:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        rng = np.random.default_rng((self.seed, rank, self.epoch if self.train else 0))
        if self.train:
            self.epoch += 1  # num_workers = 0 (the config's default): this object lives on, the next pass differs
        for _ in range(self.batches):
            yield self.draw(rng)

    def draw(self, rng: np.random.Generator) -> ContextBatch:
        """One batch of windows (see the class docstring)."""
        pick = rng.integers(0, self.pool[0].size, self.batch_size)
        hidden = rng.random(pick.size) < self.terms.hide_date
        return self.sample(pick, hidden, rng if self.train else None, spells=rng)

    def sample(
        self,
        pick: np.ndarray,
        hidden: np.ndarray | bool = False,
        rng: np.random.Generator | None = None,
        *,
        spells: np.random.Generator | None = None,
    ) -> ContextBatch:
        """The windows of pool entries ``pick``: ``hidden`` hides the date's own S2 (all, or a ``(B,)`` mask);
        ``rng`` jitters the window's targets and draws the two views (None: the window's own targets, one view);
        ``spells`` draws which hidden dates also lose their neighbours within ``run_days`` (None: none do)."""
        terms = self.terms
        r, t, p = (a[pick] for a in self.pool)
        B = r.size
        hidden = np.broadcast_to(np.asarray(hidden, dtype=bool), (B,)).copy()
        days = self.crops.days[ANCHOR][r]  # (B, T)
        observed = self.latents.present[ANCHOR][r, :, p].copy()  # (B, T)
        if spells is not None:  # a cloudy spell: the dates near the date are gone before the window is drawn
            spell = hidden & (spells.random(B) < terms.hide_run)
            near = np.abs(days - days[np.arange(B), t][:, None]) <= terms.run_days
            observed[spell] &= ~near[spell]
        dates = window_dates(self.window, days, observed, t, rng)  # (B, K)
        slots = np.concatenate([t[:, None], dates], axis=1)  # (B, S)
        inputs = self._inputs(r, t, p, slots, hidden)
        view_b = None
        if terms.agreement > 0 and rng is not None:
            inputs = _keep(inputs, rng.random(dates.shape) < terms.view_keep)  # each view keeps its own share
            if terms.agreement_days > 0:  # another date of the pixel, with its own window
                t_b = self._other_date(r, t, p, days, rng)
                dates = window_dates(self.window, days, self.latents.present[ANCHOR][r, :, p], t_b, rng)
                view_b = self._inputs(r, t_b, p, np.concatenate([t_b[:, None], dates], axis=1), hidden & (t_b == t))
            else:
                view_b = self._inputs(r, t, p, slots, hidden)
            view_b = _keep(view_b, rng.random(dates.shape) < terms.view_keep)
        empty = slots == NONE
        idx = np.where(empty, 0, slots)
        m, c = self.crops.margin, self.crops.crop_px
        py, px = p // c + m, p % c + m
        season = {
            k: v[torch.from_numpy(r[:, None]), torch.from_numpy(idx[:, 1:]), :, torch.from_numpy(py[:, None]),
                 torch.from_numpy(px[:, None])].masked_fill(torch.from_numpy(empty[:, 1:, None]), float("nan"))
            for k, v in self.crops.values.items()
        }  # (B, K, C)
        return ContextBatch(
            inputs=inputs,
            view_b=view_b,
            season=season,
            crop=torch.from_numpy(r),
            pixel=torch.from_numpy(p),
            frames=torch.from_numpy(self._frames[r, t]),
            gaps={k: torch.from_numpy(g[r, t]) for k, g in self._gaps.items()},
            hidden=torch.from_numpy(hidden),
            crops=self.crops,
        )

    def _inputs(self, r: np.ndarray, t: np.ndarray, p: np.ndarray, slots: np.ndarray, hidden: np.ndarray) -> ContextView:
        """The fusion's inputs of windows ``slots`` (B, S) at crop ``r``, pixel ``p``; slot 0 (date ``t``) has its own
        S2 hidden where ``hidden``."""
        B = r.size
        rows = np.arange(B)[:, None]
        empty = slots == NONE
        idx = np.where(empty, 0, slots)
        days = self.crops.days[ANCHOR][r]  # (B, T)
        z, present, dt = {}, {}, {}
        for k, lat in self.latents.z.items():
            zk = lat[r[:, None], idx, :, p[:, None]]  # (B, S, L)
            if self.latents.recent is not None:  # the window's recent dates as they stood on t
                rec = self.latents.recent[k]  # (R, T, J, L, P)
                j = t[:, None] - idx  # (B, S) >= 0: a trailing window reads no later date
                near = (j < rec.shape[2]) & ~empty
                rows_n = np.nonzero(near)[0]
                zk[near] = rec[r[rows_n], t[rows_n], j[near], :, p[rows_n]]
            z[k] = torch.from_numpy(zk)
            pk = self.latents.present[k][r[:, None], idx, p[:, None]] & ~empty  # (B, S)
            if k == ANCHOR:
                pk[:, 0] &= ~hidden
            else:
                dt[k] = torch.from_numpy((self.crops.days[k][r[:, None], idx] - days[rows, idx]).astype(np.float32))
            present[k] = torch.from_numpy(np.ascontiguousarray(pk))
        offset = np.where(empty, 0.0, days[rows, idx] - days[np.arange(B), t][:, None])
        day = np.where(empty, days[np.arange(B), t][:, None], days[rows, idx])
        return ContextView(z, present, dt, torch.from_numpy(offset.astype(np.float32)),
                           torch.from_numpy(day.astype(np.float32)))

    def _other_date(
        self, r: np.ndarray, t: np.ndarray, p: np.ndarray, days: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Another observed date of each sample's pixel within +-``agreement_days`` (the date itself if none)."""
        B = r.size
        observed = self.latents.present[ANCHOR][r, :, p]  # (B, T)
        near = observed & (np.abs(days - days[np.arange(B), t][:, None]) <= self.terms.agreement_days)
        near[np.arange(B), t] = False
        near[:, : self.first] = False  # never a date a trailing window cannot embed
        pick = np.where(near, rng.random(near.shape), -1.0).argmax(axis=1)
        return np.where(near.any(axis=1), pick, t)


def _keep(view: ContextView, keep: np.ndarray) -> ContextView:
    """A view of the windows: slot 0 (the date) as it was, each window slot kept where ``keep`` (B, K)."""
    present = {}
    for k, v in view.present.items():
        v = v.clone()
        v[:, 1:] &= torch.from_numpy(keep)
        present[k] = v
    return ContextView(view.z, present, view.dt, view.offset, view.day)


def _stage1_frames(crops: ContextCrops, n_frames: int, first: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each crop-date's stage-1 window (``(R, T, n_frames)`` date indices) and every sensor's day gaps
    ``(R, T, n_frames - 1)`` float32, as the frozen encoders and decoders see them (padded dates: zeros).

    ``first`` > 0 (a trailing window): each date's window as the series stood on it (reflected at the date), from
    date ``first`` on; the dates before it are zeros (never drawn).
    """
    R, T = crops.days[ANCHOR].shape
    frames = np.zeros((R, T, n_frames), dtype=np.int64)
    gaps = {k: np.zeros((R, T, n_frames - 1), dtype=np.float32) for k in crops.days}
    for r in range(R):
        n = int(crops.n_time[r])
        s2_days = crops.days[ANCHOR][r, :n]
        for t in range(first, n):
            f, d2 = asof_window_days(s2_days, t, 0, n_frames) if first else window_days(s2_days, t, n_frames)
            frames[r, t] = f
            for k, d in crops.days.items():
                days = d2 if k == ANCHOR else frame_days(d2, s2_days, f, d[r, :n])
                gaps[k][r, t] = np.diff(days)
    return frames, gaps
