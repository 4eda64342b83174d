"""Stored samples handed to BertViz: what ``head_view`` / ``model_view`` embed in their HTML
must be the sample's stored weights over its real tokens, labelled with its own tokens."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnscope.errors import MissingExtraError, SelectionError
from attnscope.interop.bertviz import bertviz_arrays, bertviz_kwargs, head_view, model_view
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

pytest.importorskip("bertviz")
pytest.importorskip("torch")

HEADS, ENC_MAX, DEC_MAX = 3, 7, 5
DEC_ONLY = TokenLayout(decoder=SideLayout.from_lengths({"text": DEC_MAX}))
ENC_DEC = TokenLayout(SideLayout.from_lengths({"text": ENC_MAX}),
                      SideLayout.from_lengths({"text": DEC_MAX}))  # fmt: skip
SELF = ["decoder/0/self_attention", "decoder/1/self_attention"]
ENC, DEC = "encoder/0/self_attention", "decoder/0/self_attention"
CROSS = "decoder/0/cross_attention"
# decoder masks of 4 samples: none, right, left and middle padding
DEC_MASKS = np.array([[1] * 5, [1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 1, 0]], bool)
ENC_MASKS = np.array([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1], [1] * 7], bool)


def _soft(rng: np.random.Generator, shape: tuple[int, ...], keys: np.ndarray) -> np.ndarray:
    x = np.exp(rng.normal(size=shape)) * keys[:, None, None, :]
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def _labels(masks: np.ndarray, tag: str) -> list[list[str]]:
    return [[f"{tag}{i}.{j}" if m else "<pad>" for j, m in enumerate(row)]
            for i, row in enumerate(masks)]  # fmt: skip


def _key_side(name: str) -> str:
    stack, _layer, kind = name.split("/")
    return "decoder" if (stack, kind) == ("decoder", "self_attention") else "encoder"


def _write(path: Path, layout: TokenLayout, names: list[str], *, labels: bool = True,
           dtype: str = "float32", **spec) -> Path:  # fmt: skip
    """Two batches of two samples, ragged; weights are softmax rows over real keys."""
    rng = np.random.default_rng(3)
    masks = {"decoder": DEC_MASKS, "encoder": ENC_MASKS}
    sides = [s for s in ("encoder", "decoder") if getattr(layout, s) is not None]
    most = {s: getattr(layout, s).length for s in sides}
    with ArchiveWriter.create(path, layout, dtype=dtype, max_lengths=most, **spec) as w:
        for lo in (0, 2):
            weights = {}
            for n in names:
                q = DEC_MAX if n.startswith("decoder") else ENC_MAX
                keys = masks[_key_side(n)][lo : lo + 2]
                h = len(spec["heads"][n]) if "heads" in spec else HEADS
                weights[n] = _soft(rng, (2, h, q, keys.shape[1]), keys)
            toks = {s: {"labels": _labels(masks[s], s[0])[lo : lo + 2]} for s in sides}
            w.append(weights, masks={s: masks[s][lo : lo + 2] for s in sides},
                     tokens=toks if labels else None)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def dec_only(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("bv") / "d.zarr", DEC_ONLY, SELF)


@pytest.fixture(scope="module")
def enc_dec(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("bv") / "ed.h5", ENC_DEC, [ENC, DEC, CROSS])


def _params(html) -> dict:
    """The parameters BertViz embedded in the JavaScript of its returned HTML."""
    m = re.search(r"const params = (\{.*?\}); // HACK", html.data, re.S)
    assert m is not None
    return json.loads(m.group(1))


def _real(path: Path, name: str, i: int) -> np.ndarray:
    """Stored weights of sample ``i`` over its real tokens, read independently."""
    with open_archive(path) as a:
        w = a[name][i]
        return w[:, a.masks(name.split("/")[0], i)][:, :, a.masks(_key_side(name), i)]


@pytest.mark.parametrize("sample", [0, 1, 2, 3])
@pytest.mark.parametrize("view", [head_view, model_view])
def test_decoder_only_view_embeds_the_stored_real_tokens(dec_only, view, sample) -> None:
    p = _params(view(dec_only, sample, html_action="return"))
    (group,) = p["attention"]
    real = DEC_MASKS[sample]
    want_tokens = [f"d{sample}.{j}" for j in np.flatnonzero(real)]
    assert group["left_text"] == want_tokens and group["right_text"] == want_tokens
    assert len(group["attn"]) == 2  # layers
    for layer, name in enumerate(SELF):
        got = np.array(group["attn"][layer], dtype=np.float64)
        want = _real(dec_only, name, sample).astype(np.float64)
        assert got.shape == (HEADS, real.sum(), real.sum())
        np.testing.assert_array_equal(got, want)  # float32 values through JSON, exactly


@pytest.mark.parametrize("view", [head_view, model_view])
def test_encoder_decoder_view_uses_bertviz_encoder_decoder_cross_arguments(enc_dec, view):
    sample = 1
    p = _params(view(enc_dec, sample, html_action="return"))
    groups = {g["name"]: g for g in p["attention"]}
    assert sorted(groups) == ["Cross", "Decoder", "Encoder"]
    enc_t = [f"e{sample}.{j}" for j in np.flatnonzero(ENC_MASKS[sample])]
    dec_t = [f"d{sample}.{j}" for j in np.flatnonzero(DEC_MASKS[sample])]
    assert (groups["Cross"]["left_text"], groups["Cross"]["right_text"]) == (dec_t, enc_t)
    assert groups["Encoder"]["left_text"] == enc_t and groups["Decoder"]["left_text"] == dec_t
    for gname, name in (("Encoder", ENC), ("Decoder", DEC), ("Cross", CROSS)):
        got = np.array(groups[gname]["attn"][0], dtype=np.float64)
        np.testing.assert_array_equal(got, _real(enc_dec, name, sample).astype(np.float64))


def test_kinds_pick_one_group_as_plain_attention(enc_dec) -> None:
    got = bertviz_arrays(enc_dec, 2, kinds=["decoder/self_attention"])
    assert set(got.attention) == {"attention"} and set(got.tokens) == {"tokens"}
    assert got.tokens["tokens"] == ["d2.2", "d2.3", "d2.4"]
    cross = bertviz_kwargs(enc_dec, 2, kinds=["cross_attention"])
    assert set(cross) == {"cross_attention", "encoder_tokens", "decoder_tokens"}
    assert tuple(cross["cross_attention"][0].shape) == (1, HEADS, 3, 6)
    html = head_view(enc_dec, 2, kinds=["cross_attention"], html_action="return")
    assert [g["name"] for g in _params(html)["attention"]] == ["Cross"]


def test_heads_and_layers_kept_by_a_capture_are_reported(tmp_path) -> None:
    heads = {SELF[1]: [2, 0]}
    path = _write(tmp_path / "h.zarr", DEC_ONLY, [SELF[1]], heads=heads)
    got = bertviz_arrays(path, 0)
    assert got.layers == {"attention": [1]} and got.heads == {"attention": [2, 0]}
    assert got.attention["attention"][0].shape == (1, 2, 5, 5)


def test_bfloat16_archive_gives_the_stored_values(tmp_path) -> None:
    path = _write(tmp_path / "b.zarr", DEC_ONLY, SELF, dtype="bfloat16")
    got = bertviz_kwargs(path, 3)["attention"][1]
    np.testing.assert_array_equal(got.numpy()[0], _real(path, SELF[1], 3).astype(np.float32))


@pytest.mark.parametrize("sample", [4, -1, 1.0])
def test_sample_out_of_range_is_refused(dec_only, sample) -> None:
    with pytest.raises(SelectionError, match=r"sample .* (out of range.*4 committed|an int)"):
        bertviz_arrays(dec_only, sample)


def test_archive_without_tokens_is_refused(tmp_path) -> None:
    path = _write(tmp_path / "n.zarr", DEC_ONLY, SELF, labels=False)
    with pytest.raises(SelectionError, match="no token labels for the decoder side.*tokenizer"):
        head_view(path, 0, html_action="return")


def test_unknown_kind_and_row_policy_arrays_are_refused(tmp_path, enc_dec) -> None:
    with pytest.raises(SelectionError, match=r"unknown kind\(s\) \['encoder/cross_attention'\]"):
        bertviz_arrays(enc_dec, 0, kinds=["encoder/cross_attention"])
    rows = TokenLayout(decoder=SideLayout.from_lengths({"text": DEC_MAX}))
    with ArchiveWriter.create(tmp_path / "q.zarr", rows, dtype="float32",
                              query_rows={"decoder": [3, 4]}) as w:  # fmt: skip
        x = np.full((1, 2, 2, DEC_MAX), 1 / DEC_MAX, dtype=np.float32)
        w.append({SELF[0]: x}, tokens={"decoder": {"labels": [list("abcde")]}})
    with pytest.raises(SelectionError, match="keeps only some query rows.*whole attention"):
        model_view(tmp_path / "q.zarr", 0, html_action="return")


def test_different_heads_per_layer_are_refused(tmp_path) -> None:
    path = _write(tmp_path / "d.zarr", DEC_ONLY, SELF, heads={SELF[0]: [0, 1], SELF[1]: [1, 2]})
    with pytest.raises(SelectionError, match=r"keeps heads \[1, 2\] but .* keeps \[0, 1\]"):
        bertviz_arrays(path, 0)


def test_reading_the_arrays_imports_no_torch(dec_only) -> None:
    code = (
        "import sys\n"
        "from attnscope.interop.bertviz import bertviz_arrays\n"
        f"got = bertviz_arrays({str(dec_only)!r}, 1)\n"
        "assert got.attention['attention'][0].shape == (1, 3, 3, 3)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_bertviz_the_error_names_the_extra(dec_only, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bertviz", None)  # import bertviz now fails
    with pytest.raises(MissingExtraError, match=r"pip install 'attnscope\[bertviz\]'"):
        head_view(dec_only, 0, html_action="return")
