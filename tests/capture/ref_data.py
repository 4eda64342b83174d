"""The small reference model's token layout and batches, shared by the capture tests."""

from __future__ import annotations

import numpy as np
import torch

from attnscope.capture.synthetic import synthetic_batches

ENC = {"text": 5, "robot0_eef_pos": 1, "agentview_image": 4}
DEC = {"text": 3, "traj": 4}


def batches(n: int = 3, b: int = 2, seed: int = 0, enc: dict = ENC, dec: dict = DEC) -> list:
    """n ``(enc, dec)`` batches of b samples for a 32-wide model."""
    return list(synthetic_batches(n, b, 32, enc=enc, dec=dec, seed=seed))


def reference_weights(model, data: list, device: str = "cpu") -> dict[str, np.ndarray]:
    """The reference model's own ``return_attention_weights=True`` weights per array name,
    float32 on the host, the batches of ``data`` concatenated (run on ``device``)."""
    out: dict[str, list] = {}
    with torch.inference_mode():
        for enc, dec in data:
            enc, dec = ({k: v.to(device) for k, v in x.items()} for x in (enc, dec))
            _, w = model(enc, dec, return_attention_weights=True)
            for stack, layers in w.items():
                for i, layer in enumerate(layers):
                    for kind, t in layer.items():
                        out.setdefault(f"{stack}/{i}/{kind}", []).append(t.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
