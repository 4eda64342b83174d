"""What a captured archive's numbers mean, and the check that a resumed run means the same.

A resumed run appends to an archive written by an earlier run. If it selected other heads,
layers or kinds, another dtype, top-k or max_length, another token layout, another model
config or other weights, the archive would silently mix two captures under one label. The
:class:`CaptureIdentity` of the run is stored in the archive's ``capture`` metadata at
create and compared, option by option, on resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnscope.capture.policy import RowPolicy
from attnscope.contracts import QUERY_ROWS
from attnscope.errors import ConfigError
from attnscope.store import TokenLayout

__all__ = ["CaptureIdentity", "param_hash"]

# Keys of a model config that describe the software, not the model.
_IGNORED_CONFIG_KEYS = ("transformers_version",)


@dataclass(frozen=True)
class CaptureIdentity:
    """The options of a run that decide what its stored numbers mean."""

    arrays: tuple[str, ...]  # array names captured, e.g. "decoder/1/cross_attention"
    heads: tuple[int, ...] | None  # original head indices kept; None: all
    dtype: str  # stored dtype
    topk: int | None  # sparse mode's k; None: dense
    model_config: dict[str, Any]  # the adapter's JSON config of the model
    param_hash: str  # "sha256:<hex>" of the model's parameters (see param_hash)
    n_params: int  # parameters hashed
    generate: dict[str, Any] | None = None  # generate() options (JSON); None: forward pass
    # the max_length option (int, {side: int}); None: maxima from the batches
    max_length: int | dict[str, int] | None = None
    # the row policy (RowPolicy.to_json()); None: every query row
    rows: dict[str, Any] | None = None

    def settings(self, device: torch.device, queue_depth: int) -> dict[str, Any]:
        """The archive's ``capture`` metadata (JSON)."""
        return {
            "arrays": list(self.arrays),
            "heads": None if self.heads is None else list(self.heads),
            "dtype": self.dtype,
            "mode": "dense" if self.topk is None else "sparse",
            "topk": self.topk,
            "device": str(device),
            "queue_depth": queue_depth,
            "torch": torch.__version__,
            "param_hash": self.param_hash,
            "n_params": self.n_params,
            "generate": self.generate,
            "max_length": self.max_length,
            "rows": self.rows,
        }

    def check(self, meta: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` if this run would change what the archive ``meta`` means.

        Settings an older archive does not record are not compared.
        """
        cap = meta.get("capture") or {}
        if "arrays" in cap:
            have = tuple(cap["arrays"])
            _same("layers", _layers(have), _layers(self.arrays))
            _same("kinds", _kinds(have), _kinds(self.arrays))
            _same("arrays", list(have), list(self.arrays))
        if "heads" in cap:
            _same("heads", _all_or(cap["heads"]), _all_or(self.heads))
        if "generate" in cap:
            _same("generate options", cap["generate"], self.generate)
        if "max_length" in cap and not _same_maxima(meta.get("max_lengths"), self.max_length):
            _same("max_length", cap["max_length"], self.max_length)
        # an archive without the key was captured with every row
        _same("rows", _policy(cap.get("rows")), _policy(self.rows))
        _same("dtype", meta.get("dtype"), self.dtype)
        _same("topk", meta.get("topk"), self.topk)
        if meta.get("model_config"):
            diff = _first_diff(meta["model_config"], self.model_config)
            if diff is not None:
                key, have, want = diff
                raise ConfigError(
                    f"resume: model config differs at {key!r}: archive has {have!r}, this run "
                    f"has {want!r}; resume with the model that wrote the archive"
                )
        if "param_hash" in cap and cap["param_hash"] != self.param_hash:
            raise ConfigError(
                f"resume: model weights differ: archive has parameter hash "
                f"{_short(cap['param_hash'])}, this run's model has {_short(self.param_hash)} "
                "(another seed or checkpoint?); resume with the weights that wrote the archive"
            )

    @staticmethod
    def check_rows(meta: Mapping[str, Any], rows: Mapping[str, Any] | None, policy: Any) -> None:
        """Raise if the resolved ``rows`` of a resumed run differ from the archive's."""
        want = {k: [int(x) for x in v] for k, v in (rows or {}).items()}
        have = meta.get(QUERY_ROWS) or {}
        if have != want:
            raise ConfigError(
                f"resume: query rows differ: archive keeps {have}, this run's policy "
                f"'{policy}' keeps {want}; resume with the policy and inputs that wrote the "
                "archive"
            )

    @staticmethod
    def check_layout(meta: Mapping[str, Any], layout: TokenLayout) -> None:
        """Raise if ``layout``'s segments (names, lengths) differ from the archive's."""
        if meta.get("layout") is None:
            return
        have = _segments(TokenLayout.from_json(meta["layout"]))
        want = _segments(layout)
        if have != want:
            raise ConfigError(
                f"resume: token layout differs: archive has {have}, this run's batches have "
                f"{want}; resume with the same modalities and lengths"
            )


def param_hash(model: nn.Module) -> tuple[str, int]:
    """``("sha256:<hex>", n_params)`` over every parameter's name, dtype, shape and bytes.

    Every byte is hashed (a strided sample would miss a fine-tune that moved few weights):
    about 0.25 s per 100M float32 parameters on one CPU core (SHA-256 at ~1.7 GB/s); weights
    on a GPU are copied to the host one parameter at a time.
    """
    h = hashlib.sha256()
    n = 0
    for name, p in model.named_parameters():
        t = p.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(_raw_bytes(t)))
        n += t.numel()
    return f"sha256:{h.hexdigest()}", n


def _raw_bytes(t: torch.Tensor) -> Any:
    flat = t.reshape(-1).contiguous().cpu()
    try:
        return flat.view(torch.uint8).numpy()
    except (RuntimeError, TypeError):  # e.g. quantized tensors: hash their values instead
        return flat.double().numpy()


def _short(digest: str) -> str:
    return digest[: len("sha256:") + 12]


def _same(option: str, have: Any, want: Any) -> None:
    if have != want:
        verb = "differs" if option in ("dtype", "topk", "max_length") else "differ"
        raise ConfigError(
            f"resume: {option} {verb}: archive has {have}, this run asks for {want}; "
            "resume with the options that wrote the "
            "archive, or capture into a new one"
        )


def _same_maxima(stored: Any, option: int | Mapping[str, int] | None) -> bool:
    """Whether ``option`` asks for exactly a ragged archive's stored maxima (``max_lengths``).

    Resuming with ``max_length`` set to the archive's maximum (e.g. to truncate inputs that
    a run without max_length found too long) means the same archive.
    """
    if not isinstance(stored, Mapping) or not stored or option is None:
        return False
    have = {str(k): int(v) for k, v in stored.items()}
    if isinstance(option, Mapping):
        return {str(k): int(v) for k, v in option.items()} == have
    return all(v == int(option) for v in have.values())


def _policy(rows: Any) -> str:
    """A row policy's spelling ("all rows" without one), for comparison and messages."""
    pol = RowPolicy.from_json(rows)
    return "all rows" if pol is None else f"'{pol}'"


def _all_or(heads: Sequence[int] | None) -> Any:
    return "all" if heads is None else [int(h) for h in heads]


def _layers(arrays: Sequence[str]) -> list[int]:
    return sorted({int(a.split("/")[1]) for a in arrays})


def _kinds(arrays: Sequence[str]) -> list[str]:
    return sorted({"/".join(a.split("/")[::2]) for a in arrays})


def _segments(layout: TokenLayout) -> dict[str, list[tuple[str, int]] | None]:
    return {
        side: None if sl is None else [(s.name, len(s)) for s in sl.segments]
        for side, sl in (("encoder", layout.encoder), ("decoder", layout.decoder))
    }


def _first_diff(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first key (dotted path) where two JSON configs differ, with both values."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if str(k).startswith("_") or k in _IGNORED_CONFIG_KEYS:
                continue
            diff = _first_diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if diff is not None:
                return diff
        return None
    return None if _json(a) == _json(b) else (path or "<root>", a, b)


def _json(v: Any) -> Any:
    # lists and tuples compare equal once stored as JSON
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    return v


# levels of archives written before the level was stored (meta "level" absent)
_OLD_LEVELS = {"zstd": 1, "blosc-zstd": 1, "blosc-lz4": 5}


def check_codec(meta: dict[str, Any], compressor: str | None, level: int | None) -> None:
    """A resumed archive keeps its codec: refuse a ``compressor``/``level`` asked for that
    differs from the one it was created with (None: whatever it has)."""
    have = meta.get("compressor", "zstd")
    have_level = meta.get("level", _OLD_LEVELS.get(have))
    if compressor is not None and compressor != have:
        raise ConfigError(
            f"compressor {compressor!r} differs from the archive's {have!r}; a resumed archive "
            "keeps its codec (drop --compressor, or start a new archive)"
        )
    if level is not None and level != have_level:
        raise ConfigError(
            f"level {level} differs from the archive's {have} level {have_level}; a resumed "
            "archive keeps its codec (drop --level, or start a new archive)"
        )
