"""Build a model and a batch source from CLI options (reference model or HF config)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnscope.capture.model import Transformer
from attnscope.capture.synthetic import GUIDE_DEC, GUIDE_ENC, guide_model_config, synthetic_batches
from attnscope.errors import ConfigError, InputError

__all__ = ["build_job", "load_inputs", "hf_model_from_config"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read JSON config {path}: {e}") from e


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """Arrays from ``.npz`` or ``.pt`` (``torch.load(weights_only=True)``), flat key -> array."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix in (".pt", ".pth"):
        obj = torch.load(path, weights_only=True, map_location="cpu")
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
        return flat
    raise InputError(f"inputs file {path} must end in .npz or .pt, got {path.suffix!r}")


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


def _reference(config: Path | None, inputs: Path | None, n_batches: int, batch_size: int,
               seed: int) -> tuple[torch.nn.Module, Iterable[Any]]:
    cfg = dict(guide_model_config())
    enc_mod, dec_mod = dict(GUIDE_ENC), dict(GUIDE_DEC)
    if config is not None:
        raw = _read_json(config)
        enc_mod = raw.pop("enc_modalities", enc_mod)
        dec_mod = raw.pop("dec_modalities", dec_mod)
        cfg.update(raw)
    torch.manual_seed(seed)
    model = Transformer.from_config(cfg).eval()
    if inputs is None:
        d = model.config.embed_dim
        return model, _Batches(
            lambda: synthetic_batches(n_batches, batch_size, d, enc=enc_mod, dec=dec_mod,
                                      seed=seed),
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


def hf_model_from_config(path: Path, seed: int = 0) -> torch.nn.Module:
    """A Hugging Face model with random weights from a local ``config.json`` (no download)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("--hf-config needs `pip install transformers`") from e
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    raw = _read_json(cfg_file)
    model_type = raw.get("model_type")
    if not model_type:
        raise ConfigError(f"{cfg_file} has no 'model_type'; expected a transformers config.json")
    cfg = transformers.AutoConfig.for_model(**raw)
    torch.manual_seed(seed)
    if cfg.is_encoder_decoder:
        cls = transformers.AutoModelForSeq2SeqLM
    elif "CausalLM" in (raw.get("architectures") or [""])[0] or raw.get("is_decoder"):
        cls = transformers.AutoModelForCausalLM
    else:
        cls = transformers.AutoModel
    return cls.from_config(cfg, attn_implementation="eager").eval()


def _hf(hf_config: Path, inputs: Path | None, n_batches: int, batch_size: int, seq_len: int,
        seed: int) -> tuple[torch.nn.Module, Iterable[Any]]:
    model = hf_model_from_config(hf_config, seed)
    if inputs is not None:
        arrays = load_inputs(inputs)
        n = len(next(iter(arrays.values())))

        def make() -> Iterator[Any]:
            for s in _slices(n, batch_size):
                yield {k: torch.from_numpy(np.asarray(v[s])) for k, v in arrays.items()}

        return model, _Batches(make, -(-n // batch_size))
    vocab = int(getattr(model.config, "vocab_size", 1000))

    def make_synth() -> Iterator[Any]:
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            b = {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g)}
            if model.config.is_encoder_decoder:
                b["decoder_input_ids"] = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
            yield b

    return model, _Batches(make_synth, n_batches)


def build_job(kind: str, *, config: Path | None = None, hf_config: Path | None = None,
              inputs: Path | None = None, n_batches: int = 4, batch_size: int = 8,
              seq_len: int = 32, seed: int = 0) -> tuple[torch.nn.Module, Iterable[Any]]:
    """(model, re-iterable batches) for ``attnscope capture``."""
    if n_batches < 1 or batch_size < 1:
        raise ConfigError(f"--batches and --batch-size must be >= 1, got {n_batches}, {batch_size}")
    if kind == "hf":
        if hf_config is None:
            raise ConfigError("--model hf needs --hf-config PATH")
        return _hf(hf_config, inputs, n_batches, batch_size, seq_len, seed)
    return _reference(config, inputs, n_batches, batch_size, seed)
