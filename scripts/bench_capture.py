"""Benchmark: what capturing attention costs next to plain inference, on the same model and batches.

Usage::

    python scripts/bench_capture.py --markdown          # full run, CPU (a few minutes on 2 cores)
    python scripts/bench_capture.py --quick             # smoke configuration, tiny models
    python scripts/bench_capture.py --device cuda       # + peak device memory per row
    python scripts/bench_capture.py --layers --markdown # HF layer by layer vs output_attentions

Workloads (``--workloads``, default all three):

* ``guide``: the reference ``Transformer`` at the guide's size (512 wide, 8 heads, 3 + 3
  layers, S = T = 29 tokens), random weights sharpened by ``demo_model``;
* ``long``: the same model with 256 encoder and 256 decoder tokens;
* ``bert``: a Hugging Face ``BertModel`` with all-MiniLM-L6-v2's shape (6 layers x 12
  heads, hidden 384, 128 tokens, batch 32), random weights, nothing downloaded.

Rows of each workload:

* ``plain``: inference only, fused SDPA, no weights (the compute limit);
* ``weights``: inference with the weights materialised and dropped (explicit softmax path
  of the reference model; HF ``eager`` + ``output_attentions=True``);
* ``torch.save`` (HF only): ``output_attentions=True`` then ``torch.save`` of the whole
  float32 tuple, one file per batch (what users do today);
* ``zarr`` / ``hdf5``: ``attnscope`` ``capture`` with its defaults (float16, zstd-1,
  validation on, writer thread);
* ``np.save``: no model; ``np.save`` + ``fsync`` per batch of the very float16 bytes that
  ``capture`` writes (the write-speed limit).

Each row runs in a fresh subprocess (so its peak RSS is its own), warms up on one batch,
then times ``--repeats`` passes over all batches and reports the median. "x plain" is the
row's seconds over the ``plain`` row's seconds of the same workload, measured in the same
run. "attn MB" counts uncompressed bytes written (float16 for capture, float32 for
``torch.save``); "disk MB" is what the output takes on disk. Neither Zarr nor HDF5 nor
``torch.save`` fsync: their files may still sit in the page cache when the clock stops.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _benchlib import disk_bytes, machine, num, render

MB = 1e6
REF_ROWS = ("plain", "weights", "zarr", "hdf5", "np.save")
HF_ROWS = ("plain", "weights", "torch.save", "zarr", "hdf5", "np.save")
# Random BERT weights give near-uniform heads (max weight ~2/L); scaling the query and key
# projections (as demo_model does for the reference model) makes heads peaky like trained
# ones, so archive sizes are not those of pure noise. Timing does not depend on it.
HF_SHARPNESS = 3.0


@dataclass(frozen=True)
class Workload:
    """One model + batch source; every row of a workload runs on the same batches."""

    name: str
    family: str  # "ref" (attnscope Transformer) or "hf" (transformers BertModel)
    batch_size: int
    batches: int
    enc: dict[str, int] = field(default_factory=dict)  # ref: encoder modality -> tokens
    dec: dict[str, int] = field(default_factory=dict)  # ref: decoder modality -> tokens
    model: dict[str, int] = field(default_factory=dict)  # ref: demo_model overrides
    seq: int = 0  # hf: tokens per sample
    hf: dict[str, int] = field(default_factory=dict)  # hf: BertConfig fields

    @property
    def rows(self) -> tuple[str, ...]:
        return HF_ROWS if self.family == "hf" else REF_ROWS

    @property
    def samples(self) -> int:
        return self.batch_size * self.batches

    def describe(self) -> str:
        if self.family == "hf":
            h = self.hf
            return (
                f"BertModel {h['num_hidden_layers']} layers x {h['num_attention_heads']} heads, "
                f"hidden {h['hidden_size']}, {self.seq} tokens, {self.batches} x "
                f"{self.batch_size} samples"
            )
        from attnscope.capture.synthetic import guide_model_config

        m = {**guide_model_config(), **self.model}
        return (
            f"Transformer {m['embed_dim']} wide, {m['num_heads']} heads, "
            f"{m['num_encoder_layers']}+{m['num_decoder_layers']} layers, "
            f"S={sum(self.enc.values())} T={sum(self.dec.values())}, {self.batches} x "
            f"{self.batch_size} samples"
        )


def workloads(args: argparse.Namespace) -> list[Workload]:
    from attnscope.capture.synthetic import GUIDE_DEC, GUIDE_ENC

    if args.quick:
        tiny = {"embed_dim": 64, "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 1}
        found = [
            Workload("guide", "ref", 4, 2, dict(GUIDE_ENC), dict(GUIDE_DEC), tiny),
            Workload(
                "long", "ref", 2, 2, {"text": 16, "image": 48}, {"text": 16, "traj": 48},
                {**tiny, "context_length": 64},
            ),
            Workload(
                "bert", "hf", 4, 2, seq=32,
                hf={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "intermediate_size": 128},
            ),
        ]  # fmt: skip
    else:
        found = [
            Workload("guide", "ref", 16, 8, dict(GUIDE_ENC), dict(GUIDE_DEC)),
            Workload(
                "long", "ref", 2, 4, {"text": 64, "image": 192}, {"text": 64, "traj": 192},
                {"context_length": 512},
            ),
            Workload(
                "bert", "hf", 32, 2, seq=128,
                hf={"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                    "intermediate_size": 1536},
            ),
        ]  # fmt: skip
    out = []
    for w in found:
        if w.name not in args.workloads:
            continue
        d = asdict(w)
        if args.batches is not None:
            d["batches"] = args.batches
        if args.batch_size is not None:
            d["batch_size"] = args.batch_size
        out.append(Workload(**d))
    return out


# -- one row, run in a worker ---------------------------------------------------------------


def _build(w: Workload, device: str) -> tuple[Any, list[Any]]:
    """The model (eval mode, on ``device``) and the list of batches, all in memory."""
    import torch

    if w.family == "ref":
        from attnscope.capture.synthetic import demo_model, synthetic_batches

        model = demo_model(seed=0, **w.model).to(device)
        d = model.config.embed_dim
        batches = [
            ({k: v.to(device) for k, v in e.items()}, {k: v.to(device) for k, v in t.items()})
            for e, t in synthetic_batches(w.batches, w.batch_size, d, enc=w.enc, dec=w.dec, seed=0)
        ]
        return model, batches
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(max_position_embeddings=max(512, w.seq), **w.hf)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(HF_SHARPNESS)
            layer.attention.self.key.weight.mul_(HF_SHARPNESS)
    model.to(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1000, cfg.vocab_size, (w.batch_size, w.seq), generator=g).to(
                device
            ),
            "attention_mask": torch.ones(w.batch_size, w.seq, dtype=torch.long, device=device),
        }
        for _ in range(w.batches)
    ]
    return model, batches


def _captured_bytes(model: Any, batches: list[Any]) -> list[dict[str, np.ndarray]]:
    """Per batch, the float16 arrays ``capture`` would write (same adapter, same cast)."""
    import torch

    from attnscope.capture.adapters import adapter_for

    adapter = adapter_for(model)
    names = set(adapter.names())
    out = []
    for b in batches:
        got: dict[str, np.ndarray] = {}

        def sink(name: str, t: torch.Tensor, got: dict[str, np.ndarray] = got) -> None:
            got[name] = t.to(torch.float16).cpu().numpy()

        with torch.inference_mode():
            adapter.run(b, sink, names)
        out.append(got)
    return out


def _row_pass(w: Workload, row: str, model: Any, data: Any, dest: Path) -> int:
    """Run ``row`` once over ``data`` (batches, or arrays for np.save); return bytes written."""
    import torch

    if row == "np.save":
        dest.mkdir(parents=True)
        n = 0
        for i, arrays in enumerate(data):
            with open(dest / f"batch{i}.npy", "wb") as f:
                for a in arrays.values():
                    np.save(f, a)
                    n += a.nbytes
                f.flush()
                os.fsync(f.fileno())
        return n
    if row in ("zarr", "hdf5"):
        from attnscope.capture.job import capture

        s = capture(model, data, dest, format=row, progress=False, overwrite=True)
        return s.bytes
    n = 0
    with torch.inference_mode():
        for i, b in enumerate(data):
            if w.family == "ref":
                if row == "plain":
                    model(*b)
                else:
                    model(*b, return_attention_weights=True)
                continue
            if row == "plain":
                model(**b)
                continue
            out = model(**b, output_attentions=True)
            if row == "torch.save":
                dest.mkdir(parents=True, exist_ok=True)
                torch.save(out.attentions, dest / f"batch{i}.pt")
                n += sum(a.nbytes for a in out.attentions)
    return n


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RowRunner:
    """One row of one workload: model, batches and warm-up at construction, then timed passes."""

    def __init__(self, w: Workload, row: str, device: str, out_dir: Path) -> None:
        import torch

        self.w, self.row, self.cuda = w, row, device.startswith("cuda")
        self.model, batches = _build(w, device)
        if w.family == "hf":
            # sdpa only for the plain row; every other row needs eager to get weights
            self.model.set_attn_implementation("sdpa" if row == "plain" else "eager")
        self.data: Any = _captured_bytes(self.model, batches) if row == "np.save" else batches
        self.base = out_dir / f"{w.name}-{row.replace('.', '_')}"
        self.suffix = {"zarr": ".zarr", "hdf5": ".h5"}.get(row, "")
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        _row_pass(w, row, self.model, self.data[:1], self.base / f"warmup{self.suffix}")
        self._sync()
        self.setup_rss = _rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.last: Path | None = None

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def run(self, r: int) -> dict[str, Any]:
        """One timed pass over all batches; the previous pass's output is removed first."""
        if self.last is not None:
            shutil.rmtree(self.last, ignore_errors=True)
        dest = self.last = self.base / f"r{r}{self.suffix}"
        t0 = time.perf_counter()
        nbytes = _row_pass(self.w, self.row, self.model, self.data, dest)
        self._sync()
        dt = time.perf_counter() - t0
        return {"seconds": dt, "bytes": nbytes, "disk": disk_bytes(dest)}

    def finish(self) -> dict[str, Any]:
        import torch

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "peak_rss": maxrss * (1 if sys.platform == "darwin" else 1024),
            "setup_rss": self.setup_rss,
            "peak_device": torch.cuda.max_memory_allocated() if self.cuda else None,
        }


def _worker(w: Workload, row: str, device: str, out_dir: Path) -> None:
    """Subprocess side: build, report ready, then answer 'run R' / 'finish' lines on stdin."""
    runner = RowRunner(w, row, device, out_dir)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            print(json.dumps(runner.run(int(cmd[1]))), flush=True)
        else:
            print(json.dumps(runner.finish()), flush=True)
            return


class _Remote:
    """Parent side of :func:`_worker`; same ``run`` / ``finish`` as :class:`RowRunner`."""

    def __init__(self, args: argparse.Namespace, w: Workload, row: str, out_dir: Path) -> None:
        cmd = [sys.executable, __file__, *_forwarded(args), "--out-dir", str(out_dir)]
        cmd += ["--_row", f"{w.name}:{row}"]
        self.name = f"{w.name}:{row}"
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ask(None)

    def _ask(self, msg: str | None) -> dict[str, Any]:
        assert self.p.stdin is not None and self.p.stdout is not None
        if msg is not None:
            self.p.stdin.write(msg + "\n")
            self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"row {self.name} died (exit {self.p.wait()}); see stderr above")
        return json.loads(line)

    def run(self, r: int) -> dict[str, Any]:
        return self._ask(f"run {r}")

    def finish(self) -> dict[str, Any]:
        out = self._ask("finish")
        self.p.wait()
        return out


# -- orchestration --------------------------------------------------------------------------


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device, "--workloads", *args.workloads]
    if args.quick:
        out.append("--quick")
    if args.batches is not None:
        out += ["--batches", str(args.batches)]
    if args.batch_size is not None:
        out += ["--batch-size", str(args.batch_size)]
    return out


def measure(args: argparse.Namespace, out_dir: Path, log: Callable[[str], None]) -> list[dict]:
    """Per workload: start every row, then time the rows round-robin, ``repeats`` rounds.

    Interleaving spreads any background load over all rows alike, so the ratios of one
    workload stay comparable even on a busy machine. Only one row runs at a time.
    """
    results = []
    for w in workloads(args):
        log(f"{w.name}: {w.describe()}")
        t0 = time.perf_counter()
        runners: dict[str, Any] = {}
        try:
            for row in w.rows:
                runners[row] = (
                    RowRunner(w, row, args.device, out_dir)
                    if args.in_process
                    else _Remote(args, w, row, out_dir)
                )
            runs: dict[str, list[dict[str, Any]]] = {row: [] for row in w.rows}
            for r in range(args.repeats):
                for row, runner in runners.items():
                    runs[row].append(runner.run(r))
            for row, runner in runners.items():
                res = {"workload": w.name, "row": row, "samples": w.samples, **runner.finish()}
                if args.in_process:
                    res["peak_rss"] = None  # a process-wide high-water mark says nothing per row
                times = [x["seconds"] for x in runs[row]]
                res.update(
                    seconds=statistics.median(times),
                    all_seconds=times,
                    bytes=runs[row][-1]["bytes"],
                    disk=runs[row][-1]["disk"],
                )
                log(f"  {row:<10} {res['seconds']:8.3f} s  (runs {_fmt_runs(times)})")
                results.append(res)
        finally:
            for runner in runners.values():
                if isinstance(runner, _Remote) and runner.p.poll() is None:
                    runner.p.kill()
        log(f"  ({time.perf_counter() - t0:.0f} s in all)")
    return results


def _fmt_runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def table(results: list[dict], device: str) -> tuple[list[str], list[list[str]]]:
    head = ["workload", "row", "s (median)", "min s", "samples/s", "attn MB", "MB/s", "x plain"]
    head += ["disk MB (ratio)"]
    head += ["peak RSS MB (+ over setup)"]
    if device.startswith("cuda"):
        head.append("peak GPU MB")
    plain = {r["workload"]: r["seconds"] for r in results if r["row"] == "plain"}
    rows = []
    for r in results:
        s, b = r["seconds"], r["bytes"]
        disk = f"{num(r['disk'] / MB)} ({b / r['disk']:.2f}x)" if r["disk"] else "-"
        rss = (
            f"{r['peak_rss'] / MB:.0f} ({(r['peak_rss'] - r['setup_rss']) / MB:+.0f})"
            if r["peak_rss"] is not None
            else "-"
        )
        line = [
            r["workload"],
            r["row"],
            f"{s:.3f}",
            f"{min(r['all_seconds']):.3f}",
            "-" if r["row"] == "np.save" else f"{r['samples'] / s:.1f}",
            num(b / MB) if b else "-",
            num(b / MB / s) if b else "-",
            f"{s / plain[r['workload']]:.2f}" if r["workload"] in plain else "-",
            disk,
            rss,
        ]
        if device.startswith("cuda"):
            line.append(f"{(r['peak_device'] or 0) / MB:.0f}")
        rows.append(line)
    return head, rows


def limits(results: list[dict]) -> list[str]:
    """Per workload: our throughput next to the limits measured in the same run."""
    out = []
    by: dict[str, dict[str, dict]] = {}
    for r in results:
        by.setdefault(r["workload"], {})[r["row"]] = r
    for name, rows in by.items():
        plain, raw = rows.get("plain"), rows.get("np.save")
        for fmt in ("zarr", "hdf5"):
            r = rows.get(fmt)
            if r is None or plain is None or raw is None:
                continue
            mbs, lim = r["bytes"] / MB / r["seconds"], raw["bytes"] / MB / raw["seconds"]
            out.append(
                f"{name}/{fmt}: {r['samples'] / r['seconds']:.1f} samples/s vs plain SDPA "
                f"{plain['samples'] / plain['seconds']:.1f} ({plain['seconds'] / r['seconds']:.0%}"
                f"); {mbs:.0f} MB/s vs np.save+fsync {lim:.0f} MB/s ({mbs / lim:.0%})"
            )
        ts = rows.get("torch.save")
        if ts is not None:
            for fmt in ("zarr", "hdf5"):
                if fmt in rows:
                    out.append(
                        f"{name}: {fmt} capture takes {rows[fmt]['seconds'] / ts['seconds']:.2f}x "
                        f"the time of output_attentions + torch.save, and "
                        f"{rows[fmt]['disk'] / max(ts['disk'], 1):.2f}x its disk space"
                    )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--workloads", nargs="+", default=["guide", "long", "bert"],
                   choices=["guide", "long", "bert"])  # fmt: skip
    p.add_argument("--batches", type=int, default=None, help="override every workload's count")
    p.add_argument("--batch-size", type=int, default=None, help="override every workload's B")
    p.add_argument("--repeats", type=int, default=None, help="timed passes (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny models; a smoke test")
    p.add_argument("--in-process", action="store_true",
                   help="run rows in this process (faster start, no per-row peak RSS)")  # fmt: skip
    p.add_argument("--out-dir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument("--layers", action="store_true",
                   help="HF layer-by-layer table: peak extra memory at 2/6/12 layers, "
                        "one layer vs all")  # fmt: skip
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_layers", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.quick:
        args.in_process = True  # subprocesses would spend longer importing than measuring
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: CUDA is not available here")

    if args._layers is not None:
        from bench_capture_layers import layers_worker

        layers_worker(args._layers, args.device, args.out_dir, args.repeats, args.quick)
        return
    if args._row is not None:  # worker: one row, JSON on stdout
        name, row = args._row.split(":", 1)
        (w,) = [w for w in workloads(args) if w.name == name]
        _worker(w, row, args.device, args.out_dir)
        return

    tmp = args.out_dir is None
    out_dir = Path(tempfile.mkdtemp(prefix="bench-capture-")) if tmp else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"machine: {machine(args.device)}")
    if args.layers:
        try:
            from bench_capture_layers import layers_bench

            table_md = layers_bench(args, out_dir, __file__, render)
            print(f"machine: {machine(args.device)}\n\n{table_md}")
        finally:
            if tmp:
                shutil.rmtree(out_dir, ignore_errors=True)
        return
    try:
        results = measure(args, out_dir, log)
    finally:
        if tmp:
            shutil.rmtree(out_dir, ignore_errors=True)
    print(f"machine: {machine(args.device)}")
    for w in workloads(args):
        print(f"{w.name}: {w.describe()}")
    print()
    print(render(*table(results, args.device), args.markdown))
    print()
    for line in limits(results):
        print(("- " if args.markdown else "") + line)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
