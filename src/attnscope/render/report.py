"""One self-contained HTML report of an archive and its analysis tables: a viewer of the data.

The page embeds the stored attention itself, not pictures of it: per array and embedded
sample, every head as float16 (little-endian, base64; the archive's own values when it stores
float16), over that sample's real tokens only (ragged archives: padded rows and columns left
out, each sample with its own labels; see ``_crop``), block-max reduced beyond
:data:`MAX_CELLS` tokens per axis. A script draws the maps
client-side on a canvas through the colormap's LUT: pick array, sample and head (or the mean
of the heads), hover a cell for its query token, key token and weight, click a query for its
row as bars; the analysis tables (entropy, modality-to-modality mass, top pairs) follow the
choice. Nothing is fetched, so the file works from ``file://`` and can be mailed.

The report draws; it does not analyse. It reads the tables that
:func:`attnscope.analysis.analyze` wrote for this archive (``attnscope report`` and
``attnscope demo`` run the analysis first), and refuses tables computed from another
archive (:class:`~attnscope.errors.StaleTableError`).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb

from attnscope.contracts import AVERAGE_HEAD, HEAD_INDEX, KIND_AXES, STACKS
from attnscope.errors import ConfigError, SelectionError, ShapeError
from attnscope.render._crop import crop_layout, positions_of, read_real
from attnscope.render._figure_jobs import has_timeline, load_timeline
from attnscope.render._prepare import block_reduce, causal_mask
from attnscope.render._style import STYLE, colormap, mask_color
from attnscope.render._viewer import CSS, markup, script
from attnscope.render.batch import FIGURE_TABLES, load_tables
from attnscope.render.overlay import image_groups
from attnscope.render.tables import drop_forced
from attnscope.store import AttentionArchive, check_structure, open_archive

__all__ = ["check_report_path", "write_report"]

#: embedded attention, base64 bytes, that the default sample choice stays under
MAX_DATA_BYTES = 1_300_000  # maps; with tables, frames and script the demo page stays under 2 MB
#: longest map axis embedded as is; longer axes are block-max reduced (as figures are)
MAX_CELLS = 128
#: longest side of an embedded camera frame (larger frames are decimated)
MAX_FRAME_PX = 64


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _lut(name: str) -> str:
    """The colormap as 256 RGB triples, base64."""
    rgb = colormap(name)(np.linspace(0.0, 1.0, 256))[:, :3]
    return _b64(np.round(rgb * 255).astype(np.uint8))


def _head_maps(
    arr: Any, sample: int, rows: np.ndarray | None, cols: np.ndarray | None, max_cells: int
) -> dict[str, Any]:
    """One sample's ``(H, t, s)`` maps restricted to its real tokens (``rows`` x ``cols``,
    None = all), float16 little-endian, block-max reduced past ``max_cells``; with sizes."""
    x = read_real(arr, (sample,), rows, cols).astype(np.float32)
    if x.ndim != 3:
        raise ShapeError(f"expected one sample of shape (H, T, S), got {x.shape}")
    causal = False
    if arr.kind == "self_attention":  # masked cells: the page draws them in the mask colour
        kept = arr.query_rows
        q_pos = rows if kept is None else (np.asarray(kept) if rows is None
                                           else np.asarray(kept)[rows])
        causal = causal_mask(x.mean(axis=0), q_pos, cols) is not None
    reduced = [block_reduce(m, max_cells, "max") for m in x]
    _, fr, fc = reduced[0]
    maps = np.stack([r for r, _, _ in reduced]).astype("<f2")
    t_real, s_real = x.shape[1:]
    return {"b64": _b64(maps), "T": int(t_real), "S": int(s_real), "t": int(maps.shape[1]),
            "s": int(maps.shape[2]), "fr": fr, "fc": fc, "causal": causal}


def _side(lay: Any, pos: np.ndarray | None) -> dict[str, Any]:
    """One sample's tokens on one side: labels and segments of its real tokens, and their
    stored positions (``pos``; null when every token is real)."""
    return {
        "labels": [str(x) for x in lay.labels],
        "segments": [[s.name, s.start, s.stop] for s in lay.segments],
        "pos": None if pos is None else [int(i) for i in pos],
    }


def _tokens(
    arc: AttentionArchive, samples: Sequence[int], sides: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, int], np.ndarray | None]]:
    """``{side: {sample: tokens}}`` for the page (each sample's own labels, cropped to its
    real tokens) and ``{(side, sample): real positions}`` for cropping the maps."""
    page: dict[str, dict[str, Any]] = {sd: {} for sd in sides}
    real: dict[tuple[str, int], np.ndarray | None] = {}
    for smp in samples:
        own = arc.sample_layout(smp)
        for sd in sides:
            pos = real[(sd, smp)] = positions_of(arc.masks(sd, smp))
            lay = own.side(sd)
            page[sd][str(smp)] = _side(lay if pos is None else crop_layout(lay, pos), pos)
    return page, real


def _kept_tokens(arc: AttentionArchive, arr: Any, side: str, samples: Sequence[int]
                 ) -> tuple[dict[str, Any], dict[int, np.ndarray | None]]:
    """Tokens of an array's kept query rows (a capture row policy) per sample: labels and
    segments of its real kept rows, ``pos`` their original positions; and the stored rows
    (among the kept ones) to read, None when every kept row is real."""
    kept = np.asarray(arr.query_rows, dtype=np.int64)
    page, rows = {}, {}
    for smp in samples:
        stored = positions_of(arc.masks(side, smp)[kept])
        orig = kept if stored is None else kept[stored]
        lay = crop_layout(arc.sample_layout(smp).side(side), orig)
        page[str(smp)] = _side(lay, orig)
        rows[smp] = stored
    return page, rows


def _costs(arc: AttentionArchive, names: Sequence[str], lo: int, hi: int, max_cells: int
           ) -> np.ndarray:
    """Base64 bytes of the maps of samples ``lo:hi``, ``(len(names), hi - lo)``: per array
    and sample, real tokens only."""
    real = {}
    out = np.zeros((len(names), hi - lo), dtype=np.int64)
    for i, name in enumerate(names):
        stack, _, kind = name.split("/")
        q, k = KIND_AXES[(stack, kind)]
        for sd in (q, k):
            if sd not in real:
                real[sd] = np.minimum(arc.masks(sd, slice(lo, hi)).sum(1), max_cells)
        h = int(arc[name].shape[1])
        out[i] = 4 * -(-h * real[q] * real[k] * 2 // 3)
    return out


def _cost(arc: AttentionArchive, names: Sequence[str], lo: int, hi: int, max_cells: int
          ) -> np.ndarray:
    """Base64 bytes of the maps of samples ``lo:hi`` (every array, real tokens only)."""
    return _costs(arc, names, lo, hi, max_cells).sum(axis=0)


def _choose_samples(
    arc: AttentionArchive, names: Sequence[str], samples: Sequence[int] | None, sample: int,
    max_cells: int, max_bytes: int,
) -> list[int]:
    n = arc.n_samples
    if samples is not None:
        chosen = sorted({int(s) for s in samples} | {sample})
        bad = [s for s in chosen if not 0 <= s < n]
        if bad:
            raise SelectionError(f"sample {bad[0]} out of range [0, {n})")
        return chosen
    # the first samples whose maps (real tokens only) fit the budget, at least one
    k, used, step = 0, 0, 1024
    while k < n:
        cost = np.cumsum(_cost(arc, names, k, min(n, k + step), max_cells)) + used
        fit = int(np.searchsorted(cost, max_bytes, side="right"))
        k += fit
        if fit < len(cost):
            break
        used = int(cost[-1])
    return sorted(set(range(max(1, k))) | {sample})


def _images(arc: AttentionArchive, names: Sequence[str]) -> dict[str, list[Any]]:
    """Image groups of each array's key side: ``[name, start, stop, rows, cols, frame
    camera or None]`` (stored positions; the frame camera when frames are stored)."""
    cams = set(arc.cameras())
    out: dict[str, list[Any]] = {}
    for name in names:
        stack, _, kind = name.split("/")
        groups = image_groups(arc.layout.side(KIND_AXES[(stack, kind)][1]))
        if groups:
            out[name] = [[g.name, g.start, g.stop, *g.group.grid,
                          next((c for c in (g.group.camera, g.name) if c in cams), None)]
                         for g in groups.values()]
    return out


def _frames(arc: AttentionArchive, images: dict[str, list[Any]], samples: Sequence[int]
            ) -> dict[str, dict[str, Any]]:
    """``{camera: {sample: {w, h, b64 RGB}}}`` of the embedded samples, each frame decimated
    to at most :data:`MAX_FRAME_PX` pixels a side."""
    out: dict[str, dict[str, Any]] = {}
    for cam in sorted({g[5] for groups in images.values() for g in groups if g[5]}):
        out[cam] = {}
        for smp in samples:
            f = arc.frame(cam, smp)
            step = -(-max(f.shape[:2]) // MAX_FRAME_PX)
            f = np.ascontiguousarray(f[::step, ::step, :3])
            out[cam][str(smp)] = {"w": int(f.shape[1]), "h": int(f.shape[0]), "b64": _b64(f)}
    return out


def _timeline(tables_dir: str | os.PathLike[str], arc: AttentionArchive) -> dict[str, Any] | None:
    """The ``timeline`` table as lines: ``{"stack|kind": {episode: {layer: {head: [[key
    segment, steps, mass], ...]}}}}``; None without ``timeline.parquet``."""
    if not has_timeline(tables_dir):  # a local folder or a URL
        return None
    df = load_timeline(tables_dir, arc)
    series: dict[str, Any] = {}
    keys = ["stack", "kind", "episode", "layer", HEAD_INDEX]
    for (st, kd, ep, lyr, hd), g in df.groupby(keys, sort=True):
        mass = g.groupby(["key_segment", "step"], sort=False)["mass"].mean()
        lines = [[str(seg), [int(x) for x in m.index.get_level_values("step")],
                  [round(float(v), 4) for v in m.to_numpy()]]
                 for seg, m in ((seg, mass.loc[[seg]]) for seg in dict.fromkeys(g["key_segment"]))]
        (series.setdefault(f"{st}|{kd}", {}).setdefault(str(int(ep)), {})
         .setdefault(str(int(lyr)), {}))[str(int(hd))] = lines
    query = str(df["query_group"].iloc[0]) if len(df) else ""
    return {"query": query, "series": series}


def _viewer_data(
    arc: AttentionArchive, names: Sequence[str], tables: dict[str, pd.DataFrame] | None,
    samples: list[int], sample: int, k: int, max_cells: int, head: int | None = None,
) -> dict[str, Any]:
    """The viewer's JSON document (see :mod:`attnscope.render._viewer`); ``tables`` None:
    no analysis tables (the viewer hides their section)."""
    used = [sd for sd in STACKS
            if any(sd in KIND_AXES[(n.split("/")[0], n.split("/")[2])] for n in names)]
    tokens, real = _tokens(arc, samples, used)
    arrays = []
    for name in names:
        stack, layer, kind = name.split("/")
        q_side, k_side = KIND_AXES[(stack, kind)]
        arr = arc[name]
        rows_side, qreal = q_side, {smp: real[(q_side, smp)] for smp in samples}
        if arr.query_rows is not None:  # a row policy: the rows get their own tokens
            rows_side = f"{q_side}@{name}"
            tokens[rows_side], qreal = _kept_tokens(arc, arr, q_side, samples)
        data = {str(smp): _head_maps(arr, smp, qreal[smp], real[(k_side, smp)],
                                     max_cells) for smp in samples}
        arrays.append({
            "name": name, "stack": stack, "layer": int(layer), "kind": kind,
            "heads": [int(h) for h in arc.heads[name]], "rows": rows_side, "cols": k_side,
            "data": data,
        })
    if tables is not None:
        head_stats, seg, pairs = (tables[n] for n in FIGURE_TABLES)
    return {
        "lut": _lut(STYLE.cmap),
        "mask": [int(round(255 * c)) for c in to_rgb(mask_color(STYLE.cmap))],
        # a model with one segment per side (text only): its 1 x 1 mass says nothing
        "mass_shown": any(len(arc.layout.side(sd).segments) > 1 for sd in used),
        "samples": samples,
        "initial": {"array": names[0], "sample": sample, "head": head},
        "tokens": tokens,
        "arrays": arrays,
        "tables": tables is not None,
        "entropy": {} if tables is None else _entropy(head_stats, names),
        "mass": {} if tables is None else _mass(seg, names),
        "pairs": {} if tables is None else _pairs(pairs, names, samples, k),
        "images": (images := _images(arc, names)),
        "frames": _frames(arc, images, samples),
    }


def _rows(df: pd.DataFrame, name: str) -> pd.DataFrame:
    stack, layer, kind = name.split("/")
    return df[(df["stack"] == stack) & (df["layer"] == int(layer)) & (df["kind"] == kind)]


def _entropy(head_stats: pd.DataFrame, names: Sequence[str]) -> dict[str, Any]:
    """Normalised entropy, layer x head (head -1 = the mean map), per (stack, kind)."""
    out = {}
    for stack, kind in dict.fromkeys(tuple(n.split("/")[::2]) for n in names):
        sub = head_stats[(head_stats["stack"] == stack) & (head_stats["kind"] == kind)]
        if sub.empty:
            continue
        pv = sub.pivot_table(index="layer", columns=HEAD_INDEX, values="norm_entropy_mean",
                             aggfunc="mean").sort_index().sort_index(axis=1)
        heads = [h for h in pv.columns if h != AVERAGE_HEAD] + (
            [AVERAGE_HEAD] if AVERAGE_HEAD in pv.columns else [])
        pv = pv[heads]
        vals = [[None if np.isnan(v) else round(float(v), 4) for v in row]
                for row in pv.to_numpy(dtype=np.float64)]
        out[f"{stack}|{kind}"] = {"layers": [int(x) for x in pv.index],
                                  "heads": [int(h) for h in heads], "values": vals}
    return out


def _mass(seg: pd.DataFrame, names: Sequence[str]) -> dict[str, Any]:
    """Query segment x key segment mass per array and head, mean over samples."""
    out: dict[str, Any] = {}
    for name in names:
        sub = _rows(seg, name)
        per_head = {}
        for head, g in sub.groupby(HEAD_INDEX, sort=True):
            pv = g.pivot_table(index="query_segment", columns="key_segment", values="mass",
                               aggfunc="mean", sort=False)
            rows = list(dict.fromkeys(g["query_segment"]))
            cols = list(dict.fromkeys(g["key_segment"]))
            pv = pv.reindex(index=rows, columns=cols)
            per_head[str(int(head))] = {
                "q": rows, "k": cols,
                "m": [[None if np.isnan(v) else round(float(v), 4) for v in r]
                      for r in pv.to_numpy(dtype=np.float64)],
            }
        out[name] = per_head
    return out


def _pairs(pairs: pd.DataFrame, names: Sequence[str], samples: list[int], k: int
           ) -> dict[str, Any]:
    """The ``k`` heaviest (query, key, weight, query label, key label) per array, embedded
    sample and head; positions are stored ones and the labels the table's (each sample's own).
    Forced cells (a query's only allowed key, e.g. causal row 0 at weight 1) are left out."""
    cols = ["query", "key", "weight", "query_label", "key_label"]
    out: dict[str, Any] = {}
    pairs = drop_forced(pairs)
    for name in names:
        sub = _rows(pairs, name)
        sub = sub[sub["sample"].isin(samples)].sort_values("rank", kind="stable")
        out[name] = {
            f"{int(s)}|{int(h)}": [[int(q), int(kk), round(float(w), 6), _text(ql), _text(kl)]
                                   for q, kk, w, ql, kl in g[cols].head(k)
                                   .itertuples(index=False)]
            for (s, h), g in sub.groupby(["sample", HEAD_INDEX], sort=True)
        }
    return out


def _text(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else str(x)


def _json_for_script(obj: Any) -> str:
    """JSON that cannot end its ``<script>`` element or open a comment, whatever the labels."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _table(df: pd.DataFrame, float_fmt: str = "{:.3f}") -> str:
    head = "".join(f'<th class="l">{html.escape(str(c))}</th>' for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for v in r.tolist():
            if isinstance(v, float):
                cells.append(f"<td>{float_fmt.format(v)}</td>")
            else:
                cells.append(f'<td class="l">{html.escape(str(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _kv(d: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><th class="l">{html.escape(str(k))}</th><td class="l">'
        f"{html.escape(v if isinstance(v, str) else json.dumps(v, default=str))}</td></tr>"
        for k, v in d.items()
    )
    return f"<table>{rows}</table>"


def _layout_section(arc: AttentionArchive) -> str:
    parts = []
    for side in ("encoder", "decoder"):
        lay = getattr(arc.layout, side)
        if lay is None:
            continue
        df = pd.DataFrame(
            [(s.name, s.start, s.stop, len(s)) for s in lay.segments],
            columns=["segment", "start", "stop", "tokens"],
        )
        real = ""
        if arc.ragged and arc.n_samples:
            n = arc.lengths(side)
            real = f"; real tokens per sample {int(n.min())}-{int(n.max())}"
        parts.append(f"<h3>{side} ({lay.length} tokens{real})</h3>{_table(df)}")
    return "".join(parts)


def check_report_path(out: str | os.PathLike[str]) -> Path:
    """``out`` as a Path, refused when it is an existing folder (a report is one file)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"report path {str(out)!r} is a folder; expected an .html file path")
    return out


def write_report(
    archive: str | os.PathLike[str] | AttentionArchive,
    out: str | os.PathLike[str],
    *,
    tables_dir: str | os.PathLike[str] | None = None,
    sample: int | None = None,
    samples: Sequence[int] | None = None,
    arrays: Sequence[str] | None = None,
    top_pairs: int = 10,
    max_cells: int = MAX_CELLS,
    max_bytes: int = MAX_DATA_BYTES,
) -> Path:
    """Write a self-contained HTML report of ``archive`` to ``out``.

    Parameters
    ----------
    archive
        Archive path or open :class:`AttentionArchive`.
    out
        The HTML file; an existing folder there is refused. Written atomically
        (``out.partial``, then renamed): a failed report leaves no partial file.
    tables_dir
        Folder written by :func:`attnscope.analysis.analyze` for this archive (required:
        the report does not run the analysis itself). Tables of another archive raise
        :class:`~attnscope.errors.StaleTableError`.
    sample
        Sample shown when the page opens (always embedded); default the first of
        ``samples`` as given, else 0.
    samples
        Samples embedded in the page (default: the first ones whose maps fit in
        ``max_bytes`` of base64, at least one).
    arrays
        Array names to include (default all).
    top_pairs
        Rows of the top-pairs table per array, sample and head.
    max_cells
        Longest map axis embedded as is; longer axes are block-max reduced.
    max_bytes
        Budget of embedded attention for the default choice of ``samples``.

    Returns
    -------
    Path of the HTML file.

    Examples
    --------
    >>> from attnscope.analysis import analyze                        # doctest: +SKIP
    >>> analyze("run.zarr", "tables")                                  # doctest: +SKIP
    >>> write_report("run.zarr", "report.html", tables_dir="tables")  # doctest: +SKIP
    """
    out = check_report_path(out)
    if tables_dir is None:
        raise ConfigError(
            "write_report needs tables_dir, the folder written by attnscope.analysis.analyze "
            "(`attnscope analyze ARCHIVE --out DIR`); the report does not analyse"
        )
    if sample is None:
        sample = int(next(iter(samples), 0)) if samples is not None else 0
    with open_archive(archive) as arc:
        check_structure(arc, every_chunk=False)
        page = _build(arc, load_tables(tables_dir, arc), sample, samples, arrays, top_pairs,
                      max_cells, max_bytes, _timeline(tables_dir, arc))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        partial.write_text(page, encoding="utf-8")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _build(
    arc: AttentionArchive,
    tables: dict[str, pd.DataFrame],
    sample: int,
    samples: Sequence[int] | None,
    arrays: Sequence[str] | None,
    k: int,
    max_cells: int,
    max_bytes: int,
    timeline: dict[str, Any] | None = None,
) -> str:
    names = list(arrays) if arrays is not None else list(arc.arrays)
    unknown = [n for n in names if n not in arc.arrays]
    if unknown:
        raise SelectionError(f"unknown array(s) {unknown}; the archive has {list(arc.arrays)}")
    if not names:
        raise SelectionError(f"no arrays selected; the archive has {list(arc.arrays)}")
    if not 0 <= sample < arc.n_samples:
        raise SelectionError(f"sample {sample} out of range [0, {arc.n_samples})")
    if max_cells < 1:
        raise ConfigError(f"max_cells must be >= 1, got {max_cells}")
    chosen = _choose_samples(arc, names, samples, sample, max_cells, max_bytes)
    data = _viewer_data(arc, names, tables, chosen, sample, k, max_cells)
    data["timeline"] = timeline
    meta = arc.metadata
    ident = arc.identity()

    body: list[str] = []
    shown = (f"samples {chosen[0]}-{chosen[-1]}" if chosen == list(range(chosen[0], chosen[-1] + 1))
             else "samples " + ", ".join(map(str, chosen)))
    body.append(
        "<h2>Attention</h2>"
        + markup("", f"{shown} of {arc.n_samples} embedded "
                     "(<code>attnscope report --samples</code> chooses).")
    )
    overview = {
        "archive": str(arc.path),
        "format": arc.format,
        "schema version": arc.schema_version,
        "samples": arc.n_samples,
        "stored dtype": arc.dtype,
        "mode": arc.mode if arc.topk is None else f"{arc.mode} (top-{arc.topk})",
        "arrays": len(arc.arrays),
        "fingerprint": ident.get("fingerprint"),
    }
    body.append(f"<h2>Archive</h2>{_kv(overview)}")
    prov = meta.get("provenance", {})
    body.append(f"<h3>Provenance</h3>{_kv(prov)}" if prov else "")
    body.append(
        "<h3>Model config</h3><pre>"
        + html.escape(json.dumps(meta.get("model_config", {}), indent=1, default=str))
        + "</pre>"
    )
    body.append(f"<h2>Modality layout</h2>{_layout_section(arc)}")

    title = f"attnscope report: {html.escape(Path(str(arc.path)).name)}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{title}</h1></header><main>{''.join(body)}</main>"
        "<script type='application/json' id='attnscope-data'>"
        f"{_json_for_script(data)}</script>"
        f"{script('', True)}</body></html>"
    )
