"""Neural networks of stembed: per-sensor autoencoders and the fusion model over them (spec §3)."""

from stembed.models.autoencoder import SensorAutoencoder, SensorDecoder, SensorEncoder
from stembed.models.fusion import FusionModel, SensorInput
from stembed.models.layers import (
    CBAM,
    ChannelAttention,
    ConvAttnBlock,
    MultiScaleBlock,
    SpatialAttention,
    TemporalPositionalEmbedding,
    count_parameters,
    positions_from_gaps,
)

__all__ = [
    "CBAM",
    "ChannelAttention",
    "ConvAttnBlock",
    "FusionModel",
    "MultiScaleBlock",
    "SensorAutoencoder",
    "SensorDecoder",
    "SensorEncoder",
    "SensorInput",
    "SpatialAttention",
    "TemporalPositionalEmbedding",
    "count_parameters",
    "positions_from_gaps",
]
