"""A table of user mistakes run through the command line (issue 14).

Each case asserts: exit status 2, one error line naming the problem, no traceback, every file that
was there before unchanged (content hashes of the whole working folder), and nothing new left behind.
Run them with ``pytest tests/test_cli_errors.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from stembed.cli import app
from stembed.config import EmbedConfig
from stembed.inference.plan import plan_embedding
from stembed.io.cube import save_scene
from stembed.testing import random_fusion_bundle, synthetic_scene, write_embedding_store

runner = CliRunner()


# ----------------------------------------------------------------------------- the inputs around every case
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid inputs (scene, fusion bundle, embedding store, points, a finished run) plus broken ones."""
    w = tmp_path_factory.mktemp("world")
    scene = synthetic_scene(seed=0, height_px=16, width_px=16, n_days=200)
    save_scene(scene, w / "scene.zarr")
    random_fusion_bundle(w / "fusion.pt", tiny=True)
    raw = torch.load(w / "fusion.pt", weights_only=True)
    torch.save({k: v for k, v in raw.items() if k != "state_dict"}, w / "no_weights.pt")
    name = next(k for k, v in raw["state_dict"].items() if v.ndim >= 2)
    raw["state_dict"][name] = torch.zeros(3, 3)
    torch.save(raw, w / "wrong_shape.pt")
    raw = torch.load(w / "fusion.pt", weights_only=True)
    del raw["config"]["models"]["s2"]
    torch.save(raw, w / "no_model_config.pt")
    save_scene(scene, w / "nan_scene.zarr")  # then its S2 all missing (a store edited, or a masking gone wrong)
    zarr.open_array(w / "nan_scene.zarr" / "s2" / "s2", mode="r+")[...] = np.nan
    random_fusion_bundle(w / "fusion_b.pt", tiny=True, seed=1)
    s2 = scene.s2
    n_t, h, wd = s2.sizes["time"], s2.sizes["y"], s2.sizes["x"]
    values = np.random.default_rng(0).normal(size=(n_t, 7, h, wd)).astype(np.float32)
    write_embedding_store(w / "emb.zarr", s2, values, valid=np.ones((n_t, h, wd), bool), tile_px=8, time_chunk=4,
                          attrs={"fingerprint": "test"})
    plan = plan_embedding(w / "scene.zarr", w / "fusion.pt", EmbedConfig(), scheduler=None)  # as `embed` records
    write_embedding_store(w / "made.zarr", s2, values, valid=np.ones((n_t, h, wd), bool), tile_px=8, time_chunk=4,
                          attrs={"fingerprint": plan.fingerprint})
    x0, y0 = float(s2["x"].values[8]), float(s2["y"].values[8])
    (w / "points.csv").write_text(f"id,x,y\na,{x0},{y0}\n")
    (w / "table.csv").write_text("someone's table\n")
    (w / "notes.txt").write_text("a plain file\n")
    foreign = w / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work\n")
    (foreign / "data.csv").write_text("1,2,3\n")
    (w / "bad.yaml").write_text("train:\n  lr: [1e-3\n")
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "s1.yaml").write_text("sensor: s1\n")
    (w / "giant.yaml").write_text("preset: giant\n")
    (w / "not_a_bundle.pt").write_text("hello\n")
    run = w / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"stage": "s2", "splits": {}}))
    corrupt = w / "corrupt_run"
    corrupt.mkdir()
    (corrupt / "metrics.json").write_text('{"stage": "s2", "splits": {')
    (w / "empty_run").mkdir()
    (w / "flux_empty.csv").write_text("")
    (w / "flux_header.csv").write_text("TIMESTAMP,GPP_NT_VUT_REF,NEE_VUT_REF_QC\n")
    header = "TIMESTAMP,GPP_NT_VUT_REF,NEE_VUT_REF_QC\n"
    (w / "flux_baddate.csv").write_text(header + "20200101,1.0,1.0\n20201341,2.0,1.0\n")
    (w / "flux_nocols.csv").write_text("TIMESTAMP,GPP\n20200101,1.0\n")
    days = np.arange(np.datetime64("2020-01-01"), np.datetime64("2021-01-01"))
    rows = "".join(f"{str(d).replace('-', '')},{5 + np.sin(i / 30):.3f},1.0\n" for i, d in enumerate(days))
    (w / "flux_2020.csv").write_text("TIMESTAMP,GPP_NT_VUT_REF,NEE_VUT_REF_QC\n" + rows)
    (w / "flux_text.csv").write_text("TIMESTAMP,GPP_NT_VUT_REF,NEE_VUT_REF_QC\n20200101,lots,1.0\n")
    return w


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> content hash (``dir`` for folders) of everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Path, Path], list[str]]  # (world, scratch) -> argv; write outputs under scratch
    expect: str  # a piece of the message that names the problem
    setup: Callable[[Path], None] | None = None  # prepares scratch (e.g. a foreign folder at --out)
    xfail: str | None = None  # a known gap: why it still fails (strict, so a fix is noticed)
    forbid: str | None = None  # a piece the message must not hold (e.g. a setting that does not differ)


def _foreign_folder(scratch: Path, name: str = "out") -> None:
    (scratch / name).mkdir()
    (scratch / name / "precious.txt").write_text("not stembed's\n")


def _own_config(scratch: Path, name: str = "out") -> None:
    (scratch / name).mkdir()
    (scratch / name / "config.yaml").write_text("train:\n  lr: 0.001\n")


def _plain_file(scratch: Path, name: str = "out") -> None:
    (scratch / name).write_text("not stembed's\n")


def _with(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


W = "{w}"  # placeholders are filled per case
SYN = "data.source.kind=synthetic"
CUBE_ARGS = ["--bbox", "3.00", "50.80", "3.01", "50.81", "--start", "2020-03-01", "--end", "2020-10-31",
             "--catalog", "http://127.0.0.1:9/", "--retries", "0", "--quiet"]


def _train(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda w, s: ["train", "s2", *extra, "--set", f"out_dir={s / 'runs'}"]


def _embed(w: Path, s: Path, *extra: str, out: str = "emb.zarr") -> list[str]:
    return ["embed", "--cube", str(w / "scene.zarr"), "--bundle", str(w / "fusion.pt"), "--out", str(s / out),
            "--quiet", *extra]


def _cube(out: Path, *extra: str) -> list[str]:
    return ["cube", *CUBE_ARGS, "--out", str(out), *extra]


def _embed_with(w: Path, s: Path, cube: str = "scene.zarr", bundle: str = "fusion.pt") -> list[str]:
    return ["embed", "--cube", str(w / cube), "--bundle", str(w / bundle), "--out", str(s / "e.zarr")]


def _sample(w: Path, out: Path, points: str = "points.csv", embeddings: str = "emb.zarr") -> list[str]:
    return ["sample", "--embeddings", str(w / embeddings), "--points", str(w / points), "--out", str(out)]


def _gpp(w: Path, s: Path, flux: str, *extra: str) -> list[str]:
    return ["eval", "gpp", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "scene.zarr"), "--flux",
            str(w / flux), "--out", str(s / "gpp"), *extra]


CASES: list[Case] = [
    # --- train: config ranges fail at load (issue 14 items 5, 6), paths before anything is written
    Case("train-max-epochs-0", _train(*_with("train.max_epochs=0")), "train.max_epochs"),
    Case("train-max-epochs-negative", _train(*_with("train.max_epochs=-3")), "train.max_epochs"),
    Case("train-batch-size-0", _train(*_with("train.batch_size=0")), "train.batch_size"),
    Case("train-lr-negative", _train(*_with("train.lr=-1")), "train.lr"),
    Case("train-lr-zero", _train(*_with("train.lr=0")), "train.lr"),
    Case("train-height-negative", _train(*_with(SYN, "data.source.height_px=-5")), "height_px"),
    Case("train-width-zero", _train(*_with(SYN, "data.source.width_px=0")), "width_px"),
    Case("train-n-sites-0", _train(*_with(SYN, "data.source.n_sites=0")), "n_sites"),
    Case("train-n-days-0", _train(*_with(SYN, "data.source.n_days=0")), "n_days"),
    Case("train-s1-gap-negative", _train(*_with("data.s1_max_gap_days=-2")), "s1_max_gap_days"),
    Case("train-valid-fraction", _train(*_with("data.min_valid_fraction=1.5")), "min_valid_fraction"),
    Case("train-split-blocks-0", _train(*_with("data.split.blocks=0")), "blocks"),
    Case("train-plateau-factor", _train(*_with("train.plateau_factor=2")), "plateau_factor"),
    Case("train-weight-decay", _train(*_with("train.weight_decay=-0.1")), "weight_decay"),
    Case("train-num-workers", _train(*_with("train.num_workers=-1")), "num_workers"),
    Case("train-spatial-stride-0", _train(*_with("data.sampling.spatial_stride=0")), "spatial_stride"),
    Case("train-unknown-preset", _train(*_with("preset=giant")), "unknown preset"),
    Case("train-config-unknown-preset", _train("--config", W + "/giant.yaml"),
         "unknown preset 'giant'; known presets: paper, small, tiny, dense, small-dense, tiny-dense"),
    Case("train-fusion-unknown-preset",
         lambda w, s: ["train", "fusion", *_with("preset=giant", f"s1_bundle={w}/x.pt", f"s2_bundle={w}/y.pt",
                                                 f"out_dir={s}/runs")], "unknown preset"),
    Case("train-yaml-syntax", _train("--config", W + "/bad.yaml"), "not valid YAML"),
    Case("train-yaml-list", _train("--config", W + "/list.yaml"), "YAML mapping"),
    Case("train-config-missing", _train("--config", W + "/nope.yaml"), "does not exist"),
    Case("train-config-other-sensor", _train("--config", W + "/s1.yaml"), "stembed train s1"),
    Case("train-source-kind-unknown", _train(*_with("data.source.kind=nope")), "data.source"),
    Case("train-source-kind-missing", _train(*_with("data.source={n_sites: 2}")), "no 'kind' given"),
    Case("train-extra-key", _train(*_with("train.learning_rate=1")), "train.learning_rate"),
    Case("train-not-a-number", _train(*_with("train.batch_size=many")), "train.batch_size"),
    Case("train-override-form", _train("--set", "max_epochs"), "key.path=value"),
    Case("train-unknown-sensor", lambda w, s: ["train", "sensor", "nosuch", "--set", f"out_dir={s}/runs"],
         "unknown sensor"),
    Case("train-run-dir-foreign", lambda w, s: ["train", "s2", "--run-dir", str(s / "out")],
         "not a stembed run's", setup=_foreign_folder),
    Case("train-run-dir-file", lambda w, s: ["train", "s2", "--run-dir", str(s / "out")], "is a file",
         setup=_plain_file),
    Case("train-run-dir-holds-own-config", lambda w, s: ["train", "s2", "--run-dir", str(s / "out")],
         "holds a config.yaml that `stembed train` did not write", setup=_own_config),
    Case("train-resume-bundle", lambda w, s: ["train", "s2", "--resume", str(w / "fusion.pt")], "a bundle"),
    Case("train-resume-missing", lambda w, s: ["train", "s2", "--resume", str(w / "last.ckpt")],
         "does not exist"),
    Case("train-fusion-missing-bundles",
         lambda w, s: ["train", "fusion", *_with(f"s1_bundle={w}/x.pt", f"s2_bundle={w}/y.pt",
                                                 f"out_dir={s}/runs")], "train one with"),
    # --- info
    Case("info-both", lambda w, s: ["info", str(w / "fusion.pt"), "--preset", "small"], "not both"),
    Case("info-unknown-preset", lambda w, s: ["info", "--preset", "giant"], "unknown preset"),
    Case("info-missing-bundle", lambda w, s: ["info", str(w / "nope.pt")], "does not exist"),
    Case("info-not-a-bundle", lambda w, s: ["info", str(w / "not_a_bundle.pt")], "not a stembed bundle"),
    Case("info-bundle-without-weights", lambda w, s: ["info", str(w / "no_weights.pt")], "state_dict"),
    Case("info-bundle-wrong-shape", lambda w, s: ["info", str(w / "wrong_shape.pt")], "wrong shape"),
    Case("embed-bundle-wrong-shape",
         lambda w, s: _embed_with(w, s, "scene.zarr", "wrong_shape.pt"), "wrong shape"),
    Case("embed-bundle-without-weights",
         lambda w, s: _embed_with(w, s, "scene.zarr", "no_weights.pt"), "lacks the entries"),
    Case("info-bundle-config-without-model", lambda w, s: ["info", str(w / "no_model_config.pt")],
         "model config lacks"),
    # --- cube: what --overwrite may delete, and arguments checked before any search
    Case("cube-overwrite-foreign-folder", lambda w, s: _cube(s / "out", "--overwrite"),
         "not a stembed scene store", setup=_foreign_folder),
    Case("cube-overwrite-plain-file", lambda w, s: _cube(s / "out", "--overwrite"),
         "is a file", setup=_plain_file),
    Case("cube-overwrite-embedding-store",
         lambda w, s: _cube(w / "emb.zarr", "--overwrite"),
         "not a stembed scene store"),
    Case("cube-exists", lambda w, s: _cube(w / "scene.zarr"), "already exists"),
    Case("cube-parent-is-file", lambda w, s: _cube(w / "notes.txt" / "be.zarr"),
         "is a file, not a folder"),
    Case("cube-foreign-staging", lambda w, s: _cube(s / "be.zarr"),
         "not a staged stembed cube build", setup=lambda s: _foreign_folder(s, "be.zarr.staging")),
    Case("cube-orbit", lambda w, s: _cube(s / "be.zarr", "--s1-orbit", "sideways"),
         "--s1-orbit"),
    Case("cube-valid-fraction",
         lambda w, s: _cube(s / "be.zarr", "--min-valid-fraction", "2"),
         "--min-valid-fraction"),
    Case("cube-gap-negative",
         lambda w, s: _cube(s / "be.zarr", "--s1-max-gap-days", "-1"),
         "--s1-max-gap-days"),
    Case("cube-min-dates", lambda w, s: _cube(s / "be.zarr", "--min-dates", "0"),
         "--min-dates"),
    Case("cube-scl-classes", lambda w, s: _cube(s / "be.zarr", "--scl-classes", "a,b"),
         "--scl-classes"),
    # an unreachable catalog: the error, and no empty be.zarr.staging left behind
    Case("cube-catalog-unreachable", lambda w, s: _cube(s / "be.zarr"), "cannot open the STAC API"),
    Case("cube-bad-date", lambda w, s: [*_cube(s / "be.zarr"), "--start", "2020-13-01"], "2020-13-01"),
    Case("cube-end-before-start", lambda w, s: [*_cube(s / "be.zarr"), "--end", "2019-01-01"], "2019-01-01"),
    Case("cube-no-area", lambda w, s: ["cube", "--out", str(s / "be.zarr"), *CUBE_ARGS[5:]], "--bbox"),
    Case("cube-cloud-mask", lambda w, s: _cube(s / "be.zarr", "--cloud-mask", "x"),
         "--cloud-mask"),
    # --- embed
    Case("embed-bundle-missing",
         lambda w, s: _embed_with(w, s, "scene.zarr", "nope.pt"), "does not exist"),
    Case("embed-cube-missing",
         lambda w, s: _embed_with(w, s, "nope.zarr", "fusion.pt"), "no scene store"),
    Case("embed-cube-is-embeddings",
         lambda w, s: _embed_with(w, s, "emb.zarr", "fusion.pt"), "not a stembed scene store"),
    Case("embed-not-a-bundle",
         lambda w, s: _embed_with(w, s, "scene.zarr", "not_a_bundle.pt"), "not a stembed bundle"),
    Case("embed-overwrite-foreign-folder", lambda w, s: _embed(w, s, "--overwrite", out="out"),
         "not a stembed embedding store", setup=_foreign_folder),
    Case("embed-out-plain-file", lambda w, s: _embed(w, s, "--overwrite", out="out"), "is a file",
         setup=_plain_file),
    Case("embed-out-exists", lambda w, s: [*_embed(w, s)[:-2], str(w / "emb.zarr"), "--quiet"],
         "already exists"),
    Case("embed-resume-another-bundle",
         lambda w, s: ["embed", "--cube", str(w / "scene.zarr"), "--bundle", str(w / "fusion_b.pt"), "--out",
                       str(w / "made.zarr"), "--resume", "--quiet"],
         "(bundle_sha256: the same bundle file)", forbid="threads_per_worker"),
    Case("embed-resume-and-overwrite", lambda w, s: _embed(w, s, "--resume", "--overwrite"), "contradict"),
    Case("embed-workers-and-scheduler",
         lambda w, s: _embed(w, s, "--workers", "2", "--scheduler", "tcp://127.0.0.1:9"), "pass one"),
    Case("embed-dtype", lambda w, s: _embed(w, s, "--dtype", "int4"), "dtype"),
    Case("embed-tile-px-0", lambda w, s: _embed(w, s, *_with("tile_px=0")), "tile_px"),
    Case("embed-gap-negative", lambda w, s: _embed(w, s, *_with("s1_max_gap_days=-1")), "s1_max_gap_days"),
    Case("embed-config-yaml", lambda w, s: _embed(w, s, "--config", str(w / "bad.yaml")), "not valid YAML"),
    Case("embed-parent-is-file", lambda w, s: _embed(w, s, out="out/e.zarr"), "is a file, not a folder",
         setup=_plain_file),
    Case("embed-features-not-nested", lambda w, s: _embed(w, s, "--features", "3"), "complete embeddings of [7]"),
    Case("embed-features-zero", lambda w, s: _embed(w, s, "--features", "0"), "features"),
    # --- sample
    Case("sample-out-exists",
         lambda w, s: _sample(w, w / "table.csv"), "already exists"),
    Case("sample-out-is-folder",
         lambda w, s: _sample(w, w / "foreign"), "is a folder"),
    Case("sample-out-suffix",
         lambda w, s: _sample(w, s / "t.txt"), "cannot tell the table format"),
    Case("sample-parent-is-file",
         lambda w, s: _sample(w, w / "notes.txt" / "t.csv"), "is a file, not a folder"),
    Case("sample-points-missing",
         lambda w, s: _sample(w, s / "t.csv", points="nope.csv"), "no points file"),
    Case("sample-embeddings-missing",
         lambda w, s: _sample(w, s / "t.csv", embeddings="nope.zarr"), "no embedding store"),
    Case("sample-embeddings-is-scene",
         lambda w, s: _sample(w, s / "t.csv", embeddings="scene.zarr"), "not a stembed embedding store"),
    Case("sample-features-not-nested",
         lambda w, s: [*_sample(w, s / "t.csv"), "--features", "4"], "complete embeddings of [7] features"),
    # --- export
    Case("export-out-plain-file",
         lambda w, s: ["export", "--embeddings", str(w / "emb.zarr"), "--out", str(w / "notes.txt")],
         "is a file"),
    Case("export-embeddings-is-scene",
         lambda w, s: ["export", "--embeddings", str(w / "scene.zarr"), "--out", str(s / "tifs")],
         "not a stembed embedding store"),
    Case("export-features-not-nested",
         lambda w, s: ["export", "--embeddings", str(w / "emb.zarr"), "--out", str(s / "tifs"), "--features", "2"],
         "--features 7"),
    # --- pca
    Case("pca-out-plain-file",
         lambda w, s: ["pca", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "scene.zarr"), "--out",
                       str(w / "notes.txt")], "is a file"),
    Case("pca-cube-missing",
         lambda w, s: ["pca", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "nope.zarr"), "--out",
                       str(s / "pca")], "no scene store"),
    Case("pca-s2-all-missing",
         lambda w, s: ["pca", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "nan_scene.zarr"), "--out",
                       str(s / "pca")], "has no observed B04/B03/B02 pixel on"),
    Case("pca-features-not-nested",
         lambda w, s: ["pca", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "scene.zarr"), "--out",
                       str(s / "pca"), "--features", "5"], "holds complete embeddings of [7] features"),
    # --- eval
    Case("recon-corrupt-metrics",
         lambda w, s: ["eval", "recon", str(w / "corrupt_run"), "--out", str(s / "ev")], "not readable JSON"),
    Case("recon-no-metrics", lambda w, s: ["eval", "recon", str(w / "empty_run"), "--out", str(s / "ev")],
         "has no metrics.json"),
    Case("recon-no-splits", lambda w, s: ["eval", "recon", str(w / "run"), "--out", str(s / "ev")],
         "holds no split metrics"),
    Case("recon-out-plain-file",
         lambda w, s: ["eval", "recon", str(w / "run"), "--out", str(w / "notes.txt")], "is a file"),
    Case("gpp-flux-empty", lambda w, s: _gpp(w, s, "flux_empty.csv", "--whole-cube"), "is empty"),
    Case("gpp-flux-header-only", lambda w, s: _gpp(w, s, "flux_header.csv", "--whole-cube"), "no dated rows"),
    Case("gpp-flux-bad-date", lambda w, s: _gpp(w, s, "flux_baddate.csv", "--whole-cube"), "TIMESTAMP"),
    Case("gpp-flux-columns", lambda w, s: _gpp(w, s, "flux_nocols.csv", "--whole-cube"), "lacks column"),
    Case("gpp-flux-not-numbers", lambda w, s: _gpp(w, s, "flux_text.csv", "--whole-cube"), "must be numbers"),
    Case("gpp-one-year-by-default", lambda w, s: _gpp(w, s, "flux_2020.csv", "--whole-cube"),
         "a train/validation split by year needs two years or more"),
    Case("gpp-same-year-train-and-val",
         lambda w, s: _gpp(w, s, "flux_2020.csv", "--whole-cube", "--train-years", "2020",
                           "--val-years", "2020"),
         "years [2020] are in more than one of train"),
    Case("gpp-val-years-without-windows",
         lambda w, s: _gpp(w, s, "flux_2020.csv", "--whole-cube", "--train-years", "2020",
                           "--val-years", "2017"),
         "no window of this cube ends in the val years [2017]"),
    Case("gpp-train-years-alone",
         lambda w, s: _gpp(w, s, "flux_2020.csv", "--whole-cube", "--train-years", "2020"),
         "give both --train-years and --val-years, or neither"),
    Case("gpp-flux-missing", lambda w, s: _gpp(w, s, "nope.csv", "--whole-cube"), "does not exist"),
    Case("gpp-no-tower", lambda w, s: _gpp(w, s, "flux_header.csv"), "--tower"),
    Case("gpp-tower-outside", lambda w, s: _gpp(w, s, "flux_2020.csv", "--tower", "4.35", "50.85"),
         "the tower at lon 4.35, lat 50.85 is outside the cube (lon"),
    Case("gpp-interpolation",
         lambda w, s: _gpp(w, s, "flux_header.csv", "--whole-cube", "--interpolation", "cubic"),
         "--interpolation"),
    Case("gpp-out-plain-file",
         lambda w, s: [*_gpp(w, s, "flux_header.csv")[:-2], "--out", str(w / "notes.txt"), "--whole-cube"],
         "is a file"),
    Case("probe-out-plain-file",
         lambda w, s: ["eval", "probe", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "scene.zarr"),
                       "--label", "land_cover", "--out", str(w / "notes.txt")], "is a file"),
    Case("probe-region-not-a-box",
         lambda w, s: ["eval", "probe", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "scene.zarr"),
                       "--label", "land_cover", "--out", str(s / "probe"), "--region", "0-8,0:8"],
         "region '0-8,0:8' is not y0:y1,x0:x1; fix: give pixel rows and columns of the store's grid"),
    Case("probe-region-outside-the-grid",
         lambda w, s: ["eval", "probe", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "scene.zarr"),
                       "--label", "land_cover", "--out", str(s / "probe"), "--region", "8:16,8:20"],
         "region 8:16,8:20 is empty or outside the store's grid of 16 x 16 px; fix: give 0 <= y0 < y1 <= 16"),
    Case("probe-features-beyond-the-embedding",
         lambda w, s: ["eval", "probe", "--embeddings", str(w / "emb.zarr"), "--cube", str(w / "scene.zarr"),
                       "--label", "land_cover", "--out", str(s / "probe"), "--features", "3", "--features", "9"],
         "embedding prefix 9 (from features) is not between 1 and 7"),
    Case("gapfill-eval-fusion-bundle",
         lambda w, s: ["eval", "gapfill", "--cube", str(w / "scene.zarr"), "--bundle", str(w / "fusion.pt"),
                       "--out", str(s / "gf")], "gap-fill"),
    # --- report
    Case("report-corrupt-metrics",
         lambda w, s: ["report", "--out", str(s / "rep"), "--run", str(w / "corrupt_run")],
         "not readable JSON"),
    Case("report-embeddings-without-cube",
         lambda w, s: ["report", "--out", str(s / "rep"), "--embeddings", str(w / "emb.zarr")], "--cube"),
    Case("report-nothing", lambda w, s: ["report", "--out", str(s / "rep")], "nothing to report"),
    Case("report-out-plain-file",
         lambda w, s: ["report", "--out", str(w / "notes.txt"), "--run", str(w / "run")], "is a file"),
]


if not torch.cuda.is_available():  # a GPU asked for where there is none
    CASES += [
        Case("embed-device-cuda-without-gpu", lambda w, s: _embed(w, s, *_with("device=cuda")),
             "no CUDA GPU"),
        Case("train-accelerator-gpu-without-gpu", _train(*_with("train.accelerator=gpu")), "no CUDA GPU"),
    ]
CASES += [
    Case("embed-device-unknown", lambda w, s: _embed(w, s, *_with("device=tpu")), "device"),
    Case("train-accelerator-unknown", _train(*_with("train.accelerator=tpu")), "train.accelerator"),
]


def _fill(args: list[str], world: Path) -> list[str]:
    return [a.replace(W, str(world)) for a in args]


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(reason=c.xfail, strict=True)) if c.xfail else c for c in CASES],
    ids=[c.id for c in CASES],
)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case: Case, world: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if case.setup is not None:
        case.setup(scratch)
    before = {"world": _snapshot(world), "scratch": _snapshot(scratch)}
    res = runner.invoke(app, _fill(case.args(world, scratch), world))
    out = res.output
    assert res.exit_code == 2, f"exit {res.exit_code}: {out}\n{res.exception!r}"
    assert "Traceback" not in out, out
    assert case.expect in out, out
    assert case.forbid is None or case.forbid not in out, out
    if "error:" in out:  # ours (typer's own usage errors draw a box): exactly one line
        assert len([ln for ln in out.splitlines() if ln.strip()]) == 1, out
    after = {"world": _snapshot(world), "scratch": _snapshot(scratch)}
    assert after == before, "the command changed or left files"


def test_the_table_is_large() -> None:
    assert len([c for c in CASES if c.xfail is None]) >= 60
