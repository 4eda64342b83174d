"""One stored sample as BertViz shows it: ``head_view`` / ``model_view`` arguments.

BertViz (Vig 2019) takes, per group of arrays, a list with one ``(1, H, T, S)`` torch tensor
per layer and the tokens of each axis. :func:`bertviz_arrays` reads them from an archive as
numpy (no torch): the sample's real tokens only (padded rows and columns of a ragged
archive are dropped), labelled with the tokens stored at capture. Which BertViz arguments
are filled follows the arrays:

- self-attention of one stack (an encoder-only or decoder-only model): ``attention`` and
  ``tokens``;
- an encoder-decoder archive: ``encoder_attention``, ``decoder_attention`` and
  ``cross_attention`` with ``encoder_tokens`` and ``decoder_tokens``.

:func:`bertviz_kwargs` turns them into the torch tensors BertViz needs (torch is imported
only then), and :func:`head_view` / :func:`model_view` call BertViz with them.

Examples
--------
>>> from attnscope.interop.bertviz import head_view
>>> html = head_view("run.zarr", 0, html_action="return")  # IPython HTML; "view" displays
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnscope._extras import require
from attnscope.contracts import KIND_AXES
from attnscope.errors import SelectionError
from attnscope.store import AttentionArchive, open_archive, parse_array_name

__all__ = ["BertVizArrays", "bertviz_arrays", "bertviz_kwargs", "head_view", "model_view"]

# (stack, kind) -> BertViz's argument in an encoder-decoder view
_ENC_DEC_ARG = {
    ("encoder", "self_attention"): "encoder_attention",
    ("decoder", "self_attention"): "decoder_attention",
    ("decoder", "cross_attention"): "cross_attention",
}


@dataclass(frozen=True)
class BertVizArrays:
    """One sample's attention in BertViz's argument names, as numpy.

    Attributes
    ----------
    attention
        Argument (``"attention"``, or ``"encoder_attention"`` / ``"decoder_attention"`` /
        ``"cross_attention"``) -> one float32 ``(1, H, T, S)`` array per layer, real tokens
        only.
    tokens
        Argument (``"tokens"``, or ``"encoder_tokens"`` / ``"decoder_tokens"``) -> the
        sample's real tokens of that axis.
    layers
        Argument -> the model layer of each entry (BertViz numbers them 0, 1, ...; a capture
        of some layers keeps only those).
    heads
        Argument -> the model's head index of each of the ``H`` heads shown.
    """

    sample: int
    attention: dict[str, list[np.ndarray]]
    tokens: dict[str, list[str]]
    layers: dict[str, list[int]] = field(default_factory=dict)
    heads: dict[str, list[int]] = field(default_factory=dict)


def bertviz_arrays(
    archive: str | Any | AttentionArchive,
    sample: int,
    *,
    kinds: Sequence[str] | None = None,
) -> BertVizArrays:
    """Read one sample of an archive as BertViz's arguments (numpy; see the module docstring).

    Parameters
    ----------
    archive
        An archive path / URL or an open :class:`~attnscope.store.AttentionArchive`.
    sample
        Index of the committed sample, ``0 <= sample < n_samples``.
    kinds
        Keep only these kinds (``"self_attention"``, ``"cross_attention"``, or
        ``"stack/kind"`` such as ``"decoder/self_attention"``); default: every array.

    Returns
    -------
    BertVizArrays
        Per BertViz argument, one ``(1, H, T, S)`` float32 array per layer (real tokens).

    Raises
    ------
    SelectionError
        ``sample`` out of range, an unknown kind, an array that keeps only some query rows
        (BertViz draws whole ``T x S`` matrices), layers of one group with different heads,
        or no token labels stored for a side BertViz needs (capture with a tokenizer).
    """
    with open_archive(archive) as a:
        n = a.n_samples
        if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)):
            raise SelectionError(f"sample must be an int, got {type(sample).__name__}")
        if not 0 <= int(sample) < n:
            raise SelectionError(
                f"sample {sample} is out of range: {a.path!r} has {n} committed samples"
                + (f" (0..{n - 1})" if n else "")
            )
        sample = int(sample)
        names = _select(a, kinds)
        groups: dict[tuple[str, str], list[str]] = {}
        for name in names:
            stack, _layer, kind = parse_array_name(name)
            groups.setdefault((stack, kind), []).append(name)
        single = len(groups) == 1 and next(iter(groups))[1] == "self_attention"
        real = {}  # side -> stored positions of the sample's real tokens
        tokens: dict[str, list[str]] = {}
        for stack, kind in groups:
            for side in KIND_AXES[(stack, kind)]:
                if side in real:
                    continue
                real[side] = np.flatnonzero(a.masks(side, sample))
                labels = a.tokens(side, sample)[0]
                if labels is None:
                    raise SelectionError(
                        f"{a.path!r} stores no token labels for the {side} side, which BertViz "
                        "needs; capture with a tokenizer (tokenizer=, --tokenizer) to store them"
                    )
                tokens["tokens" if single else f"{side}_tokens"] = [labels[i] for i in real[side]]
        out: dict[str, list[np.ndarray]] = {}
        layers: dict[str, list[int]] = {}
        heads: dict[str, list[int]] = {}
        for (stack, kind), members in groups.items():
            arg = "attention" if single else _ENC_DEC_ARG[(stack, kind)]
            q, k = (real[s] for s in KIND_AXES[(stack, kind)])
            out[arg], layers[arg] = [], []
            for name in members:
                arr = a[name]
                if arr.query_rows is not None:
                    raise SelectionError(
                        f"{name} keeps only some query rows ({len(arr.query_rows)} of its "
                        "side's tokens); BertViz draws whole attention matrices: leave it out "
                        "with kinds=, or capture without a row policy"
                    )
                hs = list(a.heads[name])
                if arg in heads and heads[arg] != hs:
                    raise SelectionError(
                        f"{name} keeps heads {hs} but {members[0]} keeps {heads[arg]}; BertViz "
                        "needs the same heads in every layer of a view"
                    )
                heads[arg] = hs
                w = np.asarray(arr[sample], dtype=np.float32)  # (H, T, S) stored
                out[arg].append(w[:, q][:, :, k][None])
                layers[arg].append(parse_array_name(name)[1])
        return BertVizArrays(sample, out, tokens, layers, heads)


def _select(a: AttentionArchive, kinds: Sequence[str] | None) -> list[str]:
    names = a.arrays
    if kinds is None:
        if not names:
            raise SelectionError(f"{a.path!r} holds no attention arrays")
        return names
    known = sorted({n.split("/")[2] for n in names} | {"/".join(n.split("/")[::2]) for n in names})
    bad = [k for k in kinds if k not in known]
    if bad or not kinds:
        raise SelectionError(f"unknown kind(s) {list(bad)}; expected some of {known}")
    return [n for n in names if n.split("/")[2] in kinds or "/".join(n.split("/")[::2]) in kinds]


def bertviz_kwargs(
    archive: str | Any | AttentionArchive, sample: int, *, kinds: Sequence[str] | None = None
) -> dict[str, Any]:
    """:func:`bertviz_arrays` as keyword arguments of ``bertviz.head_view`` / ``model_view``.

    Attention arrays become float32 torch tensors ``(1, H, T, S)`` (imports torch; needs
    ``attnscope[bertviz]`` or ``attnscope[capture]``).
    """
    torch = require("torch", "the BertViz export")
    got = bertviz_arrays(archive, sample, kinds=kinds)
    kwargs: dict[str, Any] = {k: list(v) for k, v in got.tokens.items()}
    for arg, per_layer in got.attention.items():
        kwargs[arg] = [torch.from_numpy(np.ascontiguousarray(w)) for w in per_layer]
    return kwargs


def head_view(
    archive: str | Any | AttentionArchive,
    sample: int,
    *,
    kinds: Sequence[str] | None = None,
    **options: Any,
) -> Any:
    """``bertviz.head_view`` of one stored sample; ``options`` go to BertViz (e.g.
    ``html_action="return"`` to get the HTML instead of displaying it, ``layer=``)."""
    bertviz = require("bertviz", "attnscope.interop.bertviz.head_view")
    return bertviz.head_view(**bertviz_kwargs(archive, sample, kinds=kinds), **options)


def model_view(
    archive: str | Any | AttentionArchive,
    sample: int,
    *,
    kinds: Sequence[str] | None = None,
    **options: Any,
) -> Any:
    """``bertviz.model_view`` of one stored sample; ``options`` go to BertViz (e.g.
    ``html_action="return"``, ``include_layers=``, ``display_mode="light"``)."""
    bertviz = require("bertviz", "attnscope.interop.bertviz.model_view")
    return bertviz.model_view(**bertviz_kwargs(archive, sample, kinds=kinds), **options)
