"""Image-patch overlays: where on a camera image a query token (or group) looks.

For one sample, one attention array and a chosen query (a segment name, ``"last"``,
``"all"`` or a list of token indices), the attention mass each image patch receives is
reshaped to the image group's patch grid (``TokenGroup(kind="image", grid=(rows, cols))``
in the archive's layout) and drawn as a heatmap, optionally over the camera frame.

Conventions (docs/render.md, Overlays):

* **Absolute mass, not renormalised.** A patch's value is the weight the query row puts on
  it, averaged over the selected (real) query rows and, for the head mean, over heads. The
  patches therefore sum to the fraction of the rows' mass that lands on the image, which the
  title states; renormalising over the patches would make an image the query ignores look
  as bright as one it reads.
* **Default array**: decoder queries read cross-attention, encoder queries encoder
  self-attention; the default layer is the stack's last.
* **Ragged archives**: only the sample's real query tokens are averaged; a padded patch is
  NaN (drawn blank).
* **Upsampling** (only with a frame): ``"bilinear"`` interpolates between patch centres
  (edge patches clamp, like ``align_corners=False``); ``"nearest"`` paints each patch as a
  flat block. The heat is drawn at the frame's resolution with ``alpha`` over it.

Preparation (:func:`prepare_overlay`) is apart from drawing (:func:`plot_overlay`), so tests
check the grid without pixels. Never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnscope.contracts import EPISODE_ID, KIND_AXES, STEP_ID
from attnscope.errors import ConfigError, SelectionError, ShapeError
from attnscope.render._prepare import AxisSpec, PreparedMatrix, head_position
from attnscope.render._style import STYLE, plain
from attnscope.store import check_structure, open_archive
from attnscope.store.layout import Segment, SideLayout

__all__ = [
    "UPSAMPLING",
    "OverlayData",
    "default_array",
    "find_frame",
    "image_groups",
    "plot_overlay",
    "prepare_overlay",
    "read_frame",
    "resolve_query",
    "stored_frame",
    "upsample",
]

#: how the patch grid is stretched over a frame
UPSAMPLING = ("auto", "bilinear", "nearest")
#: ``upsampling="auto"``: grids with fewer patches than this on a side are drawn as flat
#: blocks (nearest); smoothing a 3 x 3 grid would invent structure between patches
NEAREST_BELOW = 8


def resolve_upsampling(method: str, grid_shape: tuple[int, ...]) -> str:
    """``"nearest"`` or ``"bilinear"``: ``"auto"`` is nearest below :data:`NEAREST_BELOW`
    patches a side, bilinear from there (bilinear is opt-in for small grids)."""
    if method not in UPSAMPLING:
        raise ConfigError(f"unknown upsampling {method!r}; expected one of {UPSAMPLING}")
    if method != "auto":
        return method
    return "nearest" if min(grid_shape[:2]) < NEAREST_BELOW else "bilinear"
#: the named queries (besides segment names and index lists)
QUERY_WORDS = ("all", "last")


@dataclass(frozen=True)
class OverlayData:
    """A prepared overlay: the patch grid and what it shows."""

    #: (rows, cols) attention mass per patch, row-major like the tokens; NaN = padded patch
    grid: np.ndarray
    #: share of the selected rows' total mass that lands on the image (= nansum of grid
    #: for softmax rows)
    fraction: float
    image: str
    camera: str | None
    array: str
    sample: int
    head: int | None
    query: str
    #: the real query token indices averaged
    queries: tuple[int, ...]

    def title(self) -> str:
        who = "mean of heads" if self.head is None else f"head {self.head}"
        return (
            f"{self.image} <- {self.query}\n{100 * self.fraction:.1f}% of the mass on the "
            f"image\n{self.array}, {who}, sample {self.sample}"
        )


def image_groups(side: SideLayout) -> dict[str, Segment]:
    """The segments of ``side`` declared as images, by name."""
    return {s.name: s for s in side.segments if s.group is not None and s.group.kind == "image"}


def resolve_query(
    side: SideLayout, query: str | int | Sequence[int], real: np.ndarray | None = None
) -> tuple[tuple[int, ...], str]:
    """``(real token indices, display name)`` of a query selection (:meth:`SideLayout.select`)."""
    if isinstance(query, str) and query not in QUERY_WORDS:
        names = [s.name for s in side.segments]
        if query not in names:
            raise SelectionError(
                f"query {query!r} is no segment of this side; expected one of {names}, "
                f"{list(QUERY_WORDS)} or token indices"
            )
    return side.select(query, real)


def default_array(arc: Any, query: Any) -> tuple[str, str]:
    """``(stack, kind)`` an overlay reads when none is given: decoder cross-attention for
    decoder queries, encoder self-attention for encoder queries (a segment name decides
    the side; otherwise the decoder when the archive has cross-attention)."""
    names = set(arc.arrays)
    has_cross = any(n.endswith("/cross_attention") for n in names)
    lay = arc.layout
    if isinstance(query, str) and query not in QUERY_WORDS:
        if (
            has_cross
            and lay.decoder is not None
            and query in {s.name for s in lay.decoder.segments}
        ):
            return "decoder", "cross_attention"
        return "encoder", "self_attention"
    return ("decoder", "cross_attention") if has_cross else ("encoder", "self_attention")


def _array_name(arc: Any, array: str | None, layer: int | None, query: Any) -> str:
    if array is not None:
        if array not in arc.arrays:
            raise SelectionError(f"no array {array!r}; expected one of {sorted(arc.arrays)}")
        return array
    stack, kind = default_array(arc, query)
    layers = [lyr for lyr in arc.layers.get(stack, ()) if kind in arc.kinds[stack, lyr]]
    if not layers:
        raise SelectionError(f"the archive has no {stack} {kind}; pass array='stack/layer/kind'")
    if layer is None:
        layer = layers[-1]
    if layer not in layers:
        raise SelectionError(f"layer {layer!r} has no {stack} {kind}; expected one of {layers}")
    return f"{stack}/{layer}/{kind}"


def prepare_overlay(
    archive_or_path: Any,
    *,
    sample: int = 0,
    image: str | None = None,
    query: str | int | Sequence[int] = "all",
    head: int | None = None,
    array: str | None = None,
    layer: int | None = None,
) -> OverlayData:
    """The patch grid of one overlay (no drawing).

    Parameters
    ----------
    archive_or_path
        An archive whose layout declares an image group on the key side.
    sample
        Sample index.
    image
        Image segment name (default: the key side's first image group).
    query
        Segment name of the query side, ``"all"``, ``"last"`` or token indices.
    head
        The model's head id (``AttentionArray.heads``), or ``None`` for the mean over heads.
    array, layer
        ``"stack/layer/kind"`` to read; default :func:`default_array` at ``layer`` (default:
        the last).

    Returns
    -------
    OverlayData

    Examples
    --------
    >>> ov = prepare_overlay("run.zarr", query="robot0_eef_pos_past_traj")  # doctest: +SKIP
    >>> ov.grid.shape, ov.fraction  # doctest: +SKIP
    ((3, 3), 0.31)
    """
    with open_archive(archive_or_path) as arc:
        check_structure(arc, every_chunk=False)
        name = _array_name(arc, array, layer, query)
        arr = arc.attention(name)
        qside, kside = KIND_AXES[(arr.stack, arr.kind)]
        qlay, klay = arc.layout.side(qside), arc.layout.side(kside)
        imgs = image_groups(klay)
        if not imgs:
            raise SelectionError(
                f"{name}: the {kside} side has no image group (segments "
                f"{[s.name for s in klay.segments]} are not typed as images); declare one, e.g. "
                "token_groups={'agentview_image': {'kind': 'image', 'grid': [3, 3]}}"
            )
        if image is None:
            image = next(iter(imgs))
        if image not in imgs:
            raise SelectionError(
                f"{image!r} is no image group of {kside}; expected one of {list(imgs)}"
            )
        n = int(arc.n_samples)
        if (
            isinstance(sample, bool)
            or not isinstance(sample, (int, np.integer))
            or not 0 <= sample < n
        ):
            raise SelectionError(
                f"sample {sample!r} out of range: the archive has samples 0..{n - 1}"
            )
        pos = None if head is None else head_position(arr, head)  # model head id -> axis
        qreal = kreal = None
        if arc.ragged:
            qreal = arc.masks(qside, slice(sample, sample + 1))[0]
            kreal = arc.masks(kside, slice(sample, sample + 1))[0]
        kept = arr.query_rows  # a row policy: only the stored rows can be selected
        if kept is not None:
            full = np.zeros(qlay.length, dtype=bool)
            full[kept] = True if qreal is None else qreal[kept]
            qreal = full
        try:
            queries, qname = resolve_query(qlay, query, qreal)
        except SelectionError as e:
            if kept is None:
                raise
            raise SelectionError(
                f"{e}; {name} keeps only query rows {kept.tolist()} (a capture row policy)"
            ) from None
        stored = list(queries) if kept is None else np.searchsorted(kept, queries).tolist()
        seg = imgs[image]
        w = np.asarray(arr[sample] if pos is None else arr[sample, pos], dtype=np.float32)
        w = w[None] if pos is not None else w  # (H, T, S)
        rows = w[:, stored, :].mean(axis=1).mean(axis=0)  # (S,) mean row of the selection
        mass = rows[seg.start : seg.stop].astype(np.float64)
        if kreal is not None:
            mass = np.where(kreal[seg.start : seg.stop], mass, np.nan)
        total = float(np.nansum(rows))
        grid = mass.reshape(seg.group.grid)
        frac = float(np.nansum(grid) / total) if total > 0 else 0.0
        return OverlayData(
            grid=grid,
            fraction=frac,
            image=image,
            camera=seg.group.camera,
            array=name,
            sample=int(sample),
            head=head,
            query=qname,
            queries=queries,
        )


def upsample(grid: np.ndarray, shape: tuple[int, int], method: str = "auto") -> np.ndarray:
    """``grid (rows, cols)`` stretched to ``shape (H, W)``.

    ``nearest``: pixel ``(y, x)`` takes the patch it lies in. ``bilinear``: linear in both
    directions between patch centres, edge patches clamped (``align_corners=False``).
    ``auto``: :func:`resolve_upsampling` (nearest below 8 patches a side).
    """
    if method not in UPSAMPLING:
        raise ConfigError(f"unknown upsampling {method!r}; expected one of {UPSAMPLING}")
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 2:
        raise ShapeError(f"grid must be 2-D (rows, cols), got shape {g.shape}")
    method = resolve_upsampling(method, g.shape)
    H, W = (int(x) for x in shape)
    r, c = g.shape
    ys = (np.arange(H) + 0.5) * r / H - 0.5  # pixel centres in patch coordinates
    xs = (np.arange(W) + 0.5) * c / W - 0.5
    if method == "nearest":
        yi = np.clip(np.floor(ys + 0.5).astype(int), 0, r - 1)
        xi = np.clip(np.floor(xs + 0.5).astype(int), 0, c - 1)
        return g[yi][:, xi]
    ys, xs = np.clip(ys, 0, r - 1), np.clip(xs, 0, c - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, r - 1), np.minimum(x0 + 1, c - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x1] * fx
    bot = g[y1][:, x0] * (1 - fx) + g[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


def read_frame(frame: str | os.PathLike | np.ndarray) -> np.ndarray:
    """A camera frame as a float array in [0, 1]: ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``.

    A path is read as PNG (matplotlib); uint8 arrays are divided by 255.
    """
    if isinstance(frame, (str, os.PathLike)):
        import matplotlib.image as mpimg

        path = Path(frame)
        if not path.is_file():
            raise ConfigError(f"frame {str(path)!r} does not exist; expected a PNG file")
        arr = np.asarray(mpimg.imread(path))
    else:
        arr = np.asarray(frame)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ShapeError(f"frame has shape {arr.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def frame_names(sample: int, ids: Mapping[str, Any] | None = None) -> list[str]:
    """File names tried for a sample's frame, in order: ``episode{E}_step{S}.png`` when the
    archive has episode and step ids, then ``{sample}.png`` and ``{sample:06d}.png``."""
    names = []
    if ids and EPISODE_ID in ids and STEP_ID in ids:
        e, s = int(ids[EPISODE_ID][sample]), int(ids[STEP_ID][sample])
        names.append(f"{EPISODE_ID}{e}_{STEP_ID}{s}.png")
    return [*names, f"{sample}.png", f"{sample:06d}.png"]


def find_frame(
    frames_dir: str | os.PathLike,
    sample: int,
    *,
    camera: str | None = None,
    ids: Mapping[str, Any] | None = None,
) -> Path:
    """The frame file of ``sample`` in ``frames_dir`` (``--frames DIR``).

    Looked up first in ``DIR/<camera>/`` (when the image group names a camera and that
    folder exists), then in ``DIR``, under the names of :func:`frame_names`.
    """
    base = Path(frames_dir)
    if not base.is_dir():
        raise ConfigError(f"frames folder {str(base)!r} does not exist; expected a folder of PNGs")
    dirs = [base / camera] if camera and (base / camera).is_dir() else []
    tried = [d / n for d in [*dirs, base] for n in frame_names(sample, ids)]
    for p in tried:
        if p.is_file():
            return p
    raise ConfigError(
        f"no frame for sample {sample} in {str(base)!r}; expected one of "
        f"{[str(p.relative_to(base)) for p in tried]}"
    )


def stored_frame(archive_or_path: Any, data: OverlayData) -> np.ndarray | None:
    """The frame stored with ``data``'s sample for its image group (``_frames/<camera>``,
    the group's camera or else the image segment's name); None when the archive has none."""
    with open_archive(archive_or_path) as arc:
        for cam in dict.fromkeys(c for c in (data.camera, data.image) if c):
            if cam in arc.cameras():
                return arc.frame(cam, data.sample)
    return None


def overlay_matrix(grid: np.ndarray, data: np.ndarray | None = None) -> PreparedMatrix:
    """``grid`` (or its upsampled ``data``) as a matrix in patch coordinates."""
    r, c = grid.shape
    hi = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    return PreparedMatrix(
        data=grid if data is None else data,
        n_rows=r,
        n_cols=c,
        rows=AxisSpec(r, tuple(str(i) for i in range(r))),
        cols=AxisSpec(c, tuple(str(i) for i in range(c))),
        vmin=0.0,
        vmax=hi if hi > 0 else 1.0,
    )


def plot_overlay(
    data: OverlayData | Any,
    *,
    frame: str | os.PathLike | np.ndarray | None = None,
    upsampling: str = "auto",
    alpha: float = 0.55,
    ax: Any = None,
    title: str | None = None,
    colorbar: bool = True,
    use_stored_frame: bool = True,
    **selection: Any,
) -> Any:
    """Draw an overlay; return the Figure.

    Parameters
    ----------
    data
        An :class:`OverlayData`, or an archive (path) with ``selection`` passed on to
        :func:`prepare_overlay` (``sample``, ``image``, ``query``, ``head``, ``array``, ``layer``).
    frame
        The camera frame (PNG path or array): the heat is upsampled to its size
        (``upsampling``: ``"auto"``, nearest below 8 patches a side, else bilinear;
        or ``"bilinear"`` / ``"nearest"``) and drawn with ``alpha`` over it.
        Default: the frame stored with the sample (:func:`stored_frame`; an archive given
        as ``data`` and ``use_stored_frame=True``); without any, the patch grid is drawn as a
        plain heatmap.
    ax
        Draw onto this Axes (default: a new figure).

    Examples
    --------
    >>> fig = plot_overlay("run.zarr", frame="frames/0.png", query="last")  # doctest: +SKIP
    """
    from attnscope.render.plots import draw_matrix, new_figure

    if not isinstance(data, OverlayData):
        src, data = data, prepare_overlay(data, **selection)
        if frame is None and use_stored_frame:
            frame = stored_frame(src, data)
    elif selection:
        raise ConfigError(f"selection {sorted(selection)} given with prepared OverlayData")
    if upsampling not in UPSAMPLING:
        raise ConfigError(f"unknown upsampling {upsampling!r}; expected one of {UPSAMPLING}")
    if ax is None:
        fig = new_figure((6, 5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    if frame is None:
        im = draw_matrix(ax, overlay_matrix(data.grid), xlabel="patch column", ylabel="patch row")
    else:
        img = read_frame(frame)
        r, c = data.grid.shape
        ext = (-0.5, c - 0.5, r - 0.5, -0.5)
        ax.imshow(img, extent=ext, aspect="auto", cmap="gray" if img.ndim == 2 else None)
        heat = upsample(data.grid, img.shape[:2], upsampling)
        im = draw_matrix(
            ax, overlay_matrix(data.grid, heat), xlabel="patch column", ylabel="patch row"
        )
        im.set_alpha(alpha)
    if colorbar:
        fig.colorbar(im, ax=ax, label="attention mass")
    ax.set_title(
        plain(title if title is not None else data.title(), 160), fontsize=STYLE.panel_title_size
    )
    return fig
