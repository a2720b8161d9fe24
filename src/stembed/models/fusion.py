"""Fusion of the S1 and S2 latents into one embedding per patch (spec §3.2).

The two stage-1 autoencoders each turn their patch into a latent (S1: 2-d, S2: 9-d in the paper
preset). The fusion layers read the two latents as two tokens, let them attend to each other, and
pool them into the fused embedding ``e`` (7-d). Small heads map ``e`` back to each latent, and the
autoencoders' decoders reconstruct both patches from it; that reconstruction is the training signal.

By default the autoencoders are frozen (paper text): only the fusion layers train, so adding a
sensor means training a new fusion stage, never touching the per-sensor models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from stembed.config import FusionConfig
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.layers import make_transformer, run_transformer


class FusionModel(nn.Module):
    """S1 + S2 patches -> fused embedding ``e`` (B, embed_dim), and reconstructions of both.

    Args:
        s1, s2: the stage-1 autoencoders. Unless ``cfg.finetune_autoencoders`` is set, they are
            frozen in place (``requires_grad=False``) and kept in eval mode whatever ``train()``
            says, so their dropout is off and their weights cannot change.
        cfg: the fusion architecture.
    """

    def __init__(self, s1: SensorAutoencoder, s2: SensorAutoencoder, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.s1 = s1
        self.s2 = s2
        d = cfg.d_model
        self.project_s1 = nn.Linear(s1.cfg.latent_dim, d)
        self.project_s2 = nn.Linear(s2.cfg.latent_dim, d)
        self.type_embedding = nn.Embedding(2, d)  # row 0: S1 token, row 1: S2 token
        self.pair_positions = nn.Embedding(cfg.max_pair_gap_days + 1, d)  # days between S1 and S2 dates
        self.transformer = make_transformer(  # pre-norm, over the 2 sensor tokens
            d, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout, norm_first=True
        )
        self.norm = nn.LayerNorm(d)
        self.to_embedding = nn.Linear(d, cfg.embed_dim)
        self.softplus = nn.Softplus()
        self.head_s1 = nn.Linear(cfg.embed_dim, s1.cfg.latent_dim)
        self.head_s2 = nn.Linear(cfg.embed_dim, s2.cfg.latent_dim)
        if s1.cfg.variant != s2.cfg.variant:
            raise ValueError(
                f"S1 autoencoder is '{s1.cfg.variant}' but S2 is '{s2.cfg.variant}'; train both with the same variant"
            )
        if not cfg.finetune_autoencoders:
            self.s1.requires_grad_(False)
            self.s2.requires_grad_(False)
            self.s1.eval()
            self.s2.eval()

    @property
    def frozen(self) -> bool:
        """True when the autoencoders are frozen (the default)."""
        return not self.cfg.finetune_autoencoders

    def train(self, mode: bool = True) -> FusionModel:
        """Like ``nn.Module.train``, but frozen autoencoders always stay in eval mode."""
        super().train(mode)
        if self.frozen:
            self.s1.eval()
            self.s2.eval()
        return self

    def _fusion_modules(self) -> list[nn.Module]:
        return [
            self.project_s1, self.project_s2, self.type_embedding, self.pair_positions,
            self.transformer, self.norm, self.to_embedding, self.head_s1, self.head_s2,
        ]

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        """The fusion layers' parameters only (what trains when the autoencoders are frozen).

        With ``finetune_autoencoders`` everything trains: optimise ``parameters()`` instead.
        """
        for module in self._fusion_modules():
            yield from module.parameters()

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """Disjoint named parts, for :func:`stembed.models.count_parameters`."""
        return {
            "s1_autoencoder": self.s1.parameters(),
            "s2_autoencoder": self.s2.parameters(),
            "fusion": self.fusion_parameters(),
        }

    def embed(
        self,
        x1: torch.Tensor,
        gaps1: torch.Tensor,
        x2: torch.Tensor,
        gaps2: torch.Tensor,
        dt_centre: torch.Tensor,
    ) -> torch.Tensor:
        """Fused embedding of each patch.

        Args:
            x1, gaps1: S1 patches (B, T, C1, H, W) and their day gaps (B, T-1).
            x2, gaps2: S2 patches (B, T, C2, H, W) and their day gaps (B, T-1).
            dt_centre: (B,) or (B, 1) days between the S1 and S2 dates at the centre frame. Its
                absolute value is rounded and clamped to [0, max_pair_gap_days] (the rows of the
                pair-position table); S1 matching keeps it far below that limit in practice.

        Returns:
            e: (B, embed_dim), >= 0.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            z1 = self.s1.encode(x1, gaps1)  # (B, latent_s1)
            z2 = self.s2.encode(x2, gaps2)  # (B, latent_s2)
        return self.fuse(z1, z2, dt_centre)

    def fuse(self, z1: torch.Tensor, z2: torch.Tensor, dt_centre: torch.Tensor) -> torch.Tensor:
        """The fusion layers alone: latents (B, latent_s1), (B, latent_s2) + (B,) days -> e (B, embed_dim)."""
        B = z1.shape[0]
        tokens = torch.stack([self.project_s1(z1), self.project_s2(z2)], dim=1)  # (B, 2, d)
        tokens = tokens + self.type_embedding.weight  # (2, d) broadcast over the batch

        device = self.pair_positions.weight.device
        dt = dt_centre.to(device).reshape(B).abs()  # (B,)
        dt = (dt.round() if dt.is_floating_point() else dt).long().clamp(0, self.cfg.max_pair_gap_days)
        pair = torch.stack([torch.zeros_like(dt), dt], dim=1)  # (B, 2): S1 at 0, S2 at |dt| days
        tokens = tokens + self.pair_positions(pair) / math.sqrt(self.cfg.d_model)  # (B, 2, d)

        tokens = run_transformer(self.transformer, tokens)  # (B, 2, d), attention between the two sensor tokens
        pooled = self.norm(tokens.mean(dim=1))  # (B, d)
        return self.softplus(self.to_embedding(pooled))  # (B, embed_dim)

    def decode(
        self, e: torch.Tensor, gaps1: torch.Tensor, gaps2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct both patches from the fused embedding: (B, embed_dim) -> (x1_hat, x2_hat)."""
        x1_hat = self.s1.decode(self.head_s1(e), gaps1)  # (B, T, C1, H, W)
        x2_hat = self.s2.decode(self.head_s2(e), gaps2)  # (B, T, C2, H, W)
        return x1_hat, x2_hat

    def forward(
        self,
        x1: torch.Tensor,
        gaps1: torch.Tensor,
        x2: torch.Tensor,
        gaps2: torch.Tensor,
        dt_centre: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(x1_hat, x2_hat, e)``; see :meth:`embed` for the arguments."""
        e = self.embed(x1, gaps1, x2, gaps2, dt_centre)
        x1_hat, x2_hat = self.decode(e, gaps1, gaps2)
        return x1_hat, x2_hat, e
