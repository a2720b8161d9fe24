"""Where does the probe lose? The same blocked probe on the fusion embedding and on the frozen stage-1 latents.

Embeds every pixel-date of a scene store with a fusion bundle three ways: its 7-d embedding, the 11
stage-1 latents it fuses (S2 9 + S1 2, concatenated), and the S2 latent alone; each is probed exactly
like `stembed eval probe` (same pixel-dates, folds and models, `stembed.eval.probe.probe_table`).
If the latents beat PCA-k of the raw bands but the embedding does not, the fusion loses what the
autoencoders kept; if the latents lose too, the autoencoders are the bottleneck. Several ``--bundle``s are
probed on the same pixel-dates. ``--region`` keeps one block of the scene (``y0:y1,x0:x1`` in pixels), e.g.
the validation block of the Belgian configs (``0:32,32:64``) to choose between models without looking at
the test block; ``--block-px`` then sets the probe's CV blocks. Last line: JSON.

    .venv/bin/python experiments/probe_latents.py --cube runs/belgium/scene.zarr \
        --bundle runs/belgium/fusion/bundle.pt [--region 0:32,32:64 --block-px 8]

``--joint-pca 7 --no-latents`` probes only PCA-7 of the date's own S2 + S1 bands: the best a context-free
7-d embedding that reconstructs both sensors' centre pixels could keep.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from sklearn.decomposition import PCA

from stembed.config import FusionConfig
from stembed.data.build import matched_s1_arrays, sensor_arrays
from stembed.data.datasets import SensorArrays
from stembed.eval.probe import probe_table
from stembed.inference.engine import embed_any, resolve_device
from stembed.inference.reference import embedding_dataset
from stembed.io.cube import Scene, open_scene
from stembed.models.bundle import Bundle, load_bundle
from stembed.models.fusion import FusionModel

LABELS = {"LC": (0, 99), "CT": (0,)}
Fuse = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]  # (latents, dt) -> embedding


def crop(scene: Scene, region: str | None) -> Scene:
    """The scene cut to ``y0:y1,x0:x1`` (None: whole)."""
    if region is None:
        return scene
    (y0, y1), (x0, x1) = (map(int, part.split(":")) for part in region.split(","))
    box = {"y": slice(y0, y1), "x": slice(x0, x1)}
    labels = scene.labels.isel(box) if scene.labels is not None else None
    return Scene(site=scene.site, sensors={"s2": scene.s2.isel(box), "s1": scene.s1.isel(box)}, labels=labels)


def embed_variants(scene: Scene, bundle: Bundle, model: FusionModel, device: torch.device) -> dict[str, xr.Dataset]:
    """{name: embedding Dataset} for the fusion embedding and the latents it is made from (``model``: the
    bundle's, on ``device``)."""
    s2, s1 = sensor_arrays(scene, "s2"), matched_s1_arrays(scene, bundle.cfg.s1_gap_days)
    r = model.anchor.cfg.context_px
    pad = ((0, 0), (0, 0), (r, r), (r, r))
    block = {k: SensorArrays(np.pad(a.values, pad, mode="reflect"), a.days) for k, a in (("s2", s2), ("s1", s1))}
    valid = np.isfinite(s2.values).any(axis=1)
    fuse, cfg, aes = model.fuse, model.cfg, model.sensor_autoencoders()
    variants: dict[str, tuple[Fuse, FusionConfig]] = {
        "fusion_embedding": (fuse, cfg),
        "latents_s2_s1": (lambda z, dt: torch.cat([z["s2"], z["s1"]], dim=1),
                          cfg.model_copy(update={"embed_dim": sum(ae.cfg.latent_dim for ae in aes.values())})),
        "latent_s2": (lambda z, dt: z["s2"], cfg.model_copy(update={"embed_dim": aes["s2"].cfg.latent_dim})),
    }
    out = {}
    for name, (f, c) in variants.items():
        model.fuse, model.cfg = f, c  # type: ignore[method-assign,assignment]  # the fusion swapped for a stand-in
        with torch.no_grad():
            values = embed_any(model, block, batch_size=512, device=device, precision="float32")
        out[name] = embedding_dataset(values, valid, scene, bundle)
        print(f"embedded {name}: {values.shape[1]} features", flush=True)
    model.fuse, model.cfg = fuse, cfg  # type: ignore[method-assign]
    return out


def joint_band_pca(scene: Scene, bundle_path: Path, k: int) -> xr.Dataset:
    """PCA-k of the date's own raw S2 bands and matched S1 bands (cube units), as an embedding Dataset.

    What a 7-d embedding that reconstructed the centre pixel perfectly, with no context at all, would keep.
    Fitted on every observed pixel-date of the region (unsupervised; the probe's own PCA of the S2 bands is
    fitted per fold); S1 gaps take the band mean.
    """
    bundle = load_bundle(bundle_path, expect_kind="fusion")
    s2, s1 = sensor_arrays(scene, "s2"), matched_s1_arrays(scene, bundle.cfg.s1_gap_days)
    valid = np.isfinite(s2.values).any(axis=1)  # (T, H, W)
    both = np.concatenate([s2.values, s1.values], axis=1).transpose(0, 2, 3, 1)[valid]  # (N, C2 + C1)
    both = np.where(np.isfinite(both), both, np.nanmean(both, axis=0))
    values = np.full((*valid.shape, k), np.nan, dtype=np.float32)
    values[valid] = PCA(n_components=k, random_state=0).fit_transform(both)
    return embedding_dataset(values.transpose(0, 3, 1, 2), valid, scene, bundle)


def main() -> None:
    """Embed with every bundle given, probe each variant, print the table, then its JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cube", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, action="append", required=True)
    ap.add_argument("--region", default=None, help="y0:y1,x0:x1 (pixels); default: the whole scene")
    ap.add_argument("--block-px", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--joint-pca", type=int, default=None, metavar="K",
                    help="also probe PCA-K of the date's raw S2 + S1 bands (the first bundle's S1 matching)")
    ap.add_argument("--no-latents", action="store_true", help="probe only what --joint-pca adds, not the bundles")
    a = ap.parse_args()
    if a.joint_pca is not None and not 1 <= a.joint_pca <= 12:
        ap.error(f"--joint-pca takes 1 to 12 components (10 S2 + 2 S1 bands), got {a.joint_pca}")
    if a.no_latents and not a.joint_pca:
        ap.error("--no-latents leaves nothing to probe without --joint-pca K; add it, or drop --no-latents")
    torch.manual_seed(0)
    scene = crop(open_scene(a.cube), a.region)
    if scene.labels is None:
        ap.error(f"{a.cube} holds no labels (LC, CT) to probe; pass a scene store with labels")
    device = resolve_device(a.device)
    v: dict[str, xr.Dataset] = {}
    if a.joint_pca is not None:
        v[f"pca{a.joint_pca}_s2_s1_bands"] = joint_band_pca(scene, a.bundle[0], a.joint_pca)
    for i, path in enumerate([] if a.no_latents else a.bundle):
        tag = "" if len(a.bundle) == 1 else f"#{i + 1} "
        bundle = load_bundle(path, expect_kind="fusion")
        model = bundle.build_model()
        if not isinstance(model, FusionModel):
            ap.error(f"{path} is a context fusion bundle; this script probes the paper's fusion model")
        variants = embed_variants(scene, bundle, model.to(device).eval(), device)
        v.update({f"{tag}{k}": ds for k, ds in variants.items()})
    rows = []
    for label, nodata in LABELS.items():
        for n, (name, ds) in enumerate(v.items()):
            res = probe_table(ds, scene.s2, scene.labels, label=label, nodata=nodata, block_px=a.block_px)
            t = res.table[res.table["fold"] == "mean"]
            for _, row in t.iterrows():
                fs = name if row["feature_set"] == "embedding" else row["feature_set"]
                if fs == name or n == 0:  # raw rows once, from the first variant
                    rows.append({"label": label, "features": fs, "model": row["model"],
                                 "macro_f1": round(float(row["macro_f1"]), 3)})
    for i, path in enumerate(a.bundle):
        print(f"#{i + 1}: {path}")
    print(f"{'label':<5} {'features':<22} {'model':<20} {'macro-F1':>8}")
    for r in rows:
        print(f"{r['label']:<5} {r['features']:<22} {r['model']:<20} {r['macro_f1']:>8.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
