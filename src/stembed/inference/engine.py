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

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from stembed.data.datasets import SensorArrays, fill_patch
from stembed.data.windows import (
    asof_depth,
    asof_window_days,
    frame_days,
    min_dates,
    window_dates,
    window_days,
)
from stembed.errors import UserError
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.context import ContextFusionModel
from stembed.models.fusion import ANCHOR, FusionBase, FusionModel, SensorInput


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto``/None: CUDA when present, else CPU."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"device {str(name)!r} is not a torch device ({e}); fix: use auto, cpu, cuda") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(name)!r} is asked for but torch sees no CUDA GPU; fix: use auto or cpu")
    return device


def centre_valid(s2_block: np.ndarray, halo: int) -> np.ndarray:
    """``(time, y, x)``: the S2 centre pixel has at least one observed band (the training filter)."""
    core = s2_block[:, :, halo : s2_block.shape[2] - halo, halo : s2_block.shape[3] - halo]
    return np.isfinite(core).any(axis=1)


Block = Mapping[str, SensorArrays]
"""A block of every sensor by name: ``values`` ``(time, band, h + 2r, w + 2r)`` on the S2 dates (NaN where no date of
the sensor was close enough) and ``days`` ``(time,)``: the S2 day numbers for ``s2``, each other sensor's matched days."""


@torch.no_grad()
def embed_block(
    model: FusionModel,
    block: Block,
    *,
    batch_size: int,
    device: torch.device,
    targets: np.ndarray | None = None,
    hide_s2_centre: bool = False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed every pixel-date of a block.

    Args:
        model: the fusion model (eval mode, on ``device``).
        block: every sensor of the model (:data:`Block`), with a halo of ``r = context_px``.
        batch_size: patches per forward pass (fixed: see the module docstring).
        device: where the model runs.
        targets: ``(time, h, w)`` which pixel-dates to embed; default: those whose S2 centre pixel is observed.
        hide_s2_centre: hide each window's S2 centre frame (the gap-fill model's input, see models.gapfill).
        progress: called after each batch with the number of pixel-dates (windows) it embedded.

    Returns:
        ``(time, embed_dim, h, w)`` float32, NaN where not a target.
    """
    block = _check_block(model, block)
    n_frames, p = model.anchor.cfg.n_frames, model.anchor.cfg.input_px
    r = p // 2
    # the patch encoder needs NaN-free windows filled as in training; the dense one fills per pixel itself
    fill = fill_patch if model.anchor.cfg.variant == "patch" else (lambda a: (a, None))
    s2 = block[ANCHOR].values
    n_time, _, hp, wp = s2.shape
    out = np.full((n_time, model.cfg.embed_dim, hp - 2 * r, wp - 2 * r), np.nan, dtype=np.float32)
    ts, ys, xs = np.nonzero(centre_valid(s2, r) if targets is None else targets)
    if ts.size == 0:
        return out
    frames, days = _frame_days(block, n_frames)
    views = {k: np.lib.stride_tricks.sliding_window_view(a.values, (p, p), axis=(2, 3))  # (T, C, h, w, p, p)
             for k, a in block.items()}
    for i in range(0, ts.size, batch_size):
        tb, yb, xb = ts[i : i + batch_size], ys[i : i + batch_size], xs[i : i + batch_size]
        n = tb.size
        take = np.concatenate([np.arange(n), np.zeros(batch_size - n, dtype=np.int64)])  # pad with copies
        tb, yb, xb = tb[take], yb[take], xb[take]
        inputs = _patch_inputs(views, frames[tb], {k: d[tb] for k, d in days.items()}, yb, xb, fill=fill,
                               hide_s2_centre=hide_s2_centre, device=device)
        e = model.embed(inputs)  # (B, embed_dim)
        out[tb[:n], :, yb[:n], xb[:n]] = e[:n].float().cpu().numpy()
        if progress is not None:
            progress(n)
    return out


def _frame_days(block: Block, n_frames: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each date's window: ``(time, n_frames)`` date index of each frame, and by sensor each frame's day number
    (S2's own; another sensor's matched date's)."""
    s2_days = block[ANCHOR].days
    windows = [window_days(s2_days, t, n_frames) for t in range(block[ANCHOR].values.shape[0])]
    frames = np.stack([f for f, _ in windows])  # (time, n_frames) date index of each frame
    days2 = np.stack([d for _, d in windows])  # (time, n_frames) day number of each S2 frame
    return frames, {k: days2 if k == ANCHOR else frame_days(days2, s2_days, frames, a.days) for k, a in block.items()}


def _patch_inputs(
    views: dict[str, np.ndarray], f: np.ndarray, days: dict[str, np.ndarray], yb: np.ndarray, xb: np.ndarray, *,
    fill: Callable[[np.ndarray], tuple[np.ndarray, Any]], hide_s2_centre: bool, device: torch.device,
) -> dict[str, SensorInput]:
    """A batch's model inputs by sensor: the patches of frames ``f`` ``(B, n_frames)`` at ``yb, xb`` (filled),
    the days between frames, and a companion's distance in days from the S2 centre date."""
    c = f.shape[1] // 2
    # C order first: numpy picks the layout of a fancy-indexed result, and the fill's sums must not depend on it
    x = {k: np.ascontiguousarray(v[f, :, yb[:, None], xb[:, None]]) for k, v in views.items()}  # (B, n_frames, C, p, p)
    if hide_s2_centre:
        x[ANCHOR][:, c] = np.nan
    x = {k: fill(v)[0] for k, v in x.items()}
    d2 = days[ANCHOR]

    def to(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return {
        k: SensorInput(
            to(x[k]),
            to(np.diff(dk, axis=1).astype(np.float32)),
            None if k == ANCHOR else to(np.abs(dk[:, c] - d2[:, c]).astype(np.float32)),
        )
        for k, dk in days.items()
    }


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bfloat16 autocast on CUDA, none (float32) on CPU; else the named dtype (None = float32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


@torch.no_grad()
def embed_block_dense(
    model: FusionModel,
    block: Block,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "float32",
    targets: np.ndarray | None = None,
    hide_s2_centre: bool = False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """:func:`embed_block` for the ``dense`` encoder: each frame encoded once, windows batched.

    Frame tokens ``(d_model, h, w)`` are computed per date and sensor when a window first needs them
    and dropped once no later window does (at most ``n_frames`` dates held per sensor). Windows of
    one target date share their frame dates, so they are gathered pixel by pixel and run through the
    temporal transformer, latent head and fusion in batches of up to ``batch_size`` (not padded: the
    frame pass already differs in float rounding between tilings, see the module docstring).
    With ``hide_s2_centre`` the S2 centre frame of every window is an all-NaN frame, encoded once.

    ``precision``: ``float32`` (exact), or ``bfloat16`` / ``float16`` autocast (CUDA), or ``auto``.
    """
    block = _check_block(model, block)
    for key, ae in model.sensor_autoencoders().items():
        if ae.cfg.variant != "dense":
            raise ValueError(f"embed_block_dense needs dense autoencoders; the {key} one is 'patch'")
    n_frames, r = model.anchor.cfg.n_frames, model.anchor.cfg.context_px
    s2, s2_days = block[ANCHOR].values, block[ANCHOR].days
    n_time, _, hp, wp = s2.shape
    h, w = hp - 2 * r, wp - 2 * r
    out = np.full((n_time, model.cfg.embed_dim, h, w), np.nan, dtype=np.float32)
    ok = centre_valid(s2, r) if targets is None else targets  # (time, h, w)
    amp = autocast_dtype(precision, device)
    c = n_frames // 2
    values = {k: (a.values, a.days) for k, a in block.items()}
    aes = model.sensor_autoencoders()
    frame_tokens = _FrameTokens(aes, {k: v for k, (v, _) in values.items()}, device, h, w)

    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        hidden = frame_tokens.encode(ANCHOR, np.full_like(s2[:1], np.nan)) if hide_s2_centre else None
        for t in range(n_time):
            pix = np.flatnonzero(ok[t])  # flat y*w + x of the windows to embed
            if pix.size == 0:
                continue
            frames, days2 = window_days(s2_days, t, n_frames)
            # later windows never reach back before this one's first frame
            frame_tokens.drop_before(int(frames.min()))
            tok = {k: [frame_tokens.get(k, int(f)) for f in frames] for k in values}  # n_frames x (h*w, d_model) each
            if hidden is not None:
                tok[ANCHOR][c] = hidden
            days = {k: days2 if k == ANCHOR else frame_days(days2, s2_days, frames, d) for k, (_, d) in values.items()}
            gaps = {k: torch.from_numpy(np.diff(d).astype(np.float32)).to(device)[None] for k, d in days.items()}
            dt = {k: float(abs(d[c] - days2[c])) for k, d in days.items()}  # days to the S2 date, centre frame
            _fuse_date_windows(model, tok, gaps, dt, pix, out, t, w, batch_size, device, progress)
    return out


class _FrameTokens:
    """Per sensor, the frame tokens of each date a window needs, encoded once and kept until no later
    window reads them (the dense path's saving over encoding every window)."""

    def __init__(
        self,
        aes: Mapping[str, SensorAutoencoder],
        values: Mapping[str, np.ndarray],
        device: torch.device,
        h: int,
        w: int,
    ) -> None:
        """``values``: each sensor's ``(time, C, hp, wp)`` block; ``h`` x ``w`` the block without its halo."""
        self.aes, self.values, self.device, self.h, self.w = aes, values, device, h, w
        self.caches: dict[str, dict[int, torch.Tensor]] = {k: {} for k in values}

    def encode(self, sensor: str, frame: np.ndarray) -> torch.Tensor:
        """``(h*w, d_model)`` tokens of a ``(1, C, hp, wp)`` frame: rows per pixel."""
        ae = self.aes[sensor]
        x = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device)  # (1, C, hp, wp)
        return ae.frame_tokens(x)[0].reshape(ae.cfg.d_model, self.h * self.w).T.contiguous()

    def get(self, sensor: str, date: int) -> torch.Tensor:
        """The tokens of a sensor's date, encoded on first use."""
        cache = self.caches[sensor]
        if date not in cache:
            cache[date] = self.encode(sensor, self.values[sensor][date : date + 1])
        return cache[date]

    def drop_before(self, first: int) -> None:
        """Forget every date before ``first`` (no later window reads it)."""
        for cache in self.caches.values():
            for d in [d for d in cache if d < first]:
                del cache[d]


def _fuse_date_windows(
    model: FusionModel,
    tok: Mapping[str, list[torch.Tensor]],
    gaps: Mapping[str, torch.Tensor],
    dt: Mapping[str, float],
    pix: np.ndarray,
    out: np.ndarray,
    t: int,
    w: int,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int], None] | None,
) -> None:
    """Windows ``pix`` (flat ``y*w + x``) of date ``t``, batched through temporal transformer, latent head and
    fusion into ``out`` (one date's batches, split off :func:`embed_block_dense`)."""
    aes = model.sensor_autoencoders()
    for i in range(0, pix.size, batch_size):
        idx = torch.from_numpy(pix[i : i + batch_size]).to(device)  # (B,)
        B = idx.numel()
        z = {
            k: aes[k].encoder.latent_from_tokens(
                torch.stack([tk.index_select(0, idx) for tk in tok[k]], dim=1),  # (B, n_frames, d_model)
                gaps[k].expand(B, -1),
            )  # (B, latent_k)
            for k in tok
        }
        dtb = {k: torch.full((B,), v, device=device) for k, v in dt.items() if k != ANCHOR}  # (B,) each
        e = model.fuse(z, dtb)
        ys, xs = np.divmod(pix[i : i + batch_size], w)
        out[t, :, ys, xs] = e.float().cpu().numpy()  # (B, embed_dim)
        if progress is not None:
            progress(B)


@torch.no_grad()
def block_latents(
    model: FusionBase,
    block: Block,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "float32",
    hide: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every sensor's frozen stage-1 latent of every pixel-date of a block's core (dense encoders).

    Each date's frame is encoded once (:class:`_FrameTokens`) and every pixel's window of that date (11
    consecutive dates, reflected at the series' ends, as stage 1 was trained) runs the temporal transformer and
    latent head; a context fusion then reads these latents for every window that holds the date.

    ``hide``: ``(time,)`` bool, S2 dates whose frames are hidden (all NaN) from every window, as if clouded.

    Returns ``(time, latent_k, h, w)`` float32 per sensor (also for dates whose centre is not observed: the
    caller decides which it reads).
    """
    _check_dense(model)
    n_frames, r = model.anchor.cfg.n_frames, model.anchor.cfg.context_px
    s2, s2_days = block[ANCHOR].values, block[ANCHOR].days
    if hide is not None and hide.any():
        s2 = s2.copy()
        s2[hide] = np.nan
    n_time, _, hp, wp = s2.shape
    h, w = hp - 2 * r, wp - 2 * r
    values = {k: (s2 if k == ANCHOR else a.values, a.days) for k, a in block.items()}
    aes = model.sensor_autoencoders()
    out = {k: np.empty((n_time, ae.cfg.latent_dim, h, w), dtype=np.float32) for k, ae in aes.items()}
    frame_tokens = _FrameTokens(aes, {k: v for k, (v, _) in values.items()}, device, h, w)
    amp = autocast_dtype(precision, device)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for t in range(n_time):
            frames, days2 = window_days(s2_days, t, n_frames)
            frame_tokens.drop_before(int(frames.min()))
            for k, (_, d) in values.items():
                out[k][t] = _window_latent(aes[k], frame_tokens, k, frames, days2, s2_days, d, batch_size, device)
    return out


def _window_latent(
    ae: SensorAutoencoder, frame_tokens: _FrameTokens, sensor: str, frames: np.ndarray, days2: np.ndarray,
    s2_days: np.ndarray, days: np.ndarray, batch_size: int, device: torch.device,
) -> np.ndarray:
    """``(L, h, w)``: one sensor's stage-1 latent of every pixel for one window (S2 date indices ``frames``, S2 days
    ``days2``, reflected as :func:`window_days` gives them; ``days``: the sensor's day of each S2 date)."""
    fdays = days2 if sensor == ANCHOR else frame_days(days2, s2_days, frames, days)
    gaps = torch.from_numpy(np.diff(fdays).astype(np.float32)).to(device)[None]  # (1, T-1)
    tok = torch.stack([frame_tokens.get(sensor, int(f)) for f in frames], dim=1)  # (h*w, T, d_model)
    n = tok.shape[0]
    zs = [ae.encoder.latent_from_tokens(tok[i : i + batch_size], gaps.expand(min(batch_size, n - i), -1))
          for i in range(0, n, batch_size)]
    return torch.cat(zs).float().T.reshape(-1, frame_tokens.h, frame_tokens.w).cpu().numpy()  # (L, h, w)


@torch.no_grad()
def asof_latents(
    model: FusionBase, block: Block, *, batch_size: int, device: torch.device, precision: str = "float32"
) -> dict[str, np.ndarray]:
    """Every sensor's stage-1 latents *as they stood* on each date: nothing after the date is read.

    A date's stage-1 latent reads the ``n_frames // 2`` dates after it (:func:`block_latents`), so a trailing
    embedding of date t (one that never changes when later dates arrive) cannot use it for the last of those
    dates before t. Here date ``t - j`` (j = 0 .. n_frames // 2) is encoded with its window reflected at t, as if
    the series ended on t; from j = n_frames // 2 on, the window ends on t or before and the latent equals the
    centred one. Frames are encoded once, as in :func:`block_latents`.

    Returns ``(time, n_frames // 2 + 1, latent_k, h, w)`` float32 per sensor, index ``[t, j]`` the latent of date
    ``t - j`` as of ``t``; NaN for the dates t whose series up to t holds fewer dates than the window needs to
    reflect (:func:`~stembed.data.windows.min_dates`: a trailing store starts on its ``n_frames // 2 + 1``-th
    date).
    """
    n_time = block[ANCHOR].values.shape[0]
    out: dict[str, np.ndarray] = {}
    for t, recent in iter_asof(model, block, batch_size=batch_size, device=device, precision=precision):
        for k, v in recent.items():
            if k not in out:
                out[k] = np.full((n_time, *v.shape), np.nan, dtype=np.float32)
            out[k][t] = v
    return out


def iter_asof(
    model: FusionBase, block: Block, *, batch_size: int, device: torch.device, precision: str = "float32",
    full: np.ndarray | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """:func:`asof_latents` one date at a time: ``(t, {sensor: (n_frames // 2 + 1, latent_k, h, w)})`` for every t
    from the first with enough dates (at most 2 * (n_frames // 2) + 1 frames' tokens held at once).

    ``full``: ``(time,)`` bool, the dates t that need every j; elsewhere only ``j = n_frames // 2`` (the centred
    latent of date ``t - n_frames // 2``) is computed and the others are NaN.
    """
    _check_dense(model)
    n_frames, r = model.anchor.cfg.n_frames, model.anchor.cfg.context_px
    depth = asof_depth(n_frames)
    s2_days = block[ANCHOR].days
    _, _, hp, wp = block[ANCHOR].values.shape
    aes = model.sensor_autoencoders()
    frame_tokens = _FrameTokens(aes, {k: a.values for k, a in block.items()}, device, hp - 2 * r, wp - 2 * r)
    amp = autocast_dtype(precision, device)
    for t in range(min_dates(n_frames) - 1, block[ANCHOR].values.shape[0]):
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            js = range(depth + 1) if full is None or full[t] else range(depth, depth + 1)
            windows = {j: asof_window_days(s2_days, t, j, n_frames) for j in js}
            frame_tokens.drop_before(min(int(f.min()) for f, _ in windows.values()))
            out = {k: np.full((depth + 1, ae.cfg.latent_dim, frame_tokens.h, frame_tokens.w), np.nan, dtype=np.float32)
                   for k, ae in aes.items()}
            for j, (frames, days2) in windows.items():
                for k, a in block.items():
                    out[k][j] = _window_latent(aes[k], frame_tokens, k, frames, days2, s2_days, a.days, batch_size,
                                               device)
            yield t, out


def sensor_present(block: Block, halo: int) -> dict[str, np.ndarray]:
    """``(time, h, w)`` per sensor: its centre pixel has a finite band on that S2 date (S2: observed; others: a
    matched date close enough)."""
    return {k: centre_valid(a.values, halo) for k, a in block.items()}


@torch.no_grad()
def embed_block_context(
    model: ContextFusionModel,
    block: Block,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "float32",
    targets: np.ndarray | None = None,
    hide_s2_centre: bool = False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed every pixel-date of a block with a context fusion: each date from its own latents and those of its
    window of the pixel's other observed dates (:mod:`stembed.data.windows`).

    ``targets`` (time, h, w): which pixel-dates to embed (default: those whose S2 centre is observed).
    ``hide_s2_centre``: embed each target with its date's own S2 hidden (a cloudy date: what the model was
    trained on for a share of its samples); its S1 and companions stay, and its window is unchanged.

    Returns ``(time, embed_dim, h, w)`` float32, NaN where not a target.
    """
    block = _check_block(model, block)
    window = model.cfg.window
    if window is None:  # pragma: no cover - a ContextFusionModel always has one
        raise TypeError("embed_block_context needs a context fusion model")
    r = model.anchor.cfg.context_px
    s2_days = block[ANCHOR].days
    present = sensor_present(block, r)
    observed = present[ANCHOR]  # (time, h, w)
    n_time, h, w = observed.shape
    out = np.full((n_time, model.cfg.embed_dim, h, w), np.nan, dtype=np.float32)
    todo = observed if targets is None else targets
    if not todo.any():
        return out
    pres = {k: v.reshape(n_time, h * w) for k, v in present.items()}
    obs_by_pixel = observed.reshape(n_time, h * w).T  # (h*w, time)
    days = {k: a.days for k, a in block.items()}
    amp = autocast_dtype(precision, device)
    latents = context_latents(model, block, batch_size=max(batch_size, 256), device=device, precision=precision,
                              dates=np.asarray(todo.reshape(n_time, -1).any(axis=1)))
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for t, flat, recent in latents:
            pix = np.flatnonzero(todo[t].reshape(-1))
            for i in range(0, pix.size, batch_size):
                p = pix[i : i + batch_size]
                dates = window_dates(window, s2_days, obs_by_pixel[p], np.full(p.size, t))  # (B, K)
                slots = np.concatenate([np.full((p.size, 1), t), dates], axis=1)  # (B, S), -1: empty
                inputs = context_inputs(flat, pres, days, slots, p, hide_date=hide_s2_centre, recent=recent)
                e = model.fuse(*(_to(x, device) for x in inputs))
                ys, xs = np.divmod(p, w)
                out[t, :, ys, xs] = e.float().cpu().numpy()  # (B, embed_dim)
                if progress is not None:
                    progress(p.size)
    return out


def context_latents(
    model: ContextFusionModel, block: Block, *, batch_size: int, device: torch.device, precision: str,
    dates: np.ndarray,
) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray] | None]]:
    """The latents a context fusion reads, date by date: ``(t, z, recent)`` with ``z`` per sensor ``(time, L, h*w)``.

    Centred window: ``z`` holds every date's centred stage-1 latent and ``recent`` is None. Trailing window: the
    series as it stood on t (:func:`iter_asof`): ``recent`` per sensor ``(n_frames // 2 + 1, L, h*w)`` the latents
    of dates ``t - j`` as of t, and ``z`` the centred latents of the dates before them (filled as t advances); the
    dates t before the first with enough history are not yielded (a trailing store starts on its
    ``n_frames // 2 + 1``-th date). ``dates``: ``(time,)`` the dates the caller embeds (others are skipped, and a
    trailing window computes only what later dates read).
    """
    window = model.cfg.window
    n_time = dates.size
    flat: dict[str, np.ndarray] = {}
    if window is None or window.side == "centred":
        z = block_latents(model, block, batch_size=batch_size, device=device, precision=precision)
        flat = {k: v.reshape(n_time, v.shape[1], -1) for k, v in z.items()}  # (time, L, h*w)
        for i in np.flatnonzero(dates).tolist():
            yield i, flat, None
        return
    depth = asof_depth(model.anchor.cfg.n_frames)
    for t, asof in iter_asof(model, block, batch_size=batch_size, device=device, precision=precision, full=dates):
        recent: dict[str, np.ndarray] = {k: v.reshape(depth + 1, v.shape[1], -1) for k, v in asof.items()}
        for k, v in recent.items():
            if k not in flat:
                flat[k] = np.full((n_time, *v.shape[1:]), np.nan, dtype=np.float32)
            flat[k][t - depth] = v[depth]  # the centred latent of date t - depth: no later window changes it
        if dates[t]:
            yield t, flat, recent


def context_inputs(
    latents: Mapping[str, np.ndarray],
    present: Mapping[str, np.ndarray],
    days: Mapping[str, np.ndarray],
    slots: np.ndarray,
    pixels: np.ndarray,
    *,
    hide_date: bool | np.ndarray = False,
    recent: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A context fusion's inputs for windows of one tile, gathered from its per-pixel-date arrays.

    Args:
        latents: per sensor ``(time, L, P)`` latents of the tile's P pixels.
        present: per sensor ``(time, P)`` bool, the sensor has a value at that pixel-date.
        days: per sensor ``(time,)`` day numbers (S2's own; another sensor's matched acquisition days).
        slots: ``(B, S)`` date indices, slot 0 the embedded date, -1 an empty slot.
        pixels: ``(B,)`` pixel index of each window.
        hide_date: hide the embedded date's own S2 (all windows, or a ``(B,)`` mask).
        recent: a trailing window's latents as of the embedded date t (every window's slot 0 is t): per sensor
            ``(J, L, P)``, the latent of date ``t - j`` (:func:`context_latents`); they replace ``latents`` there.

    Returns ``(z, present, dt, offset, day)`` as :meth:`ContextFusionModel.fuse` takes them (numpy).
    """
    empty = slots < 0
    idx = np.where(empty, 0, slots)  # (B, S)
    col = pixels[:, None]
    s2_days = days[ANCHOR]
    z, pres, dt = {}, {}, {}
    for k, lat in latents.items():
        z[k] = lat[idx, :, col]  # (B, S, L): numpy puts the broadcast fancy indices first
        if recent is not None:
            j = slots[:, :1] - idx  # (B, S) >= 0: a trailing window reads no later date
            near = (j < recent[k].shape[0]) & ~empty
            z[k][near] = recent[k][j[near], :, np.broadcast_to(col, j.shape)[near]]
        pk = present[k][idx, col] & ~empty
        if k == ANCHOR:
            pk[:, 0] &= ~np.asarray(hide_date, dtype=bool)
        else:
            dt[k] = (days[k][idx] - s2_days[idx]).astype(np.float32)
        pres[k] = pk
    day = np.where(empty, s2_days[slots[:, :1]], s2_days[idx]).astype(np.float32)  # (B, S) day numbers
    offset = (s2_days[idx] - s2_days[slots[:, :1]]).astype(np.float32)  # (B, S) days from the date
    offset[empty] = 0.0
    return z, pres, dt, offset, day


def _to(x: Any, device: torch.device) -> Any:
    """numpy arrays (alone or in a dict) -> tensors on ``device``."""
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _check_dense(model: FusionBase) -> None:
    for key, ae in model.sensor_autoencoders().items():
        if ae.cfg.variant != "dense":
            raise ValueError(f"a context fusion needs dense autoencoders; the {key} one is 'patch'")


def embed_any(
    model: FusionBase,
    block: Block,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    targets: np.ndarray | None = None,
    hide_s2_centre: bool = False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """:func:`embed_block_context` for a context fusion, :func:`embed_block_dense` for a dense model, else
    :func:`embed_block` (float32 only)."""
    kw: dict[str, Any] = {"targets": targets, "hide_s2_centre": hide_s2_centre, "progress": progress}
    if isinstance(model, ContextFusionModel):
        return embed_block_context(model, block, batch_size=batch_size, device=device, precision=precision, **kw)
    if not isinstance(model, FusionModel):  # pragma: no cover - the two kinds of fusion
        raise TypeError(f"expected a fusion model, got {type(model).__name__}")
    if model.anchor.cfg.variant == "dense":
        return embed_block_dense(model, block, batch_size=batch_size, device=device, precision=precision, **kw)
    if precision in ("bfloat16", "float16"):
        raise ValueError(f"precision {precision!r} needs a dense bundle; the per-patch path runs in float32")
    return embed_block(model, block, batch_size=batch_size, device=device, **kw)


def _check_block(model: FusionBase, block: Block) -> dict[str, SensorArrays]:
    """The block's arrays of the model's sensors (in token order); a sensor the model needs and the block lacks
    is an error."""
    missing = [k for k in model.sensors if k not in block]
    if missing:
        raise ValueError(f"the block lacks the sensor(s) {missing} this fusion model reads (it has {list(block)})")
    return {k: block[k] for k in model.sensors}
