"""The guide's example run (使用示例), through attnscope's public API.

Writes into --out (default: the current folder):
  encoder_layer0_attention.png, decoder_layer0_cross_attention.png, encoder_multi_head.png,
  encoder_layer_comparison.png, decoder_cross_attention_comparison.png,
  attention_flow_layer0.png, attention_statistics.json

Run: python scripts/attention_visualization_example.py --out example-output
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script may choose the backend; the library never does

import torch  # noqa: E402

from attnscope import AttentionVisualizer, Transformer  # noqa: E402
from attnscope.capture.synthetic import GUIDE_DEC, GUIDE_ENC, synthetic_batches  # noqa: E402


def main(out: Path, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Transformer(
        embed_dim=512,
        context_length=100,
        num_heads=8,
        num_encoder_layers=3,
        num_decoder_layers=3,
    ).eval()
    enc, dec = next(synthetic_batches(1, 2, 512, enc=GUIDE_ENC, dec=GUIDE_DEC, seed=seed))

    model.enable_attention_storage()
    with torch.no_grad():
        _, attention_weights = model(enc, dec, return_attention_weights=True)
    model.disable_attention_storage()

    # The model's token layout gives modality-aware axes (text, agentview_image, ...).
    viz = AttentionVisualizer(layout=model.last_layout)
    files = {
        "encoder_layer0_attention.png": lambda p: viz.plot_attention_heatmap(
            attention_weights["encoder"][0]["self_attention"],
            title="Encoder Layer 0 Self-Attention (head average)",
            stack="encoder", kind="self_attention", save_path=p, show=False,
        ),
        "decoder_layer0_cross_attention.png": lambda p: viz.plot_attention_heatmap(
            attention_weights["decoder"][0]["cross_attention"],
            title="Decoder Layer 0 Cross-Attention (head average)",
            stack="decoder", kind="cross_attention", save_path=p, show=False,
        ),
        "encoder_multi_head.png": lambda p: viz.plot_multi_head_attention(
            attention_weights["encoder"][0]["self_attention"],
            title="Encoder Layer 0 - All Heads",
            stack="encoder", kind="self_attention", save_path=p, show=False,
        ),
        "encoder_layer_comparison.png": lambda p: viz.plot_layer_comparison(
            attention_weights["encoder"], attention_type="self_attention",
            title="Encoder Self-Attention Across Layers", save_path=p, show=False,
        ),
        "decoder_cross_attention_comparison.png": lambda p: viz.plot_layer_comparison(
            attention_weights["decoder"], attention_type="cross_attention",
            title="Decoder Cross-Attention Across Layers", save_path=p, show=False,
        ),
        "attention_flow_layer0.png": lambda p: viz.plot_attention_flow(
            encoder_attention=attention_weights["encoder"][0]["self_attention"],
            decoder_self_attention=attention_weights["decoder"][0]["self_attention"],
            decoder_cross_attention=attention_weights["decoder"][0]["cross_attention"],
            layer_idx=0, head_idx=None, save_path=p, show=False,
        ),
        "attention_statistics.json": lambda p: viz.save_attention_statistics(
            attention_weights, save_path=p
        ),
    }
    written = []
    for name, make in files.items():
        make(out / name)
        written.append(out / name)
        print(out / name)
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    main(args.out, args.seed)
