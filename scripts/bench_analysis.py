"""Benchmark: attention analysed per second vs a plain numpy read + sum over the same arrays.

Usage: python scripts/bench_analysis.py [--samples 256] [--heads 8] [--tokens 128] [--repeat 3]

Writes a synthetic float16 Zarr archive (soft, seeded attention) to a temporary folder,
then times, in the same run: a numpy pass (read every block + ``.sum()``), and
``analyze`` with 1 and 2 workers and each head-similarity option; each pass is the median
of ``--repeat`` runs. MB/s counts the archive's logical bytes (N * H * T * S * itemsize).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

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
    for name in a.arrays():
        for _, block in a[name].iter_blocks(max_bytes=32 << 20):
            total += float(block.sum(dtype=np.float32))
    return total


def timed(fn, repeat: int = 3) -> float:  # noqa: ANN001
    """Median wall time of ``repeat`` runs (the machine is shared: medians, not minima)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="runs per pass; the median is shown")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.zarr"
        make_archive(path, args.samples, args.heads, args.tokens)
        a = open_archive(path)
        mb = sum(a[x].nbytes for x in a.arrays()) / 1e6
        print(f"archive: {a.arrays()} {a[a.arrays()[0]].shape} float16, {mb:.1f} MB logical")
        rows = [("numpy read + sum", timed(lambda: numpy_pass(path), args.repeat))]
        for sim in ("js", "cosine", None):
            for workers in (1, 2):
                out = Path(d) / f"out-{sim}-{workers}"

                def run(out: Path = out, w: int = workers, sim: str | None = sim) -> None:
                    analyze(path, out, workers=w, head_similarity=sim, progress=False)

                dt = timed(run, args.repeat)
                rows.append((f"analyze workers={workers} head_similarity={sim}", dt))
        print("| pass | seconds | MB/s | vs numpy |")
        print("|---|---|---|---|")
        base = rows[0][1]
        for label, dt in rows:
            print(f"| {label} | {dt:.2f} | {mb / dt:.0f} | {base / dt:.2f}x |")


if __name__ == "__main__":
    main()
