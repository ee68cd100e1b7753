"""nn.Modules: multi-head attention over any mechanism, positional encodings, norms, blocks."""

from longattn.layers.attention import (
    GraphAttention,
    MultiHeadAttention,
    global_support,
    parse_mechanisms,
)
from longattn.layers.blocks import Decoder, DecoderBlock, Encoder, EncoderBlock, FeedForward
from longattn.layers.norms import (
    NORMS,
    LayerNorm,
    RMSNorm,
    SequenceBatchNorm,
    label_smoothing_cross_entropy,
    make_norm,
)
from longattn.layers.positional import (
    FrequencyEncoding,
    LearnedPositionalEncoding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_bias,
    alibi_slopes,
    frequency_encoding,
    sinusoidal_table,
)

__all__ = [
    "MultiHeadAttention", "GraphAttention", "global_support", "parse_mechanisms",
    "FeedForward", "EncoderBlock", "DecoderBlock", "Encoder", "Decoder",
    "LayerNorm", "RMSNorm", "SequenceBatchNorm", "NORMS", "make_norm",
    "label_smoothing_cross_entropy",
    "SinusoidalPositionalEncoding", "LearnedPositionalEncoding", "FrequencyEncoding",
    "RotaryEmbedding", "sinusoidal_table", "frequency_encoding", "alibi_slopes", "alibi_bias",
]
