"""`xs2t explain --model whisper-base` on a sentence synthesised word by word: each word's saliency
peaks inside the time the word is spoken (real weights, real audio, real Parquet).

SM^X needs on the order of a thousand masks before single-word maps rise above the estimator's noise
(at 96 or 256 masks the peaks are still random): this is the suite's slowest test (~10 min on two
cores, one Whisper encoder pass over 30 s per mask)."""
from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.make_corpus import Espeak, speak_words
from models.audio import write_wav

pytestmark = pytest.mark.timeout(2700)  # one whisper-base SM^X run of 1,500 masks (~11 min on two idle cores)

SENTENCE = "Parliament approved the fisheries budget yesterday"
LEAD_S = 0.4        # silence before the first word
TOLERANCE_S = 0.08  # a peak may sit this far outside the word (window edges, coarticulation)


def _norm(word: str) -> str:
    return re.sub(r"[^\w']", "", word).lower()


def _word_rows(tokens: list[str], prefix_len: int) -> list[tuple[str, list[int]]]:
    """Group Whisper content-token rows into words ('Ġ' starts a word); the end token is dropped."""
    words: list[tuple[str, list[int]]] = []
    for i in range(prefix_len, len(tokens) - 1):
        piece = tokens[i]
        if piece.startswith("Ġ") or not words:
            words.append((piece.lstrip("Ġ"), [i]))
        else:
            words[-1] = (words[-1][0] + piece, words[-1][1] + [i])
    return [(_norm(w), rows) for w, rows in words if _norm(w)]


def _zscore_rows(m: np.ndarray) -> np.ndarray:
    sd = m.std(axis=1, keepdims=True)
    return np.where(sd > 0, (m - m.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1), 0.0)


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    tts = Espeak()
    tts.set_voice("en-us", rate=150)
    wave, words = speak_words(tts, SENTENCE)
    silence = np.zeros(int(LEAD_S * 16000), np.float32)
    write_wav(tmp / "sentence.wav", np.concatenate([silence, wave, silence]))
    timings = [(_norm(w["word"]), w["start"] + LEAD_S, w["end"] + LEAD_S) for w in words]
    out = tmp / "out"
    result = CliRunner().invoke(app, ["explain", "--model", "whisper-base", str(tmp / "sentence.wav"), "--out", str(out),
                                      "--lang", "en", "--n-input", "1500", "--n-encoder", "512", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    tables = {name: pq.read_table(out / f"{name}.parquet").to_pylist()
              for name in ("segments", "saliency_input", "saliency_encoder", "correlations")}
    return tables, timings


def test_explain_writes_every_table(explained):
    tables, timings = explained
    (seg,) = tables["segments"]
    assert seg["status"] == "ok"
    hyp_words = [_norm(w) for w in seg["hypothesis"].split()]
    spoken = [_norm(w) for w in SENTENCE.split()]
    assert len(hyp_words) == len(spoken) and sum(h == r for h, r in zip(hyp_words, spoken)) >= len(spoken) - 1, hyp_words
    n_tokens = len(seg["hyp_token_ids"])
    assert len(tables["saliency_input"]) == n_tokens == len(tables["saliency_encoder"])
    assert {r["target"] for r in tables["correlations"]} == {"input", "encoder"}
    assert seg["n_masks_input"] == 1500 and seg["n_masks_encoder"] == 512
    assert seg["model_checksum"] and seg["torch_version"] and seg["skimage_version"]


@pytest.mark.parametrize("target", ["input", "encoder"])
def test_each_word_peaks_inside_its_spoken_time(explained, target):
    tables, timings = explained
    (seg,) = tables["segments"]
    if target == "input":
        rows = sorted(tables["saliency_input"], key=lambda r: r["token_index"])
        maps = np.stack([np.asarray(r["values"]).reshape(r["n_frames"], r["n_bins"]).max(1) for r in rows])
        seconds_per_column = 0.01
    else:
        rows = sorted(tables["saliency_encoder"], key=lambda r: r["token_index"])
        maps = np.stack([np.asarray(r["values"]) for r in rows])
        seconds_per_column = 0.02
    maps = _zscore_rows(maps)
    words = _word_rows(seg["hyp_tokens"], seg["prefix_len"])
    assert len(words) == len(timings)  # one hypothesis word per spoken word (checked above), in order
    misses = []
    for (word, token_rows), (_, start, end) in zip(words, timings):
        peak = float(np.argmax(maps[token_rows].mean(0))) * seconds_per_column
        if not start - TOLERANCE_S <= peak <= end + TOLERANCE_S:
            misses.append(f"{word}: peak {peak:.2f}s outside [{start:.2f}, {end:.2f}]")
    # All but one word must peak inside its own time. SM^H: encoder states mix context (the paper's
    # point), so a token may peak on a neighbour's states ('approved' inside 'Parliament' was seen).
    # SM^X at 1,500 masks is near its noise floor for single words: across runs with different thread
    # counts (bf16 sums differ in the last bits) 6/6, 6/6 and 5/6 words hit ('fisheries' once
    # peaked inside 'budget').
    assert len(misses) <= 1, misses
