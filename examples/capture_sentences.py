"""Capture a Hugging Face checkpoint's attention over sentences.jsonl with the Python API.

The same as ``attnscope capture --hf-model CHECKPOINT --inputs examples/sentences.jsonl
--dtype float32 --out OUT``: batches of 8 sentences in file order, each padded to its own
longest sentence, every sample's tokens and its row id stored beside its attention.

Usage: python examples/capture_sentences.py CHECKPOINT_FOLDER OUT.zarr
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from transformers import AutoModel, AutoTokenizer

from attnscope import capture, open_archive


def main(checkpoint: str, out: str) -> None:
    lines = (Path(__file__).parent / "sentences.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModel.from_pretrained(checkpoint, local_files_only=True).eval()
    batches = [dict(tok(texts[a : a + 8], padding="longest", return_tensors="pt"))
               for a in range(0, len(texts), 8)]  # fmt: skip
    capture(model, batches, out, tokenizer=tok, dtype="float32", progress=False,
            sample_ids={"row": np.arange(len(texts))})  # fmt: skip
    with open_archive(out) as archive:
        labels, _ = archive.tokens("encoder", 2)
        real = archive.masks("encoder")[2]
        print(f"{out}: {archive.n_samples} sentences, {len(archive.arrays)} arrays; "
              f"sample 2 is {[t for t, r in zip(labels, real) if r]}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(sys.argv[1], sys.argv[2])
