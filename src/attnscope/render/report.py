"""One self-contained HTML report of an archive and its analysis tables.

Everything is inline: figures are base64 PNGs, the stylesheet and a few lines of
JavaScript (layer/head chooser) are embedded, nothing is fetched, so the file works from
``file://`` and can be mailed to a colleague.

The report draws; it does not analyse. It reads the tables that
:func:`attnscope.analysis.analyze` wrote for this archive (``attnscope report`` and
``attnscope demo`` run the analysis first), and refuses tables computed from another
archive (:class:`~attnscope.errors.StaleTableError`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from attnscope.contracts import AVERAGE_HEAD
from attnscope.errors import ConfigError, SelectionError
from attnscope.render._prepare import prepare_matrix
from attnscope.render._style import STYLE
from attnscope.render.batch import FIGURE_TABLES, load_tables
from attnscope.render.plots import plot_attention_flow, plot_heatmap
from attnscope.render.tables import plot_head_metric, plot_segment_mass
from attnscope.store import AttentionArchive, open_archive

__all__ = ["check_report_path", "write_report"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222}
header{background:#1f2937;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
main{padding:8px 24px 40px;max-width:1300px}h2{border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f3f4f6}td.l,th.l{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}
img{max-width:100%;height:auto;border:1px solid #eee}
select{font-size:14px;margin-right:12px}pre{background:#f7f7f7;padding:8px;overflow:auto}
.muted{color:#666}
"""

_JS = """
(function(){
  var arr=document.getElementById('sel-array'), head=document.getElementById('sel-head');
  function show(){
    var key=arr.value+'|'+head.value, found=false;
    document.querySelectorAll('img.attn').forEach(function(im){
      var on=im.dataset.key===key; im.style.display=on?'':'none'; if(on){found=true;}
    });
    document.getElementById('no-fig').style.display=found?'none':'';
  }
  arr.addEventListener('change',show); head.addEventListener('change',show); show();
  document.body.dataset.ready='1';
})();
"""


def _png(fig: Figure, dpi: int = STYLE.report_dpi) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _head_maps(
    arc: AttentionArchive, name: str, sample: int, dpi: int = STYLE.report_dpi
) -> list[tuple[str, str]]:
    """``[(head tag, base64 PNG)]``: the head average, then every stored head of one sample.

    The average has its own colour scale (it is much flatter than single heads); the
    heads of an array share one scale, so they compare at a glance, and one layout: that
    figure is drawn once, then only the image, the segment lines and the title are
    re-drawn over a cached background (matplotlib blitting) — ~10x cheaper per head than
    a full ``savefig``, which mostly lays out and rasterises tick labels.
    """
    arr = arc[name]
    stack, _, kind = name.split("/")
    q_lay, k_lay = arc.layout.axes(stack, kind)
    heads = arc.heads(name)
    common = dict(
        batch_idx=sample, query_layout=q_lay, key_layout=k_lay, figsize=STYLE.report_map_size
    )
    avg = plot_heatmap(
        arr, head_idx=None, title=f"{name} · sample {sample} · head average", **common
    )
    out = [("avg", _png(avg, dpi=dpi))]
    mats = [
        prepare_matrix(arr, head_idx=i, batch_idx=sample, query_layout=q_lay, key_layout=k_lay)
        for i in range(len(heads))
    ]
    vmax = max(float(np.nanmax(p.data)) for p in mats)
    titles = [f"{name} · sample {sample} · head {h}" for h in heads]
    fig = plot_heatmap(arr, head_idx=0, vmin=0.0, vmax=vmax, title=titles[0], **common)
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout of the first draw
    ax = fig.axes[0]
    im = ax.images[0]
    fore = [im, *ax.lines, *ax.spines.values()]
    for a in fore:
        a.set_visible(False)
    # A blank (not hidden) title keeps its position in the background draw.
    ax.title.set_text(" ")
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)
    for a in fore:
        a.set_visible(True)
    for tag, p, title in zip(map(str, heads), mats, titles):
        canvas.restore_region(background)
        im.set_data(p.data)
        ax.title.set_text(title)
        for a in fore:
            ax.draw_artist(a)
        fig.draw_artist(ax.title)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buf, format="png")
        out.append((tag, base64.b64encode(buf.getvalue()).decode("ascii")))
    plt.close(fig)
    return out


def _img(b64: str, alt: str, cls: str = "", key: str = "") -> str:
    extra = f' class="{cls}" data-key="{html.escape(key)}"' if cls else ""
    return f'<img{extra} alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


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
        parts.append(f"<h3>{side} ({lay.length} tokens)</h3>{_table(df)}")
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
    sample: int = 0,
    arrays: Sequence[str] | None = None,
    top_pairs: int = 10,
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
        Sample whose attention maps are shown.
    arrays
        Array names to include (default all).
    top_pairs
        Rows of the top-pairs table per array (head average).

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
    with open_archive(archive) as arc:
        page = _build(arc, load_tables(tables_dir, arc), sample, arrays, top_pairs)
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
    arrays: Sequence[str] | None,
    k: int,
) -> str:
    names = list(arrays) if arrays is not None else arc.arrays()
    unknown = [n for n in names if n not in arc.arrays()]
    if unknown:
        raise SelectionError(f"unknown array(s) {unknown}; the archive has {arc.arrays()}")
    if not 0 <= sample < arc.n_samples:
        raise SelectionError(f"sample {sample} out of range [0, {arc.n_samples})")
    head_stats, seg, pairs = (tables[name] for name in FIGURE_TABLES)
    meta = arc.metadata
    ident = arc.identity()

    body: list[str] = []
    overview = {
        "archive": str(arc.path),
        "format": arc.format,
        "schema version": arc.schema_version,
        "samples": arc.n_samples,
        "stored dtype": arc.dtype,
        "mode": arc.mode if arc.topk is None else f"{arc.mode} (top-{arc.topk})",
        "arrays": len(arc.arrays()),
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

    # Entropy overview: one layer x head heatmap per (stack, kind).
    figs = []
    for stack, kind in sorted({tuple(n.split("/")[::2]) for n in names}):
        fig = plot_head_metric(
            head_stats,
            stack=stack,
            kind=kind,
            metric="norm_entropy_mean",
            title=f"{stack} {kind}: normalised entropy",
        )
        figs.append(f"<figure>{_img(_png(fig), f'{stack} {kind} entropy')}</figure>")
    body.append(
        "<h2>Entropy per layer and head</h2><p class='muted'>Mean row entropy divided by the "
        "log of the keys each row may attend to (1 = uniform, 0 = one key); column avg is "
        f"the head-average map.</p><div class='grid'>{''.join(figs)}</div>"
    )

    # Attention maps with a chooser.
    heads_all = sorted({h for n in names for h in arc.heads(n)})
    opts_a = "".join(f'<option value="{n}">{n}</option>' for n in names)
    opts_h = '<option value="avg">average</option>' + "".join(
        f'<option value="{h}">head {h}</option>' for h in heads_all
    )
    imgs = [
        _img(b64, f"{n} {h}", cls="attn", key=f"{n}|{h}")
        for n in names
        for h, b64 in _head_maps(arc, n, sample)
    ]
    body.append(
        f"<h2>Attention maps (sample {sample})</h2><p><label>array <select id='sel-array'>"
        f"{opts_a}</select></label><label>head <select id='sel-head'>{opts_h}</select></label>"
        f"</p><p id='no-fig' class='muted'>This head was not stored for this array.</p>"
        + "".join(imgs)
    )

    # Encoder -> decoder flow per decoder layer with cross attention.
    flows = []
    for n in names:
        stack, layer, kind = n.split("/")
        enc_n, dec_n = f"encoder/{layer}/self_attention", f"decoder/{layer}/self_attention"
        if kind == "cross_attention" and enc_n in arc and dec_n in arc:
            fig = plot_attention_flow(
                arc[enc_n],
                arc[dec_n],
                arc[n],
                layer_idx=int(layer),
                batch_idx=sample,
                figsize=STYLE.report_flow_size,
            )
            png = _png(fig, dpi=STYLE.report_flow_dpi)
            flows.append(f"<figure>{_img(png, f'flow layer {layer}')}</figure>")
    if flows:
        body.append(f"<h2>Encoder → decoder flow</h2><div class='grid'>{''.join(flows)}</div>")

    # Modality-to-modality mass: figure + table of the head average over samples.
    seg_parts = []
    for n in names:
        stack, layer, kind = n.split("/")
        sub = seg[
            (seg["stack"] == stack)
            & (seg["layer"] == int(layer))
            & (seg["kind"] == kind)
            & (seg["head"] == AVERAGE_HEAD)
        ]
        if sub.empty:
            continue
        pv = sub.pivot_table(
            index="query_segment", columns="key_segment", values="mass", aggfunc="mean", sort=False
        ).reset_index()
        fig = plot_segment_mass(seg, stack=stack, layer=int(layer), kind=kind)
        seg_parts.append(
            f"<h3>{n}</h3><div class='grid'><figure>{_img(_png(fig), n)}</figure>"
            f"<div>{_table(pv)}</div></div>"
        )
    body.append(
        "<h2>Modality-to-modality attention mass</h2><p class='muted'>Rows: query segment; "
        "columns: key segment; mean over samples of the head-average attention. Each row "
        f"sums to 1.</p>{''.join(seg_parts)}"
    )

    # Top pairs of the head average, sample `sample`.
    tp_parts = []
    for n in names:
        stack, layer, kind = n.split("/")
        sub = (
            pairs[
                (pairs["stack"] == stack)
                & (pairs["layer"] == int(layer))
                & (pairs["kind"] == kind)
                & (pairs["head"] == AVERAGE_HEAD)
                & (pairs["sample"] == sample)
            ]
            .sort_values("rank")
            .head(k)
        )
        if sub.empty:
            continue
        cols = ["rank", "query_label", "key_label", "query_segment", "key_segment", "weight"]
        tp_parts.append(f"<h3>{n}</h3>{_table(sub[cols].reset_index(drop=True), '{:.4f}')}")
    body.append(f"<h2>Top attention pairs (head average, sample {sample})</h2>" + "".join(tp_parts))

    title = f"attnscope report: {html.escape(Path(str(arc.path)).name)}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{title}</h1></header><main>{''.join(body)}</main>"
        f"<script>{_JS}</script></body></html>"
    )
