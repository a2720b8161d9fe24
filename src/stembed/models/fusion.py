"""Fusion of the S1 and S2 latents (and any companion sensors') into one embedding per patch (spec §3.2).

The stage-1 autoencoders each turn their patch into a latent (S1: 2-d, S2: 9-d in the paper
preset). The fusion layers read the latents as tokens, let them attend to each other, and pool them
into the fused embedding ``e`` (7-d). Small heads map ``e`` back to each latent, and the
autoencoders' decoders reconstruct every patch from it; that reconstruction is the training signal.

By default the autoencoders are frozen (paper text): only the fusion layers train, so adding a
sensor means training its autoencoder and a new fusion stage, never touching the S1/S2 models.
*Companion* sensors (``extra``: any registered sensor matched to the S2 dates, e.g. AgERA5
weather) add one token each after the S1 and S2 tokens; a model without them has exactly the
parameters (names and shapes) of the two-sensor model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from stembed.config import AEConfig, FusionConfig
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.layers import make_transformer, run_transformer

Companion = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A companion sensor's input: patches (B, T, C, H, W), day gaps (B, T-1), and (B,) days to the S2 date."""

_V = TypeVar("_V")  # what each companion's entry holds (inputs, or latent and days)


class FusionModel(nn.Module):
    """S1 + S2 (+ companion) patches -> fused embedding ``e`` (B, embed_dim), and reconstructions of each.

    Args:
        s1, s2: the stage-1 autoencoders. Unless ``cfg.finetune_autoencoders`` is set, they are
            frozen in place (``requires_grad=False``) and kept in eval mode whatever ``train()``
            says, so their dropout is off and their weights cannot change.
        cfg: the fusion architecture.
        extra: companion sensors' autoencoders by sensor key (frozen like S1 and S2), in token order.
    """

    def __init__(
        self,
        s1: SensorAutoencoder,
        s2: SensorAutoencoder,
        cfg: FusionConfig,
        extra: Mapping[str, SensorAutoencoder] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.s1 = s1
        self.s2 = s2
        companions = dict(extra or {})  # typed, unlike the ModuleDict's entries
        self.extra = nn.ModuleDict(companions)
        d = cfg.d_model
        self.project_s1 = nn.Linear(s1.cfg.latent_dim, d)
        self.project_s2 = nn.Linear(s2.cfg.latent_dim, d)
        self.project_extra = nn.ModuleDict({k: nn.Linear(ae.cfg.latent_dim, d) for k, ae in companions.items()})
        # row 0: S1 token, row 1: S2 token, rows 2...: companion tokens in ``extra`` order
        self.type_embedding = nn.Embedding(2 + len(self.extra), d)
        self.pair_positions = nn.Embedding(cfg.max_pair_gap_days + 1, d)  # days between S1 and S2 dates
        self.transformer = make_transformer(  # pre-norm, over the 2 sensor tokens
            d, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout, norm_first=True
        )
        self.norm = nn.LayerNorm(d)
        self.to_embedding = nn.Linear(d, cfg.embed_dim)
        latent_total = s1.cfg.latent_dim + s2.cfg.latent_dim + sum(ae.cfg.latent_dim for ae in companions.values())
        self.direct = nn.Linear(latent_total, cfg.embed_dim) if cfg.direct_path else None
        self.softplus = nn.Softplus()
        self.head_s1 = nn.Linear(cfg.embed_dim, s1.cfg.latent_dim)
        self.head_s2 = nn.Linear(cfg.embed_dim, s2.cfg.latent_dim)
        self.head_extra = nn.ModuleDict({k: nn.Linear(cfg.embed_dim, ae.cfg.latent_dim) for k, ae in companions.items()})
        for key, ae in [("s1", s1), *companions.items()]:
            if ae.cfg.variant != s2.cfg.variant:
                raise ValueError(
                    f"the {key} autoencoder is '{ae.cfg.variant}' but S2 is '{s2.cfg.variant}'; train all with the "
                    "same variant"
                )
        if not cfg.finetune_autoencoders:
            for ae in self.autoencoders().values():
                ae.requires_grad_(False)
                ae.eval()

    def autoencoders(self) -> dict[str, SensorAutoencoder]:
        """Every sensor's autoencoder by sensor key: ``s1``, ``s2``, then the companions."""
        return {"s1": self.s1, "s2": self.s2, **self.extra}  # type: ignore[dict-item]  # ModuleDict entries type as Module

    @property
    def frozen(self) -> bool:
        """True when the autoencoders are frozen (the default)."""
        return not self.cfg.finetune_autoencoders

    def train(self, mode: bool = True) -> FusionModel:
        """Like ``nn.Module.train``, but frozen autoencoders always stay in eval mode."""
        super().train(mode)
        if self.frozen:
            for ae in self.autoencoders().values():
                ae.eval()
        return self

    def _fusion_modules(self) -> list[nn.Module]:
        return [
            self.project_s1, self.project_s2, self.project_extra, self.type_embedding, self.pair_positions,
            self.transformer, self.norm, self.to_embedding, self.head_s1, self.head_s2, self.head_extra,
            *([self.direct] if self.direct is not None else []),
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
            **{f"{k}_autoencoder": ae.parameters() for k, ae in self.autoencoders().items()},
            "fusion": self.fusion_parameters(),
        }

    def embed(
        self,
        x1: torch.Tensor,
        gaps1: torch.Tensor,
        x2: torch.Tensor,
        gaps2: torch.Tensor,
        dt_centre: torch.Tensor,
        extra: Mapping[str, Companion] | None = None,
    ) -> torch.Tensor:
        """Fused embedding of each patch.

        Args:
            x1, gaps1: S1 patches (B, T, C1, H, W) and their day gaps (B, T-1).
            x2, gaps2: S2 patches (B, T, C2, H, W) and their day gaps (B, T-1).
            dt_centre: (B,) or (B, 1) days between the S1 and S2 dates at the centre frame. Its
                absolute value is rounded and clamped to [0, max_pair_gap_days] (the rows of the
                pair-position table); S1 matching keeps it far below that limit in practice.
            extra: every companion sensor's ``(x, gaps, dt)`` (required when the model has them).

        Returns:
            e: (B, embed_dim), >= 0.
        """
        extra = self._check_extra(extra)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            z1 = self.s1.encode(x1, gaps1)  # (B, latent_s1)
            z2 = self.s2.encode(x2, gaps2)  # (B, latent_s2)
            aes = self.autoencoders()
            zx = {k: (aes[k].encode(x, g), dt) for k, (x, g, dt) in extra.items()}  # (B, latent_k), (B,)
        return self.fuse(z1, z2, dt_centre, zx)

    def _check_extra(self, extra: Mapping[str, _V] | None) -> Mapping[str, _V]:
        extra = extra or {}
        if list(extra) != list(self.extra):
            raise ValueError(f"this fusion model needs companion inputs {list(self.extra)}, got {list(extra)}")
        return extra

    def fuse(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        dt_centre: torch.Tensor,
        extra: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The fusion layers alone: latents (B, latent_s1), (B, latent_s2) + (B,) days -> e (B, embed_dim).

        ``extra``: each companion's ``(z (B, latent_k), dt (B,))``, dt = days between its frame and the
        S2 date, which becomes that token's pair position (S1 sits at 0 and S2 at ``dt_centre``).
        """
        extra = self._check_extra(extra)
        B = z1.shape[0]
        projected = [self.project_s1(z1), self.project_s2(z2)] + [self.project_extra[k](z) for k, (z, _) in extra.items()]
        tokens = torch.stack(projected, dim=1)  # (B, N, d), N = 2 + companions
        tokens = tokens + self.type_embedding.weight  # (N, d) broadcast over the batch

        device = self.pair_positions.weight.device
        zero = torch.zeros(B, device=device)
        dts = [dt_centre, *(dt for _, dt in extra.values())]
        pair = torch.stack([zero] + [dt.to(device).reshape(B).float() for dt in dts], dim=1)
        pair = pair.abs()  # (B, N): S1 at 0, S2 at |dt| days, each companion at its |dt| to the S2 date
        pair = pair.round().long().clamp(0, self.cfg.max_pair_gap_days)
        tokens = tokens + self.pair_positions(pair) / math.sqrt(self.cfg.d_model)  # (B, N, d)

        tokens = run_transformer(self.transformer, tokens)  # (B, N, d), attention between the sensor tokens
        pooled = self.norm(tokens.mean(dim=1))  # (B, d)
        pre = self.to_embedding(pooled)  # (B, embed_dim)
        if self.direct is not None:  # the latents' scale, which the layer norm removed
            z = torch.cat([z1, z2, *(z for z, _ in extra.values())], dim=1)  # (B, sum of latent sizes)
            # a broadcast sum, not a matmul: with so small an inner size BLAS rounds a row by its place in the
            # batch, and an embedding must not depend on its batch mates (bit for bit)
            pre = pre + (z[:, None, :] * self.direct.weight).sum(-1) + self.direct.bias
        return self.softplus(pre)  # (B, embed_dim)

    def decode(
        self, e: torch.Tensor, gaps1: torch.Tensor, gaps2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct both patches from the fused embedding: (B, embed_dim) -> (x1_hat, x2_hat)."""
        x1_hat = self.s1.decode(self.head_s1(e), gaps1)  # (B, T, C1, H, W)
        x2_hat = self.s2.decode(self.head_s2(e), gaps2)  # (B, T, C2, H, W)
        return x1_hat, x2_hat

    def decode_extra(self, e: torch.Tensor, gaps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reconstruct each companion's patches: (B, embed_dim) + its (B, T-1) gaps -> (B, T, C_k, H, W)."""
        aes = self.autoencoders()
        return {k: aes[k].decode(self.head_extra[k](e), gaps[k]) for k in self.extra}

    def forward(
        self,
        x1: torch.Tensor,
        gaps1: torch.Tensor,
        x2: torch.Tensor,
        gaps2: torch.Tensor,
        dt_centre: torch.Tensor,
        extra: Mapping[str, Companion] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(x1_hat, x2_hat, e)``; see :meth:`embed` for the arguments (companions: :meth:`decode_extra`)."""
        e = self.embed(x1, gaps1, x2, gaps2, dt_centre, extra)
        x1_hat, x2_hat = self.decode(e, gaps1, gaps2)
        return x1_hat, x2_hat, e


def build_fusion(
    s1_model: dict[str, Any],
    s2_model: dict[str, Any],
    model: dict[str, Any],
    extra_models: dict[str, dict[str, Any]] | None = None,
) -> FusionModel:
    """A fusion model (untrained autoencoders) from the configs a fusion bundle stores."""
    return FusionModel(
        SensorAutoencoder(AEConfig.model_validate(s1_model)),
        SensorAutoencoder(AEConfig.model_validate(s2_model)),
        FusionConfig.model_validate(model),
        {k: SensorAutoencoder(AEConfig.model_validate(v)) for k, v in (extra_models or {}).items()},
    )
