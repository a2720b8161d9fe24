"""The closed-form linear start of the fusion layers (stembed.training.fusion_init)."""

from __future__ import annotations

import pytest
import torch

from stembed.config import FusionStageConfig, ae_preset, fusion_preset
from stembed.models import FusionModel, SensorAutoencoder
from stembed.training.fusion_init import (
    SOFTPLUS_MARGIN,
    centre_jacobian_metric,
    init_linear_fusion,
    linear_fusion,
)


def test_linear_fusion_is_exact_below_its_rank_and_gives_unit_scores():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g) @ torch.randn(3, 6, generator=g) + 2.0  # rank 3 in 6-d
    mean, enc, dec = linear_fusion(z, torch.eye(6), 3)
    scores = (z - mean) @ enc
    torch.testing.assert_close(scores @ dec + mean, z, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.std(0), torch.ones(3), atol=1e-4, rtol=0)


def test_linear_fusion_keeps_the_directions_the_metric_weighs():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 3, generator=g) * torch.tensor([1.0, 3.0, 2.0])  # plain PCA would keep axis 1
    mean, enc, dec = linear_fusion(z, torch.diag(torch.tensor([100.0, 1.0, 1.0])), 1)
    rec = (z - mean) @ enc @ dec + mean
    assert (rec[:, 0] - z[:, 0]).abs().mean() < 0.01  # the heavily weighted axis is kept (up to sample correlation)
    assert (rec[:, 1] - z[:, 1]).abs().mean() > 1.0  # the widest one is dropped


def test_centre_jacobian_metric_matches_finite_differences():
    torch.manual_seed(0)
    ae = SensorAutoencoder(ae_preset("tiny", "s1")).eval()
    z = torch.randn(3, ae.cfg.latent_dim, dtype=torch.float64)
    gaps = torch.full((3, ae.cfg.n_frames - 1), 5.0, dtype=torch.float64)
    ae = ae.double()
    c, t = ae.cfg.patch_px // 2, ae.cfg.n_frames // 2
    eps, cols = 1e-6, []
    for i in range(ae.cfg.latent_dim):
        d = torch.zeros_like(z)
        d[:, i] = eps
        with torch.no_grad():
            diff = ae.decode(z + d, gaps) - ae.decode(z - d, gaps)
        cols.append(diff[:, t, :, c, c] / (2 * eps))  # (N, C)
    jac = torch.stack(cols, dim=2)  # (N, C, L)
    expected = torch.einsum("nci,ncj->ij", jac, jac) / 3
    torch.testing.assert_close(centre_jacobian_metric(ae, z, gaps), expected, rtol=1e-5, atol=1e-9)


def _fusion(preset: str = "tiny") -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(
        {"s1": SensorAutoencoder(ae_preset("tiny", "s1")), "s2": SensorAutoencoder(ae_preset("tiny", "s2"))},
        fusion_preset(preset),
    ).eval()


@pytest.mark.slow
def test_init_linear_fusion_gives_the_pca_reconstruction_of_the_latents():
    model = _fusion()
    g = torch.Generator().manual_seed(2)
    s1, s2 = model.autoencoder("s1"), model.autoencoder("s2")
    n, T = 300, s2.cfg.n_frames
    z = {"s1": torch.randn(n, s1.cfg.latent_dim, generator=g),
         "s2": torch.randn(n, 4, generator=g) @ torch.randn(4, s2.cfg.latent_dim, generator=g)}
    gaps = {k: torch.full((n, T - 1), 5.0) for k in z}
    dt = {"s1": torch.zeros(n)}
    with torch.no_grad():
        before = (model.heads["s2"](model.fuse(z, dt)) - z["s2"]).abs().mean()
    info = init_linear_fusion(model, z, gaps, {"s1": 0.5, "s2": 0.5})
    assert info["min_pre_softplus"] == pytest.approx(SOFTPLUS_MARGIN, abs=1e-4)
    with torch.no_grad():
        e = model.fuse(z, dt)
        rec = {"s1": model.heads["s1"](e), "s2": model.heads["s2"](e)}
    # 7 dimensions hold S1's 2 and S2's rank 4 exactly, up to softplus's bend near its margin
    for k in z:
        assert (rec[k] - z[k]).abs().mean() < 0.02 * z[k].abs().mean()
    assert (rec["s2"] - z["s2"]).abs().mean() < 0.05 * before


def test_linear_start_needs_the_direct_path():
    with pytest.raises(ValueError, match="direct_path"):
        FusionStageConfig(bundles={"s1": "a", "s2": "b"}, preset="paper", init="linear")
    FusionStageConfig(bundles={"s1": "a", "s2": "b"}, preset="tiny", init="linear")
    with pytest.raises(ValueError, match="direct path"):
        init_linear_fusion(_fusion("paper"), {}, {}, {})
