"""The guide's AttentionVisualizer: its snippets (sections 3-7, advanced 1-2) run as written."""

import json

import numpy as np
import pytest

from attnscope import AttentionVisualizer
from attnscope.errors import InputError, SelectionError


def run_guide_snippets(visualizer, attention_weights):
    # section 3
    visualizer.plot_attention_heatmap(
        attention_weights['encoder'][0]['self_attention'],
        head_idx=3,
        batch_idx=0,
        title='Encoder Layer 0, Head 3',
        figsize=(10, 8),
        cmap='viridis',
        save_path='encoder_attn.png'
    )
    visualizer.plot_attention_heatmap(
        attention_weights['encoder'][0]['self_attention'],
        head_idx=None,
        title='Encoder Layer 0, Average',
        save_path='encoder_attn_avg.png'
    )
    # section 4
    visualizer.plot_multi_head_attention(
        attention_weights['encoder'][0]['self_attention'],
        title='Encoder Layer 0 - All Heads',
        figsize=(20, 12),
        save_path='multi_head.png'
    )
    # section 5
    visualizer.plot_layer_comparison(
        attention_weights['encoder'],
        attention_type='self_attention',
        head_idx=None,
        title='Encoder Self-Attention Across Layers',
        save_path='encoder_layers.png'
    )
    visualizer.plot_layer_comparison(
        attention_weights['decoder'],
        attention_type='cross_attention',
        title='Decoder Cross-Attention Across Layers',
        save_path='decoder_cross_layers.png'
    )
    # section 6
    visualizer.plot_attention_flow(
        encoder_attention=attention_weights['encoder'][0]['self_attention'],
        decoder_self_attention=attention_weights['decoder'][0]['self_attention'],
        decoder_cross_attention=attention_weights['decoder'][0]['cross_attention'],
        layer_idx=0,
        head_idx=None,
        save_path='attention_flow.png'
    )
    # section 7
    visualizer.save_attention_statistics(
        attention_weights,
        save_path='attention_stats.json'
    )
    # advanced 1
    visualizer.plot_attention_heatmap(
        attention_weights['encoder'][0]['self_attention'],
        cmap='hot',
        vmin=0.0,
        vmax=0.1,
        save_path='custom_colormap.png'
    )
    # advanced 2
    for layer_idx in range(len(attention_weights['encoder'])):
        visualizer.plot_attention_heatmap(
            attention_weights['encoder'][layer_idx]['self_attention'],
            title=f'Encoder Layer {layer_idx}',
            save_path=f'encoder_layer_{layer_idx}.png',
            show=False
        )


GUIDE_FILES = [
    "encoder_attn.png", "encoder_attn_avg.png", "multi_head.png", "encoder_layers.png",
    "decoder_cross_layers.png", "attention_flow.png", "attention_stats.json",
    "custom_colormap.png", "encoder_layer_0.png", "encoder_layer_1.png", "encoder_layer_2.png",
]


def check_stats(path):
    stats = json.loads(path.read_text())
    assert [e["type"] for e in stats["decoder"][:2]] == ["self_attention", "cross_attention"]
    assert stats["encoder"][0]["shape"] == [8, 29, 29]
    assert set(stats["encoder"][0]) >= {"layer", "type", "mean", "std", "min", "max", "shape"}


def test_guide_snippets_with_numpy(tmp_path, monkeypatch, guide_weights):
    monkeypatch.chdir(tmp_path)
    run_guide_snippets(AttentionVisualizer(), guide_weights)
    for name in GUIDE_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    check_stats(tmp_path / "attention_stats.json")


def test_guide_quickstart_with_the_model(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from attnscope import Transformer

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = Transformer(embed_dim=64, context_length=100, num_heads=8,
                        num_encoder_layers=3, num_decoder_layers=3)
    enc = {'text': torch.randn(2, 10, 64), 'robot0_eef_pos': torch.randn(2, 1, 64),
           'agentview_image': torch.randn(2, 9, 64), 'agentview_depth': torch.randn(2, 9, 64)}
    dec = {'text': torch.randn(2, 10, 64), 'robot0_eef_pos_past_traj': torch.randn(2, 10, 64),
           'robot0_eef_pos_past_traj_delta': torch.randn(2, 9, 64)}
    model.enable_attention_storage()
    output, attention_weights = model(enc, dec, return_attention_weights=True)
    visualizer = AttentionVisualizer()
    fig = visualizer.plot_attention_heatmap(
        attention_weights['encoder'][0]['self_attention'],
        title='Encoder Layer 0 Self-Attention',
        save_path='attention.png'
    )
    expected = attention_weights['encoder'][0]['self_attention'][0].detach().numpy().mean(0)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), expected, rtol=1e-5)
    run_guide_snippets(visualizer, attention_weights)
    for name in GUIDE_FILES:
        assert (tmp_path / name).exists(), name
    check_stats(tmp_path / "attention_stats.json")


def test_returns_figure_and_closes_when_only_saving(tmp_path, guide_weights):
    import matplotlib.pyplot as plt

    viz = AttentionVisualizer()
    x = guide_weights["encoder"][0]["self_attention"]
    fig = viz.plot_attention_heatmap(x, head_idx=2, save_path=tmp_path / "a.png", show=False)
    assert fig.number not in plt.get_fignums()
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), x[0, 2])
    fig = viz.plot_attention_heatmap(x, head_idx=2, show=False)
    assert fig.number in plt.get_fignums()


def test_layout_gives_modality_axes_for_tensors(guide_weights, layout):
    viz = AttentionVisualizer(layout=layout)
    cross = guide_weights["decoder"][0]["cross_attention"]
    fig = viz.plot_attention_heatmap(cross, stack="decoder", kind="cross_attention", show=False)
    ax = fig.axes[0]
    assert ax.get_xticklabels()[10].get_text() == "robot0_eef_pos"
    assert ax.get_yticklabels()[10].get_text() == "robot0_eef_pos_past_traj[0]"


def test_archive_selection_reads_only_selected_head(fake_archive, guide_weights):
    viz = AttentionVisualizer()
    arr = fake_archive.attention("encoder", 1, "self_attention")
    fig = viz.plot_attention_heatmap(arr, head_idx=3, batch_idx=1, show=False)
    assert arr.reads == [(1, 3)]
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(),
                                  guide_weights["encoder"][1]["self_attention"][1, 3])
    # the archive layout labels the axes
    assert fig.axes[0].get_xticklabels()[10].get_text() == "robot0_eef_pos"


def test_archive_head_average_reads_one_sample(fake_archive, guide_weights):
    arr = fake_archive.attention("decoder", 0, "cross_attention")
    fig = AttentionVisualizer().plot_attention_heatmap(arr, batch_idx=1, show=False)
    assert sorted(arr.reads) == [(1, h) for h in range(8)]
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(),
                               guide_weights["decoder"][0]["cross_attention"][1].mean(0),
                               rtol=1e-5)


def test_archive_forms_for_layers_and_flow(real_archive, guide_weights):
    viz = AttentionVisualizer()
    fig = viz.plot_layer_comparison(real_archive, stack="decoder",
                                    attention_type="cross_attention", head_idx=1, show=False)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    np.testing.assert_array_equal(panels[2].images[0].get_array(),
                                  guide_weights["decoder"][2]["cross_attention"][0, 1])
    fig = viz.plot_attention_flow(real_archive, layer_idx=2, head_idx=0, show=False)
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(),
                                  guide_weights["decoder"][2]["self_attention"][0, 0])
    fig = viz.plot_attention_heatmap(real_archive, stack="encoder", layer=0,
                                     kind="self_attention", head_idx=0, show=False)
    assert fig.axes[0].images
    # an archive path works the same, and the archive it opened is closed again
    fig = viz.plot_multi_head_attention(str(real_archive.path), stack="decoder", layer=1,
                                        kind="cross_attention", show=False)
    np.testing.assert_array_equal(fig.axes[3].images[0].get_array(),
                                  guide_weights["decoder"][1]["cross_attention"][0, 3])
    assert real_archive.attention("encoder", 0, "self_attention")[0, 0].shape == (29, 29)


def test_bad_selections_in_facade(guide_weights, real_archive):
    viz = AttentionVisualizer()
    x = guide_weights["encoder"][0]["self_attention"]
    with pytest.raises(SelectionError, match="head_idx 9 out of range"):
        viz.plot_attention_heatmap(x, head_idx=9, show=False)
    with pytest.raises(SelectionError, match="batch_idx 2 out of range"):
        viz.plot_multi_head_attention(x, batch_idx=2, show=False)
    with pytest.raises(SelectionError, match="has no 'cross_attention'"):
        viz.plot_layer_comparison(guide_weights["encoder"], attention_type="cross_attention",
                                  show=False)
    with pytest.raises(SelectionError):
        viz.plot_layer_comparison(real_archive, stack="encoder", attention_type="bogus",
                                  show=False)
    with pytest.raises(InputError, match="not the whole nested dict"):
        viz.plot_layer_comparison(guide_weights, show=False)
    with pytest.raises(SelectionError, match="pass stack=, layer= and kind="):
        viz.plot_attention_heatmap(real_archive, stack="encoder", show=False)


def test_facade_heads_are_the_models_ids(kept_heads_archive):
    """The facade on an archive keeping heads 0 and 3: head_idx=3 is model head 3."""
    from attnscope.store import open_archive

    viz = AttentionVisualizer()
    with open_archive(kept_heads_archive) as arc:
        arr = arc.attention("decoder", 1, "cross_attention")
        fig = viz.plot_attention_heatmap(arr, head_idx=3, batch_idx=1, show=False)
        np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), arr[1, 1])
        assert fig.axes[0].get_title() == "head 3, sample 1"
        grid = viz.plot_multi_head_attention(arr, show=False)
        assert [ax.get_title() for ax in grid.axes[:2]] == ["head 0", "head 3"]
        layers = viz.plot_layer_comparison(arc, stack="decoder", attention_type="cross_attention",
                                           head_idx=3, show=False)
        assert layers.get_suptitle() == "head 3, sample 0"
        with pytest.raises(SelectionError, match=r"head_idx 1 is not a stored head"):
            viz.plot_attention_heatmap(arr, head_idx=1, show=False)
