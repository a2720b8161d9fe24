"""``Bundle.cfg``: one typed shape for autoencoder, fusion and gap-fill bundles, whatever stembed wrote them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stembed.config import AEConfig, FusionConfig, ae_preset, fusion_preset
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import BundleConfig, BundleError, load_bundle, save_bundle
from stembed.models.fusion import FusionModel
from stembed.models.gapfill import GapFillModel
from stembed.sensors import S1, S2

DATA = Path(__file__).parents[1] / "data"
A1, A2, F = ae_preset("tiny", "s1"), ae_preset("tiny", "s2"), fusion_preset("tiny")


def _stage(gap_days: float) -> dict[str, object]:
    return {"stage": "x", "data": {"s1_max_gap_days": gap_days}}


def _save(path: Path, cfg: BundleConfig) -> Path:
    """A bundle file holding ``cfg.to_dict()`` and the (random) weights of the model it describes."""
    fusion = FusionModel({"s1": SensorAutoencoder(A1), "s2": SensorAutoencoder(A2)}, F)
    model = {"autoencoder": SensorAutoencoder(A2), "fusion": fusion, "gapfill": GapFillModel(fusion)}[cfg.kind]
    return save_bundle(path, kind=cfg.kind, sensor="s2" if cfg.kind == "autoencoder" else None, model=model,
                       config=cfg.to_dict(), sensors={"s1": S1, "s2": S2}, provenance={})


def test_an_autoencoder_bundle_reads_as_its_one_model(tmp_path: Path) -> None:
    cfg = BundleConfig(kind="autoencoder", models={"s2": A2}, stage=_stage(3.0))
    b = load_bundle(_save(tmp_path / "ae.pt", cfg))
    assert b.config == {"model": A2.model_dump(mode="json"), "stage": _stage(3.0)}  # the file's layout, unchanged
    assert b.cfg == cfg and b.cfg.fusion_model is None and b.cfg.s1_gap_days == 3.0
    assert isinstance(b.build_model(), SensorAutoencoder)
    with pytest.raises(ValueError, match="no fusion part"):
        b.cfg.fusion_part  # noqa: B018


def test_a_fusion_bundle_is_its_own_fusion_part(tmp_path: Path) -> None:
    cfg = BundleConfig(kind="fusion", models={"s1": A1, "s2": A2}, fusion_model=F, stage=_stage(4.0))
    b = load_bundle(_save(tmp_path / "fusion.pt", cfg))
    assert b.config == {"model": F.model_dump(mode="json"),
                        "models": {"s1": A1.model_dump(mode="json"), "s2": A2.model_dump(mode="json")},
                        "stage": _stage(4.0)}
    assert b.cfg == cfg and b.cfg.fusion_part is b.cfg
    assert b.cfg.s1_gap_days == 4.0 and b.cfg.companions == ()


def test_a_gapfill_bundle_reads_its_fusion_models_and_keeps_both_stages(tmp_path: Path) -> None:
    cfg = BundleConfig(kind="gapfill", models={"s1": A1, "s2": A2}, fusion_model=F, stage=_stage(5.0),
                       fusion_stage=_stage(4.0))
    b = load_bundle(_save(tmp_path / "gapfill.pt", cfg))
    fusion = {"model": F.model_dump(mode="json"),
              "models": {"s1": A1.model_dump(mode="json"), "s2": A2.model_dump(mode="json")}, "stage": _stage(4.0)}
    assert b.config == {"fusion": fusion, "stage": _stage(5.0)}  # nested as stembed has always written it
    assert b.cfg == cfg and list(b.cfg.models) == ["s1", "s2"] and b.cfg.fusion_model == F
    assert b.cfg.s1_gap_days == 5.0  # its own stage's (what embedding uses)
    part = b.cfg.fusion_part
    assert part.kind == "fusion" and part.s1_gap_days == 4.0 and part.to_dict() == fusion
    assert isinstance(b.build_model(), GapFillModel)


def test_old_bundles_read_through_the_typed_config() -> None:
    """Written before sensors were keyed (s1_model/s2_model/extra_models) and before stages were recorded."""
    for name, kind in (("fusion_bundle_main_123f5ca.pt", "fusion"), ("gapfill_bundle_main_123f5ca.pt", "gapfill")):
        cfg = load_bundle(DATA / name).cfg
        assert cfg.kind == kind and list(cfg.models) == ["s1", "s2", "toy"] and cfg.companions == ("toy",)
        assert all(isinstance(m, AEConfig) for m in cfg.models.values()) and isinstance(cfg.fusion_model, FusionConfig)
        assert cfg.models["toy"].sensor == "toy" and cfg.stage == {}
        assert cfg.s1_gap_days == cfg.fusion_part.s1_gap_days == 6.0  # no stage recorded: the default


def test_an_invalid_model_config_is_a_one_line_bundle_error(tmp_path: Path) -> None:
    path = _save(tmp_path / "fusion.pt", BundleConfig(kind="fusion", models={"s1": A1, "s2": A2}, fusion_model=F))
    raw = torch.load(path, weights_only=True)
    raw["config"]["models"]["s1"]["latent_dim"] = "two"
    torch.save(raw, path)
    with pytest.raises(BundleError, match=r"is damaged: its model config is invalid \(1 errors\)") as e:
        load_bundle(path)
    assert "\n" not in str(e.value)
