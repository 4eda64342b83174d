"""Benchmark: long-context capture vs ``output_attentions=True`` and plain SDPA (issue #14).

Usage::

    python scripts/bench_long.py --markdown          # full run, CPU (8-11 minutes on 2 cores)
    python scripts/bench_long.py --quick             # smoke run, tiny model and lengths
    python scripts/bench_long.py --device cuda       # peak extra *device* memory per row
    python scripts/bench_long.py --lengths 1024 2048 --cap-gb 2 --json long.json
    python scripts/bench_long.py --padded --lengths 4096 --no-cap   # a ragged archive

Model: a Hugging Face ``BertModel`` built from a ``BertConfig`` with a fixed seed (hidden 256,
4 heads, 4 layers, intermediate 512; ``--quick``: 64 wide, 2 heads, 2 layers), random weights
with the query/key projections sharpened as in ``bench_capture.py``; nothing is downloaded.
One sample of ``T`` random tokens per batch, no padding mask (a fixed-length archive);
``--padded`` adds an ``attention_mask`` whose last ``T/8`` tokens are masked in every row
(capture then writes a ragged archive).

Rows, per ``T`` in ``--lengths`` (default 2048 4096 8192):

* ``sdpa``: plain inference, ``attn_implementation="sdpa"``, no weights (the compute limit and
  the memory baseline);
* ``output_attentions``: ``eager`` + ``output_attentions=True``, weights dropped after the
  forward: what users pay today (every layer's float32 ``(1, H, T, T)`` kept to the end);
* ``capture``: attnscope ``capture(..., dtype="float16", progress=False)`` of every layer
  into a temporary Zarr archive, with ``query_block=`` (``--query-block``, default automatic)
  when this version of ``capture`` has it;
* ``capture L0 H0``: the same with ``layers=[0], heads=[0]``.

Each row runs in a fresh subprocess (on CUDA all rows run in this process by default,
``--in-process``, saving ~5 s of start-up per row): it builds the model, warms up (imports and a
tiny run of the row, then one plain sdpa forward at the full ``T``), takes that point's RSS as
its baseline, then runs the row once more at full size as the warm-up and ``--repeats`` timed
passes (median reported). "peak extra MB" is the peak RSS during those full-size runs minus the
baseline RSS: the kernel's ``ru_maxrss`` high-water mark when the row raised it, else a 5 ms
sampling thread's maximum of ``/proc/self/statm`` (torch's CPU allocations are invisible to
tracemalloc). On CUDA "peak extra GPU MB" is ``torch.cuda.max_memory_allocated`` minus
``memory_allocated`` at the baseline (host RSS is reported too: pinned host buffers; in-process,
by the sampling thread only). ``--json`` is rewritten after every run, so a run cut short by a
timeout leaves what it measured. The ``sdpa`` row's own figure is plain inference's transient
(activations) above the resting baseline; every other row's figure includes the same transient.
"x one layer fp32" is the peak extra over one layer's float32 weights ``H x T x T x 4`` bytes.
"x sdpa" is the row's median seconds over the ``sdpa`` row's of the same ``T``; "attn MB" counts
the float16 bytes capture wrote (``CaptureSummary.bytes``), "disk MB" what the archive takes on
disk, "MB/s" is attn MB over the median seconds. Zarr does not fsync.

Largest ``T`` under a cap (``--cap-gb``, default 4 GB = 4e9 bytes): for ``output_attentions``
and ``capture``, ``T`` doubles from 1024 (quick: 512) up to ``--cap-max-t`` (default 16384;
quick 2048) until a run fails or its peak extra memory exceeds the cap. Lengths already in the
table are not run again. ``RLIMIT_AS`` is not used: it limits *virtual* memory, and thread
stacks and malloc arenas (torch, OpenMP, the Zarr and writer threads) reserve address space they
never touch (a capture at T=2048 here grew it by ~0.77 GB for ~0.24 GB resident), so it would
fail runs that fit the cap, and CUDA reserves far more. Instead the sampling thread ends a run
(exit, reported as "over cap") as soon as its RSS passes the baseline plus the cap, and ``T``
where ``output_attentions`` would keep more than the cap in weights alone (``layers x heads x
T^2 x 4`` bytes) is reported "over cap" without running. On CUDA the cap is enforced by the
allocator instead (``torch.cuda.set_per_process_memory_fraction``): an out-of-memory error is
"over cap". Every row in the table is also skipped ("over memory") when its estimated peak
exceeds 80% of the memory (on CUDA: device memory) available when the script starts.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _benchlib import disk_bytes, machine, num, render

MB = 1e6
GB = 1e9
LENGTHS = (2048, 4096, 8192)
QUICK_LENGTHS = (512, 1024)
MODEL = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4,
         "intermediate_size": 512}  # fmt: skip
QUICK_MODEL = {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
               "intermediate_size": 128}  # fmt: skip
ROWS = {  # row -> what it runs
    "sdpa": "plain inference, fused SDPA, no weights",
    "output_attentions": "eager + output_attentions=True, every layer kept to the end, dropped",
    "capture": "attnscope capture(), every layer, float16, Zarr",
    "capture L0 H0": "attnscope capture(), layers=[0], heads=[0], float16, Zarr",
}
CAP_ROWS = ("output_attentions", "capture")
# Random BERT weights give near-uniform heads; sharpening the query and key projections
# (as bench_capture.py does) makes archive sizes those of peaky heads, not of pure noise.
SHARPNESS = 3.0
SAMPLE_S = 0.005
OVER_CAP_EXIT = 17


# -- estimates --------------------------------------------------------------------------------


def model_config(quick: bool) -> dict[str, int]:
    return dict(QUICK_MODEL if quick else MODEL)


def layer_bytes(cfg: dict[str, int], t: int, heads: int | None = None, itemsize: int = 4) -> int:
    """Bytes of one layer's ``(1, H, T, T)`` weights (``heads`` of them if given)."""
    h = cfg["num_attention_heads"] if heads is None else heads
    return h * t * t * itemsize


def has_query_block() -> bool:
    """Whether this checkout's ``capture`` takes ``query_block=``."""
    from attnscope.capture.job import capture

    return "query_block" in inspect.signature(capture).parameters


def estimate(row: str, cfg: dict[str, int], t: int, query_block: bool) -> int:
    """A rough upper estimate of the row's peak extra bytes, to refuse runs that cannot fit."""
    n = cfg["num_hidden_layers"]
    one = layer_bytes(cfg, t)
    if row == "sdpa":
        return 0
    if row == "output_attentions":
        return (n + 1) * one  # all layers kept + one layer's scores before the softmax
    if query_block:
        return 1 << 30  # one block of rows (~64 MiB of scores) plus generous slack
    held = n if row == "capture" else 1  # the batch's float16 copies, if capture holds them
    return 3 * one + held * one // 2


def cap_lower_bound(row: str, cfg: dict[str, int], t: int) -> int:
    """Bytes the row must hold whatever the implementation (0 when nothing is certain)."""
    return cfg["num_hidden_layers"] * layer_bytes(cfg, t) if row == "output_attentions" else 0


# -- one row, in a worker process -------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )


class PeakWatch(threading.Thread):
    """Samples RSS every ``SAMPLE_S``; exits the process when it passes ``limit`` bytes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base = self.peak = 0
        self.limit: int | None = None
        self.stopped = threading.Event()

    def reset(self, limit: int | None) -> None:
        self.base = self.peak = _rss()
        self.limit = limit

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            r = _rss()
            if r > self.peak:
                self.peak = r
            if self.limit is not None and r > self.limit:
                print(json.dumps({"over_cap": True, "extra": r - self.base}), flush=True)
                os._exit(OVER_CAP_EXIT)


def build_model(cfg: dict[str, int], max_t: int, device: str) -> Any:
    """The seeded random ``BertModel`` (eval, sdpa, on ``device``)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(max_position_embeddings=max(512, max_t), **cfg)
    model = BertModel(config, add_pooling_layer=False).eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(SHARPNESS)
            layer.attention.self.key.weight.mul_(SHARPNESS)
    return model.to(device)


def make_batch(model: Any, t: int, device: str, padded: bool = False) -> dict[str, Any]:
    """One sample of ``t`` random tokens; ``padded``: a mask whose last ``t // 8`` are 0."""
    import torch

    g = torch.Generator().manual_seed(t)
    ids = torch.randint(1000, model.config.vocab_size, (1, t), generator=g)
    batch = {"input_ids": ids.to(device)}
    if padded:
        mask = torch.ones_like(ids)
        mask[:, t - t // 8 :] = 0
        batch["attention_mask"] = mask.to(device)
    return batch


def run_row(row: str, model: Any, batch: dict[str, Any], dest: Path, qb: Any) -> int:
    """One pass of ``row`` (``dest`` must not exist); returns the attention bytes written."""
    import torch

    if row in ("sdpa", "output_attentions"):
        with torch.inference_mode():
            if row == "sdpa":
                model(**batch)
            else:
                model.set_attn_implementation("eager")
                try:
                    out = model(**batch, output_attentions=True)
                    del out
                finally:
                    model.set_attn_implementation("sdpa")
        return 0
    from attnscope.capture.job import capture

    kw: dict[str, Any] = {} if qb == "n/a" else {"query_block": qb}
    if row == "capture L0 H0":
        kw.update(layers=[0], heads=[0])
    s = capture(model, [batch], dest, dtype="float16", progress=False, **kw)
    return int(s.bytes)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Subprocess: one (row, T). Prints and returns seconds, peak extra memory, bytes."""
    import torch

    device, row, t = spec["device"], spec["row"], spec["t"]
    cuda = device.startswith("cuda")
    out_dir = Path(spec["out_dir"])
    dest = out_dir / f"{row.replace(' ', '_')}-{t}.zarr"
    qb, padded = spec["query_block"], spec.get("padded", False)
    shared = spec.get("in_process", False)  # the process's RSS high-water mark is not ours
    if cuda:
        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # the allocator stats below use it
        torch.cuda.empty_cache()
    model = build_model(spec["model"], spec["max_t"], device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    run_row(row, model, make_batch(model, 64, device, padded), dest, qb)  # imports, set-up
    shutil.rmtree(dest, ignore_errors=True)
    batch = make_batch(model, t, device, padded)
    run_row("sdpa", model, batch, dest, qb)  # the baseline includes a plain pass at full T
    sync()
    watch = PeakWatch()
    watch.start()
    base_rss, base_hwm = _rss(), _maxrss()
    cap = spec.get("cap")
    base_dev = 0
    if cuda:
        base_dev = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if cap is not None:
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (base_dev + cap) / total))
    extra_limit = spec["host_limit"]  # host RSS over the baseline; the cap too on CPU
    if cap is not None and not cuda:
        extra_limit = min(extra_limit, cap)
    watch.reset(None if shared else base_rss + int(extra_limit))
    times: list[float] = []
    res: dict[str, Any] = {"row": row, "t": t, "query_block": qb}
    try:
        for i in range(1 + spec["repeats"]):
            t0 = time.perf_counter()
            res["bytes"] = run_row(row, model, batch, dest, qb)
            sync()
            if i > 0 or spec["repeats"] == 0:
                times.append(time.perf_counter() - t0)
            res["disk"] = disk_bytes(dest)  # Zarr does not fsync: page cache, untimed
            shutil.rmtree(dest, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - reported in the table; OOM under a cap is the cap
        oom = any(isinstance(x, torch.cuda.OutOfMemoryError) or "out of memory" in str(x)
                  for x in (e, e.__cause__))  # fmt: skip
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        res["over_cap"] = oom and cap is not None
    finally:
        if cuda and cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)
    watch.stopped.set()
    hwm = _maxrss()
    peak = hwm if hwm > base_hwm and not shared else watch.peak
    res.update(
        seconds=statistics.median(times) if times else None,
        all_seconds=times,
        base_rss=base_rss,
        peak_rss=max(peak, watch.peak),
        extra_rss=max(peak, watch.peak) - base_rss,
        extra_rss_hwm=hwm - base_rss,
        extra_rss_sampled=watch.peak - base_rss,
        extra_dev=(torch.cuda.max_memory_allocated() - base_dev) if cuda else None,
    )
    del model, batch
    if cuda:
        torch.cuda.empty_cache()
    return res


# -- orchestration ----------------------------------------------------------------------------


def _run_worker(spec: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter; a run ended by the watchdog is 'over cap'."""
    if spec.get("in_process"):
        return worker(spec)
    cmd = [sys.executable, __file__, "--_worker", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in p.stdout.strip().splitlines() if x.startswith("{")]
    last = json.loads(lines[-1]) if lines else {}
    if p.returncode == OVER_CAP_EXIT:
        extra = last.get("extra", 0) / MB
        return {"row": spec["row"], "t": spec["t"], "over_cap": True,
                "error": f"ended at {extra:.0f} MB extra RSS, over the limit"}  # fmt: skip
    if p.returncode != 0 or "row" not in last:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        log(f"    {spec['row']} T={spec['t']} failed (exit {p.returncode}): {' | '.join(tail)}")
        return {"row": spec["row"], "t": spec["t"], "error": f"exit {p.returncode}: "
                + (tail[-1] if tail else "no output")}  # fmt: skip
    return last


def _avail() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(
    args: argparse.Namespace, out_dir: Path, log: Callable[[str], None],
    save: Callable[[dict], None],
) -> dict:  # fmt: skip
    """The table's rows, then the cap search; ``save(results)`` after every run."""
    cfg = model_config(args.quick)
    qb_avail = has_query_block()
    qb: Any = args.query_block if qb_avail else "n/a"
    ladder = cap_ladder(args)
    max_t = max([*args.lengths, *ladder])
    avail = host = _avail()
    if args.device.startswith("cuda"):
        import torch

        avail = torch.cuda.mem_get_info(torch.device(args.device))[0]
    log(f"query_block in capture(): {'yes' if qb_avail else 'no'}; memory available "
        f"{avail / GB:.1f} GB")  # fmt: skip
    base = {"device": args.device, "model": cfg, "max_t": max_t, "query_block": qb,
            "out_dir": str(out_dir), "host_limit": int(0.8 * host),
            "padded": args.padded, "in_process": args.in_process}  # fmt: skip
    rows: list[dict[str, Any]] = []
    res = {"rows": rows, "cap": [], "query_block_available": qb_avail, "model": cfg,
           "cap_bytes": int(args.cap_gb * GB), "in_process": args.in_process}  # fmt: skip
    for t in args.lengths:
        for row in args.rows:
            est = estimate(row, cfg, t, qb_avail)
            if est > 0.8 * avail:
                log(f"  T={t:>6} {row:<18} skipped: estimated {est / GB:.1f} GB > 80% of available")
                why = f"over memory (estimated {est / GB:.1f} GB)"
                rows.append({"row": row, "t": t, "skipped": why, "estimate": est})
                continue
            spec = {**base, "row": row, "t": t, "repeats": args.repeats}
            t0 = time.perf_counter()
            r = _run_worker(spec, log)
            r["wall"] = time.perf_counter() - t0
            rows.append(r)
            log(f"  T={t:>6} {row:<18} {_brief(r)}  ({r['wall']:.0f} s wall)")
            save(res)
    if not args.no_cap:
        largest_under_cap(args, base, cfg, ladder, rows, avail, log, res["cap"], lambda: save(res))
    return res


def cap_ladder(args: argparse.Namespace) -> list[int]:
    t, out = (512 if args.quick else 1024), []
    while t <= args.cap_max_t:
        out.append(t)
        t *= 2
    return out


def _extra(r: dict[str, Any], device: str) -> int | None:
    key = "extra_dev" if device.startswith("cuda") else "extra_rss"
    return r.get(key)


def largest_under_cap(
    args: argparse.Namespace, base: dict[str, Any], cfg: dict[str, int], ladder: list[int],
    rows: list[dict[str, Any]], avail: int, log: Callable[[str], None],
    out: list[dict[str, Any]], save: Callable[[], None],
) -> list[dict[str, Any]]:  # fmt: skip
    """Per method: double T until a run fails or passes the cap; the largest T that fit."""
    cap = int(args.cap_gb * GB)
    log(f"largest T under {args.cap_gb:g} GB of peak extra memory ({ladder[0]}..{ladder[-1]})")
    for row in CAP_ROWS:
        fit: int | None = None
        fit_peak: int | None = None
        stop = f"not tried beyond T={ladder[-1]} (--cap-max-t)"
        tried = []
        for t in ladder:
            known = [r for r in rows if r["row"] == row and r["t"] == t and "skipped" not in r]
            bound = cap_lower_bound(row, cfg, t)
            if bound > cap and not known:
                stop = f"T={t}: over cap, not run (its weights alone are {bound / GB:.1f} GB)"
                break
            if bound > 0.8 * avail and not known:
                stop = f"T={t}: not run (needs more than 80% of available memory)"
                break
            if known:
                r, how = known[0], "from the table"
            else:
                spec = {**base, "row": row, "t": t, "repeats": 0, "cap": cap}
                r, how = _run_worker(spec, log), "run"
            extra = _extra(r, args.device)
            tried.append({"t": t, "extra": extra, "seconds": r.get("seconds"),
                          "error": r.get("error"), "how": how})  # fmt: skip
            log(f"  {row:<18} T={t:>6} {_brief(r)} ({how})")
            if r.get("over_cap") or (extra is not None and extra > cap):
                stop = f"T={t}: over cap" + (f" ({r['error']})" if r.get("error") else
                                              f" (peak extra {extra / MB:.0f} MB)")  # fmt: skip
                break
            if r.get("error"):
                stop = f"T={t}: failed ({r['error']})"
                break
            fit, fit_peak = t, extra
        out.append({"row": row, "largest_t": fit, "peak_extra": fit_peak, "stop": stop,
                    "tried": tried})  # fmt: skip
        save()
    return out


def _brief(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return r["skipped"]
    if r.get("error"):
        return ("over cap: " if r.get("over_cap") else "error: ") + r["error"]
    s = "-" if r.get("seconds") is None else f"{r['seconds']:.2f} s"
    dev = "" if r.get("extra_dev") is None else f", GPU +{r['extra_dev'] / MB:.0f} MB"
    return f"{s}, peak extra {r['extra_rss'] / MB:+.0f} MB{dev}"


# -- report -----------------------------------------------------------------------------------


def _qb(qb: Any) -> str:
    return "auto" if qb is None else str(qb)


def table(res: dict[str, Any], device: str) -> tuple[list[str], list[list[str]]]:
    cuda = device.startswith("cuda")
    head = ["T", "row", "s (median)", "min s", "x sdpa", "peak extra RSS MB"]
    head += ["peak extra GPU MB"] if cuda else []
    head += ["x one layer fp32", "attn MB", "disk MB", "MB/s", "query_block"]
    cfg = res["model"]
    sdpa = {r["t"]: r["seconds"] for r in res["rows"] if r["row"] == "sdpa" and r.get("seconds")}
    out = []
    for r in res["rows"]:
        t = r["t"]
        line = [str(t), r["row"]]
        if r.get("skipped") or r.get("error"):
            why = r.get("skipped") or ("over cap" if r.get("over_cap") else r["error"][:60])
            out.append(line + [why] + ["-"] * (len(head) - 3))
            continue
        s = r["seconds"]
        extra = _extra(r, device) or 0
        line += [f"{s:.2f}", f"{min(r['all_seconds']):.2f}",
                 f"{s / sdpa[t]:.2f}" if t in sdpa else "-",
                 f"{r['extra_rss'] / MB:.0f}"]  # fmt: skip
        if cuda:
            line.append(f"{(r['extra_dev'] or 0) / MB:.0f}")
        b = r.get("bytes", 0)
        line += [
            f"{extra / layer_bytes(cfg, t):.2f}" if r["row"] != "sdpa" else "-",
            num(b / MB) if b else "-",
            num(r["disk"] / MB) if r.get("disk") else "-",
            num(b / MB / s) if b else "-",
            _qb(r["query_block"]) if r["row"].startswith("capture") else "-",
        ]
        out.append(line)
    return head, out


def cap_table(res: dict[str, Any], device: str) -> tuple[list[str], list[list[str]]]:
    head = ["method", "largest T under the cap", "its peak extra MB", "stopped at"]
    rows = []
    for c in res["cap"]:
        rows.append([
            c["row"],
            "none" if c["largest_t"] is None else str(c["largest_t"]),
            "-" if c["peak_extra"] is None else f"{c['peak_extra'] / MB:.0f}",
            c["stop"],
        ])  # fmt: skip
    return head, rows


def summary(res: dict[str, Any], device: str) -> list[str]:
    """One line per T: capture's peak and time next to output_attentions and plain SDPA."""
    by: dict[int, dict[str, dict]] = {}
    for r in res["rows"]:
        by.setdefault(r["t"], {})[r["row"]] = r
    where = "GPU" if device.startswith("cuda") else "RSS"
    out = []
    for t, rows in by.items():
        c, oa, sd = rows.get("capture"), rows.get("output_attentions"), rows.get("sdpa")
        if c is None or c.get("seconds") is None:
            continue
        ce = _extra(c, device) or 0
        if oa is not None and oa.get("seconds") is not None:
            oe = _extra(oa, device) or 0
            f = oe / max(ce, 1)
            less = f"{f:.1f}x less" if f >= 1 else f"{1 / max(f, 1e-9):.1f}x MORE"
            vs = f"vs output_attentions {oe / MB:.0f} MB ({less})"
        elif oa is None:
            vs = "(no output_attentions row)"
        else:
            vs = "vs output_attentions " + (oa.get("skipped") or "over cap / failed")
        time_s = f"time {c['seconds'] / sd['seconds']:.2f}x plain SDPA" if sd else "no sdpa row"
        out.append(f"capture at T={t}: peak extra {where} {ce / MB:.0f} MB {vs}; {time_s}")
    return out


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    cfg = res["model"]
    lines = [
        f"machine: {machine(args.device)}",
        f"model: BertModel {cfg['num_hidden_layers']} layers x {cfg['num_attention_heads']} "
        f"heads, hidden {cfg['hidden_size']}, batch of 1, "
        f"{'last T/8 tokens masked' if args.padded else 'no padding mask'}; capture "
        + (
            "with query_block=" + _qb(args.query_block)
            if res["query_block_available"]
            else "WITHOUT query_block (not in this checkout's capture())"
        ),
        "",
        render(*table(res, args.device), args.markdown),
        "",
    ]
    if res["cap"]:
        lines += [f"Largest T under a cap of {args.cap_gb:g} GB peak extra memory:", "",
                  render(*cap_table(res, args.device), args.markdown), ""]  # fmt: skip
    lines += [("- " if args.markdown else "") + x for x in summary(res, args.device)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"tokens per sample (default {' '.join(map(str, LENGTHS))})")  # fmt: skip
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--repeats", type=int, default=None, help="timed passes (default 2, quick 1)")
    p.add_argument("--query-block", type=int, default=None,
                   help="rows per query block for capture (default: automatic)")  # fmt: skip
    p.add_argument("--cap-gb", type=float, default=None, help="memory cap (default 4; quick 0.1)")
    p.add_argument("--cap-max-t", type=int, default=None,
                   help="largest T the cap search tries (default 16384; quick 2048)")  # fmt: skip
    p.add_argument("--no-cap", action="store_true", help="skip the largest-T-under-a-cap search")
    p.add_argument("--padded", action="store_true",
                   help="every batch carries an attention_mask with its last T/8 tokens "
                        "masked (a ragged archive for capture)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny model and lengths; a smoke test")
    p.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run every row in this process (default on CUDA, where the allocator "
        "gives each row's device peak; host RSS is then sampled per row)",
    )
    p.add_argument("--out-dir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker is not None:
        print(json.dumps(worker(json.loads(args._worker))), flush=True)
        return
    if args.lengths is None:
        args.lengths = list(QUICK_LENGTHS if args.quick else LENGTHS)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.cap_gb is None:
        args.cap_gb = 0.1 if args.quick else 4.0
    if args.cap_max_t is None:
        args.cap_max_t = 2048 if args.quick else 16384
    if args.in_process is None:
        args.in_process = args.device.startswith("cuda")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: CUDA is not available here")

    tmp = args.out_dir is None
    out_dir = Path(tempfile.mkdtemp(prefix="bench-long-")) if tmp else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"machine: {machine(args.device)}")
    t0 = time.perf_counter()

    def save(res: dict) -> None:  # partial results survive a timeout
        if args.json is not None:
            args.json.write_text(json.dumps({**res, "machine": machine(args.device)}, indent=2))

    try:
        res = measure(args, out_dir, log, save)
    finally:
        if tmp:
            shutil.rmtree(out_dir, ignore_errors=True)
    log(f"({time.perf_counter() - t0:.0f} s in all)")
    res["command"] = " ".join(["python", "scripts/bench_long.py", *sys.argv[1:]])
    res["machine"] = machine(args.device)
    print(report(res, args))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
