"""Capture: run a PyTorch transformer and stream its attention into an archive.

``attnscope.capture`` is both this package and the capture function: calling the
package, ``attnscope.capture(model, batches, "run.zarr")``, runs
:func:`attnscope.capture.job.capture`.
"""

import sys
import types
from typing import Any

from attnscope.capture.job import CaptureSummary, capture
from attnscope.capture.model import (
    CausalSelfAttention,
    CrossAttention,
    NormalSelfAttention,
    Transformer,
    TransformerConfig,
)

__all__ = [
    "capture",
    "CaptureSummary",
    "Transformer",
    "TransformerConfig",
    "NormalSelfAttention",
    "CausalSelfAttention",
    "CrossAttention",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> CaptureSummary:
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
