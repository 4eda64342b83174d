"""Benchmark: batch rendering and the report against their limits; lazy reads of a big archive.

**Mix** (default, ~1 minute): writes an archive shaped like the demo's (guide layout, 3 + 3
layers, 8 heads, 29 x 29, 32 samples, float16; softmax of random logits), analyses it, then in
the same process, alternately, 2 rounds each:

* ``bare loop`` -- the limit: per figure a fresh labelled 29 x 29 heatmap (a tick label per
  token) + colour bar + ``savefig`` at 100 dpi, as many figures as the mix has;
* ``render`` -- ``render_archive(..., workers=1)`` of every figure kind (heatmaps, grids,
  layer comparisons, flows, table figures: the demo's 45 figures), into a fresh folder;

and prints figures per second of each and their ratio, then the report's seconds and bytes.

**Large** (``--large``, about 2-4 minutes): writes a synthetic archive (default 5 samples x
8 heads x 4096 x 4096 float16 = 1.34 GB of attention), then times

* ``lazy``  -- ``plot_heatmap(archive.attention(...), head_idx=h, batch_idx=b)``: reads one
  (sample, head) matrix, block-max reduces it to 1024 x 1024 and draws it;
* ``eager`` -- reads the whole ``(N, H, T, S)`` array into memory first, then plots the
  same head (what a "torch.load everything, then plot" workflow does).

Bytes read are the process's ``rchar`` from ``/proc/self/io`` (every byte returned by
read syscalls, page cache or not). Before each run the archive's pages are dropped from the
page cache with ``posix_fadvise(DONTNEED)`` so both runs read from disk ("cold"); a second
"warm" lazy run follows. Prints a Markdown table.

Usage::

    python scripts/bench_render.py [--rounds 2]
    python scripts/bench_render.py --large [--format zarr|h5] [--tokens 4096] [--samples 5] [--keep]
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


def write_demo_like(path: Path, n: int = 32, seed: int = 0) -> None:
    """The demo's shapes and layout without torch: 3 + 3 layers, 8 heads, 29 x 29."""
    enc = SideLayout.from_lengths(
        {"text": 10, "robot0_eef_pos": 1, "agentview_image": 9, "agentview_depth": 9})
    dec = SideLayout.from_lengths({"text": 10, "robot0_eef_pos_past_traj": 10,
                                   "robot0_eef_pos_past_traj_delta": 9})
    rng = np.random.default_rng(seed)

    def soft(*shape):
        x = np.exp(rng.normal(size=shape) * 2.0)
        return (x / x.sum(-1, keepdims=True)).astype(np.float32)

    with ArchiveWriter.create(path, TokenLayout(enc, dec), overwrite=True) as w:
        for _ in range(n // 4):
            w.append({
                "encoder": [{"self_attention": soft(4, 8, 29, 29)} for _ in range(3)],
                "decoder": [{"self_attention": soft(4, 8, 29, 29),
                             "cross_attention": soft(4, 8, 29, 29)} for _ in range(3)],
            })


def bare_loop(out: Path, n: int, labels: list[str]) -> float:
    """Seconds for ``n`` fresh labelled 29 x 29 heatmaps + colour bar + savefig."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        fig, ax = plt.subplots(figsize=(10, 8))
        im = ax.imshow(rng.random((29, 29)), cmap="viridis")
        ax.set_xticks(range(29), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(29), labels, fontsize=6)
        ax.set_title(f"figure {i}")
        fig.colorbar(im, ax=ax, label="attention weight")
        fig.savefig(out / f"bare{i}.png", dpi=100)
        plt.close(fig)
    return time.perf_counter() - t0


def bench_mix(rounds: int) -> None:
    from attnscope.analysis import analyze
    from attnscope.render import render_archive
    from attnscope.render.report import write_report

    root = Path(tempfile.mkdtemp(prefix="bench_render_mix_"))
    try:
        arc = root / "demo.zarr"
        write_demo_like(arc)
        analyze(arc, root / "tables", progress=False)
        with open_archive(arc) as a:
            labels = list(a.layout.encoder.labels)
        render_archive(arc, root / "warm", tables_dir=root / "tables", what=["heatmap"],
                       layers=[0], workers=1, progress=False)  # imports, font cache
        bare_loop(root, 2, labels)
        print("| round | figures | bare loop (fig/s) | render (fig/s) | render / bare |")
        print("|---|---|---|---|---|")
        for r in range(rounds):
            t0 = time.perf_counter()
            files = render_archive(arc, root / f"r{r}", tables_dir=root / "tables", workers=1,
                                   progress=False)
            t_render = time.perf_counter() - t0
            t_bare = bare_loop(root, len(files), labels)
            ours, bare = len(files) / t_render, len(files) / t_bare
            print(f"| {r + 1} | {len(files)} | {bare:.2f} ({t_bare:.1f} s) | {ours:.2f} "
                  f"({t_render:.1f} s) | {ours / bare:.2f}x |")
        for r in range(rounds):
            t0 = time.perf_counter()
            page = write_report(arc, root / f"report{r}.html", tables_dir=root / "tables")
            print(f"report, round {r + 1}: {time.perf_counter() - t0:.2f} s, "
                  f"{page.stat().st_size / 1e6:.2f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="the lazy/eager 4096-token benchmark")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--format", choices=["zarr", "h5"], default="zarr")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where to write the archive (default: tmp)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not args.large:
        bench_mix(args.rounds)
        return

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
