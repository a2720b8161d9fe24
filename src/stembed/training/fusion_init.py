"""A closed-form start for the fusion layers: the best *linear* fusion, to first order, before any gradient step.

With the autoencoders frozen, fusion is a small autoencoder of the concatenated latents
``z = [z_s1 | z_s2 | companions]`` whose reconstruction error is measured after each frozen decoder.
Near the data a decoder is linear in its latent, ``x_hat(z + d) ~ x_hat(z) + J d``, so the squared
centre-pixel error of a latent error ``d`` is ``d^T J^T J d``: PCA of the training latents in the
metric ``M = E[J^T J]`` (one block per sensor, times its branch weight) gives the rank-``embed_dim``
linear encoder and decoder of least expected error.

Measured on the Belgian patch (``experiments/fusion_init.py``): this start alone reconstructs the
validation block's S2 centre pixels with MAE 0.0069 and S1's with 0.0046, where 25 min of gradient
training from a random start had reached 0.0100 and 0.0068. Training then starts from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from stembed.data.datasets import FusionPatches
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.fusion import FusionModel
from stembed.training.modules import fusion_inputs

SOFTPLUS_MARGIN = 4.0  # softplus(x) = x + log(1 + e^-x): within 2 % of x for x >= 4


@torch.no_grad()
def centre_jacobian_metric(ae: SensorAutoencoder, z: Tensor, gaps: Tensor) -> Tensor:
    """``E[J^T J]`` (L, L) of the decoder's centre pixel (centre date) in cube units, over the rows of ``z`` (N, L).

    One backward pass per band (the rows of ``z`` are independent, so each row's gradient is its own).
    """
    rows = []
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        centre = ae.decode_centre(zz, gaps)  # (N, C)
        for band in range(centre.shape[1]):
            (g,) = torch.autograd.grad(centre[:, band].sum(), zz, retain_graph=band + 1 < centre.shape[1])
            rows.append(g)  # (N, L): d centre[:, band] / d z
    jac = torch.stack(rows, dim=1)  # (N, C, L)
    return torch.einsum("nci,ncj->ij", jac, jac) / z.shape[0]


def linear_fusion(z: Tensor, metric: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``k`` PCA of ``z`` (N, L) in ``metric`` (L, L); returns ``(mean (L,), enc (L, k), dec (k, L))``.

    ``(z - mean) @ enc`` are scores with unit variance over ``z``; ``scores @ dec + mean`` reconstructs ``z``.
    """
    w, u = torch.linalg.eigh(metric.double())
    root = u @ torch.diag(w.clamp_min(w.max() * 1e-10).sqrt()) @ u.T  # metric^(1/2), (L, L)
    mean = z.double().mean(0)
    _, s, vt = torch.linalg.svd((z.double() - mean) @ root, full_matrices=False)
    if k > vt.shape[0]:
        raise ValueError(f"a {k}-d embedding needs at least {k} latent dimensions and rows, got {tuple(z.shape)}")
    scale = s[:k] / (z.shape[0] - 1) ** 0.5  # score standard deviations
    enc = root @ vt[:k].T / scale  # (L, k)
    dec = scale[:, None] * vt[:k] @ torch.linalg.inv(root)  # (k, L)
    return mean.float(), enc.float(), dec.float()


@torch.no_grad()
def init_linear_fusion(
    model: FusionModel,
    latents: Mapping[str, Tensor],
    gaps: Mapping[str, Tensor],
    weights: Mapping[str, float],
    metric: Callable[[SensorAutoencoder, Tensor, Tensor], Tensor] = centre_jacobian_metric,
) -> dict[str, float]:
    """Set the fusion layers to the linear fusion of :func:`linear_fusion` (needs ``cfg.direct_path``).

    Args:
        latents: each sensor's training latents (N, L_k), keys in ``model.sensors`` order.
        gaps: each sensor's day gaps (N, T-1) for the same rows (the decoders' positions).
        weights: each sensor's branch weight in the fusion loss.
        metric: each sensor's block of the metric, ``(autoencoder, latents, gaps) -> (L_k, L_k)``; the
            centre pixel's by default (``experiments/fusion_metric.py`` tries the whole patch's).

    The direct path carries the scores, shifted so that the embedding's softplus is near the identity on
    the training latents; the transformer path's output layer starts at zero (it learns from there); each
    head maps the embedding back to its sensor's latent. Returns the smallest pre-softplus value seen.
    """
    if model.direct is None:
        raise ValueError("a linear fusion start needs the direct path (model.direct_path: true)")
    keys = list(model.sensors)
    if list(latents) != keys:
        raise ValueError(f"latents for {keys} needed, got {list(latents)}")
    aes = model.sensor_autoencoders()
    blocks = [weights[k] * metric(aes[k], latents[k], gaps[k]) for k in keys]
    z = torch.cat([latents[k] for k in keys], dim=1)  # (N, L)
    mean, enc, dec = linear_fusion(z, torch.block_diag(*blocks), model.cfg.embed_dim)
    scores = (z - mean) @ enc  # (N, k)
    shift = SOFTPLUS_MARGIN - scores.min(0).values  # (k,)
    model.direct.weight.copy_(enc.T)
    model.direct.bias.copy_(shift - mean @ enc)
    model.to_embedding.weight.zero_()
    model.to_embedding.bias.zero_()
    heads = model.heads
    start = 0
    for k in keys:
        width = latents[k].shape[1]
        part = dec[:, start : start + width]  # (embed_dim, L_k)
        head = heads[k]
        assert isinstance(head, torch.nn.Linear)  # head_extra's entries are typed as Module
        head.weight.copy_(part.T)
        head.bias.copy_(mean[start : start + width] - shift @ part)
        start += width
    return {"min_pre_softplus": float((scores + shift).min())}


@torch.no_grad()
def training_latents(
    model: FusionModel, batches: Iterable[FusionPatches]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every sensor's frozen latents (N, L_k) and day gaps (N, T-1) over patch batches (a training split)."""
    zs: dict[str, list[Tensor]] = {k: [] for k in model.sensors}
    gs: dict[str, list[Tensor]] = {k: [] for k in model.sensors}
    for batch in batches:
        inputs = fusion_inputs(batch, model)
        for k, z in model.encode(inputs).items():
            zs[k].append(z)
            gs[k].append(inputs[k].gaps)
    return {k: torch.cat(v) for k, v in zs.items()}, {k: torch.cat(v) for k, v in gs.items()}
