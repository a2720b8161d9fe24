"""Fusion of the sensors' latents into one embedding per patch (spec §3.2).

The stage-1 autoencoders each turn their patch into a latent (S1: 2-d, S2: 9-d in the paper
preset). The fusion layers read the latents as tokens, let them attend to each other, and pool them
into the fused embedding ``e`` (7-d). Small heads map ``e`` back to each latent, and the
autoencoders' decoders reconstruct every patch from it; that reconstruction is the training signal.

Every sensor takes the same path, keyed by its name: S1 and S2 are built in, and *companion*
sensors (any registered sensor matched to the S2 dates, e.g. AgERA5 weather) add one token each.
S2 is the *anchor*: its dates are the embedding's dates, and every other sensor's input carries
its days to the anchor date (:class:`SensorInput`). Tokens are in :func:`sensor_order` (S1,
S2, then the companions in the order the model was given them).

By default the autoencoders are frozen (paper text): only the fusion layers train, so adding a
sensor means training its autoencoder and a new fusion stage, never touching the S1/S2 models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from stembed.config import AEConfig, FusionConfig
from stembed.models.autoencoder import SensorAutoencoder
from stembed.models.layers import make_transformer, run_transformer
from stembed.sensors import ANCHOR as ANCHOR  # re-exported: the models name it here
from stembed.sensors import CORE_SENSORS, PAIRED, companions


@dataclass(frozen=True)
class SensorInput:
    """One sensor's input to the fusion model.

    Attributes:
        x: patches or windows (B, T, C, H, W).
        gaps: days between consecutive frames (B, T-1).
        dt: (B,) or (B, 1) days between this sensor's centre frame and the anchor (S2) date; None for the anchor.
    """

    x: torch.Tensor
    gaps: torch.Tensor
    dt: torch.Tensor | None = None


def sensor_order(sensors: Iterable[str]) -> list[str]:
    """Token order: S1, S2, then the other sensors in the order given."""
    return [*CORE_SENSORS, *companions(sensors)]


class FusionBase(nn.Module):
    """The sensors' frozen autoencoders, by sensor name in token order, and what every fusion model does with them.

    Subclasses add the fusion layers (:meth:`_fusion_modules`): :class:`FusionModel` (the paper's: the sensors'
    latents of one date) and :class:`stembed.models.context.ContextFusionModel` (the latents of a window of the
    pixel's dates around it).

    Args:
        autoencoders: the stage-1 autoencoders by sensor name; ``s1`` and ``s2`` are required, any other is a
            companion sensor (tokens in :func:`sensor_order`). Unless ``cfg.finetune_autoencoders`` is set, they
            are frozen in place (``requires_grad=False``) and kept in eval mode whatever ``train()`` says, so
            their dropout is off and their weights cannot change.
        cfg: the fusion architecture.
    """

    heads: nn.ModuleDict  # sensor -> the map from the whole embedding to its latent (set by each subclass)
    prefix_heads: nn.ModuleDict  # str(n) -> sensor -> the same from a nested prefix of n features

    def __init__(self, autoencoders: Mapping[str, SensorAutoencoder], cfg: FusionConfig):
        super().__init__()
        missing = [k for k in CORE_SENSORS if k not in autoencoders]
        if missing:
            raise ValueError(f"a fusion model needs the {missing} autoencoder(s), got {list(autoencoders)}")
        self.cfg = cfg
        self.autoencoders = nn.ModuleDict({k: autoencoders[k] for k in sensor_order(autoencoders)})

    def _finish(self) -> None:
        """Check the variants and freeze the autoencoders; subclasses call it once their layers exist."""
        anchor = self.anchor.cfg.variant
        for key, ae in self._aes():
            if ae.cfg.variant != anchor:
                raise ValueError(
                    f"the {key} autoencoder is '{ae.cfg.variant}' but S2 is '{anchor}'; train all with the same variant"
                )
        if not self.cfg.finetune_autoencoders:
            for _, ae in self._aes():
                ae.requires_grad_(False)
                ae.eval()

    def _aes(self) -> list[tuple[str, SensorAutoencoder]]:
        return list(self.sensor_autoencoders().items())

    def autoencoder(self, key: str) -> SensorAutoencoder:
        """Sensor ``key``'s autoencoder, typed: ``nn.ModuleDict`` hands its entries out as plain modules."""
        ae = self.autoencoders[key]
        if not isinstance(ae, SensorAutoencoder):  # __init__ fills it with these only; this narrows the type
            raise TypeError(f"the {key} autoencoder is a {type(ae).__name__}, not a SensorAutoencoder")
        return ae

    def sensor_autoencoders(self) -> dict[str, SensorAutoencoder]:
        """The autoencoders by sensor name in token order, typed (see :meth:`autoencoder`)."""
        return {k: self.autoencoder(k) for k in self.autoencoders}

    @property
    def sensors(self) -> tuple[str, ...]:
        """The sensor names in token order: ``s1``, ``s2``, then the companions."""
        return tuple(self.autoencoders)

    @property
    def companions(self) -> tuple[str, ...]:
        """The companion sensors (every sensor but S1 and S2), in token order."""
        return companions(self.autoencoders)

    @property
    def anchor(self) -> SensorAutoencoder:
        """The anchor (S2) autoencoder: its geometry (frames, context) is every sensor's."""
        return self.autoencoder(ANCHOR)

    @property
    def frozen(self) -> bool:
        """True when the autoencoders are frozen (the default)."""
        return not self.cfg.finetune_autoencoders

    @property
    def prefixes(self) -> tuple[int, ...]:
        """The embedding sizes the loss is applied to: ``cfg.nested``, or the whole embedding alone."""
        return self.cfg.prefixes

    def train(self, mode: bool = True) -> FusionBase:
        """Like ``nn.Module.train``, but frozen autoencoders always stay in eval mode."""
        super().train(mode)
        if self.frozen:
            for ae in self.autoencoders.values():
                ae.eval()
        return self

    def _fusion_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def head(self, sensor: str, n: int) -> nn.Module:
        """The map from an ``n``-feature embedding (the whole one or a nested prefix) to ``sensor``'s latent."""
        if n == self.cfg.embed_dim:
            return self.heads[sensor]
        if str(n) not in self.prefix_heads:
            raise ValueError(f"this model decodes {list(self.prefixes)} features, not {n}")
        heads = self.prefix_heads[str(n)]
        assert isinstance(heads, nn.ModuleDict)  # built so in __init__; this narrows the type
        return heads[sensor]

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        """The fusion layers' parameters only (what trains when the autoencoders are frozen).

        With ``finetune_autoencoders`` everything trains: optimise ``parameters()`` instead.
        """
        for module in self._fusion_modules():
            yield from module.parameters()

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """Disjoint named parts, for :func:`stembed.models.count_parameters`."""
        return {
            **{f"{k}_autoencoder": ae.parameters() for k, ae in self.autoencoders.items()},
            "fusion": self.fusion_parameters(),
        }

    def encode(self, inputs: Mapping[str, SensorInput]) -> dict[str, torch.Tensor]:
        """Every sensor's latent (B, latent_k), by sensor name in token order (no gradient when frozen)."""
        self._check_keys(inputs, "inputs")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return {k: ae.encode(inputs[k].x, inputs[k].gaps) for k, ae in self._aes()}

    def _check_keys(self, given: Iterable[str], what: str, need: Iterable[str] | None = None) -> None:
        need = list(self.sensors if need is None else need)
        if set(given) != set(need):
            raise ValueError(f"this fusion model needs {what} for {need}, got {sorted(given)}")


class FusionModel(FusionBase):
    """Every sensor's patches -> fused embedding ``e`` (B, embed_dim), and reconstructions of each (the paper's
    fusion: the latents of one date, one token per sensor).

    Args: as :class:`FusionBase`.
    """

    def __init__(self, autoencoders: Mapping[str, SensorAutoencoder], cfg: FusionConfig):
        super().__init__(autoencoders, cfg)
        order = self.sensors
        d = cfg.d_model
        # created in the order the two-sensor model always created them, so a seed gives the same weights
        self.project = nn.ModuleDict({k: nn.Linear(ae.cfg.latent_dim, d) for k, ae in self._aes()})
        self.type_embedding = nn.Embedding(len(order), d)  # one row per token, in sensor order
        self.pair_positions = nn.Embedding(cfg.max_pair_gap_days + 1, d)  # days between a sensor's and S2's dates
        self.transformer = make_transformer(  # pre-norm, over the sensor tokens
            d, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout, norm_first=True
        )
        self.norm = nn.LayerNorm(d)
        self.to_embedding = nn.Linear(d, cfg.embed_dim)
        latent_total = sum(ae.cfg.latent_dim for _, ae in self._aes())
        self.direct = nn.Linear(latent_total, cfg.embed_dim) if cfg.direct_path else None
        self.softplus = nn.Softplus()
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.embed_dim, ae.cfg.latent_dim) for k, ae in self._aes()})
        # nested embeddings: each shorter prefix gets heads of its own (the whole embedding uses ``heads``)
        self.prefix_heads = nn.ModuleDict({
            str(n): nn.ModuleDict({k: nn.Linear(n, ae.cfg.latent_dim) for k, ae in self._aes()})
            for n in cfg.prefixes[:-1]
        })
        self._finish()

    def _fusion_modules(self) -> list[nn.Module]:
        return [
            self.project, self.type_embedding, self.pair_positions, self.transformer, self.norm, self.to_embedding,
            self.heads, self.prefix_heads, *([self.direct] if self.direct is not None else []),
        ]

    def embed(self, inputs: Mapping[str, SensorInput]) -> torch.Tensor:
        """Fused embedding of each patch.

        Args:
            inputs: every sensor's :class:`SensorInput`, by sensor name. ``dt`` of each non-anchor sensor:
                days between its centre frame and the S2 date; its absolute value is rounded and clamped to
                [0, max_pair_gap_days] (the rows of the pair-position table); matching keeps it far below that
                limit in practice.

        Returns:
            e: (B, embed_dim), >= 0.
        """
        dt = {k: v.dt for k, v in inputs.items() if k != ANCHOR and v.dt is not None}
        lacking = [k for k in inputs if k != ANCHOR and k not in dt]
        if lacking:
            raise ValueError(f"the inputs of {lacking} need dt, their days to the S2 date")
        return self.fuse(self.encode(inputs), dt)

    def fuse(self, z: Mapping[str, torch.Tensor], dt: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The fusion layers alone: every sensor's latent (B, latent_k) + each non-anchor sensor's (B,) days to the
        S2 date -> e (B, embed_dim).

        ``dt`` becomes each token's pair position: S1 sits at 0 and S2 at |dt[s1]| (the paper's S1-S2 pair
        position), each companion at its own |dt|.
        """
        self._check_keys(z, "latents")
        self._check_keys(dt, "days to the S2 date", [k for k in self.sensors if k != ANCHOR])
        order = self.sensors
        B = z[ANCHOR].shape[0]
        tokens = torch.stack([self.project[k](z[k]) for k in order], dim=1)  # (B, N, d), N sensors
        tokens = tokens + self.type_embedding.weight  # (N, d) broadcast over the batch

        device = self.pair_positions.weight.device
        # the paper's pair position: S1 at day 0, S2 at the S1-S2 gap; a companion at its own gap to the S2 date
        days = {**dt, PAIRED: torch.zeros(B, device=device), ANCHOR: dt[PAIRED]}
        pair = torch.stack([days[k].to(device).reshape(B).float() for k in order], dim=1)
        pair = pair.abs()  # (B, N): S1 at 0, S2 at |dt| days, each companion at its |dt| to the S2 date
        pair = pair.round().long().clamp(0, self.cfg.max_pair_gap_days)
        tokens = tokens + self.pair_positions(pair) / math.sqrt(self.cfg.d_model)  # (B, N, d)

        tokens = run_transformer(self.transformer, tokens)  # (B, N, d), attention between the sensor tokens
        pooled = self.norm(tokens.mean(dim=1))  # (B, d)
        pre = self.to_embedding(pooled)  # (B, embed_dim)
        if self.direct is not None:  # the latents' scale, which the layer norm removed
            zz = torch.cat([z[k] for k in order], dim=1)  # (B, sum of latent sizes)
            # a broadcast sum, not a matmul: with so small an inner size BLAS rounds a row by its place in the
            # batch, and an embedding must not depend on its batch mates (bit for bit)
            pre = pre + (zz[:, None, :] * self.direct.weight).sum(-1) + self.direct.bias
        return self.softplus(pre)  # (B, embed_dim)

    def decode(self, e: torch.Tensor, gaps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reconstruct the patches of each sensor in ``gaps`` (any subset): (B, n) + its (B, T-1) day gaps ->
        (B, T, C_k, H, W), by sensor name; ``n`` is the embedding's size or one of its nested prefixes."""
        unknown = [k for k in gaps if k not in self.autoencoders]
        if unknown:
            raise ValueError(f"this fusion model has no sensor(s) {unknown}; it has {list(self.sensors)}")
        return {k: self.autoencoder(k).decode(self.head(k, e.shape[1])(e), g) for k, g in gaps.items()}

    def forward(self, inputs: Mapping[str, SensorInput]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns ``(reconstructions by sensor, e)``; see :meth:`embed`."""
        e = self.embed(inputs)
        return self.decode(e, {k: v.gaps for k, v in inputs.items()}), e


def build_fusion(models: Mapping[str, AEConfig], model: FusionConfig) -> FusionBase:
    """A fusion model (untrained autoencoders) from the configs a fusion bundle stores: the autoencoders' by sensor
    name (``models``) and the fusion layers' (``model``): the paper's :class:`FusionModel`, or with a ``window``
    the :class:`~stembed.models.context.ContextFusionModel`."""
    from stembed.models.context import ContextFusionModel

    aes = {k: SensorAutoencoder(v) for k, v in models.items()}
    return ContextFusionModel(aes, model) if model.window is not None else FusionModel(aes, model)


def paper_fusion(model: FusionBase, what: str) -> FusionModel:
    """``model`` if it is the paper's fusion of one date; ``what`` needs one (a context fusion has no per-date
    patches to hide or fuse)."""
    if not isinstance(model, FusionModel):
        raise ValueError(f"{what} needs the paper's fusion of one date, not a context fusion (model.window set)")
    return model
