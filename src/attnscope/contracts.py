"""The names the stages share: one place for every contract between capture, store,
analysis and render.

Standard library only, so every stage (and the torch-free core install) imports it
freely. A name used by two stages is defined here and imported there; the CLI's
choices come from here too.
"""

from __future__ import annotations

__all__ = [
    "STACKS",
    "KINDS",
    "KIND_AXES",
    "DIMS",
    "DTYPES",
    "FORMATS",
    "COMPRESSORS",
    "DEFAULT_COMPRESSOR",
    "SAMPLE_IDS",
    "EPISODE_ID",
    "STEP_ID",
    "ROW_ID",
    "GROUP_KINDS",
    "TOKENS",
    "FRAMES",
    "TOKEN_MASK",
    "TOKEN_IDS",
    "TOKEN_LABELS",
    "TOKEN_LABEL_SPANS",
    "TOKEN_FIELDS",
    "MAX_LENGTHS",
    "QUERY_ROWS",
    "PAD_LABEL",
    "PAD_ID",
    "AVERAGE_HEAD",
    "HEAD_INDEX",
    "MEAN_HEAD_TABLES",
    "TABLE_COLUMNS",
    "TABLES",
    "IDENTITY_KEY",
    "TABLE_VERSIONS",
    "TABLE_VERSION_KEY",
    "MANIFEST",
    "STATISTICS_JSON",
    "FIGURE_FORMATS",
    "FIGURE_KINDS",
]

# --- the archive -------------------------------------------------------------------------
#: attention stacks of an encoder-decoder (encoder-only / decoder-only models use one)
STACKS = ("encoder", "decoder")
#: attention kinds; cross-attention exists only in the decoder
KINDS = ("self_attention", "cross_attention")
#: (query side, key side) of each valid (stack, kind)
KIND_AXES: dict[tuple[str, str], tuple[str, str]] = {
    ("encoder", "self_attention"): ("encoder", "encoder"),
    ("decoder", "self_attention"): ("decoder", "decoder"),
    ("decoder", "cross_attention"): ("decoder", "encoder"),
}
#: dimension names of every attention array, in storage order: (N, H, T, S)
DIMS = ("sample", "head", "query", "key")
#: storage dtypes (bfloat16 is kept as its uint16 bit pattern; see docs/archive-format.md)
DTYPES = ("float16", "float32", "bfloat16")
#: archive formats
FORMATS = ("zarr", "hdf5")
#: chunk compressors every format writes
COMPRESSORS = ("zstd", "none", "blosc-zstd", "blosc-lz4")
DEFAULT_COMPRESSOR = "zstd"
#: compressor -> (lowest level, highest level, default level); "none" takes no level.
#: zstd's negative levels are its fast modes; -3 meets the codec rule of
#: docs/benchmarks.md ("Codec choice") on real attention: >= 1.8x zstd 1's speed, <= +15 % disk
COMPRESSOR_LEVELS: dict[str, tuple[int, int, int]] = {
    "zstd": (-7, 22, -3),
    "blosc-zstd": (0, 9, 1),
    "blosc-lz4": (0, 9, 5),
}
#: the per-sample id array beside the attention arrays
SAMPLE_IDS = "_sample_ids"
#: sample-id keys that place a sample in a robot episode (``ArchiveWriter.append(sample_ids=
#: {EPISODE_ID: (B,), STEP_ID: (B,)})``); episode timelines need both
EPISODE_ID = "episode"
STEP_ID = "step"
#: sample-id key of a sample read from a dataset file: its row id in that file
ROW_ID = "row"
#: kinds of typed token groups in a layout (``store.layout.TokenGroup``); untyped is None
GROUP_KINDS = ("text", "image", "state", "action", "trajectory")
#: per-sample token data of one side lives under f"{TOKENS}/{side}/..." (docs/archive-format.md)
TOKENS = "_tokens"
#: optional camera frames, f"{FRAMES}/<camera>" (N, h, w, 3) uint8, one sample per chunk
FRAMES = "_frames"
#: (N, L) uint8, 1 = real token, 0 = padding (ragged archives only)
TOKEN_MASK = "mask"
#: (N, L) int64 token ids; PAD_ID where the writer padded the batch
TOKEN_IDS = "ids"
#: group of uint8 blobs, one per commit record: each sample's labels as one JSON array (UTF-8)
TOKEN_LABELS = "labels"
#: (N, 2) int64 [start, stop) of each sample's JSON labels in its writer's blob
TOKEN_LABEL_SPANS = "label_spans"
#: the keys of ArchiveWriter.append(tokens={side: {...}})
TOKEN_FIELDS = ("labels", "ids")
#: root-metadata key: side -> maximum tokens (schema 2, ragged archives); null otherwise
MAX_LENGTHS = "max_lengths"
#: root-metadata key (side -> kept query rows, null: every row) and array attribute (the
#: array's kept rows, absent: every row) of archives captured with a row policy: an array
#: whose query side has kept rows stores (N, H, R, S), R = len(rows), rows ascending
#: positions on that side's (padded) axis
QUERY_ROWS = "query_rows"
#: label / id of positions the writer added to pad a shorter batch
PAD_LABEL = ""
PAD_ID = -1

# --- the analysis tables -----------------------------------------------------------------
#: column naming the head in per-head tables: the model's original head number (not
#: ``head``, which would hide ``DataFrame.head`` in pandas)
HEAD_INDEX = "head_index"
#: ``head_index`` of the mean-over-heads rows where a reader joins them to the per-head rows
#: (``load_table(..., with_mean_head=True)``, the figures); tables written since version 2
#: keep those rows in their own table (:data:`MEAN_HEAD_TABLES`), never beside real heads
AVERAGE_HEAD = -1
#: per-head table -> the table of the same metrics computed on the mean over the (selected)
#: heads: the per-head table's columns without ``head_index``
MEAN_HEAD_TABLES: dict[str, str] = {
    "head_stats": "mean_head_stats",
    "row_stats": "mean_head_row_stats",
    "top_pairs": "mean_head_top_pairs",
    "segment_mass": "mean_head_segment_mass",
    "diff": "mean_head_diff",
    "timeline": "mean_head_timeline",
}
_KEYS = (
    ("archive_fingerprint", "string"),
    ("stack", "string"),
    ("layer", "int32"),
    ("kind", "string"),
)
#: every table's columns, in order, with their Arrow type names (docs/analysis-tables.md)
TABLE_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "head_stats": _KEYS
    + (
        ("sample", "int64"),
        (HEAD_INDEX, "int64"),
        ("n_queries", "int32"),
        ("n_keys", "int32"),
        ("causal", "bool"),
        ("entropy_mean", "float32"),
        ("entropy_min", "float32"),
        ("entropy_max", "float32"),
        ("norm_entropy_mean", "float32"),
        ("norm_entropy_min", "float32"),
        ("norm_entropy_max", "float32"),
        ("row_max_mean", "float32"),
        ("row_max_min", "float32"),
        ("mean_distance", "float32"),
        ("sink_score", "float32"),
        ("mean", "float64"),
        ("std", "float64"),
        ("min", "float32"),
        ("max", "float32"),
    ),
    "row_stats": _KEYS
    + (
        ("sample", "int64"),
        (HEAD_INDEX, "int64"),
        ("query", "int64"),
        ("query_label", "string"),
        ("query_segment", "string"),
        ("entropy", "float32"),
        ("norm_entropy", "float32"),
        ("row_max", "float32"),
        ("mean_distance", "float32"),
        ("sink_score", "float32"),
    ),
    "top_pairs": _KEYS
    + (
        ("sample", "int64"),
        (HEAD_INDEX, "int64"),
        ("rank", "int64"),
        ("query", "int64"),
        ("key", "int64"),
        ("weight", "float32"),
        ("query_label", "string"),
        ("key_label", "string"),
        ("query_segment", "string"),
        ("key_segment", "string"),
        # keys the query row may attend to (causal, real); 1 = a forced cell (version 2)
        ("allowed_keys", "int64"),
    ),
    "segment_mass": _KEYS
    + (
        ("sample", "int64"),
        (HEAD_INDEX, "int64"),
        ("query_segment", "string"),
        ("key_segment", "string"),
        ("mass", "float32"),
    ),
    "head_similarity": _KEYS
    + (
        ("sample", "int64"),
        ("head_a", "int64"),
        ("head_b", "int64"),
        ("js", "float32"),
        ("cosine", "float32"),
    ),
    # attention rollout (analysis.rollout): (stack, kind) say which rollout matrix, as in
    # KIND_AXES (decoder/cross_attention = encoder tokens' influence on decoder tokens);
    # layer = the last layer the product ran through
    "rollout": _KEYS
    + (
        ("sample", "int64"),
        ("query", "int64"),
        ("key", "int64"),
        ("score", "float32"),
        ("query_label", "string"),
        ("key_label", "string"),
        ("query_segment", "string"),
        ("key_segment", "string"),
    ),
    # archive diff (analysis.diff_archives): archive_fingerprint is A's, B's beside it
    "diff": _KEYS
    + (
        ("archive_fingerprint_b", "string"),
        ("sample", "int64"),
        (HEAD_INDEX, "int64"),
        ("n_queries", "int32"),
        ("js", "float32"),
        ("entropy_a", "float32"),
        ("entropy_b", "float32"),
        ("entropy_change", "float32"),
        ("max_abs_diff", "float32"),
    ),
    "timeline": _KEYS
    + (
        ("episode", "int64"),
        ("step", "int64"),
        ("sample", "int64"),
        (HEAD_INDEX, "int64"),
        ("query_group", "string"),
        ("key_segment", "string"),
        ("key_kind", "string"),
        ("mass", "float32"),
    ),
}
TABLE_COLUMNS.update({
    mean: tuple(c for c in TABLE_COLUMNS[table] if c[0] != HEAD_INDEX)
    for table, mean in MEAN_HEAD_TABLES.items()
})
_OWN = ("timeline", "rollout", "diff", MEAN_HEAD_TABLES["timeline"], MEAN_HEAD_TABLES["diff"])
#: tables that ``attnscope.analysis.analyze`` writes; the others come from their own functions
#: (``timeline``: ``analysis.timeline``, for archives with episode/step ids)
#: (``rollout``: ``analysis.rollout``; ``diff``: ``analysis.diff_archives``)
TABLES = tuple(t for t in TABLE_COLUMNS if t not in _OWN)
#: Parquet schema-metadata key holding the identity JSON of the analysed archive
IDENTITY_KEY = "attnscope.identity"
#: Parquet schema-metadata key holding a table's column version (:data:`TABLE_VERSIONS`)
TABLE_VERSION_KEY = "attnscope.table_version"
#: column version of each table (absent: 1); readers accept every older version.
#: top_pairs 2: + ``allowed_keys`` (tables of version 1 lack it). Per-head tables 2 (top_pairs
#: 3): column ``head`` renamed ``head_index``, the mean-over-heads rows (``head == -1``
#: before) moved to :data:`MEAN_HEAD_TABLES` (new at that version)
TABLE_VERSIONS: dict[str, int] = {
    **{t: 2 for t in MEAN_HEAD_TABLES},
    "top_pairs": 3,
    **{mean: 2 for mean in MEAN_HEAD_TABLES.values()},
    MEAN_HEAD_TABLES["top_pairs"]: 3,
}
#: file names written beside the tables
MANIFEST = "manifest.json"
STATISTICS_JSON = "attention_statistics.json"

# --- figures -----------------------------------------------------------------------------
FIGURE_FORMATS = ("png", "svg", "pdf")
#: what `render_archive` / `attnscope render --what` can draw
FIGURE_KINDS = ("heatmap", "grid", "layers", "flow", "tables", "overlay", "timeline")
