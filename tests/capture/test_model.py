"""The reference Transformer: the guide's API, shapes, weight invariants, bad input."""

from __future__ import annotations

import pytest
import torch

from attnscope.capture import Transformer
from attnscope.errors import AttnscopeError, ConfigError, InputError, ShapeError


def guide_inputs(b: int = 2, d: int = 512) -> tuple[dict, dict]:
    enc = {
        "text": torch.randn(b, 10, d),
        "robot0_eef_pos": torch.randn(b, 1, d),
        "agentview_image": torch.randn(b, 9, d),
        "agentview_depth": torch.randn(b, 9, d),
    }
    dec = {
        "text": torch.randn(b, 10, d),
        "robot0_eef_pos_past_traj": torch.randn(b, 10, d),
        "robot0_eef_pos_past_traj_delta": torch.randn(b, 9, d),
    }
    return enc, dec


@pytest.fixture
def small() -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        embed_dim=32, context_length=40, num_heads=4, num_encoder_layers=2, num_decoder_layers=2
    ).eval()


def small_inputs(b: int = 3, s: tuple = (5, 1, 7), t: tuple = (4, 6)) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(1)
    enc = {f"e{i}": torch.randn(b, n, 32, generator=g) for i, n in enumerate(s)}
    dec = {f"d{i}": torch.randn(b, n, 32, generator=g) for i, n in enumerate(t)}
    return enc, dec


def test_guide_quick_start_verbatim() -> None:
    # The guide's quick-start snippet, import line adapted.
    from attnscope import Transformer

    model = Transformer(
        embed_dim=512,
        context_length=100,
        num_heads=8,
        num_encoder_layers=3,
        num_decoder_layers=3,
    )
    enc, dec = guide_inputs()
    model.enable_attention_storage()
    output, attention_weights = model(enc, dec, return_attention_weights=True)
    assert output.shape == (2, 29, 512)
    assert len(attention_weights["encoder"]) == 3 and len(attention_weights["decoder"]) == 3
    for layer in attention_weights["encoder"]:
        assert set(layer) == {"self_attention"}
        assert layer["self_attention"].shape == (2, 8, 29, 29)
    for layer in attention_weights["decoder"]:
        assert set(layer) == {"self_attention", "cross_attention"}
        assert layer["self_attention"].shape == (2, 8, 29, 29)
        assert layer["cross_attention"].shape == (2, 8, 29, 29)


def test_rows_sum_to_one_and_causal_is_zero_above_diagonal(small: Transformer) -> None:
    enc, dec = small_inputs()
    small.enable_attention_storage()
    _, w = small(enc, dec, return_attention_weights=True)
    mats = [x["self_attention"] for x in w["encoder"]]
    mats += [x[k] for x in w["decoder"] for k in ("self_attention", "cross_attention")]
    for m in mats:
        assert not m.requires_grad
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)
        assert (m >= 0).all()
    for layer in w["decoder"]:
        sa = layer["self_attention"]
        upper = torch.ones(10, 10, dtype=torch.bool).triu(1)
        assert (sa[..., upper] == 0).all()
        assert (sa[..., ~upper] > 0).all()


def test_cross_attention_shape_when_t_differs_from_s(small: Transformer) -> None:
    enc, dec = small_inputs(b=3, s=(5, 1, 7), t=(4, 6))  # S=13, T=10
    _, w = small(enc, dec, return_attention_weights=True)
    assert w["encoder"][0]["self_attention"].shape == (3, 4, 13, 13)
    assert w["decoder"][1]["self_attention"].shape == (3, 4, 10, 10)
    assert w["decoder"][1]["cross_attention"].shape == (3, 4, 10, 13)


def test_sdpa_and_explicit_paths_give_same_output(small: Transformer) -> None:
    # Tolerance: float32, both paths compute softmax(QK^T/sqrt(d))V; they differ only in
    # summation order, ~1e-6 relative.
    enc, dec = small_inputs()
    with torch.no_grad():
        fast = small(enc, dec)
        small.enable_attention_storage()
        slow, _ = small(enc, dec, return_attention_weights=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_weights_without_storage_are_computed_for_that_call_only(small: Transformer) -> None:
    enc, dec = small_inputs()
    _, w = small(enc, dec, return_attention_weights=True)
    assert w["encoder"][0]["self_attention"] is not None
    # storage stayed off: nothing is kept on the modules
    assert all(m.attention_weights is None for m in small.attention_modules().values())
    assert all(not m.store_attention for m in small.attention_modules().values())


def test_storage_keeps_weights_and_disable_frees_them(small: Transformer) -> None:
    enc, dec = small_inputs()
    small.enable_attention_storage()
    small(enc, dec)
    kept = small.get_attention_weights()
    assert kept["decoder"][1]["cross_attention"].shape == (3, 4, 10, 13)
    small.disable_attention_storage()
    w = small.get_attention_weights()
    assert w["encoder"][0]["self_attention"] is None
    assert w["decoder"][1]["cross_attention"] is None


def test_training_step_with_storage_disabled() -> None:
    torch.manual_seed(0)
    model = Transformer(32, 40, 4, 1, 1, dropout=0.1, output_dim=3)
    model.train()
    enc, dec = small_inputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(enc, dec)
    assert out.shape == (3, 10, 3)
    loss = out.square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    opt.step()
    assert all(m.attention_weights is None for m in model.attention_modules().values())


def test_layout_reports_segments_and_labels(small: Transformer) -> None:
    enc, dec = guide_inputs(b=1, d=32)
    small2 = Transformer(32, 40, 4, 1, 1)
    small2(enc, dec)
    layout = small2.last_layout
    assert [(s.name, s.start, s.stop) for s in layout.encoder.segments] == [
        ("text", 0, 10),
        ("robot0_eef_pos", 10, 11),
        ("agentview_image", 11, 20),
        ("agentview_depth", 20, 29),
    ]
    assert layout.encoder.labels[14] == "agentview_image[3]"
    assert layout.encoder.labels[10] == "robot0_eef_pos"
    assert layout.decoder.length == 29
    assert small2.token_layout(enc, dec) == layout


@pytest.mark.parametrize(
    ("enc", "dec", "exc", "needle"),
    [
        ({"text": torch.randn(2, 5, 16)}, {"a": torch.randn(2, 3, 32)}, ShapeError, "'text'"),
        (
            {"text": torch.randn(2, 5, 32), "img": torch.randn(3, 4, 32)},
            {"a": torch.randn(2, 3, 32)},
            ShapeError,
            "['img'] has batch size 3",
        ),
        ({}, {"a": torch.randn(2, 3, 32)}, ShapeError, "empty"),
        ({"text": torch.randn(2, 41, 32)}, {"a": torch.randn(2, 3, 32)}, ShapeError, "40"),
        ({"text": [[1.0]]}, {"a": torch.randn(2, 3, 32)}, InputError, "'text'"),
        ({"text": torch.randn(2, 5, 32)}, torch.randn(2, 3, 32), InputError, "dict"),
        (
            {"text": torch.randn(5, 32)},
            {"a": torch.randn(2, 3, 32)},
            ShapeError,
            "(B, n_tokens, 32)",
        ),
        ({"text": torch.randn(2, 5, 32)}, {"a": torch.randn(3, 3, 32)}, ShapeError, "batch size"),
    ],
)
def test_bad_input_raises_named_error(small, enc, dec, exc, needle) -> None:
    with pytest.raises(exc) as info:
        small(enc, dec)
    assert isinstance(info.value, AttnscopeError)
    assert needle in str(info.value)


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        Transformer(30, 10, 4, 1, 1)
    with pytest.raises(ConfigError, match="dropout"):
        Transformer(32, 10, 4, 1, 1, dropout=1.5)
