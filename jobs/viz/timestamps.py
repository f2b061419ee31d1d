"""`xs2t timestamps`: word timestamps from CA (chosen heads), SM^X and SM^H, scored against the
exact word boundaries of a synthetic corpus (words.jsonl).

Only ASR units can be scored (the known words are the spoken ones). For each unit: group the
hypothesis pieces into words, align them to the reference words (equal words on a minimum-edit
alignment; the others are not scored), time the hypothesis words with each method, and collect
|start error| and |end error|. Rows used by DTW: the content rows plus the end token's row (it
soaks up trailing silence, like Whisper's end-of-text row).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from jobs.viz.align import boundary_errors, summarise_errors, uniform_times, word_times
from jobs.viz.data import RunData, UnitMaps
from jobs.viz.heads import load_heads, rank_heads, top_heads
from jobs.viz.summary import GroupKey, Summary
from jobs.viz.words import WordTimings, group_words, match_words


@dataclass
class Method:
    name: str              # 'ca', 'sm_x', 'sm_h', 'uniform'
    choice: str            # which heads / which pooling, in words
    heads: Optional[list[list[int]]] = None


def head_choices(summary: Summary, g: GroupKey, k: int, heads_file: Optional[str], each_head: bool) -> list[Method]:
    n_layers, n_heads = summary.shape(g)
    out = [Method("ca", "all heads (avg)", [[l, h] for l in range(n_layers) for h in range(n_heads)])]
    out += [Method("ca", f"layer {l + 1} (avg)", [[l, h] for h in range(n_heads)]) for l in range(n_layers)]
    for by, name in (("input", "SM^X"), ("encoder", "SM^H"), ("both", "SM^X+SM^H")):
        ranked, _ = rank_heads(summary, g, by)
        pairs = top_heads(ranked, k)
        if pairs:
            out.append(Method("ca", f"top-{k} by r with {name}: {_pairs(pairs)}", pairs))
    if heads_file:
        pairs = load_heads(heads_file, g)
        if pairs is not None:
            bad = [p for p in pairs if not (0 <= p[0] < n_layers and 0 <= p[1] < n_heads)]
            if bad or not pairs:
                raise ValueError(f"{heads_file}: heads {bad or pairs} do not fit {g[0]} ({n_layers} layers x "
                                 f"{n_heads} heads; pairs are 0-based [layer, head])")
            out.append(Method("ca", f"from file: {_pairs(pairs)}", pairs))
    if each_head:
        out += [Method("ca", f"l{l + 1} h{h + 1}", [[l, h]]) for l in range(n_layers) for h in range(n_heads)]
    return out


def _pairs(pairs: Sequence[Sequence[int]]) -> str:
    text = " ".join(f"l{l + 1}h{h + 1}" for l, h in pairs)
    return text if len(text) <= 60 else text[:57] + "..."


def _dtw_rows(u: UnitMaps, present: Optional[np.ndarray] = None) -> list[int]:
    rows = list(range(u.content.start, min(u.n_tokens, u.content.stop + 1)))   # + the end token
    if present is not None:
        rows = [r for r in rows if r < present.size and present[r]]
    return rows


def unit_times(u: UnitMaps, methods: Sequence[Method], pooling: str, filter_width: int = 7) -> dict:
    """{(name, choice): [Timed]} for the hypothesis words of one unit."""
    words = group_words(u.tokens, u.content)
    out = {}
    if not words:
        return out
    duration = float(u.row.get("duration_s") or u.n_frames * 0.01)
    out[("uniform", "by word length")] = uniform_times(words, duration)
    if u.ca is not None:
        rows = _dtw_rows(u)
        for m in methods:
            ca = u.ca[[l for l, _ in m.heads], [h for _, h in m.heads]]            # [K, I, T']
            ca = ca[:, rows, : u.n_steps].mean(0)
            out[(m.name, m.choice)] = word_times(ca, rows, words, u.step_s, "frame", filter_width)
    needed = {t for w in words for t in w.tokens}
    if u.smh is not None:
        rows = _dtw_rows(u, u.smh_rows)
        if needed <= set(rows):
            out[("sm_h", "SM^H")] = word_times(u.smh[rows, : u.n_steps], rows, words, u.step_s, "token", filter_width)
    if u.smx is not None:
        import torch

        from xai_core import pool_input_saliency

        rows = _dtw_rows(u, u.smx_rows)
        if needed <= set(rows):
            pooled = pool_input_saliency(torch.from_numpy(u.smx[rows]), u.subsampling, pooling, n_steps=u.n_steps)
            out[("sm_x", f"SM^X ({pooling})")] = word_times(pooled.numpy(), rows, words, u.step_s, "token", filter_width)
    return out


def evaluate(data: RunData, k: int = 6, heads_file: Optional[str] = None, corpus_root: Optional[str] = None,
             each_head: bool = False, tolerance_s: float = 0.2, filter_width: int = 7,
             progress: Optional[Callable[[Sequence], Sequence]] = None) -> dict:
    """Per group: rows {method, choice, words, mae_start, mae_end, mae, within} sorted by mae,
    plus counts of units scored and skipped."""
    summary = Summary(data)
    timings = WordTimings(corpus_root)
    units = [r for r in data.segments.to_pylist() if r["task"] == "asr"]
    methods: dict[GroupKey, list[Method]] = {}
    errors: dict[GroupKey, dict] = defaultdict(lambda: defaultdict(list))
    counts: dict[GroupKey, dict] = defaultdict(lambda: {"units": 0, "no_words": 0, "hyp_words": 0, "matched": 0})
    for row in (progress(units) if progress else units):
        g = (row["model"], row["task"], row["src_lang"], row["tgt_lang"])
        ref = timings.words(row)
        if ref is None:
            counts[g]["no_words"] += 1
            continue
        if g not in methods:
            methods[g] = head_choices(summary, g, k, heads_file, each_head)
        u = data.unit(row["unit_id"])
        times = unit_times(u, methods[g], summary.headline_pooling, filter_width)
        if not times:
            continue
        hyp_words = next(iter(times.values()))
        pairs = match_words([w.text for w in hyp_words], [w["word"] for w in ref])
        counts[g]["units"] += 1
        counts[g]["hyp_words"] += len(hyp_words)
        counts[g]["matched"] += len(pairs)
        for key, pred in times.items():
            errors[g][key].append(boundary_errors(pred, ref, pairs))
    out = {}
    for g in sorted(set(errors) | set(counts)):
        rows = []
        for (name, choice), parts in errors[g].items():
            stats = summarise_errors(np.concatenate(parts) if parts else np.zeros((0, 2)), tolerance_s)
            rows.append({"method": name, "choice": choice, **stats})
        rows.sort(key=lambda r: (np.isnan(r["mae"]), r["mae"]))
        out[g] = {"rows": rows, **counts[g], "tolerance_s": tolerance_s}
    return out
