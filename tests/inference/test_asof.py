"""As-of stage-1 latents (stembed.inference.engine.asof_latents): the latents a trailing embedding may read, which
never change when later dates arrive (issue "Monitoring": the building block of a trailing window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stembed.config import ae_preset, fusion_preset
from stembed.data.datasets import SensorArrays
from stembed.inference.blocks import read_block
from stembed.inference.engine import asof_latents, block_latents
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.fusion import FusionModel
from stembed.testing import synthetic_scene

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def case() -> tuple[FusionModel, dict[str, SensorArrays]]:
    torch.manual_seed(4)
    aes = {k: SensorAutoencoder(ae_preset("tiny-dense", k)) for k in ("s1", "s2")}
    model = FusionModel(aes, fusion_preset("tiny-dense")).eval()
    scene = synthetic_scene(seed=5, height_px=4, width_px=5, n_days=90)  # clouds and missing S1 included
    block = read_block(scene, slice(0, 4), slice(0, 5), model.anchor.cfg.context_px, {"s1": 6.0})
    return model, block


def _until(block: dict[str, SensorArrays], n: int) -> dict[str, SensorArrays]:
    """The block as it stood when its first ``n`` S2 dates had arrived."""
    return {k: SensorArrays(a.values[:n], a.days[:n]) for k, a in block.items()}


def test_asof_latents_do_not_change_when_later_dates_arrive(case, one_torch_thread):
    model, block = case
    n_time = block["s2"].days.size
    full = asof_latents(model, block, batch_size=7, device=CPU)
    assert n_time >= 12
    for n in (6, 9, n_time - 1):
        early = asof_latents(model, _until(block, n), batch_size=7, device=CPU)
        for k in full:
            np.testing.assert_array_equal(early[k], full[k][:n])  # bit for bit, NaN where undefined


def test_asof_latents_reflect_at_the_date_and_equal_the_centred_ones_once_the_window_has_passed(case, one_torch_thread):
    model, block = case
    depth = model.anchor.cfg.n_frames // 2
    full = asof_latents(model, block, batch_size=64, device=CPU)
    centred = block_latents(model, block, batch_size=64, device=CPU)
    n_time = block["s2"].days.size
    for k in full:
        assert full[k].shape[:2] == (n_time, depth + 1)
        assert np.isnan(full[k][: depth]).all()  # fewer dates than the window needs to reflect
        assert np.isfinite(full[k][depth:, 0]).all()
        for t in range(depth, n_time):
            # j = depth: the window of date t - depth ends on t, nothing to reflect: the centred latent, bit for bit
            np.testing.assert_array_equal(full[k][t, depth], centred[k][t - depth])
        # the last date as of itself is the centred latent too (the series ends there either way)
        np.testing.assert_array_equal(full[k][-1, 0], centred[k][-1])
        # but a date in the middle, as of itself, reads no later date: it differs from the centred latent
        mid = n_time // 2
        assert not np.allclose(full[k][mid, 0], centred[k][mid], atol=1e-6)
    # the centred latents of an early date change when later dates arrive; the as-of ones did not (above)
    early = block_latents(model, _until(block, 9), batch_size=64, device=CPU)
    assert not np.allclose(early["s2"][8], centred["s2"][8], atol=1e-6)
