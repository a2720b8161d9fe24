"""Per-band input standardisation: stats from the training split only, applied inside the model in cube units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stembed.config import AEConfig, DataConfig, SamplingConfig, SplitConfig, SyntheticSource, ae_preset
from stembed.data.build import band_stats, build_sensor_data
from stembed.data.scenes import load_scenes
from stembed.models.autoencoder import SensorAutoencoder


def test_band_stats_use_only_training_regions() -> None:
    cfg = DataConfig(source=SyntheticSource(n_sites=3, height_px=32, width_px=32), split=SplitConfig(seed=0),
                     sampling=SamplingConfig(window_stride=10, spatial_stride=8))
    scenes = load_scenes(cfg)
    data = build_sensor_data(scenes, "s2", cfg, np.random.default_rng(0))
    mean, std = band_stats(data)
    train_sites = {r.site for r in data.regions["train"]}
    values = np.concatenate([scenes[i].s2.values for i in sorted(train_sites)], axis=0)  # (time, band, y, x)
    np.testing.assert_allclose(mean, np.nanmean(values, axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, np.nanstd(values, axis=(0, 2, 3)), rtol=1e-4)
    everything = np.concatenate([s.s2.values for s in scenes], axis=0)
    assert not np.allclose(mean, np.nanmean(everything, axis=(0, 2, 3)), rtol=1e-5)  # val/test sites left out


def test_standardisation_is_the_affine_map_around_the_same_network() -> None:
    base = ae_preset("small", "s2")
    mean, std = tuple(np.linspace(0.05, 0.3, 10)), tuple(np.linspace(0.02, 0.1, 10))
    plain = SensorAutoencoder(base).eval()
    scaled = SensorAutoencoder(AEConfig.model_validate({**base.model_dump(), "input_mean": mean, "input_std": std}))
    scaled.load_state_dict(plain.state_dict())  # stats are config, not weights: the state dicts match
    scaled.eval()
    x, gaps = torch.rand(2, 11, 10, 15, 15), torch.full((2, 10), 5.0)
    m, s = torch.tensor(mean).reshape(1, 1, -1, 1, 1), torch.tensor(std).reshape(1, 1, -1, 1, 1)
    with torch.no_grad():
        x_hat, z = scaled(x, gaps)
        ref_hat, ref_z = plain(((x - m) / s).float(), gaps)
    torch.testing.assert_close(z, ref_z)
    torch.testing.assert_close(x_hat, (ref_hat * s + m).float())


def test_stats_of_the_wrong_length_are_refused() -> None:
    with pytest.raises(ValueError, match="input_mean has 3 values but in_channels=10"):
        AEConfig.model_validate({**ae_preset("small", "s2").model_dump(), "input_mean": (0.0, 0.0, 0.0)})
