"""One worker: builds the processor once, then processes units and commits each one itself.

Used as a Ray actor by the driver (one per GPU or CPU slot) and in-process by Slurm array tasks.
Workers commit their own results, so the driver only tracks completion: nothing central grows
with the number of workers.
"""
from __future__ import annotations

import importlib
import os
import time
import traceback
from typing import Any

import pyarrow as pa

from cluster.plan import unit_from_row
from cluster.runspec import ExecConfig, load_run_spec
from cluster.store import SEGMENTS, RunStore
from jobs import schema
from jobs.errors import RunError
from jobs.units import worker_name


def import_processor(dotted: str):
    module, _, name = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), name or "SegmentPipeline")
    except (ImportError, AttributeError) as exc:
        raise RunError(f"processor {dotted!r} cannot be imported: {exc}") from exc


def set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)  # a reused Ray worker keeps an older count unless told


def _set_column(table: pa.Table, name: str, value: Any, type_: pa.DataType) -> pa.Table:
    col = pa.array([value] * table.num_rows, type=table.schema.field(name).type if name in table.column_names else type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, col)
    return table.append_column(name, col)


def segments_schema() -> pa.Schema:
    return schema.SEGMENTS


def failure_table(row: dict, error: str, attempts: int, worker: str) -> pa.Table:
    """The segments row of a unit that failed for good (no other tables are written)."""
    rec = schema.failed_row(
        row["unit_id"], error, attempts, segment_id=row["segment_id"], model=row["model_key"], task=row["task"],
        corpus=row["corpus"], split=row["split"], src_lang=row["src_lang"], tgt_lang=row["tgt_lang"],
        shard=row["shard"], audio_path=row["audio_path"], start_s=row["start_s"], end_s=row["end_s"],
        duration_s=row["duration_s"], reference=row["reference"], source_text=row["source_text"], worker=worker)
    return schema.table_from_rows(SEGMENTS, [rec])


class UnitWorker:
    def __init__(self, location: str, cfg: ExecConfig):
        set_threads(cfg.cpus_per_worker)
        self.store, self.cfg = RunStore(location), cfg
        spec = load_run_spec(self.store)
        self.processor = import_processor(cfg.processor)(spec, device=cfg.device, threads=cfg.cpus_per_worker)
        self.name = worker_name()

    def ping(self) -> str:
        return self.name

    def run(self, row: dict, attempt: int) -> dict:
        """Process and commit one unit; errors come back as values (a raise means the worker died)."""
        t0 = time.perf_counter()
        try:
            unit = unit_from_row(row)
            unit.attempts = attempt
            tables = dict(self.processor.process(unit))
            seg = tables[SEGMENTS]
            seg = _set_column(seg, "attempts", attempt, pa.int32())
            seg = _set_column(seg, "worker", self.name, pa.string())
            tables[SEGMENTS] = seg
            self.store.commit_unit(row["unit_id"], row["shard"], tables)
        except Exception as exc:  # noqa: BLE001 -- any processing error is retried, then recorded
            msg = f"{type(exc).__name__}: {exc}"
            if os.environ.get("XS2T_DEBUG"):
                msg += "\n" + traceback.format_exc()
            return {"unit_id": row["unit_id"], "status": "error", "error": msg}
        n_masks = 0
        for col in ("n_masks_input", "n_masks_encoder"):
            if col in seg.column_names:
                n_masks += sum(v or 0 for v in seg.column(col).to_pylist())
        return {"unit_id": row["unit_id"], "status": "ok", "n_masks": n_masks,
                "seconds": time.perf_counter() - t0}

    def commit_failure(self, row: dict, error: str, attempts: int) -> None:
        self.store.commit_unit(row["unit_id"], row["shard"], {SEGMENTS: failure_table(row, error, attempts, self.name)})


def backoff_s(cfg: ExecConfig, attempt: int) -> float:
    """Wait before retry number `attempt` + 1 (exponential, capped)."""
    return min(cfg.retry_backoff_s * 2 ** (attempt - 1), cfg.retry_backoff_max_s)
