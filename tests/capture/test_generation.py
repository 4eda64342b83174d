"""Generation capture: each sample's matrix equals a forward pass over its generated ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.capture import Transformer
from attnscope.capture.job import capture
from attnscope.errors import AttnscopeError, ConfigError
from attnscope.store import open_archive

from . import hf_models
from .hf_models import make, reference_attentions

transformers = pytest.importorskip("transformers")

N_NEW = 5


@pytest.fixture(autouse=True)
def quiet_hf():
    transformers.logging.set_verbosity_error()


def _prompts(enc_dec: bool, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if enc_dec:
        mask[1, 4:] = 0  # encoder input, right padded
    else:
        mask[1, :2] = 0  # decoder-only prompts are left padded, as generate expects
    return {"input_ids": ids, "attention_mask": mask}


def _forward_over(model, prompts: dict, seq: torch.Tensor) -> tuple[dict, np.ndarray]:
    """The model's own attention over the final ids, and which query rows are real tokens."""
    if model.config.is_encoder_decoder:
        batch = {**prompts, "decoder_input_ids": seq}
        real = {"encoder": prompts["attention_mask"].bool().numpy()}
        real["decoder"] = np.ones(tuple(seq.shape), dtype=bool)
    else:
        mask = prompts["attention_mask"]
        full = torch.cat([mask, mask.new_ones((2, seq.shape[1] - mask.shape[1]))], dim=1)
        # positions as generate makes them for left-padded prompts
        batch = {"input_ids": seq, "attention_mask": full,
                 "position_ids": (full.cumsum(-1) - 1).masked_fill(full == 0, 0)}  # fmt: skip
        real = {"decoder": full.bool().numpy()}
    return reference_attentions(model, batch), real


def _check(path, model, prompts: dict, summary, atol: float) -> None:
    seq = torch.tensor([g["ids"] for g in summary.generated])
    want, real = _forward_over(model, prompts, seq)
    with open_archive(path) as a:
        assert set(a.arrays) == set(want)
        for name in a.arrays:
            got, ref = a[name][:], want[name].float().numpy()
            assert got.shape == ref.shape, name
            # rows of padding queries attend to nothing real: generate and a full forward
            # spread them differently; every real token's row must match
            q = name.split("/")[0] if "cross" not in name else "decoder"
            k = "encoder" if name.startswith("encoder") or "cross" in name else "decoder"
            # the archive marks the tokens after a sample's EOS as padding: their rows and
            # columns are stored as zeros
            qm, km = a.masks(q), a.masks(k)
            rows = real[q] & qm
            diff = np.abs(got - ref).max(axis=(1, 3))  # (B, T)
            assert diff[rows].max() <= atol, name
            cells = qm[:, None, :, None] & km[:, None, None, :]
            assert (got[np.broadcast_to(~cells, got.shape)] == 0).all(), name


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "qwen2", "bart", "t5"])
def test_generation_equals_forward_over_generated_ids(tmp_path, family, sample) -> None:
    model = _model(family)
    prompts = _prompts(model.config.is_encoder_decoder)
    torch.manual_seed(7)
    summary = capture(
        model, [prompts], tmp_path / "g.zarr", progress=False,
        generate=dict(max_new_tokens=N_NEW, do_sample=sample, top_k=0),
    )  # fmt: skip
    assert len(summary.generated) == 2
    _check(tmp_path / "g.zarr", model, prompts, summary, atol=1e-3)  # float16 storage
    rec = summary.generated[0]
    length = rec["prompt_length"] + N_NEW
    assert len(rec["ids"]) == length
    with open_archive(tmp_path / "g.zarr") as a:
        assert a["decoder/0/self_attention"].shape[-2:] == (length, length)
        if model.config.is_encoder_decoder:
            assert a["decoder/1/cross_attention"].shape[-2:] == (length, 6)


def _model(family: str):
    if family == "t5":  # transformers' generate cannot cache T5 with more decoder layers
        torch.manual_seed(0)
        return hf_models.t5(2, 2).eval()
    return make(family)


def test_greedy_capture_generates_what_generate_does(tmp_path) -> None:
    model = _model("llama_gqa")
    prompts = _prompts(False)
    summary = capture(model, [prompts], tmp_path / "g.zarr", progress=False,
                      generate=dict(max_new_tokens=N_NEW))  # fmt: skip
    with torch.inference_mode():
        plain = model.generate(**prompts, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    assert [g["ids"] for g in summary.generated] == plain.tolist()


def test_seeded_sampling_repeats(tmp_path) -> None:
    model = _model("gpt2")
    prompts = _prompts(False)
    runs = []
    for i in range(2):
        torch.manual_seed(3)
        s = capture(model, [prompts], tmp_path / f"s{i}.zarr", progress=False,
                    generate=dict(max_new_tokens=N_NEW, do_sample=True, top_k=0))  # fmt: skip
        runs.append([g["ids"] for g in s.generated])
    assert runs[0] == runs[1]


class _StopAfter(transformers.LogitsProcessor):
    """Force EOS as the ``k``-th generated token of every sample."""

    def __init__(self, prompt_len: int, k: int, eos: int) -> None:
        self.at, self.eos = prompt_len + k - 1, eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.eos] = 0
        return scores


def test_early_eos_is_padded_to_the_full_length_and_masked(tmp_path) -> None:
    from attnscope.capture.adapters import adapter_for

    model = _model("gpt2")
    prompts = _prompts(False)
    stop = transformers.LogitsProcessorList([_StopAfter(6, 2, eos=0)])
    summary = capture(model, [prompts], tmp_path / "e.zarr", progress=False,
                      generate=dict(max_new_tokens=N_NEW, logits_processor=stop))  # fmt: skip
    assert [g["new_tokens"] for g in summary.generated] == [2, 2]
    assert all(len(g["ids"]) == 6 + N_NEW for g in summary.generated)
    _check(tmp_path / "e.zarr", model, prompts, summary, atol=1e-3)
    adapter = adapter_for(model)
    try:
        adapter.prepare_generation(dict(max_new_tokens=N_NEW, logits_processor=stop))
        adapter.run(prompts, lambda n, w: None, {"decoder/0/self_attention"})
        mask = adapter.masks(prompts)["decoder"]
    finally:
        adapter.close()
    assert mask.shape == (2, 6 + N_NEW)
    np.testing.assert_array_equal(mask[:, 6:], [[True, True, False, False, False]] * 2)
    np.testing.assert_array_equal(mask[1, :2], [False, False])  # the prompt's own padding


def test_generation_text_and_tokens_come_from_the_tokenizer(tmp_path) -> None:
    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"t{i}" for i in ids)

    model = _model("bart")
    prompts = _prompts(True)
    summary = capture(model, [prompts], tmp_path / "t.zarr", progress=False, tokenizer=Tok(),
                      generate=dict(max_new_tokens=3, min_new_tokens=3))  # fmt: skip
    rec = summary.generated[0]
    assert rec["text"] == " ".join(f"t{i}" for i in rec["ids"][1:])
    with open_archive(tmp_path / "t.zarr") as a:
        labels, ids = a.tokens("decoder", 0)
        assert labels == [f"t{i}" for i in rec["ids"]]  # prompt (start token) + generated
        assert ids.tolist() == rec["ids"]
        assert a.layout.encoder.length == 6


@pytest.mark.parametrize(
    ("family", "options", "expected"),
    [
        ("bert", dict(max_new_tokens=3), "BertModel is an encoder-only model"),
        ("gpt2", dict(max_new_tokens=0), "max_new_tokens, an integer >= 1, got 0 (model GPT2"),
        ("gpt2", dict(max_new_tokens=-2), "got -2 (model GPT2LMHeadModel)"),
        ("gpt2", dict(max_new_tokens="4"), "got '4' (model GPT2LMHeadModel)"),
        ("gpt2", dict(do_sample=True), "needs max_new_tokens"),
        ("gpt2", dict(max_new_tokens=3, num_beams=2), "num_beams=2 is not supported"),
        ("gpt2", dict(max_new_tokens=3, max_length=9), "not max_length"),
        ("bart", dict(max_new_tokens=3, cache_implementation="static"), "cache_implementation"),
    ],
)
def test_bad_generate_options_name_the_model_and_the_fix(tmp_path, family, options, expected):
    model = _model(family)
    batch = _prompts(family == "bart")
    with pytest.raises(ConfigError, match="generate") as e:
        capture(model, [batch], tmp_path / "x.zarr", progress=False, generate=options)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.zarr").exists()  # refused before the model ran


def test_generate_on_a_model_without_lm_head_or_generation(tmp_path) -> None:
    base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=1,
                                                          n_head=2))  # fmt: skip
    with pytest.raises(ConfigError, match="GPT2Model has no language-model head"):
        capture(base.eval(), [_prompts(False)], tmp_path / "x.zarr", progress=False,
                generate=dict(max_new_tokens=2))  # fmt: skip
    torch.manual_seed(0)
    ref = Transformer(32, 16, 4, 1, 1).eval()
    with pytest.raises(AttnscopeError, match="not supported for Transformer"):
        capture(ref, [], tmp_path / "y.zarr", progress=False, generate=dict(max_new_tokens=2))
    with pytest.raises(ConfigError, match="generate must be a dict"):
        capture(ref, [], tmp_path / "y.zarr", progress=False, generate=4)  # type: ignore[arg-type]


def test_resume_refuses_other_generate_options(tmp_path) -> None:
    model = _model("gpt2")
    prompts = _prompts(False)
    capture(model, [prompts], tmp_path / "r.zarr", progress=False,
            generate=dict(max_new_tokens=3))  # fmt: skip
    with pytest.raises(ConfigError, match="generate options differ"):
        capture(model, [prompts, prompts], tmp_path / "r.zarr", progress=False, resume=True,
                generate=dict(max_new_tokens=4))  # fmt: skip


def test_generation_with_token_type_ids_equals_forward_over_final_sequences(tmp_path) -> None:
    # a BERT-style tokenizer gives token_type_ids with a causal LM; generate continues them
    # with their last column, and so must the final forward (the last token's row)
    model = _model("gpt2")
    prompts = _prompts(False)
    types = torch.zeros_like(prompts["input_ids"])
    types[:, 3:] = 1
    prompts["token_type_ids"] = types
    summary = capture(model, [prompts], tmp_path / "t.zarr", progress=False, dtype="float32",
                      generate=dict(max_new_tokens=N_NEW))  # fmt: skip
    seq = torch.tensor([g["ids"] for g in summary.generated])
    mask = prompts["attention_mask"]
    extra = seq.shape[1] - mask.shape[1]
    full = torch.cat([mask, mask.new_ones((2, extra))], dim=1)
    batch = {
        "input_ids": seq,
        "attention_mask": full,
        "position_ids": (full.cumsum(-1) - 1).masked_fill(full == 0, 0),
        "token_type_ids": torch.cat([types, types[:, -1:].expand(-1, extra)], dim=1),
    }
    want = reference_attentions(model, batch)  # fmt: skip
    real = full.bool().numpy()
    with open_archive(tmp_path / "t.zarr") as a:
        for name in a.arrays:
            got, ref = a[name][:], want[name].float().numpy()
            diff = np.abs(got - ref).max(axis=(1, 3))  # (B, T)
            assert diff[real].max() <= 1e-5, name
            assert diff[:, -1].max() <= 1e-5, name  # the row of the final forward
