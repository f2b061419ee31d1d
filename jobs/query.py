"""SQL over a run: every result table is a DuckDB view named after it.

Only committed units are visible: `segments` holds one row per committed unit (ok or failed), and
every other table only the rows of units whose `segments` row says status 'ok' (joined on unit_id
and shard). `plan` is RUN/plan.parquet when present. Local runs are read by DuckDB directly; runs
on other filesystems (s3://...) are read with pyarrow and handed to DuckDB as Arrow tables.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, TextIO

import pyarrow as pa
import pyarrow.fs as pafs

from jobs.errors import RunError, XS2TError
from jobs.schema import TABLES, list_result_files, read_results, run_filesystem, schema_of


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def connect(run: str | os.PathLike):
    """A DuckDB connection with views segments, cross_attention, saliency_input, saliency_encoder,
    correlations, deletion, size (committed units only) and plan (if the run has one)."""
    import duckdb

    fs, path = run_filesystem(run)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise RunError(f"{run}: run directory not found")
    local = isinstance(fs, pafs.LocalFileSystem)
    con = duckdb.connect()
    for table in TABLES:
        raw = f"_raw_{table}"
        files = list_result_files(fs, path, table) if local else []
        if files:
            hive = "false" if "shard" in schema_of(table).names else "true"
            con.execute(f"CREATE VIEW {raw} AS SELECT * FROM read_parquet({_sql_list(files)}, "
                        f"hive_partitioning={hive}, union_by_name=true)")
        else:
            con.register(raw, read_results(run, table))
    con.execute("CREATE VIEW segments AS SELECT * FROM _raw_segments")
    for table in TABLES:
        if table != "segments":
            con.execute(f"CREATE VIEW {table} AS SELECT r.* FROM _raw_{table} r SEMI JOIN "
                        f"(SELECT unit_id, shard FROM segments WHERE status = 'ok') s "
                        f"ON r.unit_id = s.unit_id AND r.shard = s.shard")
    plan = f"{path.rstrip('/')}/plan.parquet"
    if fs.get_file_info(plan).type == pafs.FileType.File:
        import pyarrow.parquet as pq
        con.register("plan", pq.read_table(plan, filesystem=fs))
    return con


def query(run: str | os.PathLike, sql: str) -> pa.Table:
    """Run `sql` over the run's views; returns an Arrow table."""
    import duckdb

    con = connect(run)
    try:
        return _arrow(con.sql(sql))
    except duckdb.Error as exc:
        raise XS2TError(f"query failed: {exc}\nviews: {', '.join(TABLES)}" + (", plan" if _has_plan(con) else "")) from None
    finally:
        con.close()


def _arrow(relation) -> pa.Table:
    """Arrow table of a DuckDB relation (the method name changed across DuckDB versions)."""
    if relation is None:  # a statement without a result (e.g. CREATE)
        return pa.table({})
    for name in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        if hasattr(relation, name):
            out = getattr(relation, name)()
            return out.read_all() if isinstance(out, pa.RecordBatchReader) else out
    raise XS2TError("this DuckDB version cannot return Arrow tables")


def _has_plan(con) -> bool:
    try:
        con.execute("SELECT 1 FROM plan LIMIT 0")
        return True
    except Exception:
        return False


def _jsonable(value):
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def write_result(table: pa.Table, fmt: str = "table", out: Optional[TextIO] = None, max_cell: int = 60) -> None:
    """Print a query result as a rich table, CSV or JSON (a list of row objects)."""
    out = out or sys.stdout
    if fmt == "csv":
        import csv
        w = csv.writer(out, lineterminator="\n")
        w.writerow(table.column_names)
        for row in table.to_pylist():
            w.writerow(["" if v is None else (json.dumps(v) if isinstance(v, list) else v) for v in row.values()])
    elif fmt == "json":
        rows = [{k: (_jsonable(v) if not isinstance(v, list) else [_jsonable(x) for x in v]) for k, v in r.items()}
                for r in table.to_pylist()]
        out.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + ("\n]\n" if rows else "]\n"))
    elif fmt == "table":
        from rich.console import Console
        from rich.table import Table

        view = Table(show_lines=False)
        for name in table.column_names:
            view.add_column(name, overflow="fold")
        for row in table.to_pylist():
            cells = []
            for v in row.values():
                text = "NULL" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
                cells.append(text if len(text) <= max_cell else text[: max_cell - 3] + "...")
            view.add_row(*cells)
        Console(file=out, width=200 if not out.isatty() else None).print(view)
        Console(file=out).print(f"{table.num_rows} row(s)")
    else:
        raise XS2TError(f"unknown format {fmt!r}; use table, csv or json")
