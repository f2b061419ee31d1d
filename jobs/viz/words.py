"""Hypothesis tokens -> words, and the exact word timings of a synthetic corpus (words.jsonl).

Token pieces are stored raw: SentencePiece pieces start a word with '▁'; Whisper's byte-level BPE
pieces with 'Ġ' (the byte 0x20 in GPT-2's byte-to-character table). Word texts are rebuilt from
the bytes, so accented words of a byte-level model read correctly.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from jobs.errors import RunError

WORD_START = ("▁", "Ġ", " ")


def _byte_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes are shifted to code points 256 and up (in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTES = _byte_table()


def _is_sentencepiece(pieces: Sequence[str]) -> bool:
    return any(p.startswith("▁") for p in pieces)


def piece_bytes(piece: str, sentencepiece: bool) -> bytes:
    """UTF-8 bytes a piece stands for ('▁' and 'Ġ' are a space)."""
    if sentencepiece:
        return piece.replace("▁", " ").encode("utf-8")
    if all(ch in _BYTES for ch in piece):
        return bytes(_BYTES[ch] for ch in piece)
    return piece.encode("utf-8")


def piece_labels(pieces: Sequence[str]) -> list[str]:
    """Labels for a figure axis: word starts marked with '▁', byte-level pieces decoded (a
    character split over two pieces shows as '?' on both)."""
    sp = _is_sentencepiece(pieces)
    out = []
    for p in pieces:
        text = piece_bytes(p, sp).decode("utf-8", errors="replace").replace("\ufffd", "?")
        out.append("▁" + text[1:] if text.startswith(" ") else text)
    return out


@dataclass
class Word:
    text: str
    tokens: list[int]   # row indices into the hypothesis (all rows, prefix included)


def group_words(tokens: Sequence[str], rows: slice) -> list[Word]:
    """Group the content rows `rows` of a hypothesis into words: a piece that starts with a space
    marker opens a new word; the first content piece always does."""
    sp = _is_sentencepiece(tokens[rows])
    words: list[Word] = []
    raw: list[bytes] = []
    for i in range(rows.start, rows.stop):
        piece = tokens[i]
        if not words or piece.startswith(WORD_START):
            words.append(Word("", []))
            raw.append(b"")
        words[-1].tokens.append(i)
        raw[-1] += piece_bytes(piece, sp)
    for w, b in zip(words, raw):
        w.text = b.decode("utf-8", errors="replace").strip()
    return [w for w in words if w.text]


def normalise_word(text: str) -> str:
    """Lower case, accents kept, punctuation dropped: what two transcripts must share to match."""
    text = unicodedata.normalize("NFC", text).lower()
    return re.sub(r"[^\w']+", "", text).strip("'")


def match_words(hyp: Sequence[str], ref: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs (hyp index, ref index) of equal normalised words on a minimum-edit alignment."""
    a = [normalise_word(w) for w in hyp]
    b = [normalise_word(w) for w in ref]
    n, m = len(a), len(b)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0] = i
    for j in range(m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j] + 1, cost[i][j - 1] + 1, cost[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1] and cost[i][j] == cost[i - 1][j - 1]:
            if a[i - 1]:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j - 1] + 1:
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


# ---- words.jsonl ---------------------------------------------------------------------------------
class WordTimings:
    """Exact word timings of the segments of a corpus written by `xs2t make-corpus`.

    Layout: <root>/<src>/<tgt>/<split>/words.jsonl, one line per line of segments.lst:
    {"line": n, "audio_id": talk, "words": [{"word", "start", "end"}]}, times in seconds from the
    segment start. A segments row is matched to its line by talk and start time."""

    def __init__(self, corpus_root: Optional[str | Path] = None):
        self.corpus_root = Path(corpus_root) if corpus_root else None
        self._cache: dict[Path, Optional[list[tuple[str, float, list[dict]]]]] = {}

    def folder(self, row: dict) -> Optional[Path]:
        root = self.corpus_root
        if root is None:
            audio = row.get("audio_path")
            if not audio or "://" in str(audio):
                return None
            root = Path(audio).parent.parent.parent    # <root>/<src>/audios/<talk>.m4a
        return root / row["src_lang"] / row["tgt_lang"] / (row.get("split") or "test")

    def _lines(self, folder: Path):
        if folder not in self._cache:
            words, segs = folder / "words.jsonl", folder / "segments.lst"
            lines = None
            if words.is_file() and segs.is_file():
                spans = [ln.split() for ln in segs.read_text().splitlines() if ln.strip()]
                records = [json.loads(ln) for ln in words.read_text(encoding="utf-8").splitlines() if ln.strip()]
                if len(spans) != len(records):
                    raise RunError(f"{words}: {len(records)} lines but segments.lst has {len(spans)}")
                lines = [(s[0], float(s[1]), r["words"]) for s, r in zip(spans, records)]
            self._cache[folder] = lines
        return self._cache[folder]

    def words(self, row: dict) -> Optional[list[dict]]:
        """[{word, start, end}] of the segment of a segments row, or None when unknown."""
        folder = self.folder(row)
        if folder is None:
            return None
        lines = self._lines(folder)
        if not lines:
            return None
        talk = Path(str(row.get("audio_path") or "")).stem
        start = float(row.get("start_s") or 0.0)
        for name, begin, words in lines:
            if name == talk and abs(begin - start) < 2e-3:
                return words
        return None

