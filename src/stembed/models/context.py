"""Context fusion: one embedding per pixel-date from the frozen latents of a window of the pixel's dates.

The paper's fusion (:class:`~stembed.models.fusion.FusionModel`) reads the sensors' latents of one date,
each of which saw 11 consecutive dates: two to three months, too little of a crop's season, and its loss
weighs the date far above them. Here the fusion layers read the latents of the date *and* of a window of the
pixel's other observed dates spread over the season (:mod:`stembed.data.windows`), so the embedding can carry
the season it sits in. Every latent is the frozen stage-1 encoder's, computed once per pixel-date and shared
by every window that holds it; adding a sensor still means a new autoencoder and new fusion layers only.

Shapes: a batch of B pixel-dates, each with S = 1 + K slots: slot 0 is the date itself, slots 1..K its
window's dates. Per sensor k: latents ``z[k]`` (B, S, L_k) and ``present[k]`` (B, S) (the value exists; a
hidden date or an empty slot is False), and for every non-anchor sensor ``dt[k]`` (B, S): days between its
date and the S2 date. ``offset`` (B, S): days from the embedded date (0 for slot 0); with ``cfg.calendar``
also ``day`` (B, S): each slot's day number (days since 1970), placed in the calendar year.

Layers: each slot's latents (with presence flags and |dt|) -> one token, plus a Fourier encoding of its day
offset and a slot type; a learned query token attends over the slots (pre-norm transformer, padding masked)
and its output, normalised, gives the embedding; beside it a direct linear path from the date's own latents
(zero where hidden) keeps the date's reconstruction easy. The embedding is linear (no softplus).

Decoders, one per nested prefix n (``cfg.prefixes``): heads n -> each latent (decoded by the frozen
autoencoders: the date's own patch), and a small MLP that, given a day offset, gives the centre pixel's bands
of every sensor at that offset (the window's other dates, in the autoencoders' standardised units).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from stembed.config import FusionConfig
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.fusion import ANCHOR, FusionBase
from stembed.models.layers import make_transformer, run_transformer

PERIODS_DAYS = (8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
"""Periods of the Fourier encoding of a day offset: a week to beyond a year."""
YEAR_DAYS = (365.25, 182.625)
"""Periods of the calendar encoding of a day number (``cfg.calendar``): the year and its half."""
DT_SCALE_DAYS = 30.0
"""|dt| of a non-anchor sensor enters its token divided by this."""


def fourier_days(offset: torch.Tensor, periods: tuple[float, ...] = PERIODS_DAYS) -> torch.Tensor:
    """(...,) days -> (..., 2 * len(periods)) sines and cosines."""
    p = torch.tensor(periods, dtype=torch.float64, device=offset.device)
    phase = 2 * math.pi * torch.remainder(offset[..., None].double(), p) / p  # (..., P), exact for large day numbers
    return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1).to(offset.dtype)


class ContextFusionModel(FusionBase):
    """Latents of a date and its window -> embedding ``e`` (B, embed_dim); see the module docstring.

    Args: as :class:`~stembed.models.fusion.FusionBase`; ``cfg.window`` must be set.
    """

    latent_mean: torch.Tensor  # (sum of latent sizes,) buffers set from the training latents (standardise_latents)
    latent_std: torch.Tensor

    def __init__(self, autoencoders: Mapping[str, SensorAutoencoder], cfg: FusionConfig):
        super().__init__(autoencoders, cfg)
        if cfg.window is None:
            raise ValueError("a context fusion needs cfg.window (which dates it reads around the date)")
        d, aes = cfg.d_model, self._aes()
        widths = [ae.cfg.latent_dim for _, ae in aes]
        total = sum(widths)
        self.token_in = nn.Linear(total + 2 * len(aes), d)  # latents, a present flag and |dt| per sensor
        self.time_in = nn.Linear(2 * len(PERIODS_DAYS), d)
        self.calendar_in = nn.Linear(2 * len(YEAR_DAYS), d) if cfg.calendar else None
        self.slot = nn.Embedding(3, d)  # 0: the query, 1: the date itself, 2: a window date
        self.query = nn.Parameter(torch.zeros(d))
        self.transformer = make_transformer(d, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.to_embedding = nn.Linear(d, cfg.embed_dim)
        self.direct = nn.Linear(total, cfg.embed_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.embed_dim, ae.cfg.latent_dim) for k, ae in aes})
        self.prefix_heads = nn.ModuleDict({
            str(n): nn.ModuleDict({k: nn.Linear(n, ae.cfg.latent_dim) for k, ae in aes}) for n in cfg.prefixes[:-1]
        })
        bands = sum(ae.cfg.in_channels for _, ae in aes)
        h = cfg.season_hidden
        times = 2 * len(PERIODS_DAYS) + (2 * len(YEAR_DAYS) if cfg.calendar else 0)
        self.season = nn.ModuleDict({
            str(n): nn.Sequential(nn.Linear(n + times, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, bands))
            for n in cfg.prefixes
        })
        self.register_buffer("latent_mean", torch.zeros(total))
        self.register_buffer("latent_std", torch.ones(total))
        self._finish()

    def _fusion_modules(self) -> list[nn.Module]:
        return [self.token_in, self.time_in, self.slot, self.transformer, self.norm, self.to_embedding, self.direct,
                self.heads, self.prefix_heads, self.season, *([self.calendar_in] if self.calendar_in is not None else [])]

    def fusion_parameters(self):  # type: ignore[no-untyped-def]  # the base's, plus the query vector
        """The fusion layers' parameters (what trains when the autoencoders are frozen)."""
        yield from super().fusion_parameters()
        yield self.query

    @property
    def band_widths(self) -> dict[str, int]:
        """Bands of each sensor in the season decoder's output, in token order."""
        return {k: ae.cfg.in_channels for k, ae in self._aes()}

    def fuse(
        self,
        z: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        dt: Mapping[str, torch.Tensor],
        offset: torch.Tensor,
        day: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Slots' latents (see the module docstring) -> e (B, embed_dim); ``day`` (B, S): each slot's day number,
        needed with ``cfg.calendar``."""
        self._check_keys(z, "latents")
        order = self.sensors
        B, S = offset.shape
        zz = torch.cat([z[k] for k in order], dim=-1)  # (B, S, L)
        zz = (zz - self.latent_mean) / self.latent_std
        pres = {k: present[k].to(zz.dtype) for k in order}  # (B, S) each
        parts = []
        start = 0
        for k in order:
            width = z[k].shape[-1]
            parts.append(zz[..., start : start + width] * pres[k][..., None])  # hidden values are zero
            start += width
        flags = [pres[k][..., None] for k in order]
        gaps = [
            (torch.zeros_like(offset) if k == ANCHOR else dt[k].abs() / DT_SCALE_DAYS)[..., None] * pres[k][..., None]
            for k in order
        ]
        tokens = self.token_in(torch.cat([*parts, *flags, *gaps], dim=-1))  # (B, S, d)
        tokens = tokens + self.time_in(fourier_days(offset))
        kind = torch.full((S,), 2, dtype=torch.long, device=offset.device)
        kind[0] = 1
        tokens = tokens + self.slot(kind)  # (S, d) broadcast
        q = (self.query + self.time_in(fourier_days(offset.new_zeros(1)))[0] + self.slot.weight[0]).expand(B, 1, -1)
        if self.calendar_in is not None:
            if day is None:
                raise ValueError("this context fusion places dates in the calendar year: pass day (B, S)")
            cal = self.calendar_in(fourier_days(day, YEAR_DAYS))  # (B, S, d)
            tokens, q = tokens + cal, q + cal[:, :1]  # the query sits on the date
        seq = torch.cat([q, tokens], dim=1)  # (B, 1 + S, d)
        any_present = torch.stack([present[k] for k in order], dim=0).any(dim=0)  # (B, S)
        pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=offset.device), ~any_present], dim=1)
        out = run_transformer(self.transformer, seq, padding_mask=pad)  # (B, 1 + S, d), attention over the slots
        e = self.to_embedding(self.norm(out[:, 0]))  # (B, embed_dim)
        date = torch.cat(parts, dim=-1)[:, 0]  # (B, L): the date's own standardised latents, zero where hidden
        # a broadcast sum, not a matmul: with so small an inner size BLAS rounds a row by its place in the batch,
        # and an embedding must not depend on its batch mates (bit for bit)
        return e + (date[:, None, :] * self.direct.weight).sum(-1) + self.direct.bias

    def season_values(
        self, e: torch.Tensor, offset: torch.Tensor, day: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """(B, n) embeddings (whole or a nested prefix) + (B, S) day offsets (and with ``cfg.calendar`` the (B, S)
        day numbers) -> the centre pixel's bands at each offset, by sensor: (B, S, C_k) in cube units."""
        n = e.shape[1]
        if str(n) not in self.season:
            raise ValueError(f"this model decodes {list(self.prefixes)} features, not {n}")
        S = offset.shape[1]
        times = [fourier_days(offset)]
        if self.calendar_in is not None:
            if day is None:
                raise ValueError("this context fusion places dates in the calendar year: pass day (B, S)")
            times.append(fourier_days(day, YEAR_DAYS))
        x = torch.cat([e[:, None, :].expand(-1, S, -1), *times], dim=-1)  # (B, S, n + F)
        out = self.season[str(n)](x)  # (B, S, sum of bands), standardised
        values, start = {}, 0
        for k, ae in self._aes():
            c = ae.cfg.in_channels
            mean, std = ae.input_mean.reshape(-1), ae.input_std.reshape(-1)  # (C,)
            values[k] = out[..., start : start + c] * std + mean
            start += c
        return values

    def decode_latents(self, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, n) embeddings (whole or a nested prefix) -> every sensor's latent (B, L_k) for its frozen decoder."""
        return {k: self.head(k, e.shape[1])(e) for k in self.sensors}
