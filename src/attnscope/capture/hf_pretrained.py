"""A pretrained Hugging Face checkpoint for ``attnscope capture --hf-model PATH_OR_ID``.

Loaded offline only (``local_files_only=True``): ``PATH_OR_ID`` is a local folder written
by ``save_pretrained`` (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``,
sharded or not) or a hub id already in the local Hugging Face cache (``HF_HUB_CACHE``),
whose snapshot folder is then read the same way. Nothing is downloaded. A folder without
a config or without weights, an id that is not cached and a checkpoint that leaves some
of the model's parameters uninitialised are each refused in one line: a capture of
partly random weights would look like the real model's attention. (A missing pooler,
which no attention reads, is allowed and listed in the provenance as ``uninitialised``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attnscope._extras import require
from attnscope.capture.hf import DECODER_ONLY_TYPES
from attnscope.capture.provenance import mark_weights
from attnscope.errors import ConfigError

__all__ = ["WEIGHT_FILES", "TORCH_DTYPES", "hf_model_pretrained", "model_folder"]

#: files holding a checkpoint's weights (an ``*.index.json`` names the shards)
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip
#: ``--torch-dtype`` choices: the dtype the model's parameters are loaded in
TORCH_DTYPES = ("float32", "bfloat16", "float16")


def model_folder(source: str) -> tuple[Path, str | None]:
    """``(folder, hub id or None)`` of ``--hf-model``: a local folder, or the cached
    snapshot folder of a hub id. Checks the folder holds a config and weights."""
    path = Path(source).expanduser()
    hub_id = None
    if not path.exists():
        if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
            raise ConfigError(
                f"--hf-model {source}: no such folder; expected a folder written by "
                "save_pretrained or a hub id in the local Hugging Face cache"
            )
        path, hub_id = _cached_snapshot(source), source
    if not path.is_dir():
        raise ConfigError(
            f"--hf-model {source} is a file; expected the folder holding config.json and "
            "the weights (for a config alone, --hf-config gives random weights)"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--hf-model {source}: {path} has no config.json (and so no model); expected "
            f"a folder written by save_pretrained with config.json and {WEIGHT_FILES[0]}"
        )
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(
            f"--hf-model {source}: {path} has config.json but no weights (none of "
            f"{', '.join(WEIGHT_FILES)}); expected a saved checkpoint (--hf-config builds "
            "the model from its config with random weights, if that is what you want)"
        )
    return path, hub_id


def _cached_snapshot(repo_id: str) -> Path:
    hub = require("huggingface_hub", "--hf-model HUB_ID")
    try:
        return Path(hub.snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - not cached, bad id: hub raises several types
        cache = hub.constants.HF_HUB_CACHE
        raise ConfigError(
            f"--hf-model {repo_id}: not a local folder, and not in the local Hugging Face "
            f"cache ({cache}; {type(e).__name__}); attnscope never downloads: fetch it once "
            f"with `hf download {repo_id}` (or huggingface-cli download), or pass its folder"
        ) from e


def hf_model_pretrained(
    source: str, *, torch_dtype: str | None = None, generate: bool = False
) -> torch.nn.Module:
    """The checkpoint at ``source`` (folder or cached hub id), in eval mode, offline.

    ``torch_dtype``: one of :data:`TORCH_DTYPES` (default: float32). ``generate``: a
    decoder-only model type gets its language-model head (``AutoModelForCausalLM``).
    The model is marked with its weights' provenance (``pretrained from FOLDER``), which
    the archive's ``capture.provenance.weights`` records.
    """
    transformers = require("transformers", "--hf-model")
    if torch_dtype is not None and torch_dtype not in TORCH_DTYPES:
        raise ConfigError(f"--torch-dtype {torch_dtype!r}; expected one of {TORCH_DTYPES}")
    folder, hub_id = model_folder(source)
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - an unknown model_type, a bad JSON
        raise ConfigError(
            f"--hf-model {source}: cannot read {folder / 'config.json'}: "
            f"{' '.join(str(e).split())[:300]}"
        ) from e
    cls = _model_class(transformers, cfg, generate)
    dtype = getattr(torch, torch_dtype or "float32")
    log = transformers.utils.logging
    bars, verbosity = log.is_progress_bar_enabled(), log.get_verbosity()
    # one line per error: no progress bars, no load report (missing keys are refused below)
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        model, loading = cls.from_pretrained(
            str(folder), local_files_only=True, dtype=dtype, output_loading_info=True
        )
    except Exception as e:  # noqa: BLE001 - torn safetensors, shape mismatches...
        raise ConfigError(
            f"--hf-model {source}: cannot load the weights of {folder}: {type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}"
        ) from e
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    missing = sorted(loading.get("missing_keys") or []) + sorted(
        str(k[0]) if isinstance(k, tuple) else str(k)
        for k in loading.get("mismatched_keys") or []
    )
    # a pooler (BERT-like models' first-token projection) feeds no attention: a checkpoint
    # saved without one (e.g. from a masked-LM head) is still the model's attention
    pooler = [k for k in missing if "pooler" in k.split(".")]
    missing = [k for k in missing if k not in pooler]
    if missing:
        raise ConfigError(
            f"--hf-model {source}: {len(missing)} parameter(s) of {type(model).__name__} are "
            f"not in the checkpoint (e.g. {missing[0]}) and would be random; expected a checkpoint "
            f"of the whole model (its config names {cfg.architectures})"
        )
    record: dict[str, Any] = {"source": "pretrained", "from": str(folder.resolve()),
                              "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    if hub_id is not None:
        record["hub_id"] = hub_id
    if pooler:
        record["uninitialised"] = pooler  # random, and read by no attention
    mark_weights(model, record)
    return model.eval()


def _model_class(transformers: Any, cfg: Any, generate: bool) -> Any:
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    if cfg.is_encoder_decoder:
        return transformers.AutoModelForSeq2SeqLM
    if (generate and cfg.model_type in DECODER_ONLY_TYPES) or any(
        k in arch for k in ("CausalLM", "LMHead")
    ):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel
