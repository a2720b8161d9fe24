"""Typed configuration: one frozen pydantic model per stage, loaded from YAML plus dotted overrides.

The resolved config (``model_dump(mode="json")``) is written into every run folder and
every bundle, and a bundle's model is always rebuilt from its own stored config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stembed.errors import UserError
from stembed.geometry import DenseGeometry as DenseGeometry  # re-exported with dense_geometry
from stembed.geometry import dense_geometry  # AEConfig.context_px reads the dense window
from stembed.sensors import CORE_SENSORS, PLUGINS, get_plugin, load_builtin_plugins


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------- models
class AEConfig(_Frozen):
    """Architecture of one per-sensor autoencoder (spec §3.1).

    The defaults are the ``paper`` preset for S2; :func:`ae_preset` gives the named presets.
    """

    sensor: str = "s2"
    in_channels: int = 10
    latent_dim: int = 9
    n_frames: int = 11
    patch_px: int = 15
    stem_channels: int = 149  # 1x1 stem and multiscale block width
    mid_channels: int = 128  # after the first stride-2 conv
    low_channels: int = 64  # after the second stride-2 conv
    token_channels: int = 16  # channels of the 4x4 token map (token = token_channels * 4 * 4)
    cbam_reduction: int = 8
    token_cbam_reduction: int = 2  # CBAM reduction of the last encoder block
    multiscale_kernels: tuple[int, ...] = (3, 7)
    d_ff: int = 8  # temporal transformer feed-forward width (8 in the paper's code, sic)
    n_heads: int = 8
    n_layers: int = 3
    dropout: float = 0.25
    enc_dropout2d: float = 0.07
    dec_dropout2d: float = 0.1
    head_channels: int = 16  # per-token width before the token-axis reduction
    reduced_tokens: int = 6  # R: tokens after the reduction over time (6 for S2, 7 for S1)
    max_position_days: int = 200  # learned position table covers 0..max_position_days
    # Per-band standardisation inside the model: x -> (x - mean) / std before the encoder, and the
    # inverse after the decoder, so losses and outputs stay in cube units. None = identity (the
    # paper feeds 0-1 values directly). Stage 1 fills these from the training split by default:
    # reflectances vary by ~0.05, and in benchmarks/standardise_overfit.py the unstandardised model
    # first beat the patch-mean baseline at step 102, the standardised one at step 52 (centre MAE
    # after 150 steps 0.0169 vs 0.0129). Buffers, not parameters: parameter counts are unchanged.
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    # "patch": the paper's encoder, which zero-pads inside each 15x15 patch and pools CBAM over the whole
    # patch, so every pixel-date must be encoded on its own. "dense": the same stages made translation-
    # equivariant (valid convolutions that read real neighbours, the stride-2 layers as dilated convs,
    # CBAM gates pooled over a sliding window), so one pass over a tile gives every pixel's frame tokens
    # (stembed.models.dense; see DenseGeometry for the context window it reads).
    variant: Literal["patch", "dense"] = "patch"
    dense_pool_window: int = 3  # dense CBAM channel gate: max/mean pooled over this window (per level)
    dense_spatial_kernel: int = 3  # dense CBAM spatial gate kernel (the paper's 7 would widen the context)
    # Deviations that make the model learn (experiments/learning.py measures each; docs/deviations.md).
    # Defaults are the paper's, so every bundle written before them rebuilds unchanged.
    centre_path: bool = False  # the centre pixel's spectrum reaches the tokens, the latent and the output directly
    temporal_norm_first: bool = False  # pre-norm temporal transformer (the paper: post-norm)
    latent_activation: Literal["softplus", "identity"] = "softplus"  # the paper squashes latents to >= 0

    @model_validator(mode="after")
    def _check(self) -> AEConfig:
        for name in ("input_mean", "input_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.in_channels:
                raise ValueError(f"{name} has {len(v)} values but in_channels={self.in_channels}")
        if self.input_std is not None and min(self.input_std) <= 0:
            raise ValueError(f"input_std must be positive, got {self.input_std}")
        if self.patch_px != 15:
            raise ValueError("patch_px must be 15: the conv stack maps 15 -> 7 -> 4 px exactly")
        if self.n_frames < 3 or self.n_frames % 2 == 0:
            raise ValueError(f"n_frames must be odd and >= 3 (a centre frame), got {self.n_frames}")
        if self.d_model % self.n_heads:
            raise ValueError(f"token width {self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("dense_pool_window", "dense_spatial_kernel"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd and >= 1, got {getattr(self, name)}")
        if any(k < 1 or k % 2 == 0 for k in self.multiscale_kernels):
            raise ValueError(f"multiscale_kernels must be odd, got {self.multiscale_kernels}")
        return self

    @property
    def context_px(self) -> int:
        """Pixels of context the encoder reads beyond the patch centre on each side (7 for ``patch``)."""
        return self.patch_px // 2 if self.variant == "patch" else dense_geometry(self).margin

    @property
    def input_px(self) -> int:
        """Edge of the square window the encoder reads per frame: 15 (``patch``) or 15 + 2 x extra context."""
        return 2 * self.context_px + 1

    @property
    def d_model(self) -> int:
        """Token width seen by the temporal transformer: token_channels x 4 x 4."""
        return self.token_channels * 16


class WindowConfig(_Frozen):
    """The dates a context fusion reads around the date it embeds (:mod:`stembed.data.windows`).

    Besides the date itself, ``dates`` of the pixel's observed dates, matched one by one to target offsets
    spread over +-``span_days``: half before the date and half after (``side: trailing``: all before it), at
    ``span_days * u**density`` for u evenly spaced in (0, 1] (``density`` > 1 puts more of them near the date).
    Each target takes the nearest observed date not yet taken, so a window follows the pixel's clear dates,
    shifts inward at the ends of the series and never holds a cloudy date. The paper's window is 11 consecutive dates (stage 1's).
    """

    dates: int = Field(16, ge=2)
    span_days: float = Field(180.0, gt=0.0)
    density: float = Field(1.5, ge=1.0)
    # centred: half the targets before the date, half after (the embedding of a date changes as later dates
    # arrive); trailing: every target before the date, and the stage-1 latents as they stood on the date
    # (stembed.inference.engine.asof_latents), so the embedding of date t reads nothing after t and never changes
    side: Literal["centred", "trailing"] = "centred"

    @model_validator(mode="after")
    def _check(self) -> WindowConfig:
        if self.side == "centred" and self.dates % 2:
            raise ValueError(f"a centred window.dates must be even (half before the date, half after), got {self.dates}")
        return self


class FusionConfig(_Frozen):
    """Fusion layers on top of two frozen stage-1 autoencoders (spec §3.2)."""

    embed_dim: int = 7
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    max_pair_gap_days: int = 350  # rows of the S1-S2 date-gap embedding = max_pair_gap_days + 1
    finetune_autoencoders: bool = False  # paper text: frozen; the authors' scripts fine-tune (off here)
    # the latents also reach the embedding through one linear map beside the transformer, whose pooled output
    # is layer-normalised (scale removed); the paper: transformer path only (docs/deviations.md)
    direct_path: bool = False
    # nested embeddings: the loss is applied to each prefix, so the first nested[0] features are a complete
    # embedding of their own (e.g. [7, 16]: the paper's 7 and a richer 16); the last must be embed_dim
    nested: tuple[int, ...] | None = None
    # a context fusion (stembed.models.context): the latents of a window of the pixel's dates around the
    # date, not the date's alone; None: the paper's fusion of one date
    window: WindowConfig | None = None
    season_hidden: int = Field(64, ge=1)  # context fusion: width of the decoder of the window's other dates
    # context fusion: every date (and the season decoder's target dates) also gets its place in the calendar year
    # (sines and cosines of the day number over 365.25 and 182.6 days), so the embedding can hold the pixel's season
    # without the date's own position in it; off: only the day offsets between the dates (the paper's relative time)
    calendar: bool = False

    @model_validator(mode="before")
    @classmethod
    def _embedding_dim(cls, data: Any) -> Any:
        """``embedding_dim`` is another name for ``embed_dim`` (the one bundles store)."""
        if isinstance(data, dict) and "embedding_dim" in data:
            data = dict(data)
            value = data.pop("embedding_dim")
            if "embed_dim" in data and data["embed_dim"] != value:
                raise ValueError(f"embedding_dim={value} and embed_dim={data['embed_dim']} disagree; give one")
            data["embed_dim"] = value
        return data

    @model_validator(mode="after")
    def _check(self) -> FusionConfig:
        if self.nested is not None:
            n = list(self.nested)
            if not n or n != sorted(set(n)) or n[0] < 1 or n[-1] != self.embed_dim:
                raise ValueError(
                    f"nested must be increasing sizes ending at embed_dim={self.embed_dim} (e.g. [7, "
                    f"{self.embed_dim}]), got {n}"
                )
        if self.window is not None and not self.direct_path:
            raise ValueError("a context fusion (window) needs direct_path: true (the date's own latents)")
        return self

    @property
    def prefixes(self) -> tuple[int, ...]:
        """The embedding sizes the loss applies to: ``nested``, or the whole embedding alone."""
        return tuple(self.nested) if self.nested is not None else (self.embed_dim,)

    @property
    def trailing(self) -> bool:
        """The embedding of a date reads nothing after it: a trailing window, and every other sensor matched to the
        S2 date from its dates on or before it (:func:`stembed.preprocess.match_s1_to_s2`)."""
        return self.window is not None and self.window.side == "trailing"


LEARNING_FIXES: dict[str, Any] = {
    "centre_path": True,
    "temporal_norm_first": True,
    "latent_activation": "identity",
    "dropout": 0.0,
    "enc_dropout2d": 0.0,
    "dec_dropout2d": 0.0,
}
"""What the ``small`` and ``tiny`` presets change against the paper's design so that they learn (measured one at a
time in ``experiments/learning.py``; docs/deviations.md). The ``paper`` and ``dense`` presets keep the paper's."""


def ae_preset(name: str, sensor: str) -> AEConfig:
    """Named autoencoder presets: ``paper`` reproduces the spec's sizes and design; ``small`` is for tests, the demo
    and the built-in pretrained model; ``tiny`` (a quarter of small's channels) for development runs and tests of
    plumbing. ``small`` and ``tiny`` carry :data:`LEARNING_FIXES`.

    A companion sensor (:class:`stembed.sensors.SensorPlugin`) takes its band count, ``latent_dim`` and
    ``reduced_tokens`` from its plugin and the preset's sizes from ``name``."""
    per_sensor = {
        "s1": {"sensor": "s1", "in_channels": 2, "latent_dim": 2, "reduced_tokens": 7},
        "s2": {"sensor": "s2", "in_channels": 10, "latent_dim": 9, "reduced_tokens": 6},
    }
    if sensor not in per_sensor:
        plugin = get_plugin(sensor)  # SensorError (a ValueError) listing the known sensors
        per_sensor[sensor] = {
            "sensor": sensor, "in_channels": plugin.spec.n_bands, "latent_dim": plugin.latent_dim,
            "reduced_tokens": plugin.reduced_tokens,
        }
    presets: dict[str, dict[str, Any]] = {
        "paper": {},
        "small": {
            "stem_channels": 32,
            "mid_channels": 32,
            "low_channels": 16,
            "token_channels": 8,
            "cbam_reduction": 4,
            "d_ff": 64,
            "n_heads": 4,
            "n_layers": 1,
            **LEARNING_FIXES,
        },
    }
    presets["tiny"] = {
        **presets["small"],
        "stem_channels": 8, "mid_channels": 8, "low_channels": 4, "token_channels": 4, "head_channels": 4,
        "d_ff": 16,
    }
    for base in ("paper", "small", "tiny"):
        presets[f"{base}-dense" if base != "paper" else "dense"] = {**presets[base], "variant": "dense"}
    _check_preset(name)  # the one list of names, and the one message, of config validation
    return AEConfig(**{**per_sensor[sensor], **presets[name]})


def fusion_preset(name: str) -> FusionConfig:
    """Named fusion presets (see :func:`ae_preset`)."""
    presets: dict[str, dict[str, Any]] = {
        "paper": {},
        "small": {"d_model": 32, "n_heads": 4, "n_layers": 1, "d_ff": 64, "direct_path": True},
        "tiny": {"d_model": 32, "n_heads": 4, "n_layers": 1, "d_ff": 64, "direct_path": True},
    }
    presets |= {"dense": presets["paper"], "small-dense": presets["small"], "tiny-dense": presets["tiny"]}
    _check_preset(name)
    return FusionConfig(**presets[name])


PRESETS = ("paper", "small", "tiny", "dense", "small-dense", "tiny-dense")


def _check_preset(name: str) -> None:
    """Refuse an unknown preset when the config loads (the stage configs' validators call it), not when
    training builds the model; :func:`ae_preset` and :func:`fusion_preset` use the same check and message."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")


# ----------------------------------------------------------------------------- data
class SyntheticSource(_Frozen):
    """The built-in seeded synthetic scene (:mod:`stembed.data.synthetic`), one scene per site."""

    kind: Literal["synthetic"] = "synthetic"
    n_sites: int = Field(4, ge=1)
    height_px: int = Field(48, gt=0)
    width_px: int = Field(48, gt=0)
    n_days: int = Field(365, gt=0)
    seed: int = 0


class WorldCerealSource(_Frozen):
    """WorldCereal NetCDF patch folders, one folder per site."""

    kind: Literal["worldcereal"] = "worldcereal"
    paths: tuple[str, ...]


class ZarrSource(_Frozen):
    """Cubes already in the contract, stored as zarr: one S2 and one S1 store per site."""

    kind: Literal["zarr"] = "zarr"
    s2_paths: tuple[str, ...]
    s1_paths: tuple[str, ...] = ()


class SceneSource(_Frozen):
    """Scene stores, one per site, as ``stembed cube`` and ``stembed.io.cube.save_scene`` write them: each holds
    S2, S1 and any companion sensors, so it is everything training needs. ``paths``: stores or glob patterns
    (``sites/*.zarr``); in a config file, relative to the file's folder."""

    kind: Literal["scene"] = "scene"
    paths: tuple[str, ...] = Field(min_length=1)


class SamplingConfig(_Frozen):
    """Training-patch extraction (spec §1.4)."""

    patch_px: int = Field(15, ge=1)
    n_frames: int = Field(11, ge=1)
    # consecutive valid dates a window spans before drawing n_frames of them
    window_dates: int = Field(20, ge=1)
    window_stride: int = Field(17, ge=1)
    spatial_stride: int = Field(9, ge=1)
    max_span_days: int = Field(200, ge=1)  # drop a patch whose n_frames dates span this many days or more

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        if self.window_dates < self.n_frames:
            raise ValueError(f"window_dates ({self.window_dates}) must be >= n_frames ({self.n_frames})")
        if self.n_frames % 2 == 0:
            raise ValueError(f"n_frames must be odd (a centre frame), got {self.n_frames}")
        return self


class SplitConfig(_Frozen):
    """Train/val/test split, grouped so that no group is in two splits.

    ``by="site"`` groups by cube (site). ``by="block"`` also cuts every site into
    ``blocks x blocks`` disjoint spatial blocks and groups by (site, block); patches never
    cross a block edge, so no pixel is in two splits. Use it when there are fewer sites than splits.
    """

    by: Literal["site", "block"] = "site"
    blocks: int = Field(2, ge=1)
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
    seed: int = 42

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if abs(sum(self.fractions) - 1.0) > 1e-6 or min(self.fractions) < 0:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self.fractions}")
        return self


class DataConfig(_Frozen):
    """Where the cubes come from and how they are preprocessed and cut into patches."""

    source: SyntheticSource | WorldCerealSource | SceneSource | ZarrSource = Field(
        default_factory=SyntheticSource, discriminator="kind"
    )
    # keep an S2 date if this share of its values is valid
    min_valid_fraction: float = Field(0.03, ge=0.0, le=1.0)
    # S2 date takes the nearest S1 date within this gap, else S1 is missing
    s1_max_gap_days: float = Field(6.0, ge=0.0)
    scl_masked_classes: tuple[int, ...] = (0, 1, 3, 8, 9, 10)
    sampling: SamplingConfig | None = None  # None: the paper's sampling for the stage's sensor
    split: SplitConfig = Field(default_factory=SplitConfig)
    # companion sensors (registered plugins, e.g. "agera5") whose cubes every scene also gets
    # (Scene.extra); names are checked when the scenes are loaded (stembed.data.scenes.load_scenes)
    extra_sensors: tuple[str, ...] = ()

    def resolved_sampling(self, sensor: str) -> SamplingConfig:
        """Explicit sampling, or the paper's: S1 on its own dates 11 of 40 (stride 40, 15 px); S2 (and any
        companion sensor) 11 of 20."""
        if self.sampling is not None:
            return self.sampling
        if sensor == "s1":
            return SamplingConfig(window_dates=40, window_stride=40, spatial_stride=15)
        return SamplingConfig()


# ----------------------------------------------------------------------------- losses
class LossConfig(_Frozen):
    """Context-aware reconstruction loss of one sensor (spec §2)."""

    decay: float = 0.1
    # the temporal factor's decay per frame (None: decay, the paper's one decay for space and time); a slower
    # one asks the latent for more of the season around its date (docs/results/models-that-learn.md, the probe)
    time_decay: float | None = Field(None, gt=0.0, le=1.0)
    centre_weight: float = 1.0
    mae: float = 1.0
    ssim: float = 0.0
    sam: float = 0.0


def s2_stage1_loss() -> LossConfig:
    """Spec section A: MAE 0.25, SSIM 0.03, SAM 0.72 for the S2 autoencoder."""
    return LossConfig(mae=0.25, ssim=0.03, sam=0.72)


class ContextLossConfig(_Frozen):
    """A context fusion's terms beside each branch's reconstruction of the date (a weight of 0 turns one off).

    ``season``: the centre pixel's bands on the window's other dates, decoded from the embedding and its day
    offset (every sensor, MAE in cube units, each sensor at its branch weight). ``hide_date``: the share of
    samples whose date's own S2 latent is hidden, as a cloud hides it (the date is then rebuilt from its window:
    masked time-series pretraining); ``hide_run`` of those also hide the pixel's dates within +-``run_days``
    before the window is drawn (a cloudy spell). ``agreement``: a VICReg term between the embeddings of two views
    of the window (each keeps a random ``view_keep`` share of its dates) on ``agreement_features``
    ([start, stop), default: the features past the first nested prefix).
    """

    season: float = Field(1.0, ge=0.0)
    hide_date: float = Field(0.25, ge=0.0, le=1.0)
    hide_run: float = Field(0.5, ge=0.0, le=1.0)
    run_days: float = Field(20.0, ge=0.0)
    agreement: float = Field(0.0, ge=0.0)
    agreement_features: tuple[int, int] | None = None
    view_keep: float = Field(0.6, gt=0.0, le=1.0)
    # 0: both views embed the same date; > 0: the second view embeds another observed date of the pixel within
    # +-agreement_days (its own window), so the agreed features describe the pixel's season, not the date
    agreement_days: float = Field(0.0, ge=0.0)
    # per nested prefix: the weight of its date reconstruction and of its season decoding (None: 1 each); each
    # term is the weighted mean over the prefixes
    date_weights: tuple[float, ...] | None = None
    season_weights: tuple[float, ...] | None = None


class CompanionLossConfig(LossConfig):
    """A companion sensor's branch of the fusion objective: its reconstruction loss (MAE) and its weight."""

    weight: float = 0.5  # like S1's and S2's


_OLD_COMPANION_KEYS = ("extra", "extra_weight")


class FusionLossConfig(_Frozen):
    """Fusion objective (paper eq. 6-8): weighted sum of the S1, S2 and companion sensors' branch losses."""

    s1: LossConfig = Field(default_factory=lambda: LossConfig(centre_weight=1.5))
    s2: LossConfig = Field(default_factory=lambda: LossConfig(centre_weight=1.75, mae=0.665, ssim=0.02, sam=0.315))
    s1_weight: float = 0.5
    s2_weight: float = 0.5
    # each companion sensor's branch by its name; one not named here takes ``companion``
    companions: dict[str, CompanionLossConfig] = Field(default_factory=dict)
    companion: CompanionLossConfig = Field(default_factory=CompanionLossConfig)
    context: ContextLossConfig = Field(default_factory=ContextLossConfig)  # context fusion only (model.window)

    @model_validator(mode="before")
    @classmethod
    def _old_companion_keys(cls, data: Any) -> Any:
        """``extra``/``extra_weight`` (one branch shared by every companion, as earlier configs and bundles hold
        it) -> ``companion``; given beside ``companion``, they override its entries (``--set`` of an old key)."""
        if not isinstance(data, dict) or not any(k in data for k in _OLD_COMPANION_KEYS):
            return data
        out = {k: v for k, v in data.items() if k not in _OLD_COMPANION_KEYS}
        companion, extra = out.get("companion") or {}, data.get("extra") or {}
        if not isinstance(companion, dict | BaseModel) or not isinstance(extra, dict | BaseModel):
            raise ValueError("loss.extra and loss.companion must be mappings of loss settings (mae, decay, ...)")
        merged = {**_as_dict(companion), **_as_dict(extra)}
        if "extra_weight" in data:
            merged["weight"] = data["extra_weight"]
        return {**out, "companion": merged}

    @model_validator(mode="after")
    def _companions_only(self) -> FusionLossConfig:
        core = [k for k in self.companions if k in CORE_SENSORS]
        if core:
            raise ValueError(
                f"loss.companions names {core}; fix: set S1's and S2's branches in loss.s1/loss.s2 and their weights "
                "in loss.s1_weight/loss.s2_weight"
            )
        return self

    def branch(self, sensor: str) -> tuple[LossConfig, float]:
        """The loss and weight of ``sensor``'s branch: S1's and S2's own; a companion sensor's entry of
        ``companions``, else ``companion``."""
        if sensor == "s1":
            return self.s1, self.s1_weight
        if sensor == "s2":
            return self.s2, self.s2_weight
        own = self.companions.get(sensor, self.companion)
        return own, own.weight


def _as_dict(value: dict[str, Any] | BaseModel) -> dict[str, Any]:
    """A config section given as a mapping or as a model, as a mapping."""
    return value.model_dump() if isinstance(value, BaseModel) else dict(value)


# ----------------------------------------------------------------------------- training
class TrainConfig(_Frozen):
    """Optimisation settings shared by both stages (spec §4)."""

    batch_size: int = Field(16, ge=1)
    max_epochs: int = Field(500, ge=1)  # 0 would write an untrained bundle, -1 train until early stopping
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(1.5e-4, ge=0.0)
    warmup_steps: int = Field(35_000, ge=0)
    warmup_start_factor: float = Field(1e-3, gt=0.0, le=1.0)
    plateau_factor: float = Field(0.35, gt=0.0, lt=1.0)
    plateau_patience: int = Field(5, ge=0)
    min_lr: float = Field(1.5e-6, ge=0.0)
    early_stop_patience: int = Field(16, ge=1)
    grad_clip: float = Field(1.0, ge=0.0)  # 0: no clipping
    seed: int = 42
    num_workers: int = Field(0, ge=0)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    limit_train_batches: float | int = Field(1.0, gt=0)  # a share (float <= 1) or a number of batches (int)
    max_minutes: float | None = Field(None, gt=0)  # stop after this much training time (the best checkpoint is kept)
    val_every_n_epochs: int = Field(1, ge=1)  # validate (early stopping, plateau, best checkpoint) every n epochs
    # a context fusion: windows of the val split scored at every validation (the same ones each time), and
    # pixel-dates per split in the run's final metrics (seeded draws)
    val_windows: int = Field(4096, ge=1)
    metric_samples: int = Field(20000, ge=1)
    progress_bar: bool = True
    # scale-out (docs/guide/scale-out.md): processes per node (GPUs, or CPU processes),
    # nodes, how Lightning joins them, and the training arithmetic. batch_size and limit_train_batches are per
    # process, so the global batch is batch_size * devices * num_nodes. Bundles always hold float32 weights.
    devices: int | Literal["auto"] = 1  # "auto": every GPU torch sees (one process on CPU)
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp"] = "auto"  # "auto": DDP when devices * num_nodes > 1
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"  # *-mixed: autocast, float32 weights

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v

    @property
    def distributed(self) -> bool:
        """More than one training process may run (so ranks, samplers and collectives matter)."""
        return self.devices != 1 or self.num_nodes > 1


class DenseTrainingConfig(_Frozen):
    """Dense training of a ``dense`` autoencoder (:mod:`stembed.training.dense`): tiles, not patches.

    One frame-CNN pass over a ``crop_px`` tile (plus the encoder's context) gives every centre
    pixel's tokens; ``latents`` windows per step are drawn among the tile batch's observed centre
    pixel-dates, each decoded on its centre frame plus on average ``render_frames - 1`` others (a
    fraction: that share of the windows decodes one more frame; ``n_frames``: every frame, the exact
    per-patch loss). Validation and the run's metrics stay per patch.
    """

    crop_px: int = Field(32, ge=1)  # centre pixels per tile edge
    subsets: int = Field(2, ge=1)  # frame draws (n_frames of the window's dates) per tile
    latents: int = Field(512, ge=1)  # training windows drawn per step
    render_frames: float = Field(3, gt=1)  # mean frames decoded per latent, the centre frame included
    tiles_per_batch: int = Field(1, ge=1)
    # fusion only: for the first n steps the fusion layers learn to give back the frozen encoders' latents
    # (head_k(e) ~ z_k, standardised squared error, nothing decoded), then the paper's reconstruction loss
    latent_warmup_steps: int = Field(0, ge=0)


class AEStageConfig(_Frozen):
    """Stage 1: one autoencoder for one sensor."""

    stage: Literal["ae"] = "ae"
    sensor: str  # "s1", "s2" or a registered companion sensor (e.g. "agera5")
    preset: str = "paper"
    model: AEConfig | None = None  # None: take ae_preset(preset, sensor)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig | None = None  # None: MAE only for S1, the hybrid loss for S2
    train: TrainConfig = Field(default_factory=TrainConfig)
    standardise_inputs: bool = True  # fill model.input_mean/std from the training split (see AEConfig)
    # centre_pca: start the centre path at PCA of the training centre spectra (stembed.training.centre_init)
    init: Literal["random", "centre_pca"] = "random"
    init_scale: float = Field(30.0, gt=0)  # centre_pca: the scores' share of the token stream (centre_init.SCALE)
    dense_training: DenseTrainingConfig | None = None  # train a dense model on tiles (None: per patch)
    out_dir: str = "runs"

    @model_validator(mode="after")
    def _check(self) -> AEStageConfig:
        if self.sensor not in CORE_SENSORS:
            load_builtin_plugins()
            if self.sensor not in PLUGINS:
                raise ValueError(
                    f"unknown sensor {self.sensor!r}; known sensors: {sorted({*CORE_SENSORS, *PLUGINS})}; "
                    "fix: check the name, or import the module that registers it "
                    "(stembed.sensors.register_sensor)"
                )
        if self.model is not None and self.model.sensor != self.sensor:
            raise ValueError(f"model.sensor={self.model.sensor!r} but stage sensor={self.sensor!r}")
        _check_preset(self.preset)
        if self.init == "centre_pca":
            m = self.resolved_model()
            if not m.centre_path or m.latent_activation != "identity":
                raise ValueError(
                    "init: centre_pca starts the centre path at PCA scores, so it needs centre_path: true and "
                    "latent_activation: identity (the small and tiny presets); fix: use such a preset or init: random"
                )
        return self

    def resolved_model(self) -> AEConfig:
        """The architecture this stage trains."""
        return self.model if self.model is not None else ae_preset(self.preset, self.sensor)

    def resolved_loss(self) -> LossConfig:
        """The loss this stage trains with: S2 the hybrid loss, S1 and companion sensors MAE only."""
        if self.loss is not None:
            return self.loss
        return s2_stage1_loss() if self.sensor == "s2" else LossConfig()


_OLD_BUNDLE_KEYS = ("s1_bundle", "s2_bundle", "extra_bundles")


class FusionStageConfig(_Frozen):
    """Stage 2: fusion layers on the stage-1 bundles (S1, S2, and any companion sensors')."""

    stage: Literal["fusion"] = "fusion"
    # sensor -> its stage-1 bundle: s1 and s2, and each companion sensor, whose scenes come from
    # data.extra_sensors (same keys). The keys of old configs (s1_bundle, s2_bundle, extra_bundles) still load.
    bundles: dict[str, str]
    preset: str = "paper"
    model: FusionConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    loss: FusionLossConfig = Field(default_factory=FusionLossConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(warmup_steps=30_000, plateau_factor=0.3,
                                                                   plateau_patience=9, min_lr=3.5e-7))
    dense_training: DenseTrainingConfig | None = None  # tiles instead of patches (dense bundles only)
    # "linear": before training, set the fusion layers to the best linear fusion of the training latents to first
    # order (PCA in the frozen decoders' metric, stembed.training.fusion_init; needs the direct path); "random":
    # the paper's random start
    init: Literal["random", "linear"] = "random"
    out_dir: str = "runs"

    @model_validator(mode="before")
    @classmethod
    def _keyed_bundles(cls, data: Any) -> Any:
        """``s1_bundle``/``s2_bundle``/``extra_bundles`` (before sensors were keyed) -> entries of ``bundles``; an old
        key given beside ``bundles`` overrides its entry (so ``--set s1_bundle=...`` works on a keyed config)."""
        if not isinstance(data, dict) or not any(k in data for k in _OLD_BUNDLE_KEYS):
            return data
        out = {k: v for k, v in data.items() if k not in _OLD_BUNDLE_KEYS}
        bundles = dict(out.get("bundles") or {})
        extra = data.get("extra_bundles")
        if isinstance(extra, dict):
            bundles |= extra
        elif extra is not None:
            raise ValueError(f"extra_bundles must map a companion sensor to its bundle, got {extra!r}")
        bundles |= {k: data[f"{k}_bundle"] for k in ("s1", "s2") if f"{k}_bundle" in data}
        return {**out, "bundles": bundles}

    @model_validator(mode="after")
    def _check(self) -> FusionStageConfig:
        missing = [k for k in CORE_SENSORS if k not in self.bundles]
        if missing:
            raise ValueError(f"bundles needs the stage-1 bundle of {missing} (bundles: {{s1: ..., s2: ...}})")
        unknown = sorted(set(self.loss.companions) - set(self.companions))
        if unknown:
            raise ValueError(
                f"loss.companions names {unknown} but bundles has no such companion sensor "
                f"({sorted(self.companions) or 'none'}); fix: key loss.companions by the companion sensors' names"
            )
        _check_preset(self.preset)
        if self.init == "linear" and not self.resolved_model().direct_path:
            raise ValueError("init: linear needs a fusion model with direct_path: true (the small and tiny presets)")
        return self

    @property
    def companions(self) -> dict[str, str]:
        """The companion sensors' bundles (every entry of ``bundles`` but S1's and S2's)."""
        return {k: v for k, v in self.bundles.items() if k not in CORE_SENSORS}

    def resolved_model(self) -> FusionConfig:
        """The fusion architecture this stage trains."""
        return self.model if self.model is not None else fusion_preset(self.preset)


class GapFillStageConfig(_Frozen):
    """Stage 2b: fusion layers for cloudy dates (:mod:`stembed.models.gapfill`) on a trained fusion bundle.

    ``data`` must be the fusion stage's (same scenes and split), so the test split stays unseen.
    """

    stage: Literal["gapfill"] = "gapfill"
    fusion_bundle: str
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(warmup_steps=500, lr=1e-4))
    out_dir: str = "runs"


class EmbedConfig(_Frozen):
    """Stage 3: embedding every pixel and date of a cube with a fusion bundle (``stembed embed``).

    Saved in the output store's attributes; a resumed run must ask for the same values.
    """

    stage: Literal["embed"] = "embed"
    tile_px: int = Field(64, ge=1)  # tile edge in pixels; the output's y/x chunks are the tiles
    time_chunk: int = Field(16, ge=1)  # dates per output chunk
    batch_size: int = Field(256, ge=1)  # patches per forward pass; bit-identical output needs the same value
    dtype: Literal["float32", "float16", "int8"] = "float32"
    calibration_samples: int = Field(1024, ge=16)  # pixel-dates embedded to set the float16/int8 scale
    calibration_margin: float = Field(0.25, ge=0.0)  # widen the calibrated range by this share each side
    seed: int = 0  # draws the calibration pixel-dates
    # None: the value the bundle's fusion stage was trained with
    s1_max_gap_days: float | None = Field(None, ge=0.0)
    workers: int = Field(1, ge=1)  # LocalCluster worker processes (ignored with a scheduler address)
    threads_per_worker: int | None = Field(None, ge=1)  # torch threads per worker; None: cores // workers
    connect_timeout_s: float = Field(10.0, gt=0)  # how long to try a --scheduler address
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # dense bundles only: "auto" = bfloat16 autocast on CUDA, float32 on CPU; float32 is the exact path
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # daily series (`stembed embed --daily`): a value for every day from the first to the last S2 date,
    # flagged observed / model_based (cloudy S2 dates, gap-fill bundles) / linear / savgol
    daily: bool = False
    daily_fill: Literal["linear", "savgol"] = "linear"  # how days without a value are filled
    savgol_window_days: int = Field(31, ge=3)
    savgol_order: int = Field(2, ge=0)
    model_fill: bool = True  # cloudy S2 dates from the bundle's gap-fill layers, or a context fusion's own window
    # write the first that many features: one of a nested bundle's prefixes (None: all of them)
    features: int | None = Field(None, ge=1)


class CubeConfig(_Frozen):
    """What every scene store of ``stembed cube`` shares: where to search, how to mask and correct, how to fetch.

    The area, period and site id are each store's own (options, or a ``--sites`` table row). Values are checked
    by :class:`stembed.cube_build.CubeRequest`, so a setting gets the same message from a file, ``--set`` or its
    option. The defaults are ``CubeRequest``'s (a test keeps them equal).
    """

    stage: Literal["cube"] = "cube"
    catalog: str | None = None  # STAC API root; None: Microsoft Planetary Computer, asset URLs signed
    s2_collection: str = "sentinel-2-l2a"
    s1_collection: str = "sentinel-1-rtc"
    cloud_mask: str = "scl"  # "scl", or "module:Factory" building a stembed.preprocess.CloudMask
    scl_classes: tuple[int, ...] | None = None  # SCL classes masked (with cloud_mask: scl); None: 0,1,3,8,9,10
    brdf: bool = True  # BRDF nadir normalisation of S2
    min_valid_fraction: float = 0.03  # keep an S2 date with at least this share of valid pixels
    min_dates: int = 6  # fewest S2 dates a cube may have
    s1_orbit: Literal["auto", "ascending", "descending", "both"] = "auto"
    s1_max_gap_days: float = 6.0  # S1-S2 matching tolerance, checked and recorded
    piece_months: int = 12  # fetch the period in pieces of this many months (each staged: the resume unit)
    retries: int = 5  # HTTP retries, exponential backoff


StageConfig = AEStageConfig | FusionStageConfig | GapFillStageConfig
C = TypeVar("C", bound=BaseModel)


# ----------------------------------------------------------------------------- loading
class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid config."""


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML, so ``1e-3``, ``true``, ``[1, 2]`` get their natural types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (a copy is returned)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. train.max_epochs=3)")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
                node[p] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(value)
    return out


# where a stage config holds file paths: top-level keys, keys of data.source, and the values of bundles (and of
# extra_bundles, its old form)
_PATH_KEYS = ("out_dir", "s1_bundle", "s2_bundle", "fusion_bundle")
_SOURCE_PATH_KEYS = ("paths", "s2_paths", "s1_paths")


def _from_folder(value: Any, folder: Path) -> Any:
    """``value`` relative to ``folder`` if it is a relative path; absolute paths, ``~`` paths and names with a
    scheme (``pretrained:belgium``, ``s3://...``) are kept as they are. Not a string: left for validation."""
    if not isinstance(value, str) or not value:
        return value
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", value) or value.startswith("~") or Path(value).is_absolute():
        return value
    return str((folder / value).resolve())  # resolve, not normpath: ".." after a symlink goes where the OS goes


def resolve_config_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Paths written in a config file are relative to that file's folder, not to where stembed runs, so a
    config works from any folder. Overrides (``--set``) are typed where stembed runs and stay relative to it."""
    out = dict(raw)
    for key in _PATH_KEYS:
        if key in out:
            out[key] = _from_folder(out[key], folder)
    for key in ("bundles", "extra_bundles"):
        if isinstance(out.get(key), dict):
            out[key] = {k: _from_folder(v, folder) for k, v in out[key].items()}
    data = out.get("data")
    if isinstance(data, dict) and isinstance(data.get("source"), dict):
        source = dict(data["source"])
        for key in _SOURCE_PATH_KEYS:
            if isinstance(source.get(key), list | tuple):
                source[key] = [_from_folder(v, folder) for v in source[key]]
            elif key in source:
                source[key] = _from_folder(source[key], folder)
        out["data"] = {**data, "source": source}
    return out


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read a YAML file (or start empty), apply overrides, validate into ``cls``.

    Relative paths in the file resolve from the file's folder (:func:`resolve_config_paths`); relative
    paths in ``overrides`` from the current folder.

    Raises:
        ConfigError: the file is missing or not a mapping, or validation fails; the message lists
            each bad field.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"config file {p} is not valid YAML ({problem}{at}); fix its syntax") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} cannot be read ({type(e).__name__}: {e})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a YAML mapping at the top level")
        raw = resolve_config_paths(loaded, p.resolve().parent)
    raw = apply_overrides(raw, overrides)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            msg = err["msg"]
            if err["type"] == "union_tag_not_found":  # pydantic: "Unable to extract tag using discriminator"
                msg = f"no 'kind' given; set {loc}.kind to one of synthetic, worldcereal, scene, zarr"
            problems.append(f"{loc}: {msg}")
        where = f" in {path}" if path is not None else ""
        # one line: every bad field, each with pydantic's reason (e.g. "greater than or equal to 1")
        raise ConfigError(f"invalid {cls.__name__}{where}: " + "; ".join(problems)) from None


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """JSON-safe dict of a config (what runs and bundles store)."""
    return cfg.model_dump(mode="json")
