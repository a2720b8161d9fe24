"""Which of a pixel's dates a context fusion reads around the date it embeds (:class:`~stembed.config.WindowConfig`).

The paper's window is 11 consecutive dates: about two to three months of a European series, too little of a
crop's season. A context window spreads ``dates`` target offsets over +-``span_days`` (denser near the
date with ``density`` > 1) and gives each target the pixel's nearest *observed* date not yet taken. So the
window follows each pixel's own clear dates (a cloudy date is never in it), shifts inward at the ends of
the series, and holds fewer dates (marked -1) only where the pixel has fewer observed dates than targets.

Everything here is numpy and vectorised over pixels: training draws jittered targets per sample, inference
uses the cell centres, and the probe's ``window_pca`` baseline calls the same function, so the baseline
sees exactly the model's dates. A ``trailing`` window (``side``) takes its dates before the date only, for
embeddings that never change when later dates arrive. The paper's window of the stage-1 encoders (:func:`window_days`: 11
consecutive dates, reflected at the ends of the series) lives here too.
"""

from __future__ import annotations

import numpy as np

from stembed.config import WindowConfig

NONE = -1
"""The index of a window slot that found no observed date."""


def target_offsets(cfg: WindowConfig, rng: np.random.Generator | None = None, n: int = 1) -> np.ndarray:
    """``(n, dates)`` target offsets in days, ordered by distance from the date (nearest first; a centred window's
    alternate sides, a trailing window's are all before the date).

    Without ``rng`` each side's ``u`` are the centres of equal cells of (0, 1] (``dates / 2`` cells a side when
    centred, ``dates`` before the date when trailing); with it, one uniform draw inside each cell per row
    (training), so every offset the model sees at inference is one it was trained near.
    """
    sides, k = (1, cfg.dates) if cfg.side == "trailing" else (2, cfg.dates // 2)
    cells = np.arange(k, dtype=np.float64)  # (k,)
    if rng is None:
        u = np.broadcast_to((cells + 0.5) / k, (n, sides, k))
    else:
        u = (cells + rng.random((n, sides, k))) / k
    off = cfg.span_days * u**cfg.density  # (n, sides, k), increasing along k
    if sides == 1:
        return -off[:, 0]
    signed = np.stack([-off[:, 0], off[:, 1]], axis=2)  # (n, k, 2): before, after
    return signed.reshape(n, 2 * k)


def select_dates(
    days: np.ndarray, observed: np.ndarray, t: np.ndarray, offsets: np.ndarray, *, trailing: bool = False
) -> np.ndarray:
    """The window of each sample: ``(N, K)`` date indices, :data:`NONE` where no observed date was left.

    Args:
        days: ``(T,)`` day numbers of the series (sorted), or ``(N, T)``: each sample's own series.
        observed: ``(N, T)`` bool, the sample's pixel is observed on each date.
        t: ``(N,)`` the date each sample embeds (never part of its own window).
        offsets: ``(K,)`` or ``(N, K)`` target offsets in days, in the order they choose (nearest first).
        trailing: no date after ``t`` is ever chosen (the series as it stood on ``t``).

    Each target takes the nearest observed date (ties: the earlier date) not taken by an earlier target.
    """
    observed = np.asarray(observed, dtype=bool)
    n, n_time = observed.shape
    offsets = np.broadcast_to(np.asarray(offsets, dtype=np.float64), (n, np.shape(offsets)[-1]))
    days = np.broadcast_to(np.asarray(days, dtype=np.float64), (n, n_time))
    t = np.asarray(t, dtype=np.int64)
    rows = np.arange(n)
    free = observed.copy()
    free[rows, t] = False  # the date itself is the model's centre token, not a context date
    if trailing:
        free &= np.arange(n_time)[None, :] < t[:, None]
    out = np.full(offsets.shape, NONE, dtype=np.int64)
    for j in range(offsets.shape[1]):
        target = days[rows, t] + offsets[:, j]  # (N,)
        dist = np.abs(days - target[:, None])  # (N, T)
        dist[~free] = np.inf
        pick = np.argmin(dist, axis=1)  # first minimum: the earlier date on a tie
        ok = np.isfinite(dist[rows, pick])
        out[ok, j] = pick[ok]
        free[rows[ok], pick[ok]] = False
    return out


def window_dates(
    cfg: WindowConfig, days: np.ndarray, observed: np.ndarray, t: np.ndarray, rng: np.random.Generator | None = None
) -> np.ndarray:
    """:func:`select_dates` with the config's targets: ``(N, dates)``; ``rng``: jittered targets (training)."""
    offsets = target_offsets(cfg, rng, n=len(t)) if rng is not None else target_offsets(cfg)[0]
    return select_dates(days, observed, t, offsets, trailing=cfg.side == "trailing")


# ----------------------------------------------------------------------------- the paper's window (stage 1)
def min_dates(n_frames: int) -> int:
    """Dates a cube needs so that every date's window can be reflected at the ends of the series."""
    return n_frames // 2 + 1


def window_days(days: np.ndarray, t: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame date indices and frame day numbers of the window centred on date ``t``.

    Past either end of the series the dates are *reflected*: frame ``-k`` is date ``k``, placed
    ``day_k - day_0`` days before the first date (and likewise after the last), so the target date
    always sits on the centre frame, where the model was trained to describe it.
    """
    n = len(days)
    half = n_frames // 2
    if n < min_dates(n_frames):
        raise ValueError(
            f"a window of {n_frames} frames needs at least {min_dates(n_frames)} dates to reflect at the ends; "
            f"the cube has {n}: use a longer period"
        )
    idx, fdays = [], []
    for o in range(t - half, t + half + 1):
        if o < 0:
            i, d = -o, days[0] - (days[-o] - days[0])
        elif o > n - 1:
            i = 2 * (n - 1) - o
            d = days[-1] + (days[-1] - days[i])
        else:
            i, d = o, days[o]
        idx.append(i)
        fdays.append(d)
    return np.asarray(idx), np.asarray(fdays, dtype=np.int64)


def asof_depth(n_frames: int) -> int:
    """How many dates up to and including t have a stage-1 latent that, as of t, differs from the centred one:
    date ``t - j`` for ``j < n_frames // 2`` (its centred window reads dates after t)."""
    return n_frames // 2


def asof_window_days(days: np.ndarray, t: int, j: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`window_days` of date ``t - j`` in the series as it stood on date ``t`` (reflected at t)."""
    return window_days(days[: t + 1], t - j, n_frames)


def frame_days(days2: np.ndarray, s2_days: np.ndarray, frames: np.ndarray, days: np.ndarray) -> np.ndarray:
    """A matched sensor's day of each window frame, moved like the S2 day when the frame is reflected."""
    return days[frames] + (days2 - s2_days[frames])
