"""The ``dense`` encoder variant: the paper's frame CNN made translation-equivariant.

The paper's encoder (``SensorEncoder``) zero-pads inside each 15x15 patch and pools its CBAM channel
gates over the whole patch, so a pixel's features depend on where it sits in the patch: every
pixel-date must be encoded on its own, 225 x 11 times over. This variant keeps the paper's stages and
their 4x4 token grid, and changes only what blocks sharing:

* every convolution is *valid* and reads real neighbouring pixels instead of zeros;
* the two stride-2 convolutions become dilated convolutions ("a trous"), so the stage-2 map exists at
  every pixel, not only on one patch's stride-2 lattice;
* the CBAM gates of the first two stages pool over a sliding window (``dense_pool_window``) around
  each position, not over the patch; the spatial gate kernel is ``dense_spatial_kernel``;
* the last block (on the 4x4 token grid) is the paper's own ``ConvAttnBlock``: it runs on each
  patch's 4x4 grid, gathered from the dense map, with zero padding and CBAM pooled over that grid;
* missing values are filled per pixel (the band's training mean, 0 after standardisation), not with
  a patch mean, so the fill too is the same for every patch that contains a pixel.

One function, :meth:`DenseFrameCNN.frame_tokens`, maps frames of any size to the token of every
pixel whose context window fits; a training patch is the 1x1 case (its ``input_px`` window), a tile
with a ``context_px`` halo the general one. The per-patch and the tile pass run the same code.
"""

from __future__ import annotations

import torch
from torch import nn

from stembed.config import AEConfig, dense_geometry
from stembed.models.layers import ChannelAttention, ConvAttnBlock, window_max, window_mean


def crop(x: torch.Tensor, lo: int, hi: int | None = None) -> torch.Tensor:
    """Drop ``lo`` pixels at the top/left and ``hi`` (default ``lo``) at the bottom/right of (N, C, H, W)."""
    hi = lo if hi is None else hi
    return x[..., lo : x.shape[-2] - hi, lo : x.shape[-1] - hi]


class WindowChannelAttention(ChannelAttention):
    """CBAM channel gate pooled over a sliding k x k window (dilation d) instead of the whole patch."""

    def __init__(self, channels: int, reduction: int, window: int, dilation: int):
        super().__init__(channels, reduction)
        self.window, self.dilation = window, dilation
        self.shrink = dilation * (window // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the gated map cropped by ``shrink`` on each side."""
        x_max = window_max(x, self.window, self.dilation)  # (N, C, H - 2s, W - 2s)
        x_avg = window_mean(x, self.window, self.dilation)
        gate = torch.sigmoid(self.mlp(x_max) + self.mlp(x_avg))
        return crop(x, self.shrink) * gate


class WindowSpatialAttention(nn.Module):
    """CBAM spatial gate: a valid k x k conv (dilation d) over the channel max and mean maps."""

    def __init__(self, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, dilation=dilation, bias=False)
        self.shrink = dilation * (kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the gated map cropped by ``shrink`` on each side."""
        x_max = torch.amax(x, dim=1, keepdim=True)  # (N, 1, H, W)
        x_avg = x.mean(dim=1, keepdim=True)
        gate = torch.sigmoid(self.conv(torch.cat([x_max, x_avg], dim=1)))  # (N, 1, H - 2s, W - 2s)
        return crop(x, self.shrink) * gate


class WindowCBAM(nn.Module):
    """Channel gate, then spatial gate, plus the (cropped) input: the paper's CBAM with windowed pooling."""

    def __init__(self, channels: int, reduction: int, window: int, kernel_size: int, dilation: int):
        super().__init__()
        self.channel = WindowChannelAttention(channels, reduction, window, dilation)
        self.spatial = WindowSpatialAttention(kernel_size, dilation)
        self.shrink = self.channel.shrink + self.spatial.shrink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H - 2 * shrink, W - 2 * shrink)."""
        return self.spatial(self.channel(x)) + crop(x, self.shrink)


class DenseMultiScale(nn.Module):
    """The paper's multiscale block with valid convs: branches cropped to the widest kernel's output."""

    def __init__(self, channels: int, kernels: tuple[int, ...], reduction: int, window: int, kernel_size: int):
        super().__init__()
        self.kernels = kernels
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, k), nn.LeakyReLU(0.1)) for k in kernels
        )
        self.mix = nn.Sequential(nn.Conv2d(len(kernels) * channels, channels, kernel_size=1), nn.LeakyReLU(0.01))
        self.attention = WindowCBAM(channels, reduction, window, kernel_size, dilation=1)
        self.shrink = max(kernels) // 2 + self.attention.shrink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H - 2 * shrink, W - 2 * shrink)."""
        widest = max(self.kernels) // 2
        y = torch.cat(
            [crop(branch(x), widest - k // 2) for k, branch in zip(self.kernels, self.branches, strict=True)], dim=1
        )  # (N, n_kernels * C, H - 2 * widest, W - 2 * widest)
        return self.attention(self.mix(y))


class DenseConvAttn(nn.Module):
    """Valid 3x3 conv (dilation d) + LeakyReLU(0.01), then windowed CBAM."""

    def __init__(self, channels: int, reduction: int, window: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, dilation=dilation), nn.LeakyReLU(0.01))
        self.attention = WindowCBAM(channels, reduction, window, kernel_size, dilation)
        self.shrink = dilation + self.attention.shrink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H - 2 * shrink, W - 2 * shrink)."""
        return self.attention(self.conv(x))


class DensePooledResidual(nn.Module):
    """``crop(x) + maxpool3x3(block(x))`` with valid pooling at dilation d (the paper's PooledResidual)."""

    def __init__(self, block: DenseMultiScale | DenseConvAttn, dilation: int):
        super().__init__()
        self.block = block
        self.dilation = dilation
        self.shrink = block.shrink + dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H - 2 * shrink, W - 2 * shrink)."""
        return crop(x, self.shrink) + window_max(self.block(x), 3, self.dilation)


class DenseFrameCNN(nn.Module):
    """Frames (N, C, H, W) -> the 4x4-grid token of every pixel whose context window fits (see module docstring)."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.geometry = dense_geometry(cfg)
        C, stem, mid, low, tok = (
            cfg.in_channels, cfg.stem_channels, cfg.mid_channels, cfg.low_channels, cfg.token_channels
        )
        r, p, pw, ks = cfg.cbam_reduction, cfg.enc_dropout2d, cfg.dense_pool_window, cfg.dense_spatial_kernel
        self.stem = nn.Sequential(nn.Conv2d(C, stem, kernel_size=1), nn.SiLU())
        self.level1 = DensePooledResidual(DenseMultiScale(stem, cfg.multiscale_kernels, r, pw, ks), dilation=1)
        # the paper's kernel-2 stride-2 conv, evaluated at every pixel: taps at +0 and +1
        self.down1 = nn.Sequential(nn.Conv2d(stem, mid, kernel_size=2), nn.SiLU(), nn.Dropout2d(p))
        self.level2 = DensePooledResidual(DenseConvAttn(mid, r, pw, ks, dilation=2), dilation=2)
        # the paper's second stride-2 conv (padding 1), at every pixel: taps at -2 and +0
        self.down2 = nn.Sequential(nn.Conv2d(mid, low, kernel_size=2, dilation=2), nn.SiLU(), nn.Dropout2d(p))
        self.token_block = ConvAttnBlock(low, tok, cfg.token_cbam_reduction, spatial_kernel=3)  # on each 4x4 grid
        if (self.level1.shrink, self.level2.shrink) != (self.geometry.level1_radius, self.geometry.level2_radius):
            raise RuntimeError("dense encoder layers disagree with stembed.config.dense_geometry")

    def low_map(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, low, H - a - b, W - a - b); index i is input pixel i + a.

        ``a = geometry.low_shift``, ``b = geometry.right_shrink``.
        """
        h = self.level1(self.stem(frames))  # (N, stem, H - 2 r1, W - 2 r1)
        h = self.level2(self.down1(h))  # (N, mid, H - 2 r1 - 1 - 2 r2, ...)
        return self.down2(h)  # (N, low, H - a - b, W - a - b)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) standardised, filled frames -> (N, d_model, H - 2m, W - 2m) tokens, m = ``context_px``.

        Output pixel (i, j) is the token of the patch centred on input pixel (i + m, j + m).
        """
        g, cfg = self.geometry, self.cfg
        H, W = frames.shape[-2:]
        ho, wo = H - 2 * g.margin, W - 2 * g.margin
        if g.unused_right:  # the symmetric window's last rows/columns are never read
            frames = frames[..., : H - g.unused_right, : W - g.unused_right]
        low = self.low_map(frames)  # (N, low, Hl, Wl)
        N, L = low.shape[:2]
        grid = [g.margin + o - g.low_shift for o in g.token_offsets]  # low-map index of each grid row, pixel 0
        cells = torch.stack(
            [low[:, :, a : a + ho, b : b + wo] for a in grid for b in grid], dim=2
        )  # (N, low, 16, ho, wo)
        cells = cells.permute(0, 3, 4, 1, 2).reshape(N * ho * wo, L, 4, 4)  # (N*ho*wo, low, 4, 4)
        tokens = self.token_block(cells)  # (N*ho*wo, tok, 4, 4): the paper's last block, per 4x4 grid
        return tokens.reshape(N, ho, wo, cfg.d_model).permute(0, 3, 1, 2)  # (N, d_model, ho, wo)
