"""End to end: the demo, the guide's example script, and the guide's training-loop pattern."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from attnscope.cli import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_demo_runs_every_stage(tmp_path, fmt) -> None:
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        cli,
        [
            "demo",
            "--out",
            str(out),
            "--format",
            fmt,
            "--batches",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    archive = out / ("attention.h5" if fmt == "hdf5" else "attention.zarr")
    for needle in ["capture:", "analysis:", "render:", "report:", str(archive)]:
        assert needle in res.output
    from attnscope.store import open_archive, verify

    assert verify(archive).ok
    with open_archive(archive) as a:
        assert a.n_samples == 4
        assert len(a.arrays) == 9
        assert [s.name for s in a.layout.encoder.segments] == [
            "text",
            "robot0_eef_pos",
            "agentview_image",
            "agentview_depth",
        ]
    stats = pd.read_parquet(out / "tables" / "head_stats.parquet")
    assert set(stats["stack"]) == {"encoder", "decoder"}
    assert len(list((out / "figures").rglob("*.png"))) > 20
    assert (out / "report.html").stat().st_size > 10_000


def test_guide_example_script_writes_its_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["example", "--out", str(tmp_path)])
    runpy.run_path(
        str(ROOT / "scripts" / "attention_visualization_example.py"), run_name="__main__"
    )
    expected = [
        "encoder_layer0_attention.png",
        "decoder_layer0_cross_attention.png",
        "encoder_multi_head.png",
        "encoder_layer_comparison.png",
        "decoder_cross_attention_comparison.png",
        "attention_flow_layer0.png",
        "attention_statistics.json",
    ]
    for name in expected:
        assert (tmp_path / name).stat().st_size > 1000 or name.endswith(".json"), name
    stats = json.loads((tmp_path / "attention_statistics.json").read_text())
    assert [e["layer"] for e in stats["encoder"]] == [0, 1, 2]
    assert stats["encoder"][0]["shape"] == [8, 29, 29]
    assert {e["type"] for e in stats["decoder"]} == {"self_attention", "cross_attention"}


def test_training_loop_pattern_captures_periodically_and_frees(tmp_path) -> None:
    """The guide's 高级用法 3: train with storage off, capture every N epochs, free again."""
    from attnscope import AttentionVisualizer, Transformer
    from attnscope.capture.synthetic import synthetic_batches

    torch.manual_seed(0)
    model = Transformer(32, 40, 4, 1, 1, output_dim=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.MSELoss()
    visualizer = AttentionVisualizer()
    data = list(synthetic_batches(2, 4, 32, enc={"text": 5}, dec={"act": 3}))
    target = torch.zeros(4, 3, 2)
    saved = []
    for epoch in range(3):
        for enc, dec in data:
            opt.zero_grad()
            output = model(enc, dec)
            loss = criterion(output, target)
            loss.backward()
            opt.step()
            assert all(m.attention_weights is None for m in model.attention_modules().values())
        if epoch % 2 == 0:
            model.enable_attention_storage()
            with torch.no_grad():
                _, attn = model(enc, dec, return_attention_weights=True)
            fig = visualizer.plot_attention_heatmap(
                attn["encoder"][0]["self_attention"],
                save_path=tmp_path / f"attention_epoch_{epoch}.png",
                show=False,
            )
            assert fig is not None
            model.disable_attention_storage()
            assert all(m.attention_weights is None for m in model.attention_modules().values())
            saved.append(epoch)
    assert saved == [0, 2]
    assert (tmp_path / "attention_epoch_2.png").exists()
