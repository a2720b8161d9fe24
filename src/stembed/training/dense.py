"""Dense training: the dense encoder trained the way it infers, many centre pixel-dates per encoder pass.

A tile batch (:class:`stembed.data.tiles.TileDataset`) goes through the frame CNN once, giving every
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


def draw_windows(batch: dict[str, Tensor], margin: int, n_latents: int, gen: torch.Generator) -> Windows:
    """Draw up to ``n_latents`` windows uniformly among those whose S2/sensor centre value is observed."""
    win, subsets = batch["window"], batch["subsets"]  # (Bt, D, C, Hp, Wp), (Bt, K, T)
    Bt, D, _, Hp, Wp = win.shape
    h, w = Hp - 2 * margin, Wp - 2 * margin
    T = subsets.shape[-1]
    centre = win[:, :, :, margin : margin + h, margin : margin + w]  # (Bt, D, C, h, w)
    ok = torch.isfinite(centre).any(dim=2).reshape(Bt, D, h * w)  # (Bt, D, h*w)
    ok = ok & batch["inside"][:, margin : margin + h, margin : margin + w].reshape(Bt, 1, h * w)
    centre_frame = subsets[:, :, T // 2]  # (Bt, K)
    ok_k = torch.gather(ok, 1, centre_frame[..., None].expand(-1, -1, h * w))  # (Bt, K, h*w)
    cand = ok_k.nonzero()  # (M, 3): b, k, p
    if cand.shape[0] > n_latents:
        cand = cand[torch.randperm(cand.shape[0], generator=gen)[:n_latents].to(cand.device)]
    b, k, p = cand.unbind(1)
    frames = subsets[b, k]  # (N, T)
    days = torch.gather(batch["days"][b], 1, frames)  # (N, T)
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


def draw_render_frames(n: int, n_frames: int, render: int, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Which frames each latent renders: the centre frame plus ``render - 1`` of the others, uniformly.

    Returns ``sel`` (N, F) long frame indices (centre first) and ``scale`` (N, F): 1 for the centre,
    (T - 1) / (F - 1) for the others (inverse inclusion probability).
    """
    c = n_frames // 2
    if render >= n_frames:
        sel = torch.arange(n_frames, device=device).expand(n, -1)
        return sel, torch.ones(n, n_frames, device=device)
    others = torch.rand(n, n_frames - 1, generator=gen).argsort(dim=1)[:, : render - 1].to(device)  # (N, F-1)
    others = others + (others >= c).long()  # skip the centre index
    sel = torch.cat([torch.full((n, 1), c, device=device, dtype=torch.long), others], dim=1)
    scale = torch.full((n, render), (n_frames - 1) / (render - 1), device=device)
    scale[:, 0] = 1.0
    return sel, scale


def render(ae: SensorAutoencoder, z: Tensor, gaps: Tensor, sel: Tensor) -> Tensor:
    """Decode latents (N, latent) but render only frames ``sel`` (N, F): (N, F, C, P, P) in cube units."""
    tokens = ae.decoder.tokens(z, gaps)  # (N, T, d_model)
    chosen = torch.gather(tokens, 1, sel[..., None].expand(-1, -1, tokens.shape[-1]))  # (N, F, d_model)
    x_hat = ae.decoder.render(chosen.reshape(-1, tokens.shape[-1]))  # (N*F, C, P, P)
    cfg = ae.cfg
    x_hat = x_hat.reshape(sel.shape[0], sel.shape[1], cfg.in_channels, cfg.patch_px, cfg.patch_px)
    return x_hat * ae.input_std + ae.input_mean


@dataclass(frozen=True)
class Targets:
    """Per-patch targets of the windows on the rendered frames: ``x`` (N, F, C, P, P) filled with the patch's
    band means where not observed (for SSIM, as :func:`stembed.data.datasets.fill_patch` fills), ``valid``
    (same shape), and ``sam_total``: the SAM normaliser over all T frames of every patch (None without SAM)."""

    x: Tensor
    valid: Tensor
    sam_total: Tensor | None


def gather_targets(
    window: Tensor, inside: Tensor, win: Windows, sel: Tensor, margin: int, patch_px: int, loss: LossConfig
) -> Targets:
    """The reconstruction targets of each window: its 15 x 15 patch around the centre, on the rendered frames.

    A pixel outside the tile's split region (a reflected one) is never a target (``valid`` False). The
    statistics that need every frame of a patch (its band means, the SAM normaliser) come from box sums
    over the tile, so only the F rendered frames are gathered.
    """
    Bt, D, C = window.shape[:3]
    h = window.shape[-1] - 2 * margin
    py, px = win.p // h, win.p % h
    r = patch_px // 2
    lo, S = margin - r, h + 2 * r  # the patches of all centres cover [lo, lo + S) of the window
    part = window[..., lo : lo + S, lo : lo + S]  # (Bt, D, C, S, S)
    ins = inside[:, lo : lo + S, lo : lo + S]  # (Bt, S, S)
    ok = torch.isfinite(part) & ins[:, None, None]
    frames = torch.gather(win.frames, 1, sel)  # (N, F) tile-date indices of the rendered frames
    views = part.unfold(3, patch_px, 1).unfold(4, patch_px, 1)  # (Bt, D, C, h, w, P, P), no copy
    ok_views = ok.unfold(3, patch_px, 1).unfold(4, patch_px, 1)
    x = views[win.b[:, None], frames, :, py[:, None], px[:, None]]  # (N, F, C, P, P)
    valid = ok_views[win.b[:, None], frames, :, py[:, None], px[:, None]]

    def box(t: Tensor) -> Tensor:  # (Bt, D, C', S, S) -> (Bt, D, C', h, w): sums over each P x P patch
        out = nn.functional.avg_pool2d(t.reshape(Bt * D, -1, S, S), patch_px, stride=1) * patch_px**2
        return out.reshape(Bt, D, -1, h, h)

    per_date = box(torch.cat([torch.where(ok, part, torch.zeros_like(part)), ok.to(part.dtype)], dim=2))
    at = per_date[win.b[:, None], win.frames, :, py[:, None], px[:, None]].sum(dim=1)  # (N, 2C) over the T frames
    sums, counts = at[:, :C], at[:, C:]
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))  # (N, C)
    x = torch.where(valid, x, means[:, None, :, None, None])

    sam_total = None
    if loss.sam:
        w_t, w_s = (w.to(window.dtype) for w in context_weight_factors(win.frames.shape[1], patch_px, loss.decay))
        all_ok = ok.all(dim=2).to(window.dtype)  # (Bt, D, S, S)
        spatial = nn.functional.conv2d(all_ok.reshape(Bt * D, 1, S, S), w_s[None, None]).reshape(Bt, D, h, h)
        per_window = spatial[win.b[:, None], win.frames, py[:, None], px[:, None]] @ w_t  # (N,)
        centre = all_ok[win.b, win.frames[:, win.frames.shape[1] // 2], py + r, px + r]  # (N,) its raw weight was 1
        sam_total = (per_window + (loss.centre_weight - 1.0) * centre).sum()
    return Targets(x, valid, sam_total)


@dataclass(frozen=True)
class DenseStep:
    """One stage-1 dense step's windows, reconstructions (centre frame first), targets and loss terms."""

    windows: Windows
    x_hat: Tensor
    targets: Targets
    parts: dict[str, Tensor]


def autoencoder_step(
    ae: SensorAutoencoder, batch: dict[str, Tensor], loss: LossConfig, latents: int, render_frames: int,
    gen: torch.Generator,
) -> DenseStep | None:
    """Draw windows from a tile batch, encode, render and score them; None when no centre value is observed."""
    cfg, T = ae.cfg, ae.cfg.n_frames
    win = draw_windows(batch, cfg.context_px, latents, gen)
    if win.b.numel() == 0:
        return None
    z = ae.encoder.latent_from_tokens(gather_tokens(window_tokens(ae, batch["window"]), win), win.gaps)
    sel, scale = draw_render_frames(z.shape[0], T, render_frames, gen, z.device)
    x_hat = render(ae, z, win.gaps, sel)  # (N, F, C, P, P), centre frame first
    tg = gather_targets(batch["window"], batch["inside"], win, sel, cfg.context_px, cfg.patch_px, loss)
    parts = sampled_reconstruction_loss(
        x_hat, tg.x, tg.valid, loss, frames=sel, scale=scale, sam_total=tg.sam_total, n_frames=T
    )
    return DenseStep(win, x_hat, tg, parts)
