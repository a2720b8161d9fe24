"""A closed-form start for a stage-1 autoencoder's centre path: PCA of the training centre spectra.

Trained from a random start, the Belgian S2 autoencoder's 9-d latent keeps the centre spectrum with
validation MAE 0.0044 where PCA-9 of the spectrum keeps it with 0.0009 (docs/results/models-that-learn.md),
and a 7-d fusion of that latent then holds less of the date's spectrum than PCA-7 of the bands. This
start writes PCA-``latent_dim`` of the standardised centre spectra into the centre path
(``AEConfig.centre_path``), so before any step the latent *is* the centre spectrum's principal scores
and the centre pixel is decoded from them; training then adds the context.

How, with ``a = scale``: the encoder's centre map writes ``a * PCA scores`` into the first
``latent_dim`` channels of every date's token, where the pre-norm temporal transformer passes them on
through its residual stream (its updates are O(1), so O(1/a) against the scores); the latent head
reads them back divided by ``a`` and its paper path starts at zero. The decoder's centre map writes
``a * z`` into the centre date's token and its centre output reads ``PCA reconstruction / a`` from it;
the decoder CNN's last layer starts at zero, so the rest of the patch starts at the band means.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import nn

from stembed.models.autoencoder import SensorAutoencoder

SCALE = 30.0  # the scores' share of the residual stream against the O(1) paths beside them (AEStageConfig.init_scale)


@torch.no_grad()
def init_centre_pca(model: SensorAutoencoder, spectra: np.ndarray, scale: float = SCALE) -> dict[str, Any]:
    """Start ``model``'s centre path at PCA-``latent_dim`` of ``spectra`` (N, C) in cube units (fully observed rows).

    Returns the start's facts for the run's metrics: rows used, explained variance, and the PCA's own centre MAE
    on those rows (cube units), the figure the start begins near.
    """
    cfg = model.cfg
    k, d = cfg.latent_dim, cfg.d_model
    enc_in, dec_in, dec_out = model.encoder.centre_in, model.decoder.centre_in, model.decoder.centre_out
    head = model.encoder.head
    if enc_in is None or dec_in is None or dec_out is None or head.centre is None:
        raise ValueError("init: centre_pca needs a model with centre_path: true (the small and tiny presets)")
    if cfg.latent_activation != "identity":
        raise ValueError("init: centre_pca needs latent_activation: identity (PCA scores are signed)")
    if k > min(d, cfg.in_channels):
        raise ValueError(f"init: centre_pca needs latent_dim ({k}) <= d_model ({d}) and <= bands ({cfg.in_channels})")
    rows = spectra[np.isfinite(spectra).all(axis=1)]
    if rows.shape[0] <= k:
        raise ValueError(f"init: centre_pca needs more than {k} fully observed training spectra, got {rows.shape[0]}")
    mean = model.input_mean.flatten().double().numpy()
    std = model.input_std.flatten().double().numpy()
    s = (rows - mean) / std  # (N, C) model units
    pca = PCA(n_components=k, random_state=0).fit(s)
    v = torch.as_tensor(pca.components_, dtype=torch.float32)  # (k, C)
    mu = torch.as_tensor(pca.mean_, dtype=torch.float32)  # (C,)

    # encoder: token[:k] += a * V (s - mu); latent = token[:k] / a, the paper's head path from zero
    enc_in.weight[:k] = scale * v
    enc_in.bias[:k] = -scale * (v @ mu)
    head.centre.weight.zero_()
    head.centre.weight[:, :k] = torch.eye(k) / scale
    head.centre.bias.zero_()
    nn.init.zeros_(head.to_latent.weight)
    nn.init.zeros_(head.to_latent.bias)
    # decoder: centre token[:k] += a * z; centre pixel = mu + V^T token[:k] / a; the CNN's last layer from zero
    dec_in.weight.zero_()
    dec_in.weight[:k] = scale * torch.eye(k)
    dec_in.bias.zero_()
    dec_out.weight.zero_()
    dec_out.weight[:, :k] = v.T / scale
    dec_out.bias.copy_(mu)
    last = [m for m in model.decoder.cnn.modules() if isinstance(m, nn.Conv2d)][-1]
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)

    rec = pca.inverse_transform(pca.transform(s)) * std + mean
    return {
        "n_spectra": int(rows.shape[0]),
        "k": k,
        "explained_variance": float(pca.explained_variance_ratio_.sum()),
        "pca_centre_mae": float(np.abs(rec - rows).mean()),
        "scale": scale,
    }
