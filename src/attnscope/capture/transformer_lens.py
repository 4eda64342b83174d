"""TransformerLens models: every layer's ``hook_pattern``, layer by layer.

Supported: a TransformerLens 4 ``TransformerBridge`` (``TransformerBridge.boot_transformers``
wraps a Hugging Face model) and a TransformerLens 3 ``HookedTransformer`` or ``HookedEncoder``.
All name each layer's attention pattern ``blocks.{i}.attn.hook_pattern``, shaped ``(B, H, T, S)``
(``[batch, head_index, query_pos, key_pos]``), the tensor ``run_with_cache`` stores as
``cache["pattern", i]``. A bridge of an encoder-decoder model (T5) names them
``encoder_blocks.{i}.attn``, ``decoder_blocks.{i}.self_attn`` and ``.cross_attn``; its batches
also hold ``decoder_input_ids`` (and optionally ``decoder_attention_mask``).

One layer at a time
    A forward hook on each selected layer's ``hook_pattern`` (added through the model's
    own ``hooks()`` context manager, so it is removed when the run ends, even on an error)
    hands the pattern to the sink the moment that layer has run. No cache is kept.

Batches
    A ``(B, T)`` tensor of token ids, or a dict with ``input_ids`` and optionally
    ``attention_mask`` (e.g. ``dict(bridge.tokenizer(texts, padding=True,
    return_tensors="pt"))``); any other key is passed to the model's forward as a keyword.
    With a mask, the model is called with ``attention_mask=`` (a 3.x ``HookedEncoder``:
    ``one_zero_attention_mask=``); TransformerLens then masks the padded keys and derives
    positions for left padding. The archive is ragged like a Hugging Face capture's: padded
    rows and columns are stored as zeros.

Tokens
    With a tokenizer (``tokenizer=``, else the model's own ``model.tokenizer``), every
    sample's token ids and strings are stored.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnscope.capture.base import Adapter, Sink, describe, jsonable
from attnscope.contracts import KIND_AXES
from attnscope.errors import CaptureError, InputError
from attnscope.store.layout import SideLayout, TokenLayout

__all__ = ["TransformerLensAdapter", "is_transformer_lens", "pattern_hook"]

# TransformerLens config fields that say where the model runs, not what it computes: left
# out of the archive's model config, so a resume on another device is the same model
_RUN_FIELDS = frozenset({"device", "n_devices"})
# forward keywords of a 0/1 padding mask, first found wins (3.x HookedEncoder: the second)
_MASK_KWS = ("attention_mask", "one_zero_attention_mask")
# hook points of an encoder-decoder bridge, per stack and kind ({} = layer)
_ENC_DEC_HOOKS = {
    "encoder": {"self_attention": "encoder_blocks.{}.attn.hook_pattern"},
    "decoder": {
        "self_attention": "decoder_blocks.{}.self_attn.hook_pattern",
        "cross_attention": "decoder_blocks.{}.cross_attn.hook_pattern",
    },
}


def pattern_hook(layer: int) -> str:
    """TransformerLens's name of layer ``layer``'s attention pattern hook point."""
    return f"blocks.{layer}.attn.hook_pattern"


def is_transformer_lens(model: Any) -> bool:
    """Whether ``model``'s class (or a base class) comes from the ``transformer_lens`` package."""
    return any(c.__module__.split(".")[0] == "transformer_lens" for c in type(model).__mro__)


class TransformerLensAdapter(Adapter):
    """A TransformerLens ``TransformerBridge``, ``HookedTransformer`` or ``HookedEncoder``
    (see the module docstring).

    A causal model (``cfg.attention_dir == "causal"``) gives ``decoder/{i}/self_attention``,
    a bidirectional one ``encoder/{i}/self_attention``, one array per layer; an
    encoder-decoder bridge all three kinds.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        what = f"{type(model).__name__} (a TransformerLens model)"
        cfg = getattr(model, "cfg", None)
        n_layers = getattr(cfg, "n_layers", None)
        hook_dict = _hook_dict(model)
        if not isinstance(n_layers, int) or n_layers < 1 or hook_dict is None:
            raise CaptureError(
                f"cannot capture attention from {what}: expected a TransformerBridge, "
                "HookedTransformer or HookedEncoder with cfg.n_layers, hook points (hook_dict) "
                f"and a hooks() context manager, got cfg.n_layers={n_layers!r}"
                + ("" if hook_dict is not None else " and no hook_dict/hooks()")
            )
        hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
        self.enc_dec = bool(getattr(hf_cfg, "is_encoder_decoder", False))
        params = _parameters(model)
        # the forward's name of a 0/1 padding mask: HookedEncoder (3.x) calls it
        # one_zero_attention_mask; None: the model takes no mask
        self.mask_kw = next((k for k in _MASK_KWS if k in params), None)
        if self.enc_dec:
            self.points = _enc_dec_points(hook_dict, what)
            return
        missing = [pattern_hook(i) for i in range(n_layers) if pattern_hook(i) not in hook_dict]
        if missing:
            some = sorted(k for k in hook_dict if "pattern" in k)[:4]
            raise CaptureError(
                f"cannot capture attention from {what}: expected a hook point "
                f"blocks.<layer>.attn.hook_pattern for each of its {n_layers} layers, "
                f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} (pattern hook "
                f"points it has: {some or 'none'}); a model without attention patterns has "
                "no weights to capture"
            )
        causal = getattr(cfg, "attention_dir", "causal") == "causal"
        self.side = "decoder" if causal else "encoder"
        self.points = {f"{self.side}/{i}/self_attention": pattern_hook(i) for i in range(n_layers)}

    def names(self) -> list[str]:
        return list(self.points)

    def config(self) -> dict[str, Any]:
        cfg = self.model.cfg
        raw = cfg.to_dict() if callable(getattr(cfg, "to_dict", None)) else vars(cfg)
        out: dict[str, Any] = {
            "model": "transformer_lens." + type(self.model).__name__,
            "tl_config": jsonable({k: v for k, v in raw.items() if k not in _RUN_FIELDS}),
        }
        hf = getattr(self.model, "original_model", None)
        if callable(getattr(getattr(hf, "config", None), "to_dict", None)):
            out["hf_model"] = "transformers." + type(hf).__name__
            out["hf_config"] = jsonable(hf.config.to_dict())
        return out

    def attention_impl(self, wanted: Sequence[str]) -> dict[str, str]:
        hf_cfg = getattr(getattr(self.model, "original_model", None), "config", None)
        impl = getattr(hf_cfg, "_attn_implementation", None)
        ran = "TransformerLens hook_pattern" + (f" (Hugging Face {impl})" if impl else "")
        return describe(self.names(), wanted, ran, ran + ", not stored")

    # -- running --------------------------------------------------------------------------

    def batch_size(self, batch: Any) -> int:
        return int(_split(batch)[0].shape[0])

    def _sides(self, batch: Any) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Per side, ``(token ids (B, L), 0/1 mask (B, L) or None)``."""
        ids, mask, extra = _split(batch)
        if not self.enc_dec:
            return {self.side: (ids, mask)}
        dec = extra.get("decoder_input_ids")
        if not isinstance(dec, Tensor) or dec.dim() != 2 or dec.shape[0] != ids.shape[0]:
            raise InputError(
                f"{type(self.model).__name__} wraps an encoder-decoder model: a batch needs "
                "'decoder_input_ids', a (B, T) tensor with the batch size of 'input_ids' "
                f"{tuple(ids.shape)}, got {_describe(dec)}"
            )
        dmask = extra.get("decoder_attention_mask")
        if dmask is not None:
            _check_mask(dmask, dec, "decoder_attention_mask", "decoder_input_ids")
        return {"encoder": (ids, mask), "decoder": (dec, dmask)}

    def run(self, batch: Any, sink: Sink, wanted: set[str]) -> None:
        ids, mask, extra = _split(batch)
        sides = self._sides(batch)
        # per query side, the padded queries (None: no padding on that side)
        pad = {s: None if m is None or bool(m.all()) else ~m.bool() for s, (_i, m) in sides.items()}
        fired: set[str] = set()

        def hook_for(name: str) -> Any:
            stack, _layer, kind = name.split("/")
            rows = pad[KIND_AXES[(stack, kind)][0]]

            def hook(pattern: Tensor, hook: Any) -> None:
                fired.add(name)
                sink(name, pattern if rows is None else _uniform_rows(pattern, rows))

            return hook

        fwd = [(self.points[n], hook_for(n)) for n in self.names() if n in wanted]
        kwargs = dict(extra)
        if mask is not None:
            if self.mask_kw is None:
                raise InputError(
                    f"{type(self.model).__name__}.forward takes no attention mask (none of "
                    f"{list(_MASK_KWS)}), so a batch with 'attention_mask' cannot be run as "
                    "padded; pass batches of equal length without a mask"
                )
            kwargs[self.mask_kw] = mask
        with self.model.hooks(fwd_hooks=fwd):
            self.model(ids, return_type=None, **kwargs)
        silent = [self.points[n] for n in self.names() if n in wanted and n not in fired]
        if silent:
            raise CaptureError(
                f"{type(self.model).__name__}: hook point(s) {silent} did not fire during the "
                "forward, so TransformerLens computed no attention pattern there (this "
                "TransformerLens version does not hook that model's attention); capture the "
                "Hugging Face model itself, or another TransformerLens version"
            )

    # -- what a ragged archive stores ----------------------------------------------------

    def lengths(self, batch: Any) -> dict[str, int] | None:
        return {s: int(ids.shape[1]) for s, (ids, _m) in self._sides(batch).items()}

    def masks(self, batch: Any) -> dict[str, np.ndarray] | None:
        """Per side, True = real token; every side once any side has a mask (else None)."""
        sides = self._sides(batch)
        if all(m is None for _i, m in sides.values()):
            return None
        return {
            s: np.ones(tuple(ids.shape), dtype=bool) if m is None else _np(m).astype(bool)
            for s, (ids, m) in sides.items()
        }

    def tokens(self, batch: Any) -> dict[str, dict[str, Any]] | None:
        if self.tokenizer is None:
            return None
        out = {}
        for side, (t, _m) in self._sides(batch).items():
            ids = _np(t).astype(np.int64)
            to_tokens = self.tokenizer.convert_ids_to_tokens
            labels = [[str(x) for x in to_tokens(row)] for row in ids.tolist()]
            out[side] = {"ids": ids, "labels": labels}
        return out

    def layout(self, batch: Any, shapes: Mapping[str, tuple[int, ...]]) -> TokenLayout:
        """The sides of the arrays; with a tokenizer, labelled by the first sample's tokens."""
        base = super().layout(batch, shapes)
        toks = self.tokens(batch) or {}

        def side(name: str) -> SideLayout | None:
            lay = getattr(base, name)
            got = toks.get(name)
            if got is None or lay is None or len(got["labels"][0]) != lay.length:
                return lay
            return SideLayout.from_labels(got["labels"][0], name="text")

        return TokenLayout(side("encoder"), side("decoder"))


def _enc_dec_points(hook_dict: Mapping[str, Any], what: str) -> dict[str, str]:
    """Array name -> hook point of an encoder-decoder bridge (T5: ``encoder_blocks.{i}.attn``,
    ``decoder_blocks.{i}.self_attn`` / ``.cross_attn``), as deep as its hook points go."""
    out: dict[str, str] = {}
    for stack, groups in _ENC_DEC_HOOKS.items():
        i = 0
        while any(h.format(i) in hook_dict for h in groups.values()):
            for kind, h in groups.items():
                if h.format(i) not in hook_dict:
                    raise CaptureError(
                        f"cannot capture attention from {what}: its {stack} block {i} has no "
                        f"hook point {h.format(i)}"
                    )
                out[f"{stack}/{i}/{kind}"] = h.format(i)
            i += 1
    if not any(n.startswith("encoder/") for n in out) or not any(
        n.startswith("decoder/") for n in out
    ):
        some = sorted(k for k in hook_dict if "pattern" in k)[:4]
        raise CaptureError(
            f"cannot capture attention from {what}: it wraps an encoder-decoder model, "
            "expected hook points encoder_blocks.<layer>.attn.hook_pattern and "
            "decoder_blocks.<layer>.self_attn/cross_attn.hook_pattern, found "
            f"{some or 'no pattern hook points'}; capture the Hugging Face model itself: "
            "capture(bridge.original_model, batches, path)"
        )
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(name: str) -> tuple[bool, int, bool]:
    stack, layer, kind = name.split("/")
    return (stack != "encoder", int(layer), kind != "self_attention")


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}"
    return "none" if x is None else type(x).__name__


def _check_mask(mask: Any, ids: Tensor, key: str, id_key: str) -> None:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise InputError(
            f"{key} has {_describe(mask)} but {id_key} has {tuple(ids.shape)}; expected the "
            "same (B, T): one 0/1 entry per token"
        )


def _parameters(model: Any) -> set[str]:
    """Keyword names of the model's forward (every mask name when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: assume the 4.x name
        return {"attention_mask"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(params) | {"attention_mask"}
    return set(params)


def _hook_dict(model: Any) -> Mapping[str, Any] | None:
    """The model's hook points by name; None when it has no ``hooks()`` context manager."""
    if not callable(getattr(model, "hooks", None)):
        return None
    try:
        d = model.hook_dict
    except Exception:  # noqa: BLE001 - someone else's property: no hook points
        return None
    return d if isinstance(d, Mapping) else None


def _split(batch: Any) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """``(input_ids (B, T), attention_mask (B, T) or None, other forward keywords)``."""
    if isinstance(batch, Tensor):
        ids, mask, extra = batch, None, {}
    elif isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        got = type(batch).__name__
        if isinstance(batch, Mapping):
            got = f"a dict with keys {sorted(map(str, batch))}"
        raise InputError(
            "a TransformerLens batch must be a (B, T) tensor of token ids or a dict with "
            f"'input_ids' (and optionally 'attention_mask'), got {got}; tokenize text first, "
            "e.g. dict(model.tokenizer(texts, padding=True, return_tensors='pt'))"
        )
    if ids.dim() != 2 or ids.is_floating_point():
        raise InputError(
            f"TransformerLens input_ids must be a (B, T) integer tensor, got shape "
            f"{tuple(ids.shape)} of {ids.dtype}"
        )
    if mask is not None:
        _check_mask(mask, ids, "attention_mask", "input_ids")
    return ids, mask, extra


def _uniform_rows(w: Tensor, pad: Tensor) -> Tensor:
    """``w (B, H, T, S)`` with the rows of padded queries (``pad (B, T)`` True) uniform.

    A padded query is no real token's attention and the archive stores its row as zeros;
    TransformerLens leaves it uniform (``TransformerBridge``) or all zero
    (``HookedTransformer`` with left padding). Uniform rows keep the recorder's row check,
    which covers every row, about the real ones.
    """
    fill = torch.full((), 1.0 / w.shape[-1], dtype=w.dtype, device=w.device)
    return torch.where(pad.to(w.device)[:, None, :, None], fill, w)


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
