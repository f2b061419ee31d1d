"""The planner: work units -> RUN/plan.parquet with stable ids and shards balanced by audio length.

The plan holds every field a worker needs to rebuild a unit, so workers never re-read the corpus.
"""
from __future__ import annotations

import heapq
from typing import Any, Iterable

import pyarrow as pa

from cluster.store import RunStore
from jobs.corpus import Segment
from jobs.errors import RunError
from jobs.units import WorkUnit

PLAN = "plan.parquet"
SEGMENT_FIELDS = [
    ("segment_id", pa.string()), ("corpus", pa.string()), ("split", pa.string()),
    ("src_lang", pa.string()), ("tgt_lang", pa.string()), ("audio_path", pa.string()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("reference", pa.string()),
    ("source_text", pa.string()), ("speaker", pa.string()), ("duration_s", pa.float64()), ("error", pa.string()),
]
PLAN_SCHEMA = pa.schema([("unit_id", pa.string()), ("model_key", pa.string()), ("task", pa.string()),
                         ("shard", pa.int32())] + SEGMENT_FIELDS)


def unit_row(unit: Any, shard: int) -> dict:
    seg = unit.segment
    row = {"unit_id": unit.unit_id, "model_key": unit.model_key, "task": unit.task, "shard": shard}
    for name, _ in SEGMENT_FIELDS:
        row[name] = getattr(seg, name, None)
    return row


def unit_from_row(row: dict) -> Any:
    """Rebuild the unit object the processor expects from a plan row."""
    seg = Segment(**{k: row.get(k) for k, _ in SEGMENT_FIELDS})
    return WorkUnit(unit_id=row["unit_id"], model_key=row["model_key"], task=row["task"], segment=seg,
                    shard=row["shard"])


def balance_shards(durations: list[float], n_shards: int) -> list[int]:
    """Longest-first greedy: each unit goes to the shard with the least audio so far."""
    order = sorted(range(len(durations)), key=lambda i: -durations[i])  # stable: ties keep id order
    heap = [(0.0, k) for k in range(n_shards)]
    shard = [0] * len(durations)
    for i in order:
        load, k = heapq.heappop(heap)
        shard[i] = k
        heapq.heappush(heap, (load + durations[i], k))
    return shard


def plan_units(units: Iterable[Any], n_shards: int) -> pa.Table:
    units = sorted(units, key=lambda u: u.unit_id)
    ids = [u.unit_id for u in units]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RunError(f"plan: unit id {dup!r} occurs twice (duplicate segment ids in the corpus?)")
    n_shards = max(1, min(n_shards, len(units)))
    shards = balance_shards([float(u.segment.duration_s or 0.0) for u in units], n_shards)
    return pa.Table.from_pylist([unit_row(u, k) for u, k in zip(units, shards)], schema=PLAN_SCHEMA)


def write_plan(store: RunStore, plan: pa.Table) -> None:
    store.write_table(PLAN, plan)


def read_plan(store: RunStore) -> list[dict]:
    if not store.exists(PLAN):
        raise RunError(f"{store.path(PLAN)}: no plan in this run directory (start it with `xs2t run`)")
    return store.read_table(PLAN).to_pylist()
