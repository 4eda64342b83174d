"""HF layer-by-layer capture vs ``output_attentions=True``: run as ``bench_capture.py --layers``.

A BERT of MiniLM's width (384, 12 heads; 8 x 256 tokens) at 2, 6 and 12 layers. Each
(depth, row) runs in a fresh process: it warms up (imports, a tiny capture, one plain sdpa
forward at full size), reads the ``ru_maxrss`` high-water mark, runs the row once and reports
how far the high-water mark rose: the peak memory the row needs *beyond plain inference*
(torch's CPU allocations are invisible to tracemalloc; RSS sees them). Then ``--repeats``
timed passes (median and min; min is the robust one on a shared machine). On CUDA the peak
extra device memory (``max_memory_allocated``) is reported too.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MB = 1e6
LAYER_DEPTHS = (2, 6, 12)
LAYER_ROWS = {  # row -> what it runs
    "plain": "sdpa forward, no weights",
    "output_attentions": "eager + output_attentions=True (all layers kept to the end)",
    "hooks": "attnscope layer by layer, every layer, each dropped at the sink",
    "capture all": "capture() to Zarr, every layer (float16 host buffers of the batch)",
    "capture one": "capture() to Zarr, last layer only (others on sdpa)",
}


def layers_worker(spec: str, device: str, out_dir: Path, repeats: int, quick: bool) -> None:
    """Subprocess: one (depth, row); prints peak extra RSS / device bytes and median seconds."""
    import torch
    from transformers import BertConfig, BertModel

    from attnscope.capture.adapters import adapter_for
    from attnscope.capture.job import capture

    depth, row = spec.split(":", 1)
    b, t, wide = (2, 32, 64) if quick else (8, 256, 384)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=wide, num_hidden_layers=int(depth), num_attention_heads=12
                     if not quick else 4, intermediate_size=4 * wide)  # fmt: skip
    model = BertModel(cfg, add_pooling_layer=False).eval().to(device)  # sdpa, as loaded
    g = torch.Generator().manual_seed(0)

    def make(b: int, t: int) -> dict:
        ids = torch.randint(1000, cfg.vocab_size, (b, t), generator=g).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    adapter = adapter_for(model) if row == "hooks" else None
    dest = out_dir / f"layers-{depth}-{row.replace(' ', '_')}.zarr"

    def once(batch: dict) -> None:
        with torch.inference_mode():
            if row == "plain":
                model(**batch)
            elif row == "output_attentions":
                model.set_attn_implementation("eager")
                model(**batch, output_attentions=True)
                model.set_attn_implementation("sdpa")
            elif adapter is not None:
                adapter.run(batch, lambda name, w: None, set(adapter.names()))
        if row.startswith("capture"):
            keep = None if row == "capture all" else [int(depth) - 1]
            capture(model, [batch], dest, layers=keep, progress=False, overwrite=True)

    once(make(1, 8))  # imports and first-call set-up, at a negligible peak
    batch = make(b, t)
    with torch.inference_mode():
        model(**batch)  # the baseline high-water mark includes a plain pass
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.memory_allocated()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    once(batch)
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    dev = torch.cuda.max_memory_allocated() - base_dev if cuda else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    layer = b * cfg.num_attention_heads * t * t * 4
    print(json.dumps({"depth": int(depth), "row": row, "extra_rss": extra, "extra_dev": dev,
                      "seconds": statistics.median(times), "min_seconds": min(times),
                      "layer_bytes": layer}))  # fmt: skip


def layers_bench(args: argparse.Namespace, out_dir: Path, script: str, render: Callable) -> str:
    """The ``--layers`` table: one fresh process per (depth, row), so each peak is its own."""
    results = []
    for depth in (2, 4) if args.quick else LAYER_DEPTHS:
        for row in LAYER_ROWS:
            cmd = [sys.executable, script, "--device", args.device, "--repeats",
                   str(args.repeats), "--out-dir", str(out_dir), "--_layers", f"{depth}:{row}"]
            cmd += ["--quick"] if args.quick else []  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {depth:>2} layers  {row:<18} {results[-1]}", file=sys.stderr, flush=True)
    head = ["layers", "row", "peak extra RSS MB", "x one layer's fp32 weights", "s (median)",
            "min s"]  # fmt: skip
    if args.device.startswith("cuda"):
        head.append("peak extra GPU MB")
    rows = []
    for r in results:
        line = [str(r["depth"]), r["row"], f"{r['extra_rss'] / MB:.0f}",
                f"{r['extra_rss'] / r['layer_bytes']:.1f}", f"{r['seconds']:.3f}",
                f"{r['min_seconds']:.3f}"]  # fmt: skip
        if r["extra_dev"] is not None:
            line.append(f"{r['extra_dev'] / MB:.0f}")
        rows.append(line)
    legend = [f"- {k}: {v}" for k, v in LAYER_ROWS.items()]
    return "\n".join([render(head, rows, args.markdown), "", *legend])

