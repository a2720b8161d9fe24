"""Can seven numbers hold the date *and* its season? A context-aware bound for the 7-d probe target.

`probe_latents.py --joint-pca 7` showed that the best context-free 7-d summary of a pixel-date (PCA-7
of its own S2 + S1 bands) loses to PCA-7 of the S2 bands with the random forest. This asks the next
question without training anything: split the seven numbers between

- ``date``: PCA of the date's own 10 S2 bands,
- ``s1``: PCA of the date's matched S1 bands (a fused embedding must also reconstruct S1), and
- ``season``: PCA of the pixel's 11 scene dates centred on this one (10 bands each, 110 values; cloudy
  dates linearly interpolated along the pixel's own series, series ends clamped: the window the models see),

or (``--joint W``) PCA-7 of the date's S2 bands beside ``W`` times its S1 bands, which turns the S1 share
continuously (W = 1 is `probe_latents.py --joint-pca 7`),

and probe each split exactly like `stembed eval probe` (same pixel-dates, folds and models). Every PCA
is fitted, unsupervised, on the whole region (as the joint bound). If no split beats PCA-7 of the S2
bands, no 7-d embedding built linearly from these parts can; if one does, an objective that asks for those
parts can aim at it. ``--mlp WD,W1,WS`` adds the nonlinear counterpart: a small MLP autoencoder with a 7-d
bottleneck fitted (unsupervised, whole region) to reconstruct the three parts (each feature standardised;
loss weights WD, W1, WS per part), its bottleneck probed the same way. Last line: JSON.

    .venv/bin/python experiments/season_bound.py --cube runs/belgium/scene.zarr \
        --bundle runs/belgium/fusion/bundle.pt --region 0:32,32:64 --block-px 8 --split 4,0,3 --split 4,2,1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from probe_latents import LABELS, crop
from sklearn.decomposition import PCA

from stembed.data.build import matched_s1_arrays, sensor_arrays
from stembed.eval.probe import probe_table
from stembed.inference.reference import embedding_dataset
from stembed.io.cube import open_scene
from stembed.models.bundle import load_bundle

HALF = 5  # dates each side: the models' 11-date window


def fill_series(values: np.ndarray) -> np.ndarray:
    """(T, C, H, W) with NaN dates -> each pixel's series linearly interpolated in time, ends held."""
    t = np.arange(values.shape[0])
    out = values.copy()
    ok = np.isfinite(values).all(axis=1)  # (T, H, W)
    for iy, ix in zip(*np.nonzero(ok.any(axis=0)), strict=True):
        have = ok[:, iy, ix]
        for c in range(values.shape[1]):
            out[:, c, iy, ix] = np.interp(t, t[have], values[have, c, iy, ix])
    return out


def season_windows(values: np.ndarray) -> np.ndarray:
    """(T, C, H, W) filled -> (T, H, W, 11 * C): each date's window of 11 dates, clamped at the ends."""
    n = values.shape[0]
    idx = np.clip(np.arange(n)[:, None] + np.arange(-HALF, HALF + 1)[None], 0, n - 1)  # (T, 11)
    w = values[idx]  # (T, 11, C, H, W)
    return w.transpose(0, 3, 4, 1, 2).reshape(n, *values.shape[2:], -1)


def pca(x: np.ndarray, k: int) -> np.ndarray:
    """PCA-k scores of (N, F) samples, gaps taking the feature mean."""
    x = np.where(np.isfinite(x), x, np.nanmean(x, axis=0))
    return PCA(n_components=k, random_state=0).fit_transform(x)


def part_pcas(parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """PCA-k of each (N, F) part given k > 0 components, side by side."""
    return np.concatenate([pca(x, k) for x, k in parts if k > 0], axis=1)


def joint_pca(date: np.ndarray, radar: np.ndarray, s1_weight: float) -> np.ndarray:
    """PCA-7 of the date's S2 bands beside ``s1_weight`` times its S1 bands."""
    return pca(np.concatenate([date, s1_weight * radar], axis=1), 7)


def mlp_embedding(parts: list[np.ndarray], weights: list[float], k: int, seed: int, steps: int = 3000) -> np.ndarray:
    """(N, k) bottleneck of an MLP autoencoder of the standardised, concatenated ``parts``, each part's squared
    error weighted by its ``weights`` entry (divided by its width, so a weight is per part, not per feature)."""
    x = np.concatenate(parts, axis=1)
    x = np.where(np.isfinite(x), x, np.nanmean(x, axis=0))
    xt = torch.as_tensor((x - x.mean(0)) / x.std(0).clip(1e-6), dtype=torch.float32)  # (N, F)
    w = torch.cat([torch.full((p.shape[1],), wt / p.shape[1]) for p, wt in zip(parts, weights, strict=True)])  # (F,)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # layer initialisation; the batches draw from gen
    f, h = xt.shape[1], 128
    enc = torch.nn.Sequential(torch.nn.Linear(f, h), torch.nn.GELU(), torch.nn.Linear(h, h), torch.nn.GELU(),
                              torch.nn.Linear(h, k))
    dec = torch.nn.Sequential(torch.nn.Linear(k, h), torch.nn.GELU(), torch.nn.Linear(h, h), torch.nn.GELU(),
                              torch.nn.Linear(h, f))
    opt = torch.optim.AdamW([*enc.parameters(), *dec.parameters()], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        b = xt[torch.randint(0, xt.shape[0], (1024,), generator=gen)]
        loss = (((dec(enc(b)) - b) ** 2) * w).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print(f"mlp {weights}: final weighted loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        return enc(xt).numpy()


def linear_recon_mae(emb: np.ndarray, target: np.ndarray) -> float:
    """MAE of the best affine map from ``emb`` (N, k) to the observed values of ``target`` (N, C), in cube units:
    how well a linear decoder could rebuild the date's bands from the candidate (fitted on the same rows)."""
    ok = np.isfinite(target).all(axis=1)
    a = np.concatenate([emb[ok], np.ones((ok.sum(), 1))], axis=1)
    coef = np.linalg.lstsq(a, target[ok], rcond=None)[0]
    return float(np.abs(a @ coef - target[ok]).mean())


def main() -> None:
    """Parse the splits, build the parts once, probe every candidate, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cube", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True, help="a fusion bundle: only its S1 matching gap is used")
    ap.add_argument("--region", default=None, help="y0:y1,x0:x1 (pixels); default: the whole scene")
    ap.add_argument("--block-px", type=int, default=16)
    ap.add_argument("--split", action="append", default=[], metavar="DATE,S1,SEASON",
                    help="components given to the date's S2 bands, its S1 bands and its season, e.g. 4,2,1")
    ap.add_argument("--mlp", action="append", default=[], metavar="WD,W1,WS",
                    help="a 7-d MLP autoencoder of the three parts with these loss weights, e.g. 1,0.5,0.5")
    ap.add_argument("--joint", action="append", type=float, default=[], metavar="W",
                    help="PCA-7 of the date's S2 bands beside W times its S1 bands (cube units): W trades S1 for S2")
    ap.add_argument("--recon-only", action="store_true", help="print each candidate's linear rebuild, skip the probes")
    a = ap.parse_args()
    if not a.split and not a.mlp and not a.joint:
        ap.error("nothing to probe: give at least one --split DATE,S1,SEASON, --joint W or --mlp WD,W1,WS")
    if any(w <= 0 for w in a.joint):
        ap.error(f"--joint takes a positive S1 weight, got {a.joint}")
    mlps = []
    for s in a.mlp:
        try:
            wts = [float(v) for v in s.split(",")]
        except ValueError:
            wts = []
        if len(wts) != 3 or min(wts) < 0 or max(wts) == 0:
            ap.error(f"--mlp takes three non-negative weights WD,W1,WS, not all zero, such as 1,0.5,0.5; got {s!r}")
        mlps.append(wts)
    splits = []
    for s in a.split:
        try:
            kd, k1, ks = (int(v) for v in s.split(","))
        except ValueError:
            ap.error(f"--split takes three integers DATE,S1,SEASON such as 4,2,1; got {s!r}")
        if not (0 <= kd <= 10 and 0 <= k1 <= 2 and ks >= 0 and kd + k1 + ks > 0):
            ap.error(f"--split {s}: DATE takes 0-10 components, S1 0-2, SEASON >= 0, and at least one in all")
        splits.append((kd, k1, ks))

    scene = crop(open_scene(a.cube), a.region)
    labels = scene.labels
    if labels is None and not a.recon_only:
        ap.error(f"{a.cube} holds no labels (LC, CT) to probe; pass a scene store with labels, or --recon-only")
    bundle = load_bundle(a.bundle, expect_kind="fusion")
    s2, s1 = sensor_arrays(scene, "s2"), matched_s1_arrays(scene, bundle.cfg.s1_gap_days)
    valid = np.isfinite(s2.values).all(axis=1)  # (T, H, W)
    date = s2.values.transpose(0, 2, 3, 1)[valid]  # (N, 10)
    radar = s1.values.transpose(0, 2, 3, 1)[valid]  # (N, 2)
    season = season_windows(fill_series(s2.values))[valid]  # (N, 110)
    print(f"{valid.sum()} pixel-dates; season windows of {season.shape[1]} values", flush=True)

    candidates: dict[str, Callable[[], np.ndarray]] = {
        f"date{kd}+s1_{k1}+season{ks}": partial(part_pcas, [(date, kd), (radar, k1), (season, ks)])
        for kd, k1, ks in splits}
    candidates |= {f"joint7,s1x{w:g}": partial(joint_pca, date, radar, w) for w in a.joint}
    candidates |= {"mlp" + ",".join(f"{w:g}" for w in wts): partial(mlp_embedding, [date, radar, season], wts, k=7,
                                                                   seed=0) for wts in mlps}
    rows = []
    for n, (name, make) in enumerate(candidates.items()):
        emb = make()
        recon = {part: linear_recon_mae(emb, x) for part, x in (("s2", date), ("s1", radar))}
        print(f"{name}: date's S2 / S1 rebuilt linearly from it, MAE {recon['s2']:.4f} / {recon['s1']:.4f}",
              flush=True)
        if a.recon_only or labels is None:  # labels are there unless --recon-only (checked above)
            continue
        values = np.full((*valid.shape, emb.shape[1]), np.nan, dtype=np.float32)
        values[valid] = emb
        ds = embedding_dataset(values.transpose(0, 3, 1, 2), valid, scene, bundle)
        for label, nodata in LABELS.items():
            res = probe_table(ds, scene.s2, labels, label=label, nodata=nodata, block_px=a.block_px)
            folds = res.table[res.table["fold"] != "mean"]
            for (fs, model), f1 in folds.groupby(["feature_set", "model"])["macro_f1"]:
                fs = name if fs == "embedding" else fs
                if fs == name or n == 0:
                    rows.append({"label": label, "features": fs, "model": model,
                                 "macro_f1": round(float(f1.mean()), 3), "std": round(float(f1.std()), 3)})
        print(f"probed {name}", flush=True)
    print(f"{'label':<5} {'features':<22} {'model':<20} {'macro-F1':>8} {'± fold std':>10}")
    for r in sorted(rows, key=lambda r: (r["label"], r["model"], r["features"])):
        print(f"{r['label']:<5} {r['features']:<22} {r['model']:<20} {r['macro_f1']:>8.3f} {r['std']:>10.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
