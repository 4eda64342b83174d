"""The options of one capture job, checked once, before the model runs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from attnscope.capture.blocks import check_block
from attnscope.capture.policy import RowPolicy
from attnscope.contracts import DEFAULT_COMPRESSOR, DTYPES, FORMATS, STACKS
from attnscope.errors import ConfigError
from attnscope.store.codecs import check_level
from attnscope.store.meta import archive_format

__all__ = ["CaptureOptions", "CaptureSummary", "resolve_device", "TORCH_DTYPES"]

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}

SampleIds = Mapping[str, Any] | Callable[[int, Any], Mapping[str, Any]]


@dataclass(frozen=True)
class CaptureOptions:
    """Keyword options of :func:`attnscope.capture.job.capture`, normalised and checked.

    Selections become tuples; a repeated layer, head or kind is refused (it would store
    the same weights twice under two labels).
    """

    layers: tuple[int | str, ...] | None = None  # layer indices or array names kept; None: all
    heads: tuple[int, ...] | None = None  # original head indices kept, in this order; None: all
    kinds: tuple[str, ...] | None = None  # "self_attention", "cross_attention" or "stack/kind"
    dtype: str = "float16"  # stored dtype (contracts.DTYPES); the cast happens on the device
    format: str | None = None  # "zarr" | "hdf5"; None: from the archive path's suffix
    sample_ids: SampleIds | None = None  # full-length arrays, or f(batch_index, batch) -> arrays
    device: str | torch.device | None = None  # None: the device of the model's parameters
    resume: bool = False  # continue after the archive's committed samples
    progress: bool = True  # tqdm bar, only when stderr is a terminal
    topk: int | None = None  # sparse mode: keep the top-k keys of each query row
    tokenizer: Any = None  # HF tokenizer that labels the token axes
    tags: Mapping[str, Any] | None = None  # JSON user tags, stored in the provenance
    overwrite: bool = False  # replace an existing archive
    validate: bool = True  # check every matrix on the device before the cast
    queue_depth: int = 2  # batches that may wait for the writer thread (bounds host memory)
    total: int | None = None  # samples the batch source yields (progress, shard capacity)
    rank: int | None = None  # this process's rank in a multi-process capture
    world_size: int | None = None  # processes writing the one archive
    wait_s: float = 300.0  # how long ranks > 0 wait for rank 0 to create the archive
    # HF generation: generate() options, e.g. {"max_new_tokens": 16, "do_sample": True};
    # checked against the model by its adapter (capture/generation.py)
    generate: Mapping[str, Any] | None = None
    # ragged archives: the maximum tokens per side, one int for every side or
    # {"encoder": 128, ...}; None: from the batches (capture/ragged.py)
    max_length: int | Mapping[str, int] | None = None
    # run the first batch and report what the job would write (capture/dryrun.py); nothing
    # is created at the destination
    dry_run: bool = False
    # rows per block of the query-block recompute (capture/blocks.py); None: blocks of
    # ~64 MiB of float32 scores, and only for layers whose weights exceed that
    query_block: int | None = None
    # row policy: per query side, the rows kept ("decoder:last", {"decoder": [3, 4]}, ...;
    # capture/policy.py); parsed here, resolved once the first batch's layout is known
    rows: RowPolicy | None = None
    compressor: str | None = None  # chunk codec of a new archive; None: contracts' default
    level: int | None = None  # its level; None: the compressor's default (contracts)
    workers: int | None = None  # threads that encode and write chunks; None: one per core
    inflight_mb: float | None = None  # bound on batch data queued for the writer; None: 512

    def __post_init__(self) -> None:
        check_block(self.query_block)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; expected one of {DTYPES}")
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} is not supported; expected one of {FORMATS}")
        _positive("queue_depth", self.queue_depth)
        check_level(self.compressor or DEFAULT_COMPRESSOR, self.level)
        if self.workers is not None:
            _positive("workers", self.workers)
        if self.inflight_mb is not None and not (
            isinstance(self.inflight_mb, (int, float)) and self.inflight_mb > 0
        ):
            raise ConfigError(f"inflight_mb must be a number > 0, got {self.inflight_mb!r}")
        if self.topk is not None:
            _positive("topk", self.topk)
        if (self.rank is None) != (self.world_size is None) or (
            self.rank is not None and not 0 <= self.rank < self.world_size  # type: ignore[operator]
        ):
            raise ConfigError(
                f"rank and world_size go together with 0 <= rank < world_size, got "
                f"rank={self.rank}, world_size={self.world_size}"
            )
        if self.generate is not None and not isinstance(self.generate, Mapping):
            raise ConfigError(
                "generate must be a dict of generate() options, e.g. "
                f"dict(max_new_tokens=16), got {type(self.generate).__name__}"
            )
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume and overwrite contradict each other: resume continues the archive's "
                "committed samples, overwrite deletes them; expected one of the two "
                "(--resume or --overwrite)"
            )
        if self.dry_run and (self.resume or self.rank is not None):
            raise ConfigError(
                f"dry_run measures a new archive; got resume={self.resume}, rank={self.rank}; "
                "expected neither (dry-run the job without resume / rank)"
            )
        object.__setattr__(self, "max_length", _max_length(self.max_length))
        object.__setattr__(self, "rows", RowPolicy.parse(self.rows))
        layers = _selection("layers", self.layers, _layer)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "heads", _selection("heads", self.heads, _index))
        object.__setattr__(self, "kinds", _selection("kinds", self.kinds, str))

    @property
    def sharded(self) -> bool:
        """Whether this process writes one rank's share of a multi-process capture."""
        return self.rank is not None



@dataclass(frozen=True)
class CaptureSummary:
    """What a capture job wrote."""

    archive: str
    samples: int  # samples written by this call
    committed: int  # samples committed in the archive in total
    batches: int
    bytes: int  # uncompressed bytes of attention written, in the stored dtype
    seconds: float
    samples_per_s: float
    mb_per_s: float
    # generation (generate=): per written sample, {"ids", "prompt_length", "new_tokens",
    # "text" (with a tokenizer)}; None for forward-pass capture
    generated: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

def check_format(opts: CaptureOptions, path: Any, existing: str | None = None) -> None:
    """Refuse an archive format the job cannot write: a multi-process job needs a Zarr
    directory (one file has one writer); a resume, the ``existing`` archive's format."""
    if existing is not None and opts.format is not None and opts.format != existing:
        raise ConfigError(
            f"resume: format differs: archive {str(path)!r} is {existing}, this run asks for "
            f"{opts.format}; resume without --format (or with --format {existing}), or capture "
            "into a new archive"
        )
    if existing is None and opts.sharded:
        fmt = archive_format(path, opts.format)
        if fmt != "zarr" or str(path).lower().endswith(".zip"):
            raise ConfigError(
                f"multi-process capture (rank/world_size) needs a Zarr directory archive; "
                f"{str(path)!r} is {'a Zarr zip' if fmt == 'zarr' else fmt} (one file has one "
                "writer); capture to a .zarr folder or in one process"
            )


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _max_length(value: Any) -> int | dict[str, int] | None:
    """``max_length`` as an int or a ``{side: int}`` dict (JSON: compared on resume)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(
                "max_length is an empty dict; expected an integer >= 1 or e.g. {'encoder': 128}"
            )
        out = {}
        for side, n in value.items():
            if side not in STACKS:
                raise ConfigError(
                    f"max_length names side {side!r}; expected sides among {list(STACKS)}"
                )
            _positive(f"max_length[{side!r}]", n)
            out[side] = int(n)
        return dict(sorted(out.items()))
    _positive("max_length", value)
    return int(value)


def _index(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise ConfigError(f"head indices must be integers, got {x!r}")
    return int(x)


def _layer(x: Any) -> int | str:
    if isinstance(x, str):
        return x
    return _index(x)


def _selection(name: str, values: Sequence[Any] | None, conv: Callable[[Any], Any]) -> Any:
    if values is None:
        return None
    if isinstance(values, str):
        raise ConfigError(f"{name} must be a list, got the string {values!r}")
    out = tuple(conv(v) for v in values)
    if not out:
        raise ConfigError(
            f"{name} is empty: it would capture nothing; expected at least one, or None for all"
        )
    if name == "heads" and any(v < 0 for v in out):
        raise ConfigError(f"heads {list(out)} holds a negative index; expected indices >= 0")
    repeated = sorted({v for v in out if out.count(v) > 1}, key=str)
    if repeated:
        raise ConfigError(
            f"{name} {list(out)} repeat {repeated}; expected each at most once "
            "(a repeated selection would store the same weights twice)"
        )
    return out


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that this build and machine can allocate on, or a one-line ConfigError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(
            f"device {str(device)!r} is not a torch device; expected e.g. 'cpu', 'cuda', "
            "'cuda:1' or 'mps'"
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"device {str(device)!r} is not available: {why}; use 'cpu'")
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # noqa: BLE001 - any failure means the device cannot hold the model
        raise ConfigError(f"device {str(device)!r} is not available: {_first_line(e)}") from e
    return dev


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def progress_bar(progress: bool, total: int | None) -> Any:
    """A tqdm bar, only when ``progress`` and stderr is a terminal."""
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="capture", dynamic_ncols=True)


def batch_ids(
    sample_ids: Any, bi: int, batch: Any, start: int, stop: int
) -> dict[str, np.ndarray] | None:
    """The ``sample_ids`` option's ids of samples ``[start, stop)`` of batch ``bi``."""
    if sample_ids is None:
        return None
    if callable(sample_ids):
        # ids of the whole batch; keep the tail that is written (resume may drop a head)
        return {k: np.asarray(v)[-(stop - start) :] for k, v in sample_ids(bi, batch).items()}
    return {k: np.asarray(v)[start:stop] for k, v in sample_ids.items()}
