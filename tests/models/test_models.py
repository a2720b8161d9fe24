"""Tests of the autoencoders and the fusion model (spec §3)."""

from __future__ import annotations

import copy

import pytest
import torch

from stembed.config import AEConfig, FusionLossConfig, ae_preset, fusion_preset
from stembed.losses import fusion_loss
from stembed.models import (
    CBAM,
    FusionModel,
    SensorAutoencoder,
    SensorEncoder,
    SensorInput,
    count_parameters,
    positions_from_gaps,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _patches(cfg: AEConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.n_frames, cfg.in_channels, cfg.patch_px, cfg.patch_px, generator=g)
    gaps = torch.randint(1, 15, (batch, cfg.n_frames - 1), generator=g)
    return x, gaps


def _small_models(seed: int = 0, finetune: bool = False) -> FusionModel:
    torch.manual_seed(seed)
    s1 = SensorAutoencoder(ae_preset("small", "s1"))
    s2 = SensorAutoencoder(ae_preset("small", "s2"))
    cfg = fusion_preset("small").model_copy(update={"finetune_autoencoders": finetune})
    return FusionModel({"s1": s1, "s2": s2}, cfg)


def _fusion_batch(model: FusionModel, batch: int, seed: int):
    x1, g1 = _patches(model.autoencoder("s1").cfg, batch, seed)
    x2, g2 = _patches(model.autoencoder("s2").cfg, batch, seed + 1000)
    dt = torch.randint(0, 7, (batch, 1), generator=torch.Generator().manual_seed(seed + 2000))
    return x1, g1, x2, g2, dt


def _inputs(x1, g1, x2, g2, dt) -> dict[str, SensorInput]:
    """S1 and S2 patches, gaps and the S1-S2 day gap as the fusion model's keyed inputs."""
    return {"s1": SensorInput(x1, g1, dt), "s2": SensorInput(x2, g2)}


def _run(model: FusionModel, *batch):
    """``model`` on a :func:`_fusion_batch`: (x1_hat, x2_hat, e)."""
    rec, e = model(_inputs(*batch))
    return rec["s1"], rec["s2"], e


def _embed(model: FusionModel, *batch) -> torch.Tensor:
    return model.embed(_inputs(*batch))


# ----------------------------------------------------------------------------- sizes
def test_paper_parameter_counts_match_spec():
    s1 = SensorAutoencoder(ae_preset("paper", "s1"))
    s2 = SensorAutoencoder(ae_preset("paper", "s2"))
    fused = FusionModel({"s1": s1, "s2": s2}, fusion_preset("paper"))
    n1 = sum(p.numel() for p in s1.parameters())
    n2 = sum(p.numel() for p in s2.parameters())
    counts = count_parameters(fused)
    assert n1 == pytest.approx(3.712e6, rel=0.01)
    assert n2 == pytest.approx(3.726e6, rel=0.01)
    assert counts["fusion"] == pytest.approx(0.314e6, rel=0.01)
    assert counts["s1_autoencoder"] == n1 and counts["s2_autoencoder"] == n2
    assert counts["total"] == n1 + n2 + counts["fusion"]
    assert counts["trainable"] == counts["fusion"]  # frozen by default


def test_count_parameters_parts_are_disjoint_and_shared_counted_once():
    ae = SensorAutoencoder(ae_preset("small", "s2"))
    counts = count_parameters(ae)
    parts = {k: v for k, v in counts.items() if k not in ("total", "trainable")}
    assert set(parts) == {
        "encoder_cnn", "encoder_head", "positions", "temporal", "decoder_head", "decoder_cnn", "centre_io"
    }
    assert sum(parts.values()) == counts["total"] == sum(p.numel() for p in ae.parameters())
    assert sum(v.numel() for v in ae.state_dict().values()) == counts["total"]


def test_state_dict_has_each_shared_weight_once_and_round_trips():
    cfg = ae_preset("small", "s1")
    ae = SensorAutoencoder(cfg).eval()
    keys = list(ae.state_dict())
    assert any(k.startswith("temporal.") for k in keys) and any(k.startswith("positions.") for k in keys)
    assert not any(".temporal." in k or ".positions." in k for k in keys)
    assert ae.encoder.shared.transformer is ae.temporal is ae.decoder.shared.transformer
    other = SensorAutoencoder(cfg).eval()
    other.load_state_dict(ae.state_dict())
    x, g = _patches(cfg, 2, 0)
    with torch.no_grad():
        assert torch.equal(ae(x, g)[0], other(x, g)[0])
    clone = copy.deepcopy(ae)  # sharing survives a deep copy
    assert clone.encoder.shared.transformer is clone.temporal is clone.decoder.shared.transformer


def test_standalone_encoder_owns_its_temporal_parts():
    cfg = ae_preset("small", "s2")
    enc = SensorEncoder(cfg)
    assert any(k.startswith("temporal.") for k in enc.state_dict())
    x, g = _patches(cfg, 2, 0)
    assert enc(x, g).shape == (2, cfg.latent_dim)


def test_cbam_hidden_width_and_residual():
    block = CBAM(16, reduction=8, spatial_kernel=3)
    assert block.channel.mlp[0].out_channels == 2
    assert sum(p.numel() for p in block.parameters()) == 2 * 16 * 2 + 2 * 3 * 3
    x = torch.randn(2, 16, 4, 4)
    assert block(x).shape == x.shape


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("sensor", ["s1", "s2"])
def test_autoencoder_shapes(sensor):
    cfg = ae_preset("small", sensor)
    ae = SensorAutoencoder(cfg)
    x, g = _patches(cfg, 3, 0)
    z = ae.encode(x, g)
    assert z.shape == (3, cfg.latent_dim)
    paper = SensorAutoencoder(ae_preset("paper", sensor).model_copy(update={"stem_channels": 8}))
    assert (paper.encode(*_patches(paper.cfg, 2, 0)) >= 0).all()  # the paper's softplus latent
    assert ae.decode(z, g).shape == x.shape
    x_hat, z2 = ae(x, g)
    assert x_hat.shape == x.shape and z2.shape == z.shape
    x_hat.mean().backward()
    assert all(p.grad is not None for p in ae.parameters())


def test_float_gaps_accepted_and_bad_shapes_rejected():
    cfg = ae_preset("small", "s1")
    ae = SensorAutoencoder(cfg).eval()
    x, g = _patches(cfg, 2, 0)
    with torch.no_grad():
        assert torch.equal(ae.encode(x, g), ae.encode(x, g.float()))
    with pytest.raises(ValueError, match="x must be"):
        ae.encode(x[:, :, :1], g)
    with pytest.raises(ValueError, match="time_gaps"):
        ae.encode(x, g[:, :-1])
    with pytest.raises(ValueError, match="z must be"):
        ae.decode(torch.zeros(2, cfg.latent_dim + 1), g)


def test_fusion_shapes():
    model = _small_models()
    x1, g1, x2, g2, dt = _fusion_batch(model, 3, 0)
    x1_hat, x2_hat, e = _run(model, x1, g1, x2, g2, dt)
    assert x1_hat.shape == x1.shape and x2_hat.shape == x2.shape
    assert e.shape == (3, model.cfg.embed_dim) and (e >= 0).all()
    model.eval()
    with torch.no_grad():  # dt_centre may come as (B, 1), as stored, or (B,)
        e_2d = _embed(model, x1, g1, x2, g2, dt)
        torch.testing.assert_close(e_2d, _embed(model, x1, g1, x2, g2, dt.reshape(-1)))


# ----------------------------------------------------------------------------- time positions
def test_positions_from_gaps_cumulative_and_clamped():
    gaps = torch.tensor([[3, 4, 5], [100, 100, 100]])
    pos = positions_from_gaps(gaps, max_days=200)
    assert pos.tolist() == [[0, 3, 7, 12], [0, 100, 200, 200]]
    assert positions_from_gaps(gaps.float() + 0.2, max_days=200).tolist() == pos.tolist()


def test_latent_depends_on_day_gaps():
    cfg = ae_preset("small", "s2")
    ae = SensorAutoencoder(cfg).eval()
    x, g = _patches(cfg, 2, 0)
    with torch.no_grad():
        z = ae.encode(x, g)
        z_other = ae.encode(x, g + 3)
    assert not torch.allclose(z, z_other)


# ----------------------------------------------------------------------------- batch independence
def _latent_of_first(ae: SensorAutoencoder, patch, gap, mates, mate_gaps) -> torch.Tensor:
    with torch.no_grad():
        return ae.encode(torch.cat([patch, mates]), torch.cat([gap, mate_gaps]))[0]


@pytest.mark.parametrize("sensor", ["s1", "s2"])
def test_latent_does_not_depend_on_batch_mates(sensor):
    cfg = ae_preset("small", sensor)
    torch.manual_seed(0)
    ae = SensorAutoencoder(cfg).eval()
    x, g = _patches(cfg, 1, 0)
    mates_a, gaps_a = _patches(cfg, 5, 1)
    mates_b, gaps_b = _patches(cfg, 5, 2)
    z_a = _latent_of_first(ae, x, g, mates_a, gaps_a)
    z_b = _latent_of_first(ae, x, g, mates_b, gaps_b)
    with torch.no_grad():
        z_alone = ae.encode(x, g)[0]
    torch.testing.assert_close(z_a, z_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(z_a, z_alone, atol=1e-5, rtol=0)


def test_batch_independence_test_catches_the_authors_bug(monkeypatch):
    """Attending across the batch (transpose batch and time around the transformer) must be caught."""
    cfg = ae_preset("small", "s2")
    torch.manual_seed(0)
    ae = SensorAutoencoder(cfg).eval()
    x, g = _patches(cfg, 1, 0)
    mates_a, gaps_a = _patches(cfg, 5, 1)
    mates_b, gaps_b = _patches(cfg, 5, 2)
    from stembed.models import autoencoder
    from stembed.models.layers import run_transformer

    def across_batch(transformer, tokens):  # (B, T, D) -> seen as (T, B, D): attention over B
        return run_transformer(transformer, tokens.transpose(0, 1)).transpose(0, 1)

    monkeypatch.setattr(autoencoder, "run_transformer", across_batch)
    z_a = _latent_of_first(ae, x, g, mates_a, gaps_a)
    z_b = _latent_of_first(ae, x, g, mates_b, gaps_b)
    assert (z_a - z_b).abs().max() > 1e-4


def test_fusion_embedding_does_not_depend_on_batch_mates():
    model = _small_models().eval()
    one = _fusion_batch(model, 1, 0)
    mates_a = _fusion_batch(model, 4, 1)
    mates_b = _fusion_batch(model, 4, 2)
    with torch.no_grad():
        e_a = _embed(model, *[torch.cat([o, m]) for o, m in zip(one, mates_a, strict=True)])[0]
        e_b = _embed(model, *[torch.cat([o, m]) for o, m in zip(one, mates_b, strict=True)])[0]
        e_alone = _embed(model, *one)[0]
    torch.testing.assert_close(e_a, e_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(e_a, e_alone, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- frozen fusion
def test_frozen_fusion_trains_only_fusion_layers():
    model = _small_models(seed=1)
    before_ae = {name: copy.deepcopy(ae.state_dict()) for name, ae in model.autoencoders.items()}
    before_fusion = [p.detach().clone() for p in model.fusion_parameters()]
    model.train()
    assert model.training and model.transformer.training
    s1, s2 = model.autoencoders["s1"], model.autoencoders["s2"]
    assert not any(m.training for m in s1.modules()) and not any(m.training for m in s2.modules())
    assert not any(p.requires_grad for p in model.autoencoders["s1"].parameters())

    opt = torch.optim.AdamW(model.fusion_parameters(), lr=1e-2)
    loss_cfg = FusionLossConfig()
    for step in range(3):
        x1, g1, x2, g2, dt = _fusion_batch(model, 4, step)
        x1_hat, x2_hat, _ = _run(model, x1, g1, x2, g2, dt)
        loss = fusion_loss({"s1": (x1_hat, x1, torch.ones_like(x1, dtype=torch.bool)),
                            "s2": (x2_hat, x2, torch.rand(x2.shape) > 0.2)}, loss_cfg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    for name, ae in model.autoencoders.items():
        after = ae.state_dict()
        assert after.keys() == before_ae[name].keys()
        assert all(torch.equal(after[k], before_ae[name][k]) for k in after)
        assert all(p.grad is None for p in ae.parameters())
    after_fusion = list(model.fusion_parameters())
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before_fusion, after_fusion, strict=True)]
    assert all(changed)
    assert not model.autoencoder("s1").training and not model.autoencoder("s2").decoder.training


def test_finetune_option_trains_everything():
    model = _small_models(finetune=True)
    model.train()
    assert model.autoencoder("s1").training and model.autoencoder("s2").decoder.cnn.training
    assert all(p.requires_grad for p in model.parameters())
    assert count_parameters(model)["trainable"] == count_parameters(model)["total"]
    x1, g1, x2, g2, dt = _fusion_batch(model, 2, 0)
    _run(model, x1, g1, x2, g2, dt)[2].sum().backward()
    cnn = model.autoencoder("s1").encoder.cnn
    assert isinstance(cnn, torch.nn.Sequential)  # the patch variant's frame CNN
    assert cnn[0].weight.grad is not None


def test_dt_centre_is_clamped_to_the_table():
    model = _small_models().eval()
    x1, g1, x2, g2, _ = _fusion_batch(model, 2, 0)
    big = torch.tensor([[10_000], [-10_000]])
    top = torch.full((2, 1), model.cfg.max_pair_gap_days)
    with torch.no_grad():
        torch.testing.assert_close(_embed(model, x1, g1, x2, g2, big), _embed(model, x1, g1, x2, g2, top))


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device(device):
    model = _small_models().to(device).eval()
    batch = [t.to(device) for t in _fusion_batch(model, 2, 0)]
    with torch.no_grad():
        x1_hat, x2_hat, e = _run(model, *batch)
    assert e.device.type == device and torch.isfinite(x2_hat).all()


def test_max_pool3x3_equals_torch_max_pool_bit_for_bit() -> None:
    from stembed.models.layers import max_pool3x3

    g = torch.Generator().manual_seed(0)
    for shape in ((3, 4, 15, 15), (2, 5, 7, 7), (2, 3, 4, 4), (1, 2, 1, 5)):
        x = torch.randn(shape, generator=g)
        x[0, 0, 0, :2] = 7.0  # a tie at the border
        assert torch.equal(max_pool3x3(x), torch.nn.functional.max_pool2d(x, 3, 1, 1)), shape


@pytest.mark.parametrize("norm_first", [False, True])
def test_run_transformer_equals_the_module_in_eval(norm_first):
    """The eval-mode 2-D-matmul path computes what nn.TransformerEncoder computes (float rounding)."""
    from stembed.models.layers import make_transformer, run_transformer

    torch.manual_seed(0)
    tf = make_transformer(64, 8, 16, 3, 0.25, norm_first=norm_first).eval()
    x = torch.randn(37, 11, 64)
    with torch.no_grad():
        torch.testing.assert_close(run_transformer(tf, x), tf(x), rtol=0, atol=2e-5)
    tf.train()
    assert run_transformer(tf, x).requires_grad  # training and grad still go through the module
