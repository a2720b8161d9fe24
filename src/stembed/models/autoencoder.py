"""Per-sensor autoencoder (spec §3.1): a patch time series -> one latent vector -> the patch again.

Shapes: a patch batch is ``x: (B, T, C, H, W)`` with T = cfg.n_frames (11) and H = W = 15, and
``time_gaps: (B, T-1)`` integer days between consecutive frames. The latent ``z: (B, latent_dim)``
describes the centre pixel at the centre date, in the context of its neighbourhood.

Encoder: every frame goes through a CNN (15 -> 7 -> 4 px) and becomes one token of
token_channels x 4 x 4 = d_model values; learned "days since first frame" positions are added; a
transformer attends over the T dates *of each patch* (the authors' encoder attended across the
batch, so a patch's latent depended on its batch mates); a small head squeezes the T tokens into
the latent. The decoder mirrors it. Encoder and decoder share one transformer and one position
table, both owned by :class:`SensorAutoencoder`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from stembed.config import AEConfig
from stembed.models.dense import DenseFrameCNN
from stembed.models.layers import (
    ConvAttnBlock,
    MultiScaleBlock,
    PooledResidual,
    TemporalPositionalEmbedding,
    make_transformer,
    run_transformer,
)


def make_temporal_transformer(cfg: AEConfig) -> nn.TransformerEncoder:
    """The temporal transformer of spec §3.1: ReLU, batch-first (B, T, d_model); post-norm unless
    ``cfg.temporal_norm_first``."""
    return make_transformer(
        cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout, norm_first=cfg.temporal_norm_first
    )


def _check_patch(x: torch.Tensor, cfg: AEConfig) -> None:
    """Encoder input: (B, T, C, input_px, input_px); input_px = patch_px except for the dense variant."""
    if x.dim() != 5 or x.shape[1:] != (cfg.n_frames, cfg.in_channels, cfg.input_px, cfg.input_px):
        raise ValueError(
            f"x must be (B, {cfg.n_frames}, {cfg.in_channels}, {cfg.input_px}, {cfg.input_px}) "
            f"for sensor {cfg.sensor!r} ({cfg.variant} encoder), got {tuple(x.shape)}"
        )


def _check_gaps(time_gaps: torch.Tensor, batch: int, n_frames: int) -> None:
    if time_gaps.shape != (batch, n_frames - 1):
        raise ValueError(f"time_gaps must have shape ({batch}, {n_frames - 1}), got {tuple(time_gaps.shape)}")


class _SharedTemporal:
    """Encoder/decoder hold the shared transformer and position table through this plain object.

    It is not an ``nn.Module``, so the modules it points to are registered only where they are
    owned (in :class:`SensorAutoencoder`): one state_dict key per weight, counted once. The price:
    call ``.train()``, ``.eval()`` and ``.to()`` on the autoencoder, not on the encoder or decoder
    alone, so that the shared parts follow.
    """

    def __init__(self, transformer: nn.TransformerEncoder, positions: TemporalPositionalEmbedding):
        self.transformer = transformer
        self.positions = positions

    def __call__(self, tokens: torch.Tensor, time_gaps: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) tokens -> (B, T, d_model), attention over the T dates of each patch."""
        return run_transformer(self.transformer, tokens + self.positions(time_gaps))


def _resolve_shared(
    owner: nn.Module,
    cfg: AEConfig,
    temporal: nn.TransformerEncoder | None,
    positions: TemporalPositionalEmbedding | None,
) -> _SharedTemporal:
    """Borrow the given shared modules, or (standalone use) build and register owned ones."""
    if (temporal is None) != (positions is None):
        raise ValueError("pass both `temporal` and `positions` (shared) or neither (owned)")
    if temporal is None or positions is None:
        owner.temporal = temporal = make_temporal_transformer(cfg)
        owner.positions = positions = TemporalPositionalEmbedding(cfg.max_position_days, cfg.d_model)
    return _SharedTemporal(temporal, positions)


# ----------------------------------------------------------------------------- latent head
class LatentHead(nn.Module):
    """T tokens of d_model -> one latent vector: shrink each token, then mix over time.

    With ``cfg.centre_path`` the centre date's whole token also reaches the latent through one
    linear map: the paper's head squeezes every token to ``head_channels`` values before anything
    else, which at small widths leaves fewer numbers for the centre spectrum than it has bands.
    """

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.token_proj = nn.Linear(cfg.d_model, cfg.head_channels)
        self.time_reduce = nn.Linear(cfg.n_frames, cfg.reduced_tokens)
        self.to_latent = nn.Linear(cfg.head_channels * cfg.reduced_tokens, cfg.latent_dim)
        self.centre = nn.Linear(cfg.d_model, cfg.latent_dim) if cfg.centre_path else None
        self.selu = nn.SELU()
        self.out = nn.Softplus() if cfg.latent_activation == "softplus" else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frame tokens (B, T, d_model) -> latent (B, latent_dim)."""
        h = self.selu(self.token_proj(tokens))  # (B, T, head)
        h = self.selu(self.time_reduce(h.transpose(1, 2)))  # (B, head, R)
        z = self.to_latent(h.flatten(1))  # (B, head * R) -> (B, latent)
        if self.centre is not None:
            z = z + self.centre(tokens[:, tokens.shape[1] // 2])  # (B, d_model) -> (B, latent)
        return self.out(z)  # paper: softplus, latents >= 0


class LatentExpander(nn.Module):
    """One latent vector -> T tokens of d_model (mirror of :class:`LatentHead`)."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.head_channels = cfg.head_channels
        self.reduced_tokens = cfg.reduced_tokens
        self.from_latent = nn.Linear(cfg.latent_dim, cfg.head_channels * cfg.reduced_tokens)
        self.time_expand = nn.Linear(cfg.reduced_tokens, cfg.n_frames)
        self.token_proj = nn.Linear(cfg.head_channels, cfg.d_model)
        self.selu = nn.SELU()
        self.softplus = nn.Softplus()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_dim) -> tokens (B, T, d_model)."""
        h = self.softplus(self.from_latent(z))  # (B, R * head)
        h = h.reshape(-1, self.reduced_tokens, self.head_channels)  # (B, R, head)
        h = self.selu(self.time_expand(h.transpose(1, 2)))  # (B, head, R) -> (B, head, T)
        return self.selu(self.token_proj(h.transpose(1, 2)))  # (B, T, head) -> (B, T, d_model)


# ----------------------------------------------------------------------------- encoder / decoder
def patch_frame_cnn(cfg: AEConfig) -> nn.Sequential:
    """The paper's frame CNN: one 15 x 15 frame -> a token_channels x 4 x 4 map (zero padding inside the patch)."""
    C, stem, mid, low, tok = (
        cfg.in_channels, cfg.stem_channels, cfg.mid_channels, cfg.low_channels, cfg.token_channels
    )
    r, p = cfg.cbam_reduction, cfg.enc_dropout2d
    return nn.Sequential(
        nn.Conv2d(C, stem, kernel_size=1), nn.SiLU(),  # (N, stem, 15, 15)
        PooledResidual(MultiScaleBlock(stem, stem, cfg.multiscale_kernels, r)),
        nn.Conv2d(stem, mid, kernel_size=2, stride=2), nn.SiLU(), nn.Dropout2d(p),  # (N, mid, 7, 7)
        PooledResidual(ConvAttnBlock(mid, mid, r)),
        # (N, low, 4, 4)
        nn.Conv2d(mid, low, kernel_size=2, stride=2, padding=1), nn.SiLU(), nn.Dropout2d(p),
        ConvAttnBlock(low, tok, cfg.token_cbam_reduction, spatial_kernel=3),  # (N, tok, 4, 4)
    )


class SensorEncoder(nn.Module):
    """Windows (B, T, C, input_px, input_px) + day gaps (B, T-1) -> latent (B, latent_dim).

    The frame CNN is the paper's (:func:`patch_frame_cnn`, 15 px patches) or, for ``variant: dense``,
    :class:`~stembed.models.dense.DenseFrameCNN`, which maps frames of any size to every pixel's token:
    inference then encodes each tile frame once (:meth:`SensorAutoencoder.frame_tokens`) and every
    window reuses it through :meth:`latent_from_tokens`; a training window is its 1 x 1 case.

    ``temporal``/``positions``: the shared modules of a :class:`SensorAutoencoder`; when omitted
    the encoder builds and owns its own (standalone use).
    """

    def __init__(
        self,
        cfg: AEConfig,
        temporal: nn.TransformerEncoder | None = None,
        positions: TemporalPositionalEmbedding | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.cnn = DenseFrameCNN(cfg) if cfg.variant == "dense" else patch_frame_cnn(cfg)
        # centre_path: each frame's token also gets the centre pixel's own (standardised) spectrum
        self.centre_in = nn.Linear(cfg.in_channels, cfg.d_model) if cfg.centre_path else None
        self.shared = _resolve_shared(self, cfg, temporal, positions)
        self.head = LatentHead(cfg)

    def dense_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Dense variant: (N, C, H, W) standardised, filled frames -> (N, d_model, H - 2m, W - 2m) tokens.

        Output pixel (i, j) is the token of the window centred on input pixel (i + m, j + m), m = context_px.
        """
        tokens = self.cnn(frames)  # (N, d_model, ho, wo)
        if self.centre_in is not None:
            m = self.cfg.context_px
            centre = frames[..., m : frames.shape[-2] - m, m : frames.shape[-1] - m]  # (N, C, ho, wo)
            w, b = self.centre_in.weight, self.centre_in.bias  # (d_model, C), (d_model,)
            tokens = tokens + torch.einsum("dc,nchw->ndhw", w, centre) + b[:, None, None]
        return tokens

    def latent_from_tokens(self, tokens: torch.Tensor, time_gaps: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) frame tokens + (B, T-1) gaps -> (B, latent_dim): attention over time, then the head."""
        return self.head(self.shared(tokens, time_gaps))  # attention over the T dates of each window

    def forward(self, x: torch.Tensor, time_gaps: torch.Tensor) -> torch.Tensor:
        """Windows (B, T, C, input_px, input_px) + gaps (B, T-1) -> latent (B, latent_dim)."""
        cfg = self.cfg
        _check_patch(x, cfg)
        B, T, C, H, W = x.shape
        _check_gaps(time_gaps, B, T)
        tokens = self.cnn(x.reshape(B * T, C, H, W))  # (B*T, tok, 4, 4), dense: (B*T, d_model, 1, 1); each frame alone
        tokens = tokens.reshape(B, T, cfg.d_model)
        if self.centre_in is not None:  # (B, T, C) -> (B, T, d_model)
            # a broadcast sum, not a matmul: BLAS rounds a row by where it sits in the batch when the inner
            # size is this small, and a pixel's embedding must not depend on its batch mates (bit for bit)
            centre = x[:, :, :, H // 2, W // 2]
            tokens = tokens + (centre[..., None, :] * self.centre_in.weight).sum(-1) + self.centre_in.bias
        return self.latent_from_tokens(tokens, time_gaps)


class SensorDecoder(nn.Module):
    """Latent (B, latent_dim) + day gaps (B, T-1) -> patch time series (B, T, C, 15, 15).

    The output is linear (no squashing), so reconstructions may leave the [0, 1] data range.
    With ``cfg.centre_path`` the latent also reaches the centre date's token directly, and each frame's
    token writes the centre pixel's spectrum directly (one linear map each), added to what the
    upsampling CNN gives there.
    """

    def __init__(
        self,
        cfg: AEConfig,
        temporal: nn.TransformerEncoder | None = None,
        positions: TemporalPositionalEmbedding | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        C, stem, mid, low, tok = (
            cfg.in_channels, cfg.stem_channels, cfg.mid_channels, cfg.low_channels, cfg.token_channels
        )
        r, p = cfg.cbam_reduction, cfg.dec_dropout2d
        self.expand = LatentExpander(cfg)
        self.shared = _resolve_shared(self, cfg, temporal, positions)
        self.cnn = nn.Sequential(
            PooledResidual(ConvAttnBlock(tok, tok, r)),  # (N, tok, 4, 4)
            # (N, low, 8, 8)
            nn.ConvTranspose2d(tok, low, kernel_size=2, stride=2), nn.SiLU(), nn.Dropout2d(p),
            PooledResidual(ConvAttnBlock(low, low, r)),
            # (N, mid, 15, 15)
            nn.ConvTranspose2d(low, mid, kernel_size=2, stride=2, padding=1, output_padding=1),
            nn.Dropout2d(p),
            MultiScaleBlock(mid, stem, cfg.multiscale_kernels, r),  # (N, stem, 15, 15)
            nn.Conv2d(stem, C, kernel_size=3, padding=1), nn.SiLU(),
            nn.Conv2d(C, C, kernel_size=3, padding=1),  # (N, C, 15, 15), linear output
        )
        # centre_path: the latent also reaches the centre date's token directly (the expander squeezes it
        # through head_channels per token first), and that token writes the centre pixel directly
        self.centre_in = nn.Linear(cfg.latent_dim, cfg.d_model) if cfg.centre_path else None
        self.centre_out = nn.Linear(cfg.d_model, C) if cfg.centre_path else None

    def tokens(self, z: torch.Tensor, time_gaps: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_dim) + gaps (B, T-1) -> one token per frame (B, T, d_model)."""
        cfg = self.cfg
        if z.dim() != 2 or z.shape[1] != cfg.latent_dim:
            raise ValueError(
                f"z must be (B, {cfg.latent_dim}) for sensor {cfg.sensor!r}, got {tuple(z.shape)}"
            )
        _check_gaps(time_gaps, z.shape[0], cfg.n_frames)
        tokens = self.expand(z)  # (B, T, d_model)
        if self.centre_in is not None:
            c = cfg.n_frames // 2
            onehot = torch.zeros(cfg.n_frames, 1, dtype=tokens.dtype, device=tokens.device)
            onehot[c] = 1.0
            tokens = tokens + onehot * self.centre_in(z)[:, None, :]  # (B, T, d_model), centre date only
        return self.shared(tokens, time_gaps)  # (B, T, d_model)

    def render(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frame tokens (N, d_model) -> frames (N, C, 15, 15); dense training renders a subset of frames."""
        cfg = self.cfg
        # channels-last: oneDNN's convolutions run ~25 % faster on these small maps (benchmarks/train_step.py)
        x_hat = self.cnn(tokens.reshape(-1, cfg.token_channels, 4, 4).contiguous(memory_format=torch.channels_last))
        x_hat = x_hat.contiguous()  # (N, C, 15, 15)
        if self.centre_out is not None:
            c = cfg.patch_px // 2
            spike = torch.zeros(cfg.patch_px, cfg.patch_px, dtype=x_hat.dtype, device=x_hat.device)
            spike[c, c] = 1.0
            x_hat = x_hat + self.centre_out(tokens)[:, :, None, None] * spike  # centre pixel only
        return x_hat

    def forward(self, z: torch.Tensor, time_gaps: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_dim) + gaps (B, T-1) -> reconstructed patches (B, T, C, 15, 15)."""
        cfg = self.cfg
        tokens = self.tokens(z, time_gaps)  # (B, T, d_model)
        x_hat = self.render(tokens.reshape(-1, cfg.d_model))  # (B*T, C, 15, 15)
        return x_hat.reshape(z.shape[0], cfg.n_frames, cfg.in_channels, cfg.patch_px, cfg.patch_px)


# ----------------------------------------------------------------------------- autoencoder
class SensorAutoencoder(nn.Module):
    """Encoder + decoder of one sensor, owning the temporal transformer and position table they share.

    Parameter names: ``encoder.*``, ``decoder.*``, ``temporal.*`` and ``positions.*`` (each weight
    once). Call ``train()/eval()/to()`` on this module, not on its encoder or decoder alone.
    """

    input_mean: torch.Tensor  # buffers (register_buffer): declared so they type as tensors
    input_std: torch.Tensor

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.temporal = make_temporal_transformer(cfg)
        self.positions = TemporalPositionalEmbedding(cfg.max_position_days, cfg.d_model)
        self.encoder = SensorEncoder(cfg, temporal=self.temporal, positions=self.positions)
        self.decoder = SensorDecoder(cfg, temporal=self.temporal, positions=self.positions)
        # Per-band standardisation (identity unless the config carries stats); rebuilt from the
        # config, so not part of the state_dict.
        mean = torch.tensor(cfg.input_mean or [0.0] * cfg.in_channels).reshape(1, 1, -1, 1, 1)
        std = torch.tensor(cfg.input_std or [1.0] * cfg.in_channels).reshape(1, 1, -1, 1, 1)
        self.register_buffer("input_mean", mean, persistent=False)  # (1, 1, C, 1, 1)
        self.register_buffer("input_std", std, persistent=False)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Cube units -> model units, (..., C, H, W); the dense variant also fills NaN per pixel (band mean)."""
        x = (x - self.input_mean.reshape(-1, 1, 1)) / self.input_std.reshape(-1, 1, 1)
        return torch.nan_to_num(x, nan=0.0) if self.cfg.variant == "dense" else x

    def encode(self, x: torch.Tensor, time_gaps: torch.Tensor) -> torch.Tensor:
        """(B, T, C, input_px, input_px) in cube units, (B, T-1) -> z (B, latent_dim).

        The ``patch`` variant needs NaN-free input (the datasets fill it); the ``dense`` one fills NaN itself.
        """
        _check_patch(x, self.cfg)
        return self.encoder(self.standardise(x), time_gaps)

    def frame_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Dense variant: (N, C, H, W) frames in cube units (NaN = missing) -> (N, d_model, H - 2m, W - 2m)."""
        if self.cfg.variant != "dense":
            raise ValueError(f"frame_tokens needs the dense encoder variant, this {self.cfg.sensor} model is 'patch'")
        return self.encoder.dense_tokens(self.standardise(frames))

    def decode(self, z: torch.Tensor, time_gaps: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim), (B, T-1) -> x_hat (B, T, C, H, W) in cube units."""
        return self.decoder(z, time_gaps) * self.input_std + self.input_mean

    def decode_centre(self, z: torch.Tensor, time_gaps: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim), (B, T-1) -> the centre date's centre pixel (B, C) in cube units: ``decode``'s
        ``[:, T // 2, :, c, c]``, rendering that one frame (frames render independently) instead of all T."""
        cfg = self.cfg
        tokens = self.decoder.tokens(z, time_gaps)  # (B, T, d_model)
        frame = self.decoder.render(tokens[:, cfg.n_frames // 2])  # (B, C, H, W)
        c = cfg.patch_px // 2
        return frame[:, :, c, c] * self.input_std.reshape(-1) + self.input_mean.reshape(-1)  # (B, C)

    def forward(self, x: torch.Tensor, time_gaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct a patch batch; returns ``(x_hat, z)``."""
        z = self.encode(x, time_gaps)
        return self.decode(z, time_gaps), z

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """Disjoint named parts, for :func:`stembed.models.count_parameters`."""
        groups: dict[str, Iterable[nn.Parameter]] = {
            "encoder_cnn": self.encoder.cnn.parameters(),
            "encoder_head": self.encoder.head.parameters(),  # with centre_path: its centre map too
            "positions": self.positions.parameters(),
            "temporal": self.temporal.parameters(),
            "decoder_head": self.decoder.expand.parameters(),
            "decoder_cnn": self.decoder.cnn.parameters(),
        }
        if self.encoder.centre_in is not None and self.decoder.centre_in is not None and self.decoder.centre_out is not None:
            groups["centre_io"] = [
                p for m in (self.encoder.centre_in, self.decoder.centre_in, self.decoder.centre_out)
                for p in m.parameters()
            ]
        return groups
