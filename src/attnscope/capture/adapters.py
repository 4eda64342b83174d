"""Adapters that pull per-head attention out of a model through hooks.

An adapter knows one family of models: how to run a batch, which attention modules
exist (by archive array name, e.g. ``"decoder/1/cross_attention"``), and how to turn a
batch into a :class:`~attnscope.store.layout.TokenLayout`. Hooks live only inside
:meth:`Adapter.recording` and are removed in ``finally``.

Supported: the reference :class:`~attnscope.capture.model.Transformer`,
``torch.nn.MultiheadAttention`` (alone or in ``nn.TransformerEncoder`` /
``nn.TransformerDecoder`` / ``nn.Transformer``), and Hugging Face ``transformers``
models (through ``output_attentions`` with the eager attention implementation).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnscope.capture.model import Transformer
from attnscope.errors import CaptureError, InputError
from attnscope.store.layout import SideLayout, TokenLayout

__all__ = ["Adapter", "ReferenceAdapter", "TorchMHAAdapter", "HFAdapter", "adapter_for"]

# A sink receives (array name, weights (B, H, T, S) on the model's device).
Sink = Callable[[str, Tensor], None]


class Adapter:
    """Base class: run batches of one model family and report attention to a sink."""

    model: nn.Module

    def names(self) -> list[str]:
        """Array names this model can produce, in archive order."""
        raise NotImplementedError

    def run(self, batch: Any, sink: Sink, wanted: set[str]) -> None:
        """Run one batch; call ``sink(name, weights)`` for each name in ``wanted``."""
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        raise NotImplementedError

    def layout(self, batch: Any, shapes: Mapping[str, tuple[int, ...]]) -> TokenLayout:
        """Token layout for the archive; ``shapes`` are the first batch's weight shapes."""
        enc = dec = None
        for name, shp in shapes.items():
            stack, _, kind = name.split("/")
            if stack == "encoder" and kind == "self_attention":
                enc = SideLayout.from_lengths({"tokens": shp[-1]})
            elif stack == "decoder" and kind == "self_attention":
                dec = SideLayout.from_lengths({"tokens": shp[-1]})
            elif kind == "cross_attention":
                dec = dec or SideLayout.from_lengths({"tokens": shp[-2]})
                enc = enc or SideLayout.from_lengths({"tokens": shp[-1]})
        return TokenLayout(enc, dec)

    def config(self) -> dict[str, Any]:
        return {"model": type(self.model).__module__ + "." + type(self.model).__qualname__}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return _to_device(batch, device)

    def close(self) -> None:
        """Undo any change made to the model for recording (called when capture ends)."""


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    vals = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(vals, (list, tuple)) or isinstance(batch, Mapping):
        for v in vals:
            with contextlib.suppress(InputError):
                return _first_tensor(v)
    raise InputError(f"cannot find a tensor in the batch of type {type(batch).__name__}")


class ReferenceAdapter(Adapter):
    """The reference Transformer. Batches are ``(enc, dec)`` or ``{"enc": …, "dec": …}``.

    Only wanted modules leave the fused SDPA path: the others run as fast as plain inference.
    """

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
        return _first_tensor(self._split(batch)[0]).shape[0]

    def layout(self, batch: Any, shapes: Mapping[str, tuple[int, ...]]) -> TokenLayout:
        return self.model.token_layout(*self._split(batch))

    def config(self) -> dict[str, Any]:
        return self.model.config.to_json()

    def run(self, batch: Any, sink: Sink, wanted: set[str]) -> None:
        mods = {n: m for n, m in self.model.attention_modules().items() if n in wanted}
        handles = []
        saved = {n: m.store_attention for n, m in mods.items()}

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                w = module.attention_weights
                module.attention_weights = None
                if w is not None:
                    sink(name, w)

            return hook

        try:
            for n, m in mods.items():
                m.store_attention = True
                handles.append(m.register_forward_hook(hook_for(n)))
            self.model(*self._split(batch))
        finally:
            for h in handles:
                h.remove()
            for n, m in mods.items():
                m.store_attention = saved[n]


class TorchMHAAdapter(Adapter):
    """Models built from ``torch.nn.MultiheadAttention``.

    Names: MHA inside an ``nn.TransformerEncoderLayer`` is ``encoder/{i}/self_attention``;
    inside an ``nn.TransformerDecoderLayer``, ``self_attn`` is ``decoder/{i}/self_attention``
    and ``multihead_attn`` is ``decoder/{i}/cross_attention``; any other MHA module is
    ``encoder/{i}/self_attention`` in module order. Batches are a tensor, a tuple of
    positional arguments, or a dict of keyword arguments for ``model(...)``.
    The MHA fast path (which skips the Python module) is switched off while recording.
    """

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

    def batch_size(self, batch: Any) -> int:
        t = _first_tensor(batch)
        return t.shape[0] if self.batch_first else t.shape[1]

    def run(self, batch: Any, sink: Sink, wanted: set[str]) -> None:
        handles = []

        def pre(module: nn.Module, args: Any, kwargs: dict) -> tuple[Any, dict]:
            kwargs = dict(kwargs)
            kwargs["need_weights"] = True
            kwargs["average_attn_weights"] = False
            return args, kwargs

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
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
            _call(self.model, batch)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
            for h in handles:
                h.remove()


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


class HFAdapter(Adapter):
    """Hugging Face ``transformers`` models, via ``output_attentions=True``.

    The eager attention implementation is selected (SDPA/flash kernels return no
    weights). Encoder-only models give ``encoder/*``, decoder-only ``decoder/*``, and
    encoder-decoder models all three kinds. With a ``tokenizer``, the first sample's
    tokens label the axes.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.is_enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
        self.is_decoder = not self.is_enc_dec and bool(
            getattr(cfg, "is_decoder", False)
            or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
            or getattr(cfg, "model_type", "") in _DECODER_ONLY
        )
        self._set_eager()
        if getattr(model, "training", False) and _dropout_prob(cfg) > 0:
            warnings.warn(
                "model is in train() mode with attention dropout: captured rows will not sum "
                "to 1; call model.eval() first",
                stacklevel=3,
            )
        n_enc = getattr(cfg, "encoder_layers", None) or getattr(cfg, "num_hidden_layers", 0)
        n_dec = getattr(cfg, "decoder_layers", None) or getattr(cfg, "num_hidden_layers", 0)
        if self.is_enc_dec:
            self._names = [f"encoder/{i}/self_attention" for i in range(n_enc)]
            for i in range(n_dec):
                self._names += [f"decoder/{i}/self_attention", f"decoder/{i}/cross_attention"]
        else:
            stack = "decoder" if self.is_decoder else "encoder"
            self._names = [f"{stack}/{i}/self_attention" for i in range(n_enc)]

    def close(self) -> None:
        previous = self._previous_impl
        if previous and previous != "eager":
            try:
                self._apply_impl(previous)
            except Exception:  # noqa: BLE001 - best effort: the eager model still works
                warnings.warn(f"could not restore attn_implementation={previous!r}", stacklevel=2)

    def _apply_impl(self, impl: str) -> None:
        setter = getattr(self.model, "set_attn_implementation", None)
        if setter is not None:
            setter(impl)
        else:
            self.model.config._attn_implementation = impl

    def _set_eager(self) -> None:
        self._previous_impl = getattr(self.model.config, "_attn_implementation", None)
        setter = getattr(self.model, "set_attn_implementation", None)
        try:
            if setter is not None:
                setter("eager")
            else:
                self.model.config._attn_implementation = "eager"
        except Exception as e:  # noqa: BLE001 - any failure means weights are unavailable
            raise CaptureError(
                f"{type(self.model).__name__} cannot switch to eager attention ({e}); load it "
                "with attn_implementation='eager' to capture weights"
            ) from e

    def names(self) -> list[str]:
        return list(self._names)

    def config(self) -> dict[str, Any]:
        cfg = self.model.config.to_dict()
        return {"model": "transformers." + type(self.model).__name__, "hf_config": _jsonable(cfg)}

    def batch_size(self, batch: Any) -> int:
        return _first_tensor(batch).shape[0]

    def layout(self, batch: Any, shapes: Mapping[str, tuple[int, ...]]) -> TokenLayout:
        base = super().layout(batch, shapes)
        if self.tokenizer is None or not isinstance(batch, Mapping):
            return base

        def side(ids_key: str, fallback: SideLayout | None) -> SideLayout | None:
            ids = batch.get(ids_key)
            if ids is None or fallback is None:
                return fallback
            toks = self.tokenizer.convert_ids_to_tokens(ids[0].tolist())
            return SideLayout.from_labels(toks, name="text")

        if self.is_enc_dec:
            return TokenLayout(
                side("input_ids", base.encoder), side("decoder_input_ids", base.decoder)
            )
        if self.is_decoder:
            return TokenLayout(None, side("input_ids", base.decoder))
        return TokenLayout(side("input_ids", base.encoder), None)

    def run(self, batch: Any, sink: Sink, wanted: set[str]) -> None:
        if not isinstance(batch, Mapping):
            raise InputError(
                f"a Hugging Face batch must be a dict of model inputs, got {type(batch).__name__}"
            )
        out = self.model(**batch, output_attentions=True)
        if self.is_enc_dec:
            groups: Sequence[tuple[str, str, Any]] = [
                ("encoder", "self_attention", getattr(out, "encoder_attentions", None)),
                ("decoder", "self_attention", getattr(out, "decoder_attentions", None)),
                ("decoder", "cross_attention", getattr(out, "cross_attentions", None)),
            ]
        else:
            stack = "decoder" if self.is_decoder else "encoder"
            groups = [(stack, "self_attention", getattr(out, "attentions", None))]
        for stack, kind, atts in groups:
            if atts is None or any(a is None for a in atts):
                raise CaptureError(
                    f"{type(self.model).__name__} returned no {stack} {kind} weights; it must "
                    "run with attn_implementation='eager' and support output_attentions"
                )
            for i, a in enumerate(atts):
                name = f"{stack}/{i}/{kind}"
                if name in wanted:
                    sink(name, a)


_DECODER_ONLY = {"gpt2", "gpt_neo", "gptj", "llama", "mistral", "opt", "bloom", "gpt_neox", "qwen2"}


def _dropout_prob(cfg: Any) -> float:
    for key in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "dropout"):
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def adapter_for(model: nn.Module, tokenizer: Any = None) -> Adapter:
    """Pick the adapter for ``model``; raise :class:`CaptureError` if none fits."""
    if isinstance(model, Adapter):
        return model
    if isinstance(model, Transformer):
        return ReferenceAdapter(model)
    if _is_hf(model):
        return HFAdapter(model, tokenizer)
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return TorchMHAAdapter(model)
    raise CaptureError(
        f"cannot capture attention from {type(model).__name__}: it is not an attnscope "
        "Transformer, a Hugging Face model, or a model built from nn.MultiheadAttention. "
        "Subclass attnscope.capture.adapters.Adapter to report its weights"
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
