"""The guide's ``AttentionVisualizer``: a thin facade over :mod:`attnscope.render.plots`.

It keeps the method names and parameters of the guide this project grew from, so the
guide's snippets run unchanged with ``from attnscope import Transformer,
AttentionVisualizer``. Every method accepts the guide's inputs (torch tensors of shape
``(B, NH, T, S)`` and the nested ``{'encoder': [{'self_attention': ...}], ...}`` dict)
**and** archive selections:

>>> viz = AttentionVisualizer()                                      # doctest: +SKIP
>>> arc = open_archive("run.zarr")                                   # doctest: +SKIP
>>> viz.plot_attention_heatmap(arc.attention("encoder", 0, "self_attention"),
...                            head_idx=3, batch_idx=5)              # doctest: +SKIP
>>> viz.plot_layer_comparison(arc, stack="decoder", attention_type="cross_attention")
...                                                                  # doctest: +SKIP
>>> viz.plot_attention_flow(arc, layer_idx=0)                        # doctest: +SKIP

An archive selection reads only the chosen sample (and head), and its token layout
gives modality-aware axes automatically. For in-memory tensors pass
``AttentionVisualizer(layout=TokenLayout(...))`` to get the same axes.

Like the guide, methods show the figure by default (``show=True``; a no-op on
headless backends) and, when they only save (``show=False`` with ``save_path``), close
the figure so loops over many layers do not accumulate open figures. Every method
returns the Figure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from attnscope.contracts import KIND_AXES
from attnscope.errors import InputError, SelectionError
from attnscope.render import plots
from attnscope.render._crop import has_sample_axes
from attnscope.render._prepare import MAX_PIXELS, array_layouts
from attnscope.store import AttentionArchive, check_structure, open_archive
from attnscope.store.layout import SideLayout, TokenLayout

__all__ = ["AttentionVisualizer"]

PathLike = str | os.PathLike


@contextlib.contextmanager
def _maybe_archive(x: Any) -> Iterator[AttentionArchive | None]:
    """The archive behind ``x`` (an archive or its path), open for the block; else ``None``."""
    if isinstance(x, (str, os.PathLike, AttentionArchive)):
        with open_archive(x) as arc:
            check_structure(arc, every_chunk=False)
            yield arc
    else:
        yield None


class AttentionVisualizer:
    """Draw the guide's attention figures from tensors, nested dicts or archive selections.

    Parameters
    ----------
    layout
        Optional :class:`~attnscope.store.layout.TokenLayout` used to label the axes of
        in-memory tensors (archive selections bring their own layout).
    max_pixels
        Longer axes are block-reduced (block max) to this many cells.
    reduce
        ``"max"`` (default) or ``"mean"`` block reduction for long sequences.
    """

    def __init__(
        self,
        layout: TokenLayout | None = None,
        *,
        max_pixels: int = MAX_PIXELS,
        reduce: str = "max",
    ) -> None:
        if layout is not None and not isinstance(layout, TokenLayout):
            raise InputError(f"layout must be a TokenLayout or None, got {type(layout).__name__}")
        self.layout = layout
        self.max_pixels = max_pixels
        self.reduce = reduce

    # -- layouts ---------------------------------------------------------------------------
    def _select(
        self,
        arc: AttentionArchive | None,
        attn: Any,
        stack: str | None,
        layer: int | None,
        kind: str | None,
    ) -> tuple[Any, SideLayout | None, SideLayout | None]:
        """``(attention, query layout, key layout)`` from an archive + names, or a tensor."""
        if arc is None:
            return (attn, *self._layouts(attn, stack, kind))
        if stack is None or layer is None or kind is None:
            raise SelectionError("with an archive, pass stack=, layer= and kind=")
        # no layouts: the plot takes the chosen sample's own labels and real tokens
        return arc.attention(stack, layer, kind), None, None

    def _layouts(
        self, attn: Any, stack: str | None, kind: str | None
    ) -> tuple[SideLayout | None, SideLayout | None]:
        if has_sample_axes(attn):
            return None, None  # the plot labels each sample with its own tokens
        q, k = array_layouts(attn)
        if q is not None or k is not None:
            return q, k
        if self.layout is None:
            return None, None
        shape = tuple(attn.shape)
        t, s = int(shape[-2]), int(shape[-1])
        candidates = [
            (st, kd)
            for st, kd in KIND_AXES
            if (stack is None or st == stack) and (kind is None or kd == kind)
        ]
        fits = []
        for st, kd in candidates:
            try:
                ql, kl = self.layout.axes(st, kd)
            except SelectionError:
                continue
            if ql.length == t and kl.length == s:
                fits.append((ql, kl))
        # several (stack, kind) fitting with different layouts is ambiguous: no labels
        if fits and all(f == fits[0] for f in fits):
            return fits[0]
        return None, None

    def _draw(
        self,
        plot: Callable[..., Figure],
        *args: Any,
        save_path: PathLike | None,
        show: bool,
        cap: int | None = 512,
        **kwargs: Any,
    ) -> Figure:
        """Call a plot function with this visualizer's reduction; close a save-only figure.

        ``cap`` bounds ``max_pixels`` for multi-panel figures (``None``: no bound).
        """
        fig = plot(
            *args,
            reduce=self.reduce,
            max_pixels=self.max_pixels if cap is None else min(self.max_pixels, cap),
            save_path=save_path,
            show=show,
            **kwargs,
        )
        if save_path is not None and not show:
            import matplotlib.pyplot as plt

            plt.close(fig)  # loops over many layers must not pile up open figures
        return fig

    # -- guide methods -------------------------------------------------------------------
    def plot_attention_heatmap(
        self,
        attention_weights: Any,
        head_idx: int | None = None,
        batch_idx: int = 0,
        title: str | None = None,
        figsize: tuple[float, float] = (10, 8),
        cmap: str = "viridis",
        vmin: float | None = None,
        vmax: float | None = None,
        save_path: PathLike | None = None,
        show: bool = True,
        *,
        stack: str | None = None,
        layer: int | None = None,
        kind: str | None = None,
        log: bool = False,
        scale: str = "max",
        crop: bool = True,
    ) -> Figure:
        """Heatmap of one head or the head mean (``head_idx=None``) of sample ``batch_idx``.

        ``attention_weights`` is a ``(B, NH, T, S)`` tensor/array, an archive
        ``AttentionArray``, or an archive (or its path) with ``stack=``, ``layer=``,
        ``kind=``. ``stack``/``kind`` also pick the axis layout of a plain tensor when its
        shape alone is ambiguous. ``log=True`` uses a logarithmic colour scale.
        """
        with _maybe_archive(attention_weights) as arc:
            attn, q, k = self._select(arc, attention_weights, stack, layer, kind)
            look = dict(title=title, figsize=figsize, cmap=cmap, vmin=vmin, vmax=vmax, log=log,
                        scale=scale, crop=crop)
            return self._draw(
                plots.plot_heatmap, attn, head_idx=head_idx, batch_idx=batch_idx,
                query_layout=q, key_layout=k, save_path=save_path, show=show, cap=None, **look,
            )

    def plot_multi_head_attention(
        self,
        attention_weights: Any,
        batch_idx: int = 0,
        title: str | None = None,
        figsize: tuple[float, float] | None = None,
        cmap: str = "viridis",
        save_path: PathLike | None = None,
        show: bool = True,
        *,
        vmin: float | None = None,
        vmax: float | None = None,
        stack: str | None = None,
        layer: int | None = None,
        kind: str | None = None,
        log: bool = False,
        scale: str = "max",
        crop: bool = True,
    ) -> Figure:
        """All heads of one layer in a grid with one shared colour scale."""
        with _maybe_archive(attention_weights) as arc:
            attn, q, k = self._select(arc, attention_weights, stack, layer, kind)
            look = dict(title=title, figsize=figsize, cmap=cmap, vmin=vmin, vmax=vmax, log=log,
                        scale=scale, crop=crop)
            return self._draw(
                plots.plot_head_grid, attn, batch_idx=batch_idx, query_layout=q, key_layout=k,
                save_path=save_path, show=show, **look,
            )

    def plot_layer_comparison(
        self,
        layer_attention_list: Any,
        attention_type: str = "self_attention",
        head_idx: int | None = None,
        batch_idx: int = 0,
        title: str | None = None,
        figsize: tuple[float, float] | None = None,
        cmap: str = "viridis",
        save_path: PathLike | None = None,
        show: bool = True,
        *,
        stack: str | None = None,
        layers: Sequence[int] | None = None,
        vmin: float | None = None,
        vmax: float | None = None,
        log: bool = False,
        scale: str = "max",
        crop: bool = True,
    ) -> Figure:
        """One panel per layer of ``attention_type``, one head or the head mean.

        ``layer_attention_list`` is the guide's list of per-layer dicts
        (``attention_weights['encoder']``), a list of tensors, or an archive (or its path)
        with ``stack=`` (and optionally ``layers=``).
        """
        with _maybe_archive(layer_attention_list) as arc:
            if arc is not None:
                if stack is None:
                    raise SelectionError("with an archive, pass stack= ('encoder' or 'decoder')")
                wanted = list(arc.layers[stack]) if layers is None else list(layers)
                items = {i: arc.attention(stack, i, attention_type) for i in wanted}
                q, k = None, None  # each sample's own labels and real tokens (prepare_matrix)
            else:
                items = self._layer_items(layer_attention_list, attention_type, layers)
                first = next(iter(items.values()), None)
                q, k = self._layouts(first, stack, attention_type) if items else (None, None)
            look = dict(title=title, figsize=figsize, cmap=cmap, vmin=vmin, vmax=vmax, log=log,
                        scale=scale, crop=crop)
            return self._draw(
                plots.plot_layer_comparison, items, head_idx=head_idx, batch_idx=batch_idx,
                query_layout=q, key_layout=k, save_path=save_path, show=show, **look,
            )

    @staticmethod
    def _layer_items(
        src: Any, attention_type: str, layers: Sequence[int] | None
    ) -> dict[int, Any]:
        """``{layer: attention}`` from the guide's list of per-layer dicts or of tensors."""
        if isinstance(src, Mapping):
            raise InputError(
                "plot_layer_comparison takes one stack's list of layers, e.g. "
                "attention_weights['encoder'], not the whole nested dict"
            )
        seq = list(src)
        items: dict[int, Any] = {}
        for i in range(len(seq)) if layers is None else layers:
            if not 0 <= i < len(seq):
                raise SelectionError(f"layer {i} out of range: there are {len(seq)} layers")
            entry = seq[i]
            if isinstance(entry, Mapping):
                if entry.get(attention_type) is None:
                    raise SelectionError(
                        f"layer {i} has no {attention_type!r}; it has {sorted(entry)}"
                    )
                entry = entry[attention_type]
            items[i] = entry
        return items

    def plot_attention_flow(
        self,
        encoder_attention: Any = None,
        decoder_self_attention: Any = None,
        decoder_cross_attention: Any = None,
        layer_idx: int = 0,
        head_idx: int | None = None,
        batch_idx: int = 0,
        figsize: tuple[float, float] = (14, 12),
        save_path: PathLike | None = None,
        show: bool = True,
        *,
        title: str | None = None,
        cmap: str = "viridis",
        log: bool = False,
        scale: str = "max",
        crop: bool = True,
    ) -> Figure:
        """Encoder self -> decoder self -> decoder cross attention of one layer.

        Pass the three tensors (guide form), or an archive (or its path) as
        ``encoder_attention`` and ``layer_idx`` to read all three from it.
        """
        with _maybe_archive(encoder_attention) as arc:
            if arc is not None:
                enc, dec, cross = (
                    arc.attention(st, layer_idx, kd)
                    for st, kd in plots.FLOW_ARRAYS
                )
                enc_layout = dec_layout = None  # each sample's own (prepare_matrix)
            else:
                enc, dec, cross = encoder_attention, decoder_self_attention, decoder_cross_attention
                if enc is None or dec is None or cross is None:
                    raise InputError(
                        "plot_attention_flow needs encoder_attention, decoder_self_attention "
                        "and decoder_cross_attention (or an archive as the first argument)"
                    )
                dec_layout, enc_layout = self._layouts(cross, "decoder", "cross_attention")
            return self._draw(
                plots.plot_attention_flow, enc, dec, cross, layer_idx=layer_idx,
                head_idx=head_idx, batch_idx=batch_idx, encoder_layout=enc_layout,
                decoder_layout=dec_layout, title=title, figsize=figsize, cmap=cmap, log=log,
                scale=scale, crop=crop, save_path=save_path, show=show,
            )

    def save_attention_statistics(
        self, attention_weights: Any, save_path: PathLike | None = None
    ) -> dict:
        """Write the guide's statistics JSON (mean/std/min/max/shape per layer and kind).

        Delegates to :func:`attnscope.analysis.statistics_json`; accepts the nested dict
        of tensors or an archive. Returns the statistics as a dict.
        """
        try:
            from attnscope.analysis import statistics_json
        except ImportError as e:  # pragma: no cover - depends on the analysis package
            raise InputError(
                "save_attention_statistics needs attnscope.analysis.statistics_json, "
                "which this installation lacks"
            ) from e
        return statistics_json(attention_weights, save_path=save_path)
