"""Per-patch embedding of one block of a cube: the compute shared by the reference and ``stembed embed``.

A *block* is a rectangle of the grid with a halo of ``patch_px // 2`` pixels on each side (real
neighbours inside the cube, reflected pixels beyond its edge) and every date. Each pixel-date whose
S2 centre pixel is observed gets the embedding of its own ``patch_px`` x ``patch_px`` x ``n_frames``
patch, exactly as in training (:func:`stembed.data.datasets.fill_patch`).

Batches always hold ``batch_size`` patches (the last one is padded with copies), because CPU
kernels round differently for different batch shapes but not for different batch contents. So for
a given ``batch_size`` the output of a pixel-date is bit-identical however the grid is tiled and
whichever worker runs it; other batch sizes agree to float32 rounding (~1e-7).
"""

from __future__ import annotations

import numpy as np
import torch

from stembed.data.datasets import fill_patch
from stembed.models.fusion import FusionModel


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto``/None: CUDA when present, else CPU."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    idx, frame_days = [], []
    for o in range(t - half, t + half + 1):
        if o < 0:
            i, d = -o, days[0] - (days[-o] - days[0])
        elif o > n - 1:
            i = 2 * (n - 1) - o
            d = days[-1] + (days[-1] - days[i])
        else:
            i, d = o, days[o]
        idx.append(i)
        frame_days.append(d)
    return np.asarray(idx), np.asarray(frame_days, dtype=np.int64)


def reflect_index(start: int, stop: int, n: int) -> np.ndarray:
    """Indices ``start..stop-1`` into an axis of length ``n``, reflected (without repeating the edge) past its ends."""
    i = np.arange(start, stop)
    i = np.where(i < 0, -i, i)
    return np.where(i > n - 1, 2 * (n - 1) - i, i)


def centre_valid(s2_block: np.ndarray, halo: int) -> np.ndarray:
    """``(time, y, x)``: the S2 centre pixel has at least one observed band (the training filter)."""
    core = s2_block[:, :, halo : s2_block.shape[2] - halo, halo : s2_block.shape[3] - halo]
    return np.isfinite(core).any(axis=1)


@torch.no_grad()
def embed_block(
    model: FusionModel,
    s2: np.ndarray,
    s1: np.ndarray,
    s2_days: np.ndarray,
    s1_days: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Embed every pixel-date of a block.

    Args:
        model: the fusion model (eval mode, on ``device``).
        s2: ``(time, band, h + 2r, w + 2r)`` S2 values with a halo of ``r = patch_px // 2``.
        s1: ``(time, band, h + 2r, w + 2r)`` S1 values matched to the S2 dates (NaN = no S1 date close).
        s2_days, s1_days: ``(time,)`` day numbers of the S2 dates and of the matched S1 dates.
        batch_size: patches per forward pass (fixed: see the module docstring).
        device: where the model runs.

    Returns:
        ``(time, embed_dim, h, w)`` float32, NaN where the S2 centre pixel is not observed.
    """
    n_frames, p = model.s2.cfg.n_frames, model.s2.cfg.patch_px
    r = p // 2
    n_time, _, hp, wp = s2.shape
    h, w = hp - 2 * r, wp - 2 * r
    out = np.full((n_time, model.cfg.embed_dim, h, w), np.nan, dtype=np.float32)
    ts, ys, xs = np.nonzero(centre_valid(s2, r))
    if ts.size == 0:
        return out
    c = n_frames // 2
    windows = [window_days(s2_days, t, n_frames) for t in range(n_time)]
    frames = np.stack([f for f, _ in windows])  # (time, n_frames) date index of each frame
    days2 = np.stack([d for _, d in windows])  # (time, n_frames) day number of each S2 frame
    # S1 day of each frame: the matched S1 day, moved like the S2 day when the frame is reflected
    days1 = s1_days[frames] + (days2 - s2_days[frames])
    view2 = np.lib.stride_tricks.sliding_window_view(s2, (p, p), axis=(2, 3))  # (T, C2, h, w, p, p)
    view1 = np.lib.stride_tricks.sliding_window_view(s1, (p, p), axis=(2, 3))  # (T, C1, h, w, p, p)
    for i in range(0, ts.size, batch_size):
        tb, yb, xb = ts[i : i + batch_size], ys[i : i + batch_size], xs[i : i + batch_size]
        n = tb.size
        take = np.concatenate([np.arange(n), np.zeros(batch_size - n, dtype=np.int64)])  # pad with copies
        tb, yb, xb = tb[take], yb[take], xb[take]
        f = frames[tb]  # (B, n_frames)
        # C order first: numpy picks the layout of a fancy-indexed result, and the fill's sums must
        # not depend on it
        x2, _ = fill_patch(
            np.ascontiguousarray(view2[f, :, yb[:, None], xb[:, None]])
        )  # (B, n_frames, C2, p, p)
        x1, _ = fill_patch(
            np.ascontiguousarray(view1[f, :, yb[:, None], xb[:, None]])
        )  # (B, n_frames, C1, p, p)
        d2, d1 = days2[tb], days1[tb]
        e = model.embed(
            torch.from_numpy(x1).to(device),
            torch.from_numpy(np.diff(d1, axis=1).astype(np.float32)).to(device),
            torch.from_numpy(x2).to(device),
            torch.from_numpy(np.diff(d2, axis=1).astype(np.float32)).to(device),
            torch.from_numpy(np.abs(d1[:, c] - d2[:, c]).astype(np.float32)).to(device),
        )  # (B, embed_dim)
        out[tb[:n], :, yb[:n], xb[:n]] = e[:n].float().cpu().numpy()
    return out
