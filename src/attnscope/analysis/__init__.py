"""Out-of-core attention analysis: metrics on blocks, Parquet tables, the guide's statistics JSON.

Reads archives only; never imports torch.

Examples
--------
>>> from attnscope.analysis import analyze, load_table  # doctest: +SKIP
>>> paths = analyze("run.zarr", "out/", topk=10, workers=2)  # doctest: +SKIP
>>> load_table("out/", "head_stats", archive="run.zarr").head()  # doctest: +SKIP
>>> load_table("out/", "mean_head_stats")  # the head-averaged map's metrics  # doctest: +SKIP
"""

from __future__ import annotations

from attnscope.analysis._engine import densify_topk
from attnscope.analysis.api import analyze
from attnscope.analysis.diff import check_same_layout, diff_archives, js_rows
from attnscope.analysis.metrics import (
    allowed_keys,
    as_float32,
    distance_matrix,
    head_similarity_cosine,
    head_similarity_js,
    mean_distance,
    normalized_entropy,
    row_entropy,
    row_max,
    segment_mass,
    sink_score,
    top_k_pairs,
    top_k_pairs_block,
)
from attnscope.analysis.rollout import (
    attention_rollout,
    encoder_decoder_rollout,
    residual_attention,
    rollout_archive,
    sample_rollout,
)
from attnscope.analysis.statistics import statistics_json
from attnscope.analysis.tables import TABLE_SCHEMAS, TABLES, load_table
from attnscope.analysis.timeline import timeline, timeline_mass
from attnscope.contracts import AVERAGE_HEAD, HEAD_INDEX, MEAN_HEAD_TABLES
from attnscope.errors import StaleTableError

__all__ = [
    "AVERAGE_HEAD",
    "HEAD_INDEX",
    "MEAN_HEAD_TABLES",
    "TABLES",
    "TABLE_SCHEMAS",
    "StaleTableError",
    "allowed_keys",
    "analyze",
    "as_float32",
    "attention_rollout",
    "check_same_layout",
    "densify_topk",
    "diff_archives",
    "distance_matrix",
    "encoder_decoder_rollout",
    "head_similarity_cosine",
    "head_similarity_js",
    "js_rows",
    "load_table",
    "mean_distance",
    "normalized_entropy",
    "residual_attention",
    "rollout_archive",
    "row_entropy",
    "row_max",
    "sample_rollout",
    "segment_mass",
    "sink_score",
    "statistics_json",
    "top_k_pairs",
    "top_k_pairs_block",
    "timeline",
    "timeline_mass",
]
