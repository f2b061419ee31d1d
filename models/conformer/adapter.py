"""FBK Conformer behind the shared `SpeechModel` interface."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from models.conformer.model import ConformerModel
from models.conformer.text import CTC_BLANK, DataConfig, Dictionary, SentencePiece, lang_tag
from models.fbank import kaldi_fbank, utterance_cmvn
from models.interface import (SAMPLE_RATE, BeamOptions, EncoderOutput, EncoderScorer, Hypothesis, InputScorer,
                              ModelError, SpeechModel)


def _autocast(dtype: torch.dtype, device: torch.device):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device.type == "cpu":
        raise ModelError("float16 is not supported on CPU; use bfloat16 or float32")
    return torch.autocast(device_type=device.type, dtype=dtype)


class FBKConformerModel(SpeechModel):
    family = "fbk_conformer"
    subsampling = 4
    frame_shift_s = 0.01

    def __init__(self, model: ConformerModel, dictionary: Dictionary, spm: Optional[SentencePiece],
                 data_cfg: DataConfig, name: str = "fbk_conformer", device: str | torch.device = "cpu",
                 beam_options: Optional[BeamOptions] = None):
        self.net = model.eval()
        self.cfg = model.cfg
        self.dict = dictionary
        self.spm = spm
        self.data_cfg = data_cfg
        self.name = name
        self.device = torch.device(device)
        self.net.to(self.device)
        self.eos, self.pad, self.unk = dictionary.eos, dictionary.pad, dictionary.unk
        # T' <= 10000 relative positions; fairseq filters inputs longer than max_source_positions frames.
        self.max_input_frames = min(self.cfg.max_source_positions, 4 * 10000)
        self._beam_options = beam_options
        self._special = {i for i, s in enumerate(dictionary.symbols)
                         if i < 4 or s == CTC_BLANK or (s.startswith("<lang:") and s.endswith(">"))}

    # ---- facts -------------------------------------------------------------------------------
    @property
    def bos(self) -> int:
        return self.eos          # fairseq starts decoding with </s>

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def decoder_layers(self) -> int:
        return self.cfg.decoder_layers

    @property
    def decoder_heads(self) -> int:
        return self.cfg.decoder_heads

    def default_beam_options(self) -> BeamOptions:
        if self._beam_options is not None:
            return self._beam_options
        # FAMA's generation command bans <unk> with --unkpen 10000; the base recipe uses 0.
        return BeamOptions(unk_penalty=10000.0 if self.data_cfg.prepend_tgt_lang_tag else 0.0)

    # ---- text ---------------------------------------------------------------------------------
    def forced_prefix(self, lang: Optional[str] = None, task: str = "transcribe", src_lang: Optional[str] = None) -> list[int]:
        if not self.data_cfg.prepend_tgt_lang_tag:
            return []
        code = lang or src_lang
        if not code:
            raise ModelError(f"{self.name} is multilingual (prepend_tgt_lang_tag): give the output language")
        tag = lang_tag(code)
        if tag not in self.dict.indices:
            langs = sorted(s[6:-1] for s in self.dict.symbols if s.startswith("<lang:"))
            raise ModelError(f"{self.name}: language {code!r} has no tag {tag} in the dictionary (known: {langs})")
        return [self.dict.indices[tag]]

    def id_to_piece(self, token_id: int) -> str:
        return self.dict[int(token_id)]

    def decode_text(self, token_ids: Sequence[int]) -> str:
        pieces = [self.dict[int(t)] for t in token_ids if int(t) not in self._special]
        return SentencePiece.decode(pieces)

    def hypothesis_from_text(self, text: str, prefix: Sequence[int]) -> Hypothesis:
        if self.spm is None:
            raise ModelError(f"{self.name}: no SentencePiece model loaded, cannot tokenise text")
        ids = list(prefix) + [self.dict.index(p) for p in self.spm.encode(text)] + [self.eos]
        return self.make_hypothesis(ids, len(prefix))

    # ---- computation --------------------------------------------------------------------------
    def features(self, waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        if sample_rate != SAMPLE_RATE:
            raise ModelError(f"{self.name} expects {SAMPLE_RATE} Hz audio, got {sample_rate} Hz (resample first)")
        feats = kaldi_fbank(torch.as_tensor(waveform), sample_rate, self.data_cfg.input_feat_per_channel)
        return utterance_cmvn(feats) if self.data_cfg.utterance_cmvn else feats

    def _check_frames(self, n: int) -> None:
        if n > self.max_input_frames:
            raise ModelError(f"{self.name}: input of {n} frames exceeds max_source_positions={self.max_input_frames}")

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        self._check_frames(int(lengths.max()))
        out = self.net.encode(features.to(self.device, torch.float32), lengths.to(self.device))
        return EncoderOutput(out["states"], out["lengths"])

    def _enc_pad(self, enc: EncoderOutput) -> Optional[torch.Tensor]:
        pad = enc.padding_mask
        return pad if bool(pad.any()) else None

    def _decoder_input(self, hyp: Hypothesis, batch: int) -> torch.Tensor:
        return torch.tensor(hyp.decoder_input, dtype=torch.long, device=self.device)[None].expand(batch, -1)

    def teacher_forced_log_probs(self, enc: EncoderOutput, hyp: Hypothesis) -> torch.Tensor:
        dec = self.net.decoder
        logits, _ = dec(self._decoder_input(hyp, enc.states.shape[0]), dec.cross_kv(enc.states), self._enc_pad(enc))
        return torch.log_softmax(logits.float(), dim=-1)

    def cross_attention(self, features: torch.Tensor, hyp: Hypothesis) -> torch.Tensor:
        with torch.inference_mode():
            feats = features.to(self.device, torch.float32)[None]
            enc = self.encode(feats, torch.tensor([feats.shape[1]], device=self.device))
            dec = self.net.decoder
            _, probs = dec(self._decoder_input(hyp, 1), dec.cross_kv(enc.states), None, need_probs=True)
        return torch.stack([p[0] for p in probs]).float()          # L, H, I, T'

    def input_scorer(self, hyp: Hypothesis, n_frames: int, dtype: torch.dtype = torch.float32) -> InputScorer:
        self._check_frames(n_frames)
        net, device = self.net, self.device

        def score(features: torch.Tensor) -> torch.Tensor:
            if features.shape[1] != n_frames:
                raise ModelError(f"input_scorer built for {n_frames} frames, got {features.shape[1]}")
            B = features.shape[0]
            with torch.inference_mode(), _autocast(dtype, device):
                lengths = torch.full((B,), n_frames, dtype=torch.long, device=device)
                states = net.encode(features.to(device, torch.float32), lengths)["states"]
                logits, _ = net.decoder(self._decoder_input(hyp, B), net.decoder.cross_kv(states), None)
            return torch.log_softmax(logits.float(), dim=-1)
        return score

    def encoder_scorer(self, states: torch.Tensor, hyp: Hypothesis, dtype: torch.dtype = torch.float32) -> EncoderScorer:
        """K/V of H are projected once per layer; a zeroed state's key/value is the projection bias."""
        dec, device = self.net.decoder, self.device
        with torch.inference_mode():
            h = states.to(device, torch.float32)[None]                                 # 1, T', D
            full, bias = [], []
            for layer in dec.layers:
                att = layer.encoder_attn
                k, v = att.project_kv(h)                                               # 1, H, T', dh
                kb = att.split(att.k_proj.bias.view(1, 1, -1))                         # 1, H, 1, dh
                vb = att.split(att.v_proj.bias.view(1, 1, -1))
                full.append((k, v))
                bias.append((kb, vb))
            with _autocast(dtype, device):
                first_self = dec.layers[0].self_block(dec.embed(self._decoder_input(hyp, 1)))   # encoder-independent
        T = states.shape[0]

        def score(keep: torch.Tensor) -> torch.Tensor:
            if keep.shape[-1] != T:
                raise ModelError(f"encoder_scorer built for {T} encoder steps, got a mask of {keep.shape[-1]}")
            B = keep.shape[0]
            m = keep.to(device, torch.bool)[:, None, :, None]                          # B, 1, T', 1
            with torch.inference_mode(), _autocast(dtype, device):
                cross = [(torch.where(m, k, kb), torch.where(m, v, vb)) for (k, v), (kb, vb) in zip(full, bias)]
                logits, _ = dec(None, cross, None, first_self=first_self.expand(B, -1, -1))
            return torch.log_softmax(logits.float(), dim=-1)
        return score

    # ---- incremental decoding (beam search) ---------------------------------------------------
    def init_decoder_state(self, enc: EncoderOutput) -> dict:
        return {"cross": self.net.decoder.cross_kv(enc.states), "pad": self._enc_pad(enc),
                "caches": [{} for _ in range(self.cfg.decoder_layers)], "steps": 0}

    def decoder_step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        start = state["steps"]
        new = tokens[:, start:].to(self.device)
        logits, _ = self.net.decoder(new, state["cross"], state["pad"], caches=state["caches"], start=start)
        state["steps"] = tokens.shape[1]
        return torch.log_softmax(logits[:, -1].float(), dim=-1), state

    def reorder_decoder_state(self, state: dict, index: torch.Tensor) -> dict:
        index = index.to(self.device)
        state["cross"] = [(k.index_select(0, index), v.index_select(0, index)) for k, v in state["cross"]]
        if state["pad"] is not None:
            state["pad"] = state["pad"].index_select(0, index)
        state["caches"] = [{n: t.index_select(0, index) for n, t in c.items()} for c in state["caches"]]
        return state


# ---------------------------------------------------------------------------------------------

def _find_config(checkpoint: Path) -> Optional[Path]:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    p = folder / "config.yaml"
    return p if p.is_file() else None


def load_fbk_model(path: str | Path, spm: str | Path | None = None, dict: str | Path | None = None,
                   config_yaml: str | Path | None = None, device: str = "cpu") -> FBKConformerModel:
    """A FBK-fairseq checkpoint (.pt) or HF-format FAMA folder -> FBKConformerModel.

    The dictionary and SentencePiece model come from `dict`/`spm` when given, else from config.yaml
    (`vocab_filename`, `bpe_tokenizer.sentencepiece_model`, relative to the yaml's folder). Without
    `config_yaml`, a config.yaml beside the checkpoint is used if present.
    """
    from models.conformer.checkpoint import load_conformer, load_hf_fama
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    config_path = Path(config_yaml) if config_yaml else _find_config(path)
    data_cfg = DataConfig.load(config_path) if config_path else DataConfig()
    dict_path = Path(dict) if dict else data_cfg.vocab_filename
    spm_path = Path(spm) if spm else data_cfg.spm_model
    if dict_path is None:
        raise ModelError(f"{path}: no dictionary; pass dict=... or a config.yaml with vocab_filename")
    dictionary = Dictionary.load(dict_path)
    if path.is_dir():
        model, _, unmapped = load_hf_fama(path)
        if unmapped:
            print(f"[xs2t] {path}: ignored {len(unmapped)} unmapped weights: {unmapped[:10]}")
    else:
        model, _ = load_conformer(path)
    if model.cfg.joint_ctc and CTC_BLANK not in dictionary.indices:
        dictionary.add_symbol(CTC_BLANK)     # the joint-CTC builder appends it to the target dictionary
    if len(dictionary) != model.cfg.vocab_size:
        raise ModelError(f"{dict_path}: dictionary has {len(dictionary)} entries but {path} has an output "
                         f"vocabulary of {model.cfg.vocab_size}")
    sp = SentencePiece(spm_path) if spm_path else None
    wrapped = FBKConformerModel(model, dictionary, sp, data_cfg, name=path.stem, device=device)
    wrapped.checkpoint_path = str(path)
    return wrapped
