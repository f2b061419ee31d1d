"""The vocabulary side of a perturbed pass, measured two ways.

current: logits [B, I, V] in the compute dtype -> float32 -> log_softmax -> xai_core's KL (clamp,
    negate, add log P, multiply by P, sum): about six full passes over a float32 [B, I, V] tensor.
fused (a proposal; needs the scorer to hand back decoder hidden states or KL directly):
    sum_v P log Q = sum_v P z - logsumexp(z) * sum_v P and sum_v P z = h . (P W), so with
    u = P @ W [I, D] precomputed once per utterance,
        KL[b, i] = sum_v P log P - h[b, i] . u[i] + logsumexp_v(z[b, i]) * sum_v P[i]
    which leaves one pass over the logits (the logsumexp) and no [B, I, V] float32 tensor.
"""
from __future__ import annotations

import torch

from xai_core.saliency import _kl


def output_weight(model) -> torch.Tensor:
    """[V, D] output projection of a SpeechModel (Whisper: tied token embedding)."""
    if getattr(model, "family", "") == "whisper":
        return model.model.decoder.token_embedding.weight
    return model.net.decoder.output_projection.weight


def current_kl(hidden: torch.Tensor, weight: torch.Tensor, p: torch.Tensor, log_p: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    log_q = (hidden.to(dtype) @ weight.to(dtype).T).float().log_softmax(-1)
    return _kl(p, log_p, log_q)


class FusedKL:
    """KL(P_i || Q_bi) from decoder hidden states [B, I, D] without materialising log Q."""

    def __init__(self, weight: torch.Tensor, ref_log_probs: torch.Tensor, dtype: torch.dtype):
        ref = ref_log_probs.float()
        p = ref.exp()
        self.neg_entropy = torch.where(p > 0, p * ref, torch.zeros_like(p)).sum(-1)     # [I]
        self.mass = p.sum(-1)                                                           # [I] (= 1 up to rounding)
        self.u = p @ weight.float()                                                     # [I, D]
        self.weight, self.dtype = weight.to(dtype), dtype

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp((hidden.to(self.dtype) @ self.weight.T).float(), dim=-1)   # [B, I]
        return self.neg_entropy - (hidden.float() * self.u).sum(-1) + lse * self.mass

