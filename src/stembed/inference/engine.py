"""Embedding of one block of a cube: the compute shared by the reference and ``stembed embed``.

A *block* is a rectangle of the grid with a halo of ``context_px`` pixels on each side (real
neighbours inside the cube, reflected pixels beyond its edge) and every date. Each pixel-date whose
S2 centre pixel is observed gets the embedding of its own window of ``input_px`` x ``input_px`` x
``n_frames`` (15 x 15 x 11 for the paper's encoder), exactly as in training.

Two ways to compute it: :func:`embed_block` encodes every window on its own (the reference, and the
only way for the paper's ``patch`` encoder); :func:`embed_block_dense` (``dense`` encoder variant)
encodes each date's frame of the whole block once and lets every window that contains the date reuse
its tokens, then runs only the temporal transformer, head and fusion per window. The two agree to
float rounding (~1e-7, tested <= 1e-4); a pixel's dense result also moves by float rounding when the
tiling changes (convolutions over frames of other sizes sum in other orders), so only the per-patch
path is bit-identical across tilings.

Per-patch batches always hold ``batch_size`` patches (the last one is padded with copies), because CPU
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
        s2: ``(time, band, h + 2r, w + 2r)`` S2 values with a halo of ``r = context_px``.
        s1: ``(time, band, h + 2r, w + 2r)`` S1 values matched to the S2 dates (NaN = no S1 date close).
        s2_days, s1_days: ``(time,)`` day numbers of the S2 dates and of the matched S1 dates.
        batch_size: patches per forward pass (fixed: see the module docstring).
        device: where the model runs.

    Returns:
        ``(time, embed_dim, h, w)`` float32, NaN where the S2 centre pixel is not observed.
    """
    n_frames, p = model.s2.cfg.n_frames, model.s2.cfg.input_px
    r = p // 2
    # the patch encoder needs NaN-free windows filled as in training; the dense one fills per pixel itself
    fill = fill_patch if model.s2.cfg.variant == "patch" else (lambda a: (a, None))
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
        x2, _ = fill(np.ascontiguousarray(view2[f, :, yb[:, None], xb[:, None]]))  # (B, n_frames, C2, p, p)
        x1, _ = fill(np.ascontiguousarray(view1[f, :, yb[:, None], xb[:, None]]))  # (B, n_frames, C1, p, p)
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bfloat16 autocast on CUDA, none (float32) on CPU; else the named dtype (None = float32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


@torch.no_grad()
def embed_block_dense(
    model: FusionModel,
    s2: np.ndarray,
    s1: np.ndarray,
    s2_days: np.ndarray,
    s1_days: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "float32",
) -> np.ndarray:
    """:func:`embed_block` for the ``dense`` encoder: each frame encoded once, windows batched.

    Frame tokens ``(d_model, h, w)`` are computed per date and sensor when a window first needs them
    and dropped once no later window does (at most ``n_frames`` dates held per sensor). Windows of
    one target date share their frame dates, so they are gathered pixel by pixel and run through the
    temporal transformer, latent head and fusion in batches of up to ``batch_size`` (not padded: the
    frame pass already differs in float rounding between tilings, see the module docstring).

    ``precision``: ``float32`` (exact), or ``bfloat16`` / ``float16`` autocast (CUDA), or ``auto``.
    """
    for ae in (model.s1, model.s2):
        if ae.cfg.variant != "dense":
            raise ValueError(f"embed_block_dense needs dense autoencoders; the {ae.cfg.sensor} one is 'patch'")
    n_frames, r = model.s2.cfg.n_frames, model.s2.cfg.context_px
    n_time, _, hp, wp = s2.shape
    h, w = hp - 2 * r, wp - 2 * r
    out = np.full((n_time, model.cfg.embed_dim, h, w), np.nan, dtype=np.float32)
    ok = centre_valid(s2, r)  # (time, h, w)
    amp = autocast_dtype(precision, device)
    c = n_frames // 2
    caches: dict[str, dict[int, torch.Tensor]] = {"s1": {}, "s2": {}}

    def tokens(sensor: str, values: np.ndarray, date: int) -> torch.Tensor:
        cache = caches[sensor]
        if date not in cache:
            frame = torch.from_numpy(np.ascontiguousarray(values[date : date + 1])).to(device)  # (1, C, hp, wp)
            ae = model.s1 if sensor == "s1" else model.s2
            tokens = ae.frame_tokens(frame)[0].reshape(ae.cfg.d_model, h * w)  # (d_model, h*w)
            cache[date] = tokens.T.contiguous()  # (h*w, d_model): a window gathers whole rows
        return cache[date]

    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for t in range(n_time):
            pix = np.flatnonzero(ok[t])  # flat y*w + x of the windows to embed
            if pix.size == 0:
                continue
            frames, days2 = window_days(s2_days, t, n_frames)
            days1 = s1_days[frames] + (days2 - s2_days[frames])
            for cache in caches.values():  # later windows never reach back before this one's first frame
                for d in [d for d in cache if d < frames.min()]:
                    del cache[d]
            tok2 = [tokens("s2", s2, int(f)) for f in frames]  # n_frames x (h*w, d_model)
            tok1 = [tokens("s1", s1, int(f)) for f in frames]
            g2 = torch.from_numpy(np.diff(days2).astype(np.float32)).to(device)[None]  # (1, n_frames - 1)
            g1 = torch.from_numpy(np.diff(days1).astype(np.float32)).to(device)[None]
            for i in range(0, pix.size, batch_size):
                idx = torch.from_numpy(pix[i : i + batch_size]).to(device)  # (B,)
                B = idx.numel()
                x2 = torch.stack([tk.index_select(0, idx) for tk in tok2], dim=1)  # (B, n_frames, d_model)
                x1 = torch.stack([tk.index_select(0, idx) for tk in tok1], dim=1)
                z2 = model.s2.encoder.latent_from_tokens(x2, g2.expand(B, -1))  # (B, latent_s2)
                z1 = model.s1.encoder.latent_from_tokens(x1, g1.expand(B, -1))  # (B, latent_s1)
                dt = torch.full((B,), float(abs(days1[c] - days2[c])), device=device)
                e = model.fuse(z1, z2, dt).float().cpu().numpy()  # (B, embed_dim)
                ys, xs = np.divmod(pix[i : i + batch_size], w)
                out[t, :, ys, xs] = e
    return out


def embed_any(model: FusionModel, *arrays: np.ndarray, batch_size: int, device: torch.device, precision: str) -> np.ndarray:
    """:func:`embed_block_dense` for a dense model, else :func:`embed_block` (float32 only)."""
    if model.s2.cfg.variant == "dense":
        return embed_block_dense(model, *arrays, batch_size=batch_size, device=device, precision=precision)
    if precision in ("bfloat16", "float16"):
        raise ValueError(f"precision {precision!r} needs a dense bundle; the per-patch path runs in float32")
    return embed_block(model, *arrays, batch_size=batch_size, device=device)
