"""The naive baseline: the reference implementation's strategy (spes_reference.md §2, §5.2, §7, §8),
restated honestly so its speed can be measured on the same device.

SM^X: masks are drawn per mask on the host (uniforms per superpixel gathered into a T x F array) and
collated; every mask reruns the full encoder and decoder in float32 (`model.encode` +
`model.teacher_forced_log_probs`); the KL is taken over the full vocabulary; a per-mask heatmap
B x I x T x F is materialised and summed. Batches follow the reference's max-tokens rule
(`max_tokens // n_frames` masks per batch). Charitably, features are not re-read from disk per mask.

SM^H (which the reference does not implement) is the naive port: rerun the encoder for every mask,
zero the occluded states, rerun the decoder, then the same KL and B x I x T' heatmaps.
"""
from __future__ import annotations

import numpy as np
import torch

from models.interface import EncoderOutput

MAX_TOKENS = 100_000


def naive_batch_size(n_frames: int, n_masks: int, max_tokens: int = MAX_TOKENS) -> int:
    return max(1, min(n_masks, max_tokens // max(1, n_frames)))


def _kl(p_ref: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Reference scorer: sum_v P (ln P - ln Q) in float32 over probabilities (xlogy for P = 0)."""
    q = log_q.exp()
    return (torch.special.xlogy(p_ref, p_ref) - torch.special.xlogy(p_ref, q)).sum(-1)     # B, I


@torch.no_grad()
def naive_input_saliency(model, features: torch.Tensor, hyp, ref_log_probs: torch.Tensor, label_maps, n_masks: int,
                         p: float = 0.5, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """SM^X [I, T, F] the reference's way (occluded cells take the per-bin mean, as in our loop)."""
    device = model.device
    x = features.detach().float().cpu().numpy()
    fill = x.mean(0)
    n_frames, n_bins = x.shape
    labels = [m.cpu().numpy() for m in label_maps]
    units = [int(m.max()) + 1 for m in labels]
    n_levels = len(labels)
    rng = np.random.default_rng(seed)
    p_ref = ref_log_probs.float().exp().to(device)
    n_tokens = p_ref.shape[0]
    numerator = torch.zeros(n_tokens, n_frames, n_bins, device=device)
    count = torch.zeros(n_frames, n_bins, device=device)
    batch = batch_size or naive_batch_size(n_frames, n_masks)
    for start in range(0, n_masks, batch):
        masks, inputs = [], []
        for k in range(start, min(start + batch, n_masks)):          # one mask at a time, on the host
            level = k * n_levels // n_masks
            keep = (rng.random(units[level]) >= p).astype(np.int64)[labels[level]]   # T x F, 1 = kept
            masks.append(keep)
            inputs.append(np.where(keep == 1, x, fill))
        mask = torch.from_numpy(np.stack(masks)).to(device)        # int64 B x T x F, like the reference
        batch_x = torch.from_numpy(np.stack(inputs)).to(device)
        lengths = torch.full((batch_x.shape[0],), n_frames, dtype=torch.long, device=device)
        log_q = model.teacher_forced_log_probs(model.encode(batch_x, lengths), hyp).float()
        score = _kl(p_ref, log_q)                                    # B, I
        occluded = (1 - mask).float()
        heat = occluded[:, None] * score[:, :, None, None]           # B x I x T x F, materialised
        numerator += heat.sum(0)
        count += occluded.sum(0)
    return numerator / count.clamp(min=1)


@torch.no_grad()
def naive_encoder_saliency(model, features: torch.Tensor, hyp, ref_log_probs: torch.Tensor, valid_steps: int,
                           n_masks: int, p: float = 0.7, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """SM^H [I, T'] the naive way: encoder rerun per mask, states zeroed, decoder rerun."""
    device = model.device
    n_frames = features.shape[0]
    rng = np.random.default_rng(seed)
    p_ref = ref_log_probs.float().exp().to(device)
    batch = batch_size or naive_batch_size(n_frames, n_masks)
    numerator, count = None, None
    for start in range(0, n_masks, batch):
        b = min(start + batch, n_masks) - start
        feats = features.float()[None].expand(b, -1, -1).contiguous().to(device)
        enc = model.encode(feats, torch.full((b,), n_frames, dtype=torch.long, device=device))
        steps = enc.states.shape[1]
        keep = rng.random((b, steps)) >= p
        keep[:, valid_steps:] = True                                  # padding is never occluded
        keep_t = torch.from_numpy(keep.astype(np.int64)).to(device)
        states = enc.states * keep_t[..., None].to(enc.states.dtype)
        log_q = model.teacher_forced_log_probs(EncoderOutput(states, enc.lengths), hyp).float()
        score = _kl(p_ref, log_q)
        occluded = (1 - keep_t).float()
        heat = occluded[:, None] * score[:, :, None]                  # B x I x T', materialised
        numerator = heat.sum(0) if numerator is None else numerator + heat.sum(0)
        count = occluded.sum(0) if count is None else count + occluded.sum(0)
    return numerator / count.clamp(min=1)
