"""The adapter interface: what capture needs to know about one family of models.

An adapter runs a batch, names the attention modules it can observe (archive array names
such as ``"decoder/1/cross_attention"``) and reports each one's weights ``(B, H, T, S)``
to a sink while the batch runs. It also reports what a ragged archive stores per batch:
the padding masks and, with a tokenizer, the tokens of each sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnscope.errors import ConfigError, InputError
from attnscope.store.layout import SideLayout, TokenLayout

__all__ = ["Adapter", "Sink"]

# A sink receives (array name, weights (B, H, T, S) on the model's device).
Sink = Callable[[str, Tensor], None]


class Adapter:
    """Base class: run batches of one model family and report attention to a sink."""

    model: nn.Module
    #: whether batches may differ in length (a ragged archive); families with a fixed
    #: token layout (the reference Transformer's modalities) set False
    ragged_ok: bool = True

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

    def lengths(self, batch: Any) -> dict[str, int] | None:
        """Per side, the tokens this batch will have, read without running the model.

        Capture takes the maximum over a list of batches as a ragged archive's maximum.
        ``None`` (or a side left out) when only running the model tells.
        """
        return None

    def masks(self, batch: Any) -> dict[str, np.ndarray] | None:
        """Per side (``"encoder"`` / ``"decoder"``), a ``(B, L)`` bool array, True = real token.

        ``None`` when the family has no notion of padding or the batch holds no mask
        (capture then keeps a fixed-length archive unless told otherwise). For a
        generating model, call after :meth:`run`: the decoder side then covers the whole
        generated sequence.
        """
        return None

    def tokens(self, batch: Any) -> dict[str, dict[str, Any]] | None:
        """Per side, ``{"labels": B lists of token strings, "ids": (B, L) int array}``.

        ``None`` when no tokenizer is known. Like :meth:`masks`, call after :meth:`run`
        for generation.
        """
        return None

    def prepare_generation(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``generate=`` options for this model; return them normalised (JSON-able).

        Families that cannot generate refuse, naming the model class.
        """
        raise ConfigError(
            f"generate= is not supported for {type(self.model).__name__}: generation capture "
            "needs a Hugging Face decoder-only (...ForCausalLM) or encoder-decoder "
            "(...ForConditionalGeneration) model; drop generate= (CLI: --max-new-tokens) to "
            "capture the forward pass"
        )

    def generated(self) -> list[dict[str, Any]]:
        """Per sample of the last batch run with generation: ids, prompt length, text."""
        return []

    def config(self) -> dict[str, Any]:
        return {"model": type(self.model).__module__ + "." + type(self.model).__qualname__}

    def attention_impl(self, wanted: Sequence[str]) -> dict[str, str]:
        """``{array name: attention implementation as run}`` (provenance)."""
        return {n: "unknown (custom adapter)" for n in self.names()}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return to_device(batch, device)

    def close(self) -> None:
        """Undo any change made to the model for recording (called when capture ends)."""


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    vals = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(vals, (list, tuple)) or isinstance(batch, Mapping):
        for v in vals:
            with contextlib.suppress(InputError):
                return first_tensor(v)
    raise InputError(f"cannot find a tensor in the batch of type {type(batch).__name__}")


def call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def describe(names: Sequence[str], wanted: Sequence[str], captured: str, other: str) -> dict:
    """``{array name: implementation}``: ``captured`` for wanted arrays, ``other`` else."""
    keep = set(wanted)
    return {n: captured if n in keep else other for n in names}
