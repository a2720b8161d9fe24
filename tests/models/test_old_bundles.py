"""Bundles written before sensors were keyed (main 123f5ca) still load and give the same numbers.

"The same" is up to float32 rounding (rtol 1e-5): torch's CPU kernels sum in an order that depends on the thread
count (the fixture was written with one thread; the suite runs with two), which moves the last bit. A weight or a
key mapped wrongly moves the embedding by far more.

The fixtures in tests/data were written by ``tests/data/make_fixtures_main_123f5ca.py.txt`` run at that commit: a
tiny fusion bundle with a companion sensor (``toy``), a gap-fill bundle on top of it, and the embeddings (and centre
frame reconstructions) they gave a fixed random input. The built-in ``pretrained:belgium-v1`` (the 7-d paper
fusion, shipped from 42a72f9 as ``pretrained:belgium``) is checked against the embedding it gave the same input when
it was shipped (``tests/data/make_belgium_embedding.py.txt``), so work done with it repeats under its versioned
name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stembed.models.bundle import load_bundle
from stembed.models.fusion import FusionModel, SensorInput

DATA = Path(__file__).parents[1] / "data"
SAVED = np.load(DATA / "embeddings_main_123f5ca.npz")


def _same(actual, desired) -> None:
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-6)


def _inputs(model, B=2, seed=1):
    """The fixture script's input: seeded patches and gaps per sensor (drawn in token order), fixed days to the
    S2 date (S1: 2.4 and -3.6, companions: -1.0 and 5.2)."""
    g = torch.Generator().manual_seed(seed)
    days = {"s1": torch.tensor([2.4, -3.6])[:B], "s2": None}
    inputs = {}
    for k, ae in model.autoencoders.items():
        cfg = ae.cfg
        x = torch.randn(B, cfg.n_frames, cfg.in_channels, cfg.input_px, cfg.input_px, generator=g)
        gaps = torch.randint(1, 12, (B, cfg.n_frames - 1), generator=g).float()
        inputs[k] = SensorInput(x, gaps, days.get(k, torch.tensor([-1.0, 5.2])[:B]))
    return inputs


def _embed(model):
    inputs = _inputs(model)
    with torch.no_grad():
        rec, e = model(inputs)
    return e.numpy(), {k: v[:, 2].numpy() for k, v in rec.items()}


def test_an_old_fusion_bundle_gives_its_old_embedding_and_reconstructions():
    model = load_bundle(DATA / "fusion_bundle_main_123f5ca.pt", expect_kind="fusion").build_model()
    e, rec = _embed(model)
    _same(e, SAVED["fusion_embedding"])
    assert list(rec) == ["s1", "s2", "toy"]
    for k in ("s1", "s2", "toy"):
        _same(rec[k], SAVED[f"fusion_decode_{k}"])


def test_an_old_gapfill_bundle_gives_its_old_embeddings():
    model = load_bundle(DATA / "gapfill_bundle_main_123f5ca.pt", expect_kind="gapfill").build_model()
    _same(_embed(model.fusion)[0], SAVED["gapfill_fusion_embedding"])
    _same(_embed(model.filler)[0], SAVED["gapfill_filler_embedding"])


def test_the_versioned_built_in_bundle_gives_its_old_embedding():
    model = load_bundle("pretrained:belgium-v1", expect_kind="fusion").build_model()
    saved = np.load(DATA / "belgium_embedding_42a72f9.npz")  # the bundle shipped in 42a72f9 as pretrained:belgium
    _same(_embed(model)[0], saved["belgium_embedding"])


def test_info_counts_each_sensor_of_an_old_bundle():
    """``stembed info``: each sensor's autoencoder is its own stage-1 part, the rest are the fusion layers."""
    from stembed.describe import describe_bundle

    path = DATA / "fusion_bundle_main_123f5ca.pt"
    counts = describe_bundle(path)["parameters"]
    model = load_bundle(path).build_model()
    assert isinstance(model, FusionModel)
    for k in ("s1", "s2", "toy"):
        assert counts[f"{k}_autoencoder"] == sum(p.numel() for p in model.autoencoder(k).parameters()) > 0
    assert counts["fusion_only"] == counts["fusion"] == sum(p.numel() for p in model.fusion_parameters())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
