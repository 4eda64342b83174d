"""Optional dependencies by install extra, and the one-line hint when one is missing.

The core install (``pip install attnscope``: store, analysis, render, CLI) needs no torch
and no Dask; capture needs ``attnscope[capture]``, Hugging Face models ``attnscope[hf]``,
Dask clusters and xarray/dask views ``attnscope[dask]``, archives on S3 ``attnscope[s3]``,
saved Hugging Face ``datasets`` folders as capture inputs ``attnscope[datasets]``, a
notebook kernel (``attnscope.show`` displays inline) ``attnscope[notebook]``,
TransformerLens models ``attnscope[tl]``, the BertViz export ``attnscope[bertviz]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from attnscope.errors import MissingExtraError

__all__ = ["EXTRA_OF", "require", "missing_extra_error"]

#: top-level module -> the extra that installs it
EXTRA_OF = {
    "torch": "capture",
    "transformers": "hf",
    "dask": "dask",
    "distributed": "dask",
    "xarray": "dask",
    "fsspec": "s3",
    "s3fs": "s3",
    "datasets": "datasets",
    "IPython": "notebook",
    "ipykernel": "notebook",
    "transformer_lens": "tl",
    "bertviz": "bertviz",
}


def missing_extra_error(module: str, feature: str | None = None) -> MissingExtraError:
    """The error to raise when ``module`` (an optional dependency) cannot be imported."""
    root = module.split(".")[0]
    extra = EXTRA_OF.get(root, "all")
    what = f"{feature} needs" if feature else "this needs"
    return MissingExtraError(
        f"{what} the optional package {root!r}, which is not installed; "
        f"install it with: pip install 'attnscope[{extra}]'"
    )


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == module.split(".")[0]:
            raise missing_extra_error(module, feature) from e
        raise
