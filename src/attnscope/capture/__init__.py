"""Capture: run a PyTorch transformer and stream its attention into an archive."""

from attnscope.capture.model import (
    CausalSelfAttention,
    CrossAttention,
    NormalSelfAttention,
    Transformer,
    TransformerConfig,
)

__all__ = [
    "Transformer",
    "TransformerConfig",
    "NormalSelfAttention",
    "CausalSelfAttention",
    "CrossAttention",
]
