"""The ``attnscope`` command line: thin click commands over the library.

Every library error (:class:`~attnscope.errors.AttnscopeError`) is printed as one line
and exits with status 1; no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from attnscope import __version__
from attnscope._cli_params import ARCHIVE, LOCAL, TABLES, int_list, str_list
from attnscope._extras import EXTRA_OF, missing_extra_error
from attnscope.contracts import COMPRESSORS, DTYPES, FIGURE_FORMATS, FIGURE_KINDS, FORMATS
from attnscope.errors import AttnscopeError, ConfigError


class _Group(click.Group):
    """Every error leaves as one line on stderr with exit status 1; ``--debug`` re-raises."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except AttnscopeError as e:
            if ctx.meta.get("attnscope.debug"):
                raise
            raise click.ClickException(_one_line(e)) from None
        except ModuleNotFoundError as e:
            if ctx.meta.get("attnscope.debug"):
                raise
            if e.name is not None and e.name.split(".")[0] in EXTRA_OF:
                raise click.ClickException(_one_line(missing_extra_error(e.name))) from None
            raise click.ClickException(
                f"{_one_line(e)} (run attnscope --debug ... for the traceback)"
            ) from None
        except OSError as e:
            # Disk full, permission denied, a file where a folder was expected...: the
            # library's writes are atomic, so what was committed before stays readable.
            if ctx.meta.get("attnscope.debug"):
                raise
            raise click.ClickException(_one_line(e)) from None
        except Exception as e:  # noqa: BLE001 - a model or runtime error: one line, --debug shows more
            if ctx.meta.get("attnscope.debug"):
                raise
            raise click.ClickException(
                f"{_one_line(e)} (run attnscope --debug ... for the traceback)"
            ) from None


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"



layers_opt = click.option("--layers", callback=int_list, help="Layer indices, e.g. '0,2', '0-3'.")
heads_opt = click.option("--heads", callback=int_list, help="Head indices, e.g. '0,3'.")
kinds_opt = click.option(
    "--kinds",
    callback=str_list,
    help="Kinds: self_attention, cross_attention or stack/kind, comma-separated.",
)
format_opt = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None,
    help="Archive format (default: from the suffix; .h5 is HDF5, anything else Zarr).",
)
progress_opt = click.option("--progress/--no-progress", default=True, help="Progress bar.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="attnscope")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """attnscope: capture, store, analyse and render transformer attention."""
    ctx.meta["attnscope.debug"] = debug


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("attnscope-demo"),
              show_default=True, help="Output folder.")
@format_opt
@click.option("--batches", default=8, show_default=True, help="Batches to capture.")
@click.option("--batch-size", default=4, show_default=True, help="Samples per batch.")
@click.option("--seed", default=0, show_default=True)
@progress_opt
def demo(out: Path, fmt: str | None, batches: int, batch_size: int, seed: int,
         progress: bool) -> None:
    """Capture, analyse, render and report the built-in model on synthetic inputs.

    The guide's reference model (512 wide, 8 heads, 3+3 layers) with its modality
    layout (text, robot0_eef_pos, agentview_image, ...) runs BATCHES x BATCH_SIZE samples.

    Example: attnscope demo --out demo --format hdf5
    """
    from attnscope.demo import run_demo

    result = run_demo(out, format=fmt, n_batches=batches, batch_size=batch_size, seed=seed,
                      progress=progress, echo=click.echo)
    click.echo(f"done in {result['seconds']:.1f} s")


@cli.command()
@click.option("--model", "model_kind", type=click.Choice(["reference", "hf"]), default="reference",
              show_default=True, help="Built-in reference model or a Hugging Face model "
                                      "(implied by --hf-model / --hf-config).")
@click.option("--hf-model", default=None, metavar="PATH_OR_ID",
              help="Pretrained Hugging Face checkpoint: a folder written by save_pretrained "
                   "or a hub id in the local HF cache; loaded offline, never downloaded. Its "
                   "own tokenizer is used unless --tokenizer is given.")
@click.option("--torch-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default=None, help="With --hf-model: dtype the weights are loaded and run in "
                                 "(default float32).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Reference model config JSON (TransformerConfig fields; optional "
                   "'enc_modalities'/'dec_modalities' token counts).")
@click.option("--hf-config", type=click.Path(exists=True, path_type=Path),
              help="Hugging Face config.json (or its folder): RANDOM weights (seeded by "
                   "--seed), even if a checkpoint sits beside it; no download. For the "
                   "trained weights use --hf-model.")
@click.option("--inputs", type=click.Path(exists=True, path_type=Path),
              help="Inputs .npz ('enc/<modality>', 'dec/<modality>' arrays (N, n, D); for HF "
                   "'input_ids' etc., with 'attention_mask' or 'lengths' for padded rows) or "
                   ".pt (same keys, loaded with weights_only=True); for HF also rows of text: "
                   ".jsonl, .csv, .parquet (--text-field), .txt (a sentence per line) or a "
                   "folder saved by datasets' save_to_disk. Samples keep the file's order and "
                   "their row ids (sample id 'row').")
@click.option("--text-field", default=None,
              help="Field (column) of each row holding its text (default: text).")
@click.option("--target-field", default=None,
              help="Encoder-decoder: field holding each row's target, fed to the decoder "
                   "(shifted right, as in training).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, path_type=Path),
              help="Local Hugging Face tokenizer folder (default with --hf-model: the "
                   "checkpoint's own): tokenizes rows of text (padding='longest' per batch) "
                   "and stores every sample's tokens.")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Maximum tokens per sample of a ragged archive (batches of different "
                   "lengths); also truncates .jsonl/.txt sentences. Default: the longest "
                   "batch of the inputs.")
@click.option("--batches", default=4, show_default=True, help="Batches of synthetic inputs.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=32, show_default=True, help="HF synthetic sequence length.")
@click.option("--out", type=ARCHIVE, required=True,
              help="Archive path or URL (s3://bucket/run.zarr).")
@format_opt
@layers_opt
@heads_opt
@kinds_opt
@click.option("--dtype", type=click.Choice(DTYPES),
              default="float16", show_default=True)
@click.option("--topk", type=int, default=None, help="Sparse mode: keep top-k keys per row.")
@click.option("--rows", "rows", multiple=True,
              help="Row policy, repeatable or comma-joined: keep only these query rows, e.g. "
                   "decoder:last, decoder:last=4, decoder:every=8, decoder:segment=traj, "
                   "encoder:rows=0,5,9.")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue after the last committed sample.")
@click.option("--overwrite", is_flag=True, help="Replace an existing archive.")
@click.option("--rank", type=int, default=None,
              help="This process's rank in a multi-process capture (Zarr); default: "
                   "torchrun's RANK/WORLD_SIZE when set.")
@click.option("--world-size", type=int, default=None, help="Number of capture processes.")
@click.option("--max-new-tokens", type=int, default=None,
              help="HF decoder-only / encoder-decoder: generate N tokens per prompt (KV cache "
                   "on) and store each sample's attention over the whole final sequence.")
@click.option("--do-sample", is_flag=True,
              help="With --max-new-tokens: sample (seeded by --seed) instead of greedy.")
@click.option("--dry-run", is_flag=True,
              help="Run one batch and print bytes per array, the job's total before and "
                   "after compression, chunks and files; write nothing.")
@click.option("--query-block", type=int, default=None,
              help="Long contexts: query rows per block of the weight recompute (default: "
                   "blocks of ~64 MiB, only for layers bigger than that).")
@click.option("--compressor", type=click.Choice(COMPRESSORS), default=None,
              help="Chunk codec of a new archive (default: zstd).")
@click.option("--level", type=int, default=None,
              help="Compression level (default: zstd -3, its fast mode; zstd 1 or higher for "
                   "smaller files, see docs/benchmarks.md).")
@click.option("--workers", type=int, default=None,
              help="Threads that encode and write chunks (default: one per core).")
@click.option("--inflight-mb", type=float, default=None,
              help="Bound on batch data queued for the writer, MiB (default 512).")
@progress_opt
def capture(model_kind: str, config: Path | None, hf_config: Path | None, inputs: Path | None,
            batches: int, batch_size: int, seq_len: int, out: Path, fmt: str | None,
            layers: list[int] | None, heads: list[int] | None, kinds: list[str] | None,
            dtype: str, topk: int | None, device: str | None, seed: int, resume: bool,
            overwrite: bool, rank: int | None, world_size: int | None,
            max_new_tokens: int | None, do_sample: bool, progress: bool,
            tokenizer_dir: Path | None = None, max_length: int | None = None,
            dry_run: bool = False, query_block: int | None = None,
            rows: tuple[str, ...] = (), hf_model: str | None = None,
            torch_dtype: str | None = None, text_field: str | None = None,
            target_field: str | None = None, compressor: str | None = None,
            level: int | None = None, workers: int | None = None,
            inflight_mb: float | None = None) -> None:
    """Run a model over batches and stream its attention into an archive.

    Example: attnscope capture --config model.json --batches 16 --batch-size 8 --out run.zarr

    Generation: attnscope capture --hf-model gpt2/ --inputs p.jsonl --max-new-tokens 16 --out g.zarr

    Checkpoint: attnscope capture --hf-model minilm/ --inputs s.jsonl --dtype float32 --out s.zarr

    Dataset: attnscope capture --hf-model t5/ --inputs d.parquet --text-field src
    --target-field tgt --out d.zarr

    Dry run: attnscope capture --config model.json --batches 1000 --out run.zarr --dry-run

    Rows: attnscope capture --config model.json --rows decoder:last --out last.zarr
    """
    from attnscope.capture.cli_support import (
        build_job,
        generate_options,
        load_tokenizer,
        model_tokenizer,
        row_ids,
    )

    if hf_config is not None or hf_model is not None:
        model_kind = "hf"
    if hf_config is not None:
        from attnscope.capture.hf_pretrained import WEIGHT_FILES

        folder = hf_config if hf_config.is_dir() else hf_config.parent
        if any((folder / f).is_file() for f in WEIGHT_FILES):
            click.echo(f"note: --hf-config builds the model with random weights (seed {seed}); "
                       f"{folder} holds a checkpoint: --hf-model {folder} loads it", err=True)
    if rank is None and world_size is None:
        rank, world_size = _torchrun_rank()
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = None if hf_model is None else model_tokenizer(hf_model)
    model, source = build_job(model_kind, config=config, hf_config=hf_config, inputs=inputs,
                              n_batches=batches, batch_size=batch_size, seq_len=seq_len,
                              seed=seed, generate=max_new_tokens is not None,
                              tokenizer=tokenizer, max_length=max_length, hf_model=hf_model,
                              torch_dtype=torch_dtype, text_field=text_field,
                              target_field=target_field)
    generate = generate_options(max_new_tokens, do_sample, seed)
    from attnscope.capture.job import capture as run_capture

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = run_capture(model, source, out, layers=layers, heads=heads, kinds=kinds,
                          dtype=dtype, format=fmt, device=device, resume=resume,
                          progress=progress, topk=topk, overwrite=overwrite, rank=rank,
                          world_size=world_size, generate=generate, tokenizer=tokenizer,
                          max_length=max_length, dry_run=dry_run, query_block=query_block,
                          rows=list(rows) or None,
                          sample_ids=row_ids(source, world_size), compressor=compressor,
                          level=level, workers=workers, inflight_mb=inflight_mb)
    if dry_run:
        click.echo(summary.format())
        return
    click.echo(
        f"{summary.archive}: {summary.samples} samples ({summary.committed} committed), "
        f"{summary.bytes / 1e6:.1f} MB in {summary.seconds:.2f} s "
        f"({summary.mb_per_s:.1f} MB/s, {summary.samples_per_s:.1f} samples/s)"
    )


def _torchrun_rank() -> tuple[int | None, int | None]:
    """``(RANK, WORLD_SIZE)`` from torchrun's environment, or ``(None, None)``."""
    env_ws, env_rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if env_ws is None or env_ws.strip() == "1":
        return None, None
    try:
        world_size, rank = int(env_ws), int(env_rank)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(
            f"WORLD_SIZE={env_ws!r} is set but RANK={env_rank!r} is not an integer; run under "
            "torchrun or pass --rank/--world-size"
        ) from None
    return rank, world_size


@cli.command()
@click.argument("archive", type=ARCHIVE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(archive: Path, as_json: bool) -> None:
    """Summarise an archive: layout, arrays, committed samples, provenance.

    Example: attnscope info run.zarr --json
    """
    from attnscope.store import format_info
    from attnscope.store import info as get_info

    data = get_info(archive)
    click.echo(json.dumps(data, indent=2, default=str) if as_json else format_info(data))


@cli.command()
@click.argument("archive", type=ARCHIVE)
@click.option("--tolerance", default=1e-2, show_default=True, help="Row-sum tolerance.")
def verify(archive: Path, tolerance: float) -> None:
    """Check structure, committed counts, row sums and NaN/Inf; exit 1 on any problem.

    Example: attnscope verify run.h5
    """
    from attnscope.store import verify as run_verify

    if tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0, got {tolerance}")
    report = run_verify(archive, tolerance=tolerance)
    if not report.ok:
        raise click.ClickException(f"{archive}: " + "; ".join(report.problems))
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"{archive}: ok")


@cli.command()
@click.argument("archive", type=ARCHIVE)
@click.option("--out", type=TABLES, required=True,
              help="Tables folder: a local path or a URL (s3://bucket/tables).")
@click.option("--topk", default=10, show_default=True, help="Top pairs per head.")
@click.option("--sink-token", default=0, show_default=True, help="Token for the sink score.")
@click.option("--workers", default=1, show_default=True, help="Local parallel workers.")
@click.option("--scheduler", default=None, help="Dask distributed scheduler address.")
@progress_opt
def analyze(archive: Path, out: Path, topk: int, sink_token: int, workers: int,
            scheduler: str | None, progress: bool) -> None:
    """Compute attention metrics into Parquet tables (+ attention_statistics.json).

    Example: attnscope analyze run.zarr --out tables --workers 2

    On a cluster: attnscope analyze s3://lab/run.zarr --out s3://lab/tables --scheduler
    tcp://host:8786
    """
    from attnscope.analysis import analyze as run_analyze

    paths = run_analyze(archive, out, topk=topk, sink_token=sink_token, workers=workers,
                        scheduler=scheduler, progress=progress)
    from attnscope.analysis.timeline import has_episodes, timeline
    from attnscope.store import open_archive

    with open_archive(archive) as arc:  # episode/step ids: the timeline table too
        if has_episodes(arc):
            paths = {**paths, "timeline": timeline(arc, out)}
    for name, p in paths.items():
        click.echo(f"{name}: {p}")


@cli.command()
@click.argument("archive", type=ARCHIVE)
@click.option("--out", type=LOCAL, required=True, help="Figures folder.")
@click.option("--layers", callback=int_list, help="Layer indices, e.g. '0,2', '0-3'.")
@click.option("--heads", callback=int_list, help="Head indices, e.g. '0,3'.")
@click.option("--samples", callback=int_list, help="Sample indices (default: 0).")
@kinds_opt
@click.option("--what", callback=str_list, default=None,
              help=f"Figure families, any of {','.join(FIGURE_KINDS)} (default: all; "
                   "tables only with --tables, overlay for image groups, timeline with its table).")
@click.option("--tables", "tables_dir", type=TABLES, default=None,
              help="Tables folder written by `attnscope analyze` for this archive "
                   "(needed for --what tables).")
@click.option("--fmt", type=click.Choice(FIGURE_FORMATS), default="png", show_default=True)
@click.option("--workers", type=int, default=None,
              help="Processes drawing in parallel (default: one per core).")
@click.option("--frames", type=click.Path(path_type=Path), default=None,
              help="Overlays: folder of camera frames named {sample}.png, {sample:06d}.png "
                   "or episode{E}_step{S}.png (optionally in a subfolder per camera).")
@click.option("--query", default="all", show_default=True,
              help="Overlays: query group, a segment name, 'all', 'last' or indices '3,4'.")
@click.option("--upsampling", type=click.Choice(["auto", "bilinear", "nearest"]),
              default="auto", show_default=True,
              help="Overlays: how patches are stretched over a frame (auto: flat blocks "
                   "below 8 patches a side, else bilinear).")
@click.option("--scale", default="max", show_default=True,
              help="Top of the colour range of attention maps: max (rows with one allowed "
                   "key left out), a percentile such as p99, or row (each row over its max).")
@progress_opt
def render(archive: Path, out: Path, layers: list[int] | None, heads: list[int] | None,
           samples: list[int] | None, kinds: list[str] | None, what: list[str] | None,
           tables_dir: Path | None, fmt: str, workers: int | None, progress: bool,
           frames: Path | None = None, query: str = "all",
           upsampling: str = "auto", scale: str = "max") -> None:
    """Render heatmaps, head grids, layer comparisons, flows and table figures from an archive.

    A selection that gives no figure is an error. Table figures need --tables (run
    `attnscope analyze ARCHIVE --out DIR` first); tables of another archive are refused.

    Example: attnscope render run.zarr --out figs --layers 0 --heads 0,3 --what heatmap,flow

    Overlays: attnscope render run.zarr --out figs --what overlay --frames frames/ --query last
    """
    import matplotlib

    matplotlib.use("Agg")
    from attnscope.render import render_archive

    parts = [q.strip() for q in query.split(",")]
    q: str | list[int] = [int(x) for x in parts] if all(x.isdigit() for x in parts) else query
    files = render_archive(archive, out, layers=layers, heads=heads, samples=samples,
                           kinds=kinds, what=what, tables_dir=tables_dir, fmt=fmt,
                           progress=progress, workers=workers, query=q, frames=frames,
                           upsampling=upsampling, scale=scale)
    click.echo(f"wrote {len(files)} files to {out}")


@cli.command()
@click.argument("archive", type=ARCHIVE)
@click.option("--tables", "tables_dir", type=TABLES, default=None,
              help="Tables folder written by `attnscope analyze` for this archive (default: "
                   "analyse into a temporary folder, removed afterwards).")
@click.option("--out", type=LOCAL, default=Path("report.html"),
              show_default=True)
@click.option("--sample", type=int, default=None,
              help="Sample shown when it opens (default: the first of --samples, else 0).")
@click.option("--samples", callback=int_list,
              help="Samples embedded in the viewer, e.g. '0-3,9' (default: as many as fit "
                   "~1.3 MB, from 0).")
def report(archive: Path, tables_dir: Path | None, out: Path, sample: int | None,
           samples: list[int] | None) -> None:
    """Write one self-contained HTML viewer of the stored attention (works from file://).

    The page embeds the attention data (float16) and draws it in the browser: pick array,
    sample and head, hover a cell, click a query. It shows the tables of --tables; without
    it, `attnscope analyze` runs first into a temporary folder. Tables of another archive
    are refused.

    Example: attnscope report run.zarr --tables tables --out report.html
    """
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    from attnscope.render.report import check_report_path, write_report

    check_report_path(out)  # before the analysis, which may take a while
    with tempfile.TemporaryDirectory(prefix="attnscope-tables-") as tmp:
        if tables_dir is None:
            from attnscope.analysis import analyze

            tables_dir = Path(tmp)
            analyze(archive, tables_dir, progress=False)
        path = write_report(archive, out, tables_dir=tables_dir, sample=sample,
                            samples=samples)
    click.echo(f"report: {path}")


@cli.command()
@click.argument("archive", type=ARCHIVE)
@click.option("--out", type=LOCAL, required=True,
              help="Folder for rollout.parquet (and rollout/ figures).")
@click.option("--samples", callback=int_list,
              help="Samples to roll out, e.g. '0-3,9' (default: all).")
@click.option("--heads", callback=int_list,
              help="Original head ids to average (default: every stored head).")
@click.option("--figures", is_flag=True,
              help="Also draw rollout heatmaps (of the --samples given, else of sample 0).")
@click.option("--fmt", type=click.Choice(FIGURE_FORMATS), default="png", show_default=True)
def rollout(archive: Path, out: Path, samples: list[int] | None, heads: list[int] | None,
            figures: bool, fmt: str) -> None:
    """Attention rollout (Abnar & Zuidema 2020) of every sample into rollout.parquet.

    Head-averaged, residual-adjusted attention multiplied across the encoder's layers and
    continued through the decoder (encoder tokens' influence on each decoder token).
    Every layer of a stack must be stored.

    Example: attnscope rollout run.zarr --out tables --samples 0-3 --figures
    """
    from attnscope.analysis import rollout_archive

    path = rollout_archive(archive, out, samples=samples, heads=heads)
    click.echo(f"rollout: {path}")
    if figures:
        import matplotlib

        matplotlib.use("Agg")
        from attnscope.render import render_rollout

        files = render_rollout(out, out, samples=samples,
                               archive=archive, fmt=fmt)
        click.echo(f"wrote {len(files)} figures to {out / 'rollout'}")


@cli.command()
@click.argument("archive_a", type=ARCHIVE)
@click.argument("archive_b", type=ARCHIVE)
@click.option("--out", type=LOCAL, required=True,
              help="Folder for diff.parquet (and diff/ figures).")
@click.option("--figures", is_flag=True,
              help="Also draw B - A heatmaps (head mean) and per-layer/head JS summaries.")
@click.option("--samples", callback=int_list, help="Samples drawn with --figures (default: 0).")
@click.option("--heads", callback=int_list,
              help="Heads drawn with --figures, besides the head mean.")
@click.option("--fmt", type=click.Choice(FIGURE_FORMATS), default="png", show_default=True)
def diff(archive_a: Path, archive_b: Path, out: Path, figures: bool,
         samples: list[int] | None, heads: list[int] | None, fmt: str) -> None:
    """Compare two archives of the same layout: Jensen-Shannon divergence and entropy change
    per array, head and sample into diff.parquet.

    Archives with different arrays, shapes, heads, segments, sample counts or token masks
    are refused with a message naming the difference.

    Example: attnscope diff ckpt1.zarr ckpt2.zarr --out diff --figures
    """
    from attnscope.analysis import diff_archives

    path = diff_archives(archive_a, archive_b, out)
    click.echo(f"diff: {path}")
    if figures:
        import matplotlib

        matplotlib.use("Agg")
        from attnscope.render import render_diff

        files = render_diff(archive_a, archive_b, out, samples=samples,
                            heads=[None, *(heads or [])], diff_table=out, fmt=fmt)
        click.echo(f"wrote {len(files)} figures to {out / 'diff'}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="attnscope")


if __name__ == "__main__":
    main()
