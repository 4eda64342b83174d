"""The reference encoder-decoder Transformer with multi-modal token groups.

Inputs are dicts of modality name -> tensor ``(B, n_tokens, embed_dim)``; each dict is
concatenated in its insertion order into one sequence (encoder length ``S``, decoder
length ``T``). Attention runs through the fused
:func:`torch.nn.functional.scaled_dot_product_attention` unless weights are wanted, in
which case an explicit softmax path computes the same output and keeps the weights.

Examples
--------
>>> model = Transformer(embed_dim=64, context_length=32, num_heads=4,
...                     num_encoder_layers=2, num_decoder_layers=2)
>>> enc = {"text": torch.randn(2, 5, 64), "agentview_image": torch.randn(2, 9, 64)}
>>> dec = {"text": torch.randn(2, 7, 64)}
>>> model.enable_attention_storage()
>>> out, w = model(enc, dec, return_attention_weights=True)
>>> w["decoder"][0]["cross_attention"].shape
torch.Size([2, 4, 7, 14])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnscope.errors import ConfigError, InputError, ShapeError
from attnscope.store.layout import SideLayout, TokenGroup, TokenLayout

__all__ = [
    "TransformerConfig",
    "Transformer",
    "NormalSelfAttention",
    "CausalSelfAttention",
    "CrossAttention",
    "AttentionWeights",
]

# {'encoder': [{'self_attention': (B,H,S,S)}, ...],
#  'decoder': [{'self_attention': (B,H,T,T), 'cross_attention': (B,H,T,S)}, ...]}
AttentionWeights = dict[str, list[dict[str, Tensor | None]]]


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of :class:`Transformer`; saved verbatim as JSON in archives."""

    embed_dim: int  # model width D; every modality tensor is (B, n, D)
    context_length: int  # max tokens per side (learned positional embeddings)
    num_heads: int  # attention heads per layer; D must divide by it
    num_encoder_layers: int
    num_decoder_layers: int
    dropout: float = 0.0  # on attention weights, residual branches and MLP
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * D
    output_dim: int | None = None  # optional linear head on the decoder output

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "output_dim" and value is None:
                continue
            if f.name == "dropout":
                ok, want = isinstance(value, numbers.Real), "a number"
            else:
                ok, want = isinstance(value, numbers.Integral), "an integer"
            if isinstance(value, bool) or not ok:
                raise ConfigError(f"{f.name} is {value!r}; expected {want}")
        for name in ("embed_dim", "context_length", "num_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_json(self) -> dict[str, Any]:
        return {"model": "attnscope.Transformer", **asdict(self)}


class _Attention(nn.Module):
    """Multi-head attention with an optional weight-returning path.

    ``store_attention`` keeps the last softmax weights ``(B, H, T, S)`` (detached) in
    ``attention_weights``; ``return_attention=True`` returns them from ``forward``.
    """

    causal = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.store_attention = False
        self.attention_weights: Tensor | None = None
        # capture's query-block recompute: called with (q, k) each (B, H, L, hd) after
        # the fused path ran (attnscope.capture.blocks)
        self.qk_hook: Callable[[Tensor, Tensor], None] | None = None

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)

    def _attend(
        self, x: Tensor, memory: Tensor, return_attention: bool
    ) -> tuple[Tensor, Tensor | None]:
        q = self._heads(self.q_proj(x))  # (B, H, T, hd)
        k, v = (self._heads(t) for t in self.kv_proj(memory).chunk(2, dim=-1))  # (B, H, S, hd)
        p = self.dropout if self.training else 0.0
        want = return_attention or self.store_attention
        if not want:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
            att = None
            if self.qk_hook is not None:
                self.qk_hook(q, k)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B,H,T,S)
            if self.causal:
                T, S = scores.shape[-2:]
                mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            att = scores.softmax(dim=-1)
            y = F.dropout(att, p=p, training=self.training) @ v
        y = y.transpose(1, 2).reshape(x.shape)  # (B, T, D)
        y = self.out_proj(y)
        if att is not None:
            att = att.detach()
            self.attention_weights = att if self.store_attention else None
        return y, att


class NormalSelfAttention(_Attention):
    """Bidirectional self-attention (encoder): weights ``(B, H, S, S)``."""

    def forward(self, x: Tensor, return_attention: bool = False) -> Any:
        y, att = self._attend(x, x, return_attention)
        return (y, att) if return_attention else y


class CausalSelfAttention(_Attention):
    """Causal self-attention (decoder): weights ``(B, H, T, T)``, zero above the diagonal."""

    causal = True

    def forward(self, x: Tensor, return_attention: bool = False) -> Any:
        y, att = self._attend(x, x, return_attention)
        return (y, att) if return_attention else y


class CrossAttention(_Attention):
    """Decoder queries ``(B, T, D)`` attending to encoder memory ``(B, S, D)``: ``(B, H, T, S)``."""

    def forward(self, x: Tensor, memory: Tensor, return_attention: bool = False) -> Any:
        y, att = self._attend(x, memory, return_attention)
        return (y, att) if return_attention else y


def _mlp(cfg: TransformerConfig) -> nn.Sequential:
    hidden = cfg.mlp_ratio * cfg.embed_dim
    return nn.Sequential(
        nn.Linear(cfg.embed_dim, hidden),
        nn.GELU(),
        nn.Linear(hidden, cfg.embed_dim),
        nn.Dropout(cfg.dropout),
    )


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.embed_dim)
        self.self_attn = NormalSelfAttention(cfg.embed_dim, cfg.num_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = _mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.self_attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.embed_dim)
        self.self_attn = CausalSelfAttention(cfg.embed_dim, cfg.num_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.embed_dim)
        self.cross_attn = CrossAttention(cfg.embed_dim, cfg.num_heads, cfg.dropout)
        self.ln3 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = _mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        x = x + self.drop(self.self_attn(self.ln1(x)))
        x = x + self.drop(self.cross_attn(self.ln2(x), memory))
        return x + self.mlp(self.ln3(x))


class Transformer(nn.Module):
    """Encoder-decoder Transformer over dicts of modality tokens.

    Parameters
    ----------
    embed_dim, context_length, num_heads, num_encoder_layers, num_decoder_layers, dropout
        See :class:`TransformerConfig`; extra keyword arguments (``mlp_ratio``,
        ``output_dim``) go there too.
    token_groups
        Typed token groups of the layout, ``{modality: spec}``, e.g. ``{"agentview_image":
        {"kind": "image", "grid": [3, 3], "camera": "agentview"}, "robot0_eef_pos":
        "state"}`` (:meth:`attnscope.store.layout.TokenLayout.with_groups`); stored in the
        archive's layout. Kinds are checked here, grids against token counts per layout.

    ``forward(enc, dec)`` returns the decoder output ``(B, T, D)`` (or ``(B, T,
    output_dim)``). With ``return_attention_weights=True`` it returns
    ``(output, weights)``; weights are computed for that call even when storage is
    disabled (storage only controls whether modules *keep* them afterwards).
    """

    def __init__(
        self,
        embed_dim: int,
        context_length: int,
        num_heads: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dropout: float = 0.0,
        *,
        token_groups: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.token_groups = _parse_groups(token_groups)
        self.config = TransformerConfig(
            embed_dim,
            context_length,
            num_heads,
            num_encoder_layers,
            num_decoder_layers,
            dropout,
            **kwargs,
        )
        cfg = self.config
        self.enc_pos = nn.Embedding(cfg.context_length, cfg.embed_dim)
        self.dec_pos = nn.Embedding(cfg.context_length, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(num_decoder_layers))
        self.enc_ln = nn.LayerNorm(cfg.embed_dim)
        self.dec_ln = nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, cfg.output_dim) if cfg.output_dim else nn.Identity()
        self.last_layout: TokenLayout | None = None

    @classmethod
    def from_config(cls, cfg: TransformerConfig | Mapping[str, Any]) -> Transformer:
        """Build from a :class:`TransformerConfig` or its JSON dict."""
        groups = None
        if isinstance(cfg, Mapping):
            groups = cfg.get("token_groups")
            cfg = {k: v for k, v in cfg.items() if k not in ("model", "token_groups")}
            unknown = sorted(set(cfg) - {f.name for f in fields(TransformerConfig)})
            if unknown:
                raise ConfigError(
                    f"unknown model config key(s) {unknown}; expected TransformerConfig fields "
                    f"{[f.name for f in fields(TransformerConfig)]}"
                )
            try:
                cfg = TransformerConfig(**cfg)
            except TypeError as e:  # a missing field
                raise ConfigError(f"bad model config: {e}") from e
        return cls(**asdict(cfg), token_groups=groups)

    # -- attention storage (the guide's public surface) --------------------------------
    def attention_modules(self) -> dict[str, _Attention]:
        """Attention modules by archive array name, e.g. ``"decoder/1/cross_attention"``."""
        mods: dict[str, _Attention] = {}
        for i, layer in enumerate(self.encoder_layers):
            mods[f"encoder/{i}/self_attention"] = layer.self_attn
        for i, layer in enumerate(self.decoder_layers):
            mods[f"decoder/{i}/self_attention"] = layer.self_attn
            mods[f"decoder/{i}/cross_attention"] = layer.cross_attn
        return mods

    def enable_attention_storage(self) -> None:
        """Make every attention module keep its last weights (explicit softmax path)."""
        for m in self.attention_modules().values():
            m.store_attention = True

    def disable_attention_storage(self) -> None:
        """Back to the fused SDPA path, and free the stored weights."""
        for m in self.attention_modules().values():
            m.store_attention = False
            m.attention_weights = None

    def get_attention_weights(self) -> AttentionWeights:
        """The stored weights in the guide's nested structure (``None`` where not stored)."""
        return {
            "encoder": [
                {"self_attention": layer.self_attn.attention_weights}
                for layer in self.encoder_layers
            ],
            "decoder": [
                {
                    "self_attention": layer.self_attn.attention_weights,
                    "cross_attention": layer.cross_attn.attention_weights,
                }
                for layer in self.decoder_layers
            ],
        }

    # -- inputs ---------------------------------------------------------------------------
    def _concat(self, side: str, tokens: Any) -> tuple[Tensor, SideLayout]:
        if not isinstance(tokens, Mapping):
            raise InputError(
                f"{side} must be a dict of modality name -> tensor (B, n_tokens, "
                f"{self.config.embed_dim}), got {type(tokens).__name__}"
            )
        if not tokens:
            raise ShapeError(f"{side} dict is empty; expected at least one modality")
        D = self.config.embed_dim
        batch: int | None = None
        parts = []
        for name, t in tokens.items():
            if not isinstance(t, Tensor):
                raise InputError(
                    f"{side}[{name!r}] must be a torch.Tensor of shape (B, n_tokens, {D}), "
                    f"got {type(t).__name__}"
                )
            if t.dim() != 3 or t.shape[-1] != D or t.shape[1] < 1:
                raise ShapeError(
                    f"{side}[{name!r}] has shape {tuple(t.shape)}; expected (B, n_tokens, {D})"
                )
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise ShapeError(
                    f"{side}[{name!r}] has batch size {t.shape[0]}; expected {batch} like the "
                    "modalities before it"
                )
            parts.append(t)
        layout = SideLayout.from_lengths((name, t.shape[1]) for name, t in tokens.items())
        if layout.length > self.config.context_length:
            raise ShapeError(
                f"{side} sequence has {layout.length} tokens "
                f"({', '.join(f'{s.name}={len(s)}' for s in layout.segments)}); expected at most "
                f"context_length={self.config.context_length}"
            )
        return torch.cat(parts, dim=1), layout

    def token_layout(
        self,
        enc: Mapping[str, Tensor],
        dec: Mapping[str, Tensor],
        groups: Mapping[str, Any] | None = None,
    ) -> TokenLayout:
        """Modality segments and token labels of both sides, without running the model,
        typed by ``groups`` (default: the model's ``token_groups``)."""
        lay = TokenLayout(self._concat("enc", enc)[1], self._concat("dec", dec)[1])
        return lay.with_groups(self.token_groups if groups is None else groups)

    # -- forward --------------------------------------------------------------------------
    def forward(
        self,
        enc: Mapping[str, Tensor],
        dec: Mapping[str, Tensor],
        return_attention_weights: bool = False,
    ) -> Any:
        """Run the model.

        Parameters
        ----------
        enc, dec
            Modality name -> ``(B, n_tokens, D)``; concatenated in dict order.
        return_attention_weights
            Also return the weights (guide structure, detached).

        Returns
        -------
        ``output (B, T, D)`` or ``(output, weights)``.
        """
        x_enc, enc_layout = self._concat("enc", enc)
        x_dec, dec_layout = self._concat("dec", dec)
        if x_enc.shape[0] != x_dec.shape[0]:
            raise ShapeError(
                f"enc has batch size {x_enc.shape[0]} but dec has {x_dec.shape[0]}; expected equal"
            )
        self.last_layout = TokenLayout(enc_layout, dec_layout).with_groups(self.token_groups)
        mods = self.attention_modules().values()
        forced = [m for m in mods if not m.store_attention] if return_attention_weights else []
        for m in forced:
            m.store_attention = True
        try:
            S, T = x_enc.shape[1], x_dec.shape[1]
            h = self.drop(x_enc + self.enc_pos(torch.arange(S, device=x_enc.device)))
            for layer in self.encoder_layers:
                h = layer(h)
            memory = self.enc_ln(h)
            y = self.drop(x_dec + self.dec_pos(torch.arange(T, device=x_dec.device)))
            for layer in self.decoder_layers:
                y = layer(y, memory)
            out = self.head(self.dec_ln(y))
            if not return_attention_weights:
                return out
            return out, self.get_attention_weights()
        finally:
            for m in forced:
                m.store_attention = False
                m.attention_weights = None


def _parse_groups(groups: Mapping[str, Any] | None) -> dict[str, TokenGroup]:
    """Token group specs checked up front (kinds, grids); lengths are checked per layout."""
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise ConfigError(
            f"token_groups must be a dict of modality -> spec, got {type(groups).__name__}"
        )
    return {str(k): TokenGroup.from_json(v) for k, v in groups.items()}
