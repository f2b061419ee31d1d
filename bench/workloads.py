"""The benchmark's workloads: a model, one utterance, its fixed hypothesis and reference log-probs.

* whisper-base: real weights, a 5 s espeak-ng utterance (a deterministic synthetic waveform when
  espeak-ng is missing), hypothesis decoded by the model (beam search).
* conformer-base: the paper's base Conformer shapes (12/6 layers, d 512, 8 heads, FFN 2048,
  vocab 8000), random weights, a EuroParl-ST-like 9.6 s utterance (960 frames), 25 tokens.
* fama-small: FAMA-small shapes (d 1024, 16 heads, 12/6 layers, FFN 4096, vocab 16000), random
  weights, same utterance; used for memory planning and a small throughput sample.
* fbk-tiny: the real tiny FBK checkpoint of the shared fixtures (smoke tests).
"""
from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench.flops import FlopBreakdown, conformer_flops, whisper_flops
from models.interface import SAMPLE_RATE, Hypothesis, SpeechModel

WORKLOADS = ("whisper-base", "conformer-base", "fama-small", "fbk-tiny")
SPEECH_TEXT = ("The committee has examined the proposal carefully and we will now vote on the amendments "
               "concerning the protection of workers in the European Union.")


@dataclass
class Workload:
    name: str
    model: SpeechModel
    features: torch.Tensor              # [T, F] real frames
    hyp: Hypothesis
    ref_log_probs: torch.Tensor         # [I, V]
    states: torch.Tensor                # encoder output of the utterance [T', D] (what the SM^H scorer takes)
    valid_steps: int                    # real encoder steps (occluded by SM^H)
    flops_input: FlopBreakdown
    flops_encoder: FlopBreakdown
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.features.shape[0] * self.model.frame_shift_s


def fixtures_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like waveform: a voiced source with a wandering pitch, three moving
    formant-like resonances and syllable-rate amplitude modulation, plus a little noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    wave = sum(np.sin(h * phase) / h * (1 + np.sin(2 * np.pi * (0.5 + 0.3 * h) * t + h)) for h in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    wave = wave * envelope + 0.01 * rng.standard_normal(n)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def speech(seconds: float, text: str = SPEECH_TEXT) -> tuple[np.ndarray, str]:
    """`seconds` of 16 kHz speech: espeak-ng reading `text` (cut or zero-padded), else synthetic."""
    if shutil.which("espeak-ng"):
        from models.audio import load_audio
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "speech.wav"
            done = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "170", "-w", str(path), text],
                                  capture_output=True, timeout=60)
            if done.returncode == 0 and path.is_file():
                wave = load_audio(path)
                n = int(seconds * SAMPLE_RATE)
                wave = np.pad(wave[:n], (0, max(0, n - wave.shape[0])))
                return wave.astype(np.float32), "espeak-ng"
    return synthetic_speech(seconds), "synthetic waveform"


def _reference(model: SpeechModel, features: torch.Tensor, hyp: Hypothesis) -> tuple[torch.Tensor, torch.Tensor, int]:
    with torch.inference_mode():
        n = features.shape[0]
        enc = model.encode(features[None].to(model.device), torch.tensor([n], device=model.device))
        ref = model.teacher_forced_log_probs(enc, hyp)[0].float()
    return ref, enc.states[0], int(enc.lengths[0])


def _finish(name: str, model: SpeechModel, feats: torch.Tensor, hyp: Hypothesis, flops, notes) -> Workload:
    ref, states, valid = _reference(model, feats, hyp)
    return Workload(name, model, feats, hyp, ref, states, valid, flops[0], flops[1], notes)


def random_conformer(d_model: int, heads: int, enc_layers: int, dec_layers: int, ffn: int, vocab: int,
                     device: torch.device, seed: int = 0):
    """An FBK Conformer of the given shapes with random (seeded) weights behind `SpeechModel`."""
    from models.conformer import ConformerConfig, ConformerModel, FBKConformerModel
    from models.conformer.text import DataConfig, Dictionary

    torch.manual_seed(seed)
    cfg = ConformerConfig(d_model=d_model, encoder_layers=enc_layers, encoder_heads=heads, ffn_expansion=ffn // d_model,
                          decoder_layers=dec_layers, decoder_heads=heads, decoder_ffn=ffn, vocab_size=vocab,
                          conv_channels=1024)
    net = ConformerModel(cfg)
    for module in net.modules():                     # BatchNorm with unit statistics, like a trained one at rest
        if isinstance(module, torch.nn.BatchNorm1d):
            module.reset_running_stats()
    dictionary = Dictionary()
    while len(dictionary) < vocab:
        dictionary.add_symbol(f"\u2581w{len(dictionary)}")
    return FBKConformerModel(net, dictionary, None, DataConfig(), name=f"conformer-d{d_model}", device=device)


def conformer_workload(name: str, device: torch.device, seconds: float = 9.6, n_tokens: int = 25) -> Workload:
    shapes = {"conformer-base": (512, 8, 12, 6, 2048, 8000), "fama-small": (1024, 16, 12, 6, 4096, 16000)}[name]
    model = random_conformer(*shapes, device=device)
    wave, source = speech(seconds)
    feats = model.features(torch.from_numpy(wave)).to(device)
    gen = torch.Generator().manual_seed(1)
    content = (torch.randint(4, model.vocab_size, (n_tokens - 1,), generator=gen)).tolist()
    hyp = model.make_hypothesis(content + [model.eos], 0)
    notes = [f"random weights, paper shapes {shapes}", f"{seconds:g} s {source}, {feats.shape[0]} frames",
             f"hypothesis: {n_tokens} random tokens (teacher-forced)"]
    return _finish(name, model, feats, hyp, conformer_flops(model.cfg, feats.shape[0], hyp.num_tokens), notes)


def fbk_tiny_workload(device: torch.device) -> Workload:
    from models.audio import load_audio
    from models.conformer import load_fbk_model

    root = fixtures_dir() / "fbk_tiny"
    model = load_fbk_model(root / "checkpoint.pt", config_yaml=root / "config.yaml", device=str(device))
    feats = model.features(torch.from_numpy(load_audio(root / "wav" / "test_0.wav"))).to(device)
    hyp = model.generate([feats], [[]])[0]
    notes = ["real fixture checkpoint (3/2 layers, d 128, vocab 200)", f"{feats.shape[0]} frames, beam hypothesis"]
    return _finish("fbk-tiny", model, feats, hyp, conformer_flops(model.cfg, feats.shape[0], hyp.num_tokens), notes)


def whisper_workload(device: torch.device, seconds: float = 5.0) -> Workload:
    from models.registry import load_model

    model = load_model("whisper-base", device=str(device))
    wave, source = speech(seconds)
    feats = model.features(torch.from_numpy(wave))
    prefix = model.forced_prefix(lang="en", task="transcribe", src_lang="en")
    hyp = model.generate([feats], [prefix])[0]
    how = "beam hypothesis"
    if hyp.num_tokens - hyp.prefix_len < 8:         # a degenerate decode: teach-force a realistic one instead
        hyp = model.hypothesis_from_text("The committee has examined the proposal carefully.", prefix)
        how = "fixed text hypothesis"
    notes = [f"{seconds:g} s {source}; {how}: {hyp.text!r} ({hyp.num_tokens} tokens)",
             "encoder runs on Whisper's full 30 s window (1500 states) for every mask"]
    return _finish("whisper-base", model, feats, hyp, whisper_flops(model.dims, hyp.num_tokens), notes)


def build(name: str, device: torch.device) -> Workload:
    if name == "whisper-base":
        return whisper_workload(device)
    if name in ("conformer-base", "fama-small"):
        return conformer_workload(name, device)
    if name == "fbk-tiny":
        return fbk_tiny_workload(device)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def input_scorer(w: Workload, dtype: torch.dtype):
    n = w.features.shape[0]
    if w.model.family == "whisper":              # the padding block behind the perturbed frames is the utterance's
        return w.model.input_scorer(w.hyp, n, dtype, features=w.features)
    return w.model.input_scorer(w.hyp, n, dtype)


def paper_workload_hours(masks_per_s: float, n_masks: int = 20000, segments: int = 1130,
                         per_segment_s: float = 0.0) -> float:
    """Hours for the paper's test set (1,130 segments, ~3 h of audio, mean ~9.6 s) at this rate."""
    if not masks_per_s or math.isnan(masks_per_s):
        return float("nan")
    return segments * (n_masks / masks_per_s + per_segment_s) / 3600.0
