"""FBK Conformer encoder + fairseq pre-norm Transformer decoder, in plain PyTorch.

Archs `conformer` and `conformer_joint_ctc` of FBK-fairseq, any size, restated from
docs/reference/model_reference.md (§1, §2). Parameter names equal the fairseq state-dict keys, so a
checkpoint loads with `load_state_dict` after dropping buffers we recompute (`pe`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConformerConfig:
    arch: str = "conformer"                 # or "conformer_joint_ctc"
    input_feat: int = 80                    # input_feat_per_channel * input_channels
    conv_channels: int = 1024
    conv_kernel_sizes: tuple[int, ...] = (5, 5)
    d_model: int = 512
    encoder_layers: int = 12
    encoder_heads: int = 8
    ffn_expansion: int = 4
    conv_kernel: int = 31
    decoder_layers: int = 6
    decoder_heads: int = 8
    decoder_ffn: int = 2048
    vocab_size: int = 8001
    ctc_vocab_size: int = 0                 # 0: no encoder.ctc_fc
    ctc_layer: int = 0                      # 1-based layer whose output feeds ctc_fc
    ctc_compress_strategy: str = "none"     # none | avg | weighted | softmax | fixed
    ctc_compress_max_out_size: int = -1
    ctc_compress_fixed_ratio: int = 4
    aux_lang_layernorm: bool = False        # joint-CTC aux head with ignore_prefix_size > 0
    scale_embedding: bool = True            # not no_scale_embedding
    share_decoder_io: bool = False
    max_source_positions: int = 6000
    max_target_positions: int = 1024
    padding_idx: int = 1
    safe_shift: bool = True                 # FBK's per-sequence ("batch safe") relative shift

    @property
    def joint_ctc(self) -> bool:
        return self.arch == "conformer_joint_ctc"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conv_kernel_sizes"] = list(self.conv_kernel_sizes)
        return d


def lengths_to_padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, T] True at padded steps."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------

def encoder_positional_table(n_positions: int, d_model: int) -> torch.Tensor:
    """Interleaved sin/cos table [n, D] of the conformer relative attention (float32)."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


def rel_shift_unsafe(scores: torch.Tensor) -> torch.Tensor:
    """Transformer-XL shift on [..., T, T]: pad a zero column, view as (T+1) x T, drop the first row."""
    *lead, t1, t2 = scores.shape
    padded = torch.cat([scores.new_zeros(*lead, t1, 1), scores], dim=-1)
    return padded.view(*lead, t2 + 1, t1)[..., 1:, :].reshape(scores.shape)


def rel_shift_safe(scores: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sequence shift: each item's valid L x L block is shifted as if unpadded; padding -> 0."""
    T = scores.shape[-1]
    if lengths is None or bool((lengths == T).all()):
        return rel_shift_unsafe(scores)
    out = torch.zeros_like(scores)
    for b, n in enumerate(lengths.tolist()):
        out[b, ..., :n, :n] = rel_shift_unsafe(scores[b, ..., :n, :n])
    return out


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL style MHSA with u/v biases; scores scaled by sqrt(D) (FBK/sooftware)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.d_model, self.heads, self.head_dim = d_model, heads, d_model // heads
        self.query_proj = nn.Linear(d_model, d_model)
        self.key_proj = nn.Linear(d_model, d_model)
        self.value_proj = nn.Linear(d_model, d_model)
        self.pos_proj = nn.Linear(d_model, d_model, bias=False)
        self.u_bias = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.v_bias = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, pos_table: torch.Tensor, lengths: Optional[torch.Tensor],
                pad_mask: Optional[torch.Tensor], safe_shift: bool = True) -> torch.Tensor:
        B, T, _ = x.shape
        H, dh = self.heads, self.head_dim
        q = self.query_proj(x).view(B, T, H, dh)
        k = self.key_proj(x).view(B, T, H, dh).transpose(1, 2)
        v = self.value_proj(x).view(B, T, H, dh).transpose(1, 2)
        p = self.pos_proj(pos_table[:T].to(x.dtype)).view(T, H, dh).permute(1, 2, 0)      # H, dh, T
        content = (q + self.u_bias).transpose(1, 2) @ k.transpose(-1, -2)                 # B, H, T, T
        pos = (q + self.v_bias).transpose(1, 2) @ p
        pos = rel_shift_safe(pos, lengths) if safe_shift else rel_shift_unsafe(pos)
        score = (content + pos) / math.sqrt(self.d_model)
        if pad_mask is not None:
            both = (pad_mask[:, :, None] | pad_mask[:, None, :])[:, None]                  # B, 1, T, T
            score = score.masked_fill(both, -1e4)
            prob = torch.softmax(score, dim=-1).masked_fill(both, 0.0)
        else:
            prob = torch.softmax(score, dim=-1)
        context = (prob @ v).transpose(1, 2).reshape(B, T, self.d_model)
        return self.out_proj(context)


class MHSAModule(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(d_model)
        self.attention = RelPositionMultiHeadAttention(d_model, heads)

    def forward(self, x, pos_table, lengths, pad_mask, safe_shift=True):
        return self.attention(self.layer_norm(x), pos_table, lengths, pad_mask, safe_shift)


class FeedForwardModule(nn.Module):
    def __init__(self, d_model: int, expansion: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(d_model)
        self.first_linear = nn.Linear(d_model, d_model * expansion)
        self.second_linear = nn.Linear(d_model * expansion, d_model)

    def forward(self, x):
        return self.second_linear(F.silu(self.first_linear(self.layernorm(x))))


class ConvolutionModule(nn.Module):
    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(d_model)
        self.first_pointwise_conv1d = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise_conv1d = nn.Conv1d(d_model, d_model, kernel, padding=(kernel - 1) // 2, groups=d_model, bias=False)
        self.batchnorm = nn.BatchNorm1d(d_model)
        self.second_pointwise_conv1d = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x, pad_mask):
        def remask(y):  # zero padded time steps (the BUGFREE fixes)
            return y if pad_mask is None else y.masked_fill(pad_mask[:, None, :], 0.0)
        y = self.layernorm(x).transpose(1, 2)
        y = remask(F.glu(self.first_pointwise_conv1d(y), dim=1))
        y = remask(self.depthwise_conv1d(y))
        y = remask(self.batchnorm(y))
        y = remask(self.second_pointwise_conv1d(F.silu(y)))
        return y.transpose(1, 2)


class ConformerLayer(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        D = cfg.d_model
        self.first_feed_forward = FeedForwardModule(D, cfg.ffn_expansion)
        self.attention = MHSAModule(D, cfg.encoder_heads)
        self.conv_module = ConvolutionModule(D, cfg.conv_kernel)
        self.second_feed_forward = FeedForwardModule(D, cfg.ffn_expansion)
        self.layernorm = nn.LayerNorm(D)

    def forward(self, x, pos_table, lengths, pad_mask, safe_shift=True):
        x = x + 0.5 * self.first_feed_forward(x)
        x = x + self.attention(x, pos_table, lengths, pad_mask, safe_shift)
        x = x + self.conv_module(x, pad_mask)
        x = x + 0.5 * self.second_feed_forward(x)
        return self.layernorm(x)


class Conv1dSubsampler(nn.Module):
    """Stride-2 Conv1d + GLU stack; padded steps re-zeroed after every conv."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, kernel_sizes=(5, 5)):
        super().__init__()
        n = len(kernel_sizes)
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(in_channels if i == 0 else mid_channels // 2, mid_channels if i < n - 1 else out_channels * 2,
                      k, stride=2, padding=k // 2)
            for i, k in enumerate(kernel_sizes))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.transpose(1, 2)                                            # B, C, T
        for conv in self.conv_layers:
            x = F.glu(conv(x), dim=1)
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
            x = x.masked_fill(lengths_to_padding_mask(lengths, x.shape[-1])[:, None, :], 0.0)
        return x.transpose(1, 2), lengths                                # B, T', D


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.cfg = cfg
        self.subsample = Conv1dSubsampler(cfg.input_feat, cfg.conv_channels, cfg.d_model, cfg.conv_kernel_sizes)
        self.conformer_layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.encoder_layers))
        if cfg.ctc_vocab_size:
            self.ctc_fc = nn.Linear(cfg.d_model, cfg.ctc_vocab_size)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self._pos_table: Optional[torch.Tensor] = None   # one table shared by all layers, grown lazily

    def set_pos_table(self, table: torch.Tensor) -> None:
        self._pos_table = table.reshape(-1, self.cfg.d_model).float()

    def pos_table(self, n: int, device) -> torch.Tensor:
        if n > 10000:
            raise ValueError(f"encoder sequence of {n} steps exceeds the 10000 relative positions of the model")
        t = self._pos_table
        if t is None or t.shape[0] < n:
            t = encoder_positional_table(max(n, 1024), self.cfg.d_model)
        if t.device != torch.device(device):
            t = t.to(device)
        self._pos_table = t
        return t

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> dict:
        x, lengths = self.subsample(features, lengths)
        x = self.embed_scale * x
        T = x.shape[1]
        pad = lengths_to_padding_mask(lengths, T)
        pad_mask = pad if bool(pad.any()) else None
        table = self.pos_table(T, x.device)
        safe = self.cfg.safe_shift
        out = {}
        for i, layer in enumerate(self.conformer_layers):
            x = layer(x, table, lengths, pad_mask, safe)
            if self.cfg.ctc_vocab_size and i + 1 == self.cfg.ctc_layer:
                ctc = self.ctc_fc(x)
                out["ctc_out"], out["ctc_lengths"] = ctc, lengths
                if self.cfg.ctc_compress_strategy != "none":
                    x, lengths = ctc_compress(x, ctc, lengths, self.cfg)
                    pad = lengths_to_padding_mask(lengths, x.shape[1])
                    pad_mask = pad if bool(pad.any()) else None
                    table = self.pos_table(x.shape[1], x.device)
        out["states"], out["lengths"] = x, lengths
        return out


def ctc_segments(labels: list[int], max_out: int) -> list[tuple[int, int]]:
    """Run-length (label, count) segments; merged in groups of ceil(n/max_out) if too many."""
    segs: list[list[int]] = []
    for lab in labels:
        if segs and segs[-1][0] == lab:
            segs[-1][1] += 1
        else:
            segs.append([lab, 1])
    if max_out > 0 and len(segs) > max_out:
        group = -(-len(segs) // max_out)
        merged = []
        for s in range(0, len(segs), group):
            chunk = segs[s:s + group]
            counts: dict[int, int] = {}
            for lab, c in chunk:
                counts[lab] = counts.get(lab, 0) + c
            best = max(counts.items(), key=lambda kv: kv[1])[0]   # first label wins ties (insertion order)
            merged.append([best, sum(c for _, c in chunk)])
        segs = merged
    return [(lab, c) for lab, c in segs]


def ctc_compress(x: torch.Tensor, ctc_logits: torch.Tensor, lengths: torch.Tensor, cfg: ConformerConfig):
    """Merge encoder steps by CTC prediction (or fixed blocks): returns (x' [B, T'', D], lengths')."""
    strategy = cfg.ctc_compress_strategy
    probs = torch.softmax(ctc_logits.float(), dim=-1)
    weights = []
    for b, n in enumerate(lengths.tolist()):
        if strategy == "fixed":
            r = cfg.ctc_compress_fixed_ratio
            segs = [(0, min(r, n - s)) for s in range(0, n, r)]
        else:
            segs = ctc_segments(probs[b, :n].argmax(-1).tolist(), cfg.ctc_compress_max_out_size)
        w = torch.zeros(len(segs), x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for j, (lab, c) in enumerate(segs):
            if strategy in ("avg", "fixed"):
                w[j, start:start + c] = 1.0 / c
            elif strategy == "weighted":
                p = probs[b, start:start + c, lab]
                w[j, start:start + c] = p / p.sum()
            elif strategy == "softmax":
                w[j, start:start + c] = torch.softmax(probs[b, start:start + c, lab], dim=0)
            else:
                raise ValueError(f"unknown ctc_compress_strategy {strategy!r}")
            start += c
        weights.append(w)
    new_lengths = torch.tensor([w.shape[0] for w in weights], device=lengths.device)
    W = torch.zeros(len(weights), int(new_lengths.max()), x.shape[1], device=x.device)
    for b, w in enumerate(weights):
        W[b, : w.shape[0]] = w
    return (W.to(x.dtype) @ x), new_lengths


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------

def decoder_positions(positions: torch.Tensor, dim: int, padding_idx: int = 1) -> torch.Tensor:
    """fairseq sinusoidal embeddings of absolute `positions` (sin block, then cos block; row pad = 0)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device) * -(math.log(10000.0) / (half - 1)))
    arg = positions.float()[..., None] * freq
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    if dim % 2 == 1:
        emb = torch.cat([emb, emb.new_zeros(*emb.shape[:-1], 1)], dim=-1)
    return emb.masked_fill((positions == padding_idx)[..., None], 0.0)


class MultiheadAttention(nn.Module):
    """fairseq attention: q scaled by dh^-0.5 after its biased projection; all projections biased."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.scaling = self.head_dim ** -0.5
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split(self, y: torch.Tensor) -> torch.Tensor:      # B, T, D -> B, H, T, dh
        return y.view(y.shape[0], y.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k_proj(y)), self.split(self.v_proj(y))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pad: Optional[torch.Tensor] = None,
               causal: bool = False, need_probs: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x [B, Tq, D]; k, v [B, H, Tk, dh]; key_pad [B, Tk] True = ignore. Returns (out, probs)."""
        B, Tq, D = x.shape
        q = self.split(self.q_proj(x))
        k, v = k.to(q.dtype), v.to(q.dtype)
        mask = None
        if key_pad is not None:
            mask = key_pad[:, None, None, :]
        if causal and Tq > 1:
            tri = torch.ones(Tq, k.shape[2], dtype=torch.bool, device=x.device).triu(k.shape[2] - Tq + 1)
            mask = tri if mask is None else (mask | tri)
        if need_probs:
            scores = (q * self.scaling) @ k.transpose(-1, -2)
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1)
            context = probs.to(v.dtype) @ v
        else:  # fused path: same math, no probabilities materialised for the caller
            probs = None
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else ~mask)
        return self.out_proj(context.transpose(1, 2).reshape(B, Tq, D)), probs


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = MultiheadAttention(d_model, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn)
        self.fc2 = nn.Linear(ffn, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def self_block(self, x, self_cache: Optional[dict] = None):
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)
        if self_cache is not None:      # incremental: x holds only the newest position(s)
            if "k" in self_cache:
                k = torch.cat([self_cache["k"], k], dim=2)
                v = torch.cat([self_cache["v"], v], dim=2)
            self_cache["k"], self_cache["v"] = k, v
        return x + self.self_attn.attend(h, k, v, causal=True)[0]

    def cross_block(self, x, cross_k, cross_v, enc_pad, need_probs: bool = False):
        h, probs = self.encoder_attn.attend(self.encoder_attn_layer_norm(x), cross_k, cross_v, enc_pad, need_probs=need_probs)
        x = x + h
        x = x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))
        return x, probs

    def forward(self, x, cross_k, cross_v, enc_pad, self_cache: Optional[dict] = None, need_probs: bool = False):
        return self.cross_block(self.self_block(x, self_cache), cross_k, cross_v, enc_pad, need_probs)


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.padding_idx = cfg.padding_idx
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.padding_idx)
        self.embed_scale = math.sqrt(D) if cfg.scale_embedding else 1.0
        self.layers = nn.ModuleList(DecoderLayer(D, cfg.decoder_heads, cfg.decoder_ffn) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(D)
        self.output_projection = nn.Linear(D, cfg.vocab_size, bias=False)
        if cfg.share_decoder_io:
            self.output_projection.weight = self.embed_tokens.weight

    def cross_kv(self, enc_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encoder keys/values of every layer, [B, H, T', dh] each."""
        return [layer.encoder_attn.project_kv(enc_states) for layer in self.layers]

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Scaled token embeddings + sinusoidal positions (first input at position padding_idx + 1)."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device) + self.padding_idx + 1
        pos = decoder_positions(positions, self.cfg.d_model, self.padding_idx).to(self.embed_tokens.weight.dtype)
        return self.embed_scale * self.embed_tokens(tokens) + pos

    def forward(self, tokens: torch.Tensor, cross: list, enc_pad: Optional[torch.Tensor], need_probs: bool = False,
                caches: Optional[list] = None, start: int = 0, first_self: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list]:
        """tokens [B, t] decoder inputs from position `start` on; returns logits [B, t, V], per-layer
        cross-attention probs ([B, H, t, T'] each, or None). `first_self`: a precomputed output of
        layer 0's self-attention block (it does not depend on the encoder), broadcast over B."""
        x = self.embed(tokens, start) if first_self is None else first_self
        all_probs = []
        for i, layer in enumerate(self.layers):
            if i == 0 and first_self is not None:
                x, probs = layer.cross_block(x, cross[0][0], cross[0][1], enc_pad, need_probs)
            else:
                x, probs = layer(x, cross[i][0], cross[i][1], enc_pad, None if caches is None else caches[i], need_probs)
            all_probs.append(probs)
        return self.output_projection(self.layer_norm(x)), all_probs


class AuxiliaryCTCDecoder(nn.Module):
    """Joint-CTC head on the final encoder output (loaded for completeness; not used by beam search)."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.vocab_size)
        if cfg.aux_lang_layernorm:
            self.lang_embed_layernorm = nn.LayerNorm(cfg.d_model)

    def forward(self, states: torch.Tensor, lengths: torch.Tensor, lang_embedding: Optional[torch.Tensor] = None):
        if lang_embedding is not None and hasattr(self, "lang_embed_layernorm"):
            states = self.lang_embed_layernorm(states + lang_embedding[:, None, :])
        logits = self.fc(states)
        return logits.masked_fill(lengths_to_padding_mask(lengths, states.shape[1])[..., None], 0.0)


class ConformerModel(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ConformerEncoder(cfg)
        self.decoder = TransformerDecoder(cfg)
        if cfg.joint_ctc:
            self.auxiliary_decoder = AuxiliaryCTCDecoder(cfg)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> dict:
        return self.encoder(features, lengths)

    def forward(self, features, lengths, prev_tokens, need_probs: bool = False):
        enc = self.encode(features, lengths)
        pad = lengths_to_padding_mask(enc["lengths"], enc["states"].shape[1])
        logits, probs = self.decoder(prev_tokens, self.decoder.cross_kv(enc["states"]), pad if bool(pad.any()) else None, need_probs)
        return logits, probs, enc

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
