"""Hugging Face batches from CLI input files: token arrays with masks, or sentences.

``attnscope capture --hf-config ... --inputs FILE`` accepts

* ``.npz`` / ``.pt`` with ``input_ids`` (N, L) and either ``attention_mask`` (N, L) of 0/1
  (rows padded to L, left or right) or ``lengths`` (N,) (right padding: the first
  ``lengths[i]`` tokens of row i are real); other per-sample arrays go to the model as
  they are. Columns that are padding in every row of a batch are cut from the end of
  that batch, so each batch keeps its own length (exact: a trailing pad token changes
  no real token's attention).
* rows of text (:mod:`attnscope.capture.records`: ``.jsonl``, ``.csv``, ``.parquet``,
  ``.txt`` or a saved ``datasets`` folder, ``--text-field`` / ``--target-field``),
  tokenized with the model's tokenizer (or ``--tokenizer DIR``) per batch of
  ``--batch-size`` rows in file order with ``padding="longest"`` (and ``truncation`` to
  ``--max-length`` when given). Encoder-decoder targets become the decoder's inputs
  (shifted right, as in training). Each sample's row id goes with it (sample id
  ``row``).

Everything is read before the model runs, and the batches are a list, so capture takes
the archive's maximum length from the longest batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnscope._extras import require
from attnscope.contracts import ROW_ID
from attnscope.errors import ConfigError, InputError

__all__ = ["RowBatches", "check_tokenizer", "load_tokenizer", "text_batches", "array_batches"]

# per-token arrays cut with the batch's trailing padding, and the mask that decides it
_PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_PAIRS = (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask"))


def load_tokenizer(path: Path) -> Any:
    """A tokenizer from a local folder (``tokenizer.json`` / vocab files); no download."""
    transformers = require("transformers", "--tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder
        msg = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"--tokenizer {path}: cannot load a tokenizer from it ({type(e).__name__}: {msg}); "
            "expected a local folder with tokenizer.json or vocab files (e.g. written by "
            "tokenizer.save_pretrained)"
        ) from e


class RowBatches(list):
    """Batches of rows read from a file, in file order, with each sample's row id.

    ``sample_ids`` is ``{ROW_ID: (N,) int64}``, for ``capture(sample_ids=...)``.
    """

    sample_ids: dict[str, np.ndarray]


def check_tokenizer(tokenizer: Any, model: torch.nn.Module, where: str = "the tokenizer") -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding (``vocab_size``)."""
    vocab = getattr(model.config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(
            f"{where} has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
            "expected the model's own tokenizer (one whose ids fit its config's vocab_size)"
        )


def text_batches(
    texts: list[str],
    tokenizer: Any,
    model: torch.nn.Module,
    batch_size: int,
    *,
    max_length: int | None = None,
    left_pad: bool = False,
    targets: list[str] | None = None,
    rows: np.ndarray | None = None,
) -> RowBatches:
    """Tokenized batches in the order of ``texts``, each padded to its own longest sentence.

    ``left_pad``: decoder-only generation continues after the last token, so prompts are
    padded on the left (and a tokenizer without a pad token pads with its EOS token).
    ``targets``: an encoder-decoder's decoder side, one per text, fed as
    ``decoder_input_ids`` shifted right by the model's start token (teacher forcing, as in
    training) with their ``decoder_attention_mask``. ``rows``: each text's row id in its
    file (default ``0..N-1``), the batches' ``sample_ids``.
    """
    check_tokenizer(tokenizer, model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                "the tokenizer has no pad token (nor an EOS token to pad with); batches of "
                "sentences of different lengths need one"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if left_pad:
        tokenizer.padding_side = "left"
    accepted = set(inspect.signature(model.forward).parameters)
    out = RowBatches()
    for a in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[a : a + batch_size],
            padding="longest",
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if k in accepted}
        _check_nonempty(batch["attention_mask"], a, "sentence")
        if targets is not None:
            batch.update(_decoder_inputs(tokenizer, model, targets[a : a + batch_size],
                                         max_length, a))  # fmt: skip
        out.append(batch)
    out.sample_ids = {
        ROW_ID: np.arange(len(texts), dtype=np.int64) if rows is None else np.asarray(rows)
    }
    return out


def _check_nonempty(mask: torch.Tensor, first: int, what: str) -> None:
    if not mask.any(dim=1).all():
        row = int((~mask.any(dim=1)).nonzero()[0]) + first
        raise InputError(f"{what} {row} has no tokens; expected text the tokenizer keeps")


def _decoder_inputs(
    tokenizer: Any, model: torch.nn.Module, targets: list[str], max_length: int | None, first: int
) -> dict[str, torch.Tensor]:
    """``decoder_input_ids`` / ``decoder_attention_mask`` of right-padded targets."""
    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if shift is None:
        raise ConfigError(
            f"{type(model).__name__} cannot shift targets into decoder inputs (no "
            "prepare_decoder_input_ids_from_labels); expected an encoder-decoder model with "
            "a language-model head (e.g. T5ForConditionalGeneration, BartForConditionalGeneration)"
        )
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(text_target=targets, padding="longest", truncation=max_length is not None,
                        max_length=max_length, return_tensors="pt")  # fmt: skip
    finally:
        tokenizer.padding_side = side
    mask = enc["attention_mask"]
    _check_nonempty(mask, first, "target")
    # [start, t0, ..., t(n-2)] are a target of n tokens' real decoder inputs: as many as
    # the target has, so the target's own mask is theirs (t(n-1) is only ever predicted)
    return {"decoder_input_ids": shift(labels=enc["input_ids"]), "decoder_attention_mask": mask}


def array_batches(
    arrays: Mapping[str, np.ndarray], path: Path, batch_size: int, *, left_pad: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Batches of model inputs from ``.npz`` / ``.pt`` arrays, masks checked.

    ``left_pad``: decoder-only generation, which needs left-padded prompts.
    """
    arrays = dict(arrays)
    if "lengths" in arrays:
        arrays = _mask_from_lengths(arrays, path)
    for ids_key, mask_key in _PAIRS:
        if mask_key in arrays:
            _check_mask(arrays, ids_key, mask_key, path, left_pad and ids_key == "input_ids")
    n = len(next(iter(arrays.values())))
    mask = arrays.get("attention_mask")
    length = None if mask is None else mask.shape[1]
    cut = mask is not None and all(
        k in _PER_TOKEN for k, v in arrays.items() if v.ndim >= 2 and v.shape[1] == length
    )
    out = []
    for a in range(0, n, batch_size):
        s = slice(a, min(n, a + batch_size))
        stop = None
        if cut and not left_pad:
            real = np.flatnonzero(mask[s].any(axis=0))
            stop = int(real[-1]) + 1
        out.append(
            {
                k: torch.from_numpy(
                    np.ascontiguousarray(v[s, :stop] if stop and k in _PER_TOKEN else v[s])
                )
                for k, v in arrays.items()
            }  # fmt: skip
        )
    return out


def _mask_from_lengths(arrays: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """``lengths`` (N,) -> a right-padded ``attention_mask`` (N, L) for ``input_ids``."""
    lengths = arrays.pop("lengths")
    ids = arrays.get("input_ids")
    if "attention_mask" in arrays:
        raise InputError(f"{path} holds both 'lengths' and 'attention_mask'; expected one of them")
    if ids is None or ids.ndim != 2:
        raise InputError(
            f"{path}: 'lengths' needs 'input_ids' of shape (N, L), got "
            f"{None if ids is None else ids.shape}"
        )
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise InputError(
            f"{path}: 'lengths' must be (N,) integers, got {lengths.dtype} {lengths.shape}"
        )
    bad = np.flatnonzero((lengths < 1) | (lengths > ids.shape[1]))
    if len(bad):
        i = int(bad[0])
        raise InputError(
            f"{path}: lengths[{i}] = {int(lengths[i])}; expected 1 <= length <= "
            f"{ids.shape[1]} (the input_ids row length)"
        )
    arrays["attention_mask"] = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(
        np.int64
    )
    return arrays


def _check_mask(
    arrays: Mapping[str, np.ndarray], ids_key: str, mask_key: str, path: Path, left: bool
) -> None:
    ids, mask = arrays.get(ids_key), arrays[mask_key]
    if ids is None:
        raise InputError(f"{path} holds {mask_key!r} without {ids_key!r}; expected both")
    if mask.shape != ids.shape:
        raise InputError(
            f"{path}: {mask_key!r} has shape {mask.shape} but {ids_key!r} has {ids.shape}; "
            "expected the same (N, L): one 0/1 entry per token"
        )
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise InputError(f"{path}: {mask_key!r} must hold 0/1 (1 = real token)")
    empty = np.flatnonzero(~mask.astype(bool).any(axis=1)) if mask.ndim == 2 else []
    if len(empty):
        raise InputError(f"{path}: {mask_key!r} row {int(empty[0])} has no real token")
    if left and mask.ndim == 2 and (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        row = int(np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1))[0])
        raise InputError(
            f"{path}: {mask_key!r} row {row} is right-padded; decoder-only generation needs "
            "left-padded prompts (generate continues after each row's last token)"
        )
