"""FLOP count model of one perturbed pass (one mask), per model family.

Convention: a matmul of [m, k] by [k, n] costs 2*m*n*k FLOPs; that includes the attention score
(Q K^T) and context (P V) products, counted over the full square even when a causal mask hides half
of it (the kernels compute it), and convolutions (2 * out_positions * in_channels/groups * kernel *
out_channels). Elementwise work (norms, activations, softmax, KL) is not counted: it is memory-bound
and small next to the products, so "achieved FLOP/s" is matmul FLOPs per second of loop time.

Parts of a pass:
  encoder          subsampling convolutions + encoder layers (input side only; SM^H reuses H)
  kv_projection    cross-attention keys/values of the T' encoder states, every decoder layer
                   (SM^X only: SM^H projects H once per utterance)
  decoder          decoder layers over the I hypothesis tokens (self-attention, cross-attention
                   against T' states, feed-forward)
  vocab_projection the output projection to the V-entry vocabulary, for I tokens
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class FlopBreakdown:
    encoder: float = 0.0
    kv_projection: float = 0.0
    decoder: float = 0.0
    vocab_projection: float = 0.0

    @property
    def total(self) -> float:
        return self.encoder + self.kv_projection + self.decoder + self.vocab_projection

    def gflops(self) -> dict:
        d = {k: v / 1e9 for k, v in asdict(self).items()}
        d["total"] = self.total / 1e9
        return d


def _mm(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def _decoder_layer(tokens: int, src: int, d: int, ffn: int, skip_self: bool = False) -> float:
    """Pre-norm decoder layer: self-attention (q,k,v,out + scores + context), cross-attention
    (q, out + scores + context against `src` states; K/V counted apart), feed-forward."""
    self_attn = 0.0 if skip_self else 4 * _mm(tokens, d, d) + 2 * _mm(tokens, tokens, d)
    cross = 2 * _mm(tokens, d, d) + 2 * _mm(tokens, src, d)
    return self_attn + cross + 2 * _mm(tokens, ffn, d)


def conformer_flops(cfg, n_frames: int, n_tokens: int) -> tuple[FlopBreakdown, FlopBreakdown]:
    """(SM^X pass, SM^H pass) of an FBK Conformer (`models.conformer.ConformerConfig`), no CTC
    compression. The SM^H scorer reuses layer 0's self-attention block (it does not depend on H)."""
    d, t1 = cfg.d_model, -(-n_frames // 2)
    t = -(-t1 // 2)                                                          # T' after two stride-2 convs
    k1, k2 = cfg.conv_kernel_sizes
    sub = 2.0 * t1 * cfg.input_feat * k1 * cfg.conv_channels + 2.0 * t * (cfg.conv_channels // 2) * k2 * 2 * d
    ffn = 2 * (_mm(t, d * cfg.ffn_expansion, d) + _mm(t, d, d * cfg.ffn_expansion))   # two half-step FFNs
    # q,k,v,out; content, position and context products (the position-table projection is per batch, not per mask)
    mhsa = 4 * _mm(t, d, d) + 3 * _mm(t, t, d)
    conv = _mm(t, 2 * d, d) + 2.0 * t * d * cfg.conv_kernel + _mm(t, d, d)  # pointwise, depthwise, pointwise
    if cfg.ctc_vocab_size:
        sub += _mm(t, cfg.ctc_vocab_size, d)
    encoder = sub + cfg.encoder_layers * (ffn + mhsa + conv)
    kv = cfg.decoder_layers * 2 * _mm(t, d, d)
    dec = cfg.decoder_layers * _decoder_layer(n_tokens, t, d, cfg.decoder_ffn)
    dec_h = dec - 4 * _mm(n_tokens, d, d) - 2 * _mm(n_tokens, n_tokens, d)
    vocab = _mm(n_tokens, cfg.vocab_size, d)
    return FlopBreakdown(encoder, kv, dec, vocab), FlopBreakdown(0.0, 0.0, dec_h, vocab)


def whisper_flops(dims, n_tokens: int, encoder_steps: int | None = None) -> tuple[FlopBreakdown, FlopBreakdown]:
    """(SM^X pass, SM^H pass) of Whisper (`models.whisper.model.WhisperDims`). The encoder always
    runs on its full window (n_audio_ctx states from 2 * n_audio_ctx mel frames: 30 s), whatever
    the utterance length; `encoder_steps` overrides that for a model that trims the window."""
    d, t = dims.n_audio_state, encoder_steps or dims.n_audio_ctx
    conv = 2.0 * (2 * t) * dims.n_mels * 3 * d + 2.0 * t * d * 3 * d
    layer = 4 * _mm(t, d, d) + 2 * _mm(t, t, d) + 2 * _mm(t, 4 * d, d)
    encoder = conv + dims.n_audio_layer * layer
    dt = dims.n_text_state
    kv = dims.n_text_layer * 2 * _mm(t, dt, d)
    dec = dims.n_text_layer * _decoder_layer(n_tokens, t, dt, 4 * dt)
    vocab = _mm(n_tokens, dims.n_vocab, dt)
    return FlopBreakdown(encoder, kv, dec, vocab), FlopBreakdown(0.0, 0.0, dec, vocab)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, dq = query_shape
    s_k, dv = key_shape[-2], value_shape[-1]
    return int(2 * b * h * s_q * s_k * dq + 2 * b * h * s_q * s_k * dv)


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs torch actually dispatches while running `fn` (matmuls, convolutions and fused attention,
    which torch's counter misses on CPU): the cross-check of the analytic model."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_cpu_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return float(counter.get_total_flops())
