"""Per-patch reference embedding: every pixel and date, training semantics, batch-independent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from stembed.config import ae_preset
from stembed.data.build import matched_s1_arrays, sensor_arrays
from stembed.data.datasets import cut_patch, fill_patch
from stembed.data.sampling import PatchIndex
from stembed.data.windows import window_days
from stembed.inference.reference import embed_reference
from stembed.io.cube import Scene
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import Bundle, load_bundle, save_bundle
from stembed.models.fusion import FusionModel, SensorInput
from stembed.sensors import S2
from stembed.testing import random_fusion_bundle, synthetic_scene


def test_window_days_reflect_at_both_ends() -> None:
    days = np.array([0, 5, 10, 20, 30, 35, 50])
    idx, d = window_days(days, 3, 5)
    assert idx.tolist() == [1, 2, 3, 4, 5] and d.tolist() == [5, 10, 20, 30, 35]
    idx, d = window_days(days, 0, 5)  # dates -2, -1 reflect to 2, 1 placed before day 0
    assert idx.tolist() == [2, 1, 0, 1, 2] and d.tolist() == [-10, -5, 0, 5, 10]
    idx, d = window_days(days, 6, 5)  # dates 7, 8 reflect to 5, 4 placed after day 50
    assert idx.tolist() == [4, 5, 6, 5, 4] and d.tolist() == [30, 35, 50, 65, 70]
    with pytest.raises(ValueError, match="needs at least 3 dates"):
        window_days(days[:2], 0, 5)


@pytest.fixture(scope="module")
def scene() -> Scene:
    return synthetic_scene(seed=3, height_px=16, width_px=16, n_days=90)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(random_fusion_bundle(tmp_path_factory.mktemp("b") / "fusion.pt", tiny=True),
                       expect_kind="fusion")


@pytest.fixture(scope="module")
def reference(scene: Scene, bundle: Bundle) -> xr.Dataset:
    return embed_reference(scene, bundle, batch_size=128)


def test_every_pixel_and_date_with_a_valid_centre_gets_an_embedding(scene: Scene, reference: xr.Dataset) -> None:
    ds = reference
    emb, valid = ds["embedding"].values, ds["valid"].values
    centre_ok = np.isfinite(scene.s2.values).any(axis=1)
    assert emb.shape == (scene.s2.sizes["time"], 7, 16, 16)
    np.testing.assert_array_equal(valid, centre_ok)
    assert np.isfinite(emb.transpose(0, 2, 3, 1)[valid]).all() and np.isnan(emb.transpose(0, 2, 3, 1)[~valid]).all()
    # no edge loss: border pixels and the first and last dates are embedded wherever observed
    for t in (0, 1, -2, -1):
        assert valid[t].sum() > 0 and (valid[t] == centre_ok[t]).all()
    assert valid[:, 0, :].any() and valid[:, -1, :].any() and valid[:, :, 0].any() and valid[:, :, -1].any()
    assert ds.attrs["crs"] == scene.s2.attrs["crs"] and list(ds["feature"].values) == [f"E{i}" for i in range(1, 8)]


def test_reference_equals_the_model_on_the_training_patch(
    scene: Scene, bundle: Bundle, reference: xr.Dataset
) -> None:
    ds = reference
    model = bundle.build_model()
    assert isinstance(model, FusionModel)
    s2, s1 = sensor_arrays(scene, "s2"), matched_s1_arrays(scene, 6.0)
    centre_ok = np.isfinite(s2.values).any(axis=1)
    checked = 0
    for t in range(5, s2.values.shape[0] - 5):
        for y, x in ((7, 7), (8, 8)):
            if not centre_ok[t, y, x]:
                continue
            p = PatchIndex(0, tuple(range(t - 5, t + 6)), y - 7, x - 7)
            x2, _ = fill_patch(cut_patch(s2.values, p, 15))
            x1, _ = fill_patch(cut_patch(s1.values, p, 15))
            f = list(p.frames)
            with torch.no_grad():
                e = model.embed({
                    "s1": SensorInput(torch.from_numpy(x1)[None],
                                      torch.from_numpy(np.diff(s1.days[f]).astype(np.float32))[None],
                                      torch.tensor([abs(float(s1.days[t] - s2.days[t]))])),
                    "s2": SensorInput(torch.from_numpy(x2)[None],
                                      torch.from_numpy(np.diff(s2.days[f]).astype(np.float32))[None]),
                })
            np.testing.assert_allclose(ds["embedding"].values[t, :, y, x], e[0].numpy(), atol=1e-6)
            checked += 1
    assert checked >= 4


@pytest.mark.slow
def test_reference_does_not_depend_on_batch_size(scene: Scene, bundle: Bundle, reference: xr.Dataset) -> None:
    a = embed_reference(scene, bundle, batch_size=7)["embedding"].values
    b = reference["embedding"].values
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_autoencoder_bundle_and_foreign_bands_are_refused(scene: Scene, bundle: Bundle, tmp_path: Path) -> None:
    ae = SensorAutoencoder(ae_preset("small", "s2"))
    save_bundle(tmp_path / "ae.pt", kind="autoencoder", sensor="s2", model=ae,
                config={"model": ae.cfg.model_dump(mode="json")}, sensors={"s2": S2}, provenance={})
    with pytest.raises(ValueError, match="needs a fusion bundle"):
        embed_reference(scene, load_bundle(tmp_path / "ae.pt"))
    renamed = Scene(site=scene.site, sensors={"s2": scene.s2, "s1": scene.s1.assign_coords(band=["HH", "HV"])})
    with pytest.raises(ValueError, match=r"s1 cube has bands \['HH', 'HV'\]|HH"):
        embed_reference(renamed, bundle)
