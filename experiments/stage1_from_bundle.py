"""Write the stage-1 autoencoder bundles a fusion bundle holds, so new fusion layers can train on exactly the
frozen autoencoders of a shipped model without retraining stage 1 (docs/results/context.md, run K).

A fusion bundle keeps every sensor's autoencoder config (``models``) and weights (``autoencoders.<sensor>.*``);
each is written as ``OUT/<sensor>/bundle.pt``, the file ``stembed train s1|s2`` would have written, with a
provenance entry naming the bundle it came from. The scene store the Belgian configs embed is written beside
them with ``--scene``.

    .venv/bin/python experiments/stage1_from_bundle.py pretrained:belgium runs/belgium \\
        --scene ../shared/data/worldcereal_s2_s1_patches/00002806639B424A
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from stembed.config import dump_config
from stembed.io.cube import save_scene
from stembed.io.worldcereal import read_worldcereal
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.bundle import load_bundle, save_bundle
from stembed.pretrained import resolve_bundle


def main() -> None:
    """Write OUT/<sensor>/bundle.pt for every autoencoder of the fusion bundle (and OUT/scene.zarr)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="a fusion bundle (a path or pretrained:NAME)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--scene", type=Path, help="a WorldCereal location folder to write as OUT/scene.zarr")
    args = ap.parse_args()
    fusion = load_bundle(args.bundle, expect_kind="fusion")
    digest = hashlib.sha256(resolve_bundle(args.bundle).read_bytes()).hexdigest()  # the file itself, built-in too
    kept = {k: v for k, v in fusion.provenance.items() if k in ("git_sha", "versions", "data_ids")}
    source = {**kept, "from_bundle": str(args.bundle), "from_bundle_sha256": digest}
    for sensor, cfg in fusion.cfg.models.items():
        model = SensorAutoencoder(cfg)
        prefix = f"autoencoders.{sensor}."
        model.load_state_dict({k[len(prefix):]: v for k, v in fusion.state_dict.items() if k.startswith(prefix)})
        out = save_bundle(args.out / sensor / "bundle.pt", kind="autoencoder", sensor=sensor, model=model,
                          config={"model": dump_config(cfg)}, sensors={sensor: fusion.sensors[sensor]},
                          provenance=source)
        print(f"{sensor}: {out}")
    if args.scene is not None:
        print(f"scene: {save_scene(read_worldcereal(args.scene), args.out / 'scene.zarr')}")


if __name__ == "__main__":
    main()
