"""attnscope: capture, store, analyse and render transformer attention.

Importing :mod:`attnscope` is light: the torch-dependent pieces (``Transformer``,
``capture``) are imported on first use, so ``attnscope.render`` and
``attnscope.analysis`` work without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from attnscope.errors import AttnscopeError

__version__ = "0.1.0"

_LAZY = {
    "Transformer": "attnscope.capture.model",
    "TransformerConfig": "attnscope.capture.model",
    "capture": "attnscope.capture",  # the package is callable: attnscope.capture(model, ...)
    "open_archive": "attnscope.store",
    "ArchiveWriter": "attnscope.store",
    "AttentionArchive": "attnscope.store",
    "TokenLayout": "attnscope.store.layout",
    "AttentionVisualizer": "attnscope.render.visualizer",
    "show": "attnscope.render.notebook",
}

__all__ = ["AttnscopeError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name == "capture":
        return importlib.import_module("attnscope.capture")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
