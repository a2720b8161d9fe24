"""Where does the probe lose? The same blocked probe on the fusion embedding and on the frozen stage-1 latents.

Embeds every pixel-date of a scene store with a fusion bundle three ways: its 7-d embedding, the 11
stage-1 latents it fuses (S2 9 + S1 2, concatenated), and the S2 latent alone; each is probed exactly
like `stembed eval probe` (same pixel-dates, folds and models, `stembed.eval.probe.probe_table`).
If the latents beat PCA-k of the raw bands but the embedding does not, the fusion loses what the
autoencoders kept; if the latents lose too, the autoencoders are the bottleneck. Last line: JSON.

    .venv/bin/python experiments/probe_latents.py --cube runs/belgium/scene.zarr \
        --bundle runs/belgium/fusion/bundle.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from stembed.eval.probe import probe_table
from stembed.inference.engine import embed_any, resolve_device
from stembed.inference.reference import embedding_dataset
from stembed.data.build import matched_s1_arrays, sensor_arrays
from stembed.inference.tiles import _trained_gap_days
from stembed.io.cube import open_scene
from stembed.models.bundle import load_bundle

LABELS = {"LC": (0, 99), "CT": (0,)}


def embed_variants(cube: Path, bundle_path: Path, device: torch.device) -> dict[str, object]:
    """{name: embedding Dataset} for the fusion embedding and the latents it is made from."""
    scene = open_scene(cube)
    bundle = load_bundle(bundle_path, expect_kind="fusion")
    model = bundle.build_model().to(device).eval()
    s2, s1 = sensor_arrays(scene, "s2"), matched_s1_arrays(scene, _trained_gap_days(bundle))
    r = model.s2.cfg.context_px
    pad = ((0, 0), (0, 0), (r, r), (r, r))
    arrays = (np.pad(s2.values, pad, mode="reflect"), np.pad(s1.values, pad, mode="reflect"), s2.days, s1.days)
    valid = np.isfinite(s2.values).any(axis=1)
    fuse, cfg = model.fuse, model.cfg
    variants = {
        "fusion_embedding": (fuse, cfg),
        "latents_s2_s1": (lambda z1, z2, dt1, extra: torch.cat([z2, z1], dim=1),
                          cfg.model_copy(update={"embed_dim": model.s2.cfg.latent_dim + model.s1.cfg.latent_dim})),
        "latent_s2": (lambda z1, z2, dt1, extra: z2, cfg.model_copy(update={"embed_dim": model.s2.cfg.latent_dim})),
    }
    out = {}
    for name, (f, c) in variants.items():
        model.fuse, model.cfg = f, c
        with torch.no_grad():
            values = embed_any(model, *arrays, batch_size=512, device=device, precision="float32")
        out[name] = embedding_dataset(values, valid, scene, bundle)
        print(f"embedded {name}: {values.shape[1]} features", flush=True)
    model.fuse, model.cfg = fuse, cfg
    return {"scene": scene, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cube", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    torch.manual_seed(0)
    v = embed_variants(a.cube, a.bundle, resolve_device(a.device))
    scene = v.pop("scene")
    rows = []
    for label, nodata in LABELS.items():
        for name, ds in v.items():
            res = probe_table(ds, scene.s2, scene.labels, label=label, nodata=nodata)
            t = res.table[res.table["fold"] == "mean"]
            for _, row in t.iterrows():
                fs = name if row["feature_set"] == "embedding" else row["feature_set"]
                if fs == name or name == "fusion_embedding":  # raw rows once, from the first variant
                    rows.append({"label": label, "features": fs, "model": row["model"],
                                 "macro_f1": round(float(row["macro_f1"]), 3)})
    print(f"{'label':<5} {'features':<18} {'model':<20} {'macro-F1':>8}")
    for r in rows:
        print(f"{r['label']:<5} {r['features']:<18} {r['model']:<20} {r['macro_f1']:>8.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
