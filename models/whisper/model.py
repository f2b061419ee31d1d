"""A compact Whisper encoder–decoder in plain PyTorch.

Parameter names follow the openai-whisper checkpoint layout (``encoder.blocks.0.attn.query`` ...),
so that format loads without renaming; the other formats are mapped onto it in `loaders.py`.

Attention has two paths: an explicit softmax that can return the per-head probabilities (used
for the cross-attention export), and the fused `scaled_dot_product_attention` for every pass
where the weights are not needed (beam search, the perturbed scoring passes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KV = tuple[Tensor, Tensor]


@dataclass
class WhisperDims:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's encoder position table: [sin | cos] blocks over log-spaced timescales."""
    half = channels // 2
    inv_timescales = torch.exp(-torch.arange(half, dtype=torch.float64) * (torch.log(torch.tensor(max_timescale, dtype=torch.float64)) / (half - 1)))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """q [B,H,Tq,dh], k/v [B,H,Tk,dh]. A causal query block is aligned to the *end* of the keys
    (incremental decoding: the queries are the newest positions). Returns (out, probs or None)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    mask = None
    if causal and n_q > 1:
        if not need_weights and n_q == n_k:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), None
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return (probs.to(v.dtype) @ v), probs


@dataclass
class MaskedMemory:
    """Cross-attention memory of ONE utterance shared by a batch of occlusion masks.

    An occluded (zeroed) encoder state projects to the projection biases, so every occluded step
    has the same key `k_bias` and value `v_bias`. Attention over T steps of which m_b are occluded
    therefore equals attention over the kept steps plus one extra "bias" step whose score is raised
    by log(m_b). `k`, `v` [1, H, T+1, dh] hold the projected steps and the bias step last; `mask`
    [B, T+1] is the additive mask (0 kept, -inf occluded, log m_b on the bias step). No per-sample
    keys or values are ever built and the fused kernel does the rest."""

    k: Tensor
    v: Tensor
    mask: Tensor

    @classmethod
    def build(cls, k: Tensor, v: Tensor, k_bias: Tensor, v_bias: Tensor, keep: Tensor) -> "MaskedMemory":
        """k, v [1,H,T,dh]; k_bias, v_bias [1,H,1,dh]; keep [B,T] bool."""
        n_masked = (~keep).sum(dim=1, keepdim=True).to(k.dtype)
        mask = torch.zeros(keep.shape, dtype=k.dtype, device=k.device).masked_fill(~keep, float("-inf"))
        mask = torch.cat([mask, n_masked.log()], dim=1)    # log 0 = -inf: no bias step when nothing is occluded
        return cls(torch.cat([k, k_bias], dim=2), torch.cat([v, v_bias], dim=2), mask)

    def attend(self, q: Tensor) -> Tensor:
        """q [B,H,t,dh] -> [B,H,t,dh]: rows folded into the query axis of a single key set."""
        b, h, t, dh = q.shape
        q = q.to(self.k.dtype).transpose(0, 1).reshape(1, h, b * t, dh)
        mask = self.mask[:, None, :].expand(b, t, -1).reshape(1, 1, b * t, -1)
        with torch.autocast(q.device.type, enabled=False):  # log m_b needs float32, and this is cheap
            out = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask)
        return out.view(h, b, t, dh).transpose(0, 1)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # Whisper's key projection has no bias
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

    def project_kv(self, x: Tensor) -> KV:
        """Keys and values [B,H,T,dh] of `x` (done once per utterance for cross-attention)."""
        return self.split_heads(self.key(x)), self.split_heads(self.value(x))

    def forward(self, x: Tensor, kv: Optional[KV] = None, past: Optional[KV] = None, causal: bool = False,
                need_weights: bool = False) -> tuple[Tensor, KV, Optional[Tensor]]:
        """Self-attention when `kv` is None (with `past` keys/values prepended), else attention to
        the given keys/values. `kv` may hold fewer rows than `x` when consecutive rows share a
        source (beam search): row groups of size B_x / B_kv are then folded into the query axis."""
        q = self.split_heads(self.query(x))
        if isinstance(kv, MaskedMemory):
            out = kv.attend(q)
            return self.out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)), kv, None
        if kv is None:
            k, v = self.project_kv(x)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        else:
            k, v = kv
        b, h, t, dh = q.shape
        group = b // k.shape[0]
        if group > 1:  # [G*k, H, t, dh] -> [G, H, k*t, dh]: one key set per group, no copies
            q = q.view(k.shape[0], group, h, t, dh).transpose(1, 2).reshape(k.shape[0], h, group * t, dh)
        out, w = attention(q, k, v, causal=causal, need_weights=need_weights)
        if group > 1:
            out = out.view(k.shape[0], h, group, t, dh).transpose(1, 2).reshape(b, h, t, dh)
            if w is not None:
                w = w.view(k.shape[0], h, group, t, -1).transpose(1, 2).reshape(b, h, t, -1)
        out = out.transpose(1, 2).reshape(b, t, h * dh)
        return self.out(out), (k, v), w


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: Tensor, cross_kv: Optional[KV] = None, past: Optional[KV] = None, causal: bool = False,
                need_weights: bool = False) -> tuple[Tensor, KV, Optional[Tensor]]:
        y, self_kv, _ = self.attn(self.attn_ln(x), past=past, causal=causal)
        x = x + y
        weights = None
        if self.cross_attn is not None:
            y, _, weights = self.cross_attn(self.cross_attn_ln(x), kv=cross_kv, need_weights=need_weights)
            x = x + y
        x = x + self.mlp(self.mlp_ln(x))
        return x, self_kv, weights


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel: Tensor) -> Tensor:
        """mel [B, n_mels, 2*n_ctx] -> states [B, n_ctx, n_state]."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(f"encoder expects {2 * self.positional_embedding.shape[0]} mel frames, got {mel.shape[-1]}")
        x = x + self.positional_embedding.to(x.dtype)
        for block in self.blocks:
            x = block(x)[0]
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.zeros(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_state)

    def cross_kv(self, states: Tensor) -> list[KV]:
        """Cross-attention keys/values of encoder `states` [B,T,D], one pair per layer."""
        return [block.cross_attn.project_kv(states) for block in self.blocks]

    def forward(self, tokens: Tensor, cross_kv: Sequence[KV], past: Optional[Sequence[KV]] = None,
                need_weights: bool = False) -> tuple[Tensor, list[KV], list[Tensor]]:
        """tokens [B, t] (the newest decoder inputs; `past` holds the earlier ones' self-attention
        keys/values). Returns hidden states after the final norm [B, t, D], the new self-attention
        cache, and the cross-attention probabilities per layer when `need_weights`."""
        offset = 0 if past is None else past[0][0].shape[2]
        if offset + tokens.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(f"decoder input longer than {self.positional_embedding.shape[0]} positions")
        x = self.token_embedding(tokens) + self.positional_embedding[offset: offset + tokens.shape[1]]
        cache, weights = [], []
        for i, block in enumerate(self.blocks):
            x, kv, w = block(x, cross_kv=cross_kv[i], past=None if past is None else past[i], causal=True,
                             need_weights=need_weights)
            cache.append(kv)
            if w is not None:
                weights.append(w)
        return self.ln(x), cache, weights

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied output projection."""
        return hidden @ self.token_embedding.weight.to(hidden.dtype).T


class Whisper(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer)

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced logits [B, t, V] (convenience; the adapter uses the parts directly)."""
        states = self.encoder(mel)
        hidden = self.decoder(tokens, self.decoder.cross_kv(states))[0]
        return self.decoder.logits(hidden)
