"""What the capture benchmarks share: the machine line, tables, bytes on disk.

Imported by ``bench_capture.py`` and ``bench_long.py`` (run as scripts, so this folder is
on ``sys.path``).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

__all__ = ["disk_bytes", "machine", "num", "render"]


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder takes (0 when it does not exist)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def num(x: float) -> str:
    """A figure with 0-2 decimals by its size."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2f}"


def render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A markdown table, or aligned plain columns."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(x.rjust(n) for x, n in zip(r, widths)) for r in [head, *rows])


def machine(device: str) -> str:
    """Date, CPU, GPU, torch, python and load average: the line each benchmark prints."""
    import torch

    dev = "no GPU"
    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name(torch.device(device))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{_dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPU cores "
        f"(torch threads {torch.get_num_threads()}), {dev}, torch {torch.__version__}, "
        f"python {platform.python_version()}, load average {load}"
    )
