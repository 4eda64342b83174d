"""Capture from Hugging Face transformers models built from small configs (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
        assert a.arrays() == ["encoder/0/self_attention", "encoder/1/self_attention"]
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
        assert a.arrays() == ["decoder/0/self_attention", "decoder/1/self_attention"]
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
        assert a.arrays() == [
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
