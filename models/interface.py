"""The one model interface shared by every speech model family.

`xai_core` and `jobs` only talk to models through `SpeechModel`. A model family (Whisper, FBK
Conformer, ...) implements the abstract methods; the scorers (`input_scorer`, `encoder_scorer`)
are where the speed lives (batching, precision, cached projections), so the method code never
sees those details.

Conventions
-----------
* Features are `[T, F]` float32 matrices of *real* frames (Whisper's 30 s padding is not part of
  them); batches are `[B, T, F]` right-padded with zeros plus a `lengths` vector.
* A hypothesis is the sequence of *predicted* tokens ("targets"): forced prefix tokens (language
  tag, Whisper task tokens), content tokens, then the end token. The decoder input is the same
  sequence shifted right by one with the model's `bos` in front. Row i of every per-token tensor
  (log-probs, cross-attention, saliency) is the prediction of `token_ids[i]`.
* Log-probabilities are natural-log, float32, over the full vocabulary.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

SAMPLE_RATE = 16000

# A scorer maps a batch of perturbed inputs to teacher-forced log-probs [B, I, V] (float32).
InputScorer = Callable[[torch.Tensor], torch.Tensor]
EncoderScorer = Callable[[torch.Tensor], torch.Tensor]


class ModelError(ValueError):
    """A clear, user-facing error about a model, its files or its input."""


@dataclass
class BeamOptions:
    """Beam search options with fairseq semantics (the paper's defaults)."""

    beam_size: int = 5
    no_repeat_ngram_size: int = 5
    len_penalty: float = 1.0
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    unk_penalty: float = 0.0


@dataclass
class EncoderOutput:
    """Encoder states of a batch: `states` [B, T', D], `lengths` [B] valid steps per item."""

    states: torch.Tensor
    lengths: torch.Tensor

    @property
    def padding_mask(self) -> torch.Tensor:
        """[B, T'] True where a step is padding."""
        steps = torch.arange(self.states.shape[1], device=self.states.device)
        return steps[None, :] >= self.lengths.to(self.states.device)[:, None]

    def select(self, index: torch.Tensor) -> "EncoderOutput":
        return EncoderOutput(self.states.index_select(0, index), self.lengths.index_select(0, index.to(self.lengths.device)))


@dataclass
class Hypothesis:
    """A decoded (or given) output sequence; fixed once chosen, then teacher-forced everywhere."""

    bos: int
    token_ids: list[int]
    prefix_len: int = 0
    token_log_probs: list[float] = field(default_factory=list)
    score: float = 0.0
    tokens: list[str] = field(default_factory=list)
    text: str = ""

    @property
    def decoder_input(self) -> list[int]:
        return [self.bos] + list(self.token_ids[:-1])

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def content_rows(self, ends_with_eos: bool = True) -> slice:
        """Rows that are content predictions: drop forced prefix rows and the final end token."""
        end = len(self.token_ids) - (1 if ends_with_eos else 0)
        return slice(self.prefix_len, max(self.prefix_len, end))

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": list(self.tokens),
            "token_ids": [int(t) for t in self.token_ids],
            "token_log_probs": [float(p) for p in self.token_log_probs],
            "prefix_len": int(self.prefix_len),
            "bos": int(self.bos),
            "score": float(self.score),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Hypothesis":
        return cls(bos=int(d["bos"]), token_ids=[int(t) for t in d["token_ids"]], prefix_len=int(d.get("prefix_len", 0)),
                   token_log_probs=[float(x) for x in d.get("token_log_probs", [])], score=float(d.get("score", 0.0)),
                   tokens=list(d.get("tokens", [])), text=d.get("text", ""))


class IncrementalDecoder(ABC):
    """What beam search needs from a model: one decoding step at a time with a reorderable cache."""

    eos: int
    pad: int
    unk: Optional[int]

    @abstractmethod
    def init_decoder_state(self, enc: EncoderOutput) -> object:
        """Per-batch decoder state (caches) for the rows of `enc`."""

    @abstractmethod
    def decoder_step(self, tokens: torch.Tensor, state: object) -> tuple[torch.Tensor, object]:
        """`tokens` [N, t] are all decoder inputs so far (bos first); returns float32 log-probs
        [N, V] for the next token and the updated state."""

    @abstractmethod
    def reorder_decoder_state(self, state: object, index: torch.Tensor) -> object:
        """Select rows `index` of the state (beam reordering)."""

    def adjust_log_probs(self, lprobs: torch.Tensor, step: int, prefix_len: int) -> torch.Tensor:
        """Model-specific suppression (e.g. Whisper's suppress_tokens); `step` counts generated
        tokens so far, `prefix_len` the forced prefix length. Default: unchanged."""
        return lprobs


class SpeechModel(IncrementalDecoder):
    """An encoder–decoder speech-to-text model behind one interface."""

    name: str = "model"
    family: str = "unknown"
    subsampling: int = 1           # input frames per encoder step
    frame_shift_s: float = 0.01    # seconds per input frame
    max_input_frames: Optional[int] = None
    device: torch.device = torch.device("cpu")

    # ---- facts -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def bos(self) -> int: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def decoder_layers(self) -> int: ...

    @property
    @abstractmethod
    def decoder_heads(self) -> int: ...

    def encoder_length(self, n_frames: int) -> int:
        """Number of encoder steps T' for `n_frames` input frames."""
        return -(-n_frames // self.subsampling)

    # ---- text ---------------------------------------------------------------------------------
    @abstractmethod
    def forced_prefix(self, lang: Optional[str] = None, task: str = "transcribe",
                      src_lang: Optional[str] = None) -> list[int]:
        """Tokens predicted first but forced (language tag, task tokens). `lang` is the output
        language, `src_lang` the spoken one (Whisper's language token is the spoken language)."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str: ...

    @abstractmethod
    def decode_text(self, token_ids: Sequence[int]) -> str:
        """Detokenised text of content tokens (special tokens dropped)."""

    # ---- computation --------------------------------------------------------------------------
    @abstractmethod
    def features(self, waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """Model input features [T, F] (float32, normalised, real frames only)."""

    @abstractmethod
    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """Encoder forward on a padded batch [B, T, F] with `lengths` [B]."""

    @abstractmethod
    def teacher_forced_log_probs(self, enc: EncoderOutput, hyp: Hypothesis) -> torch.Tensor:
        """float32 log-probs [B, I, V] of the fixed hypothesis given each row of `enc`."""

    @abstractmethod
    def cross_attention(self, features: torch.Tensor, hyp: Hypothesis) -> torch.Tensor:
        """Cross-attention probabilities [L, H, I, T'] of one teacher-forced pass."""

    @abstractmethod
    def input_scorer(self, hyp: Hypothesis, n_frames: int, dtype: torch.dtype = torch.float32) -> InputScorer:
        """callable(features_batch [B, T, F]) -> log_probs [B, I, V] float32."""

    @abstractmethod
    def encoder_scorer(self, states: torch.Tensor, hyp: Hypothesis, dtype: torch.dtype = torch.float32) -> EncoderScorer:
        """`states` [T', D] (one utterance). callable(keep_mask [B, T'] bool) -> log_probs [B, I, V]
        where masked states are zeroed (the decoder still attends to them)."""

    def perturbation_context(self, features: torch.Tensor):
        """Context in which perturbed copies of `features` (same length) are encoded as versions of
        that utterance (Whisper keeps the unperturbed utterance's 30 s padding). Default: nothing."""
        return contextlib.nullcontext()

    # ---- decoding -----------------------------------------------------------------------------
    def generate(self, features: Sequence[torch.Tensor], prefixes: Sequence[Sequence[int]],
                 options: Optional[BeamOptions] = None) -> list[Hypothesis]:
        """Beam search, batched over utterances."""
        from models.beam_search import beam_search
        options = options or self.default_beam_options()
        with torch.inference_mode():
            feats, lengths = pad_features(features, self.device)
            enc = self.encode(feats, lengths)
            results = beam_search(self, enc, [list(p) for p in prefixes], options,
                                  n_frames=[int(f.shape[0]) for f in features])
        return [self.make_hypothesis(r.tokens, len(p), r.positional_scores, r.score)
                for r, p in zip(results, prefixes)]

    def default_beam_options(self) -> BeamOptions:
        return BeamOptions()

    def make_hypothesis(self, token_ids: Sequence[int], prefix_len: int,
                        token_log_probs: Sequence[float] = (), score: float = 0.0) -> Hypothesis:
        ids = [int(t) for t in token_ids]
        content = ids[prefix_len:]
        if content and content[-1] == self.eos:
            content = content[:-1]
        return Hypothesis(bos=self.bos, token_ids=ids, prefix_len=prefix_len,
                          token_log_probs=[float(x) for x in token_log_probs], score=float(score),
                          tokens=[self.id_to_piece(t) for t in ids], text=self.decode_text(content))

    def hypothesis_from_text(self, text: str, prefix: Sequence[int]) -> Hypothesis:
        """A given (not decoded) hypothesis: tokenise `text`, add prefix and end token."""
        raise NotImplementedError


def pad_features(features: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of [T_i, F] matrices with zeros into [B, T, F] plus lengths [B]."""
    lengths = torch.tensor([int(f.shape[0]) for f in features], dtype=torch.long)
    out = torch.zeros(len(features), int(lengths.max()), int(features[0].shape[1]), dtype=features[0].dtype)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
    return out.to(device), lengths.to(device)
