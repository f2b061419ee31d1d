"""Faithfulness metrics (METHOD.md §5): deletion orders and inputs, wer_max, deletion AUC, size."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from xai_core.compare import paired_min_max, single_mean_std

PERCENTAGES = tuple(range(0, 101, 5))
SIZE_THRESHOLDS = tuple(i / 20 for i in range(21))


# ---- deletion orders -------------------------------------------------------------------------------

def sentence_map(token_map: torch.Tensor) -> torch.Tensor:
    """Sentence-level map: mean over token rows ([I, ...] -> [...])."""
    return token_map.float().mean(0)


def upsample_steps(step_map: torch.Tensor, subsampling: int, n_frames: int) -> torch.Tensor:
    """Nearest-neighbour upsampling of a [..., T'] map to [..., T]: frame t takes step t // s
    (clipped to the last step)."""
    index = (torch.arange(n_frames, device=step_map.device) // int(subsampling)).clamp(max=step_map.shape[-1] - 1)
    return step_map[..., index]


def deletion_order(relevance: torch.Tensor) -> torch.Tensor:
    """Indices of the flattened map, most relevant first (ties: lower index first).
    [T] -> frame order, [T, F] -> cell order (full-resolution SM^X), [T'] -> encoder-state order."""
    return torch.argsort(relevance.flatten().double(), descending=True, stable=True)


def frame_order(token_map: torch.Tensor, n_frames: int, subsampling: int = 1) -> torch.Tensor:
    """Frame order from a per-token map: [I, T'] (CA, pooled SM^X; upsampled by `subsampling`),
    [I, T] (frame-level) or [I, T, F] (averaged over bins)."""
    m = sentence_map(token_map)
    if m.dim() == 2:
        m = m.mean(-1)
    if m.shape[0] != n_frames:
        m = upsample_steps(m, subsampling, n_frames)
    return deletion_order(m)


def _n_selected(n_units: int, percentage: float) -> int:
    """floor(N * pct / 100), exact for whole percentages."""
    if float(percentage).is_integer():
        return n_units * int(percentage) // 100
    return int(np.floor(n_units * float(percentage) / 100.0))


@torch.inference_mode()
def deletion_inputs(features: torch.Tensor, order: torch.Tensor, percentages: Sequence[float] = PERCENTAGES,
                    occlusion: str | torch.Tensor = "bin_mean") -> torch.Tensor:
    """Perturbed inputs [P, T, F]: for each percentage, the top floor(N * pct / 100) units of
    `order` are set to the occlusion value. `order` over T entries means frames (all bins of a
    frame), over T*F entries means single cells. occlusion: 'bin_mean', 'zero' or a [F] tensor."""
    n_frames, n_bins = features.shape
    if isinstance(occlusion, torch.Tensor):
        fill = occlusion.to(features)
    elif occlusion == "bin_mean":
        fill = features.float().mean(0).to(features.dtype)
    elif occlusion == "zero":
        fill = torch.zeros(n_bins, dtype=features.dtype, device=features.device)
    else:
        raise ValueError(f"occlusion must be 'bin_mean', 'zero' or a tensor, got {occlusion!r}")
    n_units = order.numel()
    if n_units == n_frames:
        unit_shape = (n_frames, 1)
    elif n_units == n_frames * n_bins:
        unit_shape = (n_frames, n_bins)
    else:
        raise ValueError(f"order has {n_units} entries; expected {n_frames} frames or {n_frames * n_bins} cells")
    rank = torch.empty(n_units, dtype=torch.long, device=order.device)
    rank[order] = torch.arange(n_units, device=order.device)   # rank[u] = position of unit u in the order
    rank = rank.view(unit_shape).to(features.device)
    out = []
    for pct in percentages:
        deleted = rank < _n_selected(n_units, pct)
        out.append(torch.where(deleted, fill, features))
    return torch.stack(out)


@torch.inference_mode()
def encoder_deletion_masks(order: torch.Tensor, percentages: Sequence[float] = PERCENTAGES,
                           valid_length: Optional[int] = None) -> torch.Tensor:
    """Keep masks [P, T'] (False = state zeroed) for encoder-side deletion by SM^H rank. Only the
    first `valid_length` states take part (padding is never zeroed)."""
    n_steps = order.numel()
    valid = n_steps if valid_length is None else int(valid_length)
    ranked = order[order < valid]
    rank = torch.full((n_steps,), n_steps, dtype=torch.long, device=order.device)
    rank[ranked] = torch.arange(ranked.numel(), device=order.device)
    return torch.stack([rank >= _n_selected(valid, pct) for pct in percentages])


# ---- scores ----------------------------------------------------------------------------------------

def wer_max(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER in percent, min(100, 100 * sum(edit distance) / sum(reference words)), on plain
    whitespace tokens, case-sensitive, no normalisation (jiwer's word alignment). 0 if there are no
    reference words."""
    import jiwer

    if len(hypotheses) != len(references):
        raise ValueError(f"wer_max: {len(hypotheses)} hypotheses vs {len(references)} references")
    errors, words = 0, 0
    pairs = [(h, r) for h, r in zip(hypotheses, references) if r.split()]
    for h, r in zip(hypotheses, references):
        if not r.split():
            errors += len(h.split())  # nothing to match: every hypothesis word is an insertion
    if pairs:
        out = jiwer.process_words([r for _, r in pairs], [h for h, _ in pairs])
        errors += out.substitutions + out.deletions + out.insertions
        words += sum(len(r.split()) for _, r in pairs)
    if words == 0:
        return 0.0
    return min(100.0, 100.0 * errors / words)


def deletion_auc(percentages: Sequence[float], wers: Sequence[float]) -> float:
    """Area under the (WER vs percentage deleted) curve by the trapezoid rule, as a percentage of
    the maximum area 100 * 100 (so 0..100)."""
    x = np.asarray(percentages, dtype=np.float64)
    y = np.asarray(wers, dtype=np.float64)
    if x.shape != y.shape or x.size < 2:
        raise ValueError("deletion_auc: need matching percentages and WERs (at least two points)")
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return 100.0 * area / (100.0 * 100.0)


@torch.inference_mode()
def size_curve(token_map: torch.Tensor, thresholds: Sequence[float] = SIZE_THRESHOLDS) -> np.ndarray:
    """SPES size for one utterance: per token z-score (single_mean_std) then min-max (paired_min_max)
    to [0, 1]; percentage of cells >= each threshold (over all tokens and cells)."""
    normalised, _ = paired_min_max(single_mean_std(token_map))
    flat = normalised.flatten()
    return np.array([100.0 * float((flat >= t).double().mean()) for t in thresholds])


def size_score(token_maps: Sequence[torch.Tensor], thresholds: Sequence[float] = SIZE_THRESHOLDS) -> tuple[np.ndarray, float]:
    """Mean size curve over utterances and its area over the thresholds (trapezoid; 0..100, lower
    is more compact)."""
    curve = np.mean([size_curve(m, thresholds) for m in token_maps], axis=0)
    x = np.asarray(thresholds, dtype=np.float64)
    area = float(np.sum((x[1:] - x[:-1]) * (curve[1:] + curve[:-1]) / 2.0))
    return curve, area
