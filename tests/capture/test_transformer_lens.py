"""TransformerLens models captured layer by layer, against ``run_with_cache``'s patterns.

Tiny random Hugging Face models (GPT-2, and Qwen2 / Llama with grouped-query attention) are
saved to a folder with an offline word-level tokenizer and booted as TransformerLens 4
``TransformerBridge``s (no downloads). Every stored array must equal
``cache["pattern", layer]`` exactly in float32 (bfloat16: the same bits), with padded rows
and columns stored as zeros, as in a Hugging Face capture of the same model and batch.
TransformerLens 3's ``HookedTransformer`` is tested where TransformerLens < 4 is installed.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from attnscope.capture.adapters import adapter_for
from attnscope.capture.job import capture
from attnscope.errors import CaptureError, ConfigError, InputError
from attnscope.store import open_archive

from .hf_models import make

transformers = pytest.importorskip("transformers")
transformer_lens = pytest.importorskip("transformer_lens")

WORDS = "the cat sat on a mat dog ran far away".split()
SENTENCES = ["the cat sat on a mat far away", "dog ran", "a cat ran on the mat"]
FAMILIES = ["gpt2", "qwen2", "llama_gqa"]


@pytest.fixture(autouse=True)
def quiet_hf():
    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A whitespace word-level tokenizer (pad 0, unk 1, eos 2 = bos) saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tok")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
        bos_token="<eos>",
    ).save_pretrained(folder)  # fmt: skip
    return folder


def tokenizer(tok_dir: Path, side: str = "right") -> Any:
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok.padding_side = side
    return tok


def bert_mlm() -> Any:
    """A 2-layer random BERT with its masked-LM head (what TransformerLens boots for BERT)."""
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).eval()


def bridge(family: str, tok_dir: Path, folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The family's tiny random model (seed 0), saved to ``folder`` and booted offline."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = bert_mlm() if family == "bert" else make(family)
    hf.save_pretrained(folder)
    b = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tokenizer(tok_dir))
    return b.to(dtype) if dtype != torch.float32 else b


def needs_tl4(why: str) -> None:
    """Skip where TransformerLens < 4 is installed (its bridge lacks what the test needs)."""
    if int(importlib.metadata.version("transformer-lens").split(".")[0]) < 4:
        pytest.skip(why)


def padded(tok_dir: Path, side: str, texts: list[str] = SENTENCES) -> dict[str, torch.Tensor]:
    enc = tokenizer(tok_dir, side)(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def patterns(model: Any, batch: Any) -> dict[int, np.ndarray]:
    """Layer -> ``run_with_cache``'s ``cache["pattern", layer]`` as float32 numpy."""
    if isinstance(batch, dict):
        ids, kw = batch["input_ids"], {"attention_mask": batch["attention_mask"]}
    else:
        ids, kw = batch, {}
    with torch.inference_mode():
        _, cache = model.run_with_cache(ids, **kw)
    return {i: cache["pattern", i].float().numpy() for i in range(model.cfg.n_layers)}


def as_stored(w: np.ndarray, mask: torch.Tensor | None) -> np.ndarray:
    """What a ragged archive stores: rows and columns of padding tokens are zeros."""
    if mask is None:
        return w
    m = mask.bool().numpy()
    return np.where(m[:, None, :, None] & m[:, None, None, :], w, 0).astype(np.float32)


def _stored(path: Path) -> dict[str, np.ndarray]:
    with open_archive(path) as a:
        return {n: a[n][:] for n in a.arrays}


def test_bridge_gpt2_stores_every_layer_pattern_and_tokens(tmp_path, tok_dir) -> None:
    model = bridge("gpt2", tok_dir, tmp_path / "m")
    ids = tokenizer(tok_dir)(["the cat sat on a mat", "dog ran far away a cat"],
                             return_tensors="pt")["input_ids"]  # fmt: skip
    want = patterns(model, ids)
    capture(model, [ids], tmp_path / "a.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "a.zarr") as a:
        assert a.arrays == ["decoder/0/self_attention", "decoder/1/self_attention"]
        assert not a.ragged
        for i in range(2):
            np.testing.assert_array_equal(a[f"decoder/{i}/self_attention"][:], want[i])
        labels, got_ids = a.tokens("decoder", 1)
        assert labels == ["dog", "ran", "far", "away", "a", "cat"]
        np.testing.assert_array_equal(got_ids, ids[1].numpy())
        assert a.layout.decoder.labels == ("the", "cat", "sat", "on", "a", "mat")
        cfg = a.metadata["model_config"]
        assert cfg["model"] == "transformer_lens.TransformerBridge"
        assert cfg["tl_config"]["n_layers"] == 2 and "device" not in cfg["tl_config"]
        assert cfg["hf_model"] == "transformers.GPT2LMHeadModel"
        assert cfg["hf_config"]["n_embd"] == 16
        prov = a.metadata["capture"]["provenance"]
        assert prov["model_class"].endswith("TransformerBridge")
        assert prov["attention_implementation"]["decoder/0/self_attention"].startswith(
            "TransformerLens hook_pattern"
        )


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bridge_padded_batches_equal_run_with_cache(tmp_path, tok_dir, family, side) -> None:
    model = bridge(family, tok_dir, tmp_path / "m")
    first = padded(tok_dir, side)
    second = padded(tok_dir, side, ["dog ran far", "a mat"])
    capture(model, [first, second], tmp_path / "a.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "a.zarr") as a:
        assert a.ragged and a.n_samples == 5
        np.testing.assert_array_equal(
            a.masks("decoder", slice(0, 3))[:, : first["input_ids"].shape[1]],
            first["attention_mask"].bool().numpy(),
        )
        for j, batch in enumerate([first, second]):
            want = patterns(model, batch)
            lo, t = 3 * j, batch["input_ids"].shape[1]
            for i in range(model.cfg.n_layers):
                got = a[f"decoder/{i}/self_attention"][lo : lo + len(batch["input_ids"])]
                assert not got[..., t:, :].any() and not got[..., t:].any()
                ref = as_stored(want[i], batch["attention_mask"])
                np.testing.assert_allclose(got[:, :, :t, :t], ref, rtol=0, atol=1e-7)
        labels, _ids = a.tokens("decoder", 1)
        assert [x for x, m in zip(labels, a.masks("decoder", 1)) if m] == ["dog", "ran"]


def test_compatibility_mode_bridge_equals_run_with_cache(tmp_path, tok_dir) -> None:
    """``enable_compatibility_mode()`` (HookedTransformer numerics: processed weights, hook
    aliases) is captured the same way."""
    model = bridge("qwen2", tok_dir, tmp_path / "m")
    model.enable_compatibility_mode()
    batch = padded(tok_dir, "left")
    want = patterns(model, batch)
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "a.zarr") as a:
        for i in range(2):
            ref = as_stored(want[i], batch["attention_mask"])
            np.testing.assert_array_equal(a[f"decoder/{i}/self_attention"][:], ref)


def test_bidirectional_bridge_is_an_encoder(tmp_path, tok_dir) -> None:
    needs_tl4("TransformerLens 3's bridge fires no hook_pattern for BERT")
    model = bridge("bert", tok_dir, tmp_path / "m")
    batch = padded(tok_dir, "right")
    want = patterns(model, batch)
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "a.zarr") as a:
        assert a.arrays == ["encoder/0/self_attention", "encoder/1/self_attention"]
        np.testing.assert_array_equal(a.masks("encoder"), batch["attention_mask"].bool().numpy())
        for i in range(2):
            ref = as_stored(want[i], batch["attention_mask"])
            np.testing.assert_array_equal(a[f"encoder/{i}/self_attention"][:], ref)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_right_padded_bridge_archive_equals_hugging_face_archive(tmp_path, tok_dir, family):
    """Same model, same right-padded batch: the TransformerLens and HF paths store the
    same masks, tokens and weights (padding zeroed the same way)."""
    batch = padded(tok_dir, "right")
    tok = tokenizer(tok_dir)
    capture(make(family), [batch], tmp_path / "hf.zarr", dtype="float32", tokenizer=tok,
            progress=False)  # fmt: skip
    model = bridge(family, tok_dir, tmp_path / "m")
    capture(model, [batch], tmp_path / "tl.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "hf.zarr") as h, open_archive(tmp_path / "tl.zarr") as t:
        assert h.arrays == t.arrays and h.ragged and t.ragged
        np.testing.assert_array_equal(h.masks("decoder"), t.masks("decoder"))
        assert h.labels("decoder") == t.labels("decoder")
        for n in h.arrays:
            np.testing.assert_allclose(t[n][:], h[n][:], rtol=0, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("family", ["t5_2enc_3dec", "t5_3enc_2dec"])
def test_encoder_decoder_bridge_equals_hugging_face_archive(tmp_path, tok_dir, family) -> None:
    """T5 (asymmetric depths), both sides padded: every kind, masks and tokens as the HF path
    stores them, and equal to run_with_cache's patterns."""
    needs_tl4("TransformerLens 3's bridge of T5 fails in its forward")
    batch = padded(tok_dir, "right")
    dec = padded(tok_dir, "right", ["a dog", "the cat sat on", "ran"])
    batch.update(decoder_input_ids=dec["input_ids"], decoder_attention_mask=dec["attention_mask"])
    tok = tokenizer(tok_dir)
    capture(make(family), [batch], tmp_path / "hf.zarr", dtype="float32", tokenizer=tok,
            progress=False)  # fmt: skip
    model = bridge(family, tok_dir, tmp_path / "m")
    capture(model, [batch], tmp_path / "tl.zarr", dtype="float32", progress=False)
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch["input_ids"], **{k: v for k, v in batch.items()
                                                              if k != "input_ids"})  # fmt: skip
    with open_archive(tmp_path / "hf.zarr") as h, open_archive(tmp_path / "tl.zarr") as t:
        assert h.arrays == t.arrays
        n_enc, n_dec = len(t.layers["encoder"]), len(t.layers["decoder"])
        assert (n_enc, n_dec) == {"t5_2enc_3dec": (2, 3), "t5_3enc_2dec": (3, 2)}[family]
        for side in ("encoder", "decoder"):
            np.testing.assert_array_equal(h.masks(side), t.masks(side))
            assert h.labels(side) == t.labels(side)
        for n in h.arrays:
            np.testing.assert_allclose(t[n][:], h[n][:], rtol=0, atol=1e-6, err_msg=n)
        em, dm = batch["attention_mask"].bool().numpy(), dec["attention_mask"].bool().numpy()
        cross = t["decoder/1/cross_attention"][:]
        want = cache["decoder_blocks.1.cross_attn.hook_pattern"].numpy()
        np.testing.assert_array_equal(
            cross, np.where(dm[:, None, :, None] & em[:, None, None, :], want, 0)
        )


def test_layers_heads_topk_select_from_the_patterns(tmp_path, tok_dir) -> None:
    model = bridge("qwen2", tok_dir, tmp_path / "m")
    batch = padded(tok_dir, "left")
    want = patterns(model, batch)
    capture(model, [batch], tmp_path / "sel.zarr", layers=[1], heads=[3, 0], dtype="float32",
            progress=False)  # fmt: skip
    capture(model, [batch], tmp_path / "top.zarr", topk=2, dtype="float32", progress=False)
    with open_archive(tmp_path / "sel.zarr") as a:
        assert a.arrays == ["decoder/1/self_attention"]
        assert a.heads["decoder/1/self_attention"] == (3, 0)
        ref = as_stored(want[1], batch["attention_mask"])[:, [3, 0]]
        np.testing.assert_array_equal(a["decoder/1/self_attention"][:], ref)
    with open_archive(tmp_path / "top.zarr") as a:
        vals, _idx, _rest = a["decoder/0/self_attention"].topk_arrays()
        ref = np.sort(as_stored(want[0], batch["attention_mask"]), axis=-1)[..., ::-1][..., :2]
        real = batch["attention_mask"].bool().numpy()[:, None, :].repeat(4, 1)  # (B, H, T)
        np.testing.assert_allclose(vals[real], ref[real], rtol=0, atol=1e-7)


def test_bfloat16_bridge_stores_the_patterns_bits(tmp_path, tok_dir) -> None:
    model = bridge("llama_gqa", tok_dir, tmp_path / "m", dtype=torch.bfloat16)
    batch = padded(tok_dir, "right")
    want = patterns(model, batch)  # bf16 patterns, widened to float32 exactly
    capture(model, [batch], tmp_path / "a.zarr", dtype="bfloat16", progress=False)
    with open_archive(tmp_path / "a.zarr") as a:
        assert a.dtype == "bfloat16"
        assert a.metadata["capture"]["provenance"]["compute_dtype"] == "bfloat16"
        for i in range(2):
            got = np.asarray(a[f"decoder/{i}/self_attention"][:], dtype=np.float32)
            np.testing.assert_array_equal(got, as_stored(want[i], batch["attention_mask"]))


def test_resume_continues_a_bridge_capture(tmp_path, tok_dir) -> None:
    model = bridge("gpt2", tok_dir, tmp_path / "m")
    batches = [padded(tok_dir, "right"), padded(tok_dir, "right", ["dog ran far", "a mat"])]
    capture(model, batches, tmp_path / "full.zarr", dtype="float32", max_length=12,
            progress=False)  # fmt: skip
    capture(model, batches[:1], tmp_path / "r.zarr", dtype="float32", max_length=12,
            progress=False)  # fmt: skip
    s = capture(model, batches, tmp_path / "r.zarr", dtype="float32", max_length=12,
                resume=True, progress=False)  # fmt: skip
    assert (s.samples, s.committed) == (2, 5)  # only the second batch ran
    full, resumed = _stored(tmp_path / "full.zarr"), _stored(tmp_path / "r.zarr")
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])
    with pytest.raises(ConfigError, match="heads"):
        capture(model, batches, tmp_path / "r.zarr", dtype="float32", max_length=12,
                heads=[0], resume=True, progress=False)  # fmt: skip


def test_hooks_are_removed_and_no_cache_is_kept(tmp_path, tok_dir) -> None:
    model = bridge("gpt2", tok_dir, tmp_path / "m")
    seen: list[tuple[str, tuple[int, ...]]] = []

    def sink(name: str, w: torch.Tensor) -> None:
        # layer by layer: when layer 0's pattern arrives, layer 1 has not run yet
        seen.append((name, tuple(w.shape)))

    adapter = adapter_for(model)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with torch.inference_mode():
        adapter.run(ids, sink, {"decoder/1/self_attention", "decoder/0/self_attention"})
    assert seen == [("decoder/0/self_attention", (2, 2, 4, 4)),
                    ("decoder/1/self_attention", (2, 2, 4, 4))]  # fmt: skip
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


class _NoPatterns(transformer_lens.HookedRootModule):
    """A TransformerLens module with hook points but no attention pattern."""

    def __init__(self) -> None:
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.cfg = type("Cfg", (), {"n_layers": 1})()
        self.hook_embed = HookPoint()
        self.setup()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_embed(x)


class _SilentPattern(transformer_lens.HookedRootModule):
    """Has ``blocks.0.attn.hook_pattern`` but its forward never reaches it."""

    def __init__(self) -> None:
        super().__init__()
        from transformer_lens.hook_points import HookPoint

        self.cfg = type("Cfg", (), {"n_layers": 1})()
        attn = torch.nn.Module()
        attn.hook_pattern = HookPoint()
        block = torch.nn.Module()
        block.attn = attn
        self.blocks = torch.nn.ModuleList([block])
        self.proj = torch.nn.Linear(2, 2)
        self.setup()

    def forward(self, x: torch.Tensor, return_type: Any = None) -> torch.Tensor:
        return self.proj(x.float())


class _NoConfig(transformer_lens.HookedRootModule):
    """A TransformerLens module without ``cfg``."""

    def __init__(self) -> None:
        super().__init__()
        self.setup()


def test_refusals_name_what_was_given_and_expected(tmp_path, tok_dir) -> None:
    with pytest.raises(CaptureError, match=r"_NoConfig \(a TransformerLens model\): expected a "
                       r"TransformerBridge, HookedTransformer or HookedEncoder with cfg.n_layers"):
        adapter_for(_NoConfig())
    t5 = bridge("t5_2enc_3dec", tok_dir, tmp_path / "t5")
    with pytest.raises(InputError, match="encoder-decoder model: a batch needs 'decoder_input_"):
        capture(t5, [padded(tok_dir, "right")], tmp_path / "t5.zarr", progress=False)
    with pytest.raises(CaptureError, match=r"_NoPatterns \(a TransformerLens model\).*"
                       r"blocks.<layer>.attn.hook_pattern.*missing \['blocks.0.attn"):
        capture(_NoPatterns(), [torch.zeros(1, 2)], tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(CaptureError, match=r"_SilentPattern: hook point\(s\) "
                       r"\['blocks.0.attn.hook_pattern'\] did not fire"):  # fmt: skip
        capture(_SilentPattern(), [torch.zeros(1, 2, dtype=torch.long)], tmp_path / "y.zarr",
                progress=False)  # fmt: skip
    model = bridge("gpt2", tok_dir, tmp_path / "m")
    with pytest.raises(InputError, match="tensor of token ids or a dict with 'input_ids'.*list"):
        capture(model, [["the cat"]], tmp_path / "s.zarr", progress=False)
    bad = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    with pytest.raises(InputError, match=r"attention_mask has shape \(2, 3\) but input_ids has"):
        capture(model, [bad], tmp_path / "m.zarr", progress=False)
    with pytest.raises(ConfigError, match="generate= is not supported for TransformerBridge"):
        capture(model, [bad], tmp_path / "g.zarr", generate={"max_new_tokens": 2},
                progress=False)  # fmt: skip


def _hooked_transformer(tok_dir: Path) -> Any:
    """A TransformerLens 3 HookedTransformer (GQA, rotary), random weights, seed 0."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("HookedTransformer needs transformer-lens < 4 (removed in 4.0)")
    tok = tokenizer(tok_dir)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, n_key_value_heads=2,
        d_vocab=len(tok), act_fn="gelu", positional_embedding_type="rotary",
        normalization_type="RMS", seed=0,
    )  # fmt: skip
    with pytest.warns(DeprecationWarning):
        return HookedTransformer(cfg, tokenizer=tok).eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_hooked_transformer_padded_equals_run_with_cache(tmp_path, tok_dir, side) -> None:
    model = _hooked_transformer(tok_dir)
    batch = padded(tok_dir, side)
    want = patterns(model, batch)
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "a.zarr") as a:
        assert a.metadata["model_config"]["model"] == "transformer_lens.HookedTransformer"
        assert a.ragged
        for i in range(2):
            ref = as_stored(want[i], batch["attention_mask"])
            np.testing.assert_array_equal(a[f"decoder/{i}/self_attention"][:], ref)
        labels, _ids = a.tokens("decoder", 0)
        assert labels[:3] == ["the", "cat", "sat"] or labels[-3:] == ["mat", "far", "away"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_hooked_encoder_takes_the_mask_as_one_zero_attention_mask(tmp_path, tok_dir, side):
    try:
        from transformer_lens import HookedEncoder, HookedTransformerConfig
    except ImportError:
        pytest.skip("HookedEncoder needs transformer-lens < 4 (removed in 4.0)")
    tok = tokenizer(tok_dir)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=16, d_head=8, n_heads=2,
                                  d_vocab=len(tok), act_fn="gelu", attention_dir="bidirectional",
                                  seed=0)  # fmt: skip
    model = HookedEncoder(cfg, tokenizer=tok).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # HookedEncoder leaves its weights uninitialised
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    batch = padded(tok_dir, side)
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            batch["input_ids"], one_zero_attention_mask=batch["attention_mask"]
        )
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "a.zarr") as a:
        assert a.arrays == ["encoder/0/self_attention", "encoder/1/self_attention"]
        for i in range(2):
            ref = as_stored(cache["pattern", i].numpy(), batch["attention_mask"])
            np.testing.assert_array_equal(a[f"encoder/{i}/self_attention"][:], ref)


def test_bertviz_export_of_a_bridge_capture_is_the_real_tokens_pattern(tmp_path, tok_dir):
    from attnscope.interop.bertviz import bertviz_arrays

    model = bridge("qwen2", tok_dir, tmp_path / "m")
    batch = padded(tok_dir, "left")
    want = patterns(model, batch)
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", progress=False)
    got = bertviz_arrays(tmp_path / "a.zarr", 1)
    real = np.flatnonzero(batch["attention_mask"][1].numpy())
    assert got.tokens == {"tokens": ["dog", "ran"]} and got.layers == {"attention": [0, 1]}
    for i in range(2):
        np.testing.assert_array_equal(got.attention["attention"][i][0],
                                      want[i][1][:, real][:, :, real])  # fmt: skip
