"""Read what a run committed: the segments rows, run-level tables and one unit's maps.

Only committed units count (a `segments` row with status 'ok'); rows of other tables whose unit
has no such row are ignored (a unit being written, or one that failed and is being retried).
Works for local run folders and pyarrow URIs (s3://...).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.errors import RunError
from jobs.schema import read_results, result_file, run_filesystem

FRAME_S = 0.01  # every model here has 10 ms input frames


@dataclass
class UnitMaps:
    """One committed unit: hypothesis tokens and its explanation maps (rows = all predicted tokens)."""

    unit_id: str
    row: dict                                  # its `segments` row
    tokens: list[str]                          # raw pieces, prefix and end token included
    ca: Optional[np.ndarray] = None            # [L, H, I, T']
    smx: Optional[np.ndarray] = None           # [I, T, F]  (rows never stored are 0)
    smh: Optional[np.ndarray] = None           # [I, T']
    smx_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [I] which rows SM^X has
    smh_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def prefix_len(self) -> int:
        return int(self.row.get("prefix_len") or 0)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def content(self) -> slice:
        """Content rows: forced prefix and the final end token dropped (METHOD.md §4.1)."""
        return slice(self.prefix_len, max(self.prefix_len, self.n_tokens - 1))

    @property
    def n_frames(self) -> int:
        return int(self.row.get("n_frames") or (self.smx.shape[1] if self.smx is not None else 0))

    @property
    def n_steps(self) -> int:
        if self.row.get("n_steps"):
            return int(self.row["n_steps"])
        return int(self.ca.shape[-1] if self.ca is not None else self.smh.shape[-1])

    @property
    def subsampling(self) -> int:
        """Input frames per encoder step (4 for the FBK Conformer, 2 for Whisper)."""
        if self.n_frames and self.n_steps:
            return max(1, int(round(self.n_frames / self.n_steps)))
        return 1

    @property
    def step_s(self) -> float:
        return self.subsampling * FRAME_S


class RunData:
    """Lazy reader of a run directory (local path or URI)."""

    def __init__(self, run: str | os.PathLike):
        self.run = str(run)
        self.fs, self.path = run_filesystem(run)
        if not self._exists(f"{self.path}/results") and not self._exists(f"{self.path}/job.yaml"):
            raise RunError(f"{self.run}: not a run directory (no results/ and no job.yaml)")

    def _exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # ---- run-level tables ------------------------------------------------------------------------
    @cached_property
    def all_segments(self) -> pa.Table:
        """Every committed `segments` row, failed ones included."""
        return read_results(self.run, "segments")

    @cached_property
    def segments(self) -> pa.Table:
        """Rows of the committed units with status 'ok', sorted by model, task and segment."""
        t = self.all_segments.filter(pc.equal(self.all_segments["status"], "ok"))
        return t.sort_by([("model", "ascending"), ("task", "ascending"), ("segment_id", "ascending")])

    @cached_property
    def failures(self) -> list[dict]:
        t = self.all_segments.filter(pc.equal(self.all_segments["status"], "failed"))
        return t.select(["unit_id", "segment_id", "model", "task", "attempts", "error"]).to_pylist()

    @cached_property
    def ok_units(self) -> set[str]:
        return set(self.segments["unit_id"].to_pylist())

    @cached_property
    def unit_rows(self) -> dict[str, dict]:
        return {r["unit_id"]: r for r in self.segments.to_pylist()}

    def table(self, name: str, columns: Optional[list[str]] = None) -> pa.Table:
        """Rows of a result table that belong to committed 'ok' units."""
        t = read_results(self.run, name, columns=columns if columns is None or "unit_id" in columns
                         else ["unit_id", *columns])
        if t.num_rows == 0:
            return t
        return t.filter(pc.is_in(t["unit_id"], value_set=pa.array(sorted(self.ok_units), pa.string())))

    def with_unit_info(self, t: pa.Table, columns=("model", "task", "src_lang", "tgt_lang")) -> pa.Table:
        """Add segments columns (model, task, ...) to rows keyed by unit_id."""
        info = self.segments.select(["unit_id", *[c for c in columns if c not in t.column_names]])
        return t.join(info, "unit_id", join_type="inner")

    @cached_property
    def job(self) -> dict:
        """RUN/job.yaml as a dict ({} when absent)."""
        import yaml

        path = f"{self.path}/job.yaml"
        if not self._exists(path):
            return {}
        with self.fs.open_input_stream(path) as f:
            return yaml.safe_load(f.read().decode("utf-8")) or {}

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/")) or self.run

    # ---- one unit ---------------------------------------------------------------------------------
    def find_unit(self, key: str) -> str:
        """unit_id from a unit id, a segment id or a unique substring of either."""
        rows = self.unit_rows
        if key in rows:
            return key
        hits = [u for u, r in rows.items() if r["segment_id"] == key] or \
               [u for u, r in rows.items() if key in u or key in r["segment_id"]]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise RunError(f"{self.run}: no committed unit matches {key!r} (see `xs2t status` for the units)")
        shown = ", ".join(hits[:4]) + (", ..." if len(hits) > 4 else "")
        raise RunError(f"{self.run}: {key!r} matches {len(hits)} units ({shown}); give the full unit id")

    def _unit_table(self, name: str, row: dict) -> Optional[pa.Table]:
        path = result_file(self.path, name, int(row.get("shard") or 0), row["unit_id"])
        if not self._exists(path):
            return None
        with self.fs.open_input_file(path) as f:
            return pq.read_table(io.BytesIO(f.read()))

    def unit(self, unit_id: str, input_map: bool = True) -> UnitMaps:
        """Maps of one committed unit (SM^X only if `input_map`: it is the largest table)."""
        row = self.unit_rows.get(unit_id)
        if row is None:
            raise RunError(f"{self.run}: unit {unit_id!r} is not committed with status ok")
        tokens = list(row.get("hyp_tokens") or [])
        out = UnitMaps(unit_id, row, tokens)
        n_tok = len(tokens)
        ca = self._unit_table("cross_attention", row)
        if ca is not None and ca.num_rows:
            layers = np.asarray(ca["layer"].to_pylist())
            heads = np.asarray(ca["head"].to_pylist())
            n_i, n_t = ca["n_tokens"][0].as_py(), ca["n_steps"][0].as_py()
            w = np.stack([np.asarray(v, np.float32) for v in ca["weights"].to_pylist()])
            arr = np.zeros((layers.max() + 1, heads.max() + 1, n_i, n_t), np.float32)
            arr[layers, heads] = w.reshape(-1, n_i, n_t)
            out.ca = arr
            n_tok = n_tok or n_i
        for name in ("saliency_input", "saliency_encoder"):
            if name == "saliency_input" and not input_map:
                continue
            t = self._unit_table(name, row)
            if t is None or t.num_rows == 0:
                continue
            idx = np.asarray(t["token_index"].to_pylist())
            size = max(n_tok, int(idx.max()) + 1)
            present = np.zeros(size, bool)
            present[idx] = True
            values = [np.asarray(v, np.float32) for v in t["values"].to_pylist()]
            if name == "saliency_input":
                nf, nb = t["n_frames"][0].as_py(), t["n_bins"][0].as_py()
                arr = np.zeros((size, nf, nb), np.float32)
                arr[idx] = np.stack(values).reshape(-1, nf, nb)
                out.smx, out.smx_rows = arr, present
            else:
                ns = t["n_steps"][0].as_py()
                arr = np.zeros((size, ns), np.float32)
                arr[idx] = np.stack(values).reshape(-1, ns)
                out.smh, out.smh_rows = arr, present
            if not out.tokens:
                out.tokens = [""] * size
                for i, tok in zip(idx, t["token"].to_pylist()):
                    out.tokens[i] = tok
        return out
