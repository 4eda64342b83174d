"""Adapters that pull per-head attention out of a model through hooks.

An adapter knows one family of models: how to run a batch, which attention modules
exist (by archive array name, e.g. ``"decoder/1/cross_attention"``), and how to turn a
batch into a :class:`~attnscope.store.layout.TokenLayout`. Hooks live only inside
one ``run`` and are removed in ``finally``.

Supported: the reference :class:`~attnscope.capture.model.Transformer`,
``torch.nn.MultiheadAttention`` (alone or in ``nn.TransformerEncoder`` /
``nn.TransformerDecoder`` / ``nn.Transformer``), and Hugging Face ``transformers``
models (:mod:`attnscope.capture.hf`: hooks on the attention modules, layer by layer), and
TransformerLens models (:mod:`attnscope.capture.transformer_lens`: each layer's
``hook_pattern``).
A ``torch.compile``d model is captured through the module it wraps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnscope.capture.base import Adapter, Sink, call_model, describe, first_tensor
from attnscope.capture.blocks import softmax_blocks
from attnscope.capture.hf import HFAdapter
from attnscope.capture.model import Transformer
from attnscope.capture.transformer_lens import TransformerLensAdapter, is_transformer_lens
from attnscope.contracts import KIND_AXES
from attnscope.errors import CaptureError, InputError, SelectionError
from attnscope.store.layout import TokenLayout

__all__ = [
    "Adapter", "ReferenceAdapter", "TorchMHAAdapter", "HFAdapter", "TransformerLensAdapter",
    "adapter_for",
]  # fmt: skip


class ReferenceAdapter(Adapter):
    """The reference Transformer. Batches are ``(enc, dec)`` or ``{"enc": …, "dec": …}``.

    Only wanted modules leave the fused SDPA path: the others run as fast as plain inference.
    Every batch has the token counts of the model's modalities (no ragged archives).
    """

    ragged_ok = False

    def __init__(self, model: Transformer) -> None:
        self.model = model

    def names(self) -> list[str]:
        return list(self.model.attention_modules())

    @staticmethod
    def _split(batch: Any) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
        if isinstance(batch, Mapping) and "enc" in batch and "dec" in batch:
            return batch["enc"], batch["dec"]
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            return batch[0], batch[1]
        raise InputError(
            "a reference-model batch must be (enc, dec) or {'enc': ..., 'dec': ...}, "
            f"got {type(batch).__name__}"
        )

    def batch_size(self, batch: Any) -> int:
        return first_tensor(self._split(batch)[0]).shape[0]

    def layout(self, batch: Any, shapes: Mapping[str, tuple[int, ...]]) -> TokenLayout:
        return self.model.token_layout(*self._split(batch))

    def lengths(self, batch: Any) -> dict[str, int]:
        enc, dec = self._split(batch)
        return {"encoder": _tokens(enc), "decoder": _tokens(dec)}

    def config(self) -> dict[str, Any]:
        return self.model.config.to_json()

    def attention_impl(self, wanted: Sequence[str]) -> dict[str, str]:
        blocks = "explicit softmax; over one block: sdpa output, weights recomputed in query blocks"
        return describe(self.names(), wanted, blocks, "sdpa (fused, not stored)")

    def run(self, batch: Any, sink: Sink, wanted: set[str]) -> None:
        enc, dec = self._split(batch)
        mods = {n: m for n, m in self.model.attention_modules().items() if n in wanted}
        blocks = self._block_rows(enc, dec, mods, sink)
        handles = []
        saved = {n: (m.store_attention, m.qk_hook) for n, m in mods.items()}

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                w = module.attention_weights
                module.attention_weights = None
                if w is not None:
                    sink(name, w)

            return hook

        def qk_hook_for(name: str, module: nn.Module, rows: int) -> Callable[..., None]:
            scale = 1.0 / math.sqrt(module.head_dim)

            def qk_hook(q: Tensor, k: Tensor) -> None:
                t = q.shape[2]
                for r0, w in softmax_blocks(q, k, scale=scale, rows=rows, causal=module.causal):
                    sink.block(name, r0, w, t)  # type: ignore[attr-defined]

            return qk_hook

        try:
            for n, m in mods.items():
                if n in blocks:  # fused output, weights recomputed in blocks of rows
                    m.qk_hook = qk_hook_for(n, m, blocks[n])
                    continue
                m.store_attention = True
                handles.append(m.register_forward_hook(hook_for(n)))
            self.model(enc, dec)
        finally:
            for h in handles:
                h.remove()
            for n, m in mods.items():
                m.store_attention, m.qk_hook = saved[n]

    def _block_rows(
        self, enc: Mapping[str, Tensor], dec: Mapping[str, Tensor], mods: Mapping[str, Any],
        sink: Sink,
    ) -> dict[str, int]:  # fmt: skip
        """Rows per block of each module streamed in blocks (the others: whole arrays)."""
        rows_of = getattr(sink, "block_rows", None)
        if rows_of is None:
            return {}
        side = self.lengths((enc, dec))
        b, h = first_tensor(enc).shape[0], self.model.config.num_heads
        out = {}
        for name in mods:
            stack, _layer, kind = name.split("/")
            qs, ks = KIND_AXES[(stack, kind)]
            rows = rows_of(b, h, side[qs], side[ks])
            if rows < side[qs]:
                out[name] = rows
        return out


def _tokens(side: Mapping[str, Tensor]) -> int:
    """Tokens of one side: the modality tensors ``(B, n, D)`` laid end to end."""
    return sum(int(t.shape[1]) for t in side.values() if isinstance(t, Tensor))


class TorchMHAAdapter(Adapter):
    """Models built from ``torch.nn.MultiheadAttention``.

    Names: MHA inside an ``nn.TransformerEncoderLayer`` is ``encoder/{i}/self_attention``;
    inside an ``nn.TransformerDecoderLayer``, ``self_attn`` is ``decoder/{i}/self_attention``
    and ``multihead_attn`` is ``decoder/{i}/cross_attention``; any other MHA module is
    ``encoder/{i}/self_attention`` in module order. Batches are a tensor, a tuple of
    positional arguments, or a dict of keyword arguments for ``model(...)``.
    The MHA fast path (which skips the Python module) is switched off while recording.
    Every batch has the first batch's lengths (no ragged archives).
    """

    ragged_ok = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: dict[str, nn.MultiheadAttention] = {}
        enc = dec = other = 0
        for _, mod in model.named_modules():
            if isinstance(mod, nn.TransformerEncoderLayer):
                self.modules[f"encoder/{enc}/self_attention"] = mod.self_attn
                enc += 1
            elif isinstance(mod, nn.TransformerDecoderLayer):
                self.modules[f"decoder/{dec}/self_attention"] = mod.self_attn
                self.modules[f"decoder/{dec}/cross_attention"] = mod.multihead_attn
                dec += 1
        seen = {id(m) for m in self.modules.values()}
        for _, mod in model.named_modules():
            if isinstance(mod, nn.MultiheadAttention) and id(mod) not in seen:
                self.modules[f"encoder/{enc + other}/self_attention"] = mod
                other += 1
        if not self.modules:
            raise CaptureError(f"{type(model).__name__} has no nn.MultiheadAttention modules")
        self.batch_first = all(m.batch_first for m in self.modules.values())
        if not self.batch_first:
            warnings.warn(
                "MultiheadAttention with batch_first=False: batch size is read from dim 1",
                stacklevel=3,
            )

    def names(self) -> list[str]:
        return list(self.modules)

    def attention_impl(self, wanted: Sequence[str]) -> dict[str, str]:
        return describe(
            self.names(), wanted, "MultiheadAttention need_weights (math path); over one "
            "block: fused output, weights recomputed in query blocks",
            "MultiheadAttention (weights not stored)",
        )  # fmt: skip

    def batch_size(self, batch: Any) -> int:
        t = first_tensor(batch)
        return t.shape[0] if self.batch_first else t.shape[1]

    def run(self, batch: Any, sink: Sink, wanted: set[str]) -> None:
        handles = []
        pending: dict[int, tuple[Tensor, Tensor, Tensor | None, bool, int]] = {}
        rows_of = getattr(sink, "block_rows", None)

        def pre(module: nn.Module, args: Any, kwargs: dict) -> tuple[Any, dict]:
            kwargs = dict(kwargs)
            blocks = _mha_inputs(module, args, kwargs) if rows_of is not None else None
            if blocks is not None:
                q, k, mask, causal = blocks
                rows = rows_of(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
                if rows < q.shape[2]:  # fused output; weights recomputed in the hook
                    pending[id(module)] = (q, k, mask, causal, rows)
                    kwargs["need_weights"] = False
                    args = args[:4] + (False,) + args[5:] if len(args) > 4 else args
                    return args, kwargs
            kwargs["need_weights"] = True
            kwargs["average_attn_weights"] = False
            return args, kwargs

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
                if id(module) in pending:
                    q, k, mask, causal, rows = pending.pop(id(module))
                    scale = 1.0 / math.sqrt(q.shape[-1])
                    for r0, w in softmax_blocks(
                        q, k, scale=scale, rows=rows, causal=causal, mask=mask
                    ):
                        sink.block(name, r0, w, q.shape[2])  # type: ignore[attr-defined]
                    return
                w = output[1]
                if w is None:
                    raise CaptureError(f"{name}: MultiheadAttention returned no weights")
                if w.dim() == 3:  # unbatched input: (H, T, S)
                    w = w.unsqueeze(0)
                sink(name, w)

            return hook

        fast = torch.backends.mha.get_fastpath_enabled()
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            for n, m in self.modules.items():
                if n in wanted:
                    handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                    handles.append(m.register_forward_hook(hook_for(n), with_kwargs=True))
            call_model(self.model, batch)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
            for h in handles:
                h.remove()


def _mha_inputs(
    m: nn.MultiheadAttention, args: tuple, kwargs: dict
) -> tuple[Tensor, Tensor, Tensor | None, bool] | None:
    """``(q, k, additive mask, causal)`` of one MultiheadAttention call, as its math path
    computes them: q, k ``(B, H, L, d)``, the mask broadcastable to ``(B, H, T, S)``.

    ``None`` for what the recompute does not mirror (``bias_k``, ``add_zero_attn``).
    """
    if m.bias_k is not None or m.add_zero_attn:
        return None
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")  # fmt: skip
    got = {**dict(zip(names, args)), **kwargs}
    query, key = got["query"], got["key"]
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query.unsqueeze(0), key.unsqueeze(0)
    elif not m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    e, h = m.embed_dim, m.num_heads
    if m._qkv_same_embed_dim:
        wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bias = m.in_proj_bias
    bq, bk = (None, None) if bias is None else (bias[:e], bias[e : 2 * e])
    b, t, s = query.shape[0], query.shape[1], key.shape[1]
    q = F.linear(query, wq, bq).view(b, t, h, e // h).transpose(1, 2)
    k = F.linear(key, wk, bk).view(b, s, h, e // h).transpose(1, 2)
    mask = None
    am, kpm = got.get("attn_mask"), got.get("key_padding_mask")
    if am is not None:
        am = _additive(am, q.dtype)
        mask = am.view(b, h, t, s) if am.dim() == 3 else am.view(1, 1, t, s)
    if kpm is not None:
        kpm = _additive(kpm, q.dtype).view(-1, 1, 1, s)
        mask = kpm if mask is None else mask + kpm
    causal = bool(got.get("is_causal")) and am is None
    return q, k, mask, causal


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A MultiheadAttention mask (bool: True = masked; float: added) as an additive mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def unwrap_compiled(model: Any) -> Any:
    """The module a ``torch.compile``d model wraps (``OptimizedModule._orig_mod``).

    Capture hooks the Python modules and switches attention implementations; a compiled
    graph would bypass the hooks or recompile, so the original module runs instead. It
    shares the parameters, so the parameter hash is that of the uncompiled model.
    """
    while isinstance(model, nn.Module) and type(model).__name__ == "OptimizedModule":
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def adapter_for(model: nn.Module, tokenizer: Any = None) -> Adapter:
    """Pick the adapter for ``model``; raise :class:`CaptureError` if none fits."""
    if isinstance(model, Adapter):
        return model
    model = unwrap_compiled(model)
    if isinstance(model, Transformer):
        return ReferenceAdapter(model)
    if is_transformer_lens(model):  # before HF: a TransformerBridge holds a HF config
        return TransformerLensAdapter(model, tokenizer)
    if _is_hf(model):
        return HFAdapter(model, tokenizer)
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return TorchMHAAdapter(model)
    raise CaptureError(
        f"cannot capture attention from {type(model).__name__}: it is not an attnscope "
        "Transformer, a Hugging Face model, a TransformerLens model, or a model built from "
        "nn.MultiheadAttention. Subclass attnscope.capture.adapters.Adapter to report its weights"
    )


def iter_wanted(names: Sequence[str], layers: Any, kinds: Any) -> Iterator[str]:
    """Filter array names by layer indices and kinds (``None`` keeps all)."""
    for n in names:
        stack, layer, kind = n.split("/")
        if layers is not None and int(layer) not in layers and n not in layers:
            continue
        if kinds is not None and kind not in kinds and f"{stack}/{kind}" not in kinds:
            continue
        yield n


def resolve_selection(
    adapter: Adapter,
    layers: Sequence[int | str] | None,
    kinds: Sequence[str] | None,
) -> list[str]:
    """The array names a ``layers=`` / ``kinds=`` selection keeps, in archive order."""
    names = adapter.names()
    if layers is not None:
        known = {int(n.split("/")[1]) for n in names} | set(names)
        bad = [x for x in layers if x not in known]
        if bad:
            raise SelectionError(
                f"unknown layer(s) {bad}; this model has layers "
                f"{sorted({int(n.split('/')[1]) for n in names})}"
            )
    if kinds is not None:
        known_k = {n.split("/")[2] for n in names} | {"/".join(n.split("/")[::2]) for n in names}
        bad = [k for k in kinds if k not in known_k]
        if bad:
            raise SelectionError(f"unknown kind(s) {bad}; expected one of {sorted(known_k)}")
    wanted = list(iter_wanted(names, layers, kinds))
    if not wanted:
        raise SelectionError(f"the selection keeps no attention array; available: {names}")
    return wanted
