"""Per-patch reference embedding: the trained model evaluated on each pixel-date's own patch.

This is the semantics of training applied to every pixel and date, and the correctness oracle
for any faster path. It is slow by design (one full patch per pixel-date), so use it on small
areas. Edges lose nothing:

- **time**: the window of a date is the ``n_frames`` dates centred on it; past either end of the
  series the dates are *reflected* (frame ``-k`` is date ``k``, placed ``day_k - day_0`` days before
  the first date), so the target date always sits on the centre frame, where the model was trained
  to describe it. Day offsets beyond the model's position table are clamped by the model.
- **space**: patches of border pixels read the cube reflected by ``patch_px // 2`` pixels.

A pixel-date gets an embedding when its S2 centre pixel has at least one valid band (the training
filter); it is NaN elsewhere, with ``valid`` False. Patches are filled exactly as in training (the
per-band mean of the patch's observed values).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from stembed.data.build import matched_s1_arrays, sensor_arrays
from stembed.data.datasets import fill_patch
from stembed.io.cube import Scene
from stembed.models.bundle import Bundle
from stembed.models.fusion import FusionModel
from stembed.types import FEATURE, TIME, X, Y


def window_days(days: np.ndarray, t: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame date indices and frame day numbers of the window centred on ``t``, reflected at both ends."""
    n = len(days)
    half = n_frames // 2
    if n < half + 1:
        raise ValueError(
            f"a window of {n_frames} frames needs at least {half + 1} dates to reflect at the ends; "
            f"the cube has {n}: use a longer period"
        )
    idx, frame_days = [], []
    for o in range(t - half, t + half + 1):
        if o < 0:
            i, d = -o, days[0] - (days[-o] - days[0])
        elif o > n - 1:
            i = 2 * (n - 1) - o
            d = days[-1] + (days[-1] - days[i])
        else:
            i, d = o, days[o]
        idx.append(i)
        frame_days.append(d)
    return np.asarray(idx), np.asarray(frame_days, dtype=np.int64)


def _patches(padded: np.ndarray, frames: np.ndarray, ys: np.ndarray, xs: np.ndarray, p: int) -> np.ndarray:
    """Raw patches ``(N, T, C, p, p)`` whose top-left corners in the padded array are ``(ys, xs)``."""
    block = padded[frames]  # (T, C, H + p - 1, W + p - 1)
    view = np.lib.stride_tricks.sliding_window_view(block, (p, p), axis=(2, 3))  # (T, C, H, W, p, p)
    return np.ascontiguousarray(view[:, :, ys, xs].transpose(2, 0, 1, 3, 4))  # (N, T, C, p, p)


@torch.no_grad()
def embed_reference(
    scene: Scene,
    bundle: Bundle,
    *,
    max_gap_days: float = 6.0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> xr.Dataset:
    """Embed every pixel and S2 date of ``scene`` with the fusion ``bundle``, one patch at a time.

    Returns a Dataset with ``embedding`` ``(time, feature, y, x)`` float32 (NaN where not valid) and
    ``valid`` ``(time, y, x)`` bool, on the S2 cube's grid and dates, with its CRS and transform.
    """
    if bundle.kind != "fusion":
        raise ValueError(f"embedding needs a fusion bundle; {bundle.path} is {bundle.kind} ({bundle.sensor})")
    scene.validate()
    for key, cube in (("s1", scene.s1), ("s2", scene.s2)):
        if tuple(cube["band"].values) != bundle.sensors[key].bands:
            raise ValueError(
                f"the {key} cube has bands {list(cube['band'].values)} but the bundle was trained on "
                f"{list(bundle.sensors[key].bands)}; select them with cube.sel(band=[...])"
            )
    model = bundle.build_model()
    if not isinstance(model, FusionModel):  # pragma: no cover - kind checked above
        raise TypeError("expected a FusionModel")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    n_frames, p = model.s2.cfg.n_frames, model.s2.cfg.patch_px
    s2, s1 = sensor_arrays(scene, "s2"), matched_s1_arrays(scene, max_gap_days)
    r = p // 2
    pad = ((0, 0), (0, 0), (r, r), (r, r))
    s2_pad, s1_pad = np.pad(s2.values, pad, mode="reflect"), np.pad(s1.values, pad, mode="reflect")
    n_time, _, h, w = s2.values.shape
    centre_ok = np.isfinite(s2.values).any(axis=1)  # (time, y, x)
    out = np.full((n_time, model.cfg.embed_dim, h, w), np.nan, dtype=np.float32)
    c = n_frames // 2
    for t in range(n_time):
        ys, xs = np.nonzero(centre_ok[t])
        if ys.size == 0:
            continue
        frames, s2_days = window_days(s2.days, t, n_frames)
        # S1 day of each frame: the matched S1 day, moved like the S2 day when the frame is reflected
        s1_days = s1.days[frames] + (s2_days - s2.days[frames])
        gaps2 = torch.from_numpy(np.diff(s2_days).astype(np.float32))
        gaps1 = torch.from_numpy(np.diff(s1_days).astype(np.float32))
        dt = float(abs(s1_days[c] - s2_days[c]))
        for i in range(0, ys.size, batch_size):
            yb, xb = ys[i : i + batch_size], xs[i : i + batch_size]
            x2, _ = fill_patch(_patches(s2_pad, frames, yb, xb, p))
            x1, _ = fill_patch(_patches(s1_pad, frames, yb, xb, p))
            n = yb.size
            e = model.embed(
                torch.from_numpy(x1).to(dev), gaps1.expand(n, -1).to(dev),
                torch.from_numpy(x2).to(dev), gaps2.expand(n, -1).to(dev),
                torch.full((n,), dt, device=dev),
            )
            out[t, :, yb, xb] = e.float().cpu().numpy()
    return embedding_dataset(out, centre_ok, scene, bundle)


def embedding_dataset(values: np.ndarray, valid: np.ndarray, scene: Scene, bundle: Bundle) -> xr.Dataset:
    """Wrap ``(time, feature, y, x)`` embeddings with the S2 cube's coordinates and georeference."""
    s2 = scene.s2
    features = [f"E{i + 1}" for i in range(values.shape[1])]
    ds = xr.Dataset(
        {
            "embedding": ((TIME, FEATURE, Y, X), values),
            "valid": ((TIME, Y, X), valid & np.isfinite(values).all(axis=1)),
        },
        coords={TIME: s2[TIME].values, FEATURE: features, Y: s2[Y].values, X: s2[X].values},
    )
    ds.attrs.update({
        "crs": s2.attrs["crs"],
        "transform": list(s2.attrs["transform"]),
        "site": scene.site,
        "bundle": str(bundle.path) if bundle.path else "",
        "method": "per-patch reference (stembed.inference.reference)",
    })
    return ds
