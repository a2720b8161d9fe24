"""Neural networks of stembed: per-sensor autoencoders and the S1+S2 fusion model (spec §3)."""

from stembed.models.autoencoder import SensorAutoencoder, SensorDecoder, SensorEncoder
from stembed.models.fusion import FusionModel
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
    "SpatialAttention",
    "TemporalPositionalEmbedding",
    "count_parameters",
    "positions_from_gaps",
]
