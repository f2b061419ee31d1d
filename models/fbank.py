"""Kaldi-compatible 80-bin log-mel filterbank (fairseq S2T defaults) and utterance CMVN, in torch.

Kaldi defaults as used by FBK-fairseq (model_reference.md §6): waveform scaled to the int16 range,
25 ms frames every 10 ms, snip edges, no dither, per-frame DC removal, pre-emphasis 0.97, Povey
window, 512-point FFT power spectrum, triangular filters on the Kaldi mel scale from 20 Hz to
Nyquist, log with a floor of float32 epsilon.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from models.interface import ModelError

LOG_FLOOR = 1.1920928955078125e-07   # float32 epsilon


def _mel(f):
    return 1127.0 * math.log(1.0 + f / 700.0)


@lru_cache(maxsize=8)
def kaldi_mel_filters(num_bins: int, n_fft: int, sample_rate: int, low: float = 20.0, high: float = 0.0) -> torch.Tensor:
    """[num_bins, n_fft // 2 + 1] triangular weights; the Nyquist column stays 0 as in Kaldi."""
    nyquist = 0.5 * sample_rate
    if high <= 0.0:
        high += nyquist
    mel_low, mel_high = _mel(low), _mel(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    n_half = n_fft // 2
    freqs = torch.arange(n_half, dtype=torch.float64) * (sample_rate / n_fft)
    mel = 1127.0 * torch.log1p(freqs / 700.0)
    left = mel_low + torch.arange(num_bins, dtype=torch.float64)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.cat([weights, torch.zeros(num_bins, 1, dtype=torch.float64)], dim=1).float()


@lru_cache(maxsize=4)
def povey_window(length: int) -> torch.Tensor:
    # float32 like the reference: low mel bins of loud frames are cancellation-dominated, and a
    # float64 window moves them by up to 4e-3 in log energy.
    return torch.hann_window(length, periodic=False, dtype=torch.float32).pow(0.85)


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int = 16000, num_mel_bins: int = 80) -> torch.Tensor:
    """waveform [N] float in [-1, 1] (mono) -> log-mel [T, num_mel_bins] float32."""
    wave = torch.as_tensor(waveform, dtype=torch.float32)
    if wave.dim() == 2:                       # [C, N] -> mono
        wave = wave.mean(0)
    wave = wave * 32768.0
    frame_len = int(sample_rate * 0.025)
    shift = int(sample_rate * 0.010)
    if wave.numel() < frame_len:
        raise ModelError(f"audio too short for fbank: {wave.numel()} samples < one {frame_len}-sample frame")
    n_fft = 1 << (frame_len - 1).bit_length()
    n_frames = 1 + (wave.numel() - frame_len) // shift
    frames = wave.as_strided((n_frames, frame_len), (shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)                       # DC removal
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * prev                                            # pre-emphasis
    frames = frames * povey_window(frame_len)
    spectrum = torch.fft.rfft(frames, n=n_fft).abs().pow(2.0)
    energies = spectrum @ kaldi_mel_filters(num_mel_bins, n_fft, sample_rate).T
    return torch.clamp(energies, min=LOG_FLOOR).log()


def utterance_cmvn(features: torch.Tensor) -> torch.Tensor:
    """Per-bin mean/variance normalisation over the frames of one utterance (fairseq utterance_cmvn)."""
    x = features.double()
    mean = x.mean(dim=0)
    var = (x * x).mean(dim=0) - mean * mean
    std = torch.sqrt(torch.clamp(var, min=1e-10))
    return ((x - mean) / std).float()
