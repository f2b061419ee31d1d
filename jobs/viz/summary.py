"""The run's tables as plain Python values: means over utterances of the committed result rows.

A *group* is one model x task x language pair (src, tgt). For each group and explanation target
('input' = SM^X at one pooling, 'encoder' = SM^H at one occlusion probability):
  grid       paper Table 1: r per layer x head, per-layer head averages, per-head layer averages
  layers     paper Tables 2-3: per-layer head averages and the global average
and per group: the pooling comparison (Table 4), the p_H sweep (Table 6), deletion curves and
their areas, size areas. Layers and heads are 0-based here; labels add 1.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from jobs.viz.data import RunData

GroupKey = tuple[str, str, str, str]   # model, task, src_lang, tgt_lang


def group_label(g: GroupKey) -> str:
    model, task, src, tgt = g
    return f"{model} {task} {src}-{tgt}"


def _nan_mean(values) -> float:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    return float(arr.mean()) if arr.size else float("nan")


@dataclass
class Grid:
    """Table 1 for one group and target: r[layer][head], head averages per layer, layer averages
    per head, global average, and the number of utterances."""

    r: np.ndarray          # [L, H] (NaN where no rows)
    head_avg: np.ndarray   # [L]  CA averaged over the heads of a layer
    layer_avg: np.ndarray  # [H]  CA of a head averaged over layers
    overall: float         # CA averaged over all layers and heads
    n: int


class Summary:
    def __init__(self, data: RunData):
        self.data = data
        corr = data.table("correlations")
        self.corr = corr.to_pylist() if corr.num_rows else []
        seg = data.segments
        # headline settings: what most committed units ran with
        self.headline_pooling = self._most_common(seg, "pooling", "2d_max")
        self.headline_p = self._most_common(seg, "p_encoder", None)
        self._means = self._mean_rows()

    @staticmethod
    def _most_common(t: pa.Table, column: str, default):
        if column not in t.column_names or t.num_rows == 0:
            return default
        values = [v for v in t[column].to_pylist() if v is not None]
        # 'pooling' may list several methods ("2d_max,2d_avg"): the first is the headline
        values = [v.split(",")[0].strip() if isinstance(v, str) else v for v in values]
        return Counter(values).most_common(1)[0][0] if values else default

    def _mean_rows(self) -> dict:
        """(group, target, setting, layer, head) -> (mean r, n). setting = pooling for 'input',
        p for 'encoder'."""
        acc: dict = defaultdict(list)
        for r in self.corr:
            g = (r["model"], r["task"], r["src_lang"], r["tgt_lang"])
            setting = r["pooling"] if r["target"] == "input" else (round(r["p"], 6) if r["p"] is not None else None)
            acc[(g, r["target"], setting, r["layer"], r["head"])].append(r["pearson"])
        return {k: (_nan_mean(v), len(v)) for k, v in acc.items()}

    # ---- what exists -----------------------------------------------------------------------------
    @property
    def groups(self) -> list[GroupKey]:
        return sorted({k[0] for k in self._means})

    def targets(self, g: GroupKey) -> list[str]:
        return sorted({k[1] for k in self._means if k[0] == g})

    def settings(self, g: GroupKey, target: str) -> list:
        values = {k[2] for k in self._means if k[0] == g and k[1] == target}
        return sorted(values, key=lambda v: (v is None, -v if isinstance(v, float) else 0, str(v)))

    def headline(self, g: GroupKey, target: str):
        """The setting shown by default: the job's pooling for SM^X, its p_H for SM^H."""
        options = self.settings(g, target)
        want = self.headline_pooling if target == "input" else self.headline_p
        if want is not None and isinstance(want, float):
            want = round(want, 6)
        return want if want in options else (options[0] if options else None)

    def shape(self, g: GroupKey) -> tuple[int, int]:
        layers = [k[3] for k in self._means if k[0] == g and k[3] is not None]
        heads = [k[4] for k in self._means if k[0] == g and k[4] is not None]
        return (max(layers) + 1 if layers else 0, max(heads) + 1 if heads else 0)

    # ---- tables ----------------------------------------------------------------------------------
    def grid(self, g: GroupKey, target: str, setting=None) -> Optional[Grid]:
        setting = self.headline(g, target) if setting is None else setting
        n_layers, n_heads = self.shape(g)
        if not n_layers or (g, target, setting, None, None) not in self._means:
            return None
        get = lambda l, h: self._means.get((g, target, setting, l, h), (float("nan"), 0))[0]
        r = np.array([[get(l, h) for h in range(n_heads)] for l in range(n_layers)], np.float64)
        overall, n = self._means[(g, target, setting, None, None)]
        return Grid(r, np.array([get(l, None) for l in range(n_layers)]), np.array([get(None, h) for h in range(n_heads)]),
                    overall, n)

    def gap(self, g: GroupKey) -> Optional[tuple[np.ndarray, float]]:
        """Context-mixing gap r(CA, SM^H) - r(CA, SM^X) per layer and overall (headline settings)."""
        h, x = self.grid(g, "encoder"), self.grid(g, "input")
        if h is None or x is None:
            return None
        return h.head_avg - x.head_avg, h.overall - x.overall

    # ---- deletion and size -----------------------------------------------------------------------
    def deletion(self) -> dict:
        """(group, explanation, side, pooling, p) -> {'percent': [...], 'wer': [...], 'auc': float, 'n': units}."""
        from xai_core import deletion_auc, wer_max

        t = self.data.table("deletion")
        if t.num_rows == 0:
            return {}
        t = self.data.with_unit_info(t)
        acc: dict = defaultdict(lambda: defaultdict(lambda: ([], [])))
        units: dict = defaultdict(set)
        for r in t.to_pylist():
            key = ((r["model"], r["task"], r["src_lang"], r["tgt_lang"]), r["explanation"], r["side"],
                   r.get("pooling"), r.get("p"))
            hyps, refs = acc[key][r["percent"]]
            hyps.append(r["hypothesis"] or "")
            refs.append(r["reference"] or "")
            units[key].add(r["unit_id"])
        out = {}
        for key, by_pct in acc.items():
            pct = sorted(by_pct)
            wer = [wer_max(*by_pct[p]) for p in pct]
            out[key] = {"percent": pct, "wer": wer, "auc": deletion_auc(pct, wer) if len(pct) > 1 else float("nan"),
                        "n": len(units[key])}
        return out

    def size(self) -> dict:
        """(group, explanation) -> {'threshold': [...], 'share': [...], 'area': float, 'n': units}."""
        t = self.data.table("size")
        if t.num_rows == 0:
            return {}
        t = self.data.with_unit_info(t)
        acc: dict = defaultdict(lambda: defaultdict(list))
        units: dict = defaultdict(set)
        for r in t.to_pylist():
            key = ((r["model"], r["task"], r["src_lang"], r["tgt_lang"]), r["explanation"])
            acc[key][round(r["threshold"], 6)].append(r["share"])
            units[key].add(r["unit_id"])
        out = {}
        for key, by_t in acc.items():
            x = np.array(sorted(by_t))
            y = np.array([np.mean(by_t[v]) for v in x])
            area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)) if x.size > 1 else float("nan")
            out[key] = {"threshold": x.tolist(), "share": y.tolist(), "area": area, "n": len(units[key])}
        return out

    # ---- the run record ---------------------------------------------------------------------------
    def record(self) -> dict:
        """Models, versions, settings, counts and timings of the committed units."""
        seg = self.data.segments.to_pylist()
        every = self.data.all_segments.to_pylist()
        distinct = lambda col: sorted({str(r[col]) for r in seg if r.get(col) is not None})
        timing = {}
        for col in ("t_decode_s", "t_input_s", "t_encoder_s", "t_total_s"):
            vals = [r[col] for r in seg if r.get(col) is not None]
            if vals:
                timing[col] = {"mean": float(np.mean(vals)), "total": float(np.sum(vals)), "max": float(np.max(vals))}
        audio = float(sum(r["duration_s"] or 0.0 for r in seg))
        return {
            "units_ok": len(seg), "units_failed": len(every) - len(seg),
            "models": distinct("model"), "tasks": distinct("task"),
            "pairs": sorted({f"{r['src_lang']}-{r['tgt_lang']}" for r in seg}),
            "audio_hours": audio / 3600.0,
            "n_masks_input": distinct("n_masks_input"), "n_masks_encoder": distinct("n_masks_encoder"),
            **{col: distinct(col) for col in ("seed", "p_input", "p_encoder", "level_split", "occlusion", "pooling",
                                              "dtype", "device", "model_checksum", "code_version", "torch_version",
                                              "skimage_version")},
            "timing": timing,
            "first_finished": min((r["finished_at"] for r in seg if r.get("finished_at")), default=None),
            "last_finished": max((r["finished_at"] for r in seg if r.get("finished_at")), default=None),
        }
