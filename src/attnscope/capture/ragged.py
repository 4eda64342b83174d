"""Batches of different lengths in one archive: when an archive is ragged, and its maxima.

A capture writes a **ragged** archive (schema 2: per-sample masks, batches padded by the
store to a maximum per side) when ``max_length`` is given, when the adapter reports
padding masks for the first batch (Hugging Face batches with an ``attention_mask``,
generation), or when ``batches`` is a list/tuple whose batches differ in length. The
maximum of a side is ``max_length`` if given; else, for a list/tuple, the longest batch
(read from the inputs without running the model, :meth:`Adapter.lengths`); else (a
generator, a DataLoader: batches that cannot be read ahead) the most the model takes,
:func:`model_max_length`: the smaller of the tokenizer's ``model_max_length`` (when set)
and the model config's maximum positions (``max_position_embeddings``, ``n_positions``,
...); a model with neither (e.g. T5's relative positions, no tokenizer) keeps the first
batch's length. An archive never grows along its tokens: a later, longer batch stops the
job with a :class:`~attnscope.errors.ShapeError` and the batches before it stay committed.

Otherwise the archive is fixed-length (schema 1), as it always was: every batch must have
the first batch's lengths. Families with a fixed token layout (the reference Transformer,
``nn.MultiheadAttention`` stacks) are always fixed-length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnscope.capture.base import Adapter
from attnscope.contracts import KIND_AXES, STACKS, TOKEN_MASK
from attnscope.errors import ConfigError, ShapeError
from attnscope.store import TokenLayout
from attnscope.store.layout import SideLayout

__all__ = ["BeforeRun", "Lengths", "model_max_length", "side_lengths"]

# segment name of a ragged archive's generic layout (labels "tokens[0]", "tokens[1]", ...)
_SEGMENT = "tokens"

SideData = dict[str, Any]


def side_lengths(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Per side, a batch's tokens, read from its weights' ``(B, H, T, S)`` shapes."""
    out: dict[str, int] = {}
    for name, shp in shapes.items():
        stack, _layer, kind = name.split("/")
        q, k = KIND_AXES[(stack, kind)]
        out.setdefault(q, int(shp[-2]))
        out.setdefault(k, int(shp[-1]))
    return out


# config keys of a model's maximum positions, first found wins
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_positions", "n_ctx",
                      "max_sequence_length", "seq_length")  # fmt: skip
# tokenizers without a maximum report transformers' VERY_LARGE_INTEGER (1e30)
_NO_LIMIT = 10**9


def model_max_length(adapter: Adapter) -> tuple[int, str] | None:
    """``(tokens, where it comes from)``: the most tokens per side the model takes, or None.

    The smaller of the adapter's tokenizer's ``model_max_length`` (unless unset) and the
    model config's first of ``max_position_embeddings``, ``n_positions``, ``max_positions``,
    ``n_ctx``, ``max_sequence_length``, ``seq_length``.
    """
    found: list[tuple[int, str]] = []
    tok = getattr(adapter, "tokenizer", None)
    n = getattr(tok, "model_max_length", None)
    if isinstance(n, int) and 0 < n < _NO_LIMIT:
        found.append((n, f"the tokenizer's model_max_length {n}"))
    cfg = getattr(adapter.model, "config", None)
    for key in _MAX_POSITION_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v < _NO_LIMIT:
            found.append((v, f"the model config's {key} {v}"))
            break
    return min(found) if found else None


def _scan(adapter: Adapter, batches: Iterable[Any]) -> tuple[dict[str, int], bool]:
    """``(longest per side, whether lengths differ)`` over a list or tuple of batches.

    Only sequences are read ahead: a DataLoader or generator would load (or consume) its
    data twice, so its maximum is the first batch's unless ``max_length`` says otherwise.
    """
    if not isinstance(batches, (list, tuple)):
        return {}, False
    seen: dict[str, set[int]] = {}
    for batch in batches:
        for side, n in (adapter.lengths(batch) or {}).items():
            seen.setdefault(side, set()).add(int(n))
    return {s: max(v) for s, v in seen.items()}, any(len(v) > 1 for v in seen.values())


@dataclass
class BeforeRun:
    """A batch's lengths per side, read from its inputs, and its layout, made only when
    asked for (an HF layout with a tokenizer converts every sample's ids)."""

    lengths: dict[str, int]
    make_layout: Callable[[], TokenLayout]

    @functools.cached_property
    def layout(self) -> TokenLayout:
        return self.make_layout()


class Lengths:
    """The lengths a job's batches may have, and the checks each batch passes.

    Parameters
    ----------
    adapter
        The model's adapter (``ragged_ok``, ``lengths``, ``masks``, ``tokens``).
    batches
        The batch source; a list or tuple is scanned for its longest batch.
    max_length
        The ``max_length`` option: one int for every side, ``{side: int}``, or None.
    """

    def __init__(self, adapter: Adapter, batches: Iterable[Any], max_length: Any) -> None:
        self.adapter = adapter
        self.option = max_length
        if max_length is not None and not adapter.ragged_ok:
            raise ConfigError(
                f"max_length is not supported for {type(adapter.model).__name__}: its token "
                "layout is fixed (every batch has the first batch's token counts); drop "
                "max_length (--max-length), or use a Hugging Face model or an Adapter that "
                "reports masks for batches of different lengths"
            )
        self.scanned, self.differ = _scan(adapter, batches) if adapter.ragged_ok else ({}, False)
        # batches that cannot be read ahead take the model's maximum (None: first batch's)
        self.model_max = (
            model_max_length(adapter)
            if adapter.ragged_ok and max_length is None and not isinstance(batches, (list, tuple))
            else None
        )
        # a rank > 0 of a multi-process capture: (rank 0's maxima, None: fixed-length), as
        # its archive's metadata has them (see join)
        self.joined: tuple[dict[str, int] | None, int] | None = None
        self.max_lengths: dict[str, int] | None = None  # ragged: side -> maximum tokens
        self.fixed: TokenLayout | None = None  # fixed-length: the archive's layout
        # resume: side -> token fields the committed samples carry (None: not checked)
        self.fields: dict[str, set[str]] | None = None

    # -- the archive's shape -------------------------------------------------------------

    def join(self, meta: Mapping[str, Any], rank: int) -> None:
        """A rank > 0 of a multi-process capture takes the maxima rank 0 chose (exchanged
        through the archive's metadata), so every rank agrees whatever its own first batch:
        :meth:`decide` then adopts them and :meth:`check` refuses a batch that does not fit."""
        given = meta.get("max_lengths")
        self.joined = ({str(k): int(v) for k, v in given.items()} if given else None, rank)

    def decide(self, batch: Any, lengths: Mapping[str, int], layout: TokenLayout) -> TokenLayout:
        """First batch of a new archive: ragged or not, the maxima; returns the layout."""
        masks = self.adapter.masks(batch) if self.adapter.ragged_ok else None
        ragged = not (self.option is None and masks is None and not self.differ)
        if self.joined is not None:
            return self._adopt_joined(lengths, layout, ragged)
        if not ragged:
            self.fixed = layout
            return layout
        opt = self.option
        if isinstance(opt, Mapping):
            unknown = sorted(set(opt) - set(lengths))
            if unknown:
                raise ConfigError(
                    f"max_length names side(s) {unknown}, but the captured arrays cover "
                    f"{sorted(lengths)}; name those sides or pass one integer"
                )
        self.max_lengths = {}
        for side, n in lengths.items():
            want = opt.get(side) if isinstance(opt, Mapping) else opt
            if want is None and self.model_max is not None:
                want = self.model_max[0]  # a longer first batch is refused by check()
            self.max_lengths[side] = (
                int(want) if want is not None else max(n, self.scanned.get(side, 0))
            )
        return self.layout(lengths)

    def _adopt_joined(
        self, lengths: Mapping[str, int], layout: TokenLayout, ragged: bool
    ) -> TokenLayout:
        assert self.joined is not None
        have, rank = self.joined
        if have is None:
            if ragged:
                raise ConfigError(
                    f"rank {rank}: the ranks cannot agree on the token layout: rank 0 made a "
                    "fixed-length archive (its first batch had no padding mask), this rank's "
                    "batches are ragged; pass the same max_length (--max-length) to every rank"
                )
            self.fixed = layout
            return layout
        if set(lengths) - set(have):
            raise ConfigError(
                f"rank {rank}: the ranks cannot agree on the token layout: rank 0's archive "
                f"has sides {sorted(have)}, this rank's batches {sorted(lengths)}; every rank "
                "needs the same model, kinds and inputs"
            )
        self.max_lengths = dict(have)
        return self.layout(lengths)

    def adopt(self, meta: Mapping[str, Any], token_fields: Mapping[str, Any], n: int) -> None:
        """Resume: the archive's maxima (or fixed layout) and stored token fields rule."""
        given = meta.get("max_lengths")
        if given:
            self.max_lengths = {str(k): int(v) for k, v in given.items()}
        elif meta.get("layout") is not None:
            self.fixed = TokenLayout.from_json(meta["layout"])
        if n:
            self.fields = {s: set(f) - {TOKEN_MASK} for s, f in token_fields.items()}
            self.fields = {s: f for s, f in self.fields.items() if f}

    @property
    def ragged(self) -> bool:
        return self.max_lengths is not None

    def layout(self, lengths: Mapping[str, int]) -> TokenLayout:
        """A ragged archive's layout: each side of the batch at its maximum, positions as labels.

        Per-sample labels come from the stored tokens (``AttentionArchive.sample_layout``).
        """
        assert self.max_lengths is not None
        sides = {
            s: SideLayout.from_lengths({_SEGMENT: self.max_lengths[s]}) if s in lengths else None
            for s in STACKS
        }
        return TokenLayout(sides["encoder"], sides["decoder"])

    def array_shapes(self, hts: Mapping[str, tuple[int, int, int]]) -> dict[str, tuple[int, ...]]:
        """The arrays' stored ``(H, T, S)``: the maxima in a ragged archive."""
        if self.max_lengths is None:
            return dict(hts)
        out = {}
        for name, (h, t, s) in hts.items():
            stack, _layer, kind = name.split("/")
            q, k = KIND_AXES[(stack, kind)]
            out[name] = (h, self.max_lengths.get(q, t), self.max_lengths.get(k, s))
        return out

    # -- every batch ---------------------------------------------------------------------

    def check(self, bi: int, lengths: Mapping[str, int], layout: TokenLayout | None) -> None:
        """Refuse a batch that does not fit the archive, before anything of it is queued.

        ``layout`` is read only for families with a fixed token layout (not ``ragged_ok``).
        """
        if self.max_lengths is not None:
            for side, n in sorted(lengths.items()):
                cap = self.max_lengths.get(side)
                if cap is not None and n > cap:
                    why = f"max_lengths[{side!r}]"
                    if self.model_max is not None and cap == self.model_max[0]:
                        why += f": {self.model_max[1]}"
                    elif self.joined is not None and self.option is None:
                        why += ", which every rank takes from rank 0's archive"
                    raise ShapeError(
                        f"batch {bi} has {n} {side} tokens, more than the archive's maximum "
                        f"of {cap} ({why}); nothing of this batch was written "
                        f"and the batches before it stay committed; pass max_length={n} "
                        f"(--max-length {n}) or more to a new capture, or truncate the inputs "
                        f"to {cap} tokens (max_length={cap}, --max-length {cap}) and resume"
                    )
            return
        if self.fixed is None:
            return
        if not self.adapter.ragged_ok:
            assert layout is not None
            want, got = _segments(self.fixed), _segments(layout)
            if want != got:
                raise ShapeError(
                    f"batch {bi}: {type(self.adapter.model).__name__} has a fixed token "
                    f"layout: expected {want} like the first batch, got {got}; every batch "
                    "needs the same modalities and token counts (batches of different "
                    "lengths need a Hugging Face model or an Adapter that reports masks)"
                )
            return
        for side, n in sorted(lengths.items()):
            lay = getattr(self.fixed, side)
            if lay is not None and n != lay.length:
                raise ShapeError(
                    f"batch {bi} has {n} {side} tokens, but this archive is fixed-length "
                    f"({lay.length} tokens: its first batch had no attention mask and no "
                    f"max_length was given); pass max_length={max(n, lay.length)} "
                    f"(--max-length {max(n, lay.length)}) to a new capture for batches of "
                    "different lengths"
                )

    def before_run(self, batch: Any, wanted: Sequence[str]) -> BeforeRun | None:
        """What a batch's inputs tell before the model runs, when they give the lengths of
        every array in ``wanted`` (reference model, HF); else None."""
        lengths = self.adapter.lengths(batch) or {}
        shapes = {}
        for name in wanted:
            stack, _layer, kind = name.split("/")
            q, k = KIND_AXES[(stack, kind)]
            if q not in lengths or k not in lengths:
                return None
            shapes[name] = (1, 1, lengths[q], lengths[k])
        return BeforeRun(lengths, lambda: self.adapter.layout(batch, shapes))

    def block_masks(
        self, batch: Any, lengths: Mapping[str, int], bsz: int, drop: int
    ) -> dict[str, np.ndarray]:
        """A ragged batch's real tokens ``(bsz - drop, L_b)`` on each side of the archive,
        read before it runs (its query blocks are padded as they come)."""
        got = self.adapter.masks(batch) or {}
        out = {}
        for side, n in lengths.items():
            if side in (self.max_lengths or {}):
                m = got.get(side)
                m = np.ones((bsz, n), bool) if m is None else np.asarray(m).astype(bool)
                out[side] = m[drop:]
        return out

    def side_data(
        self, batch: Any, drop: int, sides: Iterable[str]
    ) -> tuple[dict[str, np.ndarray] | None, dict[str, SideData] | None]:
        """``(masks, tokens)`` of the samples this batch writes (the first ``drop`` are
        committed already), for the archive's sides; call after the batch ran."""
        sides = set(sides)
        masks = None
        if self.ragged:
            got = self.adapter.masks(batch) or {}
            masks = {s: np.asarray(m)[drop:] for s, m in got.items() if s in sides} or None
        tokens = {
            s: {k: v[drop:] for k, v in t.items() if v is not None}
            for s, t in (self.adapter.tokens(batch) or {}).items()
            if s in sides
        }
        tokens = {s: t for s, t in tokens.items() if t} or None
        if self.fields is not None:
            have = {s: set(t) for s, t in (tokens or {}).items()}
            if have != self.fields:
                raise ConfigError(
                    f"resume: the archive stores per-sample tokens {_show(self.fields)}, this "
                    f"run's batches give {_show(have)}; resume with the tokenizer (tokenizer= / "
                    "--tokenizer) that wrote the archive"
                )
        return masks, tokens


def _segments(layout: TokenLayout) -> dict[str, list[tuple[str, int]]]:
    return {
        side: [(s.name, len(s)) for s in sl.segments]
        for side, sl in (("encoder", layout.encoder), ("decoder", layout.decoder))
        if sl is not None
    }


def _show(fields: Mapping[str, set[str]]) -> str:
    return str({s: sorted(f) for s, f in sorted(fields.items())}) if fields else "none"
