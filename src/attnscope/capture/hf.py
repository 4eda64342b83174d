"""Hugging Face ``transformers`` models: attention captured layer by layer.

Where the weights come from
    The *sites* are the modules transformers itself hooks for ``output_attentions``: each
    model class lists them in ``can_record_outputs`` (``"attentions"`` -> self-attention,
    ``"cross_attentions"`` -> cross-attention, with the module class, the output index
    that holds the weights and an optional sub-module name). They are found by walking the
    module tree as transformers does (a sub-model brings its own list). A site inside
    ``model.get_encoder()`` is ``encoder/*``; the layer index is the order of appearance,
    so depth always comes from the modules that exist (T5 with ``num_decoder_layers !=
    num_layers`` included).

One layer at a time
    While a batch runs, a forward hook on each *selected* site hands its weights
    ``(B, H, T, S)`` to the sink the moment that layer has run and removes them from the
    module's output, so no layer's weights outlive their layer inside the model. The
    model runs without ``output_attentions``.

Fast path for the rest
    The model is switched to ``eager`` (so masks are built in the additive form every
    implementation accepts), and for the duration of a run each *unselected* site's
    modules see a copy of their config whose implementation is ``"sdpa"`` (when the family
    supports SDPA): those layers run the fused kernel and never materialise weights. The
    model's own implementation and configs are restored when capture ends.

Legacy families
    Models that list no attention sites (older modelling code: BLOOM, Falcon, DeBERTa,
    GPT-Neo, ...) or whose sites do not match the config's depth (ALBERT's one shared
    layer) run with ``output_attentions=True`` and the eager implementation: all layers
    are computed eagerly and kept until the forward ends.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from attnscope.capture import hf_blocks
from attnscope.capture.base import Adapter, Sink, describe, first_tensor, jsonable
from attnscope.errors import CaptureError, InputError
from attnscope.store.layout import SideLayout, TokenLayout

__all__ = ["HFAdapter", "config_depth", "DECODER_ONLY_TYPES"]

_KINDS = {"attentions": "self_attention", "cross_attentions": "cross_attention"}
# model_type values of decoder-only families (causal self-attention, no encoder)
DECODER_ONLY_TYPES = {
    "gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "mixtral", "opt", "bloom",
    "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "falcon", "codegen", "olmo",
}  # fmt: skip


@dataclass(frozen=True)
class Site:
    """One attention module whose output carries weights."""

    module: nn.Module
    index: int  # position of the weights (B, H, T, S) in the module's output tuple
    path: str  # qualified module name, for messages


class HFAdapter(Adapter):
    """Hugging Face ``transformers`` models (see the module docstring for the mechanism).

    Encoder-only models give ``encoder/*``, decoder-only ``decoder/*``, encoder-decoder
    models all three kinds. With a ``tokenizer``, every sample's tokens are stored, and the
    first sample's label the axes of a fixed-length archive's layout.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.is_enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
        self.is_decoder = not self.is_enc_dec and _is_causal(model)
        self.sites = _find_sites(model, self.is_enc_dec, self.is_decoder)
        n_enc, n_dec = config_depth(cfg, self.is_enc_dec)
        if self.sites and not _depth_agrees(self.sites, n_enc, n_dec, self.is_enc_dec):
            self.sites = {}  # e.g. ALBERT: one shared module runs every layer
        self.layer_by_layer = bool(self.sites)
        if self.layer_by_layer:
            self._names = sorted(self.sites, key=_archive_order)
        else:
            self._names = _names_from_depth(n_enc, n_dec, self.is_enc_dec, self.is_decoder)
        if not self._names or not (self.layer_by_layer or _has_attention_modules(model)):
            raise CaptureError(
                f"cannot observe attention in {type(model).__name__}: it has no attention "
                "modules that transformers can report (a model without attention, e.g. a "
                "state-space model, has no weights to capture); subclass "
                "attnscope.capture.adapters.Adapter to report another model's weights"
            )
        # Unselected layers may use the fused kernel only where the family supports it.
        self.fast_ok = bool(getattr(model, "_supports_sdpa", False)) and self.layer_by_layer
        self.generation: dict[str, Any] | None = None
        self.last: Any = None  # generation.Generated of the last batch run
        self._streamed: set[str] = set()  # sites whose weights went out in blocks this run
        self._set_eager()
        if getattr(model, "training", False) and _dropout_prob(cfg) > 0:
            warnings.warn(
                "model is in train() mode with attention dropout: captured rows will not sum "
                "to 1; call model.eval() first",
                stacklevel=3,
            )

    # -- implementation switching -------------------------------------------------------

    def close(self) -> None:
        for cfg, impl in reversed(self._sub_impls):
            cfg._attn_implementation_internal = impl
        self._sub_impls = []
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
        try:
            self._apply_impl("eager")
        except Exception as e:  # noqa: BLE001 - any failure means weights are unavailable
            raise CaptureError(
                f"{type(self.model).__name__} cannot switch to eager attention ({e}); load it "
                "with attn_implementation='eager' to capture weights"
            ) from e
        # Some versions keep sub-model copies of the config that the switch misses (T5's
        # stacks in transformers 5.17): every attention config must say eager.
        self._sub_impls: list[tuple[Any, Any]] = []
        configs = {id(cfg): cfg for _m, cfg in _attention_configs(self.model)}
        for cfg in configs.values():
            if cfg._attn_implementation_internal != "eager":
                self._sub_impls.append((cfg, cfg._attn_implementation_internal))
                cfg._attn_implementation_internal = "eager"

    @contextlib.contextmanager
    def observing(self, sink: Sink, wanted: set[str]) -> Iterator[None]:
        """Hooks on the selected sites, the fused kernel on the others, for one run.

        With a streaming sink, the selected sites' attention modules run the query-block
        implementation (:mod:`attnscope.capture.hf_blocks`) instead of eager.
        """
        handles = []
        swapped: list[tuple[nn.Module, Any]] = []
        copies: dict[tuple[int, str], Any] = {}  # (id(config), impl) -> its one copy
        routed: list[int] = []
        self._streamed.clear()
        route_ok = getattr(sink, "stream", None) is not None
        if route_ok:
            hf_blocks.register()

        def swap(m: nn.Module, cfg: Any, impl: str) -> None:
            if (id(cfg), impl) not in copies:
                copies[id(cfg), impl] = _with_impl(cfg, impl)
            swapped.append((m, cfg))
            m.config = copies[id(cfg), impl]

        try:
            for name, site in self.sites.items():
                if name in wanted:
                    handles.append(site.module.register_forward_hook(self._hook(name, site, sink)))
                    for m, cfg in _attention_configs(site.module) if route_ok else ():
                        eager = hf_blocks.eager_of(m)
                        if eager is None:
                            continue
                        swap(m, cfg, hf_blocks.IMPL)
                        hf_blocks.ROUTES[id(m)] = hf_blocks.Route(
                            name, sink, eager, self.fast_ok, self._streamed
                        )
                        routed.append(id(m))
                elif self.fast_ok:
                    for m, cfg in _attention_configs(site.module):
                        swap(m, cfg, "sdpa")
            yield
        finally:
            for h in handles:
                h.remove()
            for m, cfg in reversed(swapped):
                m.config = cfg
            for i in routed:
                hf_blocks.ROUTES.pop(i, None)

    def _hook(self, name: str, site: Site, sink: Sink) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            w = output[site.index] if isinstance(output, tuple) else None
            if w is None and name in self._streamed:
                return None  # its weights went to the sink in blocks of rows
            if w is None:
                impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
                raise CaptureError(
                    f"{type(self.model).__name__}: {site.path} returned no attention weights "
                    f"(implementation {impl!r}); load the model with attn_implementation="
                    "'eager' to capture them"
                )
            sink(name, w)
            out = list(output)
            out[site.index] = None  # the weights leave the model with this layer
            return tuple(out)

        return hook

    # -- running --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._names)

    def config(self) -> dict[str, Any]:
        cfg = self.model.config.to_dict()
        return {"model": "transformers." + type(self.model).__name__, "hf_config": jsonable(cfg)}

    def attention_impl(self, wanted: Sequence[str]) -> dict[str, str]:
        if not self.layer_by_layer:
            return describe(self.names(), wanted, "eager (output_attentions)", "eager")
        blocks = (f"eager; over one block: {'sdpa' if self.fast_ok else 'eager'} output, eager "
                  "weights per query block")  # fmt: skip
        return describe(self.names(), wanted, blocks, "sdpa" if self.fast_ok else "eager")

    def batch_size(self, batch: Any) -> int:
        return first_tensor(batch).shape[0]

    def prepare_generation(self, options: Mapping[str, Any]) -> dict[str, Any]:
        from attnscope.capture.generation import check_generate

        self.generation = check_generate(self.model, options, self.is_enc_dec, self.is_decoder)
        return jsonable(self.generation)

    def run(self, batch: Any, sink: Sink, wanted: set[str]) -> None:
        if not isinstance(batch, Mapping):
            raise InputError(
                f"a Hugging Face batch must be a dict of model inputs, got {type(batch).__name__}"
            )
        self.check_batch(batch)
        if self.generation is not None:
            from attnscope.capture.generation import generate_batch

            self.last = generate_batch(self, batch, sink, wanted)
            return
        if self.layer_by_layer:
            with self.observing(sink, wanted):
                self.model(**batch)
            return
        self.feed_legacy(self.model(**batch, output_attentions=True), sink, wanted)

    def legacy_groups(self, out: Any) -> list[tuple[str, str, Any]]:
        """``(stack, kind, per-layer weights)`` of an ``output_attentions=True`` output."""
        if self.is_enc_dec:
            return [
                ("encoder", "self_attention", getattr(out, "encoder_attentions", None)),
                ("decoder", "self_attention", getattr(out, "decoder_attentions", None)),
                ("decoder", "cross_attention", getattr(out, "cross_attentions", None)),
            ]
        stack = "decoder" if self.is_decoder else "encoder"
        return [(stack, "self_attention", getattr(out, "attentions", None))]

    def feed_legacy(
        self, out: Any, sink: Sink, wanted: set[str], groups: Sequence[str] | None = None
    ) -> None:
        for stack, kind, atts in self.legacy_groups(out):
            if groups is not None and f"{stack}/{kind}" not in groups:
                continue
            if not atts or any(a is None for a in atts):
                raise CaptureError(
                    f"cannot observe attention in {type(self.model).__name__}: with "
                    f"output_attentions=True it returned no {stack} {kind} weights; load it "
                    "with attn_implementation='eager', or subclass "
                    "attnscope.capture.adapters.Adapter to report its weights"
                )
            for i, a in enumerate(atts):
                name = f"{stack}/{i}/{kind}"
                if name in wanted:
                    sink(name, a)

    # -- what a ragged archive stores ----------------------------------------------------

    def _batch_ids(self, batch: Any) -> dict[str, torch.Tensor]:
        """Token ids per side, as the batch holds them."""
        if not isinstance(batch, Mapping):
            return {}
        if self.is_enc_dec:
            pairs = [("encoder", "input_ids"), ("decoder", "decoder_input_ids")]
        else:
            pairs = [("decoder" if self.is_decoder else "encoder", "input_ids")]
        return {
            side: batch[key]
            for side, key in pairs
            if isinstance(batch.get(key), torch.Tensor) and batch[key].dim() == 2
        }

    def _side_ids(self, batch: Any) -> dict[str, torch.Tensor]:
        """Token ids per side, from the last generation or the batch."""
        if self.last is not None and self.generation is not None:
            return self.last.ids
        return self._batch_ids(batch)

    def _mask_keys(self) -> dict[str, str]:
        if self.is_enc_dec:
            return {"encoder": "attention_mask", "decoder": "decoder_attention_mask"}
        return {"decoder" if self.is_decoder else "encoder": "attention_mask"}

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """A mask must have its ids' ``(B, L)`` shape (else the model broadcasts or fails)."""
        ids = self._batch_ids(batch)
        for side, key in self._mask_keys().items():
            m = batch.get(key)
            if side not in ids or not isinstance(m, torch.Tensor):
                continue
            if tuple(m.shape) != tuple(ids[side].shape):
                id_key = "decoder_input_ids" if key.startswith("decoder") else "input_ids"
                raise InputError(
                    f"{key} has shape {tuple(m.shape)} but {id_key} has "
                    f"{tuple(ids[side].shape)}; expected the same (B, L): one 0/1 entry per token"
                )

    def lengths(self, batch: Any) -> dict[str, int] | None:
        out = {side: int(t.shape[1]) for side, t in self._batch_ids(batch).items()}
        if self.generation is not None and isinstance(batch, Mapping):
            n = int(self.generation["max_new_tokens"])
            if self.is_enc_dec:  # the decoder starts from its start token(s)
                d = batch.get("decoder_input_ids")
                out["decoder"] = (int(d.shape[1]) if isinstance(d, torch.Tensor) else 1) + n
            elif "decoder" in out:
                out["decoder"] += n
        return out or None

    def masks(self, batch: Any) -> dict[str, np.ndarray] | None:
        if self.last is not None and self.generation is not None:
            return dict(self.last.masks)
        if not isinstance(batch, Mapping):
            return None
        keys = self._mask_keys()
        if not any(batch.get(k) is not None for k in keys.values()):
            return None  # no padding in this batch
        out = {}
        for side, t in self._batch_ids(batch).items():
            m = batch.get(keys[side])
            out[side] = (
                np.ones(tuple(t.shape[:2]), dtype=bool) if m is None else _np(m).astype(bool)
            )
        return out or None

    def tokens(self, batch: Any) -> dict[str, dict[str, Any]] | None:
        """With a tokenizer: ids and token strings; after generation: ids at least."""
        generated = self.last is not None and self.generation is not None
        if self.tokenizer is None and not generated:
            return None
        out = {}
        for side, t in self._side_ids(batch).items():
            ids = _np(t).astype(np.int64)
            entry: dict[str, Any] = {"ids": ids}
            if self.tokenizer is not None:
                entry["labels"] = [
                    [str(x) for x in self.tokenizer.convert_ids_to_tokens(row)]
                    for row in ids.tolist()
                ]
            out[side] = entry
        return out or None

    def generated(self) -> list[dict[str, Any]]:
        return [] if self.last is None else self.last.records(self.tokenizer)

    def layout(self, batch: Any, shapes: Mapping[str, tuple[int, ...]]) -> TokenLayout:
        base = super().layout(batch, shapes)
        toks = self.tokens(batch) or {}

        def side(name: str, fallback: SideLayout | None) -> SideLayout | None:
            if "labels" not in toks.get(name, {}) or fallback is None:
                return fallback
            labels = toks[name]["labels"][0]
            if len(labels) != fallback.length:
                return fallback
            return SideLayout.from_labels(labels, name="text")

        return TokenLayout(side("encoder", base.encoder), side("decoder", base.decoder))


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _attention_configs(module: nn.Module) -> Iterator[tuple[nn.Module, Any]]:
    """``(module, its config)`` for every module under ``module`` whose own config names an
    attention implementation (the object each attention layer reads it from)."""
    for m in module.modules():
        cfg = m.__dict__.get("config")
        if hasattr(cfg, "_attn_implementation_internal"):
            yield m, cfg


def _with_impl(cfg: Any, impl: str) -> Any:
    fast = copy.copy(cfg)
    fast.__dict__["_attn_implementation_internal"] = impl
    return fast


def config_depth(cfg: Any, enc_dec: bool) -> tuple[int, int]:
    """``(encoder layers, decoder layers)`` from the config field each family uses.

    Encoder-decoder: ``encoder_layers`` (BART, Marian, ...) or ``num_layers`` (T5) for the
    encoder; ``decoder_layers`` or ``num_decoder_layers`` (T5) for the decoder, which
    defaults to the encoder's depth only when the config names no decoder depth. Other
    models: ``num_hidden_layers`` (mapped by ``attribute_map`` to ``n_layer`` for GPT-2,
    ``n_layers`` for DistilBERT), for both sides.
    """

    def first(keys: Sequence[str]) -> int:
        for k in keys:
            v = getattr(cfg, k, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return 0

    if not enc_dec:
        n = first(("num_hidden_layers", "n_layer", "n_layers", "num_layers"))
        return n, n
    enc = first(("encoder_layers", "num_encoder_layers", "num_layers", "num_hidden_layers"))
    dec = first(("decoder_layers", "num_decoder_layers")) or enc
    return enc, dec


def _names_from_depth(n_enc: int, n_dec: int, enc_dec: bool, decoder: bool) -> list[str]:
    if enc_dec:
        names = [f"encoder/{i}/self_attention" for i in range(n_enc)]
        for i in range(n_dec):
            names += [f"decoder/{i}/self_attention", f"decoder/{i}/cross_attention"]
        return names
    stack = "decoder" if decoder else "encoder"
    return [f"{stack}/{i}/self_attention" for i in range(n_enc)]


def _archive_order(name: str) -> tuple[int, int, int]:
    stack, layer, kind = name.split("/")
    return (stack != "encoder", int(layer), kind != "self_attention")


def _depth_agrees(sites: Mapping[str, Site], n_enc: int, n_dec: int, enc_dec: bool) -> bool:
    counts: dict[str, int] = {}
    for name in sites:
        stack, _, kind = name.split("/")
        if kind == "self_attention":
            counts[stack] = counts.get(stack, 0) + 1
    want = {"encoder": n_enc, "decoder": n_dec}
    if not enc_dec:
        want = {s: n_enc for s in counts}
    return all(want.get(s, 0) in (0, n) for s, n in counts.items())


def _has_attention_modules(model: nn.Module) -> bool:
    return any(
        "attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower()
        for m in model.modules()
    )


def _is_causal(model: nn.Module) -> bool:
    cfg = model.config
    if getattr(cfg, "is_decoder", False):
        return True
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    if getattr(cfg, "model_type", "") in DECODER_ONLY_TYPES:
        return True
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # noqa: BLE001 - a model's own check failing means "cannot generate"
        return False


def _recorder_specs(model: nn.Module) -> list[tuple[str, Any, str | None, int, str | None]]:
    """``(kind, class, class-name suffix, output index, layer name)`` of a model's sites."""
    try:
        table = getattr(model, "can_record_outputs", None) or {}
    except Exception:  # noqa: BLE001 - a property of someone else's model
        return []
    out = []
    for key, specs in table.items():
        kind = _KINDS.get(key)
        if kind is None:
            continue
        for spec in specs if isinstance(specs, list) else [specs]:
            if isinstance(spec, str):
                out.append((kind, None, spec, 1, None))
            elif isinstance(spec, type):
                out.append((kind, spec, None, 1, None))
            else:
                cls = getattr(spec, "target_class", None)
                out.append(
                    (kind, cls, getattr(spec, "class_name", None), int(getattr(spec, "index", 1)),
                     getattr(spec, "layer_name", None))
                )  # fmt: skip
    return out


def _find_sites(model: nn.Module, enc_dec: bool, decoder: bool) -> dict[str, Site]:
    """Array name -> site, walking the tree the way transformers installs its hooks."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - an HF model implies transformers
        return {}
    encoder_ids: set[int] = set()
    if enc_dec and hasattr(model, "get_encoder"):
        with contextlib.suppress(Exception):
            encoder_ids = {id(m) for m in model.get_encoder().modules()}
    found: list[tuple[str, str, Site]] = []

    def walk(module: nn.Module, path: str, specs: list[Any]) -> None:
        for child_name, child in module.named_children():
            child_specs = _recorder_specs(child) if isinstance(child, PreTrainedModel) else specs
            walk(child, f"{path}.{child_name}", child_specs)
        for kind, cls, cls_name, index, layer_name in specs:
            if not (
                (cls is not None and isinstance(module, cls))
                or (cls_name is not None and path.endswith(cls_name))
            ):
                continue
            if layer_name is not None and f".{layer_name.strip('.')}." not in path + ".":
                continue
            if kind == "cross_attention":
                stack = "decoder"
            elif enc_dec:
                stack = "encoder" if id(module) in encoder_ids else "decoder"
            else:
                stack = "decoder" if decoder else "encoder"
            found.append((stack, kind, Site(module, index, path.lstrip("."))))
            break

    walk(model, "", _recorder_specs(model))
    counters: dict[tuple[str, str], int] = {}
    sites = {}
    for stack, kind, site in found:
        i = counters.get((stack, kind), 0)
        counters[(stack, kind)] = i + 1
        sites[f"{stack}/{i}/{kind}"] = site
    return sites


def _dropout_prob(cfg: Any) -> float:
    for key in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "dropout"):
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0
