"""Cross-attention vs saliency: aggregation, pooling, normalisation, correlation, paper tables.

METHOD.md §4. All functions take tensors (or plain lists/dicts of per-utterance results) and return
tensors or plain Python values; nothing reads or writes files.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

POOLING_METHODS = ("2d_max", "2d_avg", "1d_max_1d_avg")


# ---- cross-attention averages ----------------------------------------------------------------------

def aggregate_attention(ca: torch.Tensor, layers: Optional[Sequence[int]] = None,
                        heads: Optional[Sequence] = None) -> torch.Tensor:
    """Plain mean of CA matrices [L, H, I, T'] over a subset -> [I, T'].
    `layers`: layer indices (all heads of each); `heads`: either head indices (combined with
    `layers`, default all layers) or an explicit list of (layer, head) pairs."""
    if ca.dim() != 4:
        raise ValueError(f"cross-attention must be [L, H, I, T'], got {tuple(ca.shape)}")
    n_layers, n_heads = ca.shape[:2]
    if heads is not None and len(heads) and isinstance(heads[0], (tuple, list)):
        if layers is not None:
            raise ValueError("give either (layer, head) pairs or layers, not both")
        pairs = [(int(l), int(h)) for l, h in heads]
    else:
        layer_ids = range(n_layers) if layers is None else [int(l) for l in layers]
        head_ids = range(n_heads) if heads is None else [int(h) for h in heads]
        pairs = [(l, h) for l in layer_ids for h in head_ids]
    if not pairs:
        raise ValueError("empty (layer, head) selection")
    idx_l = torch.tensor([l for l, _ in pairs], device=ca.device)
    idx_h = torch.tensor([h for _, h in pairs], device=ca.device)
    return ca[idx_l, idx_h].float().mean(0)


# ---- SM^X -> I x T' ------------------------------------------------------------------------------

@torch.inference_mode()
def pool_input_saliency(smx: torch.Tensor, subsampling: int, method: str = "2d_max",
                        n_steps: Optional[int] = None) -> torch.Tensor:
    """Pool SM^X [I, T, F] to the encoder grid [I, T']: step t covers frames [t*s, (t+1)*s) of the
    real frames (the last window may be partial; a step with no frames gets 0).
    2d_max: max over bins and window; 2d_avg: mean over both; 1d_max_1d_avg: max over bins, then
    mean over the window."""
    if method not in POOLING_METHODS:
        raise ValueError(f"pooling must be one of {POOLING_METHODS}, got {method!r}")
    if smx.dim() != 3:
        raise ValueError(f"SM^X must be [I, T, F], got {tuple(smx.shape)}")
    n_tok, n_frames, _ = smx.shape
    s = int(subsampling)
    n_steps = -(-n_frames // s) if n_steps is None else int(n_steps)
    used = min(n_frames, n_steps * s)
    x = smx[:, :used].float()
    per_frame = x.mean(-1) if method == "2d_avg" else x.amax(-1)       # [I, used]
    full = n_steps * s
    pad = full - used
    if method == "2d_max":
        padded = torch.cat([per_frame, per_frame.new_full((n_tok, pad), -math.inf)], 1)
        pooled = padded.view(n_tok, n_steps, s).amax(-1)
        return torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))
    padded = torch.cat([per_frame, per_frame.new_zeros((n_tok, pad))], 1)
    counts = torch.cat([per_frame.new_ones(used), per_frame.new_zeros(pad)]).view(n_steps, s).sum(-1)
    return padded.view(n_tok, n_steps, s).sum(-1) / counts.clamp(min=1)


# ---- normalisation ---------------------------------------------------------------------------------

def _standardise(x: torch.Tensor, dim: int) -> torch.Tensor:
    x = x.double()
    mean = x.mean(dim, keepdim=True)
    std = x.std(dim, keepdim=True, unbiased=False)
    out = (x - mean) / std.clamp(min=1e-300)
    return torch.where(std > 0, out, torch.zeros_like(out))


def normalise_attention(ca: torch.Tensor) -> torch.Tensor:
    """Frame-wise CA normalisation (removes attention sinks): for each encoder column of [..., I, T'],
    subtract the mean over tokens and divide by the (population) std over tokens; constant columns -> 0."""
    return _standardise(ca, -2)


def normalise_saliency(sm: torch.Tensor) -> torch.Tensor:
    """Per token row z-score of [I, ...] (over all remaining axes); constant rows -> 0."""
    flat = sm.reshape(sm.shape[0], -1)
    return _standardise(flat, -1).reshape(sm.shape)


def single_mean_std(x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SPES `single_mean_std`: per row i of [I, ...], z-score with the sample std computed from
    moments, sqrt((E[x^2] - mean^2) * n / (n - 1)), over the `valid` entries (all by default);
    invalid entries and NaN/inf results become 0."""
    x64 = x.double().reshape(x.shape[0], -1)
    v = torch.ones_like(x64, dtype=torch.bool) if valid is None else valid.expand(x.shape).reshape(x.shape[0], -1)
    vf = v.double()
    n = vf.sum(-1, keepdim=True)
    mean = (x64 * vf).sum(-1, keepdim=True) / n
    var = ((x64 * x64 * vf).sum(-1, keepdim=True) / n - mean * mean) * n / (n - 1)
    z = (x64 - mean) / var.sqrt()
    z = torch.where(v & torch.isfinite(z), z, torch.zeros_like(z))
    return z.reshape(x.shape)


def paired_min_max(x: torch.Tensor, y: Optional[torch.Tensor] = None,
                   y_valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """SPES `paired_min_max`: per row i, min and max over the input row [I, ...] and the valid
    entries of the token row y [I, ...]; both rescaled to [0, 1]; invalid y entries -> 0.
    Deviation: a constant row gives 0 (the reference gives NaN)."""
    xf = x.double().reshape(x.shape[0], -1)
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    if y is not None:
        yf = y.double().reshape(y.shape[0], -1)
        yv = torch.ones_like(yf, dtype=torch.bool) if y_valid is None else y_valid.expand(y.shape).reshape(y.shape[0], -1)
        lo = torch.minimum(lo, torch.where(yv, yf, torch.full_like(yf, math.inf)).amin(-1, keepdim=True))
        hi = torch.maximum(hi, torch.where(yv, yf, torch.full_like(yf, -math.inf)).amax(-1, keepdim=True))
    span = hi - lo
    scale = lambda v: torch.where(span > 0, (v - lo) / span.clamp(min=1e-300), torch.zeros_like(v))
    x_out = scale(xf).reshape(x.shape)
    if y is None:
        return x_out, None
    y_out = torch.where(yv, scale(yf), torch.zeros_like(yf)).reshape(y.shape)
    return x_out, y_out


# ---- correlation ----------------------------------------------------------------------------------

def pearson(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Pearson r of the flattened arrays (scipy.stats.pearsonr's statistic, in float64).
    NaN-free: if either side is constant the result is 0.0 (scipy would give NaN)."""
    x = torch.as_tensor(a).double().flatten()
    y = torch.as_tensor(b).double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"pearson: sizes differ ({x.numel()} vs {y.numel()})")
    x = x - x.mean()
    y = y - y.mean()
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if nx == 0 or ny == 0 or x.numel() < 2:
        return 0.0
    r = float(torch.dot(x / nx, y / ny))
    return max(-1.0, min(1.0, r))


@torch.inference_mode()
def correlate(ca: torch.Tensor, sm: torch.Tensor, rows: slice = slice(None)) -> dict:
    """Pearson r between normalised CA and normalised saliency for one utterance.
    `ca` [L, H, I, T'], `sm` [I, T'] (SM^H, or SM^X pooled); `rows` selects the content rows
    (e.g. `Hypothesis.content_rows()`), applied before normalising.
    Returns plain lists: `per_head` [L][H] (one head), `per_layer` [L] (mean over heads of that
    layer), `per_head_avg` [H] (mean over layers of that head), `global` (mean over all)."""
    if ca.dim() != 4 or sm.dim() != 2 or ca.shape[2:] != sm.shape:
        raise ValueError(f"correlate: CA {tuple(ca.shape)} and saliency {tuple(sm.shape)} do not match")
    ca = ca[:, :, rows].double()
    target = normalise_saliency(sm[rows])
    if target.shape[0] == 0:
        raise ValueError("correlate: no content rows selected")
    r = lambda m: pearson(normalise_attention(m), target)
    n_layers, n_heads = ca.shape[:2]
    return {
        "per_head": [[r(ca[l, h]) for h in range(n_heads)] for l in range(n_layers)],
        "per_layer": [r(ca[l].mean(0)) for l in range(n_layers)],
        "per_head_avg": [r(ca[:, h].mean(0)) for h in range(n_heads)],
        "global": r(ca.mean((0, 1))),
    }


# ---- tables (means over utterances) ----------------------------------------------------------------

def _mean(values: Iterable) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.shape[0] == 0:
        raise ValueError("no per-utterance results to aggregate")
    return arr.mean(0)


def table_grid(results: Sequence[Mapping]) -> dict:
    """Paper Table 1 from per-utterance `correlate` results: `grid` [L][H] (rows layers, columns
    heads), `head_avg` [L] (per-layer head average: the table's last column), `layer_avg` [H]
    (per-head layer average: the last row), `global`; all means over utterances. `n` utterances."""
    return {
        "grid": _mean(r["per_head"] for r in results).tolist(),
        "head_avg": _mean(r["per_layer"] for r in results).tolist(),
        "layer_avg": _mean(r["per_head_avg"] for r in results).tolist(),
        "global": float(_mean(r["global"] for r in results)),
        "n": len(results),
    }


def table_layers(results: Sequence[Mapping]) -> dict:
    """Paper Tables 2-3 row: `layers` [L] (CA per-layer head average vs saliency) and `layer_avg`
    (CA averaged over all layers and heads)."""
    return {"layers": _mean(r["per_layer"] for r in results).tolist(),
            "layer_avg": float(_mean(r["global"] for r in results)), "n": len(results)}


def table_aggregation(results_by_pooling: Mapping[str, Sequence[Mapping]],
                      deletion: Optional[Mapping[str, float]] = None) -> dict:
    """Paper Table 4: one `table_layers` row per pooling method (plus its deletion score if given)."""
    out = {}
    for method, results in results_by_pooling.items():
        row = table_layers(results)
        if deletion is not None and method in deletion:
            row["deletion"] = float(deletion[method])
        out[method] = row
    return out


def table_p_sweep(results_by_p: Mapping[float, Sequence[Mapping]],
                  deletion: Optional[Mapping[float, float]] = None) -> dict:
    """Paper Table 6: one `table_layers` row per p_H (sorted by decreasing p, as in the paper)."""
    return table_aggregation({p: results_by_p[p] for p in sorted(results_by_p, reverse=True)}, deletion)


def context_mixing_gap(results_h: Sequence[Mapping], results_x: Sequence[Mapping]) -> dict:
    """r(CA, SM^H) - r(CA, SM^X), per layer and for the global average (means over utterances)."""
    h, x = table_layers(results_h), table_layers(results_x)
    return {"layers": [a - b for a, b in zip(h["layers"], x["layers"])], "layer_avg": h["layer_avg"] - x["layer_avg"]}


def paper_tables(results_x: Sequence[Mapping], results_h: Optional[Sequence[Mapping]] = None) -> dict:
    """All correlation tables of one model x task x language pair from per-utterance `correlate`
    results: Table 1 grid and Table 2 row for SM^X; with SM^H results also the Table 1 grid, the
    Table 3 row and the context-mixing gap."""
    out = {"x": {"grid": table_grid(results_x), "layers": table_layers(results_x)}}
    if results_h is not None:
        out["h"] = {"grid": table_grid(results_h), "layers": table_layers(results_h)}
        out["gap"] = context_mixing_gap(results_h, results_x)
    return out
