"""Capture on a CUDA device: every path against the model's own weights on that device.

Skipped where no GPU is visible (CI); run on the lent GPU machine (see docs/benchmarks.md).
The reference is computed on the same device, so only summation order differs.
``ATTNSCOPE_TEST_DEVICE=cpu`` runs the same checks on the CPU (to check the tests).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from attnscope.capture import Transformer
from attnscope.capture.job import capture
from attnscope.store import open_archive

from .hf_models import FAMILIES, as_stored, batch_for, make, reference_attentions
from .ref_data import batches, reference_weights

DEVICE = os.environ.get("ATTNSCOPE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2**-7}


@pytest.fixture(autouse=True)
def exact_matmul():
    """No TF32: the reference and the capture must both be float32 products."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_reference_model_on_cuda_equals_its_own_weights(tmp_path, suffix) -> None:
    torch.manual_seed(0)
    model = Transformer(32, 16, 4, 2, 2).eval()
    data = batches(3, 2)
    summary = capture(model, data, tmp_path / f"r{suffix}", dtype="float32", device=DEVICE,
                      progress=False)  # fmt: skip
    assert summary.samples == 6
    assert next(model.parameters()).device.type == DEVICE
    want = reference_weights(model, data, DEVICE)
    with open_archive(tmp_path / f"r{suffix}") as a:
        assert a.metadata["capture"]["provenance"]["device"].startswith(DEVICE)
        for name, ref in want.items():
            np.testing.assert_allclose(a[name][:], ref, atol=2e-5, rtol=0,
                                       err_msg=name)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_on_cuda_matches_output_attentions(tmp_path, family, dtype) -> None:
    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make(family, dtype)
    batch = batch_for(family, model, dtype)
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", device=DEVICE, progress=False)
    on_gpu = {k: v.to(DEVICE) for k, v in batch.items()}
    want = {k: v.float().cpu() for k, v in reference_attentions(model, on_gpu).items()}
    want = as_stored(model, batch, want)
    with open_archive(tmp_path / "a.zarr") as a:
        assert set(a.arrays) == set(want)
        for name in a.arrays:
            np.testing.assert_allclose(a[name][:], want[name], atol=ATOL[dtype], rtol=0,
                                       err_msg=name)  # fmt: skip


def test_bf16_model_stored_as_float16_on_cuda_keeps_rows_normalized(tmp_path) -> None:
    model = make("bert", torch.bfloat16)
    batch = batch_for("bert", model, torch.bfloat16)
    capture(model, [batch] * 4, tmp_path / "h.h5", device=DEVICE, progress=False)
    with open_archive(tmp_path / "h.h5") as a:
        w = a["encoder/0/self_attention"][:].astype(np.float32)
        assert a.n_samples == 8
    rows = w.sum(-1)
    real = rows > 0  # padded rows are stored as zeros
    np.testing.assert_allclose(rows[real], 1.0, atol=2**-6)


@pytest.mark.parametrize("family", ["bert", "llama_gqa", "t5_2enc_3dec", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_query_blocks_on_cuda_match_output_attentions(tmp_path, family, dtype) -> None:
    pytest.importorskip("transformers").logging.set_verbosity_error()
    model = make(family, dtype)
    batch = batch_for(family, model, dtype)
    batch.pop("attention_mask", None)  # fixed length: blocks stream
    capture(model, [batch], tmp_path / "a.zarr", dtype="float32", device=DEVICE, query_block=2,
            progress=False)  # fmt: skip
    on_dev = {k: v.to(DEVICE) for k, v in batch.items()}
    want = {k: v.float().cpu().numpy() for k, v in reference_attentions(model, on_dev).items()}
    with open_archive(tmp_path / "a.zarr") as a:
        assert set(a.arrays) == set(want)
        for name in a.arrays:
            np.testing.assert_allclose(a[name][:], want[name], atol=ATOL[dtype], rtol=0,
                                       err_msg=name)  # fmt: skip


@pytest.mark.skipif(DEVICE != "cuda", reason="device memory is measured on CUDA")
def test_16k_tokens_on_cuda_use_one_block_of_device_memory(tmp_path) -> None:
    """4 heads x 16384^2 float32 weights are 4 GiB for one layer; the capture's extra peak
    device memory over plain inference stays under 1 GiB (blocks of 256 rows)."""
    torch.manual_seed(0)
    t = 16384
    model = Transformer(32, t, 4, 1, 1).eval().cuda()
    data = batches(1, 1, enc={"text": t}, dec={"a": 4})
    enc, dec = ({k: v.cuda() for k, v in x.items()} for x in data[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model(enc, dec)
    plain = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    capture(model, data, tmp_path / "l.zarr", layers=[0], kinds=["encoder/self_attention"],
            heads=[0], device="cuda", progress=False)  # fmt: skip
    extra = torch.cuda.max_memory_allocated() - plain
    print(f"16k: extra peak device memory {extra / 2**20:.0f} MiB, plain {plain / 2**20:.0f}")
    assert extra < 2**30
    with open_archive(tmp_path / "l.zarr") as a:
        rows = a["encoder/0/self_attention"][0, 0, -3:].astype(np.float32)
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-2)


@pytest.mark.parametrize(
    ("rows", "topk"), [("decoder:segment=traj", None), ("decoder:last,encoder:every=3", 3)]
)
def test_row_policy_on_cuda_keeps_exactly_the_models_rows(tmp_path, rows, topk) -> None:
    from attnscope.capture.policy import RowPolicy

    torch.manual_seed(0)
    model = Transformer(32, 16, 4, 2, 2).eval()
    data = batches(2, 2)
    capture(model, data, tmp_path / "r.zarr", dtype="float32", device=DEVICE, rows=rows,
            heads=[3, 1], topk=topk, progress=False)  # fmt: skip
    want = reference_weights(model, data, DEVICE)
    with open_archive(tmp_path / "r.zarr") as a:
        kept = RowPolicy.parse(rows).resolve(a.layout)
        for name, ref in want.items():
            x = ref[:, [3, 1]]
            side = "encoder" if name.startswith("encoder") else "decoder"
            if side in kept:
                x = x[:, :, kept[side]]
                assert a.query_rows(name).tolist() == kept[side].tolist()
            got = a[name][:]
            if topk is None:
                np.testing.assert_allclose(got, x, atol=2e-5, rtol=0, err_msg=name)
            else:  # the kept top-k weights are the model's
                np.testing.assert_allclose(got[got > 0], x[got > 0], atol=2e-5, rtol=0)
                assert ((got > 0).sum(-1) <= topk).all()
