"""Capture jobs: run inference batch after batch and stream attention into an archive.

The pipeline has three stages that overlap:

1. the model runs batch ``k+1`` under :func:`torch.inference_mode`; the
   :class:`~attnscope.capture.recorder.Recorder` hooked into it selects the wanted
   layers/heads, validates and casts to the stored dtype *on the device*;
2. the selected weights are copied to the host (pinned buffers, asynchronously on CUDA);
3. a :class:`~attnscope.capture.writer.WriterThread` appends batch ``k`` (or streams a
   long context's blocks of rows) to the archive behind a bounded queue, so memory stays
   bounded by ``queue_depth`` batches (or blocks) of selected weights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from attnscope.capture.adapters import Adapter, adapter_for, resolve_selection
from attnscope.capture.dryrun import DryRunReport, planned_samples, report, stored_per_sample
from attnscope.capture.identity import CaptureIdentity, check_codec, param_hash
from attnscope.capture.options import (
    CaptureOptions,
    CaptureSummary,
    batch_ids,
    check_format,
    model_device,
    progress_bar,
    resolve_device,
)
from attnscope.capture.provenance import input_digest, input_hash_ids, run_provenance
from attnscope.capture.ragged import BeforeRun, Lengths, side_lengths
from attnscope.capture.recorder import Recorder, trim
from attnscope.capture.resume import ResumeCheck
from attnscope.capture.shard import shard_for
from attnscope.capture.writer import WriterThread, storage_error, to_host
from attnscope.contracts import DEFAULT_COMPRESSOR
from attnscope.errors import AttnscopeError, CaptureError, ConfigError
from attnscope.store import (
    ArchiveSpec,
    ArchiveWriter,
    TokenLayout,
    holds_no_data,
    open_archive,
    refuse_existing,
)
from attnscope.store.backends.location import Location, locate
from attnscope.store.footprint import check_writable, measure_footprint
from attnscope.store.meta import INPUT_HASH_KEYS, archive_format

__all__ = ["capture", "CaptureSummary", "CaptureOptions", "DryRunReport"]


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
    generate: Mapping[str, Any] | None = None,
    max_length: int | Mapping[str, int] | None = None,
    dry_run: bool = False,
    query_block: int | None = None,
    rows: Any = None,
    compressor: str | None = None,
    level: int | None = None,
    workers: int | None = None,
    inflight_mb: float | None = None,
) -> CaptureSummary | DryRunReport:
    """Run ``model`` over ``batches`` and append every batch's attention to an archive.

    Parameters
    ----------
    model
        The reference ``Transformer``, an ``nn.MultiheadAttention``-based model, a Hugging
        Face model (layer by layer: see ``docs/capture.md``), a TransformerLens
        ``TransformerBridge`` / ``HookedTransformer`` (each layer's ``hook_pattern``), or a
        custom :class:`~attnscope.capture.adapters.Adapter`. A ``torch.compile``d model is
        captured through the module it wraps.
    batches
        Any iterable (e.g. a ``DataLoader``). Reference model: ``(enc, dec)`` pairs of
        modality dicts; HF: dicts of model inputs (each batch may have its own length, e.g.
        ``padding="longest"``); TransformerLens: ``(B, T)`` token ids or dicts with
        ``input_ids`` and ``attention_mask``; MHA models: tensors / arg tuples / kwarg dicts.
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
    tokenizer
        Hugging Face tokenizer: every sample's token strings and ids are stored
        (``AttentionArchive.tokens(side, i)``).
    topk
        Sparse mode: keep the ``topk`` largest weights per query row (+ indices and the
        remaining mass) instead of dense ``(T, S)`` matrices.
    validate
        Check every captured matrix on the device, in full precision and before the
        cast: finite, non-negative, rows summing to 1 (within 1e-3; bfloat16 models
        2**-7, their rounding: ``recorder.row_sum_tolerance``). A bad batch raises
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
    generate
        Hugging Face decoder-only and encoder-decoder models: options for
        ``model.generate`` (``max_new_tokens`` required; e.g. ``do_sample``,
        ``temperature``, ``top_k``). Each batch holds prompts (``input_ids`` and
        ``attention_mask``); per sample the archive stores one matrix over the final
        sequence, prompt rows and every generated token's row, computed with the KV cache
        (encoder-decoders: also the cross-attention rows). Sampling draws from torch's
        global generator: seed it with ``torch.manual_seed`` for a repeatable run.
        The generated ids (and, with a ``tokenizer``, token strings) are stored per sample.
    max_length
        Maximum tokens per sample of a ragged archive (schema 2): one int for every side
        or ``{"encoder": 128, "decoder": 64}``. Batches may be shorter; the archive keeps
        each sample's padding mask. Without it, an archive is ragged when the first batch
        carries a padding mask (HF ``attention_mask``, generation) or ``batches`` is a
        list/tuple of batches of different lengths; its maximum is then the longest batch
        of the list, else (a generator, a DataLoader) the most the model takes: the smaller
        of the tokenizer's ``model_max_length`` and the config's maximum positions
        (``capture.ragged.model_max_length``), or the first batch's length when the model
        has neither. Not for the reference Transformer or ``nn.MultiheadAttention`` stacks
        (fixed token layouts).
    dry_run
        Run the first batch only (real model, selection, cast, top-k) and return a
        :class:`~attnscope.capture.dryrun.DryRunReport`: bytes per array per sample, the
        job's total before and after compression (the batch encoded with the archive's
        chunking and compressor in a removed temporary directory), chunks and files, and
        a warning when the destination lacks the space. The job's size comes from
        ``len(batches)`` or ``total``; without either the figures are per batch. Nothing
        is created at ``archive_path``; a destination this user cannot write to raises
        :class:`~attnscope.errors.ConfigError`.
    rows
        Row policy (:class:`~attnscope.capture.policy.RowPolicy`): keep some query rows
        per side, e.g. ``"decoder:last=4"``, ``"decoder:segment=traj"``, ``{"decoder":
        [3, 4]}``; those arrays store ``(N, H, R, S)`` and their rows
        (``AttentionArchive.query_rows``). Selected on the device after the heads.
    compressor, level
        Chunk codec of a new archive and its level (default zstd -3; ``docs/benchmarks.md``,
        "Codec choice"); a resumed archive keeps its own and refuses another.
    workers, inflight_mb
        Threads that encode and write chunks (default one per core) and the bound on
        batch data queued for them (default 512 MiB): ``store/pipeline.py``.

    Returns
    -------
    CaptureSummary or DryRunReport
        ``bytes`` and ``mb_per_s`` count the attention in the stored dtype; with
        ``generate``, ``generated`` lists each written sample's ids and text. With
        ``dry_run``, the report (``report.format()`` is its text).
    query_block
        Long contexts: rows per block of the query-block recompute. A selected layer
        whose weights ``(B, H, T, S)`` exceed one block runs its output through the
        fused SDPA path; its weights are recomputed from Q and K ``query_block`` rows at a
        time (the model's own mask and scale) and written block by block, so peak extra
        memory is one block of one layer. ``None``: blocks of about 64 MiB of float32
        scores (see ``docs/capture.md``). Fixed-length batches, forward pass (not
        ``generate``), single process; elsewhere whole layers are captured.

    Raises
    ------
    ConfigError
        A bad option (unknown dtype, repeated head, unusable ``device``); on ``resume``, an
        option that would change what the archive means (layers, kinds, heads, dtype,
        ``topk``, ``max_length``, token layout, model config, model weights), naming both
        values.
    ShapeError
        A batch longer than the archive's maximum, or of another length than a
        fixed-length archive's; the batches before it stay committed.
    CaptureError
        The model's forward failed (the model's exception is ``__cause__``), or a write
        failed (e.g. disk full): the samples committed before stay readable and resumable.
    ValidationError
        A captured matrix is not a softmax (with ``validate=True``).

    Examples
    --------
    >>> summary = capture(model, [(enc, dec)] * 4, "run.zarr", heads=[0, 3], progress=False)
    >>> batches = [dict(tok(s, padding="longest", return_tensors="pt")) for s in sentences]
    >>> capture(bert, batches, "text.zarr", tokenizer=tok, max_length=128, progress=False)
    """
    opts = CaptureOptions(
        layers=layers, heads=heads, kinds=kinds, dtype=dtype, format=format,
        sample_ids=sample_ids, device=device, resume=resume, progress=progress, topk=topk,
        tokenizer=tokenizer, tags=tags, overwrite=overwrite, validate=validate,
        queue_depth=queue_depth, total=total, rank=rank, world_size=world_size, wait_s=wait_s,
        generate=generate, max_length=max_length, dry_run=dry_run, query_block=query_block,
        rows=rows, compressor=compressor, level=level, workers=workers, inflight_mb=inflight_mb,
    )  # fmt: skip
    return _Job(model, batches, locate(archive_path), opts).run()


class _Job:
    """One call of :func:`capture`: the loop over batches and the archive it feeds."""

    def __init__(
        self, model: nn.Module | Adapter, batches: Iterable[Any], path: Location,
        opts: CaptureOptions,
    ) -> None:
        self.opts = opts
        self.path = path
        self.batches = batches
        self.shard = shard_for(batches, opts)
        check_format(opts, path)  # before anything exists: rank 0 creates the archive first
        dev = None if opts.device is None else resolve_device(opts.device)
        self.adapter = adapter_for(model, opts.tokenizer)
        try:
            net = self.adapter.model
            self.device = dev if dev is not None else model_device(net)
            net.to(self.device)
            self.wanted = resolve_selection(self.adapter, opts.layers, opts.kinds)
            self.generate = (
                None if opts.generate is None else self.adapter.prepare_generation(opts.generate)
            )
            self.lengths = Lengths(self.adapter, batches, opts.max_length)
            digest, n_params = param_hash(net)
            self.provenance = run_provenance(
                net, self.adapter.attention_impl(self.wanted), device=self.device, dtype=opts.dtype
            )
        except BaseException:
            self.adapter.close()
            raise
        self.identity = CaptureIdentity(
            arrays=tuple(self.wanted),
            heads=opts.heads,
            dtype=opts.dtype,
            topk=opts.topk,
            model_config=self.adapter.config(),
            param_hash=digest,
            n_params=n_params,
            generate=self.generate,
            max_length=opts.max_length,  # type: ignore[arg-type]
            rows=None if opts.rows is None else opts.rows.to_json(),
        )
        self.recorder = Recorder(
            heads=opts.heads, dtype=opts.dtype, topk=opts.topk, validate=opts.validate,
            device=self.device, defer_rows=opts.rows is not None,
        )  # fmt: skip
        self.recorder.query_block, self.recorder.n_arrays = opts.query_block, len(self.wanted)
        self.writer: WriterThread | None = None
        self.streaming: tuple[int, Any, int] | None = None  # (samples, batch, drop) streamed
        self.before: BeforeRun | None = None  # see Lengths.before_run
        self.fresh = False  # resumed an archive that has nothing committed
        self.resumed: dict[str, Any] | None = None  # archive metadata whose layout is unchecked
        self.skip = 0  # samples committed before this run (skipped, not re-run)
        self.pos = 0  # index of the next batch's first sample
        self.n_batches = 0
        # per-batch input hashes go with each batch as sample ids; on resume, batches are
        # compared with the committed samples' before anything is skipped or written
        self.resume = ResumeCheck(who="" if self.shard is None else f"rank {self.shard.rank}: ")
        self.generated: list[dict[str, Any]] | None = None if self.generate is None else []
        self.bar = progress_bar(opts.progress, opts.total)
        self.t0 = time.perf_counter()

    def run(self) -> CaptureSummary | DryRunReport:
        if self.opts.dry_run:
            return self._dry_run()
        try:
            if self.shard is None and not (self.opts.resume or self.opts.overwrite):
                refuse_existing(self.path, format=self.opts.format)
            if self.shard is None and self.opts.resume and self.path.exists():
                if not holds_no_data(self.path):  # a lock-only folder is an empty archive
                    self._reopen()
            for bi, batch in enumerate(self.batches):
                if self.writer is not None:
                    self.writer.raise_if_failed()
                self._step(bi, batch)
        except BaseException:
            self._close(quiet=True)  # the error that stopped the job is the one to report
            raise
        self._close()
        if self.writer is None:
            raise ConfigError("no batch to capture: the batch source was empty")
        w, dt = self.writer, time.perf_counter() - self.t0
        return CaptureSummary(
            archive=str(self.path),
            samples=w.samples,
            committed=w.writer.committed,
            batches=self.n_batches,
            bytes=w.bytes,
            seconds=dt,
            samples_per_s=w.samples / dt if dt else 0.0,
            mb_per_s=w.bytes / 1e6 / dt if dt else 0.0,
            generated=self.generated,
        )

    def _step(self, bi: int, batch: Any) -> None:
        """Run, check and queue one batch, skipping the samples already committed."""
        if self.shard is not None and not self.shard.owns(bi):
            return
        bsz = self.adapter.batch_size(batch)
        if self.shard is not None and bi == self.shard.first_batch:
            self.pos = bi * bsz  # equal-sized batches: this rank's first sample
        if self.pos < self.skip:  # (a rank learns its skip when it opens its range)
            self.resume.check(bi, bsz, self.pos, batch)
        if self.pos + bsz <= self.skip:  # committed by an earlier run
            self.pos += bsz
            return
        drop = max(0, self.skip - self.pos)
        digest = input_digest(batch) if self.resume.hash_inputs else None
        batch = self.adapter.to_device(batch, self.device)
        self.recorder.begin(drop)
        first = self.writer is None  # the archive is made by this batch (or its first block)
        self.before = self.lengths.before_run(batch, self.wanted) if self._stream_ok() else None
        if self.before is not None:  # refuse a batch that does not fit before any block
            if self.recorder.pending is not None:
                self._resolve_rows(self.before.layout)
            if not first and not self.fresh:
                b, ragged = self.before, self.lengths.ragged
                if self.resumed is not None:
                    lay = self.lengths.layout(b.lengths) if ragged else b.layout
                    CaptureIdentity.check_layout(self.resumed, lay)
                    self.resumed = None
                # only a fixed-layout family's check reads the layout (a tokenizer's pass)
                self.lengths.check(bi, b.lengths, None if self.adapter.ragged_ok else b.layout)
        self.streaming = (bsz - drop, batch, drop) if self._can_stream(batch) else None
        self.stream_masks: dict[str, np.ndarray] | None = None  # a ragged batch's, streamed
        self.recorder.stream = self._on_block if self.streaming else None
        self._forward(bi, batch)
        lengths = side_lengths(self.recorder.shapes)
        streamed = bool(self.recorder.streamed)
        if first and self.shard is not None and self.shard.rank > 0 and self.adapter.ragged_ok:
            self.lengths.join(self.shard.created_meta(self.path), self.shard.rank)  # its maxima
        layout = self.lengths.decide(batch, lengths, self._layout(batch)) if first else (
            self.lengths.layout(lengths) if self.lengths.ragged else self._layout(batch)
        )
        self._resolve_rows(layout)
        captured, fence = self.recorder.finish(self.wanted, self.pos + drop)
        if first:
            self.lengths.check(bi, lengths, layout)
        if first and self.writer is None:  # (else made at the batch's first block)
            self.writer = WriterThread(self._create(bsz, layout), self.opts.queue_depth)
            if self.shard is not None and self.writer.writer.committed:
                # this rank resumes after its own committed samples, which must come from
                # this run's inputs (as a single-process resume checks)
                self.skip = self.pos + self.writer.writer.committed
                self.resume.adopt(self.writer.writer.committed_ids(INPUT_HASH_KEYS), self.pos)
                self.resume.check(bi, bsz, self.pos, None, digest)
                drop = min(bsz, self.skip - self.pos)
                captured = trim(captured, drop)
        elif not first:
            if self.resumed is not None:
                CaptureIdentity.check_layout(self.resumed, layout)
                self.resumed = None
            self.lengths.check(bi, lengths, layout)
        if drop < bsz:
            masks, tokens = self.lengths.side_data(batch, drop, lengths)
            if self.generated is not None:
                self.generated.extend(self.adapter.generated()[drop:])
            ids = batch_ids(self.opts.sample_ids, bi, batch, self.pos + drop, self.pos + bsz)
            if digest is not None:
                ids = {**(ids or {}), **input_hash_ids(digest, bsz - drop)}
            # the archive's first batch: its full layout (the archive may have been made at
            # the first block, or by a run that committed nothing, before every layer ran)
            full = layout if first or self.fresh else None
            if streamed:
                self.writer.commit_stream(bsz - drop, captured, ids, fence, tokens=tokens,
                                          layout=full)  # fmt: skip
            else:
                self.writer.put(captured, ids, fence, masks=masks, tokens=tokens, layout=full)
            self.fresh = False
            self.n_batches += 1
        self.pos += bsz
        if self.bar is not None:
            self.bar.update(bsz - drop)
            dt = time.perf_counter() - self.t0
            self.bar.set_postfix(MBps=f"{self.writer.bytes / 1e6 / max(dt, 1e-9):.0f}")

    def _can_stream(self, batch: Any) -> bool:
        """Whether this batch's big layers may go to the archive in blocks of rows: a row
        policy is resolved (blocks keep its rows as they come), and a ragged batch's
        lengths are known before it runs (its blocks are padded as they come)."""
        if self.recorder.pending is not None or not self._stream_ok():
            return False
        return self.before is not None or not self._ragged(batch)

    def _stream_ok(self) -> bool:
        return self.generate is None and self.shard is None

    def _ragged(self, batch: Any) -> bool:
        """Whether the batch goes to a ragged archive (see capture/ragged.py)."""
        if self.lengths.ragged or self.writer is not None:
            return self.lengths.ragged
        return self.adapter.ragged_ok and bool(
            self.lengths.option is not None or self.lengths.differ or self.adapter.masks(batch)
        )

    def _on_block(self, name: str, r0: int, data: Any, fence: Any, t: int) -> None:
        """Recorder's stream consumer: one block of rows, on its way to the archive."""
        assert self.streaming is not None
        bsz, batch, drop = self.streaming
        if self.writer is None:  # first batch: the archive from what the inputs tell, else
            # from the layers run so far (completed at the commit: store.stream.relayout)
            b = self.before
            lengths = b.lengths if b else side_lengths(self.recorder.shapes)
            layout = self.lengths.decide(batch, lengths, b.layout if b else self._layout(batch))
            self.writer = WriterThread(self._create(bsz, layout), self.opts.queue_depth)
        if self.lengths.ragged and self.stream_masks is None:
            assert self.before is not None
            lengths = self.before.lengths
            self.stream_masks = self.lengths.block_masks(batch, lengths, bsz + drop, drop)
        self.writer.put_block(bsz, name, r0, data, fence, t, self.stream_masks)

    def _forward(self, bi: int, batch: Any) -> None:
        try:
            with torch.inference_mode():
                self.adapter.run(batch, self.recorder, set(self.wanted))
        except AttnscopeError:
            raise
        except Exception as e:
            raise CaptureError(
                f"model forward failed on batch {bi}: {type(e).__name__}: {e}"
            ) from e

    def _layout(self, batch: Any) -> TokenLayout:
        return self.adapter.layout(batch, self.recorder.shapes)

    def _resolve_rows(self, layout: TokenLayout) -> None:
        """Resolve the row policy on the first batch's layout (the archive's axes)."""
        if self.opts.rows is None or self.recorder.pending is None:
            return
        self.recorder.set_rows(self.opts.rows.resolve(layout))
        if self.resumed is not None:
            CaptureIdentity.check_rows(self.resumed, self.recorder.rows, self.opts.rows)

    def _reopen(self) -> None:
        """Resume: check the archive means what this run would write, then append to it."""
        with open_archive(self.path) as arch:
            check_format(self.opts, self.path, arch.format)
            meta = arch.metadata
            fields, n = arch.token_fields(), arch.n_samples
            self.resume.read(meta, arch.sample_ids if n else {}, n)
        self.identity.check(meta)
        check_codec(meta, self.opts.compressor, self.opts.level)
        self.lengths.adopt(meta, fields, n)
        self.resumed = meta if n else None
        if not n:  # nothing committed: its layout may be partial (killed at a first block)
            self.fresh, self.lengths.fixed = True, None
        writer = ArchiveWriter.open(self.path, mode="a", workers=self.opts.workers,
                                    inflight_mb=self.opts.inflight_mb)
        self.writer = WriterThread(writer, self.opts.queue_depth)
        self.skip = writer.committed

    def _dry_run(self) -> DryRunReport:
        """Run the first batch and measure what the job would write; write nothing."""
        try:
            where = check_writable(self.path)
            if not self.opts.overwrite:
                refuse_existing(self.path, format=self.opts.format)
            batch = next(iter(self.batches), None)
            if batch is None:
                raise ConfigError("no batch to capture: the batch source was empty")
            bsz = self.adapter.batch_size(batch)
            digest = input_digest(batch)
            batch = self.adapter.to_device(batch, self.device)
            self.recorder.begin(0)
            self._forward(0, batch)
            lengths = side_lengths(self.recorder.shapes)
            layout = self.lengths.decide(batch, lengths, self._layout(batch))
            self._resolve_rows(layout)
            captured, fence = self.recorder.finish(self.wanted, 0)
            self.lengths.check(0, lengths, layout)
            masks, tokens = self.lengths.side_data(batch, 0, lengths)
            ids = {**(batch_ids(self.opts.sample_ids, 0, batch, 0, bsz) or {})}
            ids.update(input_hash_ids(digest, bsz))
            if fence is not None:
                fence.synchronize()
            spec = self._spec(bsz)
            fp = measure_footprint(
                self.path, layout, spec, to_host(captured), sample_ids=ids, masks=masks,
                tokens=tokens,
            )  # fmt: skip
        finally:
            self._close(quiet=True)
        per_sample = stored_per_sample(spec, captured, bsz)
        samples = planned_samples(self.batches, bsz, self.opts.total)
        fmt = archive_format(self.path, self.opts.format)
        return report(str(self.path), fmt, self.opts.dtype, bsz, per_sample, samples, fp, where)

    def _spec(self, bsz: int) -> ArchiveSpec:
        """The typed options of the archive, from the first batch's shapes."""
        o = self.opts
        capture = self.identity.settings(self.device, o.queue_depth)
        capture["provenance"] = self.provenance
        capture["query_block"] = o.query_block  # rows per block; None: automatic
        return ArchiveSpec(
            format=o.format,
            dtype=o.dtype,
            compressor=o.compressor or DEFAULT_COMPRESSOR,
            level=o.level,
            model_config=self.identity.model_config,
            capture=capture,
            heads=None if o.heads is None else {n: list(o.heads) for n in self.wanted},
            tags=dict(o.tags) if o.tags else None,
            seed=torch.initial_seed() % 2**63,
            sparse_topk=o.topk,
            # Checked on the device before the cast (see Recorder); `normalized` tells
            # `verify` that rows must sum to 1.
            validate=False,
            normalized=o.validate,
            arrays=self.recorder.kept_shapes(
                self.lengths.array_shapes(self.recorder.array_shapes())
            ),
            batch_size=bsz,  # Zarr chunks then divide the batch: each append fills whole chunks
            query_block=o.query_block,  # and row-blocked chunks divide the query block
            max_lengths=self.lengths.max_lengths,  # None: fixed-length (schema 1)
            query_rows=(
                None if not self.recorder.rows
                else {k: v.tolist() for k, v in self.recorder.rows.items()}
            ),
        )

    def _create(self, bsz: int, layout: TokenLayout) -> ArchiveWriter:
        """The archive writer, created from the first batch's layout and shapes."""
        o, spec = self.opts, self._spec(bsz)
        try:
            if self.shard is None:
                return ArchiveWriter.create(self.path, layout, spec, overwrite=o.overwrite,
                                            workers=o.workers, inflight_mb=o.inflight_mb)

            return self.shard.open_writer(self.path, layout, spec, self.identity)
        except AttnscopeError:
            raise
        except OSError as e:
            raise storage_error(e, self.path, 0) from e

    def _close(self, quiet: bool = False) -> None:
        """Stop the writer thread, close the archive and the adapter.

        ``quiet``: another error is on its way out and stays the one reported. Otherwise
        the writer thread's error comes first (a disk-full append also fails the final
        flush; the append is the one to report), then any error of closing.
        """
        steps: list[Callable[[], None]] = [self.adapter.close]
        if self.writer is not None:
            steps += [self.writer.close, self.writer.writer.close]
        if self.bar is not None:
            steps.append(self.bar.close)
        errors: list[Exception] = []
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - every step runs; the first error is raised
                errors.append(e)
        if quiet:
            return
        if self.writer is not None:
            self.writer.raise_if_failed()
        if errors:
            e = errors[0]
            if isinstance(e, OSError) and not isinstance(e, AttnscopeError):
                committed = self.writer.writer.committed if self.writer is not None else 0
                raise storage_error(e, self.path, committed) from e
            raise e
