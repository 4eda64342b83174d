"""Benchmark the archive store: write/read MB/s and compression ratio per format and codec.

Compares against raw ``np.save`` / ``np.load`` of the same bytes in the same run, on
softmax-like float16 attention (a mix of soft, sharp and causal heads).

    python scripts/bench_store.py            # ~1-2 minutes on 2 cores
    python scripts/bench_store.py --quick    # smaller, for a smoke test

The append table times ``ArchiveWriter.append`` itself with several arrays per batch (the guide
model: 9 arrays of 8x29x29 float16, batches of 32), wall and CPU ms per append.

The checksum table measures what per-chunk checksums cost (Zarr: crc32c codec; HDF5:
Fletcher32 filter): the same write and full read with them on (the default) and off.

    python scripts/bench_store.py --checksums-only   # just that table (~1 minute)

The padding table measures what padded cells of a ragged archive (``max_lengths``) cost on
disk: the same kind of attention written once at full length (every cell real) and once
with per-sample lengths drawn from [L/4, L] (the writer pads and zeroes the rest).

    python scripts/bench_store.py --padding-only     # just that table (~30 s)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive


def attention(rng: np.random.Generator, n: int, h: int, t: int) -> np.ndarray:
    """(n, h, t, t) float16 softmax rows: heads 0-1 causal, 2-3 sharp, rest soft."""
    x = rng.standard_normal((n, h, t, t), dtype=np.float32)
    x[:, 2:4] *= 8.0  # sharp heads
    x[:, 0:2] = np.where(np.tril(np.ones((t, t), bool)), x[:, 0:2], -np.inf)
    x -= x.max(-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(-1, keepdims=True)
    return x.astype(np.float16)


def disk_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def bench_case(
    tmp: str, data: np.ndarray, fmt: str, comp: str, batch: int, *,
    workers: int | None = None, submit: bool = True, level: int | None = None,
) -> dict:  # fmt: skip
    """Write ``data`` in batches (``submit``: through the write pipeline, as capture does;
    else one synchronous ``append`` at a time), then read it back."""
    n, h, t, s = data.shape
    mb = data.nbytes / 2**20
    path = os.path.join(tmp, f"b.{'h5' if fmt == 'hdf5' else 'zarr'}")
    lay = TokenLayout(encoder=SideLayout.from_lengths({"tok": t}))
    name = "encoder/0/self_attention"
    t0 = time.perf_counter()
    with ArchiveWriter.create(path, lay, compressor=comp, validate=False, overwrite=True,
                              workers=workers, level=level) as w:  # fmt: skip
        put = w.submit if submit else w.append
        for a in range(0, n, batch):
            put({name: data[a : a + batch]})
    t_write = time.perf_counter() - t0
    size = disk_size(path)
    with open_archive(path) as arc:
        arr = arc[name]
        t0 = time.perf_counter()
        for _sl, _blk in arr.iter_blocks(max_bytes=64 * 2**20):
            pass
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        k = min(n, 50)
        for i in range(k):
            arr[i, i % h]
        t_head = (time.perf_counter() - t0) / k
        chunks = arr.chunks
    (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
    return {
        "case": f"{fmt} / {comp}",
        "write": mb / t_write,
        "read": mb / t_read,
        "ratio": data.nbytes / size,
        "head_ms": t_head * 1e3,
        "chunks": "x".join(map(str, chunks)),
    }


def bench_npy(tmp: str, data: np.ndarray) -> dict:
    path = os.path.join(tmp, "raw.npy")
    mb = data.nbytes / 2**20
    t0 = time.perf_counter()
    np.save(path, data)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.load(path)
    t_read = time.perf_counter() - t0
    os.remove(path)
    return {
        "case": "np.save / np.load",
        "write": mb / t_write,
        "read": mb / t_read,
        "ratio": 1.0,
        "head_ms": float("nan"),
        "chunks": "-",
    }


def npsave_fsync(tmp: str, data: np.ndarray) -> tuple[float, float]:
    """(write, read) MB/s of ``np.save`` + fsync and ``np.load`` of the same bytes: the limit."""
    path = os.path.join(tmp, "limit.npy")
    mb = data.nbytes / 2**20
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        np.save(fh, data)
        fh.flush()
        os.fsync(fh.fileno())
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.load(path)
    t_read = time.perf_counter() - t0
    os.remove(path)
    return mb / t_write, mb / t_read


def bench_pipeline(tmp: str, configs: list, rounds: int) -> list[str]:
    """Rows: store-only write MB/s (a producer with no model submitting float16 softmax
    batches as fast as it can) per encoder-pool size, next to np.save+fsync of the same
    bytes in the same round, and the old path (one synchronous append at a time, zstd 1)."""
    rows = []
    rng = np.random.default_rng(2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    variants = [("append, zstd 1 (before)", dict(submit=False, workers=None, level=1)),
                ("append, zstd -3", dict(submit=False, workers=None, level=None))]
    variants += [(f"submit, zstd -3, {k} worker{'s' if k > 1 else ''}",
                  dict(submit=True, workers=k, level=None))
                 for k in sorted({1, 2, cores or 1})]  # fmt: skip
    for label, n, h, t, batch in configs:
        data = attention(rng, n, h, t)
        for fmt in ("zarr", "hdf5"):
            for vname, kw in variants:
                if fmt == "hdf5" and kw["workers"] not in (None, 1):
                    continue  # HDF5 encodes in its own single-threaded filter pipeline
                ours, ratio, lim = [], [], []
                for _ in range(rounds):
                    lw, _lr = npsave_fsync(tmp, data)
                    r = bench_case(tmp, data, fmt, "zstd", batch, **kw)
                    ours.append(r["write"])
                    lim.append(lw)
                    ratio.append(r["write"] / lw)
                rows.append(
                    f"| {label} | {fmt} | {vname} | {np.median(ours):.0f} | {np.median(lim):.0f} "
                    f"| {np.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) |"
                )
    return rows


def bench_digests(configs: list) -> list[str]:
    """Rows: what the commit log's region digests cost (XXH3 over every written value)."""
    from attnscope.store.commitlog import regions_of

    class Handle:
        def __init__(self, shape: tuple, chunks: tuple, dtype: np.dtype) -> None:
            self.name, self.chunks, self.dtype = "a", chunks, dtype

    from attnscope.store.backends.base import choose_chunks

    rows = []
    rng = np.random.default_rng(3)
    for label, n, h, t, batch in configs:
        data = attention(rng, min(n, 4 * batch), h, t)
        chunks = choose_chunks(h, t, t, 2, batch_size=batch)
        hd = Handle(data.shape, chunks, data.dtype)
        sel = tuple(slice(0, d) for d in data.shape)
        t0 = time.perf_counter()
        reps = 0
        while time.perf_counter() - t0 < 1.0:
            regions = regions_of([(hd, sel, data)])
            reps += 1
        dt = (time.perf_counter() - t0) / reps
        gbs = data.nbytes / 2**30 / dt
        rows.append(f"| {label} | {len(regions)} regions / {data.nbytes / 2**20:.1f} MiB | "
                    f"{gbs:.1f} GB/s | {1 / gbs:.2f} s per GB |")  # fmt: skip
    return rows


def bench_limits(tmp: str, configs: list, rounds: int) -> list[str]:
    """Rows: default-codec (zstd) write/read MB/s of each format vs np.save+fsync / np.load,
    interleaved per round; ratios are per round (same load), median and range shown."""
    rows = []
    rng = np.random.default_rng(1)
    for label, n, h, t, batch in configs:
        data = attention(rng, n, h, t)
        got: dict[str, list[tuple[float, float, float, float]]] = {"zarr": [], "hdf5": []}
        for _ in range(rounds):
            for fmt in got:
                lw, lr = npsave_fsync(tmp, data)
                r = bench_case(tmp, data, fmt, "zstd", batch)
                got[fmt].append((r["write"], lw, r["read"], lr))
        for fmt, runs in got.items():
            cells = []
            for i in (0, 2):
                ours = [x[i] for x in runs]
                ratio = [x[i] / x[i + 1] for x in runs]
                lim = [x[i + 1] for x in runs]
                cells.append(
                    f"{np.median(ours):.0f} | {np.median(lim):.0f} | {np.median(ratio):.2f}x "
                    f"({min(ratio):.2f}-{max(ratio):.2f})"
                )
            rows.append(f"| {label} | {fmt} / zstd | {' | '.join(cells)} |")
    return rows


def bench_append(
    tmp: str, rng: np.random.Generator, fmt: str, comp: str, *, validate: bool, appends: int
) -> tuple[float, float]:
    """Median (wall ms, CPU ms) of one append of 9 arrays of (32, 8, 29, 29) float16."""
    arrays, b, h, t = 9, 32, 8, 29
    batch = {f"encoder/{i}/self_attention": attention(rng, b, h, t) for i in range(arrays)}
    path = os.path.join(tmp, f"a.{'h5' if fmt == 'hdf5' else 'zarr'}")
    lay = TokenLayout(encoder=SideLayout.from_lengths({"tok": t}))
    wall, cpu = [], []
    with ArchiveWriter.create(
        path, lay, compressor=comp, validate=validate, overwrite=True, dtype="float16"
    ) as w:
        w.append(batch)  # creates the arrays: not timed
        for _ in range(appends):
            t0, c0 = time.perf_counter(), time.process_time()
            w.append(batch)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
    return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3


@contextlib.contextmanager
def checksums(on: bool) -> Iterator[None]:
    """New arrays with (the default) or without per-chunk checksums (benchmark only)."""
    from attnscope.store.backends import hdf5_store as _hdf5
    from attnscope.store.backends import zarr_store as _zarr

    if on:
        yield
        return
    zarr_codecs, h5_filters = _zarr._codecs, _hdf5._filters
    _zarr._codecs = lambda *a: zarr_codecs(*a)[:-1]  # drop Crc32cCodec
    _hdf5._filters = lambda *a, **k: {**h5_filters(*a, **k), "fletcher32": False}
    try:
        yield
    finally:
        _zarr._codecs, _hdf5._filters = zarr_codecs, h5_filters


def bench_checksums(tmp: str, data: np.ndarray, batch: int, repeats: int) -> list[str]:
    """Table rows: median write/read MB/s without and with checksums, and the median of
    the per-pair ratios (off and on run back to back, so load drift hits both alike)."""
    rows = []
    for fmt in ("zarr", "hdf5"):
        for comp in ("zstd", "none"):
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(repeats):
                for on in (False, True):
                    with checksums(on):
                        runs[on].append(bench_case(tmp, data, fmt, comp, batch))
            cells = []
            for key in ("write", "read"):
                off = [r[key] for r in runs[False]]
                on_ = [r[key] for r in runs[True]]
                ratio = float(np.median([b / a for a, b in zip(off, on_)]))
                cells.append(
                    f"{np.median(off):.0f} | {np.median(on_):.0f} | {100 * (ratio - 1):+.0f} %"
                )
            rows.append(f"| {fmt} / {comp} | {' | '.join(cells)} |")
    return rows


def bench_padding(tmp: str, rng: np.random.Generator, n: int, h: int, t: int) -> list[str]:
    """Disk bytes per padded cell, from a full-length and a ragged archive of one kind."""
    name = "encoder/0/self_attention"
    lay = TokenLayout(encoder=SideLayout.from_lengths({"tok": t}))
    lengths = rng.integers(t // 4, t + 1, size=n)
    rows = []
    for fmt in ("zarr", "hdf5"):
        path = os.path.join(tmp, f"p.{'h5' if fmt == 'hdf5' else 'zarr'}")
        with ArchiveWriter.create(path, lay, overwrite=True, validate=False) as w:
            for _ in range(n):
                w.append({name: attention(rng, 1, h, t)})
        per_real = disk_size(path) / (n * h * t * t)  # stored bytes per real cell
        with ArchiveWriter.create(
            path, lay, overwrite=True, validate=False, max_lengths={"encoder": t}
        ) as w:
            for n_i in lengths:  # one sample per batch: every batch its own length
                w.append({name: attention(rng, 1, h, int(n_i))})
        size = disk_size(path)
        real = int(h * np.sum(lengths.astype(np.int64) ** 2))
        padded = n * h * t * t - real
        cost = (size - real * per_real) / padded
        rows.append(
            f"| {fmt} / zstd | {100 * padded / (n * h * t * t):.0f} % | {per_real:.3f} | "
            f"{size / 2**20:.1f} | {real * per_real / 2**20:.1f} | {cost:.4f} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--checksums-only", action="store_true", help="only the checksum table")
    ap.add_argument("--repeats", type=int, default=5, help="off/on pairs per checksum row")
    ap.add_argument("--padding-only", action="store_true", help="only the padding table")
    ap.add_argument(
        "--limits-only", action="store_true", help="only the vs-np.save+fsync table (issue 15)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per limits row")
    ap.add_argument(
        "--pipeline-only", action="store_true",
        help="only the store-only pipeline table (pool scaling vs np.save+fsync) and digests",
    )  # fmt: skip
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    if args.padding_only:
        n, h, t = (32, 12, 128) if args.quick else (256, 12, 128)
        lens = f"lengths uniform in [{t // 4}, {t}]"
        print(f"### padding: {n} samples of 12x{t}x{t} float16, {lens}\n")
        print(
            "| format / codec | padded cells | B / real cell (full-length archive) | "
            "ragged MiB | MiB if padding were free | B / padded cell |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            print("\n".join(bench_padding(tmp, rng, n, h, t)))
        return
    configs = [
        # (label, n, h, t, batch)
        ("medium 8x256x256", 32 if args.quick else 128, 8, 256, 16),
        ("guide model 8x29x29", 1024 if args.quick else 8192, 8, 29, 32),
        ("long 4x2048x2048 (row blocks)", 2 if args.quick else 8, 4, 2048, 2),
    ]
    cases = [(f, c) for f in ("zarr", "hdf5") for c in ("none", "zstd", "blosc-zstd", "blosc-lz4")]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        warm = attention(rng, 4, 2, 16)
        for f, c in cases:  # import codecs, start zarr's event loop: not part of the figures
            bench_case(tmp, warm, f, c, 2)
        print(
            f"\n### store-only write path: a model-free producer submitting float16 softmax "
            f"batches, median of {args.rounds} interleaved rounds (ratio range)\n"
        )
        print("| case | format | path | write MB/s | np.save+fsync MB/s | write vs limit |")
        print("|---|---|---|---:|---:|---|")
        print("\n".join(bench_pipeline(tmp, configs, args.rounds)))
        print("\n### commit-log digests (XXH3-64 of every region written, one thread)\n")
        print("| case | work | digest speed | cost |")
        print("|---|---|---:|---:|")
        print("\n".join(bench_digests(configs)))
        if args.pipeline_only:
            print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            return
        print(
            f"\n### default codec vs the limit (np.save + fsync / np.load of the same bytes), "
            f"median of {args.rounds} interleaved rounds, ratio range in brackets\n"
        )
        print(
            "| case | format / codec | write MB/s | np.save+fsync MB/s | write vs limit | "
            "read MB/s | np.load MB/s | read vs limit |"
        )
        print("|---|---|---:|---:|---|---:|---:|---|")
        print("\n".join(bench_limits(tmp, configs, args.rounds)))
        if args.limits_only:
            print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            return
        for label, n, h, t, batch in configs[:2]:
            data = attention(rng, n, h, t)
            print(
                f"\n### checksums: {label}, {data.nbytes / 2**20:.0f} MiB float16, batches of "
                f"{batch}, median of {args.repeats} interleaved pairs\n"
            )
            print("| format / codec | write MB/s off | on | change | read MB/s off | on | change |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            print("\n".join(bench_checksums(tmp, data, batch, repeats=args.repeats)))
        if args.checksums_only:
            return
        for label, n, h, t, batch in configs:
            data = attention(rng, n, h, t)
            print(
                f"\n### {label}: {n} samples, {data.nbytes / 2**20:.0f} MiB float16, "
                f"batches of {batch}\n"
            )
            print("| format / codec | write MB/s | read MB/s | ratio | 1 head ms | chunk |")
            print("|---|---:|---:|---:|---:|---|")
            rows = [bench_npy(tmp, data)] + [bench_case(tmp, data, f, c, batch) for f, c in cases]
            for r in rows:
                print(
                    f"| {r['case']} | {r['write']:.0f} | {r['read']:.0f} | {r['ratio']:.2f} | "
                    f"{r['head_ms']:.2f} | {r['chunks']} |"
                )
        appends = 16 if args.quick else 64
        print(f"\n### append: guide model, 9 arrays of 32x8x29x29 float16, {appends} appends\n")
        print("| format / codec | validate | wall ms / append | CPU ms / append |")
        print("|---|---|---:|---:|")
        for f, c in (("zarr", "zstd"), ("zarr", "none"), ("hdf5", "zstd")):
            for v in (False, True):
                ms, cms = bench_append(tmp, rng, f, c, validate=v, appends=appends)
                print(f"| {f} / {c} | {v} | {ms:.1f} | {cms:.1f} |")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
