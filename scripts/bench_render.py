"""Benchmark: one head heatmap from a large archive, lazily vs loading the whole array first.

Writes a synthetic archive (default 5 samples x 8 heads x 4096 x 4096 float16 = 1.34 GB
of attention), then times

* ``lazy``  -- ``plot_heatmap(archive.attention(...), head_idx=h, batch_idx=b)``: reads one
  (sample, head) matrix, block-max reduces it to 1024 x 1024 and draws it;
* ``eager`` -- reads the whole ``(N, H, T, S)`` array into memory first, then plots the
  same head (what a "torch.load everything, then plot" workflow does).

Bytes read are the process's ``rchar`` from ``/proc/self/io`` (every byte returned by
read syscalls, page cache or not). Before each run the archive's pages are dropped from the
page cache with ``posix_fadvise(DONTNEED)`` so both runs read from disk ("cold"); a second
"warm" lazy run follows. Prints a Markdown table.

Usage::

    python scripts/bench_render.py [--format zarr|h5] [--tokens 4096] [--samples 5] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attnscope.render import plot_heatmap, select_matrix  # noqa: E402
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive  # noqa: E402


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def drop_cache(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_archive(path: Path, n: int, h: int, t: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    layout = TokenLayout(SideLayout.from_lengths(
        {"text": t // 8, "agentview_image": t // 2, "agentview_depth": t - t // 8 - t // 2}))
    w = ArchiveWriter.create(path, layout, dtype="float16", validate=False, overwrite=True)
    try:
        for _ in range(n):
            x = rng.random((1, h, t, t), dtype=np.float32) ** 8  # peaky rows
            x /= x.sum(-1, keepdims=True)
            w.append({"encoder": [{"self_attention": x}]})
    finally:
        w.close()


def timed(fn):
    r0, t0 = rchar(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, rchar() - r0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", choices=["zarr", "h5"], default="zarr")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where to write the archive (default: tmp)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_render_"))
    path = root / f"bench.{args.format}"
    t0 = time.perf_counter()
    write_archive(path, args.samples, args.heads, args.tokens)
    t_write = time.perf_counter() - t0
    raw = args.samples * args.heads * args.tokens**2 * 2
    sample, head = args.samples // 2, args.heads // 2
    try:
        arc = open_archive(path)
        arr = arc.attention("encoder", 0, "self_attention")

        def read_lazy():
            return select_matrix(arr, head_idx=head, batch_idx=sample)

        def read_eager():
            return np.stack([arr[i] for i in range(arr.shape[0])])

        def draw(data, **sel):
            fig = plot_heatmap(data, **sel)
            fig.canvas.draw()
            plt.close(fig)

        rows = []
        for name, cold in (("lazy, one head", True), ("lazy, one head", False),
                           ("eager, whole array first", True)):
            if cold:
                drop_cache(path)
            reader = read_lazy if name.startswith("lazy") else read_eager
            data, t_read, b_read = timed(reader)
            sel = {} if name.startswith("lazy") else dict(head_idx=head, batch_idx=sample)
            _, t_draw, _ = timed(lambda: draw(data, **sel))  # noqa: B023
            label = f"{name} ({'cold' if cold else 'warm'} cache)"
            rows.append((label, t_read, t_draw, b_read, data.nbytes))
            data = None  # free before the next run
        arc.close()
        print(f"archive: {args.format}, {args.samples} x {args.heads} x {args.tokens} x "
              f"{args.tokens} float16, {raw / 1e9:.2f} GB raw, {du(path) / 1e9:.2f} GB on disk, "
              f"chunks {arr.chunks}, written in {t_write:.1f} s")
        print("| path | read (s) | reduce + draw (s) | total (s) | bytes read (MB) | "
              "in memory (MB) |")
        print("|---|---|---|---|---|---|")
        for name, tr, td, b, m in rows:
            print(f"| {name} | {tr:.2f} | {td:.2f} | {tr + td:.2f} | {b / 1e6:.1f} | "
                  f"{m / 1e6:.1f} |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
