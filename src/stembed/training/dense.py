"""Dense training: the dense encoder trained the way it infers, many centre pixel-dates per encoder pass.

A tile batch (:class:`stembed.data.tiles.Tiles`) goes through the frame CNN once, giving every
centre pixel's token on every date of the tile. Every (frame draw, pixel) pair whose centre value is
observed is a training window; ``latents`` of them are drawn uniformly per step (the per-patch
sampler's population, at stride 1), their tokens gathered, and each is encoded to a latent and
decoded like a per-patch sample.

Decoding is the cost that does not shrink: each latent's 15 x 15 x 11 patch is its own. So each
latent renders its centre frame (which carries 82 % of the context weight) and ``render_frames - 1``
other frames drawn uniformly from the remaining ten; those are weighted by the inverse of their
inclusion probability (:func:`stembed.losses.sampled_reconstruction_loss`), so the expected loss is
the paper's per-patch loss. With ``render_frames = n_frames`` it *is* the per-patch loss on the same
windows (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stembed.config import LossConfig
from stembed.data.tiles import Tiles
from stembed.losses import context_weight_factors, sampled_reconstruction_loss
from stembed.models.autoencoder import SensorAutoencoder


@dataclass(frozen=True)
class Windows:
    """The training windows drawn from a tile batch: tile ``b``, frame draw ``k``, flat centre pixel ``p``
    (in the crop), the ``(N, T)`` tile-date index of each frame and the ``(N, T-1)`` day gaps."""

    b: Tensor
    k: Tensor
    p: Tensor
    frames: Tensor
    gaps: Tensor


def draw_windows(batch: Tiles, margin: int, n_latents: int, gen: torch.Generator) -> Windows:
    """Draw up to ``n_latents`` windows uniformly among those whose anchor centre value is observed (S2 in
    fusion, the stage's own sensor in stage 1)."""
    win, subsets = batch.anchor.window, batch.subsets  # (Bt, D, C, Hp, Wp), (Bt, K, T)
    Bt, D, _, Hp, Wp = win.shape
    h, w = Hp - 2 * margin, Wp - 2 * margin
    T = subsets.shape[-1]
    centre = win[:, :, :, margin : margin + h, margin : margin + w]  # (Bt, D, C, h, w)
    ok = torch.isfinite(centre).any(dim=2).reshape(Bt, D, h * w)  # (Bt, D, h*w)
    ok = ok & batch.inside[:, margin : margin + h, margin : margin + w].reshape(Bt, 1, h * w)
    centre_frame = subsets[:, :, T // 2]  # (Bt, K)
    ok_k = torch.gather(ok, 1, centre_frame[..., None].expand(-1, -1, h * w))  # (Bt, K, h*w)
    cand = ok_k.nonzero()  # (M, 3): b, k, p
    if cand.shape[0] > n_latents:
        cand = cand[torch.randperm(cand.shape[0], generator=gen)[:n_latents].to(cand.device)]
    b, k, p = cand.unbind(1)
    frames = subsets[b, k]  # (N, T)
    days = torch.gather(batch.anchor.days[b], 1, frames)  # (N, T)
    return Windows(b, k, p, frames, torch.diff(days, dim=1))


def window_tokens(ae: SensorAutoencoder, window: Tensor) -> Tensor:
    """(Bt, D, C, Hp, Wp) raw tile -> (Bt, D, d_model, h*w) frame tokens of every centre pixel."""
    Bt, D, C, Hp, Wp = window.shape
    frames = window.reshape(Bt * D, C, Hp, Wp).contiguous(memory_format=torch.channels_last)
    tok = ae.frame_tokens(frames)  # (Bt*D, d_model, h, w)
    return tok.reshape(Bt, D, tok.shape[1], -1)


def gather_tokens(tok: Tensor, win: Windows) -> Tensor:
    """(Bt, D, d_model, h*w) tokens -> (N, T, d_model) tokens of each window's frames at its pixel."""
    return tok[win.b[:, None], win.frames, :, win.p[:, None]]


@dataclass(frozen=True)
class RenderPlan:
    """Which (window, frame) pairs a step decodes: window index ``latent`` (M,), frame position ``frame`` (M,)
    in the window (0 ... T-1), and ``scale`` (M,), the inverse of the pair's inclusion probability. The first
    N pairs are the N windows' centre frames, in window order."""

    latent: Tensor
    frame: Tensor
    scale: Tensor


def draw_render_frames(n: int, n_frames: int, render: float, gen: torch.Generator, device: torch.device) -> RenderPlan:
    """Every window's centre frame, plus on average ``render - 1`` of its other frames (at least a fraction).

    Each window draws ``floor(render - 1)`` others uniformly without replacement, and one more with
    probability ``frac(render - 1)``: every non-centre frame is then included with probability
    ``q = (render - 1) / (T - 1)`` and weighted ``1 / q`` (Horvitz-Thompson), so the expected loss is
    the all-frames loss. ``render >= n_frames`` renders every frame with weight 1.
    """
    c = n_frames // 2
    q = min(float(render) - 1.0, n_frames - 1.0)
    if q <= 0:
        raise ValueError(f"render_frames must be above 1 (the centre frame alone is not the paper's loss), got {render}")
    whole, frac = int(q), q - int(q)
    k = whole + (frac > 0)
    ids = torch.arange(n)
    others = torch.rand(n, n_frames - 1, generator=gen).argsort(dim=1)[:, :k]  # (N, k) among the T-1 others
    others = others + (others >= c).long()  # skip the centre index
    keep = torch.ones(n, k, dtype=torch.bool)
    if frac > 0:
        keep[:, -1] = torch.rand(n, generator=gen) < frac
    n_other = int(keep.sum())
    latent = torch.cat([ids, ids[:, None].expand(n, k)[keep]])
    frame = torch.cat([torch.full((n,), c, dtype=torch.long), others[keep]])
    scale = torch.cat([torch.ones(n), torch.full((n_other,), (n_frames - 1) / q)])
    return RenderPlan(latent.to(device), frame.to(device), scale.to(device))


def render(ae: SensorAutoencoder, z: Tensor, gaps: Tensor, plan: RenderPlan) -> Tensor:
    """Decode latents (N, latent) but render only the pairs of ``plan``: (M, 1, C, P, P) in cube units."""
    tokens = ae.decoder.tokens(z, gaps)  # (N, T, d_model)
    x_hat = ae.decoder.render(tokens[plan.latent, plan.frame])  # (M, C, P, P)
    return (x_hat * ae.input_std[0] + ae.input_mean[0])[:, None]


@dataclass(frozen=True)
class Targets:
    """Per-patch targets of the rendered pairs: ``x`` (M, 1, C, P, P) filled with the patch's band means where
    not observed (for SSIM, as :func:`stembed.data.datasets.fill_patch` fills), ``valid`` (same shape), and
    ``sam_total``: the SAM normaliser over all T frames of every window (None without SAM)."""

    x: Tensor
    valid: Tensor
    sam_total: Tensor | None


def _box_sums(t: Tensor, size: int) -> Tensor:
    """(..., S, S) -> (..., S - size + 1, S - size + 1): the sum over each size x size square, from an integral
    image (float64), so its cost does not grow with the square's area as a 15 x 15 pooling kernel's does."""
    ii = torch.nn.functional.pad(t.double().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    out = ii[..., size:, size:] - ii[..., :-size, size:] - ii[..., size:, :-size] + ii[..., :-size, :-size]
    return out.to(t.dtype)


@dataclass(frozen=True)
class _PatchArea:
    """The part of a tile batch that the 15 x 15 patches of all centre pixels cover: ``part`` (Bt, D, C, S, S),
    ``ok`` (same: observed and inside the split region), centre-crop side ``h``, patch radius ``r``."""

    part: Tensor
    ok: Tensor
    h: int
    r: int


def _patch_area(window: Tensor, inside: Tensor, margin: int, patch_px: int) -> _PatchArea:
    h, r = window.shape[-1] - 2 * margin, patch_px // 2
    lo, S = margin - r, h + 2 * r  # the patches of all centres cover [lo, lo + S) of the window
    part = window[..., lo : lo + S, lo : lo + S]
    ok = torch.isfinite(part) & inside[:, lo : lo + S, lo : lo + S][:, None, None]
    return _PatchArea(part, ok, h, r)


@dataclass(frozen=True)
class PatchStats:
    """What :func:`gather_targets` reads from a tile batch beyond the rendered frames: the covered area and the
    box sums of every centre pixel's patch on every date ``(Bt, D, 2C, h, w)`` (values, then counts). A
    context fusion trains on the same crops every step, so it computes them once (:func:`patch_stats`)."""

    area: _PatchArea
    per_date: Tensor


def patch_stats(window: Tensor, inside: Tensor, margin: int, patch_px: int) -> PatchStats:
    """:class:`PatchStats` of a tile batch ``window`` (Bt, D, C, Hp, Wp) and its ``inside`` mask."""
    area = _patch_area(window, inside, margin, patch_px)
    part, ok = area.part, area.ok
    per_date = _box_sums(torch.cat([torch.where(ok, part, torch.zeros_like(part)), ok.to(part.dtype)], dim=2),
                         patch_px)  # (Bt, D, 2C, h, w)
    return PatchStats(area, per_date)


def gather_targets(
    window: Tensor, inside: Tensor, win: Windows, plan: RenderPlan, margin: int, patch_px: int, loss: LossConfig,
    stats: PatchStats | None = None,
) -> Targets:
    """The reconstruction targets of each rendered pair: its window's 15 x 15 patch on that frame.

    A pixel outside the tile's split region (a reflected one) is never a target (``valid`` False). The
    statistics that need every frame of a patch (its band means, the SAM normaliser) come from box sums
    over the tile (``stats``, computed here when not given), so only the rendered frames are gathered.
    """
    C = window.shape[2]
    stats = stats if stats is not None else patch_stats(window, inside, margin, patch_px)
    area = stats.area
    part, ok, h = area.part, area.ok, area.h
    b, p = win.b[plan.latent], win.p[plan.latent]  # (M,) each pair's tile and centre pixel
    py, px = p // h, p % h
    frames = win.frames[plan.latent]  # (M, T) tile-date indices of each pair's window
    frame = frames.gather(1, plan.frame[:, None])  # (M, 1) the rendered one
    views = part.unfold(3, patch_px, 1).unfold(4, patch_px, 1)  # (Bt, D, C, h, w, P, P), no copy
    ok_views = ok.unfold(3, patch_px, 1).unfold(4, patch_px, 1)
    x = views[b[:, None], frame, :, py[:, None], px[:, None]]  # (M, 1, C, P, P)
    valid = ok_views[b[:, None], frame, :, py[:, None], px[:, None]]

    at = stats.per_date[b[:, None], frames, :, py[:, None], px[:, None]].sum(dim=1)  # (M, 2C) over the T frames
    sums, counts = at[:, :C], at[:, C:]
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))  # (M, C)
    x = torch.where(valid, x, means[:, None, :, None, None])
    return Targets(x, valid, _sam_total(area, win, patch_px, loss) if loss.sam else None)


def _sam_total(area: _PatchArea, win: Windows, patch_px: int, loss: LossConfig) -> Tensor:
    """The SAM term's normaliser (:func:`stembed.losses.sam_normaliser`) over all T frames of every window."""
    Bt, D, _, S, _ = area.ok.shape
    h, r = area.h, area.r
    py, px = win.p // h, win.p % h
    dtype = area.part.dtype
    w_t, w_s = (w.to(dtype) for w in context_weight_factors(win.frames.shape[1], patch_px, loss.decay,
                                                                           loss.time_decay))
    all_ok = area.ok.all(dim=2).to(dtype)  # (Bt, D, S, S)
    spatial = nn.functional.conv2d(all_ok.reshape(Bt * D, 1, S, S), w_s[None, None]).reshape(Bt, D, h, h)
    per_window = spatial[win.b[:, None], win.frames, py[:, None], px[:, None]] @ w_t  # (N,)
    centre = all_ok[win.b, win.frames[:, win.frames.shape[1] // 2], py + r, px + r]  # (N,) its raw weight was 1
    return (per_window + (loss.centre_weight - 1.0) * centre).sum()


@dataclass(frozen=True)
class Reconstruction:
    """The rendered pairs of N windows (the first N: their centre frames), their targets and loss terms."""

    plan: RenderPlan
    x_hat: Tensor
    targets: Targets
    parts: dict[str, Tensor]


def reconstruct_windows(
    ae: SensorAutoencoder, z: Tensor, gaps: Tensor, window: Tensor, inside: Tensor, win: Windows,
    loss: LossConfig, render_frames: float, gen: torch.Generator, stats: PatchStats | None = None,
) -> Reconstruction:
    """Decode the latents ``z`` (N, L) of windows ``win`` on a drawn subset of frames and score them against the
    tile ``window`` of ``ae``'s sensor (stage 1, and each branch of fusion); ``stats``: the tile's precomputed
    :class:`PatchStats`, if any."""
    cfg, T, n = ae.cfg, ae.cfg.n_frames, z.shape[0]
    plan = draw_render_frames(n, T, render_frames, gen, z.device)
    x_hat = render(ae, z, gaps, plan)  # (M, 1, C, P, P), the N centre frames first
    tg = gather_targets(window, inside, win, plan, cfg.context_px, cfg.patch_px, loss, stats)
    parts = sampled_reconstruction_loss(
        x_hat, tg.x, tg.valid, loss, frames=plan.frame[:, None], scale=plan.scale[:, None], sam_total=tg.sam_total,
        n_frames=T, n_patches=n,
    )
    return Reconstruction(plan, x_hat, tg, parts)


@dataclass(frozen=True)
class DenseStep:
    """One stage-1 dense step's windows and their reconstruction."""

    windows: Windows
    recon: Reconstruction


def autoencoder_step(
    ae: SensorAutoencoder, batch: Tiles, loss: LossConfig, latents: int, render_frames: float,
    gen: torch.Generator,
) -> DenseStep | None:
    """Draw windows from a tile batch, encode, render and score them; None when no centre value is observed."""
    win = draw_windows(batch, ae.cfg.context_px, latents, gen)
    if win.b.numel() == 0:
        return None
    window = batch.anchor.window
    z = ae.encoder.latent_from_tokens(gather_tokens(window_tokens(ae, window), win), win.gaps)
    return DenseStep(win, reconstruct_windows(ae, z, win.gaps, window, batch.inside, win, loss, render_frames, gen))
