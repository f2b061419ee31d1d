"""SPES-style occlusion saliency: SM^X over input cells and SM^H over encoder states.

The estimator (METHOD.md §2): SM[i, cell] = sum_k score_ik * occluded_k(cell) / #{k: occluded_k(cell)},
0 for cells never occluded. It is accumulated per occlusion unit (superpixel or encoder state) with
one matrix product per batch, scores^T [I, B] @ occluded [B, K], and scattered to cells only when a
map is asked for.

Exactness: scores are rounded to a fixed-point grid (2^-32 nats, clamped to +-1000 nats) before
they are summed. Every partial sum of a batch of at most 2048 masks is then an integer below 2^53,
so the float64 product is exact whatever order the BLAS adds in, and the int64 accumulators are
exact as well. Hence numerators and counts are exact sums: any batch size and any split of the mask
range give bit-identical maps, and merging blocks is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from xai_core.compare import pool_input_saliency
from xai_core.masks import level_ranges, mask_key, occlusion_masks, segment_counts, superpixels

SCORE_SCALE = 2.0 ** 32      # fixed-point resolution of accumulated scores (nats)
MAX_SCORE = 1000.0           # scores are clamped to [-MAX_SCORE, MAX_SCORE] nats before summing
MAX_EXACT_BATCH = 2048       # masks per matrix product that keep float64 sums exact
LOG_Q_FLOOR = -1.0e4         # log Q is floored here so that P = 0 terms are exactly 0 (no 0 * inf)


# ---- scores --------------------------------------------------------------------------------------

def kl_scores(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(P_i || Q_i) in nats per mask and token: [B, I] float32 from P = exp(ref) [I, V] and
    log Q [B, I, V]. Terms with P = 0 count 0 (xlogy semantics), so no NaN from zeros in P."""
    p = ref_log_probs.float().exp()
    log_p = torch.where(p > 0, ref_log_probs.float(), torch.zeros_like(p))
    return _kl(p, log_p, log_probs)


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    terms = log_probs.float().clamp(min=LOG_Q_FLOOR)   # a fresh tensor: modified in place below
    return terms.neg_().add_(log_p).mul_(p).sum(-1)    # sum_v P (log P - log Q)


# ---- the estimate --------------------------------------------------------------------------------

def _merge_intervals(intervals: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


@dataclass
class SaliencyEstimate:
    """Sufficient statistics of an occlusion-saliency estimate, mergeable across mask blocks.

    numerators[l]: int64 [2, I, K_l] sums of fixed-point scores (score * 2^32) over masks that
        occluded unit k of level l, split by mask-index parity (even, odd) for split-half reliability.
    counts[l]: int64 [2, K_l] number of those masks, same split.
    label_maps[l]: int64 map of the cells' unit index (shape `map_shape`, i.e. [T, F] or [T']).
    mask_intervals: processed mask indices as sorted disjoint [start, stop) intervals.
    """

    numerators: list[torch.Tensor]
    counts: list[torch.Tensor]
    label_maps: list[torch.Tensor]
    n_masks: int
    mask_intervals: list[tuple[int, int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    nonfinite: Optional[torch.Tensor] = None  # device counter of non-finite scores (checked once at the end)

    @property
    def n_masks_used(self) -> int:
        return sum(b - a for a, b in self.mask_intervals)

    @property
    def map_shape(self) -> tuple[int, ...]:
        return tuple(self.label_maps[0].shape)

    @property
    def n_tokens(self) -> int:
        return int(self.numerators[0].shape[1])

    def merge(self, other: "SaliencyEstimate") -> "SaliencyEstimate":
        """Exact sum of two estimates over disjoint mask ranges of the same run and segment."""
        if self.meta != other.meta or self.n_masks != other.n_masks or len(self.label_maps) != len(other.label_maps):
            raise ValueError(f"cannot merge estimates of different runs: {self.meta} vs {other.meta}")
        if any(a.shape != b.shape or not torch.equal(a, b.to(a.device)) for a, b in zip(self.label_maps, other.label_maps)):
            raise ValueError(f"cannot merge estimates with different superpixels (segment {self.meta.get('segment_key')!r})")
        merged = _merge_intervals(self.mask_intervals + other.mask_intervals)
        if sum(b - a for a, b in merged) != self.n_masks_used + other.n_masks_used:
            raise ValueError(f"overlapping mask ranges {self.mask_intervals} and {other.mask_intervals}")
        dev = self.numerators[0].device
        return SaliencyEstimate(
            numerators=[a + b.to(dev) for a, b in zip(self.numerators, other.numerators)],
            counts=[a + b.to(dev) for a, b in zip(self.counts, other.counts)],
            label_maps=list(self.label_maps), n_masks=self.n_masks, mask_intervals=merged, meta=dict(self.meta))

    def to(self, device: torch.device | str) -> "SaliencyEstimate":
        return SaliencyEstimate([n.to(device) for n in self.numerators], [c.to(device) for c in self.counts],
                                [m.to(device) for m in self.label_maps], self.n_masks, list(self.mask_intervals),
                                dict(self.meta))

    def to_state(self) -> dict:
        """Plain dict (CPU tensors, lists, meta) for the caller to store; `from_state` inverts it."""
        return {"numerators": [n.cpu() for n in self.numerators], "counts": [c.cpu() for c in self.counts],
                "label_maps": [m.cpu() for m in self.label_maps], "n_masks": self.n_masks,
                "mask_intervals": [list(iv) for iv in self.mask_intervals], "meta": dict(self.meta)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "SaliencyEstimate":
        return cls([torch.as_tensor(n, dtype=torch.int64) for n in state["numerators"]],
                   [torch.as_tensor(c, dtype=torch.int64) for c in state["counts"]],
                   [torch.as_tensor(m, dtype=torch.int64) for m in state["label_maps"]], int(state["n_masks"]),
                   [(int(a), int(b)) for a, b in state["mask_intervals"]], dict(state["meta"])).to(device)

    def saliency(self, half: Optional[int] = None) -> torch.Tensor:
        """The map [I, *map_shape] float32 (SM^X [I, T, F] or SM^H [I, T']); `half` 0/1 gives the
        estimate from even/odd mask indices only. Cells never occluded are 0."""
        halves = slice(None) if half is None else slice(half, half + 1)
        num_cells, count_cells = 0, 0
        for num, cnt, labels in zip(self.numerators, self.counts, self.label_maps):
            flat = labels.reshape(-1)
            num_cells = num_cells + num[halves].sum(0)[:, flat]   # int64 [I, cells]
            count_cells = count_cells + cnt[halves].sum(0)[flat]  # int64 [cells]
        value = num_cells.double() / SCORE_SCALE / count_cells.clamp(min=1).double()
        value = torch.where(count_cells > 0, value, torch.zeros_like(value))
        return value.float().reshape(self.n_tokens, *self.map_shape)

    def reliability(self, rows: Optional[slice] = None, normalise: bool = True,
                    subsampling: Optional[int] = None) -> float:
        """Split-half reliability: Pearson r between the even- and odd-mask maps, Spearman-Brown
        corrected (2r / (1 + r)); it predicts the correlation of this estimate with an independent
        one of the same size. `normalise` z-scores each token row first (as maps are compared; the raw
        maps correlate highly through the per-token KL baselines alone). `subsampling` first pools an
        [I, T, F] map to the encoder grid (2D max), i.e. the resolution compared with CA."""
        rows = rows if rows is not None else slice(None)
        halves = []
        for h in (0, 1):
            m = self.saliency(h)[rows].double()
            if subsampling is not None and m.dim() == 3:
                m = pool_input_saliency(m, subsampling).double()
            m = m.flatten(1)
            halves.append((_zscore_rows(m) if normalise else m).flatten())
        r = _pearson64(*halves)
        return 2 * r / (1 + r) if r > -1 else -1.0


def _zscore_rows(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False)
    return torch.where(std > 0, (x - mean) / std.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _pearson64(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    denom = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0


def _empty_estimate(n_tokens: int, units_per_level: Sequence[int], label_maps: list[torch.Tensor],
                    n_masks: int, meta: dict, device: torch.device) -> SaliencyEstimate:
    return SaliencyEstimate(
        numerators=[torch.zeros(2, n_tokens, k, dtype=torch.int64, device=device) for k in units_per_level],
        counts=[torch.zeros(2, k, dtype=torch.int64, device=device) for k in units_per_level],
        label_maps=label_maps, n_masks=n_masks, meta=meta,
        nonfinite=torch.zeros((), dtype=torch.int64, device=device))


def _accumulate(est: SaliencyEstimate, level: int, indices: torch.Tensor, occluded: torch.Tensor,
                scores: torch.Tensor) -> None:
    """Add one batch: scores [B, I] for masks `indices` [B] that occluded units `occluded` [B, K]."""
    bad = ~torch.isfinite(scores)
    est.nonfinite += bad.sum()
    fixed = (scores.double().clamp(-MAX_SCORE, MAX_SCORE) * SCORE_SCALE).round()
    fixed = torch.where(bad, torch.zeros_like(fixed), fixed)
    odd = (indices & 1).double()[:, None]
    even = 1.0 - odd
    # rows: even-half scores, odd-half scores, even indicator, odd indicator -> one exact product
    weights = torch.cat([fixed * even, fixed * odd, even, odd], dim=1)   # [B, 2I + 2]
    sums = (weights.T @ occluded.double()).to(torch.int64)              # [2I + 2, K]
    n_tok = scores.shape[1]
    est.numerators[level] += sums[: 2 * n_tok].view(2, n_tok, -1)
    est.counts[level] += sums[2 * n_tok:]


def _finish(est: SaliencyEstimate, intervals: list[tuple[int, int]]) -> SaliencyEstimate:
    est.mask_intervals = _merge_intervals(intervals)
    n_bad = int(est.nonfinite)  # the one host sync of the loop
    if n_bad:
        raise ValueError(f"segment {est.meta.get('segment_key')!r}: scorer produced {n_bad} non-finite KL scores")
    est.nonfinite = None
    return est


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.25)
    return 1 << 30


def choose_batch_size(bytes_per_mask: int, memory_budget_bytes: Optional[int], device: torch.device) -> int:
    budget = memory_budget_bytes if memory_budget_bytes is not None else _default_budget(device)
    return int(max(1, min(MAX_EXACT_BATCH, budget // max(1, bytes_per_mask))))


def _check_inputs(name: str, segment_key: str, ref_log_probs: torch.Tensor, n_masks: int,
                  mask_range: Optional[tuple[int, int]]) -> tuple[int, int]:
    if ref_log_probs.dim() != 2:
        raise ValueError(f"segment {segment_key!r}: ref_log_probs must be [I, V], got {tuple(ref_log_probs.shape)}")
    if n_masks < 1:
        raise ValueError(f"segment {segment_key!r}: {name} needs n_masks >= 1, got {n_masks}")
    start, stop = mask_range if mask_range is not None else (0, n_masks)
    if not 0 <= start <= stop <= n_masks:
        raise ValueError(f"segment {segment_key!r}: mask_range {mask_range} outside [0, {n_masks}]")
    return int(start), int(stop)


def _run(est: SaliencyEstimate, level_spans: list[tuple[int, int]], batch_size: int,
         run_batch: Callable[[int, int, int], None], target_reliability: Optional[float],
         check_every: int, min_masks: int, reliability_kw: Optional[dict] = None) -> list[tuple[int, int]]:
    """Drive the batches. Fixed mode: each level's span in order. Adaptive mode: rounds that advance
    every level by its share of `check_every` masks, then a reliability check (one host sync)."""
    def process(level: int, a: int, b: int) -> None:
        for s in range(a, b, batch_size):
            run_batch(level, s, min(s + batch_size, b))

    if target_reliability is None:
        for level, (a, b) in enumerate(level_spans):
            process(level, a, b)
        return list(level_spans)
    pos = [a for a, _ in level_spans]
    per_round = max(1, math.ceil(check_every / len(level_spans)))
    while True:
        for level, (_, b) in enumerate(level_spans):
            stop = min(b, pos[level] + per_round)
            process(level, pos[level], stop)
            pos[level] = stop
        done = [(a, p) for (a, _), p in zip(level_spans, pos)]
        used = sum(p - a for a, p in done)
        exhausted = all(p >= b for p, (_, b) in zip(pos, level_spans))
        if exhausted:
            return done
        if used >= min_masks:
            est.mask_intervals = _merge_intervals(done)
            if est.reliability(**(reliability_kw or {})) >= target_reliability:
                return done


# ---- SM^X ----------------------------------------------------------------------------------------

@torch.inference_mode()
def input_saliency(scorer: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, ref_log_probs: torch.Tensor, *,
                   n_masks: int = 20000, p: float = 0.5, segments_per_second: Sequence[int] = (400, 500, 600),
                   threshold_frames: int = 750, compactness: float = 0.1, sigma: float = 0.0,
                   occlusion: str = "bin_mean", seed: int = 0, batch_size: Optional[int] = None,
                   mask_range: Optional[tuple[int, int]] = None, segment_key: str = "",
                   memory_budget_bytes: Optional[int] = None, target_reliability: Optional[float] = None,
                   check_every: int = 1000, min_masks: int = 2000, reliability_rows: Optional[slice] = None,
                   reliability_subsampling: Optional[int] = None,
                   label_maps: Optional[list[torch.Tensor]] = None) -> SaliencyEstimate:
    """SM^X (SPES) of one utterance. `scorer(features_batch [B, T, F]) -> log_probs [B, I, V]`;
    `features` [T, F] (real frames); `ref_log_probs` [I, V] the unperturbed log-probs.
    Mask k uses level l (contiguous blocks of the even split of n_masks), occludes each superpixel
    of that level with probability p, and replaces its cells with the occlusion value.
    `label_maps` may pass precomputed superpixels (from `xai_core.superpixels`) to skip SLIC.
    Adaptive mode (`target_reliability`): after each round of `check_every` masks (all levels
    advance together) and at least `min_masks`, stop once `est.reliability(rows=reliability_rows,
    subsampling=reliability_subsampling)` reaches the target."""
    if features.dim() != 2:
        raise ValueError(f"segment {segment_key!r}: features must be [T, F], got {tuple(features.shape)}")
    if occlusion not in ("bin_mean", "zero"):
        raise ValueError(f"segment {segment_key!r}: occlusion must be 'bin_mean' or 'zero', got {occlusion!r}")
    start, stop = _check_inputs("input_saliency", segment_key, ref_log_probs, n_masks, mask_range)
    device = features.device
    features = features.float()
    n_frames, n_bins = features.shape
    n_tokens, vocab = ref_log_probs.shape
    n_segments = segment_counts(n_frames, segments_per_second, threshold_frames)
    if label_maps is None:
        label_maps = superpixels(features, n_segments, compactness=compactness, sigma=sigma, segment_key=segment_key)
    label_maps = [m.to(device=device, dtype=torch.int64) for m in label_maps]
    if any(tuple(m.shape) != (n_frames, n_bins) for m in label_maps):
        raise ValueError(f"segment {segment_key!r}: superpixel maps do not match features {tuple(features.shape)}")
    units = [int(m.max()) + 1 for m in label_maps]
    flat_labels = [m.reshape(-1) for m in label_maps]
    keys = [mask_key(seed, segment_key, f"x{level}") for level in range(len(label_maps))]
    fill = features.mean(0) if occlusion == "bin_mean" else torch.zeros(n_bins, device=device)
    ref = ref_log_probs.to(device).float()
    p_ref = ref.exp()
    log_p_ref = torch.where(p_ref > 0, ref, torch.zeros_like(ref))

    meta = dict(kind="input", seed=int(seed), segment_key=segment_key, p=float(p), occlusion=occlusion,
                n_segments=list(n_segments), units=units, compactness=float(compactness), sigma=float(sigma))
    est = _empty_estimate(n_tokens, units, label_maps, n_masks, meta, device)
    if batch_size is None:
        bytes_per_mask = 4 * (3 * n_tokens * vocab + 16 * n_frames * n_bins)  # log-probs + KL temps; 16 floats/cell for the model
        batch_size = choose_batch_size(bytes_per_mask, memory_budget_bytes, device)
    batch_size = max(1, min(int(batch_size), MAX_EXACT_BATCH))

    def run_batch(level: int, a: int, b: int) -> None:
        indices = torch.arange(a, b, dtype=torch.int64, device=device)
        occluded = occlusion_masks(keys[level], indices, units[level], p)          # [B, K]
        cells = occluded[:, flat_labels[level]].view(b - a, n_frames, n_bins)
        log_probs = scorer(torch.where(cells, fill, features))
        if tuple(log_probs.shape) != (b - a, n_tokens, vocab):
            raise ValueError(f"segment {segment_key!r}: scorer returned {tuple(log_probs.shape)}, "
                             f"expected {(b - a, n_tokens, vocab)}")
        _accumulate(est, level, indices, occluded, _kl(p_ref, log_p_ref, log_probs))

    spans = [(max(a, start), max(max(a, start), min(b, stop))) for a, b in level_ranges(n_masks, len(label_maps))]
    done = _run(est, spans, batch_size, run_batch, target_reliability, check_every, min_masks,
                dict(rows=reliability_rows, subsampling=reliability_subsampling))
    return _finish(est, done)


# ---- SM^H ----------------------------------------------------------------------------------------

@torch.inference_mode()
def encoder_saliency(scorer_h: Callable[[torch.Tensor], torch.Tensor], encoder_states: torch.Tensor,
                     ref_log_probs: torch.Tensor, *, n_masks: int = 20000, p: float = 0.7, seed: int = 0,
                     batch_size: Optional[int] = None, mask_range: Optional[tuple[int, int]] = None,
                     segment_key: str = "", valid_length: Optional[int] = None,
                     memory_budget_bytes: Optional[int] = None, target_reliability: Optional[float] = None,
                     check_every: int = 1000, min_masks: int = 2000,
                     reliability_rows: Optional[slice] = None) -> SaliencyEstimate:
    """SM^H of one utterance. `scorer_h(keep_mask [B, T'] bool) -> log_probs [B, I, V]`, where
    False means the state is zeroed; `encoder_states` [T', D] (only its length and device are used).
    Each valid state is occluded independently with probability p; positions >= valid_length
    (padding) are never occluded."""
    if encoder_states.dim() != 2:
        raise ValueError(f"segment {segment_key!r}: encoder_states must be [T', D], got {tuple(encoder_states.shape)}")
    start, stop = _check_inputs("encoder_saliency", segment_key, ref_log_probs, n_masks, mask_range)
    device = encoder_states.device
    n_steps = int(encoder_states.shape[0])
    valid = n_steps if valid_length is None else int(valid_length)
    if not 0 < valid <= n_steps:
        raise ValueError(f"segment {segment_key!r}: valid_length {valid_length} outside (0, {n_steps}]")
    n_tokens, vocab = ref_log_probs.shape
    valid_units = torch.arange(n_steps, device=device) < valid
    key = mask_key(seed, segment_key, "h")
    ref = ref_log_probs.to(device).float()
    p_ref = ref.exp()
    log_p_ref = torch.where(p_ref > 0, ref, torch.zeros_like(ref))

    meta = dict(kind="encoder", seed=int(seed), segment_key=segment_key, p=float(p), valid_length=valid)
    est = _empty_estimate(n_tokens, [n_steps], [torch.arange(n_steps, device=device)], n_masks, meta, device)
    if batch_size is None:
        bytes_per_mask = 4 * (4 * n_tokens * vocab + 8 * n_steps)
        batch_size = choose_batch_size(bytes_per_mask, memory_budget_bytes, device)
    batch_size = max(1, min(int(batch_size), MAX_EXACT_BATCH))

    def run_batch(level: int, a: int, b: int) -> None:
        indices = torch.arange(a, b, dtype=torch.int64, device=device)
        occluded = occlusion_masks(key, indices, n_steps, p) & valid_units
        log_probs = scorer_h(~occluded)
        if tuple(log_probs.shape) != (b - a, n_tokens, vocab):
            raise ValueError(f"segment {segment_key!r}: encoder scorer returned {tuple(log_probs.shape)}, "
                             f"expected {(b - a, n_tokens, vocab)}")
        _accumulate(est, 0, indices, occluded, _kl(p_ref, log_p_ref, log_probs))

    done = _run(est, [(start, stop)], batch_size, run_batch, target_reliability, check_every, min_masks,
                dict(rows=reliability_rows))
    return _finish(est, done)
