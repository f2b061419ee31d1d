"""Parquet schemas of the result tables, row builders and the run-directory layout.

One file per committed unit and table: RUN/results/<table>/shard=<k>/<unit_id>.parquet. `shard`
comes from the hive partition for every table; `segments` also stores it as a column. Layer and
head indices are 0-based in the tables (tensor indices); reports label them 1-based (l1, h1).
Every column is documented in docs/schema.md.
"""
from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Iterable, Mapping, Optional

import pyarrow as pa
import pyarrow.fs as pafs

_f32list = pa.list_(pa.float32())

SEGMENTS = pa.schema([
    ("unit_id", pa.string()), ("segment_id", pa.string()), ("model", pa.string()), ("task", pa.string()),
    ("corpus", pa.string()), ("split", pa.string()), ("src_lang", pa.string()), ("tgt_lang", pa.string()),
    ("shard", pa.int32()), ("audio_path", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),
    ("duration_s", pa.float64()), ("n_frames", pa.int32()), ("n_steps", pa.int32()),
    ("reference", pa.string()), ("source_text", pa.string()), ("hypothesis", pa.string()),
    ("hyp_tokens", pa.list_(pa.string())), ("hyp_token_ids", pa.list_(pa.int32())),
    ("hyp_token_log_probs", _f32list), ("prefix_len", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int32()), ("worker", pa.string()),
    ("t_decode_s", pa.float64()), ("t_input_s", pa.float64()), ("t_encoder_s", pa.float64()), ("t_total_s", pa.float64()),
    ("n_masks_input", pa.int32()), ("n_masks_encoder", pa.int32()),
    ("reliability_input", pa.float64()), ("reliability_encoder", pa.float64()),
    # reproducibility record (METHOD.md section 6)
    ("seed", pa.int64()), ("p_input", pa.float64()), ("p_encoder", pa.float64()), ("level_split", pa.string()),
    ("occlusion", pa.string()), ("pooling", pa.string()), ("dtype", pa.string()), ("device", pa.string()),
    ("model_checksum", pa.string()), ("code_version", pa.string()), ("torch_version", pa.string()),
    ("skimage_version", pa.string()), ("finished_at", pa.timestamp("us", tz="UTC")),
])

CROSS_ATTENTION = pa.schema([
    ("unit_id", pa.string()), ("layer", pa.int16()), ("head", pa.int16()),
    ("n_tokens", pa.int32()), ("n_steps", pa.int32()), ("weights", _f32list),
])

SALIENCY_INPUT = pa.schema([
    ("unit_id", pa.string()), ("token_index", pa.int32()), ("token", pa.string()),
    ("n_frames", pa.int32()), ("n_bins", pa.int32()), ("values", _f32list),
])

SALIENCY_ENCODER = pa.schema([
    ("unit_id", pa.string()), ("token_index", pa.int32()), ("token", pa.string()),
    ("n_steps", pa.int32()), ("values", _f32list),
])

CORRELATIONS = pa.schema([
    ("unit_id", pa.string()), ("segment_id", pa.string()), ("model", pa.string()), ("task", pa.string()),
    ("src_lang", pa.string()), ("tgt_lang", pa.string()), ("target", pa.string()),
    ("layer", pa.int32()), ("head", pa.int32()), ("pooling", pa.string()), ("p", pa.float64()),
    ("pearson", pa.float64()),
])

# `pooling` and `p` (nullable) say which SM^X pooling / occlusion probability an explanation used,
# so Tables 4 and 6 can report deletion per variant; NULL means the job's headline setting.
DELETION = pa.schema([
    ("unit_id", pa.string()), ("explanation", pa.string()), ("side", pa.string()), ("percent", pa.int32()),
    ("hypothesis", pa.string()), ("reference", pa.string()), ("pooling", pa.string()), ("p", pa.float64()),
])

SIZE = pa.schema([
    ("unit_id", pa.string()), ("explanation", pa.string()), ("threshold", pa.float64()), ("share", pa.float64()),
    ("pooling", pa.string()), ("p", pa.float64()),
])

SCHEMAS: dict[str, pa.Schema] = {
    "segments": SEGMENTS, "cross_attention": CROSS_ATTENTION, "saliency_input": SALIENCY_INPUT,
    "saliency_encoder": SALIENCY_ENCODER, "correlations": CORRELATIONS, "deletion": DELETION, "size": SIZE,
}
TABLES: list[str] = list(SCHEMAS)
EXPLANATIONS = ("sm_x_full", "sm_x_agg", "ca", "sm_h")
POOLINGS = ("2d_max", "2d_avg", "1d_max_1d_avg")


def schema_of(name: str) -> pa.Schema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise ValueError(f"unknown table {name!r}; tables are {', '.join(TABLES)}") from None


def table_from_rows(name: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build table `name` from dict rows; missing columns become NULL, unknown columns are an error."""
    schema = schema_of(name)
    rows = list(rows)
    extra = {k for r in rows for k in r} - set(schema.names)
    if extra:
        raise ValueError(f"table {name}: unknown column(s) {sorted(extra)}")
    columns = {f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


def segments_row(**values: Any) -> dict[str, Any]:
    """One `segments` row: checks the names, fills defaults (status ok, attempts 1, finished_at now)."""
    unknown = set(values) - set(SEGMENTS.names)
    if unknown:
        raise ValueError(f"segments: unknown column(s) {sorted(unknown)}")
    row = {name: None for name in SEGMENTS.names}
    row.update(status="ok", attempts=1, finished_at=_dt.datetime.now(_dt.timezone.utc))
    row.update(values)
    if row["status"] not in ("ok", "failed"):
        raise ValueError(f"segments: status must be 'ok' or 'failed', got {row['status']!r}")
    return row


def failed_row(unit_id: str, error: str, attempts: int, **values: Any) -> dict[str, Any]:
    """The `segments` row committed for a unit that failed for good."""
    return segments_row(unit_id=unit_id, status="failed", error=error, attempts=attempts, **values)


def conform(name: str, table: pa.Table) -> pa.Table:
    """Cast a table to the schema of `name` (adds NULL columns that are missing, fixes order)."""
    schema = schema_of(name)
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"table {name}: unknown column(s) {sorted(extra)}")
    cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def concat_tables(name: str, tables: Iterable[pa.Table]) -> pa.Table:
    """Concatenate tables of `name` (e.g. from several units), each conformed to the schema."""
    tables = [conform(name, t) for t in tables]
    return pa.concat_tables(tables) if tables else schema_of(name).empty_table()


# ---- run-directory layout -------------------------------------------------------------------------
def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def run_filesystem(run: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local run dir or a URI like s3://bucket/prefix."""
    if is_uri(run):
        return pafs.FileSystem.from_uri(str(run))
    return pafs.LocalFileSystem(), os.path.abspath(os.fspath(run))


def result_file(run_path: str, table: str, shard: int, unit_id: str) -> str:
    return f"{run_path.rstrip('/')}/results/{table}/shard={int(shard)}/{unit_id}.parquet"


def list_result_files(fs: pafs.FileSystem, run_path: str, table: str) -> list[str]:
    """Committed-looking files of one table: `*.parquet`, skipping hidden/temporary names (., _)."""
    base = f"{run_path.rstrip('/')}/results/{table}"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
             and not i.base_name.startswith((".", "_"))]
    return sorted(files)


def shard_of(path: str) -> Optional[int]:
    for part in path.replace("\\", "/").split("/"):
        if part.startswith("shard="):
            try:
                return int(part[6:])
            except ValueError:
                return None
    return None


def read_results(run: str | os.PathLike, table: str, columns: Optional[list[str]] = None) -> pa.Table:
    """All rows of `table` in the run (committed or not) plus `shard` (from the hive partition path
    where the table has no such column). Works for local dirs and pyarrow URIs; an absent table
    gives an empty table of the schema."""
    import pyarrow.dataset as ds

    fs, path = run_filesystem(run)
    schema = schema_of(table)
    if "shard" not in schema.names:
        schema = schema.append(pa.field("shard", pa.int32()))
    wanted = columns or schema.names
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ValueError(f"table {table}: unknown column(s) {unknown}")
    files = list_result_files(fs, path, table)
    if not files:
        return pa.schema([schema.field(c) for c in wanted]).empty_table()
    part = None
    if "shard" not in schema_of(table).names:
        part = ds.partitioning(pa.schema([("shard", pa.int32())]), flavor="hive")
    data = ds.dataset(files, schema=schema, filesystem=fs, format="parquet", partitioning=part,
                      partition_base_dir=f"{path.rstrip('/')}/results/{table}")
    return data.to_table(columns=wanted)
