"""Embeddings of cloudy dates: the fusion model run with the S2 centre frame hidden, trained for it.

A date whose S2 centre pixel is cloudy has no embedding in the paper's system. Here it gets one
from what is still there: the S1 frame of that date, the S2 frames of the neighbouring dates, and
any companion sensor. The S2 centre frame is hidden *whole* (every pixel of it, as if the whole
frame were cloud), because that is the one pattern that is the same in training and at inference
whatever the cloud's shape.

:class:`GapFillModel` keeps the trained :class:`~stembed.models.fusion.FusionModel` untouched (it
still gives every observed date its embedding) and adds ``filler``: a second set of fusion layers,
started from a copy of the trained ones and trained so that, with the S2 centre frame hidden, it
reproduces the embedding the fusion model gives the same patch with it visible. The autoencoders
are shared, frozen, and stored once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from stembed.models.fusion import FusionModel


def hide_centre_raw(x: torch.Tensor) -> torch.Tensor:
    """Raw patches or windows (B, T, C, H, W) with NaN for missing values -> copy with the centre frame all NaN."""
    out = x.clone()
    out[:, x.shape[1] // 2] = float("nan")
    return out


def hide_centre_filled(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Filled patches (B, T, C, P, P) + their validity -> the patch the ``patch`` encoder sees with the centre frame hidden.

    The fill is redone as in training (:func:`stembed.data.datasets.fill_patch`): each band's mean over
    the patch's remaining observed values, 0 where a band has none.
    """
    valid = valid.clone()
    valid[:, x.shape[1] // 2] = False
    counts = valid.sum(dim=(1, 3, 4), keepdim=True)  # (B, 1, C, 1, 1)
    sums = torch.where(valid, x, torch.zeros_like(x)).sum(dim=(1, 3, 4), keepdim=True)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return torch.where(valid, x, means)


class GapFillModel(nn.Module):
    """A trained fusion model plus the fusion layers that embed a date with its S2 centre frame hidden.

    Args:
        fusion: the trained fusion model; frozen whole (its autoencoders and its fusion layers).
    """

    def __init__(self, fusion: FusionModel):
        super().__init__()
        self.fusion = fusion.requires_grad_(False).eval()
        filler = copy.deepcopy(fusion)
        filler.autoencoders = fusion.autoencoders  # shared, not copied
        filler.requires_grad_(False)
        for p in filler.fusion_parameters():
            p.requires_grad_(True)
        self.filler = filler
        self._register_state_dict_hook(_drop_shared)
        self.register_load_state_dict_pre_hook(_restore_shared)

    def train(self, mode: bool = True) -> GapFillModel:
        """Only the filler's fusion layers ever train; the fusion model stays in eval mode."""
        super().train(mode)
        self.fusion.eval()
        return self

    def fill_parameters(self) -> Iterator[nn.Parameter]:
        """What trains: the filler's fusion layers."""
        return self.filler.fusion_parameters()

    def parameter_groups(self) -> dict[str, Any]:
        """Disjoint named parts, for :func:`stembed.models.count_parameters`."""
        return {**self.fusion.parameter_groups(), "gap_fill": self.fill_parameters()}


_SHARED = ("autoencoders.",)


def _drop_shared(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: the filler's autoencoders are the fusion model's, so store them once."""
    for key in [k for k in state if k.startswith(prefix + "filler.") and k[len(prefix) + 7 :].startswith(_SHARED)]:
        del state[key]


def _restore_shared(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: point the filler's autoencoder keys at the fusion model's stored ones."""
    for key in [k for k in list(state) if k.startswith(prefix + "fusion.") and k[len(prefix) + 7 :].startswith(_SHARED)]:
        state[prefix + "filler." + key[len(prefix) + 7 :]] = state[key]
