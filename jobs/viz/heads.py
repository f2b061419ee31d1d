"""Rank decoder cross-attention heads by how well they agree with saliency, and export the best
ones as an alignment-head list for word-timestamp tools.

Whisper tools name alignment heads as 0-based [layer, head] pairs (Hugging Face
`generation_config.alignment_heads`); openai-whisper stores the same set as a boolean
[layers, heads] mask, gzip-compressed and base85-encoded (`model.set_alignment_heads(dump)`).
Both are written here from the saliency ranking.
"""
from __future__ import annotations

import base64
import gzip
import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from jobs.viz.summary import GroupKey, Summary

BY = ("both", "input", "encoder")


@dataclass
class Ranked:
    layer: Optional[int]        # None: an average over layers
    head: Optional[int]         # None: an average over heads
    r_input: float              # mean r(CA, SM^X), headline pooling
    r_encoder: float            # mean r(CA, SM^H), headline p_H
    score: float                # what the ranking sorts by

    @property
    def label(self) -> str:
        if self.layer is None and self.head is None:
            return "all heads"
        if self.head is None:
            return f"layer {self.layer + 1} (avg)"
        if self.layer is None:
            return f"head {self.head + 1} (avg over layers)"
        return f"l{self.layer + 1} h{self.head + 1}"


def _score(r_x: float, r_h: float, by: str) -> float:
    if by == "input":
        return r_x
    if by == "encoder":
        return r_h
    vals = [v for v in (r_x, r_h) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def rank_heads(summary: Summary, group: GroupKey, by: str = "both") -> tuple[list[Ranked], list[Ranked]]:
    """(single heads, averages) of one group, best first by `by` ('input' = SM^X, 'encoder' =
    SM^H, 'both' = the mean of the two). Averages: per layer, and over all heads."""
    if by not in BY:
        raise ValueError(f"--by must be one of {', '.join(BY)}, not {by!r}")
    gx, gh = summary.grid(group, "input"), summary.grid(group, "encoder")
    if gx is None and gh is None:
        return [], []
    ref = gx if gx is not None else gh
    n_layers, n_heads = ref.r.shape
    nan = np.full((n_layers, n_heads), np.nan)
    rx = gx.r if gx is not None else nan
    rh = gh.r if gh is not None else nan
    heads = [Ranked(l, h, float(rx[l, h]), float(rh[l, h]), _score(rx[l, h], rh[l, h], by))
             for l in range(n_layers) for h in range(n_heads)]
    ax = gx.head_avg if gx is not None else nan[:, 0]
    ah = gh.head_avg if gh is not None else nan[:, 0]
    avgs = [Ranked(l, None, float(ax[l]), float(ah[l]), _score(ax[l], ah[l], by)) for l in range(n_layers)]
    ox = gx.overall if gx is not None else float("nan")
    oh = gh.overall if gh is not None else float("nan")
    avgs.append(Ranked(None, None, ox, oh, _score(ox, oh, by)))
    key = lambda r: -r.score if not math.isnan(r.score) else math.inf
    return sorted(heads, key=key), sorted(avgs, key=key)


def top_heads(ranked: Sequence[Ranked], k: int) -> list[list[int]]:
    """The k best single heads as 0-based [layer, head] pairs, sorted by layer then head."""
    chosen = [r for r in ranked if r.layer is not None and r.head is not None and not math.isnan(r.score)][:k]
    return sorted([[r.layer, r.head] for r in chosen])


def whisper_mask_dump(pairs: Sequence[Sequence[int]], n_layers: int, n_heads: int) -> str:
    """openai-whisper's alignment-head format: base85(gzip(bool mask [layers, heads] in C order))."""
    mask = np.zeros((n_layers, n_heads), dtype=bool)
    for layer, head in pairs:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes(), mtime=0)).decode("ascii")


def whisper_mask_load(dump: str, n_layers: int, n_heads: int) -> list[list[int]]:
    """Inverse of `whisper_mask_dump` (to check a dump, or to read a Whisper model's own heads)."""
    mask = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool).reshape(n_layers, n_heads)
    return [[int(l), int(h)] for l, h in zip(*np.nonzero(mask))]


def export(summary: Summary, groups: Sequence[GroupKey], k: int, by: str) -> dict:
    """JSON-ready export: per group its top-k heads ([layer, head], 0-based), the openai-whisper
    mask dump, the model's shape and the scores they were chosen by."""
    out = {}
    for g in groups:
        heads, _ = rank_heads(summary, g, by)
        if not heads:
            continue
        n_layers, n_heads = summary.shape(g)
        pairs = top_heads(heads, k)
        chosen = {(p[0], p[1]) for p in pairs}
        out["/".join(g)] = {
            "model": g[0], "task": g[1], "src_lang": g[2], "tgt_lang": g[3],
            "n_text_layer": n_layers, "n_text_head": n_heads, "by": by, "top_k": k,
            "alignment_heads": pairs,
            "whisper_dump": whisper_mask_dump(pairs, n_layers, n_heads),
            "scores": [{"layer": r.layer, "head": r.head, "r_input": _clean(r.r_input), "r_encoder": _clean(r.r_encoder)}
                       for r in heads if (r.layer, r.head) in chosen],
        }
    return out


def _clean(x: float) -> Optional[float]:
    return None if math.isnan(x) else round(float(x), 6)


def load_heads(path: str, group: Optional[GroupKey] = None) -> Optional[list[list[int]]]:
    """Heads from a file: a JSON list of [layer, head] (used for every group), or an `xs2t heads`
    export (the entry of `group`, else one of the same model: heads belong to the model; None when
    the export has no entry for that model)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read heads ({exc})") from None
    if isinstance(data, dict) and "alignment_heads" in data:
        data = data["alignment_heads"]
    if isinstance(data, list):
        try:
            return [[int(l), int(h)] for l, h in data]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: expected a JSON list of [layer, head] pairs") from None
    if isinstance(data, dict) and all(isinstance(v, dict) and "alignment_heads" in v for v in data.values()):
        entry = data.get("/".join(group)) if group else None
        if entry is None and group is not None:
            entry = next((v for v in data.values() if v.get("model") == group[0]), None)
        return None if entry is None else [[int(l), int(h)] for l, h in entry["alignment_heads"]]
    raise ValueError(f"{path}: expected a JSON list of [layer, head] pairs or an `xs2t heads` export")
