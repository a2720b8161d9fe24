"""The built-in pretrained bundle: listed, described with its model card, small, and it embeds a scene with no training."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from stembed.cli import app
from stembed.config import EmbedConfig
from stembed.inference.run import embed_cube
from stembed.io.cube import save_scene
from stembed.io.embeddings import open_embeddings
from stembed.models.bundle import load_bundle
from stembed.pretrained import PretrainedError, builtin_names, resolve_bundle
from stembed.testing import synthetic_scene


def test_belgium_is_built_in_small_and_a_fusion_bundle():
    assert {"belgium", "belgium-v1"} <= set(builtin_names())
    path = resolve_bundle("pretrained:belgium")
    assert path.is_file() and path.stat().st_size <= 5 * 1024 * 1024
    b = load_bundle("pretrained:belgium", expect_kind="fusion")
    assert list(b.sensors["s2"].bands) == ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    assert b.config["models"]["s2"]["variant"] == "dense"
    assert b.config["model"]["nested"] == [7, 16]  # the context fusion: a 7-d prefix of a 16-d embedding


def test_the_trailing_twin_reads_the_same_inputs_with_the_same_frozen_autoencoders():
    centred, trailing = (load_bundle(f"pretrained:{n}", expect_kind="fusion") for n in ("belgium", "belgium-trailing"))
    assert resolve_bundle("pretrained:belgium-trailing").stat().st_size <= 5 * 1024 * 1024
    assert trailing.cfg.fusion_model is not None and trailing.cfg.fusion_model.trailing
    assert centred.cfg.fusion_model is not None and not centred.cfg.fusion_model.trailing
    assert trailing.config["model"]["nested"] == [7, 16] and trailing.sensors == centred.sensors
    for k, v in centred.state_dict.items():
        if k.startswith("autoencoders."):  # trained on pretrained:belgium's frozen stage 1
            assert torch.equal(trailing.state_dict[k], v), k


def test_info_lists_and_describes_the_built_in_bundles():
    runner = CliRunner()
    listing = runner.invoke(app, ["info"])
    assert listing.exit_code == 0 and "pretrained:belgium" in listing.output
    card = runner.invoke(app, ["info", "pretrained:belgium"])
    assert card.exit_code == 0, card.output
    assert "Not fit for" in card.output and "test block" in card.output
    assert "pretrained:belgium: fusion" in card.output  # the title, not rich's :belgium: emoji
    unknown = runner.invoke(app, ["info", "pretrained:mars"])
    assert unknown.exit_code == 2 and "pretrained:belgium" in unknown.output


def test_unknown_name_names_the_built_ins():
    with pytest.raises(PretrainedError, match="pretrained:belgium"):
        resolve_bundle("pretrained:nowhere")


@pytest.mark.slow
def test_a_new_scene_embeds_with_the_pretrained_bundle_and_no_training(tmp_path):
    scene = synthetic_scene(seed=5, height_px=24, width_px=24, n_days=60)  # the smallest the 23 px halo takes
    save_scene(scene, tmp_path / "scene.zarr")
    embed_cube(tmp_path / "scene.zarr", "pretrained:belgium", tmp_path / "emb.zarr", EmbedConfig(tile_px=24),
               progress=False)
    ds = open_embeddings(tmp_path / "emb.zarr")
    assert bool(ds["valid"].any()) and ds["embedding"].sizes["feature"] == 16
    assert ds.attrs["nested"] == [7, 16]
    first7 = open_embeddings(tmp_path / "emb.zarr", features=7)
    assert first7["embedding"].sizes["feature"] == 7 and first7.attrs["nested"] == [7]
