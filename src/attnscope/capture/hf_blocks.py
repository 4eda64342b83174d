"""Query-block recompute for Hugging Face attention modules (long contexts).

A selected layer whose weights exceed one block (:mod:`attnscope.capture.blocks`) sees
its config's attention implementation set to :data:`IMPL`, a function registered with
transformers' ``AttentionInterface``. It receives the module's Q, K, V and mask exactly
as any implementation does (RoPE applied, relative bias and ALiBi passed as the family
passes them), computes the layer output with the fused SDPA function (or, for families
without SDPA support, with the family's own eager function, block by block), and hands
the weights to the sink in blocks of query rows: the family's own eager function runs on
each block of query rows with the matching rows of the mask (and of any per-row bias),
so the weights are exactly what ``output_attentions`` returns, one block at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IMPL", "Route", "register", "eager_of"]

IMPL = "attnscope_query_blocks"


@dataclass
class Route:
    """Where one attention module's weights go, and how its output is computed."""

    name: str  # archive array name
    sink: Any  # the Recorder: block_rows(b, h, t, s), block(name, r0, w, t), __call__
    eager: Callable[..., tuple[Tensor, Tensor]]  # the family's eager attention function
    fused: bool  # the family supports SDPA: the output comes from the fused kernel
    streamed: set[str] = field(default_factory=set)  # names streamed in the current run


#: id(attention module) -> its route, set by HFAdapter.observing for one run
ROUTES: dict[int, Route] = {}


def eager_of(module: nn.Module) -> Callable[..., Any] | None:
    """The ``eager_attention_forward`` of the module's modelling file, if it has one."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def register() -> None:
    """Register :data:`IMPL` with transformers (idempotent)."""
    from transformers import AttentionInterface

    if IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPL, _attention)


def _rows(x: Any, r0: int, r1: int, t: int) -> Any:
    """Rows ``[r0, r1)`` of a per-query-row tensor ``(B|1, H|1, T, S)``; others unchanged."""
    if isinstance(x, Tensor) and x.dim() == 4 and x.shape[-2] == t and t > 1:
        return x[:, :, r0:r1]
    return x


def _attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The registered implementation: output as usual, weights in blocks of rows."""
    route = ROUTES.get(id(module))
    if route is None:  # e.g. the module is called outside a capture run
        fn = eager_of(module)
        assert fn is not None, f"{type(module).__name__} has no eager attention function"
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                  **kwargs)  # fmt: skip
    b, h, t, _d = query.shape
    rows = route.sink.block_rows(b, h, t, key.shape[-2])
    if rows >= t:  # small enough: whole weights, through the site's hook
        return route.eager(module, query, key, value, attention_mask, scaling=scaling,
                           dropout=dropout, **kwargs)  # fmt: skip
    route.streamed.add(route.name)
    out = None
    if route.fused:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        scaling=scaling, dropout=dropout, **kwargs)  # fmt: skip
    parts = []
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        o, w = route.eager(
            module, query[:, :, r0:r1], key, value, _rows(attention_mask, r0, r1, t),
            scaling=scaling, dropout=dropout, **{k: _rows(v, r0, r1, t) for k, v in kwargs.items()},
        )  # fmt: skip
        if out is None:
            parts.append(o)
        route.sink.block(route.name, r0, w, t)
        del w
    if out is None:
        out = torch.cat(parts, dim=1)  # eager outputs are (B, rows, H, d)
    return out, None
