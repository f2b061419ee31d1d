"""Audio decoding with PyAV: any container/codec FFmpeg knows (wav, flac, mp3, m4a/AAC, ...),
downmixed to mono and resampled to 16 kHz float32."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from models.interface import SAMPLE_RATE, ModelError


class AudioError(ModelError):
    """Audio that cannot be used: missing, unreadable, empty or too short."""


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, start: Optional[float] = None,
               end: Optional[float] = None) -> np.ndarray:
    """Decode `path` to mono float32 in [-1, 1] at `sample_rate`; optionally cut [start, end) seconds."""
    import av  # imported lazily: PyAV pulls FFmpeg libraries

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: audio file not found")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: audio file is empty (0 bytes)")
    chunks: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioError(f"{path}: no audio stream in file")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except AudioError:
        raise
    except Exception as exc:  # PyAV raises many error types for corrupt input
        raise AudioError(f"{path}: cannot decode audio ({type(exc).__name__}: {exc})") from None
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if start is not None or end is not None:
        total = len(wave) / sample_rate
        s = 0.0 if start is None else float(start)
        e = total if end is None else float(end)
        if s < 0 or e <= s:
            raise AudioError(f"{path}: invalid segment [{s:.3f}, {e:.3f}) s")
        # AAC decoders may add a few hundred samples of priming/padding; allow that much slack.
        if s >= total or e > total + 0.05:
            raise AudioError(f"{path}: segment [{s:.3f}, {e:.3f}) s lies outside the audio ({total:.3f} s)")
        wave = wave[int(round(s * sample_rate)): int(round(e * sample_rate))]
    if wave.size == 0:
        raise AudioError(f"{path}: no audio samples decoded")
    return wave


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float32 audio as 16-bit PCM wav (tests, demo clips)."""
    import wave as wavmod

    pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2")
    with wavmod.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def write_m4a(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE, bitrate: int = 64000) -> None:
    """Encode mono float32 audio as AAC in an MP4 container (EuroParl-ST ships m4a)."""
    import fractions

    import av

    with av.open(os.fspath(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=sample_rate, layout="mono")
        stream.bit_rate = bitrate
        frame = av.AudioFrame.from_ndarray(np.asarray(wave, np.float32)[None, :], format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        # Timestamps let the muxer write the encoder's priming delay as an edit list, so decoders
        # return the audio on time (without them every sample comes 1024 samples late).
        frame.pts = 0
        frame.time_base = fractions.Fraction(1, sample_rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
