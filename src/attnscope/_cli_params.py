"""The command line's parameter types: index lists, archive locations, local and table
folders (a URL is kept whole where it may be one, refused in one line where it may not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from attnscope.errors import ConfigError

__all__ = ["ARCHIVE", "LOCAL", "TABLES", "int_list", "str_list"]


def int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """Comma-separated integers and low-high ranges ('0,2,4-7'). An empty list or a
    reversed range ('3-1') would select nothing: refused in one line naming the value."""
    if value is None:
        return None
    form = "expected integers like '0,2,4-7' (ranges low-high)"
    out: list[int] = []
    for part in (p.strip() for p in value.split(",")):
        try:
            ends = [int(x) for x in part.split("-", 1)] if "-" in part[1:] else [int(part)]
        except ValueError:
            if not part:
                continue
            raise click.BadParameter(f"{form}, got {value!r}") from None
        if len(ends) == 2 and ends[0] > ends[1]:
            raise ConfigError(f"--{param.name} {value!r}: range {part!r} is reversed; {form}")
        out.extend(range(ends[0], ends[-1] + 1))
    if not out:
        raise ConfigError(f"--{param.name} selects nothing: got {value!r}; {form}")
    return out


def str_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


class _Archive(click.ParamType):
    """An archive path or fsspec URL, resolved once into a ``Location`` (``Path`` would
    fold ``s3://`` into ``s3:/``)."""

    name = "archive"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        from attnscope.store.backends.location import locate

        return locate(value)


ARCHIVE = _Archive()


class _LocalPath(click.Path):
    """A local output or table folder: a URL is refused (``Path`` would fold ``s3://b/t``
    into a local folder ``s3:/b/t``); a ``file://`` URL becomes its local path."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from attnscope.store.backends.remote import fspath, is_url

        if isinstance(value, str) and is_url(value):
            self.fail(f"{value!r} is a URL; figures and reports are local files only, "
                      "expected a local path", param, ctx)  # fmt: skip
        if isinstance(value, str):
            value = fspath(value)
        return super().convert(value, param, ctx)


LOCAL = _LocalPath(path_type=Path)


class _TablesFolder(click.ParamType):
    """A tables folder: a local path, or an fsspec URL (``s3://bucket/tables``, kept whole
    like an archive URL; reached with the archive's storage options)."""

    name = "folder"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        from attnscope.store.backends.location import locate

        loc = locate(value)
        return loc if loc.remote else Path(loc)


TABLES = _TablesFolder()
