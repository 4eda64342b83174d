"""Capture from Hugging Face transformers models built from small configs (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.capture.hf_blocks import IMPL
from attnscope.capture.job import capture
from attnscope.store import open_archive

transformers = pytest.importorskip("transformers")


@pytest.fixture
def quiet_hf():
    transformers.logging.set_verbosity_error()
    yield


def test_hf_encoder_only_with_tokenizer_labels(tmp_path, quiet_hf) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).eval()

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"tok{i}" for i in ids]

    ids = torch.randint(0, 50, (2, 6))
    capture(bert, [{"input_ids": ids}], tmp_path / "bert.zarr", tokenizer=Tok(), progress=False)
    with open_archive(tmp_path / "bert.zarr") as a:
        assert a.arrays == ["encoder/0/self_attention", "encoder/1/self_attention"]
        assert list(a.layout.encoder.labels) == [f"tok{i}" for i in ids[0].tolist()]
        bert.set_attn_implementation("eager")  # capture restored the model's own setting
        want = bert(input_ids=ids, output_attentions=True).attentions[1].detach().numpy()
        np.testing.assert_allclose(a["encoder/1/self_attention"][:], want, atol=1e-3)


def test_hf_decoder_only_is_causal(tmp_path, quiet_hf) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    ).eval()
    capture(gpt, [{"input_ids": torch.randint(0, 50, (2, 6))}], tmp_path / "g.zarr", progress=False)
    with open_archive(tmp_path / "g.zarr") as a:
        assert a.arrays == ["decoder/0/self_attention", "decoder/1/self_attention"]
        x = a["decoder/0/self_attention"][:]
        assert (x[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0).all()


def test_hf_encoder_decoder_cross_attention(tmp_path, quiet_hf) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(
        vocab_size=50,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    bart = BartForConditionalGeneration(cfg).eval()
    batch = {
        "input_ids": torch.randint(3, 50, (2, 7)),
        "decoder_input_ids": torch.randint(3, 50, (2, 4)),
    }
    capture(bart, [batch], tmp_path / "b.h5", progress=False)
    with open_archive(tmp_path / "b.h5") as a:
        assert a.arrays == [
            "encoder/0/self_attention",
            "decoder/0/self_attention",
            "decoder/0/cross_attention",
        ]
        assert a["decoder/0/cross_attention"].shape == (2, 2, 4, 7)


def test_hf_model_gets_its_attention_implementation_back(tmp_path, quiet_hf) -> None:
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
    ).eval()
    bert.set_attn_implementation("sdpa")
    capture(
        bert, [{"input_ids": torch.randint(0, 50, (2, 5))}], tmp_path / "b.zarr", progress=False
    )
    assert bert.config._attn_implementation == "sdpa"


# -- layer by layer, the fast path for unselected layers, restoring the model ---------------


def _impl_seen(module) -> list:
    """Forward pre-hook recording which attention implementation a module sees."""
    seen: list = []
    module.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    return seen


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama_gqa", "bart", "vit"])
def test_selected_layer_is_eager_and_the_others_stay_on_sdpa(tmp_path, quiet_hf, family):
    from attnscope.capture.adapters import adapter_for

    from .hf_models import as_stored, batch_for, make, reference_attentions

    model = make(family)
    adapter = adapter_for(model)
    sites = {n: s.module for n, s in adapter.sites.items()}
    adapter.close()
    inner = {}
    for name, mod in sites.items():
        for m in mod.modules():
            if "config" in m.__dict__:
                inner[name] = m
                break
    seen = {name: _impl_seen(m) for name, m in inner.items()}
    batch = batch_for(family, model)
    stack = next(iter(sites)).split("/")[0]
    capture(model, [batch], tmp_path / "a.zarr", layers=[1], dtype="float32", progress=False)
    # selected: eager, or the query-block implementation (eager while a layer fits a block)
    selected = (["eager"], [IMPL])
    for name, impls in seen.items():
        assert impls in selected if name.split("/")[1] == "1" else impls == ["sdpa"], name
    for m in inner.values():  # every module gets its own config object back
        assert m.config._attn_implementation == "sdpa"
    want = reference_attentions(model, batch)
    with open_archive(tmp_path / "a.zarr") as a:
        assert all(n.split("/")[1] == "1" for n in a.arrays)
        # layer 0 ran the fused kernel: its output differs from eager by float rounding only
        got = a[f"{stack}/1/self_attention"][:]
        np.testing.assert_allclose(got, as_stored(model, batch, want)[f"{stack}/1/self_attention"],
                                   atol=1e-5)  # fmt: skip


def test_each_layer_leaves_the_model_before_the_next_one_runs(quiet_hf) -> None:
    from attnscope.capture.adapters import adapter_for

    from .hf_models import batch_for, make

    model = make("llama_gqa")
    adapter = adapter_for(model)
    events: list[str] = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a: events.append("layer 1 starts"))
    try:
        with torch.inference_mode():
            adapter.run(batch_for("llama_gqa", model), lambda n, w: events.append(n),
                        set(adapter.names()))  # fmt: skip
    finally:
        adapter.close()
    assert events == ["decoder/0/self_attention", "layer 1 starts", "decoder/1/self_attention"]


def test_model_output_keeps_no_weights_and_sdpa_output_attentions_is_empty(quiet_hf) -> None:
    """What the docs say: after capture an sdpa model's output_attentions=True returns ()."""
    from attnscope.capture.adapters import adapter_for

    from .hf_models import batch_for, make

    model = make("bert")
    batch = batch_for("bert", model)
    adapter = adapter_for(model)
    got: dict = {}
    try:
        with torch.inference_mode():
            adapter.run(batch, got.__setitem__, set(adapter.names()))
    finally:
        adapter.close()
    assert sorted(got) == adapter.names()
    with torch.inference_mode():
        out = model(**batch, output_attentions=True)
    assert model.config._attn_implementation == "sdpa"
    assert out.attentions == ()


def test_masks_and_tokens_report_padding_and_labels(quiet_hf) -> None:
    from attnscope.capture.adapters import adapter_for

    from .hf_models import batch_for, make

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    for family, sides in [("bert", {"encoder"}), ("gpt2", {"decoder"}),
                          ("bart", {"encoder", "decoder"}), ("vit", set())]:  # fmt: skip
        model = make(family)
        batch = batch_for(family, model)
        adapter = adapter_for(model, tokenizer=Tok())
        adapter.close()
        masks = adapter.masks(batch) or {}
        assert set(masks) == sides, family
        toks = adapter.tokens(batch) or {}
        assert set(toks) == sides, family
        if family in ("bert", "gpt2"):
            side = sides.pop()
            np.testing.assert_array_equal(masks[side], batch["attention_mask"].numpy() == 1)
            assert masks[side].dtype == bool
            np.testing.assert_array_equal(toks[side]["ids"], batch["input_ids"].numpy())
            assert toks[side]["labels"][1] == [f"t{i}" for i in batch["input_ids"][1].tolist()]
    no_tok = adapter_for(make("bert"))
    no_tok.close()
    assert no_tok.tokens(batch_for("bert", make("bert"))) is None


def test_legacy_family_falls_back_to_output_attentions(tmp_path, quiet_hf) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    from attnscope.capture.adapters import adapter_for

    from .hf_models import reference_attentions

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=16, n_layer=2, n_head=2))
    adapter = adapter_for(model.eval())
    adapter.close()
    assert not adapter.layer_by_layer  # BLOOM lists no attention sites in transformers
    batch = {"input_ids": torch.randint(0, 100, (2, 5))}
    capture(model, [batch], tmp_path / "b.zarr", dtype="float32", progress=False)
    want = reference_attentions(model, batch)
    with open_archive(tmp_path / "b.zarr") as a:
        for name in a.arrays:
            np.testing.assert_allclose(a[name][:], want[name].numpy(), atol=1e-6)


def test_model_without_attention_is_refused_naming_it(tmp_path, quiet_hf) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    from attnscope.errors import CaptureError

    model = MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                         state_size=4)).eval()  # fmt: skip
    with pytest.raises(CaptureError, match="cannot observe attention in MambaForCausalLM") as e:
        capture(model, [{"input_ids": torch.zeros(1, 3, dtype=torch.long)}],
                tmp_path / "m.zarr", progress=False)  # fmt: skip
    assert "subclass attnscope.capture.adapters.Adapter" in str(e.value)
    assert not (tmp_path / "m.zarr").exists()
