"""Dense training: the tile step computes the per-patch loss of the same windows, and its frame sampling is unbiased."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stembed.config import LEARNING_FIXES, AEConfig, LossConfig, SamplingConfig, ae_preset, s2_stage1_loss
from stembed.data.datasets import PatchDataset, SensorArrays, collate
from stembed.data.sampling import PatchIndex, Region, day_numbers
from stembed.data.tiles import TileDataset, collate_tiles, sample_tiles
from stembed.losses import reconstruction_loss, sam_normaliser, sampled_reconstruction_loss
from stembed.models.autoencoder import SensorAutoencoder
from stembed.testing import synthetic_scene
from stembed.training.dense import autoencoder_step, draw_render_frames


@pytest.fixture(scope="module")
def s2_site() -> SensorArrays:
    cube = synthetic_scene(seed=3, height_px=40, width_px=40, n_days=200).s2
    return SensorArrays(np.ascontiguousarray(cube.values, dtype=np.float32), day_numbers(cube["time"].values))


def _model(**over: object) -> SensorAutoencoder:
    torch.manual_seed(0)
    cfg = AEConfig(**{**ae_preset("tiny-dense", "s2").model_dump(), **LEARNING_FIXES, **over})
    return SensorAutoencoder(cfg)


@pytest.mark.parametrize("loss_cfg", [LossConfig(), s2_stage1_loss(),
                                      s2_stage1_loss().model_copy(update={"time_decay": 0.4, "centre_weight": 1.5})],
                         ids=["mae", "hybrid", "hybrid-time-decay"])
@pytest.mark.slow
def test_dense_loss_equals_the_per_patch_loss_on_the_same_windows(one_torch_thread, s2_site, loss_cfg):
    """Every frame rendered: the tile step's loss is the mean per-patch loss of its windows (same weights)."""
    ae = _model()
    m, T = ae.cfg.context_px, ae.cfg.n_frames
    region = Region(0, (0, 40), (0, 40))
    sampling = SamplingConfig(window_dates=14, window_stride=50)
    tiles = sample_tiles([s2_site.days], [region], sampling, crop_px=10, subsets=2, rng=np.random.default_rng(1))
    # a crop whose every centre's 15 x 15 patch lies inside the region (7 px from its edges)
    tile = next(t for t in tiles if 7 <= t.y0 and t.y0 + 10 <= 33 and 7 <= t.x0 and t.x0 + 10 <= 33)
    item = TileDataset({"s2": [s2_site]}, [tile], sampling.window_dates, 10, m)[0]
    batch = collate_tiles([item])

    step = autoencoder_step(ae, batch, loss_cfg, latents=10_000, render_frames=T,  # every window and frame
                            gen=torch.Generator().manual_seed(0))
    assert step is not None  # centre values are observed
    win, plan, tg, dense = step.windows, step.recon.plan, step.recon.targets, step.recon.parts
    assert win.b.numel() > 50 and plan.latent.numel() == win.b.numel() * T

    # the same windows as per-patch samples, through the per-patch dataset and model call
    assert win.b.unique().tolist() == [0]  # one tile in the batch: every window is its window
    patches = []
    for k, p in zip(win.k.tolist(), win.p.tolist(), strict=True):
        py, px = divmod(p, 10)
        frames = tuple(tile.t0 + f for f in tile.subsets[k])
        patches.append(PatchIndex(0, frames, tile.y0 + py - 7, tile.x0 + px - 7, (0, 40, 0, 40)))
    ds = PatchDataset([s2_site], patches, 15, context_px=m)
    items = [ds[i] for i in range(len(ds))]
    pb = collate(items)
    x_hat_ref, _ = ae(pb.x_in, pb.gaps)
    ref = reconstruction_loss(x_hat_ref, pb.x, pb.valid, loss_cfg)

    torch.testing.assert_close(tg.x[:, 0], pb.x[plan.latent, plan.frame])
    assert torch.equal(tg.valid[:, 0], pb.valid[plan.latent, plan.frame])
    for key in ref:
        torch.testing.assert_close(dense[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("render", [3, 1.4], ids=["two-others", "fraction"])
def test_frame_sampling_is_unbiased(one_torch_thread, render):
    """The centre frame plus drawn others (2 each, or one for 40 % of the patches): the mean of many draws is the
    all-frames loss."""
    torch.manual_seed(0)
    N, T, C, P = 4, 11, 10, 15
    x = torch.rand(N, T, C, P, P) * 0.3
    x_hat = x + 0.05 * torch.randn(N, T, C, P, P)
    valid = torch.rand(N, T, C, P, P) > 0.2
    cfg = s2_stage1_loss()
    total = sam_normaliser(valid.all(dim=2), cfg)

    def loss(plan):
        i, f = plan.latent, plan.frame
        return sampled_reconstruction_loss(
            x_hat[i, f][:, None], x[i, f][:, None], valid[i, f][:, None], cfg, frames=f[:, None],
            scale=plan.scale[:, None], sam_total=total, n_frames=T, n_patches=N,
        )

    exact = loss(draw_render_frames(N, T, T, torch.Generator(), x.device))
    assert torch.allclose(exact["loss"], reconstruction_loss(x_hat, x, valid, cfg)["loss"], rtol=1e-5)
    gen = torch.Generator().manual_seed(1)
    draws: dict[str, list[float]] = {k: [] for k in ("mae", "ssim", "sam")}
    sizes = []
    for _ in range(1500):
        plan = draw_render_frames(N, T, render, gen, x.device)
        assert (plan.latent[:N] == torch.arange(N)).all() and (plan.frame[:N] == T // 2).all()
        assert (plan.frame[N:] != T // 2).all()
        pairs = set(zip(plan.latent.tolist(), plan.frame.tolist(), strict=True))
        assert len(pairs) == plan.latent.numel()  # no frame twice
        sizes.append(plan.latent.numel())
        out = loss(plan)
        for k in draws:
            draws[k].append(float(out[k]))
    assert np.mean(sizes) == pytest.approx(N * render, rel=0.05)
    for k, values in draws.items():
        v = np.asarray(values)
        se = v.std() / np.sqrt(len(v))
        assert abs(v.mean() - float(exact[k])) < 4 * se + 1e-7, (k, v.mean(), float(exact[k]), se)


def test_the_centre_frame_alone_is_refused():
    with pytest.raises(ValueError, match="above 1"):
        draw_render_frames(4, 11, 1, torch.Generator(), torch.device("cpu"))


def test_tiles_are_keyed_by_sensor_and_batch_and_move_like_patches(s2_site):
    """Tile items stack into a batch of the same type, and Lightning's device transfer moves every tensor."""
    from lightning.pytorch.utilities import move_data_to_device

    region = Region(0, (0, 40), (0, 40))
    sampling = SamplingConfig(window_dates=14, window_stride=50)
    tiles = sample_tiles([s2_site.days], [region], sampling, crop_px=10, subsets=2, rng=np.random.default_rng(1))
    ds = TileDataset({"s2": [s2_site], "s1": [s2_site]}, tiles[:2], sampling.window_dates, 10, 3)
    batch = collate_tiles([ds[0], ds[1]])
    assert batch.anchor_key == "s2" and batch.anchor is batch["s2"] and sorted(batch.sensors) == ["s1", "s2"]
    assert batch["s1"].window.shape == (2, 14, s2_site.values.shape[1], 16, 16)
    assert batch["s1"].days.shape == (2, 14) and batch.subsets.shape == (2, 2, sampling.n_frames)
    assert batch.inside.shape == (2, 16, 16) and batch.inside.dtype == torch.bool
    torch.testing.assert_close(batch["s1"].window[1], ds[1]["s1"].window, rtol=0, atol=0, equal_nan=True)
    moved = move_data_to_device(batch, torch.device("meta"))
    assert moved.anchor_key == "s2"
    assert all(t.device.type == "meta" for w in moved.sensors.values() for t in (w.window, w.days))
    assert moved.subsets.device.type == "meta" and moved.inside.device.type == "meta"
    with pytest.raises(ValueError, match="anchor"):
        TileDataset({"s1": [s2_site]}, tiles[:1], sampling.window_dates, 10, 3)
