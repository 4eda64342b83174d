"""Synthetic multi-modal inputs for the reference model (demo, CLI, tests, benchmarks).

Tokens of one modality share a random direction plus a smooth positional drift, so even a
randomly initialised model shows modality structure in its attention, unlike pure noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "GUIDE_ENC",
    "GUIDE_DEC",
    "GUIDE_GROUPS",
    "synthetic_batches",
    "guide_model_config",
    "demo_model",
]

# The guide's modality layout: encoder S = 29 tokens, decoder T = 29 tokens.
GUIDE_ENC = {"text": 10, "robot0_eef_pos": 1, "agentview_image": 9, "agentview_depth": 9}
GUIDE_DEC = {"text": 10, "robot0_eef_pos_past_traj": 10, "robot0_eef_pos_past_traj_delta": 9}
#: what the guide's modalities are (``Transformer(token_groups=...)``): the 9 camera and
#: depth tokens are 3 x 3 patch grids
GUIDE_GROUPS = {
    "text": {"kind": "text"},
    "robot0_eef_pos": {"kind": "state"},
    "agentview_image": {"kind": "image", "grid": [3, 3], "camera": "agentview"},
    "agentview_depth": {"kind": "image", "grid": [3, 3], "camera": "agentview_depth"},
    "robot0_eef_pos_past_traj": {"kind": "trajectory"},
    "robot0_eef_pos_past_traj_delta": {"kind": "trajectory"},
}


def guide_model_config() -> dict[str, int]:
    """The guide's model: 512 wide, 8 heads, 3 + 3 layers, context 100."""
    return {
        "embed_dim": 512,
        "context_length": 100,
        "num_heads": 8,
        "num_encoder_layers": 3,
        "num_decoder_layers": 3,
    }


def synthetic_batches(
    n_batches: int,
    batch_size: int,
    embed_dim: int,
    *,
    enc: Mapping[str, int] = GUIDE_ENC,
    dec: Mapping[str, int] = GUIDE_DEC,
    seed: int = 0,
    scale: float = 3.0,
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Yield ``n_batches`` ``(enc, dec)`` pairs of modality dicts, each ``(B, n, embed_dim)``.

    Deterministic for a given ``seed``: re-iterating gives the same batches (what
    ``capture(resume=True)`` relies on).
    """
    g = torch.Generator().manual_seed(seed)
    names = list(dict.fromkeys([*enc, *dec]))
    direction = {n: torch.randn(embed_dim, generator=g) for n in names}
    drift = torch.randn(embed_dim, generator=g)

    def side(lengths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        out = {}
        for name, n in lengths.items():
            pos = torch.linspace(-1, 1, n).view(1, n, 1)
            base = scale * direction[name] + scale * pos * drift
            out[name] = base + torch.randn(batch_size, n, embed_dim, generator=g)
        return out

    for _ in range(n_batches):
        yield side(enc), side(dec)


def demo_model(
    seed: int = 0,
    sharpness: float = 3.0,
    *,
    token_groups: Mapping[str, Any] | None = None,
    **overrides: int,
) -> torch.nn.Module:
    """The guide's model with random weights, query/key projections scaled by ``sharpness``.

    At default init every head is near uniform (entropy ~ log S); scaling the query and
    key projections multiplies the logits by ``sharpness**2`` so random heads become
    peaky and differ from each other — closer to a trained model's attention.
    ``token_groups`` types the layout (e.g. :data:`GUIDE_GROUPS`, what the demo passes).
    """
    from attnscope.capture.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(**{**guide_model_config(), **overrides}, token_groups=token_groups).eval()
    d = model.config.embed_dim
    with torch.no_grad():
        for mod in model.attention_modules().values():
            mod.q_proj.weight.mul_(sharpness)
            mod.kv_proj.weight[:d].mul_(sharpness)  # the key half of the fused k/v projection
    return model
