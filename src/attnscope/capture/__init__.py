"""Capture: run a PyTorch transformer and stream its attention into an archive.

``attnscope.capture`` is both this package and the capture function: calling the
package, ``attnscope.capture(model, batches, "run.zarr")``, runs
:func:`attnscope.capture.job.capture`.

Why the package is callable (and not a plain attribute of :mod:`attnscope` holding the
function): importing any submodule, ``from attnscope.capture import Transformer`` or the
lazy ``attnscope.Transformer`` alike, makes Python set ``attnscope.capture`` to this
package, replacing whatever ``attnscope`` held under that name. So the package itself
must be the callable. Setting a module's ``__class__`` to a :class:`types.ModuleType`
subclass is the mechanism Python documents for this ("Customizing module attribute
access" in the language reference). See ``docs/capture.md``.
"""

import inspect
import sys
import types
from typing import Any

from attnscope._extras import require

require("torch", "attnscope.capture")

from attnscope.capture.job import CaptureOptions, CaptureSummary, capture  # noqa: E402
from attnscope.capture.model import (  # noqa: E402
    CausalSelfAttention,
    CrossAttention,
    NormalSelfAttention,
    Transformer,
    TransformerConfig,
)

__all__ = [
    "capture",
    "CaptureOptions",
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


# IPython's "Call signature" and "Call docstring" (`capture?`): the function's
_CallableModule.__call__.__doc__ = capture.__doc__
_CallableModule.__call__.__signature__ = inspect.signature(capture).replace(  # type: ignore[attr-defined]
    parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                *inspect.signature(capture).parameters.values()]
)
sys.modules[__name__].__class__ = _CallableModule
# What inspect.signature(attnscope.capture) and IDEs report for the call.
__signature__ = inspect.signature(capture)


def _call_doc(package_doc: str) -> str:
    """The package docstring that ``help(attnscope.capture)`` and ``capture?`` show: what
    users call (the function's summary, signature and parameters) first, then the package."""
    summary, _, rest = inspect.cleandoc(capture.__doc__ or "").partition("\n")
    return (f"{summary}\n\ncapture{__signature__}\n\n{rest.strip()}\n\n"
            f"The package\n-----------\n{package_doc}")


__doc__ = _call_doc(__doc__ or "")
