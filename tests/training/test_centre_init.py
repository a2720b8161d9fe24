"""``init: centre_pca``: before any step the autoencoder's latent holds the centre spectrum's principal scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stembed.config import AEConfig, AEStageConfig, ae_preset
from stembed.models.autoencoder import SensorAutoencoder
from stembed.training.centre_init import init_centre_pca


def _spectra(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 10) reflectances on a 9-d affine subspace, so PCA-9 keeps them exactly."""
    fixed = np.random.default_rng(7)
    basis = fixed.normal(size=(9, 10)) * 0.02
    return 0.2 + rng.normal(size=(n, 9)) @ basis


def _model(spectra: np.ndarray, preset: str = "tiny-dense") -> SensorAutoencoder:
    cfg = ae_preset(preset, "s2")
    cfg = AEConfig.model_validate({**cfg.model_dump(), "input_mean": spectra.mean(0).tolist(),
                                   "input_std": spectra.std(0).tolist()})
    torch.manual_seed(0)
    return SensorAutoencoder(cfg).eval()


def _centre_error(model: SensorAutoencoder, rng: np.random.Generator) -> tuple[float, float]:
    """(model's centre MAE, the patch mean's) on patches whose every pixel is a fresh spectrum."""
    cfg = model.cfg
    b, t, p = 16, cfg.n_frames, cfg.input_px
    x = torch.as_tensor(_spectra(b * t * p * p, rng).reshape(b, t, p, p, 10).transpose(0, 1, 4, 2, 3),
                        dtype=torch.float32)
    gaps = torch.full((b, t - 1), 5.0)
    with torch.no_grad():
        x_hat, _ = model(x, gaps)
    c, m = t // 2, p // 2
    target = x[:, c, :, m, m]
    pred = x_hat[:, c, :, cfg.patch_px // 2, cfg.patch_px // 2]
    return float((pred - target).abs().mean()), float((x.mean(dim=(1, 3, 4)) - target).abs().mean())


def test_centre_pca_start_decodes_the_centre_pixel_before_any_step() -> None:
    rng = np.random.default_rng(0)
    train = _spectra(5000, rng)
    untrained = _model(train)
    before, patch_mean = _centre_error(untrained, np.random.default_rng(1))
    model = _model(train)
    info = init_centre_pca(model, train, scale=100.0)
    after, _ = _centre_error(model, np.random.default_rng(1))
    assert info["k"] == 9 and info["n_spectra"] == 5000 and info["pca_centre_mae"] < 1e-6
    assert before > 0.5 * patch_mean  # a random start is no better than the patch mean
    assert after < 0.02 * patch_mean, (after, patch_mean)


def test_centre_pca_start_skips_unobserved_rows_and_refuses_models_without_a_centre_path() -> None:
    train = _spectra(200, np.random.default_rng(0))
    gappy = np.concatenate([train, np.full((50, 10), np.nan)])
    assert init_centre_pca(_model(train), gappy)["n_spectra"] == 200
    with pytest.raises(ValueError, match="centre_path"):
        init_centre_pca(_model(train, preset="paper"), train)
    with pytest.raises(ValueError, match="fully observed"):
        init_centre_pca(_model(train), train[:5])


def test_stage_config_refuses_centre_pca_without_a_centre_path() -> None:
    AEStageConfig(sensor="s2", preset="tiny-dense", init="centre_pca")
    with pytest.raises(ValueError, match="centre_path: true"):
        AEStageConfig(sensor="s2", preset="paper", init="centre_pca")
