"""Centre pixel-dates trained per second: the per-patch step against the dense (tile) step, same model.

Both steps train the same ``dense``-variant S2 autoencoder (preset and widths from ``--preset``,
the learning fixes on) with the S2 hybrid loss, forward + backward + AdamW, on random data in the
cube's value range:

- per patch: ``--batch`` windows of 11 frames x 47 x 47 px (the encoder's context), one centre
  pixel-date each;
- dense: one tile of ``--crop`` x ``--crop`` centre pixels (+ the 23 px context) over 20 dates with 2
  frame draws; ``--latents`` windows drawn from it, each rendered on its centre frame and on
  average ``--render - 1`` others (a fraction: that share of the windows renders one more).

The steps alternate, after two warm-up steps each; the script prints the median step time, the
centre pixel-dates per second of each and their ratio. Last line: one JSON object.

    .venv/bin/python benchmarks/train_step.py [--preset tiny-dense] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from stembed.config import LEARNING_FIXES, AEConfig, ae_preset, s2_stage1_loss
from stembed.data.tiles import Tiles, TileWindow
from stembed.losses import reconstruction_loss
from stembed.models.autoencoder import SensorAutoencoder
from stembed.runtime import tune_allocator
from stembed.training.dense import autoencoder_step


def main() -> None:
    """Time both steps, alternating, on the same model and data; print their medians, then the JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny-dense")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--latents", type=int, default=512)
    ap.add_argument("--render", type=float, default=3)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    tune_allocator()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = AEConfig(**{**ae_preset(a.preset, "s2").model_dump(), **LEARNING_FIXES})
    if cfg.variant != "dense":
        ap.error(f"--preset must be a dense preset, got {a.preset!r}")
    model = SensorAutoencoder(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_cfg = s2_stage1_loss()
    T, m, P = cfg.n_frames, cfg.context_px, cfg.patch_px

    x_in = torch.rand(a.batch, T, 10, cfg.input_px, cfg.input_px, generator=gen) * 0.4
    x = x_in[..., m - P // 2 : m + P // 2 + 1, m - P // 2 : m + P // 2 + 1]
    valid = torch.ones_like(x, dtype=torch.bool)
    gaps = torch.full((a.batch, T - 1), 5.0)
    D, side = 20, a.crop + 2 * m
    window = TileWindow(
        window=torch.rand(1, D, 10, side, side, generator=gen) * 0.4,
        days=(torch.arange(D, dtype=torch.float32) * 5)[None],
    )
    tile = Tiles(
        sensors={"s2": window},
        subsets=torch.stack([torch.randperm(D, generator=gen)[:T].sort().values for _ in range(2)])[None],
        inside=torch.ones(1, side, side, dtype=torch.bool),
        anchor_key="s2",
    )

    def patch_step() -> int:
        x_hat, _ = model(x_in, gaps)
        loss = reconstruction_loss(x_hat, x, valid, loss_cfg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return a.batch

    def dense_step() -> int:
        step = autoencoder_step(model, tile, loss_cfg, a.latents, a.render, gen)
        if step is None:  # the random tile is observed everywhere, so never
            raise RuntimeError("the tile has no observed centre value")
        opt.zero_grad()
        step.recon.parts["loss"].backward()
        opt.step()
        return step.windows.b.numel()

    times: dict[str, list[float]] = {"per_patch": [], "dense": []}
    counts: dict[str, int] = {}
    for i in range(a.steps + 2):
        for name, step in (("per_patch", patch_step), ("dense", dense_step)):
            t = time.perf_counter()
            counts[name] = step()
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: counts[k] / med[k] for k in med}
    ratio = rate["dense"] / rate["per_patch"]
    for k in med:
        print(f"{k:>9}: {counts[k]:4d} centre pixel-dates per step, median step {med[k]:.3f} s, "
              f"{rate[k]:8.1f} centre pixel-dates/s")
    print(f"dense / per-patch: x{ratio:.1f} centre pixel-dates trained per second ({a.preset}, {torch.get_num_threads()} "
          "threads)")
    print(json.dumps({"preset": a.preset, "median_step_s": med, "pixel_dates_per_step": counts,
                      "pixel_dates_per_s": rate, "ratio": round(ratio, 2), "render_frames": a.render,
                      "latents": a.latents, "crop_px": a.crop, "steps": a.steps}))


if __name__ == "__main__":
    main()
