"""`WhisperModel`: Whisper behind the project's `SpeechModel` interface.

The 30 s window
---------------
Whisper always encodes 3000 mel frames (30 s) and its decoder cross-attends to all 1500 encoder
steps, real or padding. We keep that, so outputs are faithful to Whisper, but the project's view of
an utterance is its real part only:

* `features()` returns the T = n_samples // 160 real frames. The remaining 3000 - T frames of
  Whisper's own input (log-mel of the zero padding, normalised with the utterance's maximum, the
  first few also seeing the audio tail) are stored per utterance, keyed by a digest of the real
  frames, and `encode()` puts them back, so encode(features) == encoder(Whisper's 3000-frame
  log-mel) exactly. For frames it has never seen (features made elsewhere) it falls back to the
  constant Whisper gives pure-padding frames, recovered from the real frames' maximum
  (`features.padding_fill`); only the 2-3 border frames can then differ.
* Encoder outputs are [B, 1500, D]; `EncoderOutput.lengths` = ceil(T / 2) real steps.
* `cross_attention()` computes attention over all 1500 steps and reports the real-step columns
  [L, H, I, ceil(T/2)] (the rows therefore need not sum to 1).
* `input_scorer` perturbs the real frames only; the padding block stays the unperturbed
  utterance's. `encoder_scorer` occludes real steps only; padding steps are always kept.

Decoding defaults are Whisper's own (openai-whisper `transcribe` with beam search): beam 5, no
n-gram blocking, score = sum log-prob / length (fairseq len_penalty 1.0), up to 224 tokens after
the forced prefix, `suppress_ids` at every content step, `suppress_ids_begin` (blank, end) at the
first, and timestamp tokens always (we decode with <|notimestamps|>).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.interface import (SAMPLE_RATE, BeamOptions, EncoderOutput, EncoderScorer, Hypothesis, InputScorer,
                              ModelError, SpeechModel)
from models.whisper import features as wf
from models.whisper.loaders import WhisperCheckpoint
from models.whisper.model import KV, MaskedMemory
from models.whisper.tokenizer import WhisperTokenizer

MIN_SAMPLES = SAMPLE_RATE // 10     # 0.1 s: anything shorter is not speech worth explaining
MAX_NEW_TOKENS = 224                # openai-whisper's sample_len = n_text_ctx // 2


class WhisperModel(SpeechModel):
    family = "whisper"
    subsampling = 2
    frame_shift_s = 0.01
    max_input_frames = wf.N_FRAMES

    def __init__(self, ckpt: WhisperCheckpoint, device: str | torch.device = "cpu", name: Optional[str] = None,
                 memory_budget_mb: Optional[int] = None):
        self.device = torch.device(device)
        self.checkpoint_path = ckpt.weights_path
        self._source = dataclasses.replace(ckpt, state_dict={})   # metadata only; weights live in the module
        self.name = name or str(ckpt.weights_path)
        self.dims = ckpt.dims
        self.model = ckpt.build().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = WhisperTokenizer(ckpt.tokenizer_path, ckpt.dims.n_vocab)
        tok = self.tokenizer
        if tok.timestamp_begin > ckpt.dims.n_vocab:
            raise ModelError(f"{ckpt.tokenizer_path}: tokenizer does not match the weights ({ckpt.dims.n_vocab} tokens)")
        self.eos = tok.eot
        # Whisper has no padding token (Hugging Face reuses <|endoftext|>, but beam search bans the
        # pad id): use <|startofprev|>, a prompt-only token that is never predicted.
        self.pad = tok.sot_prev if tok.sot_prev is not None else tok.sot
        self.unk = None
        self.max_decoder_positions = ckpt.dims.n_text_ctx
        self.alignment_heads = ckpt.alignment_heads
        default = [t for t in (tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech, tok.transcribe, tok.translate) if t is not None]
        suppress = list(ckpt.suppress_ids) if ckpt.suppress_ids is not None else default
        suppress += range(tok.timestamp_begin, ckpt.dims.n_vocab)  # we always decode without timestamps
        self.suppress_ids = torch.tensor(sorted(set(suppress)), dtype=torch.long, device=self.device)
        begin = ckpt.suppress_ids_begin if ckpt.suppress_ids_begin is not None else [t for t in tok.encode(" ")[:1]] + [tok.eot]
        self.suppress_ids_begin = torch.tensor(sorted(set(begin)), dtype=torch.long, device=self.device)
        budget = memory_budget_mb or int(os.environ.get("XS2T_MEMORY_BUDGET_MB", "2048"))
        self.memory_budget = budget * 2**20
        self._padding: OrderedDict[bytes, Tensor] = OrderedDict()   # digest of real frames -> padding block
        self._checksum: Optional[str] = None
        self._bound: Optional[Tensor] = None                           # see padding_from()

    # ---- facts -------------------------------------------------------------------------------
    @property
    def bos(self) -> int:
        return self.tokenizer.sot

    @property
    def vocab_size(self) -> int:
        return self.dims.n_vocab

    @property
    def decoder_layers(self) -> int:
        return self.dims.n_text_layer

    @property
    def decoder_heads(self) -> int:
        return self.dims.n_text_head

    @property
    def n_mels(self) -> int:
        return self.dims.n_mels

    @property
    def n_audio_ctx(self) -> int:
        return self.dims.n_audio_ctx

    def checksum(self) -> str:
        """sha256 of the weights file (for the reproducibility record)."""
        if self._checksum is None:
            h = hashlib.sha256()
            with open(self.checkpoint_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            self._checksum = h.hexdigest()
        return self._checksum

    def to_checkpoint(self) -> WhisperCheckpoint:
        """The loaded weights (float32, our names) with the files' metadata, e.g. for the writers."""
        src = self._source
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return WhisperCheckpoint(dims=self.dims, state_dict=state, tokenizer_path=src.tokenizer_path,
                                 weights_path=src.weights_path, format=src.format, suppress_ids=src.suppress_ids,
                                 suppress_ids_begin=src.suppress_ids_begin, alignment_heads=src.alignment_heads)

    # ---- text ---------------------------------------------------------------------------------
    def forced_prefix(self, lang: Optional[str] = None, task: str = "transcribe", src_lang: Optional[str] = None) -> list[int]:
        tok = self.tokenizer
        if task not in ("transcribe", "translate"):
            raise ModelError(f"Whisper task must be 'transcribe' or 'translate', not {task!r}")
        if not tok.multilingual:
            if task == "translate" or (src_lang or lang or "en") != "en":
                raise ModelError(f"{self.name} is English-only: it cannot {task} {src_lang or lang!r}")
            return [tok.no_timestamps]
        spoken = src_lang or lang or "en"
        return [tok.language_token(spoken), tok.transcribe if task == "transcribe" else tok.translate, tok.no_timestamps]

    def id_to_piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_piece(token_id)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids).strip()

    def hypothesis_from_text(self, text: str, prefix: Sequence[int]) -> Hypothesis:
        ids = list(prefix) + self.tokenizer.encode(text) + [self.eos]
        if len(ids) + 1 > self.max_decoder_positions:
            raise ModelError(f"text too long for Whisper's {self.max_decoder_positions} decoder positions: {text[:60]!r}...")
        return self.make_hypothesis(ids, len(prefix))

    def default_beam_options(self) -> BeamOptions:
        prefix_len = 3 if self.tokenizer.multilingual else 1
        return BeamOptions(beam_size=5, no_repeat_ngram_size=0, len_penalty=1.0, max_len_a=0.0,
                           max_len_b=MAX_NEW_TOKENS + prefix_len, min_len=1)

    # ---- features -----------------------------------------------------------------------------
    def features(self, waveform: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
        if sample_rate != wf.SAMPLE_RATE:
            raise ModelError(f"Whisper needs 16 kHz audio, got {sample_rate} Hz")
        wave = torch.as_tensor(waveform, dtype=torch.float32).reshape(-1)
        if wave.numel() < MIN_SAMPLES:
            raise ModelError(f"audio too short for Whisper: {wave.numel() / SAMPLE_RATE:.3f} s (minimum {MIN_SAMPLES / SAMPLE_RATE} s)")
        if wave.numel() > wf.N_SAMPLES:
            raise ModelError(f"audio longer than Whisper's 30 s window: {wave.numel() / SAMPLE_RATE:.2f} s (segment it first)")
        if not torch.isfinite(wave).all():
            raise ModelError("audio contains NaN or infinite samples")
        with torch.inference_mode():
            mel = wf.log_mel(wave.to(self.device), self.n_mels).T.contiguous()   # [3000, F]
        n = wf.real_frames(wave.numel())
        real = mel[:n].clone()
        self._remember_padding(real, mel[n:].clone())
        return real

    @staticmethod
    def _digest(real: Tensor) -> bytes:
        return hashlib.blake2b(real.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    def _remember_padding(self, real: Tensor, block: Tensor) -> None:
        key = self._digest(real)
        self._padding[key] = block
        self._padding.move_to_end(key)
        while len(self._padding) > 64:
            self._padding.popitem(last=False)

    def padding_block(self, real: Tensor) -> Tensor:
        """Whisper's frames after the real ones [3000 - T, F] for the utterance with these real frames
        (stored by `features()`; inside `padding_from(x)`, x's block for unknown frames of its length;
        else the constant of pure-padding frames derived from `real`)."""
        block = self._padding.get(self._digest(real))
        if block is None and self._bound is not None and self._bound.shape[0] == wf.N_FRAMES - real.shape[0]:
            block = self._bound
        if block is None:
            block = torch.full((wf.N_FRAMES - real.shape[0], real.shape[1]), wf.padding_fill(real), device=self.device)
        return block

    def perturbation_context(self, features: Tensor):
        return self.padding_from(features)

    @contextlib.contextmanager
    def padding_from(self, features: Tensor):
        """Within this block, perturbed copies of `features` (same length; e.g. frames deleted for
        the deletion metric) are encoded with the unperturbed utterance's padding block."""
        previous, self._bound = self._bound, self.padding_block(features.float().to(self.device))
        try:
            yield
        finally:
            self._bound = previous

    def _check_frames(self, n: int) -> None:
        if n > wf.N_FRAMES:
            raise ModelError(f"Whisper input has {n} frames; at most {wf.N_FRAMES} (30 s) are possible")
        if n < 1:
            raise ModelError("Whisper input has no frames")

    def _mel_batch(self, feats: Tensor, lengths: Sequence[int]) -> Tensor:
        """[B, T, F] real frames -> [B, F, 3000] Whisper input (each row with its own padding)."""
        rows = []
        for b, n in enumerate(lengths):
            self._check_frames(n)
            real = feats[b, :n].float()
            rows.append(torch.cat([real, self.padding_block(real).to(real.device)]))
        return torch.stack(rows).transpose(1, 2)

    # ---- computation --------------------------------------------------------------------------
    def encode(self, features: Tensor, lengths: Tensor) -> EncoderOutput:
        lengths_list = [int(n) for n in lengths]
        if features.dim() != 3 or features.shape[-1] != self.n_mels:
            raise ModelError(f"Whisper features must be [B, T, {self.n_mels}], got {tuple(features.shape)}")
        with torch.inference_mode():
            states = self.model.encoder(self._mel_batch(features.to(self.device), lengths_list))
        steps = torch.tensor([self.encoder_length(n) for n in lengths_list], dtype=torch.long, device=self.device)
        return EncoderOutput(states, steps)

    def _tokens(self, hyp: Hypothesis, rows: int) -> Tensor:
        ids = hyp.decoder_input
        if len(ids) > self.max_decoder_positions:
            raise ModelError(f"hypothesis of {len(ids)} tokens exceeds Whisper's {self.max_decoder_positions} decoder positions")
        return torch.tensor(ids, dtype=torch.long, device=self.device)[None].expand(rows, -1)

    def _log_probs(self, hidden: Tensor) -> Tensor:
        return self.model.decoder.logits(hidden).float().log_softmax(dim=-1)

    def teacher_forced_log_probs(self, enc: EncoderOutput, hyp: Hypothesis) -> Tensor:
        with torch.inference_mode():
            dec = self.model.decoder
            hidden = dec(self._tokens(hyp, enc.states.shape[0]), dec.cross_kv(enc.states))[0]
            return self._log_probs(hidden)

    def cross_attention(self, features: Tensor, hyp: Hypothesis) -> Tensor:
        n = int(features.shape[0])
        with torch.inference_mode():
            enc = self.encode(features[None], torch.tensor([n]))
            dec = self.model.decoder
            _, _, weights = dec(self._tokens(hyp, 1), dec.cross_kv(enc.states), need_weights=True)
            return torch.stack([w[0] for w in weights])[..., : self.encoder_length(n)].float()

    # ---- scorers ------------------------------------------------------------------------------
    def _chunk_size(self, n_tokens: int, with_encoder: bool) -> int:
        """Rows per forward pass that fit the memory budget (rough float32 activation estimate)."""
        d, t_enc = self.dims.n_text_state, self.dims.n_audio_ctx
        per_row = 4 * (3 * n_tokens * self.dims.n_vocab          # logits, log-softmax, temporaries
                       + 12 * n_tokens * d * self.dims.n_text_layer)
        if with_encoder:   # encoder activations + cross K/V of every layer
            per_row += 4 * (2 * t_enc * self.dims.n_mels + 8 * t_enc * self.dims.n_audio_state
                            + 2 * t_enc * d * self.dims.n_text_layer)
        else:              # the additive occlusion mask, expanded over the tokens
            per_row += 4 * 2 * n_tokens * (t_enc + 1)
        return max(1, int(self.memory_budget // per_row))

    def _autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        if dtype == torch.float16 and self.device.type == "cpu":
            raise ModelError("float16 is not supported on CPU (use bfloat16)")
        return torch.autocast(self.device.type, dtype=dtype)

    def input_scorer(self, hyp: Hypothesis, n_frames: int, dtype: torch.dtype = torch.float32,
                     features: Optional[Tensor] = None) -> InputScorer:
        """Scorer of perturbed real frames [B, n_frames, F]. The padding block put back behind them
        is the unperturbed utterance's: from `features` (its real frames) when given, else the one
        bound by `padding_from()`, else the most recent utterance with `n_frames` frames seen by
        `features()` (the pipeline's order: features -> generate -> scorers)."""
        self._check_frames(n_frames)
        if features is not None:
            block = self.padding_block(features[:n_frames].float().to(self.device))
        elif self._bound is not None and self._bound.shape[0] == wf.N_FRAMES - n_frames:
            block = self._bound
        else:
            blocks = [b for b in reversed(self._padding.values()) if b.shape[0] == wf.N_FRAMES - n_frames]
            if not blocks:
                raise ModelError(f"Whisper input_scorer: no utterance with {n_frames} frames was seen by features(); "
                                 f"pass features= (the unperturbed real frames)")
            block = blocks[0]
        n_tokens = len(hyp.decoder_input)
        model = self.model

        def score(batch: Tensor) -> Tensor:
            if batch.dim() != 3 or batch.shape[1] != n_frames:
                raise ModelError(f"input_scorer expects [B, {n_frames}, F] features, got {tuple(batch.shape)}")
            out = []
            step = self._chunk_size(n_tokens, with_encoder=True)
            with torch.inference_mode(), self._autocast(dtype):
                for chunk in batch.split(step):
                    chunk = chunk.to(self.device, torch.float32)
                    mel = torch.cat([chunk, block.expand(chunk.shape[0], -1, -1)], dim=1).transpose(1, 2)
                    states = model.encoder(mel)
                    hidden = model.decoder(self._tokens(hyp, chunk.shape[0]), model.decoder.cross_kv(states))[0]
                    out.append(self._log_probs(hidden))
            return torch.cat(out)

        return score

    def encoder_scorer(self, states: Tensor, hyp: Hypothesis, dtype: torch.dtype = torch.float32) -> EncoderScorer:
        """`states`: the utterance's full encoder output [1500, D] (as in `encode(...).states[b]`).
        The scorer takes keep masks [B, W]: W = the real steps (padding steps are then always kept)
        or W = 1500. Keys/values of H are projected once per layer; an occluded step becomes the
        projection bias, folded into one extra attention step (see `model.MaskedMemory`)."""
        if states.dim() == 3:
            states = states[0]
        if states.shape[0] != self.n_audio_ctx:
            raise ModelError(f"Whisper encoder_scorer needs the full encoder output [{self.n_audio_ctx}, D] "
                             f"(padding steps included), got {tuple(states.shape)}")
        model = self.model
        n_tokens = len(hyp.decoder_input)
        with torch.inference_mode():   # projected once, kept in float32 (see MaskedMemory)
            memory = []
            for block, (k, v) in zip(model.decoder.blocks, model.decoder.cross_kv(states[None].to(self.device).float())):
                attn = block.cross_attn
                k_bias = torch.zeros_like(k[:, :, :1])                       # the key projection has no bias
                v_bias = attn.value.bias.view(1, attn.n_head, 1, -1).float()
                memory.append((k, v, k_bias, v_bias))

        def score(keep: Tensor) -> Tensor:
            if keep.dim() != 2 or keep.shape[1] > self.n_audio_ctx:
                raise ModelError(f"encoder_scorer expects a keep mask [B, T'] with T' <= {self.n_audio_ctx}, got {tuple(keep.shape)}")
            keep = keep.to(self.device, torch.bool)
            if keep.shape[1] < self.n_audio_ctx:   # padding steps are never occluded
                keep = F.pad(keep, (0, self.n_audio_ctx - keep.shape[1]), value=True)
            out = []
            step = self._chunk_size(n_tokens, with_encoder=False)
            with torch.inference_mode(), self._autocast(dtype):
                for chunk in keep.split(step):
                    cross = [MaskedMemory.build(k, v, kb, vb, chunk) for k, v, kb, vb in memory]
                    hidden = model.decoder(self._tokens(hyp, chunk.shape[0]), cross)[0]
                    out.append(self._log_probs(hidden))
            return torch.cat(out)

        return score

    # ---- incremental decoding -----------------------------------------------------------------
    def init_decoder_state(self, enc: EncoderOutput) -> dict:
        """Cross K/V are computed once per distinct utterance: beam search hands us each
        utterance repeated `beam` times, so equal consecutive rows share one K/V set."""
        states = enc.states
        starts = [0] + [i for i in range(1, states.shape[0])
                        if states[i].data_ptr() != states[i - 1].data_ptr() and not torch.equal(states[i], states[i - 1])]
        unique = states[starts]
        src = torch.zeros(states.shape[0], dtype=torch.long, device=states.device)
        src[starts[1:]] = 1
        src = src.cumsum(0)
        with torch.inference_mode():
            cross = self.model.decoder.cross_kv(unique)
        return {"cross": cross, "src": src, "past": None, "length": 0}

    def _rows_cross(self, state: dict) -> list[KV]:
        """Cross K/V aligned with the decoder rows: shared (folded into the query axis) when rows
        come in equal consecutive groups per utterance, gathered otherwise."""
        src, cross = state["src"], state["cross"]
        groups = cross[0][0].shape[0]
        if src.numel() % groups == 0:
            expected = torch.arange(groups, device=src.device).repeat_interleave(src.numel() // groups)
            if torch.equal(src, expected):
                return cross
        return [(k.index_select(0, src), v.index_select(0, src)) for k, v in cross]

    def decoder_step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict]:
        if tokens.shape[1] > self.max_decoder_positions:
            raise ModelError(f"decoder input exceeds Whisper's {self.max_decoder_positions} positions")
        with torch.inference_mode():
            new = tokens[:, state["length"]:].to(self.device)
            hidden, past, _ = self.model.decoder(new, self._rows_cross(state), past=state["past"])
            lprobs = self._log_probs(hidden[:, -1:])[:, 0]
        return lprobs, {"cross": state["cross"], "src": state["src"], "past": past, "length": tokens.shape[1]}

    def reorder_decoder_state(self, state: dict, index: Tensor) -> dict:
        index = index.to(self.device)
        past = None if state["past"] is None else [(k.index_select(0, index), v.index_select(0, index)) for k, v in state["past"]]
        return {"cross": state["cross"], "src": state["src"].index_select(0, index), "past": past, "length": state["length"]}

    def adjust_log_probs(self, lprobs: Tensor, step: int, prefix_len: int) -> Tensor:
        if step < prefix_len:      # forced tokens keep their real log-probs (beam search forces them)
            return lprobs
        lprobs = lprobs.index_fill(1, self.suppress_ids, -math.inf)
        if step == prefix_len:
            lprobs = lprobs.index_fill(1, self.suppress_ids_begin, -math.inf)
        return lprobs

    # ---- convenience --------------------------------------------------------------------------
    def transcribe(self, waveform: Tensor, lang: Optional[str] = None, task: str = "transcribe",
                   src_lang: Optional[str] = None, options: Optional[BeamOptions] = None) -> Hypothesis:
        """features -> beam search with the forced prefix -> Hypothesis (what `xs2t transcribe` does)."""
        feats = self.features(waveform)
        return self.generate([feats], [self.forced_prefix(lang, task, src_lang)], options)[0]
