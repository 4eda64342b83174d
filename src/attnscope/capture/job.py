"""Capture jobs: run inference batch after batch and stream attention into an archive.

The pipeline has three stages that overlap:

1. the model runs batch ``k+1`` under :func:`torch.inference_mode`; hooks select the
   wanted layers/heads and cast to the stored dtype *on the device*;
2. the selected weights are copied to the host (pinned buffers, asynchronously on CUDA);
3. a writer thread appends batch ``k`` to the archive behind a bounded queue.

Memory stays bounded by ``queue_depth`` batches of selected weights, however many
batches run.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attnscope.capture.adapters import Adapter, adapter_for, iter_wanted
from attnscope.contracts import DTYPES
from attnscope.errors import (
    AttnscopeError,
    CaptureError,
    ConfigError,
    SelectionError,
    ValidationError,
)
from attnscope.store import ArchiveWriter, archive_format, choose_chunks

__all__ = ["capture", "CaptureSummary"]

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CaptureSummary:
    """What a capture job wrote."""

    archive: str
    samples: int  # samples written by this call
    committed: int  # samples committed in the archive in total
    batches: int
    bytes: int  # uncompressed bytes of attention written
    seconds: float
    samples_per_s: float
    mb_per_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _resolve_selection(
    adapter: Adapter,
    layers: Sequence[int | str] | None,
    kinds: Sequence[str] | None,
) -> list[str]:
    names = adapter.names()
    if layers is not None:
        layers = [int(x) if isinstance(x, (int, np.integer)) else x for x in layers]
        known = {int(n.split("/")[1]) for n in names} | set(names)
        bad = [x for x in layers if x not in known]
        if bad:
            raise SelectionError(
                f"unknown layer(s) {bad}; this model has layers "
                f"{sorted({int(n.split('/')[1]) for n in names})}"
            )
    if kinds is not None:
        known_k = {n.split("/")[2] for n in names} | {"/".join(n.split("/")[::2]) for n in names}
        bad = [k for k in kinds if k not in known_k]
        if bad:
            raise SelectionError(f"unknown kind(s) {bad}; expected one of {sorted(known_k)}")
    wanted = list(iter_wanted(names, layers, kinds))
    if not wanted:
        raise SelectionError(f"the selection keeps no attention array; available: {names}")
    return wanted


class _HostCopier:
    """Device -> host copies. On CUDA: pinned buffers, non-blocking, one event per batch."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t.contiguous()
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        return buf

    def fence(self) -> Any:
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev


def _host_numpy(t: torch.Tensor) -> Any:
    # numpy has no bfloat16: hand bfloat16 to the store as float32 (it stores the declared dtype).
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _progress_bar(progress: bool, total: int | None) -> Any:
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="capture", dynamic_ncols=True)


def capture(
    model: nn.Module | Adapter,
    batches: Iterable[Any],
    archive_path: str | os.PathLike[str],
    *,
    layers: Sequence[int | str] | None = None,
    heads: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
    dtype: str = "float16",
    format: str | None = None,
    sample_ids: Mapping[str, Any] | Callable[[int, Any], Mapping[str, Any]] | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
    topk: int | None = None,
    tokenizer: Any = None,
    tags: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    validate: bool = True,
    queue_depth: int = 2,
    total: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    wait_s: float = 300.0,
) -> CaptureSummary:
    """Run ``model`` over ``batches`` and append every batch's attention to an archive.

    Parameters
    ----------
    model
        The reference ``Transformer``, an ``nn.MultiheadAttention``-based model, a Hugging
        Face model, or a custom :class:`~attnscope.capture.adapters.Adapter`.
    batches
        Any iterable (e.g. a ``DataLoader``). Reference model: ``(enc, dec)`` pairs of
        modality dicts; HF: dicts of model inputs; MHA models: tensors / arg tuples / kwarg dicts.
    archive_path
        ``*.zarr`` (default format) or ``*.h5``; ``format`` overrides the suffix.
    layers, heads, kinds
        Keep only these layer indices, head indices and kinds (``"self_attention"``,
        ``"cross_attention"`` or ``"decoder/self_attention"``). Selection happens on the
        device, before any copy.
    dtype
        Stored dtype: ``"float16"`` (default), ``"float32"`` or ``"bfloat16"``; cast on device.
    sample_ids
        Per-sample ids stored beside the attention: a dict of full-length arrays (sliced
        per batch) or ``f(batch_index, batch) -> {name: (B,) array}``.
    resume
        Continue an interrupted job: batches already committed are skipped (not re-run),
        a partly committed batch is re-run and only its new samples are appended.
    topk
        Sparse mode: keep the ``topk`` largest weights per query row (+ indices and the
        remaining mass) instead of dense ``(T, S)`` matrices.
    validate
        Check every captured matrix on the device, in full precision and before the
        cast: finite, non-negative, rows summing to 1 (within 1e-3). A bad batch raises
        :class:`~attnscope.errors.ValidationError` naming array and sample; batches
        committed before it stay in the archive.
    queue_depth
        Batches that may wait for the writer thread; bounds host memory.
    total
        Number of samples ``batches`` yields (progress bar; multi-process capacity).
    rank, world_size
        Multi-process capture into one Zarr archive: every process passes the same
        ``batches`` (equal-sized batches, ``len()`` known) and its own ``rank``; rank ``r``
        runs only its contiguous share of batches and writes that disjoint sample range.
        Rank 0 creates the archive; the others wait up to ``wait_s`` seconds for it.

    Returns
    -------
    CaptureSummary

    Examples
    --------
    >>> summary = capture(model, [(enc, dec)] * 4, "run.zarr", heads=[0, 3], progress=False)
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; expected one of {DTYPES}")
    if queue_depth < 1:
        raise ConfigError(f"queue_depth must be >= 1, got {queue_depth}")
    if topk is not None and topk < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    adapter = adapter_for(model, tokenizer)
    net = adapter.model
    dev = torch.device(device) if device is not None else _model_device(net)
    net.to(dev)
    wanted = _resolve_selection(adapter, layers, kinds)
    head_sel = None if heads is None else [int(h) for h in heads]
    copier = _HostCopier(dev)
    tdtype = _DTYPES[dtype]
    path = Path(archive_path)

    writer: ArchiveWriter | None = None
    skip = 0
    shard = _shard(batches, rank, world_size, sample_ids, total)
    if shard is None and resume and path.exists():
        writer = ArchiveWriter.open(path, mode="a")
        skip = writer.committed

    q: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
    failure: list[BaseException] = []
    written = {"bytes": 0, "samples": 0}

    def write_loop() -> None:
        while True:
            item = q.get()
            if item is None:
                return
            if failure:
                continue  # drain after an error so the producer never blocks
            arrays, ids, fence = item
            try:
                if fence is not None:
                    fence.synchronize()
                payload = {
                    n: (
                        {"values": _host_numpy(v[0]), "indices": v[1].numpy()}
                        if isinstance(v, tuple)
                        else _host_numpy(v)
                    )
                    for n, v in arrays.items()
                }
                assert writer is not None
                writer.append(payload, sample_ids=ids)
                written["bytes"] += sum(_nbytes(p) for p in payload.values())
                written["samples"] += _n_samples(next(iter(payload.values())))
            except BaseException as e:  # re-raised in the producer thread
                failure.append(e)

    thread: threading.Thread | None = None
    bar = _progress_bar(progress, total)
    t0 = time.perf_counter()
    n_batches = 0
    pos = 0
    head_index: torch.Tensor | None = None
    heads_checked: set[str] = set()
    try:
        for bi, batch in enumerate(batches):
            if failure:
                break
            if shard is not None and not shard.first_batch <= bi < shard.stop_batch:
                continue
            bsz = adapter.batch_size(batch)
            if shard is not None and bi == shard.first_batch:
                pos = bi * bsz  # equal-sized batches: this rank's first sample
            if pos + bsz <= skip:  # already committed by an earlier run
                pos += bsz
                continue
            drop = max(0, skip - pos)
            batch = adapter.to_device(batch, dev)
            captured: dict[str, Any] = {}
            shapes: dict[str, tuple[int, ...]] = {}
            checks: dict[str, torch.Tensor] = {}

            def sink(
                name: str,
                w: torch.Tensor,
                captured: dict[str, Any] = captured,
                shapes: dict[str, tuple[int, ...]] = shapes,
                checks: dict[str, torch.Tensor] = checks,
                drop: int = drop,
            ) -> None:
                nonlocal head_index
                shapes[name] = tuple(w.shape)
                if head_sel is not None:
                    if name not in heads_checked:  # arrays may differ in head count
                        _check_heads(head_sel, w.shape[1], name)
                        heads_checked.add(name)
                    if head_index is None or head_index.device != w.device:
                        head_index = torch.tensor(head_sel, device=w.device)
                    w = w.index_select(1, head_index)
                if drop:
                    w = w[drop:]
                if validate:
                    checks[name] = _device_checks(w)
                if topk is not None:
                    if topk > w.shape[-1]:
                        raise ConfigError(
                            f"topk={topk} is larger than the {w.shape[-1]} keys of {name}"
                        )
                    vals, idx = w.float().topk(topk, dim=-1, sorted=True)
                    itype = torch.int16 if w.shape[-1] < 2**15 else torch.int32
                    captured[name] = (copier(vals.to(tdtype)), copier(idx.to(itype)))
                else:
                    captured[name] = copier(w.to(tdtype))

            with torch.inference_mode():
                adapter.run(batch, sink, set(wanted))
            missing = [n for n in wanted if n not in captured]
            if missing:
                raise SelectionError(f"the model produced no weights for {missing}")
            if checks:
                _raise_on_bad_weights(checks, pos + drop)
            fence = copier.fence()
            if writer is None:
                create_kw = dict(
                    format=format,
                    dtype=dtype,
                    model_config=adapter.config(),
                    capture=_settings(wanted, head_sel, dtype, topk, dev, queue_depth),
                    heads=None if head_sel is None else {n: head_sel for n in wanted},
                    tags=dict(tags) if tags else None,
                    seed=torch.initial_seed() % 2**63,
                    sparse_topk=topk,
                    # Checked on the device before the cast (see sink); `normalized` tells
                    # `verify` that rows must sum to 1.
                    validate=False,
                    normalized=validate,
                    overwrite=overwrite,
                )
                layout = adapter.layout(batch, shapes)
                specs = _array_specs(shapes, head_sel)
                if archive_format(path, format) == "zarr":  # HDF5 keeps one sample per chunk
                    create_kw["chunk_samples"] = _chunk_samples(specs, dtype, bsz)
                if shard is None:
                    writer = ArchiveWriter.create(path, layout, **create_kw)
                else:
                    writer = shard.open_writer(path, layout, specs, bsz, create_kw, wait_s)
                    if writer.committed:  # this rank resumes after its own committed samples
                        skip = pos + writer.committed
                        drop = max(0, skip - pos)
                        if drop >= bsz:
                            pos += bsz
                            continue
                        captured = {
                            n: (v[0][drop:], v[1][drop:]) if isinstance(v, tuple) else v[drop:]
                            for n, v in captured.items()
                        }
            if thread is None:
                thread = threading.Thread(target=write_loop, name="attnscope-writer", daemon=True)
                thread.start()
            ids = _batch_ids(sample_ids, bi, batch, pos + drop, pos + bsz)
            q.put((captured, ids, fence))
            n_batches += 1
            pos += bsz
            if bar is not None:
                bar.update(bsz - drop)
                dt = time.perf_counter() - t0
                bar.set_postfix(MBps=f"{written['bytes'] / 1e6 / max(dt, 1e-9):.0f}")
    finally:
        adapter.close()
        if thread is not None:
            q.put(None)
            thread.join()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if failure:
        raise failure[0]
    if writer is None:
        raise ConfigError("no batch to capture: the batch source was empty")
    dt = time.perf_counter() - t0
    return CaptureSummary(
        archive=str(path),
        samples=written["samples"],
        committed=writer.committed,
        batches=n_batches,
        bytes=written["bytes"],
        seconds=dt,
        samples_per_s=written["samples"] / dt if dt else 0.0,
        mb_per_s=written["bytes"] / 1e6 / dt if dt else 0.0,
    )


def _nbytes(p: Any) -> int:
    if isinstance(p, dict):
        return sum(v.nbytes for v in p.values())
    return p.nbytes


def _n_samples(p: Any) -> int:
    return (p["values"] if isinstance(p, dict) else p).shape[0]


# |row sum - 1| allowed before the cast; the explicit softmax path in float32 is within 1e-6.
ROW_SUM_TOLERANCE = 1e-3


def _device_checks(w: torch.Tensor) -> torch.Tensor:
    """Per-sample flags ``(B, 3)``: non-finite, negative, row sum off by > tolerance.

    Computed on the weights' device in full precision; read back once per batch.
    """
    flat = w.flatten(1)
    return torch.stack(
        [
            ~torch.isfinite(flat).all(1),
            (flat < 0).any(1),
            ((w.sum(-1, dtype=torch.float32) - 1).abs() > ROW_SUM_TOLERANCE).flatten(1).any(1),
        ],
        dim=1,
    )


def _raise_on_bad_weights(checks: dict[str, torch.Tensor], first_sample: int) -> None:
    """One device->host sync per batch; on a problem, name the array, sample and issue."""
    names = list(checks)
    flags = torch.stack([checks[n] for n in names]).cpu()  # (arrays, B, 3)
    if not flags.any():
        return
    a, b, k = (int(i) for i in flags.nonzero()[0])
    problem = [
        "has NaN or Inf weights",
        "has negative weights",
        f"has rows that do not sum to 1 (tolerance {ROW_SUM_TOLERANCE})",
    ][k]
    raise ValidationError(
        f"{names[a]}: sample {first_sample + b} {problem}; nothing of this batch was written "
        "(pass validate=False to store such weights anyway, e.g. with attention dropout)"
    )


def _array_specs(
    shapes: dict[str, tuple[int, ...]], heads: list[int] | None
) -> dict[str, tuple[int, int, int]]:
    """Stored ``(H, T, S)`` of each array from the model's ``(B, H, T, S)`` weight shapes."""
    return {
        n: (len(heads) if heads is not None else int(shp[1]), int(shp[2]), int(shp[3]))
        for n, shp in shapes.items()
    }


def _chunk_samples(specs: dict[str, tuple[int, int, int]], dtype: str, bsz: int) -> int:
    """Samples per chunk: the store's choice, cut to divide the batch size.

    A chunk filled by one append is compressed once; one that straddles appends is
    re-read and re-compressed by each of them. Dividing the batch size also keeps
    multi-process ranks (which start at batch boundaries) on separate chunks.
    """
    itemsize = 4 if dtype == "float32" else 2
    return math.gcd(min(choose_chunks(*v, itemsize)[0] for v in specs.values()), bsz)


def _check_heads(heads: Sequence[int], n: int, name: str) -> None:
    bad = [h for h in heads if not 0 <= h < n]
    if bad:
        raise SelectionError(f"head(s) {bad} out of range for {name}: it has heads 0..{n - 1}")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _settings(
    wanted: list[str],
    heads: list[int] | None,
    dtype: str,
    topk: int | None,
    dev: torch.device,
    queue_depth: int,
) -> dict[str, Any]:
    return {
        "arrays": wanted,
        "heads": heads,
        "dtype": dtype,
        "mode": "dense" if topk is None else "sparse",
        "topk": topk,
        "device": str(dev),
        "queue_depth": queue_depth,
        "torch": torch.__version__,
    }


def _batch_ids(
    sample_ids: Any, bi: int, batch: Any, start: int, stop: int
) -> dict[str, np.ndarray] | None:
    if sample_ids is None:
        return None
    if callable(sample_ids):
        # ids of the whole batch; keep the tail that is written (resume may drop a head)
        return {k: np.asarray(v)[-(stop - start) :] for k, v in sample_ids(bi, batch).items()}
    return {k: np.asarray(v)[start:stop] for k, v in sample_ids.items()}


@dataclass
class _Shard:
    """One rank's contiguous share of the batches, and how it joins the shared archive."""

    rank: int
    n_batches: int  # batches of the whole job, over all ranks
    first_batch: int
    stop_batch: int
    total: int | None

    def open_writer(
        self,
        path: Path,
        layout: Any,
        specs: dict[str, tuple[int, int, int]],
        bsz: int,
        create_kw: dict[str, Any],
        wait_s: float,
    ) -> ArchiveWriter:
        from attnscope.store import open_archive

        capacity = self.total if self.total is not None else self.n_batches * bsz
        a = self.first_batch * bsz
        b = min(capacity, self.stop_batch * bsz)
        if self.rank == 0 and not path.exists():
            ArchiveWriter.create(path, layout, capacity=capacity, arrays=specs, **create_kw).close()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with open_archive(path) as arch:
                    if arch.arrays():
                        break
            except AttnscopeError:
                pass
            if time.monotonic() > deadline:
                raise CaptureError(
                    f"rank {self.rank}: archive {path} was not created by rank 0 within {wait_s} s"
                )
            time.sleep(0.2)
        return ArchiveWriter.open(path, sample_range=(a, b))


def _shard(
    batches: Any, rank: int | None, world_size: int | None, sample_ids: Any, total: int | None
) -> _Shard | None:
    if rank is None and world_size is None:
        return None
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank and world_size go together with 0 <= rank < world_size, got rank={rank}, "
            f"world_size={world_size}"
        )
    try:
        n = len(batches)
    except TypeError:
        raise ConfigError(
            "multi-process capture needs batches with a len() (e.g. a list or DataLoader), "
            f"got {type(batches).__name__}"
        ) from None
    if sample_ids is not None:
        raise ConfigError("sample_ids are not supported in multi-process capture yet")
    return _Shard(rank, n, rank * n // world_size, (rank + 1) * n // world_size, total)
