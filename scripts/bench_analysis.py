"""Benchmark: attention analysed per second vs a plain numpy read + sum over the same arrays.

Usage: python scripts/bench_analysis.py [--samples 256] [--heads 8] [--tokens 128] [--repeat 3]

Writes a synthetic float16 Zarr archive (soft, seeded attention) to a temporary folder,
then times, in the same run: a numpy pass (read every block + ``.sum()``, the limit), and
``analyze`` with 1 and 2 workers and each head-similarity option. The passes run
interleaved, ``--repeat`` rounds of all of them, so load from other jobs hits every pass
alike; each row shows the median seconds, MB/s (the archive's logical bytes,
N * H * T * S * itemsize) and the median and range of its ratio to the numpy pass of the
same round (1.00x = as fast as reading and summing the archive).

    python scripts/bench_analysis.py --repeat 5 --only js     # the issue-15 row
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from attnscope.analysis import analyze
from attnscope.store import ArchiveWriter, open_archive
from attnscope.store.layout import SideLayout, TokenLayout


def make_archive(path: Path, n: int, h: int, t: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": t // 2, "image": t - t // 2}))
    with ArchiveWriter.create(path, layout, dtype="float16") as w:
        for _ in range(0, n, 32):
            z = rng.standard_normal((32, h, t, t)).astype(np.float32) * 2
            e = np.exp(z - z.max(-1, keepdims=True))
            w.append({"encoder": [{"self_attention": (e / e.sum(-1, keepdims=True))}] * 2})


def numpy_pass(path: Path) -> float:
    a = open_archive(path)
    total = 0.0
    for name in a.arrays:
        for _, block in a[name].iter_blocks(max_bytes=32 << 20):
            total += float(block.sum(dtype=np.float32))
    return total


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds of every pass")
    ap.add_argument(
        "--only", choices=("js", "cosine", "none"), default=None, help="one similarity option"
    )
    args = ap.parse_args()
    sims: list[str | None] = ["js", "cosine", None]
    if args.only:
        sims = [None if args.only == "none" else args.only]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.zarr"
        make_archive(path, args.samples, args.heads, args.tokens)
        a = open_archive(path)
        mb = sum(a[x].nbytes for x in a.arrays) / 1e6
        print(f"archive: {a.arrays} {a[a.arrays[0]].shape} float16, {mb:.1f} MB logical")
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        passes: list[tuple[str, Any]] = [("numpy read + sum (limit)", lambda: numpy_pass(path))]
        for sim in sims:
            for workers in (1, 2):
                out = Path(d) / f"out-{sim}-{workers}"

                def run(out: Path = out, w: int = workers, sim: str | None = sim) -> None:
                    analyze(path, out, workers=w, head_similarity=sim, progress=False)

                passes.append((f"analyze workers={workers} head_similarity={sim}", run))
        for _label, fn in passes:  # warm-up: imports, page cache
            fn()
        times: dict[str, list[float]] = {label: [] for label, _ in passes}
        for _ in range(args.repeat):
            for label, fn in passes:
                times[label].append(timed(fn))
        base = times[passes[0][0]]
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"\n| pass | seconds (median of {args.repeat}) | MB/s | vs numpy (median, range) |")
        print("|---|---:|---:|---|")
        for label, _ in passes:
            ts = times[label]
            ratios = [b / t for b, t in zip(base, ts)]
            dt = statistics.median(ts)
            print(
                f"| {label} | {dt:.2f} | {mb / dt:.0f} | {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}) |"
            )


if __name__ == "__main__":
    main()
