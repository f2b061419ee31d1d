"""The run directory: a local folder or a pyarrow filesystem URI (s3://bucket/prefix?...).

Every file is written atomically: on a local disk to a hidden temp name in the same folder, then
renamed; on an object store as one PUT (an object is invisible until its upload completes). A unit
is committed iff `results/segments/shard=<k>/<unit_id>.parquet` exists, so the run's state is
whatever the files say, and re-running a unit overwrites the same names (never duplicates).
"""
from __future__ import annotations

import io
import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SEGMENTS = "segments"


def _is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


@dataclass
class RunStore:
    """Files of one run, addressed by paths relative to the run root ('results/segments/...')."""

    location: str  # what the user gave: a path or a URI; workers rebuild the store from it

    def __post_init__(self) -> None:
        if _is_uri(self.location):
            self.fs, root = pafs.FileSystem.from_uri(self.location)
            self.root = root.rstrip("/")
            self.local = False
        else:
            path = self.location[len("file://"):] if self.location.startswith("file://") else self.location
            self.fs, self.root, self.local = pafs.LocalFileSystem(), os.path.abspath(path), True

    def __reduce__(self):  # ship to Ray actors / subprocesses as the location string only
        return (RunStore, (self.location,))

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    # ---- basic file operations -------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: readers see the old file (or none) or the complete new one."""
        full = self.path(rel)
        if self.local:
            folder, name = os.path.split(full)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, full)
        else:
            with self.fs.open_output_stream(full) as f:  # one object, visible only when complete
                f.write(data)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def list_files(self, rel: str, suffix: str = "") -> list[str]:
        """Relative paths of the finished files under `rel` (temp files are skipped)."""
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            name = info.base_name
            if info.type == pafs.FileType.File and not name.startswith(".") and name.endswith(suffix):
                out.append(posixpath.relpath(info.path, self.root))
        return sorted(out)

    # ---- tables ---------------------------------------------------------------------------
    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(rel)), columns=columns)

    # ---- the commit protocol ----------------------------------------------------------------
    @staticmethod
    def result_path(table: str, shard: int, unit_id: str) -> str:
        return f"results/{table}/shard={shard}/{unit_id}.parquet"

    def commit_unit(self, unit_id: str, shard: int, tables: dict[str, pa.Table]) -> None:
        """Write every table of one unit, the `segments` row last (its existence = committed)."""
        if SEGMENTS not in tables:
            raise ValueError(f"unit {unit_id}: the processor returned no '{SEGMENTS}' table")
        for name, table in tables.items():
            if name != SEGMENTS:
                self.write_table(self.result_path(name, shard, unit_id), table)
        self.write_table(self.result_path(SEGMENTS, shard, unit_id), tables[SEGMENTS])

    def committed(self) -> dict[str, str]:
        """unit_id -> status ('ok' | 'failed') of every committed unit."""
        files = self.list_files(f"results/{SEGMENTS}", ".parquet")
        if not files:
            return {}
        import pyarrow.dataset as ds

        schema = pa.schema([("unit_id", pa.string()), ("status", pa.string())])
        paths = [self.path(f) for f in files]
        table = ds.dataset(paths, schema=schema, format="parquet", filesystem=self.fs).to_table()
        return dict(zip(table.column("unit_id").to_pylist(), table.column("status").to_pylist()))
