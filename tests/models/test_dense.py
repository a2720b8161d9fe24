"""The dense encoder variant: its geometry, dense == per-patch within 1e-4, and its training data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stembed.config import EmbedConfig, ae_preset, dense_geometry, fusion_preset
from stembed.data.datasets import SensorArrays, fold_index
from stembed.inference.blocks import read_block
from stembed.inference.engine import embed_block, embed_block_dense
from stembed.inference.run import embed_cube
from stembed.io.cube import open_scene, save_scene
from stembed.io.embeddings import EmbedError, open_embeddings
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import load_bundle
from stembed.models.dense import DenseFrameCNN
from stembed.models.fusion import FusionModel
from stembed.testing import random_fusion_bundle, synthetic_scene

CPU = torch.device("cpu")


def _dense_model(seed: int = 0, preset: str = "tiny-dense") -> FusionModel:
    torch.manual_seed(seed)
    s1, s2 = SensorAutoencoder(ae_preset(preset, "s1")), SensorAutoencoder(ae_preset(preset, "s2"))
    return FusionModel({"s1": s1, "s2": s2}, fusion_preset(preset)).eval()


def test_geometry_matches_what_the_encoder_reads(one_torch_thread):
    """A pixel changes a token exactly when it lies in the context window dense_geometry says."""
    cfg = ae_preset("tiny-dense", "s2")
    g = dense_geometry(cfg)
    assert cfg.input_px == 2 * g.margin + 1 and g.margin == cfg.context_px
    torch.manual_seed(0)
    ae = SensorAutoencoder(cfg).eval()
    m = g.margin
    size = 2 * m + 1 + 6  # room beyond the window on each side
    base = torch.rand(1, cfg.in_channels, size, size)
    c = size // 2
    i = c - m  # the token of output pixel i is the patch centred on input pixel c
    with torch.no_grad():
        ref = ae.frame_tokens(base)[0, :, i, i]

        def changed(dy: int, dx: int) -> bool:
            """Does any of a few large random changes of pixel (c + dy, c + dx) move the token?"""
            gen = torch.Generator().manual_seed(dy * 100 + dx)
            for _ in range(5):
                x = base.clone()
                x[0, :, c + dy, c + dx] += 5 * torch.randn(cfg.in_channels, generator=gen)
                if not torch.equal(ae.frame_tokens(x)[0, :, i, i], ref):
                    return True
            return False

        reach_right = m - g.unused_right
        # the window is tight: pixels within 3 px of its edges still matter (the max-pools make the exact
        # reach data-dependent: an edge pixel matters only where it wins a max)
        assert any(changed(d, 0) for d in range(-m, -m + 4)) and any(changed(0, d) for d in range(-m, -m + 4))
        assert any(changed(d, 0) for d in range(reach_right - 3, reach_right + 1))
        assert any(changed(0, d) for d in range(reach_right - 3, reach_right + 1))
        # and it is safe: nothing outside it is read, so a tile pass equals the per-patch windows
        assert not changed(-m - 1, 0) and not changed(0, -m - 1)
        assert not changed(reach_right + 1, 0) and not changed(0, reach_right + 1)


def test_training_window_equals_tile_pass(one_torch_thread):
    """frame_tokens of one input_px window == the same pixel's token from a pass over a larger frame."""
    cfg = ae_preset("tiny-dense", "s2")
    torch.manual_seed(1)
    ae = SensorAutoencoder(cfg).eval()
    frames = torch.rand(2, cfg.in_channels, cfg.input_px + 9, cfg.input_px + 5)
    frames[0, :, 10:14, 3:30] = float("nan")  # a cloud: filled per pixel, the same in both passes
    with torch.no_grad():
        dense = ae.frame_tokens(frames)  # (2, d_model, 10, 6)
        for y, x in [(0, 0), (9, 5), (4, 2)]:
            window = frames[:, :, y : y + cfg.input_px, x : x + cfg.input_px]
            torch.testing.assert_close(ae.frame_tokens(window)[:, :, 0, 0], dense[:, :, y, x], rtol=0, atol=1e-6)


def _block_case(model: FusionModel, scene, rows: slice, cols: slice):
    """(s2, s1, s2 days, s1 days) of a block (S1 matched within 6 days)."""
    b = read_block(scene, rows, cols, model.anchor.cfg.context_px, {"s1": 6.0})
    return b["s2"].values, b["s1"].values, b["s2"].days, b["s1"].days


def _block(s2, s1, d2, d1):
    return {"s2": SensorArrays(s2, d2), "s1": SensorArrays(s1, d1)}


def test_dense_equals_per_patch_on_random_weights(one_torch_thread):
    model = _dense_model(seed=2)
    scene = synthetic_scene(seed=3, height_px=26, width_px=27, n_days=50)  # clouds and missing S1 included
    s2, s1, d2, d1 = _block_case(model, scene, slice(0, 26), slice(0, 27))
    dense = embed_block_dense(model, _block(s2, s1, d2, d1), batch_size=128, device=CPU)
    r = model.anchor.cfg.context_px
    # the per-patch reference on a few pixels (corners: reflected context; interior: real context)
    for y, x in [(0, 0), (25, 26), (12, 13)]:
        sub2, sub1, _, _ = _block_case(model, scene, slice(y, y + 1), slice(x, x + 1))
        ref = embed_block(model, _block(sub2, sub1, d2, d1), batch_size=16, device=CPU)[:, :, 0, 0]
        np.testing.assert_array_equal(np.isnan(ref), np.isnan(dense[:, :, y, x]))
        assert np.isfinite(ref).any()
        np.testing.assert_allclose(dense[:, :, y, x], ref, rtol=0, atol=1e-4)
    assert s2.shape[2] == 26 + 2 * r


@pytest.mark.slow
def test_dense_equals_per_patch_on_the_real_patch(belgian_scene, one_torch_thread):
    """Real Belgian data (all 73 dates), random weights: dense == per patch within 1e-4 at 3 pixels."""
    model = _dense_model(seed=4)
    scene = belgian_scene
    height, width = scene.s2.sizes["y"], scene.s2.sizes["x"]
    s2, s1, d2, d1 = _block_case(model, scene, slice(0, 8), slice(width - 8, width))
    dense = embed_block_dense(model, _block(s2, s1, d2, d1), batch_size=256, device=CPU)
    assert np.isfinite(dense).any() and np.isnan(dense).any()  # cloudy dates are skipped, clear ones embedded
    for y, x in [(0, 7), (5, 2)]:
        sub2, sub1, _, _ = _block_case(model, scene, slice(y, y + 1), slice(width - 8 + x, width - 7 + x))
        ref = embed_block(model, _block(sub2, sub1, d2, d1), batch_size=32, device=CPU)[:, :, 0, 0]
        np.testing.assert_array_equal(np.isnan(ref), np.isnan(dense[:, :, y, x]))
        np.testing.assert_allclose(dense[:, :, y, x], ref, rtol=0, atol=1e-4)
    assert height > model.anchor.cfg.context_px


@pytest.fixture(scope="module")
def dense_scene_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    save_scene(synthetic_scene(seed=5, height_px=30, width_px=26, n_days=45), d / "scene.zarr")
    bundle = random_fusion_bundle(d / "dense.pt", seed=6, preset="tiny-dense")
    return d, d / "scene.zarr", bundle


@pytest.mark.slow
def test_embed_cube_dense_tiles_match_one_block(dense_scene_store):
    """`stembed embed` with a dense bundle: tiled output == one dense pass over the whole cube (<= 1e-5)."""
    d, cube, bundle = dense_scene_store
    out = d / "tiled.zarr"
    embed_cube(cube, bundle, out, EmbedConfig(tile_px=16, batch_size=64, workers=2), progress=False)
    ds = open_embeddings(out)
    assert "dense" in str(ds.attrs.get("method"))
    model = load_bundle(bundle).build_model()
    assert isinstance(model, FusionModel)
    scene = open_scene(cube)
    block = read_block(scene, slice(0, 30), slice(0, 26), model.anchor.cfg.context_px, {"s1": 6.0})
    whole = embed_block_dense(model, block, batch_size=64, device=CPU)
    got = ds["embedding"].values
    np.testing.assert_array_equal(np.isnan(got), np.isnan(whole))
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)


def test_half_precision_needs_a_dense_bundle(tmp_path, dense_scene_store):
    _, cube, _ = dense_scene_store
    patch_bundle = random_fusion_bundle(tmp_path / "patch.pt", seed=0, tiny=True)
    with pytest.raises(EmbedError, match="precision 'bfloat16' is for dense bundles"):
        embed_cube(cube, patch_bundle, tmp_path / "o.zarr", EmbedConfig(precision="bfloat16"), progress=False)
    assert not (tmp_path / "o.zarr").exists()


def test_fusion_refuses_mixed_variants():
    s1 = SensorAutoencoder(ae_preset("tiny-dense", "s1"))
    s2 = SensorAutoencoder(ae_preset("tiny", "s2"))
    with pytest.raises(ValueError, match="same variant"):
        FusionModel({"s1": s1, "s2": s2}, fusion_preset("tiny"))


@pytest.mark.parametrize("n", [1, 2, 5, 21])
def test_fold_index_reflects_like_numpy(n):
    """Context windows fold into their region as often as needed, like np.pad(mode='reflect')."""
    lo = 3
    values = np.arange(lo, lo + n)
    pad = 30
    got = fold_index(lo - pad, lo + n + pad, lo, lo + n)
    want = np.pad(values, pad, mode="reflect") if n > 1 else np.full(n + 2 * pad, lo)
    np.testing.assert_array_equal(got, want)


def test_dense_training_windows_stay_in_their_region(one_torch_thread):
    """Stage-1 data for a dense AE: x_in is the input_px window, read only inside the patch's split block."""
    from stembed.config import DataConfig, SamplingConfig, SplitConfig
    from stembed.data.build import build_sensor_data
    from stembed.data.datasets import PatchDataset

    scene = synthetic_scene(seed=7, height_px=40, width_px=40, n_days=80)
    cfg_model = ae_preset("tiny-dense", "s2")
    data_cfg = DataConfig(
        sampling=SamplingConfig(window_dates=12, window_stride=6, spatial_stride=5),
        split=SplitConfig(by="block", blocks=2, fractions=(0.5, 0.25, 0.25), seed=0),
    )
    data = build_sensor_data([scene], "s2", data_cfg, np.random.default_rng(0), context_px=cfg_model.context_px)
    ds = data.datasets["train"]
    assert isinstance(ds, PatchDataset)
    item = ds[0]
    x_in = item.x_in
    assert x_in is not None  # a dense encoder's data carries the wider window
    W = cfg_model.input_px
    assert x_in.shape == (cfg_model.n_frames, cfg_model.in_channels, W, W)
    # the window's centre 15x15 is the patch itself (raw values, NaN where the filled x is masked)
    c = cfg_model.context_px
    core = x_in[:, :, c - 7 : c + 8, c - 7 : c + 8]
    np.testing.assert_array_equal(torch.isnan(core).numpy(), ~item.valid.numpy())
    # every value comes from the patch's own block: mark the rest of the cube and check none leaks in
    p = ds.patches[0]
    assert p.bounds is not None  # a sampled patch knows its split block
    y0, y1, x0, x1 = p.bounds
    marked = ds.sites[p.site].values.copy()
    inside = np.zeros(marked.shape[2:], bool)
    inside[y0:y1, x0:x1] = True
    marked[:, :, ~inside] = 99.0
    from stembed.data.datasets import cut_window

    assert (cut_window(marked, p, 15, c) != 99.0).all()
    # and the autoencoder trains on it: one step moves the weights
    ae = SensorAutoencoder(cfg_model)
    opt = torch.optim.SGD(ae.parameters(), lr=0.1)
    x_hat, _ = ae(x_in[None], item.gaps[None])
    assert x_hat.shape == item.x[None].shape
    cnn = ae.encoder.cnn
    assert isinstance(cnn, DenseFrameCNN)
    stem = cnn.stem[0]
    assert isinstance(stem, torch.nn.Conv2d)
    before = stem.weight.detach().clone()
    (x_hat - item.x[None]).abs()[item.valid[None]].mean().backward()
    opt.step()
    assert not torch.equal(before, stem.weight)


@pytest.mark.slow
@pytest.mark.parametrize("training", ["patches", "tiles"])
def test_dense_stages_train_then_embed(tmp_path, training):
    """Both stages train with the dense variant (per-patch x_in windows, or dense training on tiles),
    stage-1 weights stay bit-identical through fusion, and `stembed embed` takes the dense path with
    the trained bundle."""
    from stembed.config import AEStageConfig, FusionStageConfig
    from stembed.demo import demo_configs
    from stembed.training.run import train_autoencoder, train_fusion

    cfgs = demo_configs(tmp_path, max_epochs=1)

    def dense(cfg, kind):
        d = cfg.model_dump()
        d["preset"] = "tiny-dense"
        d["train"] = {**d["train"], "limit_train_batches": 2, "progress_bar": False}
        d["data"] = {**d["data"], "sampling": {**d["data"]["sampling"], "spatial_stride": 16, "window_stride": 40}}
        if training == "tiles":
            d["dense_training"] = {"crop_px": 12, "latents": 64, "render_frames": 2}
        return kind.model_validate(d)

    s1 = train_autoencoder(dense(cfgs["s1"], AEStageConfig), run_dir=tmp_path / "s1")
    s2 = train_autoencoder(dense(cfgs["s2"], AEStageConfig), run_dir=tmp_path / "s2")
    fusion = train_fusion(dense(cfgs["fusion"], FusionStageConfig), run_dir=tmp_path / "fusion")
    fb = load_bundle(fusion.bundle)
    assert fb.config["models"]["s2"]["variant"] == "dense"
    for key, run in (("s1", s1), ("s2", s2)):
        own = load_bundle(run.bundle).state_dict
        prefix = f"autoencoders.{key}."
        inside = {k.removeprefix(prefix): v for k, v in fb.state_dict.items() if k.startswith(prefix)}
        assert own.keys() == inside.keys() and all(torch.equal(own[k], inside[k]) for k in own)
    assert np.isfinite(fusion.metrics["splits"]["test"]["s2"]["centre_mae"])
    if training == "tiles":
        assert all(r.metrics["data"]["splits"]["train"]["n_tiles"] > 0 for r in (s1, s2, fusion))
        assert np.isfinite(fusion.metrics["splits"]["train"]["s1"]["centre_mae"])  # train metrics stay per patch

    save_scene(synthetic_scene(seed=9, height_px=26, width_px=25, n_days=70), tmp_path / "scene.zarr")
    embed_cube(tmp_path / "scene.zarr", fusion.bundle, tmp_path / "e.zarr", EmbedConfig(tile_px=32), progress=False)
    ds = open_embeddings(tmp_path / "e.zarr")
    assert "dense" in str(ds.attrs.get("method")) and bool(ds["valid"].any())
