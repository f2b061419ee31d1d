"""Synthesise a small EuroParl-ST-shaped corpus with espeak-ng (demo and tests).

Layout written (EuroParl-ST v1.1):

    <out>/<src>/audios/<talk>.m4a                 one "talk": several sentences with 0.4 s pauses
    <out>/<src>/<tgt>/<split>/segments.lst        "<talk> <start> <end>" in seconds
    <out>/<src>/<tgt>/<split>/segments.<src>      source sentence per line
    <out>/<src>/<tgt>/<split>/segments.<tgt>      translation per line (same file when src == tgt)
    <out>/<src>/<tgt>/<split>/speakers.lst        "<talk> <speaker>"
    <out>/<src>/<tgt>/<split>/words.jsonl         per segment line: word timings relative to its start

Sentences are synthesised word by word through libespeak-ng (ctypes, no process per word) and
joined with short gaps, so every word boundary is known exactly. The AAC encoder's start delay is
measured after writing each talk and added to the times, so the times are exact for
`models.audio.load_audio`.
"""
from __future__ import annotations

import csv
import ctypes
import ctypes.util
import json
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.errors import XS2TError
from models.interface import SAMPLE_RATE

SENTENCES = Path(__file__).resolve().parent / "data" / "parliament_en_it.tsv"
VOICES = {"en": "en-us", "it": "it"}
WORD_GAP_S = 0.06
SENTENCE_GAP_S = 0.4
EDGE_S = 0.3          # silence at the start and end of a talk
MARGIN_S = 0.05       # silence kept around a segment's first and last word
SEGMENTS_PER_TALK = 3


def load_sentences() -> list[dict[str, str]]:
    """The bundled parallel parliamentary sentences: [{"en": ..., "it": ...}, ...]."""
    with open(SENTENCES, encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


# ---- espeak-ng -----------------------------------------------------------------------------------
class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class Espeak:
    """Minimal synchronous libespeak-ng binding: text -> int16 samples at its native rate."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError:
            raise XS2TError("make-corpus needs espeak-ng (libespeak-ng); install it, e.g. apt-get install espeak-ng") from None
        self.sample_rate = self.lib.espeak_Initialize(2, 0, None, 0)  # 2 = AUDIO_OUTPUT_SYNCHRONOUS
        if self.sample_rate <= 0:
            raise XS2TError("espeak-ng failed to initialise (is espeak-ng-data installed?)")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: ctypes must not free it
        self.lib.espeak_SetSynthCallback(self._callback)
        self.voice = None

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        return 0

    def set_voice(self, voice: str, rate: int = 150, pitch: int = 50) -> None:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise XS2TError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(1, rate, 0)   # espeakRATE, words per minute
        self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH, 0..100
        self.voice = voice

    def synth(self, text: str) -> np.ndarray:
        """float32 samples in [-1, 1] at `self.sample_rate`."""
        self._chunks = []
        data = text.encode("utf-8")
        self.lib.espeak_Synth(ctypes.create_string_buffer(data), len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
        self.lib.espeak_Synchronize()
        wave = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return wave.astype(np.float32) / 32768.0


def _trim(wave: np.ndarray, threshold: float = 0.004) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wave) > threshold)
    return wave[loud[0]: loud[-1] + 1] if loud.size else wave[:0]


def _resample(wave: np.ndarray, rate: int) -> np.ndarray:
    from math import gcd
    from scipy.signal import resample_poly

    if rate == SAMPLE_RATE:
        return wave.astype(np.float32)
    g = gcd(SAMPLE_RATE, rate)
    return resample_poly(wave, SAMPLE_RATE // g, rate // g).astype(np.float32)


def speak_words(tts: Espeak, sentence: str) -> tuple[np.ndarray, list[dict]]:
    """Synthesise `sentence` word by word at 16 kHz; returns (wave, [{word, start, end}]) with times
    relative to the start of the returned wave (first sample = first word onset)."""
    gap = np.zeros(int(WORD_GAP_S * SAMPLE_RATE), np.float32)
    pieces, words, pos = [], [], 0
    for word in sentence.split():
        spoken = re.sub(r"^[^\w']+|[^\w']+$", "", word)  # punctuation would add pauses
        if not spoken:
            continue
        audio = _trim(_resample(tts.synth(spoken), tts.sample_rate))
        if audio.size == 0:
            continue
        if pieces:
            pieces.append(gap)
            pos += gap.size
        words.append({"word": spoken, "start": round(pos / SAMPLE_RATE, 4), "end": round((pos + audio.size) / SAMPLE_RATE, 4)})
        pieces.append(audio)
        pos += audio.size
    if not pieces:
        raise XS2TError(f"espeak-ng produced no audio for {sentence!r}")
    wave = np.concatenate(pieces)
    return 0.7 * wave / max(1e-6, float(np.abs(wave).max())), words


def _decode_delay(path: Path, wave: np.ndarray) -> int:
    """Samples by which the decoded m4a lags the written wave (AAC priming without an edit list)."""
    from models.audio import load_audio

    decoded = load_audio(path)
    n = min(len(wave), len(decoded), 4 * SAMPLE_RATE)
    a, b = wave[:n], decoded[: n + 4096]
    size = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    corr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)
    return int(np.argmax(corr[:4096]))  # only non-negative lags up to 4096 samples make sense


# ---- corpus --------------------------------------------------------------------------------------
@dataclass
class _Line:
    talk: str
    start: float
    end: float
    src_text: str
    tgt_text: str
    speaker: str
    words: list[dict]


def make_corpus(out: str | Path, langs: tuple[str, ...] = ("en", "it"), segments: int = 6, seed: int = 0,
                split: str = "test", rate: int = 150) -> dict[str, int]:
    """Write the corpus under `out`; returns {pair: number of segments}. Pairs: every src in
    `langs` with every tgt in `langs` (en-en, en-it, it-it, it-en by default)."""
    out = Path(out)
    unknown = [lang for lang in langs if lang not in VOICES]
    if unknown:
        raise XS2TError(f"make-corpus: unsupported language(s) {unknown}; choose from {sorted(VOICES)}")
    if segments < 1:
        raise XS2TError("make-corpus: --segments must be at least 1")
    from models.audio import write_m4a

    table = load_sentences()
    rng = random.Random(seed)
    tts = Espeak()
    counts: dict[str, int] = {}
    for src in langs:
        order = list(range(len(table)))
        rng.shuffle(order)
        order = [order[i % len(order)] for i in range(segments)]
        lines: list[_Line] = []
        (out / src / "audios").mkdir(parents=True, exist_ok=True)
        for t, first in enumerate(range(0, segments, SEGMENTS_PER_TALK)):
            talk = f"{src}.synth.{seed:03d}.{t + 1:03d}"
            speaker = f"{src}_spk{t % 3 + 1}"
            tts.set_voice(VOICES[src], rate=rate, pitch=40 + 10 * (t % 3))
            parts = [np.zeros(int(EDGE_S * SAMPLE_RATE), np.float32)]
            pos = parts[0].size
            talk_lines = []
            for k in order[first: first + SEGMENTS_PER_TALK]:
                if len(parts) > 1:
                    parts.append(np.zeros(int(SENTENCE_GAP_S * SAMPLE_RATE), np.float32))
                    pos += parts[-1].size
                wave, words = speak_words(tts, table[k][src])
                talk_lines.append((pos, pos + wave.size, k, words))
                parts.append(wave)
                pos += wave.size
            parts.append(np.zeros(int(EDGE_S * SAMPLE_RATE), np.float32))
            audio = np.concatenate(parts)
            path = out / src / "audios" / f"{talk}.m4a"
            write_m4a(path, audio)
            shift = _decode_delay(path, audio) / SAMPLE_RATE
            for begin, end, k, words in talk_lines:
                start = round(begin / SAMPLE_RATE - MARGIN_S + shift, 3)
                stop = round(end / SAMPLE_RATE + MARGIN_S + shift, 3)
                offset = begin / SAMPLE_RATE + shift - start  # first word onset inside the segment
                rel = [{"word": w["word"], "start": round(w["start"] + offset, 4), "end": round(w["end"] + offset, 4)}
                       for w in words]
                lines.append(_Line(talk, start, stop, table[k][src], "", speaker, rel))
        for tgt in langs:
            folder = out / src / tgt / split
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "segments.lst").write_text("".join(f"{x.talk} {x.start:.3f} {x.end:.3f}\n" for x in lines))
            (folder / f"segments.{src}").write_text("".join(x.src_text + "\n" for x in lines), encoding="utf-8")
            if tgt != src:
                by_src = {row[src]: row[tgt] for row in table}
                (folder / f"segments.{tgt}").write_text("".join(by_src[x.src_text] + "\n" for x in lines), encoding="utf-8")
            talks = dict.fromkeys((x.talk, x.speaker) for x in lines)
            (folder / "speakers.lst").write_text("".join(f"{t} {s}\n" for t, s in talks))
            with open(folder / "words.jsonl", "w", encoding="utf-8") as f:
                for i, x in enumerate(lines):
                    f.write(json.dumps({"line": i + 1, "audio_id": x.talk, "words": x.words}, ensure_ascii=False) + "\n")
            counts[f"{src}-{tgt}"] = len(lines)
    return counts


def espeak_version() -> str:
    try:
        return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
