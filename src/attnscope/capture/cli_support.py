"""Build a model and a batch source from CLI options (reference model, HF config or checkpoint)."""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnscope._extras import require
from attnscope.capture.hf import DECODER_ONLY_TYPES
from attnscope.capture.hf_inputs import array_batches, check_tokenizer, load_tokenizer, text_batches
from attnscope.capture.hf_pretrained import hf_model_pretrained, model_folder
from attnscope.capture.model import Transformer
from attnscope.capture.provenance import mark_weights
from attnscope.capture.records import is_records, load_records
from attnscope.capture.synthetic import GUIDE_DEC, GUIDE_ENC, guide_model_config, synthetic_batches
from attnscope.errors import ConfigError, InputError

__all__ = [
    "build_job", "load_inputs", "hf_model_from_config", "generate_options", "load_tokenizer",
    "model_tokenizer", "row_ids",
]  # fmt: skip

# files of a tokenizer saved beside a checkpoint (save_pretrained)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model", "tokenizer.model")  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read JSON config {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ConfigError(
            f"config {path} holds a JSON {type(obj).__name__}; expected an object "
            '(e.g. {"embed_dim": 64, ...})'
        )
    return obj


def _modalities(raw: Any, key: str, path: Path) -> dict[str, int]:
    """``{"text": 8, "image": 16}``: modality name -> token count (an integer >= 1)."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"config {path}: {key!r} is {raw!r}; expected a non-empty object of modality name "
            'to token count, e.g. {"text": 8, "image": 16}'
        )
    for name, n in raw.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(
                f"config {path}: {key}[{name!r}] is {n!r}; expected a token count, an integer >= 1"
            )
    return raw


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """Numeric arrays from ``.npz`` or ``.pt``, flat key -> array.

    Nothing is unpickled: ``.npz`` is read with ``allow_pickle=False``, ``.pt`` with
    ``weights_only=True``; anything else is an :class:`InputError` saying what was expected.
    """
    path = Path(path)
    if path.suffix == ".npz":
        return _checked(path, _load_npz(path))
    if path.suffix in (".pt", ".pth"):
        try:
            with warnings.catch_warnings():  # e.g. "pickle protocol 4": refused anyway
                warnings.simplefilter("ignore")
                obj = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors alike
            raise InputError(
                f"{path} was refused by torch.load(weights_only=True): {_torch_load_why(e)}; "
                "expected a dict of tensors saved with torch.save (other pickled objects are "
                "never loaded: they could run code)"
            ) from e
        flat: dict[str, np.ndarray] = {}

        def walk(prefix: str, o: Any) -> None:
            if isinstance(o, dict):
                for k, v in o.items():
                    walk(f"{prefix}/{k}" if prefix else str(k), v)
            elif isinstance(o, torch.Tensor):
                flat[prefix] = o.numpy()
            else:
                raise InputError(f"{path}: entry {prefix!r} is {type(o).__name__}, not a tensor")

        walk("", obj)
        return _checked(path, flat)
    raise InputError(
        f"inputs file {path} must end in .npz or .pt (or, for Hugging Face models, rows of "
        f"text: .jsonl, .csv, .parquet, .txt or a saved datasets folder), got {path.suffix!r}"
    )


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"{path} is not a .npz file (not a zip archive); expected numpy.savez output"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays would need pickle
        raise InputError(
            f"{path} holds object arrays ({_first_line(e)}); expected numeric arrays "
            "(nothing is unpickled)"
        ) from e
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"{path} cannot be read as a .npz file: {_first_line(e)}") from e


def _checked(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Refuse empty inputs, non-numeric arrays and arrays of different sample counts."""
    if not arrays:
        raise InputError(f"{path} holds no arrays")
    n = None
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise InputError(
                f"{path}: array {k!r} has dtype {a.dtype}; expected numbers (bool, int or float)"
            )
        if a.ndim == 0:
            raise InputError(f"{path}: array {k!r} is a scalar; expected (N, ...) per sample")
        if n is not None and len(a) != n:
            raise InputError(
                f"{path}: array {k!r} has {len(a)} samples, the others {n}; expected equal counts"
            )
        n = len(a)
    return arrays


def _torch_load_why(e: BaseException) -> str:
    # torch's weights_only message is a paragraph whose advice (weights_only=False) we do
    # not give; keep its one specific line.
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", str(e))
    return m.group(1) if m else f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


class _Batches:
    """A re-iterable batch source (``resume`` iterates it again from the start)."""

    def __init__(self, make: Any, n_batches: int) -> None:
        self._make = make
        self._n = n_batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self._make())

    def __len__(self) -> int:
        return self._n


def _reference(
    config: Path | None, inputs: Path | None, n_batches: int, batch_size: int, seed: int
) -> tuple[torch.nn.Module, Iterable[Any]]:
    cfg = dict(guide_model_config())
    enc_mod, dec_mod = dict(GUIDE_ENC), dict(GUIDE_DEC)
    if config is not None:
        raw = _read_json(config)
        if "enc_modalities" in raw:
            enc_mod = _modalities(raw.pop("enc_modalities"), "enc_modalities", config)
        if "dec_modalities" in raw:
            dec_mod = _modalities(raw.pop("dec_modalities"), "dec_modalities", config)
        cfg.update(raw)
    torch.manual_seed(seed)
    model = Transformer.from_config(cfg).eval()
    mark_weights(model, {"source": "random", "seed": seed,
                         **({"config": str(config)} if config is not None else {})})  # fmt: skip
    if inputs is None:
        d = model.config.embed_dim
        return model, _Batches(
            lambda: synthetic_batches(
                n_batches, batch_size, d, enc=enc_mod, dec=dec_mod, seed=seed
            ),
            n_batches,
        )
    arrays = load_inputs(inputs)
    enc = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("enc/")}
    dec = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("dec/")}
    if not enc or not dec:
        raise InputError(
            f"{inputs} must hold 'enc/<modality>' and 'dec/<modality>' arrays; found {list(arrays)}"
        )
    n = len(next(iter(enc.values())))

    def make() -> Iterator[Any]:
        for s in _slices(n, batch_size):
            yield (
                {k: torch.from_numpy(np.asarray(v[s], dtype=np.float32)) for k, v in enc.items()},
                {k: torch.from_numpy(np.asarray(v[s], dtype=np.float32)) for k, v in dec.items()},
            )

    return model, _Batches(make, -(-n // batch_size))


def hf_model_from_config(path: Path, seed: int = 0, generate: bool = False) -> torch.nn.Module:
    """A Hugging Face model with random weights from a local ``config.json`` (no download).

    The weights are drawn after ``torch.manual_seed(seed)`` and the model is marked
    ``random, seed N`` in the archive's provenance (even if checkpoint weights sit beside
    the config: ``--hf-model`` loads those).

    ``generate``: a decoder-only model type gets its language-model head
    (``AutoModelForCausalLM``), which generation needs.
    """
    transformers = require("transformers", "--hf-config")
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    raw = _read_json(cfg_file)
    model_type = raw.get("model_type")
    if not model_type:
        raise ConfigError(f"{cfg_file} has no 'model_type'; expected a transformers config.json")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise ConfigError(
            f"{cfg_file}: model_type {model_type!r} is not a model type of the installed "
            f"transformers {transformers.__version__}; expected e.g. 'bert', 'gpt2', 't5', 'llama'"
        )
    _check_hf_types(cfg_file, raw, transformers.CONFIG_MAPPING[model_type]())
    try:
        cfg = transformers.AutoConfig.for_model(**raw)
        torch.manual_seed(seed)
        if cfg.is_encoder_decoder:
            cls = transformers.AutoModelForSeq2SeqLM
        elif (
            (generate and model_type in DECODER_ONLY_TYPES)
            or any(k in (raw.get("architectures") or [""])[0] for k in ("CausalLM", "LMHead"))
            or raw.get("is_decoder")
        ):
            cls = transformers.AutoModelForCausalLM
        else:
            cls = transformers.AutoModel
        model = cls.from_config(cfg, attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001 - transformers raises many types on a bad config
        msg = " ".join(str(e).split())
        raise ConfigError(f"cannot build a {model_type} model from {cfg_file}: {msg}") from e
    mark_weights(model, {"source": "random", "seed": seed, "config": str(cfg_file)})
    return model


def _check_hf_types(cfg_file: Path, raw: dict[str, Any], defaults: Any) -> None:
    """Each key whose default is a bool, int, float or str must hold a value of that type."""
    for key, value in raw.items():
        default = getattr(defaults, key, None)
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            want = "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ConfigError(
                f"{cfg_file}: {key!r} is {value!r}; expected {want} (default {default!r})"
            )


def model_tokenizer(hf_model: str) -> Any:
    """The tokenizer saved beside the checkpoint ``--hf-model`` names; None if it has none."""
    folder, _ = model_folder(hf_model)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)


def _hf(
    model: torch.nn.Module,
    inputs: Path | None,
    n_batches: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    generate: bool = False,
    tokenizer: Any = None,
    max_length: int | None = None,
    text_field: str | None = None,
    target_field: str | None = None,
) -> Iterable[Any]:
    enc_dec = bool(model.config.is_encoder_decoder)
    # decoder-only generation continues after each prompt's last token: pad on the left
    left_pad = generate and not enc_dec
    if tokenizer is not None:
        check_tokenizer(tokenizer, model)
    if target_field is not None and (not enc_dec or generate):
        raise ConfigError(
            f"--target-field {target_field}: targets are an encoder-decoder's decoder inputs "
            + ("and --max-new-tokens generates them; drop one of the two" if enc_dec else
               f"but {type(model).__name__} is not an encoder-decoder; drop --target-field")
        )
    if inputs is not None and is_records(inputs):
        if tokenizer is None:
            raise ConfigError(
                f"--inputs {inputs} holds sentences and the model comes with no tokenizer: "
                "pass --tokenizer DIR (a local tokenizer folder) to turn them into token ids"
            )
        if enc_dec and not generate and target_field is None:
            raise ConfigError(
                f"{type(model).__name__} is an encoder-decoder: its decoder needs inputs; "
                "pass --target-field FIELD (the targets of each row) or --max-new-tokens N"
            )
        rec = load_records(inputs, text_field, target_field)
        return text_batches(rec.texts, tokenizer, model, batch_size, max_length=max_length,
                            left_pad=left_pad, targets=rec.targets, rows=rec.rows)  # fmt: skip
    if text_field is not None or target_field is not None:
        raise ConfigError("--text-field/--target-field name a field of rows of text (--inputs "
                          ".jsonl, .csv, .parquet or a saved datasets folder)")  # fmt: skip
    if inputs is not None:
        return array_batches(load_inputs(inputs), inputs, batch_size, left_pad=left_pad)
    vocab = int(getattr(model.config, "vocab_size", 1000))

    def make_synth() -> Iterator[Any]:
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            b = {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g)}
            if enc_dec and not generate:  # generate starts the decoder
                b["decoder_input_ids"] = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
            yield b

    # a list: read ahead for the archive's maximum (the batches are small token ids)
    return list(make_synth())


def build_job(
    kind: str,
    *,
    config: Path | None = None,
    hf_config: Path | None = None,
    inputs: Path | None = None,
    n_batches: int = 4,
    batch_size: int = 8,
    seq_len: int = 32,
    seed: int = 0,
    generate: bool = False,
    tokenizer: Any = None,
    max_length: int | None = None,
    hf_model: str | None = None,
    torch_dtype: str | None = None,
    text_field: str | None = None,
    target_field: str | None = None,
) -> tuple[torch.nn.Module, Iterable[Any]]:
    """(model, re-iterable batches) for ``attnscope capture``.

    ``hf_model``: a checkpoint folder or cached hub id (pretrained weights, loaded in
    ``torch_dtype``); ``hf_config``: a config (random weights, seeded with ``seed``).
    ``generate``: the batches are prompts (no synthetic ``decoder_input_ids``).
    ``tokenizer``: turns rows of text (``.jsonl``, ``.csv``, ``.parquet``, ``.txt``, a
    saved ``datasets`` folder; ``text_field`` / ``target_field``) into batches, in file
    order, whose ``sample_ids`` hold each row's id; ``max_length`` truncates them.
    """
    if n_batches < 1 or batch_size < 1:
        raise ConfigError(f"--batches and --batch-size must be >= 1, got {n_batches}, {batch_size}")
    if hf_model is not None and (hf_config is not None or config is not None):
        other = "--hf-config" if hf_config is not None else "--config"
        raise ConfigError(
            f"--hf-model and {other} both name a model; expected one (--hf-model: pretrained "
            "weights, --hf-config: random weights from a config)"
        )
    if torch_dtype is not None and hf_model is None:
        raise ConfigError("--torch-dtype loads a checkpoint's weights in that dtype; it needs "
                          "--hf-model PATH_OR_ID")  # fmt: skip
    if kind == "hf" or hf_model is not None:
        if hf_model is not None:
            model = hf_model_pretrained(hf_model, torch_dtype=torch_dtype, generate=generate)
        elif hf_config is None:
            raise ConfigError("--model hf needs --hf-model PATH_OR_ID or --hf-config PATH")
        else:
            model = hf_model_from_config(hf_config, seed, generate)
        return model, _hf(model, inputs, n_batches, batch_size, seq_len, seed, generate,
                          tokenizer, max_length, text_field, target_field)  # fmt: skip
    if tokenizer is not None:
        raise ConfigError(
            "--tokenizer is for Hugging Face models (--hf-model, --hf-config); the reference "
            "model takes modality arrays (--inputs .npz with 'enc/<modality>', 'dec/<modality>')"
        )
    if inputs is not None and is_records(inputs):
        raise InputError(
            f"--inputs {inputs} holds sentences, which need a Hugging Face model "
            "(--hf-model, or --hf-config with --tokenizer DIR); the reference model takes "
            ".npz / .pt arrays"
        )
    if text_field is not None or target_field is not None:
        raise ConfigError("--text-field/--target-field name fields of rows of text, for a "
                          "Hugging Face model (--hf-model, --hf-config)")  # fmt: skip
    return _reference(config, inputs, n_batches, batch_size, seed)


def row_ids(source: Iterable[Any], world_size: int | None = None) -> dict[str, np.ndarray] | None:
    """``capture(sample_ids=...)`` of a batch source read from rows of text: each sample's
    row id in its file; None for other sources.

    Multi-process capture stores no sample ids yet; there a sample's position is its row
    id as long as no row was skipped (blank ``.jsonl`` / ``.txt`` lines), else it is refused.
    """
    ids = getattr(source, "sample_ids", None)
    if ids is None or not world_size or world_size <= 1:
        return ids
    rows = next(iter(ids.values()))
    if not np.array_equal(rows, np.arange(len(rows))):
        raise ConfigError(
            "multi-process capture stores no row ids yet, and these inputs skip rows (blank "
            "lines), so a sample's position would not be its row; remove the blank lines"
        )
    return None


def generate_options(max_new_tokens: int | None, do_sample: bool, seed: int) -> dict | None:
    """``generate=`` for ``capture`` from ``--max-new-tokens`` / ``--do-sample``.

    Sampling is seeded with ``--seed`` right before capture, so a rerun samples the same
    tokens. ``max_new_tokens`` itself is checked by the model's adapter (naming the model).
    """
    if max_new_tokens is None:
        if do_sample:
            raise ConfigError("--do-sample needs --max-new-tokens N (generation)")
        return None
    if do_sample:
        torch.manual_seed(seed)
    return {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
