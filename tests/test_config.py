"""Configs: every shipped YAML loads, overrides work, bad keys and values get clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stembed.config import (
    PRESETS,
    AEStageConfig,
    ConfigError,
    CubeConfig,
    FusionStageConfig,
    GapFillStageConfig,
    SceneSource,
    SyntheticSource,
    WorldCerealSource,
    ae_preset,
    dump_config,
    fusion_preset,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _stage_config_class(path: Path) -> type[AEStageConfig | FusionStageConfig | GapFillStageConfig]:
    """The stage a shipped config trains, from what it reads: a fusion bundle (gap-fill layers), stage-1 bundles
    (a fusion, context or not), else an autoencoder's data alone."""
    raw = yaml.safe_load(path.read_text())
    if "fusion_bundle" in raw:
        return GapFillStageConfig
    if "bundles" in raw:
        return FusionStageConfig
    return AEStageConfig


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cls = CubeConfig if path.name == "cube.yaml" else _stage_config_class(path)  # cube.yaml: stembed cube's
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


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.max_epochs=0", "train.max_epochs"),  # wrote an untrained bundle with exit 0
        ("train.max_epochs=-1", "train.max_epochs"),  # trained until early stopping
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=-1", "train.lr"),
        ("data.s1_max_gap_days=-2", "data.s1_max_gap_days"),
        ("data.source.height_px=-5", "data.source.synthetic.height_px"),
        ("data.sampling.window_stride=0", "data.sampling.window_stride"),
    ],
)
def test_out_of_range_settings_fail_at_load_on_one_line(override: str, field: str) -> None:
    extra = ["data.source.kind=synthetic"] if override.startswith("data.source") else []
    with pytest.raises(ConfigError, match="greater than") as err:
        load_config(AEStageConfig, None, ["sensor=s2", *extra, override])
    assert field in str(err.value) and "\n" not in str(err.value)


def test_defaults_are_unchanged_by_the_ranges() -> None:
    cfg = load_config(AEStageConfig, None, ["sensor=s2"])
    assert (cfg.train.max_epochs, cfg.train.batch_size, cfg.train.lr) == (500, 16, 1e-4)
    assert isinstance(cfg.data.source, SyntheticSource)
    assert (cfg.data.source.height_px, cfg.data.s1_max_gap_days) == (48, 6.0)


def test_yaml_syntax_error_unknown_preset_and_missing_kind_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML .*line \d+"):
        load_config(AEStageConfig, bad, ["sensor=s2"])
    with pytest.raises(ConfigError, match="unknown preset 'giant'"):
        load_config(AEStageConfig, None, ["sensor=s2", "preset=giant"])
    with pytest.raises(ConfigError, match="unknown preset 'giant'"):
        load_config(FusionStageConfig, None, ["s1_bundle=a", "s2_bundle=b", "preset=giant"])
    with pytest.raises(ConfigError, match="no 'kind' given; set data.source.kind to one of synthetic"):
        load_config(AEStageConfig, None, ["sensor=s2", "data.source.n_sites=2"])


def test_the_validated_preset_names_are_the_ones_the_factories_build() -> None:
    """Config validation and the preset factories share one list of names and one message."""
    for name in PRESETS:
        assert ae_preset(name, "s2").sensor == "s2" and fusion_preset(name).embed_dim == 7
    for factory in (lambda: ae_preset("giant", "s2"), lambda: fusion_preset("giant")):
        with pytest.raises(ValueError, match=f"unknown preset 'giant'; known presets: {', '.join(PRESETS)}$"):
            factory()


def test_relative_paths_in_a_config_file_resolve_from_its_folder(tmp_path: Path, monkeypatch) -> None:
    """A config works from any folder: its paths are read from the file's folder; --set values from the
    current one; absolute paths and names with a scheme (pretrained:belgium) are kept."""
    conf = tmp_path / "project" / "configs"
    conf.mkdir(parents=True)
    (conf / "fusion.yaml").write_text(
        "s1_bundle: ../runs/s1/bundle.pt\n"
        f"s2_bundle: {tmp_path}/abs/bundle.pt\n"
        "extra_bundles: {agera5: pretrained:belgium}\n"
        "data:\n  source: {kind: scene, paths: ['../sites/*.zarr', site9.zarr]}\n"
        "out_dir: ../runs\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(FusionStageConfig, Path("..") / "project" / "configs" / "fusion.yaml")
    project = (tmp_path / "project").resolve()
    assert cfg.bundles["s1"] == str(project / "runs" / "s1" / "bundle.pt")  # the old keys load as bundles
    assert cfg.bundles["s2"] == f"{tmp_path}/abs/bundle.pt"
    assert cfg.companions == {"agera5": "pretrained:belgium"}
    assert isinstance(cfg.data.source, SceneSource)
    assert cfg.data.source.paths == (str(project / "sites" / "*.zarr"), str(project / "configs" / "site9.zarr"))
    assert cfg.out_dir == str(project / "runs")
    over = load_config(FusionStageConfig, conf / "fusion.yaml", ["s1_bundle=mine/bundle.pt"])
    assert over.bundles["s1"] == "mine/bundle.pt"  # typed here, so relative to here


def test_fusion_bundles_are_keyed_by_sensor_and_the_old_keys_still_load(tmp_path: Path, monkeypatch) -> None:
    """``bundles: {s1: ..., s2: ..., <companion>: ...}``; a path in it reads from the file's folder like any path;
    ``s1_bundle``/``s2_bundle``/``extra_bundles`` (the old form) give the same config, and an old key set on a keyed
    config overrides its entry."""
    conf = tmp_path / "configs"
    conf.mkdir()
    (conf / "new.yaml").write_text("bundles: {s1: ../runs/s1.pt, s2: /abs/s2.pt, agera5: pretrained:belgium}\n")
    (conf / "old.yaml").write_text(
        "s1_bundle: ../runs/s1.pt\ns2_bundle: /abs/s2.pt\nextra_bundles: {agera5: pretrained:belgium}\n"
    )
    monkeypatch.chdir(tmp_path)
    new = load_config(FusionStageConfig, conf / "new.yaml")
    assert new.bundles == {"s1": str(tmp_path.resolve() / "runs" / "s1.pt"), "s2": "/abs/s2.pt",
                           "agera5": "pretrained:belgium"}
    assert load_config(FusionStageConfig, conf / "old.yaml") == new
    assert dump_config(new)["bundles"] == new.bundles and "s1_bundle" not in dump_config(new)
    assert load_config(FusionStageConfig, conf / "new.yaml", ["s1_bundle=a.pt"]).bundles["s1"] == "a.pt"
    assert load_config(FusionStageConfig, conf / "new.yaml", ["bundles.s2=b.pt"]).bundles["s2"] == "b.pt"
    with pytest.raises(ConfigError, match="bundles needs the stage-1 bundle of"):
        load_config(FusionStageConfig, None, ["bundles.s1=a.pt"])


def test_shipped_belgian_configs_find_the_shared_data_from_any_folder(
    belgian_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for path in sorted(CONFIGS.glob("belgium_*.yaml")):
        cls = _stage_config_class(path)
        cfg = load_config(cls, path)
        assert isinstance(cfg.data.source, WorldCerealSource)
        (folder,) = cfg.data.source.paths
        assert Path(folder).resolve() == belgian_dir.resolve(), path.name
        assert Path(cfg.out_dir) == CONFIGS.parent / "runs", path.name
