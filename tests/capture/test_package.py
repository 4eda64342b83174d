"""``attnscope.capture`` is the package and the function, in every import spelling and order."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

RUN = textwrap.dedent("""
    import tempfile, torch
    from attnscope.capture.synthetic import synthetic_batches
    torch.manual_seed(0)
    m = Transformer(32, 16, 4, 1, 1).eval()
    data = list(synthetic_batches(1, 2, 32, enc={"t": 3}, dec={"a": 2}))
    with tempfile.TemporaryDirectory() as d:
        s = CALL(m, data, d + "/r.zarr", progress=False)
    assert s.samples == 2, s
    print("ok")
""")

SPELLINGS = {
    "attribute after Transformer import": (
        "import attnscope\nfrom attnscope.capture import Transformer",
        "attnscope.capture",
    ),
    "attribute after the lazy attnscope.Transformer": (
        "import attnscope\nTransformer = attnscope.Transformer",
        "attnscope.capture",
    ),
    "from attnscope import capture": (
        "from attnscope import capture, Transformer",
        "capture",
    ),
    "import attnscope.capture": (
        "import attnscope.capture\nfrom attnscope.capture import Transformer",
        "attnscope.capture",
    ),
    "submodule imported first": (
        "import attnscope.capture.synthetic\nfrom attnscope import capture, Transformer",
        "capture",
    ),
    "the function itself": (
        "from attnscope.capture.job import capture\nfrom attnscope import Transformer",
        "capture",
    ),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_capture_is_callable_in_every_spelling(spelling) -> None:
    imports, call = SPELLINGS[spelling]
    code = imports + "\n" + RUN.replace("CALL", call)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_the_call_has_the_function_signature() -> None:
    import inspect

    import attnscope
    from attnscope.capture.job import capture

    assert inspect.signature(attnscope.capture) == inspect.signature(capture)
    assert attnscope.capture.Transformer is attnscope.Transformer


def _without_torch(code: str) -> subprocess.CompletedProcess:
    # None in sys.modules makes `import torch` raise ModuleNotFoundError, as on a core install
    return subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
        capture_output=True,
        text=True,
    )


def test_import_without_torch_names_the_extra() -> None:
    res = _without_torch(
        "try:\n    import attnscope.capture\nexcept ImportError as e:\n    print(e)"
    )
    assert "pip install 'attnscope[capture]'" in res.stdout, res.stderr


def test_cli_capture_without_torch_is_one_line() -> None:
    res = _without_torch(
        "from attnscope.cli import main\nmain(['capture', '--out', 'x.zarr', '--no-progress'])"
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: MissingExtraError") and "attnscope[capture]" in lines[0]


def test_help_shows_the_functions_signature_and_parameters() -> None:
    """``help(attnscope.capture)`` / ``capture?`` describe the call, not only the package."""
    import inspect
    import pydoc

    import attnscope
    from attnscope.capture.job import capture

    text = pydoc.render_doc(attnscope.capture, renderer=pydoc.plaintext)
    summary = inspect.cleandoc(capture.__doc__).splitlines()[0]
    assert f"attnscope.capture - {summary}" in text  # help's NAME line
    desc = text.split("DESCRIPTION", 1)[1]
    assert desc.lstrip().startswith(f"capture{inspect.signature(capture)}")
    for param in inspect.signature(capture).parameters:
        assert param in desc
    assert "Parameters\n    ----------" in desc and "callable" in desc  # then the package
    # IPython's `capture?`: "Call signature" / "Call docstring" come from __call__
    call = type(attnscope.capture).__call__
    assert call.__doc__ == capture.__doc__
    assert inspect.signature(attnscope.capture.__call__) == inspect.signature(capture)
    params = list(inspect.signature(capture).parameters)
    assert list(inspect.signature(call).parameters) == ["self", *params]
    # the package stays importable as one, submodules included
    import attnscope.capture.synthetic  # noqa: F401
