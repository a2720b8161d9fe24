"""Patch sampling (spec §1.4) and grouped splits."""

from __future__ import annotations

import numpy as np
import pytest

from stembed.config import SamplingConfig, SplitConfig
from stembed.data.datasets import fill_patch
from stembed.data.sampling import Region, SamplingError, assign_splits, make_regions, sample_patches


def _grid(t: int = 40, h: int = 30, w: int = 30) -> tuple[np.ndarray, np.ndarray]:
    return np.ones((t, h, w), dtype=bool), np.arange(t) * 5


def test_patches_are_sorted_draws_inside_windows_and_region() -> None:
    ok, days = _grid()
    cfg = SamplingConfig()
    patches = sample_patches(ok, days, Region(0, (0, 30), (0, 30)), cfg, np.random.default_rng(0))
    # windows at t0 = 0, 17 (40 - 20 + 1 = 21 starts, stride 17); positions 0, 9 (30 - 15 + 1 = 16, stride 9)
    assert len(patches) == 2 * 2 * 2
    for p in patches:
        f = np.array(p.frames)
        assert len(f) == 11 and np.all(np.diff(f) > 0)
        t0 = 0 if f[0] < 17 else 17
        assert f[0] >= t0 and f[-1] < t0 + 20
        assert p.y0 in (0, 9) and p.x0 in (0, 9)


def test_same_generator_seed_same_patches_and_different_seed_differs() -> None:
    ok, days = _grid()
    r = Region(0, (0, 30), (0, 30))
    a = sample_patches(ok, days, r, SamplingConfig(), np.random.default_rng(1))
    b = sample_patches(ok, days, r, SamplingConfig(), np.random.default_rng(1))
    c = sample_patches(ok, days, r, SamplingConfig(), np.random.default_rng(2))
    assert a == b and a != c


def test_centre_invalid_and_long_span_patches_are_dropped() -> None:
    ok, days = _grid(t=20, h=15, w=15)
    cfg = SamplingConfig()
    ok[:, 7, 7] = False  # the centre pixel is never valid
    assert sample_patches(ok, days, Region(0, (0, 15), (0, 15)), cfg, np.random.default_rng(0)) == []
    ok[:, 7, 7] = True
    long_days = np.arange(20) * 30  # any 11 sorted of 20 dates 30 days apart span >= 300 days
    assert sample_patches(ok, long_days, Region(0, (0, 15), (0, 15)), cfg, np.random.default_rng(0)) == []


def test_block_regions_are_disjoint_and_patches_stay_inside() -> None:
    regions = make_regions([(64, 64)], SplitConfig(by="block", blocks=2), patch_px=15)
    assert [(r.y, r.x) for r in regions] == [((0, 32), (0, 32)), ((0, 32), (32, 64)), ((32, 64), (0, 32)),
                                             ((32, 64), (32, 64))]
    ok, days = _grid(t=20, h=64, w=64)
    for r in regions:
        for p in sample_patches(ok, days, r, SamplingConfig(spatial_stride=2), np.random.default_rng(0)):
            assert r.y[0] <= p.y0 and p.y0 + 15 <= r.y[1] and r.x[0] <= p.x0 and p.x0 + 15 <= r.x[1]


def test_blocks_smaller_than_a_patch_are_refused() -> None:
    with pytest.raises(SamplingError, match="smaller than a 15 px patch; set data.split.blocks lower"):
        make_regions([(40, 40)], SplitConfig(by="block", blocks=3), patch_px=15)


def test_grouped_split_puts_every_group_in_exactly_one_split() -> None:
    groups = assign_splits(10, SplitConfig(fractions=(0.6, 0.2, 0.2), seed=3))
    flat = groups["train"] + groups["val"] + groups["test"]
    assert sorted(flat) == list(range(10))
    assert [len(groups[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert assign_splits(10, SplitConfig(fractions=(0.6, 0.2, 0.2), seed=3)) == groups


def test_too_few_groups_for_a_split_names_the_fix() -> None:
    with pytest.raises(SamplingError, match="set data.split.by=block"):
        assign_splits(2, SplitConfig())


def test_fill_uses_per_band_patch_mean_and_keeps_the_mask() -> None:
    raw = np.full((3, 2, 2, 2), np.nan, dtype=np.float32)
    raw[0, 0, 0, 0], raw[1, 0, 1, 1] = 0.2, 0.4  # band 0: two observations, mean 0.3; band 1: none
    filled, valid = fill_patch(raw)
    assert valid.sum() == 2 and valid[0, 0, 0, 0] and valid[1, 0, 1, 1]
    np.testing.assert_allclose(filled[2, 0], 0.3)
    np.testing.assert_allclose(filled[0, 0, 0, 0], 0.2)
    np.testing.assert_array_equal(filled[:, 1], 0.0)
