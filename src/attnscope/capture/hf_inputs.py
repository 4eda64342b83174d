"""Hugging Face batches from CLI input files: token arrays with masks, or sentences.

``attnscope capture --hf-config ... --inputs FILE`` accepts

* ``.npz`` / ``.pt`` with ``input_ids`` (N, L) and either ``attention_mask`` (N, L) of 0/1
  (rows padded to L, left or right) or ``lengths`` (N,) (right padding: the first
  ``lengths[i]`` tokens of row i are real); other per-sample arrays go to the model as
  they are. Columns that are padding in every row of a batch are cut from the end of
  that batch, so each batch keeps its own length (exact: a trailing pad token changes
  no real token's attention).
* ``.jsonl`` (one ``{"text": "..."}`` object per line) or ``.txt`` (one sentence per
  line; blank lines are skipped), tokenized with ``--tokenizer DIR`` per batch of
  ``--batch-size`` sentences with ``padding="longest"`` (and ``truncation`` to
  ``--max-length`` when given).

Everything is read before the model runs, and the batches are a list, so capture takes
the archive's maximum length from the longest batch.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnscope._extras import require
from attnscope.errors import ConfigError, InputError

__all__ = ["TEXT_SUFFIXES", "load_tokenizer", "load_texts", "text_batches", "array_batches"]

TEXT_SUFFIXES = (".jsonl", ".txt")
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


def load_texts(path: Path) -> list[str]:
    """The sentences of a ``.jsonl`` (``{"text": ...}`` per line) or ``.txt`` file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as UTF-8 text: {e}") from e
    texts = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if Path(path).suffix == ".txt":
            texts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f'{path}:{no} is not JSON ({e.msg}); expected {{"text": ...}}') from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(
                f"{path}:{no} holds {str(obj)[:60]!r}; expected an object with a string "
                '"text", e.g. {"text": "attention is all you need"}'
            )
        texts.append(obj["text"])
    if not texts or not any(t.strip() for t in texts):
        what = 'one {"text": ...} object' if Path(path).suffix == ".jsonl" else "one sentence"
        raise InputError(
            f"{path} holds no sentences (empty or blank lines only); expected {what} per line"
        )
    return texts


def text_batches(
    texts: list[str],
    tokenizer: Any,
    model: torch.nn.Module,
    batch_size: int,
    *,
    max_length: int | None = None,
    left_pad: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches, each padded to its own longest sentence.

    ``left_pad``: decoder-only generation continues after the last token, so prompts are
    padded on the left (and a tokenizer without a pad token pads with its EOS token).
    """
    vocab = getattr(model.config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
            "expected a tokenizer that fits the model (its config's vocab_size)"
        )
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
    out = []
    for a in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[a : a + batch_size],
            padding="longest",
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if k in accepted}
        if not batch["attention_mask"].any(dim=1).all():
            row = int((~batch["attention_mask"].any(dim=1)).nonzero()[0]) + a
            raise InputError(f"sentence {row} has no tokens; expected text the tokenizer keeps")
        out.append(batch)
    return out


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
