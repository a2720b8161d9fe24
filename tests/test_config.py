"""Configs: every shipped YAML loads, overrides work, bad keys and values get clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from stembed.config import (
    AEStageConfig,
    ConfigError,
    FusionStageConfig,
    GapFillStageConfig,
    ae_preset,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cls = GapFillStageConfig if "gapfill" in path.name else FusionStageConfig if "fusion" in path.name else AEStageConfig
    cfg = load_config(cls, path)
    if isinstance(cfg, AEStageConfig):
        assert cfg.resolved_model().sensor == cfg.sensor


def test_dotted_overrides_take_yaml_types() -> None:
    cfg = load_config(AEStageConfig, CONFIGS / "s2_ae.yaml", ["train.lr=1e-3", "train.max_epochs=3",
                                                              "data.split.fractions=[0.6, 0.2, 0.2]"])
    assert cfg.train.lr == 1e-3 and cfg.train.max_epochs == 3 and cfg.data.split.fractions == (0.6, 0.2, 0.2)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.learning_rate: Extra inputs are not permitted"):
        load_config(AEStageConfig, None, ["sensor=s2", "train.learning_rate=1"])


def test_missing_file_and_bad_override_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(AEStageConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(AEStageConfig, None, ["sensor"])


def test_s1_sampling_defaults_follow_the_paper() -> None:
    cfg = load_config(AEStageConfig, None, ["sensor=s1"])
    s = cfg.data.resolved_sampling("s1")
    assert (s.window_dates, s.window_stride, s.spatial_stride) == (40, 40, 15)
    s2 = cfg.data.resolved_sampling("s2")
    assert (s2.window_dates, s2.window_stride, s2.spatial_stride, s2.max_span_days) == (20, 17, 9, 200)


def test_presets_set_the_paper_latent_sizes() -> None:
    assert ae_preset("paper", "s1").latent_dim == 2 and ae_preset("paper", "s2").latent_dim == 9
    assert ae_preset("paper", "s2").reduced_tokens == 6
    with pytest.raises(ValueError, match="known presets"):
        ae_preset("huge", "s2")
