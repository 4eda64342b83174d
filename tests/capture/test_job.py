"""Capture jobs: streaming into archives, selection, resume, bounded memory, other models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from attnscope.capture import Transformer
from attnscope.capture.job import capture
from attnscope.capture.provenance import input_digest, input_hash_ids
from attnscope.capture.synthetic import synthetic_batches
from attnscope.errors import CaptureError, ConfigError, SelectionError
from attnscope.store import ArchiveWriter, open_archive

from .ref_data import DEC, ENC, batches, reference_weights


@pytest.fixture
def model(small_model: Transformer) -> Transformer:
    return small_model


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_capture_writes_every_array_equal_to_model_weights(model, tmp_path, suffix) -> None:
    data = batches()
    s = capture(model, data, tmp_path / f"run{suffix}", progress=False)
    assert s.samples == 6 and s.committed == 6 and s.batches == 3
    ref = reference_weights(model, data)
    with open_archive(tmp_path / f"run{suffix}") as a:
        assert a.n_samples == 6
        assert sorted(a.arrays) == sorted(ref)
        for name, want in ref.items():
            got = a[name][:]
            assert got.dtype == np.float16
            np.testing.assert_allclose(got, want, atol=1e-3)
        assert [s.name for s in a.layout.encoder.segments] == list(ENC)
        assert a.layout.decoder.labels[4] == "traj[1]"
        assert a.metadata["model_config"]["embed_dim"] == 32
    assert s.bytes == sum(v.size * 2 for v in ref.values())


def test_selection_of_layers_heads_kinds_happens_before_storage(model, tmp_path) -> None:
    data = batches()
    capture(
        model,
        data,
        tmp_path / "sel.zarr",
        layers=[1],
        heads=[0, 3],
        kinds=["cross_attention"],
        dtype="float32",
        progress=False,
    )
    ref = reference_weights(model, data)
    with open_archive(tmp_path / "sel.zarr") as a:
        assert a.arrays == ["decoder/1/cross_attention"]
        assert a.heads["decoder/1/cross_attention"] == (0, 3)
        got = a["decoder/1/cross_attention"][:]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref["decoder/1/cross_attention"][:, [0, 3]], atol=1e-6)


def test_unselected_modules_stay_on_the_fused_path(model, tmp_path, monkeypatch) -> None:
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    capture(
        model, batches(1), tmp_path / "a.zarr", kinds=["encoder/self_attention"], progress=False
    )
    assert len(calls) == 4  # 2 decoder layers x (self + cross) ran fused; 2 encoder did not


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"layers": [5]}, SelectionError, "[5]"),
        ({"kinds": ["bogus"]}, SelectionError, "bogus"),
        ({"heads": [9]}, SelectionError, "[9]"),
        ({"dtype": "int8"}, ConfigError, "int8"),
        ({"topk": 99}, ConfigError, "99"),
    ],
)
def test_bad_selection_is_a_clear_error(model, tmp_path, kwargs, exc, needle) -> None:
    with pytest.raises(exc, match=None) as info:
        capture(model, batches(1), tmp_path / "x.zarr", progress=False, **kwargs)
    assert needle in str(info.value)


def test_resume_skips_committed_samples_without_duplicates(model, tmp_path) -> None:
    data = batches(4)
    path = tmp_path / "r.zarr"
    capture(model, data[:2], path, progress=False)
    s = capture(model, data, path, resume=True, progress=False)
    assert s.samples == 4 and s.committed == 8
    ref = reference_weights(model, data)
    with open_archive(path) as a:
        np.testing.assert_allclose(
            a["encoder/0/self_attention"][:], ref["encoder/0/self_attention"], atol=1e-3
        )


def test_resume_with_other_inputs_is_refused(model, tmp_path) -> None:
    path = tmp_path / "r.zarr"
    capture(model, batches(2), path, progress=False)
    other = batches(3, seed=1)
    with pytest.raises(ConfigError, match=r"batch 0's inputs differ from the committed ones "
                       r"\(sample 0\)"):  # fmt: skip
        capture(model, other, path, resume=True, progress=False)
    # a later committed batch that differs is found too
    mixed = [batches(3)[0], other[1], other[2]]
    with pytest.raises(ConfigError, match=r"batch 1's inputs differ .*\(sample 2\)"):
        capture(model, mixed, path, resume=True, progress=False)
    with pytest.raises(ConfigError, match="batch size differs: archive has 2, this run's "
                       "first batch has 3"):  # fmt: skip
        capture(model, batches(2, b=3), path, resume=True, progress=False)
    with open_archive(path) as a:
        assert a.n_samples == 4


def test_resume_mid_batch_with_other_inputs_is_refused(model, tmp_path) -> None:
    data = batches(3)
    path = tmp_path / "r.h5"
    capture(model, data[:1], path, progress=False)
    ref = reference_weights(model, data)
    with ArchiveWriter.open(path) as w:  # one sample of batch 1 committed, as after a crash
        ids = input_hash_ids(input_digest(data[1]), 1)
        w.append({k: v[2:3] for k, v in ref.items()}, sample_ids=ids)
    other = [data[0], *batches(2, seed=5)]
    with pytest.raises(ConfigError, match=r"batch 1's inputs differ .*\(sample 2\)"):
        capture(model, other, path, resume=True, progress=False)
    with open_archive(path) as a:
        assert a.n_samples == 3


def test_resume_mid_batch_appends_only_the_missing_tail(model, tmp_path) -> None:
    data = batches(3)
    path = tmp_path / "r.h5"
    capture(model, data[:1], path, progress=False)  # 2 samples
    ref = reference_weights(model, data)
    with ArchiveWriter.open(path) as w:  # one more sample, as if a run died mid-batch
        # with the batch's input hash, as capture appends it (committed with the batch)
        ids = input_hash_ids(input_digest(data[1]), 1)
        w.append({k: v[2:3] for k, v in ref.items()}, sample_ids=ids)
    s = capture(model, data, path, resume=True, progress=False)
    assert s.samples == 3
    with open_archive(path) as a:
        assert a.n_samples == 6
        np.testing.assert_allclose(
            a["decoder/1/self_attention"][:], ref["decoder/1/self_attention"], atol=1e-3
        )


def test_sample_ids_are_stored(model, tmp_path) -> None:
    ids = {"episode": np.arange(6) // 3, "step": np.arange(6) % 3}
    capture(model, batches(), tmp_path / "ids.zarr", sample_ids=ids, progress=False)
    with open_archive(tmp_path / "ids.zarr") as a:
        np.testing.assert_array_equal(a.sample_ids["episode"], ids["episode"])
        np.testing.assert_array_equal(a.sample_ids["step"], ids["step"])


def test_memory_is_bounded_by_the_queue(model, tmp_path, monkeypatch) -> None:
    """The producer never runs more than queue_depth + 2 batches ahead of the writer thread
    (which hands batches to the store's pipeline, bounded in bytes: tests/store)."""
    produced, written, lead = [0], [0], []
    real_submit = ArchiveWriter.submit
    gate = threading.Event()  # the writer waits until the producer ran 4 batches ahead

    def slow_submit(self, *a, **k):
        gate.wait(timeout=30)
        out = real_submit(self, *a, **k)
        written[0] += 1
        return out

    monkeypatch.setattr(ArchiveWriter, "submit", slow_submit)

    def source():
        for b in synthetic_batches(12, 2, 32, enc=ENC, dec=DEC):
            produced[0] += 1
            lead.append(produced[0] - written[0])
            if produced[0] >= 4:  # one in append, two queued, this one about to be
                gate.set()
            yield b

    capture(model, source(), tmp_path / "q.zarr", queue_depth=2, progress=False)
    assert written[0] == 12
    assert max(lead) <= 2 + 2
    assert max(lead) >= 3  # the writer really lagged: the bound was exercised


def test_sparse_topk_capture(model, tmp_path) -> None:
    data = batches(2)
    capture(model, data, tmp_path / "sp.zarr", topk=3, progress=False)
    ref = reference_weights(model, data)["encoder/0/self_attention"]
    with open_archive(tmp_path / "sp.zarr") as a:
        assert a.mode == "sparse" and a.topk == 3
        vals, idx, resid = a["encoder/0/self_attention"].topk_arrays(slice(0, 4))
        want_idx = np.argsort(-ref, axis=-1)[..., :3]
        np.testing.assert_allclose(vals, np.take_along_axis(ref, want_idx, -1), atol=1e-3)
        np.testing.assert_allclose(
            resid, 1 - np.take_along_axis(ref, want_idx, -1).sum(-1), atol=5e-3
        )


def test_writer_crash_leaves_committed_batches(tmp_path) -> None:
    """Kill a capture process mid-run: the archive opens with whole committed batches."""
    path = tmp_path / "crash.zarr"
    script = textwrap.dedent(f"""
        import time, torch
        from attnscope.capture import Transformer
        from attnscope.capture.job import capture
        from attnscope.capture.synthetic import synthetic_batches
        torch.manual_seed(0)
        m = Transformer(32, 16, 4, 2, 2).eval()
        def slow():
            for i, b in enumerate(synthetic_batches(1000, 2, 32, enc={ENC!r}, dec={DEC!r})):
                if i == 3:
                    print("ready", flush=True)
                yield b
                time.sleep(0.01)
        capture(m, slow(), {str(path)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_archive(path) as a:
        n = a.n_samples
        assert n >= 2 and n % 2 == 0
        x = a["decoder/1/cross_attention"][:].astype(np.float32)
        np.testing.assert_allclose(x.sum(-1), 1, atol=1e-2)  # no torn (zero) sample
    # resume after the crash continues from n with no duplicates
    torch.manual_seed(0)
    m = Transformer(32, 16, 4, 2, 2).eval()
    data = list(synthetic_batches(n // 2 + 2, 2, 32, enc=ENC, dec=DEC))
    s = capture(m, data, path, resume=True, progress=False)
    assert s.committed == n + 4
    ref = reference_weights(m, data)
    with open_archive(path) as a:
        np.testing.assert_allclose(
            a["encoder/1/self_attention"][:], ref["encoder/1/self_attention"], atol=1e-3
        )


# -- models beyond ours ---------------------------------------------------------------


def test_torch_nn_transformer_all_three_kinds(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Transformer(
        d_model=16,
        nhead=2,
        num_encoder_layers=2,
        num_decoder_layers=1,
        dim_feedforward=32,
        batch_first=True,
    ).eval()
    data = [(torch.randn(3, 7, 16), torch.randn(3, 5, 16)) for _ in range(2)]
    capture(net, data, tmp_path / "nn.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "nn.zarr") as a:
        assert a.arrays == [
            "encoder/0/self_attention",
            "encoder/1/self_attention",
            "decoder/0/self_attention",
            "decoder/0/cross_attention",
        ]
        assert a["decoder/0/cross_attention"].shape == (6, 2, 5, 7)
        # encoder layer 0 weights equal a direct MHA call on the same input
        src = data[0][0]
        mha = net.encoder.layers[0].self_attn
        _, want = mha(src, src, src, need_weights=True, average_attn_weights=False)
        np.testing.assert_allclose(
            a["encoder/0/self_attention"][:3], want.detach().numpy(), atol=1e-6
        )


def test_plain_encoder_stack_bypasses_fast_path(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    capture(net, [torch.randn(2, 6, 16)], tmp_path / "e.h5", progress=False)
    with open_archive(tmp_path / "e.h5") as a:
        assert a.arrays == ["encoder/0/self_attention", "encoder/1/self_attention"]
        assert a.n_samples == 2


def test_model_without_attention_is_refused(tmp_path) -> None:
    with pytest.raises(CaptureError, match="Adapter"):
        capture(nn.Linear(3, 3), [torch.randn(1, 3)], tmp_path / "x.zarr", progress=False)


def test_two_processes_write_disjoint_ranges_of_one_archive(tmp_path) -> None:
    path = tmp_path / "mp.zarr"
    script = textwrap.dedent(f"""
        import sys, torch
        from attnscope.capture import Transformer
        from attnscope.capture.job import capture
        from attnscope.capture.synthetic import synthetic_batches
        torch.manual_seed(0)
        m = Transformer(32, 16, 4, 2, 2).eval()
        data = list(synthetic_batches(5, 2, 32, enc={ENC!r}, dec={DEC!r}))
        s = capture(m, data, {str(path)!r}, rank=int(sys.argv[1]), world_size=2, progress=False)
        print(s.samples)
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, text=True)
        for r in (1, 0)  # rank 1 starts first and must wait for rank 0's archive
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(int(o.split()[-1]) for o in outs) == [4, 6]  # batches 0-1 and 2-4
    torch.manual_seed(0)
    m = Transformer(32, 16, 4, 2, 2).eval()
    ref = reference_weights(m, batches(5))
    from attnscope.store import verify

    assert verify(path).ok
    with open_archive(path) as a:
        assert a.n_samples == 10
        for name, want in ref.items():
            np.testing.assert_allclose(a[name][:], want, atol=1e-3)


def test_multi_process_needs_sized_batches(model, tmp_path) -> None:
    with pytest.raises(ConfigError, match="len"):
        capture(model, iter(batches(2)), tmp_path / "x.zarr", rank=0, world_size=2, progress=False)
    with pytest.raises(ConfigError, match="rank"):
        capture(model, batches(2), tmp_path / "x.zarr", rank=2, world_size=2, progress=False)


def test_bad_weights_are_refused_and_committed_batches_kept(model, tmp_path) -> None:
    from attnscope.errors import ValidationError

    mod = model.attention_modules()["decoder/1/cross_attention"]
    calls = [0]

    def corrupt(module, args, output):
        calls[0] += 1
        if calls[0] == 3 and module.attention_weights is not None:
            module.attention_weights[1, 2, 0, 0] = float("nan")

    h = mod.register_forward_hook(corrupt)
    try:
        with pytest.raises(ValidationError, match=r"decoder/1/cross_attention: sample 5 .*NaN"):
            capture(model, batches(4), tmp_path / "bad.zarr", progress=False)
    finally:
        h.remove()
    with open_archive(tmp_path / "bad.zarr") as a:
        assert a.n_samples == 4  # the two good batches before it


def test_train_mode_stores_pre_dropout_softmax(tmp_path) -> None:
    """Dropout applies to the value mix; the stored weights are the softmax (rows sum to 1)."""
    torch.manual_seed(0)
    m = Transformer(32, 16, 4, 1, 1, dropout=0.5).train()
    capture(m, batches(1), tmp_path / "d.zarr", dtype="float32", progress=False)
    with open_archive(tmp_path / "d.zarr") as a:
        x = a["encoder/0/self_attention"][:]
        np.testing.assert_allclose(x.sum(-1), 1, atol=1e-5)
        assert (x > 0).all()  # no dropped (zeroed) weights


def test_verify_checks_row_sums_of_captured_archives(model, tmp_path) -> None:
    """Capture validates on the device and records it, so verify checks row sums later."""
    import zarr

    from attnscope.store import verify

    path = tmp_path / "v.zarr"
    capture(model, batches(2), path, progress=False)
    assert verify(path).ok
    z = zarr.open_array(str(path / "encoder" / "0" / "self_attention"), mode="r+")
    z[0] = z[0] * 0.5  # rows now sum to 0.5
    report = verify(path)
    assert not report.ok
    assert any("encoder/0/self_attention" in p for p in report.problems)


def test_progress_bar_shows_samples_and_mb_only_on_a_terminal(
    model, tmp_path, monkeypatch, capsys
) -> None:
    capture(model, batches(2), tmp_path / "p1.zarr", progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a TTY under pytest: silent
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    capture(model, batches(2), tmp_path / "p2.zarr", progress=True, total=4)
    err = capsys.readouterr().err
    assert "capture" in err and "sample" in err and "MBps" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    capture(model, batches(2), tmp_path / "p3.zarr", progress=False)
    assert capsys.readouterr().err == ""


class _FailsOnLongInput(nn.Module):
    """An MHA model whose forward raises an IndexError beyond 4 tokens (like a position table)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 4:
            raise IndexError("index out of range in self")
        return self.mha(x, x, x)[0]


def test_model_forward_error_is_a_capture_error_naming_the_batch(tmp_path) -> None:
    torch.manual_seed(0)
    data = [torch.randn(2, 4, 8), torch.randn(2, 5, 8)]
    with pytest.raises(CaptureError) as info:
        capture(_FailsOnLongInput().eval(), data, tmp_path / "f.zarr", progress=False)
    assert str(info.value) == (
        "model forward failed on batch 1: IndexError: index out of range in self"
    )
    assert isinstance(info.value.__cause__, IndexError)  # the model's error stays chained
    with open_archive(tmp_path / "f.zarr") as a:
        assert a.n_samples == 2  # batch 0 was committed


def test_library_errors_inside_the_forward_pass_through(model, tmp_path) -> None:
    with pytest.raises(ConfigError, match="topk=99"):
        capture(model, batches(1), tmp_path / "t.zarr", topk=99, progress=False)


def test_capture_resolves_its_archive_path_once(model, tmp_path, monkeypatch) -> None:
    from attnscope.store.backends import location

    calls: list[object] = []
    real = location._resolve
    monkeypatch.setattr(location, "_resolve", lambda w: calls.append(w) or real(w))
    s = capture(model, batches(), str(tmp_path / "run.zarr"), progress=False)
    assert s.committed == 6
    assert len(calls) == 1, calls  # the rest of the store is handed the Location
