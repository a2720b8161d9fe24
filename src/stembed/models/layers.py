"""Building blocks of the sensor autoencoders and the fusion model (spec §3).

Everything works on images of shape ``(N, C, H, W)``, where N is usually batch x frames: every
frame of every patch is convolved on its own, so no block mixes samples of a batch (there is no
BatchNorm anywhere, and a sample's output never depends on its batch mates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn


# ----------------------------------------------------------------------------- attention (CBAM)
class ChannelAttention(nn.Module):
    """Re-weight channels with a gate computed from the global max- and mean-pooled image.

    One MLP (1x1 convs C -> C/r -> C, ReLU, no bias) is shared by both pooled vectors; the two
    outputs are summed and squashed by a sigmoid.
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the same shape, each channel scaled by its gate."""
        x_max = torch.amax(x, dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        x_avg = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        gate = torch.sigmoid(self.mlp(x_max) + self.mlp(x_avg))  # (N, C, 1, 1)
        return x * gate


class SpatialAttention(nn.Module):
    """Re-weight pixels with a gate from a kxk conv over the channel-wise max and mean maps.

    The conv has no bias (as in the original CBAM); the parameter counts of spec §3 match either
    way to the reported precision (3 extra parameters per autoencoder with a bias).
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the same shape, each pixel scaled by its gate."""
        x_max = torch.amax(x, dim=1, keepdim=True)  # (N, 1, H, W)
        x_avg = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
        gate = torch.sigmoid(self.conv(torch.cat([x_max, x_avg], dim=1)))  # (N, 1, H, W)
        return x * gate


class CBAM(nn.Module):
    """Convolutional block attention: channel gate, then spatial gate, plus its own residual."""

    def __init__(self, channels: int, reduction: int, spatial_kernel: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the same shape."""
        return self.spatial(self.channel(x)) + x


# ----------------------------------------------------------------------------- conv blocks
class MultiScaleBlock(nn.Module):
    """Inception-like block: parallel kxk convs see several neighbourhood sizes at once.

    Each branch is conv(k, padding k//2) + LeakyReLU(0.1); the branches are concatenated, mixed
    back to ``out_channels`` by a 1x1 conv + LeakyReLU(0.01), then refined by CBAM.
    """

    def __init__(self, in_channels: int, out_channels: int, kernels: Sequence[int], reduction: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, out_channels, k, padding=k // 2), nn.LeakyReLU(0.1))
            for k in kernels
        )
        self.mix = nn.Sequential(
            nn.Conv2d(len(kernels) * out_channels, out_channels, kernel_size=1), nn.LeakyReLU(0.01)
        )
        self.attention = CBAM(out_channels, reduction, spatial_kernel=7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        y = torch.cat([branch(x) for branch in self.branches], dim=1)  # (N, n_kernels * C_out, H, W)
        return self.attention(self.mix(y))  # (N, C_out, H, W)


class ConvAttnBlock(nn.Module):
    """3x3 conv + LeakyReLU(0.01), then CBAM."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int, spatial_kernel: int = 7):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.01))
        self.attention = CBAM(out_channels, reduction, spatial_kernel=spatial_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        return self.attention(self.conv(x))


def _window_reduce(
    x: torch.Tensor, k: int, d: int, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Valid k x k window (dilation d, stride 1) of ``combine`` over (N, C, H, W), as two separable passes."""
    span = d * (k - 1)
    h = x[..., :, : x.shape[-1] - span]
    for i in range(1, k):
        h = combine(h, x[..., :, i * d : x.shape[-1] - span + i * d])
    out = h[..., : h.shape[-2] - span, :]
    for i in range(1, k):
        out = combine(out, h[..., i * d : h.shape[-2] - span + i * d, :])
    return out  # (N, C, H - span, W - span)


def window_max(x: torch.Tensor, k: int, d: int = 1) -> torch.Tensor:
    """Valid k x k max-pool with dilation d, stride 1: (N, C, H, W) -> (N, C, H - d(k-1), W - d(k-1)).

    Under autograd it is torch's ``max_pool2d`` (same values): the backward of the shifted views
    allocates and copies a full-size gradient per view, which made a dense training step ~3x slower.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return nn.functional.max_pool2d(x, k, stride=1, dilation=d)
    return _window_reduce(x, k, d, torch.maximum)


def window_mean(x: torch.Tensor, k: int, d: int = 1) -> torch.Tensor:
    """Valid k x k mean with dilation d, stride 1 (like :func:`window_max`)."""
    return _window_reduce(x, k, d, torch.add) / (k * k)


def max_pool3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max-pool, stride 1, padding 1 (= ``nn.MaxPool2d(3, 1, 1)``, bit for bit) on ``(N, C, H, W)``.

    Written as two separable passes of ``torch.maximum`` over shifted views because torch's CPU
    ``max_pool2d`` is slow on many small maps: ``benchmarks/max_pool.py`` measured 2.0x (15x15) and
    4.7x (7x7) on the encoder's shapes, and x1.12 on a whole small-preset embed (identical output).
    The forward is identical; on exact ties the gradient is shared between the tied inputs instead
    of going to one of them.
    """
    if torch.is_grad_enabled() and x.requires_grad:  # see window_max
        return nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    return window_max(nn.functional.pad(x, (1, 1, 1, 1), value=float("-inf")), 3)  # (N, C, H, W)


class PooledResidual(nn.Module):
    """``x + maxpool3x3(block(x))`` with stride 1, so the block keeps the image size.

    The max-pool spreads each strong response over its 3x3 neighbourhood before the skip.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the same shape (the block must keep it)."""
        return x + max_pool3x3(self.block(x))


# ----------------------------------------------------------------------------- time
def positions_from_gaps(time_gaps: torch.Tensor, max_days: int) -> torch.Tensor:
    """Days since the patch's first frame, from the day gaps between consecutive frames.

    Args:
        time_gaps: (B, T-1) integer days between frames (a float tensor is rounded).
        max_days: positions are clamped to [0, max_days], the rows of the position table.
            Training patches span < 200 days by construction, and inference windows are built
            to respect the limit, so the clamp only guards against out-of-range lookups.

    Returns:
        (B, T) long tensor: 0, g1, g1 + g2, ...
    """
    if time_gaps.dim() != 2:
        raise ValueError(f"time_gaps must be (batch, frames - 1), got shape {tuple(time_gaps.shape)}")
    gaps = time_gaps.round().long() if time_gaps.is_floating_point() else time_gaps.long()  # (B, T-1)
    first = torch.zeros_like(gaps[:, :1])  # (B, 1)
    positions = torch.cumsum(torch.cat([first, gaps], dim=1), dim=1)  # (B, T)
    return positions.clamp(0, max_days)


class TemporalPositionalEmbedding(nn.Module):
    """Learned embedding of "days since the patch's first frame" (not day of year).

    One row per day 0..max_days; the looked-up vector is scaled by 1/sqrt(d_model) and meant to be
    added to the frame tokens.
    """

    def __init__(self, max_days: int, d_model: int):
        super().__init__()
        self.max_days = max_days
        self.scale = 1.0 / math.sqrt(d_model)
        self.table = nn.Embedding(max_days + 1, d_model)

    def forward(self, time_gaps: torch.Tensor) -> torch.Tensor:
        """(B, T-1) day gaps -> (B, T, d_model) scaled position vectors."""
        positions = positions_from_gaps(time_gaps.to(self.table.weight.device), self.max_days)  # (B, T)
        return self.table(positions) * self.scale  # (B, T, d_model)


def make_transformer(
    d_model: int, n_heads: int, d_ff: int, n_layers: int, dropout: float, *, norm_first: bool
) -> nn.TransformerEncoder:
    """A batch-first ``nn.TransformerEncoder`` with ReLU feed-forward and no final norm.

    ``enable_nested_tensor=False``: we never pass padding masks, and it silences a warning for
    pre-norm layers.
    """
    layer = nn.TransformerEncoderLayer(
        d_model, n_heads, dim_feedforward=d_ff, dropout=dropout, activation="relu",
        batch_first=True, norm_first=norm_first,
    )
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


def run_transformer(
    transformer: nn.TransformerEncoder, x: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``transformer(x)`` for (B, T, d) input; in eval mode without grad, the same arithmetic with 2-D matmuls.

    nn.MultiheadAttention transposes batch-first input and projects it through batched matmuls plus
    copies; on CPU those took over half of a dense embedding run. Here each projection is one
    (B*T, d) matmul and attention is ``scaled_dot_product_attention`` (what the module calls too), so
    results agree to float rounding (tested against the module). ``padding_mask`` (B, T): True where a
    token must not be attended to (every row needs one that may).
    """
    if transformer.training or torch.is_grad_enabled():
        if padding_mask is None:
            return transformer(x)
        # a float mask: the boolean one takes torch's nested-tensor fast path in eval mode, which gives padded
        # rows other values (and a warning); -inf on the keys is the same attention
        mask = torch.zeros(padding_mask.shape, dtype=x.dtype, device=x.device).masked_fill(padding_mask, -math.inf)
        return transformer(x, src_key_padding_mask=mask)
    keep = None if padding_mask is None else ~padding_mask[:, None, None, :]  # (B, 1, 1, T): may be attended to
    for layer in transformer.layers:
        x = _encoder_layer_eval(layer, x, keep)
    return x if transformer.norm is None else transformer.norm(x)


def _encoder_layer_eval(layer: nn.TransformerEncoderLayer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    B, T, d = x.shape
    attn = layer.self_attn
    heads = attn.num_heads

    def self_attention(h: torch.Tensor) -> torch.Tensor:
        qkv = nn.functional.linear(h.reshape(B * T, d), attn.in_proj_weight, attn.in_proj_bias)  # (B*T, 3d)
        q, k, v = qkv.reshape(B, T, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each (B, heads, T, d/heads)
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, heads, T, d/heads)
        o = nn.functional.linear(o.transpose(1, 2).reshape(B * T, d), attn.out_proj.weight, attn.out_proj.bias)
        return o.reshape(B, T, d)

    def feed_forward(h: torch.Tensor) -> torch.Tensor:
        return layer.linear2(layer.activation(layer.linear1(h)))

    if layer.norm_first:
        x = x + self_attention(layer.norm1(x))
        return x + feed_forward(layer.norm2(x))
    x = layer.norm1(x + self_attention(x))
    return layer.norm2(x + feed_forward(x))


# ----------------------------------------------------------------------------- bookkeeping
def _unique_numel(params: Iterable[nn.Parameter]) -> int:
    seen: dict[int, int] = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Parameter counts per named part, plus ``total`` and ``trainable``.

    A module may define ``parameter_groups() -> dict[str, Iterable[Parameter]]`` with disjoint
    parts; otherwise its direct children are the parts. Shared parameters (the autoencoder's
    temporal transformer and position table) are counted once.
    """
    parameter_groups = getattr(module, "parameter_groups", None)
    if parameter_groups is not None:
        groups = parameter_groups()
    else:
        groups = {name: child.parameters() for name, child in module.named_children()}
        own = list(module.parameters(recurse=False))
        if own:
            groups["own"] = own
    counts = {name: _unique_numel(params) for name, params in groups.items()}
    counts["total"] = sum(p.numel() for p in module.parameters())  # parameters() yields shared ones once
    counts["trainable"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return counts
