"""Word timestamps from explanation maps by dynamic time warping, and their boundary errors.

A map [I, T'] (tokens x encoder steps) says how strongly each token relates to each step. As
Whisper's word-timestamp tools do with cross-attention, normalise it, smooth it along time with a
median filter, and find the monotonic token -> step path of maximal total score (DTW on the negated
map). A word starts at the first step of its first token and ends after the last step of its last
token; steps are converted to seconds with the model's subsampling x 10 ms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.ndimage import median_filter

from jobs.viz.words import Word


def zscore(x: np.ndarray, axis: int) -> np.ndarray:
    """Standardise along `axis` (population std); constant slices become 0."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis, keepdims=True)
    std = x.std(axis, keepdims=True)
    return np.where(std > 0, (x - mean) / np.where(std > 0, std, 1.0), 0.0)


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimal-cost monotonic path through `cost` [I, T] from (0, 0) to (I-1, T-1) with steps
    (1, 1), (1, 0), (0, 1). Returns (token index, step index) arrays along the path.

    Row by row: a cell is reached from the row above (diagonal or vertical) or from its left
    neighbour; the left-neighbour chain is a running minimum, so each row is vectorised:
    D[i, j] = S[j] + min_{k<=j} (A[k] - S[k]) with S the cumulative cost of row i and A the best
    arrival from row i-1."""
    cost = np.asarray(cost, np.float64)
    n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError("dtw_path: empty cost matrix")
    total = np.full((n, m), np.inf)
    from_above = np.zeros((n, m), np.int8)   # 0: diagonal, 1: vertical, 2: from the left
    cols = np.arange(m)
    prev = None
    for i in range(n):
        s = np.cumsum(cost[i])
        if i == 0:
            arrive = np.full(m, np.inf)
            arrive[0] = cost[0, 0]
            kind = np.zeros(m, np.int8)
        else:
            diag = np.concatenate([[np.inf], prev[:-1]])
            vert = prev
            kind = np.where(vert < diag, 1, 0).astype(np.int8)
            arrive = np.minimum(diag, vert) + cost[i]
        key = arrive - s
        run = np.minimum.accumulate(key)
        total[i] = s + run
        # where the running minimum was set: arriving there beats coming from the left
        argmin = np.maximum.accumulate(np.where(key <= run, cols, 0))
        from_above[i] = np.where(argmin == cols, kind, 2)
        prev = total[i]
    if not np.isfinite(total[-1, -1]):
        raise ValueError("dtw_path: no path")
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        move = from_above[i, j]
        if move == 2:
            j -= 1
        elif move == 1:
            i -= 1
        else:
            i, j = i - 1, j - 1
        path.append((i, j))
    path = np.array(path[::-1])
    return path[:, 0], path[:, 1]


def prepare_map(m: np.ndarray, norm: str, filter_width: int = 7) -> np.ndarray:
    """Map [I, T'] ready for DTW. norm 'frame': z-score each step over tokens (cross-attention;
    removes attention sinks); 'token': z-score each token row (saliency). Then a median filter of
    `filter_width` steps along time."""
    if norm == "frame":
        x = zscore(m, 0)
    elif norm == "token":
        x = zscore(m, 1)
    else:
        raise ValueError(f"norm must be 'frame' or 'token', got {norm!r}")
    if filter_width > 1 and x.shape[1] >= filter_width:
        x = median_filter(x, size=(1, filter_width), mode="nearest")
    return x


def token_steps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last encoder step of every row of a prepared map [I, T'] on the DTW path."""
    rows, steps = dtw_path(-m)
    first = np.full(m.shape[0], -1)
    last = np.full(m.shape[0], -1)
    for r, s in zip(rows, steps):
        if first[r] < 0:
            first[r] = s
        last[r] = s
    return first, last


@dataclass
class Timed:
    text: str
    start: float
    end: float


def word_times(m: np.ndarray, rows: Sequence[int], words: Sequence[Word], step_s: float, norm: str,
               filter_width: int = 7) -> list[Timed]:
    """Timestamps of `words` from map `m` [R, T'] whose rows are the hypothesis rows `rows`
    (e.g. prefix + content + end token for CA, content only for saliency). Words index hypothesis
    rows; every word row must be among `rows`."""
    first, last = token_steps(prepare_map(m, norm, filter_width))
    where = {int(r): k for k, r in enumerate(rows)}
    out = []
    for w in words:
        ks = [where[t] for t in w.tokens]
        out.append(Timed(w.text, float(first[ks].min() * step_s), float((last[ks].max() + 1) * step_s)))
    return out


def uniform_times(words: Sequence[Word], duration_s: float) -> list[Timed]:
    """Baseline without any map: the segment's time shared out by word length (characters + 1)."""
    sizes = np.array([len(w.text) + 1 for w in words], np.float64)
    edges = np.concatenate([[0.0], np.cumsum(sizes)]) / max(sizes.sum(), 1.0) * duration_s
    return [Timed(w.text, float(a), float(b)) for w, a, b in zip(words, edges[:-1], edges[1:])]


def boundary_errors(pred: Sequence[Timed], ref: Sequence[dict], pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """|start error| and |end error| in seconds of each matched word: [n_pairs, 2]."""
    if not pairs:
        return np.zeros((0, 2))
    return np.array([[abs(pred[i].start - float(ref[j]["start"])), abs(pred[i].end - float(ref[j]["end"]))]
                     for i, j in pairs])


def summarise_errors(errors: np.ndarray, tolerance_s: float = 0.2) -> dict:
    """Mean absolute boundary error (start, end, both) and the share of boundaries within tolerance."""
    if errors.size == 0:
        return {"words": 0, "mae_start": float("nan"), "mae_end": float("nan"), "mae": float("nan"),
                "within": float("nan")}
    return {"words": int(errors.shape[0]), "mae_start": float(errors[:, 0].mean()),
            "mae_end": float(errors[:, 1].mean()), "mae": float(errors.mean()),
            "within": float((errors <= tolerance_s).mean() * 100.0)}
