"""Tests of the context-aware losses and centre metrics (spec §2)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torchmetrics.functional.image import spectral_angle_mapper, structural_similarity_index_measure

from stembed.config import (
    CompanionLossConfig,
    FusionLossConfig,
    FusionStageConfig,
    LossConfig,
    dump_config,
    load_config,
    s2_stage1_loss,
)
from stembed.losses import (
    centre_mae,
    centre_sam,
    context_weights,
    fusion_loss,
    reconstruction_loss,
    sam_loss,
    spectral_angle,
    ssim_loss,
    ssim_map,
    weighted_masked_mae,
)
from stembed.models.bundle import load_bundle


def _batch(b=2, t=11, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, t, c, 15, 15, generator=g)
    x_hat = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    valid = torch.rand(x.shape, generator=g) > 0.3
    return x_hat, x, valid


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("n_channels", [1, 2, 10])
def test_context_weights_sum_to_one_over_patch(n_channels):
    w = context_weights(n_channels=n_channels)
    assert w.shape == (11, 15, 15) and w.dtype == torch.float32
    assert float(w.sum()) * n_channels == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("centre_weight", "share"), [(1.0, 0.7446), (1.5, 0.8139), (1.75, 0.8361)])
def test_centre_pixel_share(centre_weight, share):
    n_channels = 10
    w = context_weights(centre_weight=centre_weight, n_channels=n_channels).double()
    assert round(float(w[5, 7, 7]) * n_channels, 4) == share


def test_context_weight_rings_and_frames():
    w = context_weights(normalised=False).double()
    assert float(w[5, 7, 7]) == 1.0
    assert float(w[5, 6, 7]) == pytest.approx(1e-2)  # ring 1
    assert float(w[5, 8, 8]) == pytest.approx(1e-2)  # Chebyshev: diagonal is ring 1 too
    assert float(w[5, 5, 9]) == pytest.approx(1e-3)  # ring 2
    assert float(w[5, 0, 14]) == pytest.approx(1e-8)  # ring 7
    assert float(w[4, 7, 7]) == pytest.approx(1e-1)  # one frame away
    assert float(w[0, 7, 8]) == pytest.approx(1e-5 * 1e-2)
    boosted = context_weights(normalised=False, centre_weight=1.5).double()
    assert float(boosted[5, 7, 7]) == 1.5 and float(boosted[4, 7, 7]) == pytest.approx(0.1)
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1)) and torch.equal(w, w.transpose(1, 2))
    slow = context_weights(normalised=False, time_decay=0.5).double()  # time only: space keeps decay 0.1
    assert float(slow[4, 7, 7]) == pytest.approx(0.5) and float(slow[2, 7, 7]) == pytest.approx(0.125)
    assert float(slow[5, 6, 7]) == pytest.approx(1e-2) and float(slow[3, 5, 9]) == pytest.approx(0.25 * 1e-3)


# ----------------------------------------------------------------------------- MAE
def test_weighted_masked_mae_hand_computed():
    # T = 3, H = W = 3, C = 1, B = 2: tiny example with an explicit weight map
    weights = torch.zeros(3, 3, 3)
    weights[1, 1, 1] = 0.5
    weights[0, 0, 0] = 0.25
    weights[2, 2, 2] = 0.25
    x = torch.zeros(2, 3, 1, 3, 3)
    x_hat = torch.zeros(2, 3, 1, 3, 3)
    x_hat[0, 1, 0, 1, 1] = 2.0  # weight 0.5 -> 1.0
    x_hat[0, 0, 0, 0, 0] = -4.0  # weight 0.25 -> 1.0 but masked
    x_hat[1, 2, 0, 2, 2] = 1.0  # weight 0.25 -> 0.25
    x_hat[1, 0, 0, 1, 2] = 9.0  # weight 0
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[0, 0, 0, 0, 0] = False
    x[0, 0, 0, 0, 0] = float("nan")  # masked entries may be NaN
    assert float(weighted_masked_mae(x_hat, x, valid, weights)) == pytest.approx((1.0 + 0.25) / 2)


def test_mae_zero_for_identical_and_gradient_finite_with_nan_gaps():
    x_hat, x, valid = _batch()
    w = context_weights(n_channels=3)
    assert float(weighted_masked_mae(x, x, valid, w)) == 0.0
    x = x.masked_fill(~valid, float("nan"))
    x_hat.requires_grad_(True)
    loss = weighted_masked_mae(x_hat, x, valid, w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x_hat.grad).all()


def test_mae_all_valid_is_weighted_mean_abs_error():
    x_hat, x, _ = _batch(b=3)
    valid = torch.ones_like(x, dtype=torch.bool)
    w = context_weights(n_channels=3)
    expected = ((x_hat - x).abs() * w[:, None]).sum(dim=(1, 2, 3, 4)).mean()
    torch.testing.assert_close(weighted_masked_mae(x_hat, x, valid, w), expected)


# ----------------------------------------------------------------------------- SSIM
def test_ssim_identical_is_one():
    _, x, _ = _batch()
    torch.testing.assert_close(ssim_map(x, x), torch.ones_like(x))
    assert float(ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    x_hat, x, _ = _batch(seed=1)
    assert 0.0 < float(ssim_loss(x_hat, x)) < 2.0


def test_torchmetrics_gaussian_ssim_ignores_kernel_size_and_reflect_pads():
    """Why we do not use torchmetrics: asked for a 7x7 window at sigma 1.5 it uses 11x11, reflect-padded."""
    x_hat, x, _ = _batch(b=1, t=4)
    a, b = x_hat[0], x[0]  # (4, C, 15, 15): frames as images
    _, tm_full = structural_similarity_index_measure(
        a, b, return_full_image=True, gaussian_kernel=True, sigma=1.5, kernel_size=7, data_range=1.0
    )
    assert tm_full.shape == a.shape
    ours_11 = ssim_map(a, b, kernel_size=11, sigma=1.5)
    # 5 px from the border the window never reaches the padding: the formulas agree there
    torch.testing.assert_close(ours_11[..., 5:10, 5:10], tm_full[..., 5:10, 5:10], atol=1e-5, rtol=1e-5)
    # ...but across the patch the spec's 7x7 zero-padded SSIM differs
    assert (ssim_map(a, b) - tm_full).abs().max() > 1e-3


def test_ssim_matches_torchmetrics_interior_for_a_7x7_window():
    x_hat, x, _ = _batch(b=2, t=3)
    a, b = x_hat.flatten(0, 1), x.flatten(0, 1)  # (6, C, 15, 15)
    sigma = 0.9  # torchmetrics sizes its Gaussian window 2 * int(3.5 * sigma + 0.5) + 1 = 7
    _, tm_full = structural_similarity_index_measure(
        a, b, return_full_image=True, gaussian_kernel=True, sigma=sigma, kernel_size=7, data_range=1.0
    )
    ours = ssim_map(a, b, kernel_size=7, sigma=sigma)
    torch.testing.assert_close(ours[..., 3:12, 3:12], tm_full[..., 3:12, 3:12], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- SAM
def test_spectral_angle_proportional_orthogonal_and_torchmetrics():
    x = torch.rand(2, 3, 4, 15, 15) + 0.1
    angle = spectral_angle(2.5 * x, x)
    assert angle.shape == (2, 3, 15, 15)
    assert float(angle.max()) < 1e-3  # floor ~4.9e-4 rad from the gradient-safe clamp
    a = torch.zeros(1, 1, 2, 15, 15)
    b = torch.zeros(1, 1, 2, 15, 15)
    a[:, :, 0] = 1.0
    b[:, :, 1] = 3.0
    torch.testing.assert_close(spectral_angle(a, b), torch.full((1, 1, 15, 15), math.pi / 2))

    x_hat, x, _ = _batch(b=2, t=3, c=5)
    ref = spectral_angle_mapper(x_hat.flatten(0, 1), x.flatten(0, 1), reduction="none")  # (B*T, H, W)
    torch.testing.assert_close(spectral_angle(x_hat, x).flatten(0, 1), ref, atol=1e-5, rtol=1e-5)
    # the channel axis is third from the end, so (N, C, H, W) works too
    flat = spectral_angle(x_hat.flatten(0, 1), x.flatten(0, 1))
    torch.testing.assert_close(flat, ref, atol=1e-5, rtol=1e-5)


def test_spectral_angle_gradient_finite_at_perfect_match():
    x = torch.rand(1, 2, 3, 15, 15) + 0.1
    x_hat = x.clone().requires_grad_(True)
    spectral_angle(x_hat, x).sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all()


def test_sam_loss_ignores_partly_masked_positions():
    w = context_weights(n_frames=3, patch_px=15, normalised=False)
    x = torch.rand(2, 3, 2, 15, 15) + 0.1
    x_hat = x.clone()
    valid = torch.ones_like(x, dtype=torch.bool)
    # ruin one position completely and mask one of its channels: it must not count
    x_hat[0, 1, :, 7, 7] = torch.tensor([1.0, 0.0])
    x[0, 1, :, 7, 7] = torch.tensor([0.0, 1.0])
    valid[0, 1, 1, 7, 7] = False
    assert float(sam_loss(x_hat, x, valid, w)) < 1e-3
    valid[0, 1, 1, 7, 7] = True  # unmasked: weight 1 of total sum 2 * sum(w) -> (pi/2) / (2 * sum(w))
    expected = (math.pi / 2) / (2 * float(w.double().sum()))
    assert float(sam_loss(x_hat, x, valid, w)) == pytest.approx(expected, rel=0.01)


# ----------------------------------------------------------------------------- combined
def test_reconstruction_loss_terms_and_weights():
    x_hat, x, valid = _batch()
    s1 = reconstruction_loss(x_hat, x, valid, LossConfig())
    assert set(s1) == {"loss", "mae"}  # zero-weight terms are skipped
    torch.testing.assert_close(s1["loss"], s1["mae"])
    cfg = s2_stage1_loss()
    parts = reconstruction_loss(x_hat, x, valid, cfg)
    assert set(parts) == {"loss", "mae", "ssim", "sam"}
    expected = cfg.mae * parts["mae"] + cfg.ssim * parts["ssim"] + cfg.sam * parts["sam"]
    torch.testing.assert_close(parts["loss"], expected)
    same = reconstruction_loss(x, x, valid, cfg)
    assert float(same["mae"]) == 0.0 and float(same["ssim"]) == pytest.approx(0.0, abs=1e-6)


def test_fusion_loss_is_weighted_sum_of_branches():
    x1_hat, x1, v1 = _batch(c=2, seed=0)
    x2_hat, x2, v2 = _batch(c=10, seed=1)
    cfg = FusionLossConfig()
    out = fusion_loss({"s1": (x1_hat, x1, v1), "s2": (x2_hat, x2, v2)}, cfg)
    l1 = reconstruction_loss(x1_hat, x1, v1, cfg.s1)["loss"]
    l2 = reconstruction_loss(x2_hat, x2, v2, cfg.s2)["loss"]
    torch.testing.assert_close(out["loss"], 0.5 * l1 + 0.5 * l2)
    torch.testing.assert_close(out["s1/loss"], l1)
    assert {"s2/mae", "s2/ssim", "s2/sam"} <= set(out)


def test_each_companion_sensor_has_its_own_branch_loss():
    cfg = FusionLossConfig.model_validate(
        {"companions": {"agera5": {"mae": 1.0, "centre_weight": 2.0, "weight": 0.25}}, "companion": {"weight": 0.1}}
    )
    assert cfg.branch("agera5") == (CompanionLossConfig(centre_weight=2.0, weight=0.25), 0.25)
    assert cfg.branch("toy") == (CompanionLossConfig(weight=0.1), 0.1)  # not named: the default
    assert cfg.branch("s1") == (cfg.s1, 0.5) and cfg.branch("s2") == (cfg.s2, 0.5)
    xa_hat, xa, va = _batch(c=4, seed=2)
    xt_hat, xt, vt = _batch(c=4, seed=3)
    out = fusion_loss({"agera5": (xa_hat, xa, va), "toy": (xt_hat, xt, vt)}, cfg)
    la = reconstruction_loss(xa_hat, xa, va, LossConfig(centre_weight=2.0))["loss"]
    lt = reconstruction_loss(xt_hat, xt, vt, LossConfig())["loss"]
    torch.testing.assert_close(out["loss"], 0.25 * la + 0.1 * lt)
    with pytest.raises(ValidationError, match="set S1's and S2's branches in loss.s1"):
        FusionLossConfig.model_validate({"companions": {"s1": {}}})
    with pytest.raises(ValidationError, match="loss.companions names \\['toy'\\] but bundles has no such"):
        FusionStageConfig.model_validate({"bundles": {"s1": "a", "s2": "b"}, "loss": {"companions": {"toy": {}}}})


def test_old_companion_loss_keys_load_as_the_default_companion(tmp_path: Path):
    """``extra``/``extra_weight`` (one branch for every companion) load as ``companion``: in YAML configs, in
    overrides of a new config, and in the stage configs saved inside the shipped bundles."""
    old = FusionLossConfig.model_validate({"extra": {"mae": 1.0, "centre_weight": 2.0}, "extra_weight": 0.3})
    assert old == FusionLossConfig(companion=CompanionLossConfig(centre_weight=2.0, weight=0.3))
    assert FusionLossConfig.model_validate({"extra_weight": 0.3}).companion == CompanionLossConfig(weight=0.3)
    assert not {"extra", "extra_weight"} & set(dump_config(old))
    (tmp_path / "old.yaml").write_text("bundles: {s1: a.pt, s2: b.pt}\nloss:\n  extra: {centre_weight: 2.0}\n"
                                       "  extra_weight: 0.3\n")
    assert load_config(FusionStageConfig, tmp_path / "old.yaml").loss == old
    new = load_config(FusionStageConfig, None, ["bundles.s1=a", "bundles.s2=b", "loss.companion.mae=0.5",
                                                "loss.extra_weight=0.3"])
    assert new.loss.companion == CompanionLossConfig(mae=0.5, weight=0.3)
    for name in ("belgium", "belgium-v1"):  # saved with extra/extra_weight at their defaults
        stage = load_bundle(f"pretrained:{name}").cfg.stage
        assert "extra" in stage["loss"]
        assert FusionStageConfig.model_validate(stage).loss.companion == CompanionLossConfig()


# ----------------------------------------------------------------------------- centre metrics
def test_centre_mae_hand_computed_counts_only_valid():
    x = torch.zeros(2, 11, 2, 15, 15)
    x_hat = torch.zeros_like(x)
    valid = torch.ones_like(x, dtype=torch.bool)
    x_hat[0, 5, 0, 7, 7] = 0.4
    x_hat[0, 5, 1, 7, 7] = 0.2
    x_hat[1, 5, 0, 7, 7] = 1.0  # masked below: ignored
    x_hat[1, 5, 1, 7, 7] = 0.6
    x_hat[0, 4, 0, 7, 7] = 5.0  # not the centre frame: ignored
    valid[1, 5, 0, 7, 7] = False
    x[1, 5, 0, 7, 7] = float("nan")
    assert float(centre_mae(x_hat, x, valid)) == pytest.approx((0.4 + 0.2 + 0.6) / 3)
    assert float(centre_mae(x_hat, x, torch.zeros_like(valid))) == 0.0


def test_centre_sam():
    x = torch.rand(3, 11, 4, 15, 15) + 0.1
    x_hat = x.clone()
    valid = torch.ones_like(x, dtype=torch.bool)
    assert float(centre_sam(x_hat, x, valid)) < 1e-3
    x_hat[0, 5, :, 7, 7] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    x[0, 5, :, 7, 7] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert float(centre_sam(x_hat, x, valid)) == pytest.approx((math.pi / 2) / 3, abs=1e-3)
    valid[0, 5, 2, 7, 7] = False  # sample 0 no longer fully valid at the centre
    assert float(centre_sam(x_hat, x, valid)) < 1e-3


def test_sam_gradient_is_finite_where_the_target_spectrum_is_masked_to_zero():
    """Masked targets become zero vectors inside the SAM term; their gradient must stay finite (was NaN)."""
    from stembed.losses import spectral_angle

    x_hat = torch.rand(2, 3, 10, 5, 5, requires_grad=True)
    x = torch.rand(2, 3, 10, 5, 5)
    x[0, :, :, 2, 2] = 0.0
    spectral_angle(x_hat, x).sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all()
