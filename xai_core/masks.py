"""Occlusion masks and superpixels.

Masks are a pure function of (run seed, segment key, target, mask index): a 64-bit key is derived
from (seed, segment key, target) with hashlib, and the uniform for unit j of mask k is a
counter-based hash (splitmix64 finaliser) of (key, k, j), computed with int64 tensor arithmetic on
the device. So a mask never depends on the batch it is drawn in, the block split, the worker or the
device (CPU and CUDA give the same bits).
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)
_UNIT_STRIDE = _signed64(0xD1B54A32D192ED03)  # decorrelates the per-unit counter from the mask counter


def _shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2^64 on CPU and CUDA, which is what the finaliser needs.
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def mask_key(seed: int, segment_key: str, target: str) -> int:
    """Signed 64-bit key of one mask family, e.g. target 'x0' (input level 0) or 'h' (encoder)."""
    digest = hashlib.blake2b(f"{int(seed)}|{segment_key}|{target}".encode("utf-8"), digest_size=8).digest()
    return _signed64(int.from_bytes(digest, "little"))


def uniform_bits(key: int, mask_indices: torch.Tensor, n_units: int) -> torch.Tensor:
    """32 random bits (as int64 in [0, 2^32)) per (mask, unit): [B, n_units], on mask_indices.device."""
    k = mask_indices.to(torch.int64)
    state = _mix64(k * _GOLDEN + key)                                  # one stream per mask
    units = torch.arange(1, n_units + 1, dtype=torch.int64, device=k.device) * _UNIT_STRIDE
    return _shift_right(_mix64(state[:, None] + units[None, :]), 32)


def occlusion_masks(key: int, mask_indices: torch.Tensor, n_units: int, p: float) -> torch.Tensor:
    """bool [B, n_units], True where the unit is OCCLUDED (independently with probability p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"occlusion probability must be in [0, 1], got {p}")
    threshold = math.ceil(p * 2**32)  # u = bits / 2^32 < p  <=>  bits < ceil(p * 2^32)
    return uniform_bits(key, mask_indices, n_units) < threshold


def split_masks(n_masks: int, n_levels: int) -> list[int]:
    """Masks per level, as even as possible, earlier levels get the remainder (20000 -> 6667, 6667, 6666)."""
    base, extra = divmod(int(n_masks), n_levels)
    return [base + (1 if level < extra else 0) for level in range(n_levels)]


def level_ranges(n_masks: int, n_levels: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) block of mask indices for each level."""
    ranges, start = [], 0
    for count in split_masks(n_masks, n_levels):
        ranges.append((start, start + count))
        start += count
    return ranges


def segment_counts(n_frames: int, segments_per_second: Sequence[int] = (400, 500, 600),
                   threshold_frames: int = 750, reference_frames: int = 500) -> list[int]:
    """SLIC n_segments per level: round(b * T_eff / 500) with b = 5 * segments-per-second."""
    t_eff = min(int(n_frames), int(threshold_frames)) if threshold_frames else int(n_frames)
    counts = []
    for per_second in segments_per_second:
        base = 5 * per_second  # segments per 500 frames (5 s)
        counts.append(max(1, round(base * t_eff / reference_frames)))
    return counts


def superpixels(features: torch.Tensor, n_segments: Sequence[int], compactness: float = 0.1,
                sigma: float = 0.0, segment_key: str = "") -> list[torch.Tensor]:
    """SLIC label maps (int64 [T, F], labels 0..K-1, on features.device), one per level."""
    from skimage.segmentation import slic

    x = features.detach().to("cpu", torch.float64).numpy()
    lo, hi = float(x.min()), float(x.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        raise ValueError(f"segment {segment_key!r}: features are constant or not finite; cannot build superpixels")
    scaled = (x - lo) / (hi - lo)
    maps = []
    for n in n_segments:
        labels = slic(scaled, n_segments=int(n), compactness=compactness, sigma=sigma, channel_axis=None)
        _, dense = np.unique(labels, return_inverse=True)  # labels 0..K-1 whatever skimage numbers them
        maps.append(torch.from_numpy(dense.reshape(labels.shape).astype(np.int64)).to(features.device))
    return maps
