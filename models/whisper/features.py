"""Whisper's log-mel input, computed in torch.

Whisper's recipe: append 30 s of zeros to the waveform, STFT (n_fft 400, hop 160, periodic Hann
window, centred with reflect padding, last frame dropped), power spectrum, Slaney mel filterbank,
log10 clamped at 1e-10, dynamic range limited to (max - 8) with the max taken over the whole padded
spectrogram, then (x + 4) / 4; the model sees the first 3000 frames.

`log_mel` returns those 3000 frames; the project's features are only the first T = n // 160 of them
(the real frames). `padding_frames` is the rest, which the Whisper adapter puts back before the
encoder so that encoding the real frames equals encoding Whisper's own 3000-frame input.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE     # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH          # 3000


def hz_to_mel(f: Tensor) -> Tensor:
    """Slaney mel scale: linear (3 bins per 200 Hz) below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = f / f_sp
    return torch.where(f >= min_log_hz, min_log_mel + torch.log(torch.clamp(f, min=1e-10) / min_log_hz) / logstep, linear)


def mel_to_hz(m: Tensor) -> Tensor:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """[n_mels, n_fft//2 + 1] triangular filters on the Slaney scale, area-normalised (Slaney
    norm: each triangle scaled by 2 / its width in Hz). Computed in float64, returned float32."""
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = hz_to_mel(torch.tensor(0.0, dtype=torch.float64)), hz_to_mel(torch.tensor(sample_rate / 2, dtype=torch.float64))
    edges = mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64))
    widths = edges[1:] - edges[:-1]
    offsets = edges[:, None] - fft_freqs[None, :]             # [n_mels+2, n_bins]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.float()


@lru_cache(maxsize=2)
def _hann(n_fft: int) -> Tensor:
    return torch.hann_window(n_fft, periodic=True)


def log_mel(waveform: Tensor, n_mels: int = 80) -> Tensor:
    """Whisper's normalised log-mel [n_mels, 3000] of a mono 16 kHz waveform (<= 30 s)."""
    audio = torch.nn.functional.pad(waveform.float().reshape(-1), (0, N_SAMPLES))
    spec = torch.stft(audio, N_FFT, HOP_LENGTH, window=_hann(N_FFT).to(audio.device), center=True,
                      pad_mode="reflect", return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = mel_filters(n_mels).to(audio.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)   # max over the whole padded spectrogram
    return ((log_spec + 4.0) / 4.0)[:, :N_FRAMES]


def real_frames(n_samples: int) -> int:
    """Number of frames that start inside the audio (Whisper's content frames)."""
    return n_samples // HOP_LENGTH


def padding_fill(real: Tensor) -> float:
    """The value Whisper gives to frames of pure zero audio, recovered from the real frames alone:
    log10(1e-10) = -10 clamped at (max - 8) then (x + 4) / 4. Exact whenever the spectrogram's
    maximum lies in a real frame (it always does for audible speech); frames at the border that
    still see a few tail samples differ from it, which is why the adapter stores the true block."""
    top = float(real.max()) * 4.0 - 4.0            # the log10 maximum
    return (max(-10.0, top - 8.0) + 4.0) / 4.0
