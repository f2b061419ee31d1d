"""Whisper's byte-level BPE tokenizer (a Hugging Face `tokenizers` file) and its special tokens."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from tokenizers import Tokenizer

from models.interface import ModelError


class WhisperTokenizer:
    def __init__(self, path: str | Path, n_vocab: int):
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: tokenizer.json not found (Whisper needs its tokenizer file next to the weights)")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise ModelError(f"{path}: not a readable tokenizers file ({err})") from err
        self.path = path
        self.n_vocab = n_vocab

        def special(*names: str) -> Optional[int]:
            for name in names:
                i = self.tok.token_to_id(name)
                if i is not None:
                    return i
            return None

        self.eot = special("<|endoftext|>")
        self.sot = special("<|startoftranscript|>")
        self.transcribe = special("<|transcribe|>")
        self.translate = special("<|translate|>")
        self.sot_lm = special("<|startoflm|>")
        self.sot_prev = special("<|startofprev|>")
        self.no_speech = special("<|nospeech|>", "<|nocaptions|>")
        self.no_timestamps = special("<|notimestamps|>")
        if None in (self.eot, self.sot, self.no_timestamps):
            raise ModelError(f"{path}: missing Whisper special tokens (<|endoftext|>, <|startoftranscript|>, <|notimestamps|>)")
        # Timestamp tokens follow <|notimestamps|>; some tokenizer files do not list them.
        self.timestamp_begin = self.no_timestamps + 1
        # Language tokens sit between <|startoftranscript|> and <|translate|> (absent in English-only models).
        self.lang_to_id: dict[str, int] = {}
        if self.translate is not None:
            for i in range(self.sot + 1, self.translate):
                piece = self.tok.id_to_token(i)
                if piece and piece.startswith("<|") and piece.endswith("|>"):
                    self.lang_to_id[piece[2:-2]] = i
        # English-only checkpoints share the vocabulary layout minus one token and never use the
        # language/task tokens (openai-whisper tells them apart by vocabulary size the same way).
        self.multilingual = bool(self.lang_to_id) and n_vocab >= 51865
        if not self.multilingual:
            self.lang_to_id = {}
        self.special_ids = {i for i in (self.eot, self.sot, self.transcribe, self.translate, self.sot_lm, self.sot_prev,
                                        self.no_speech, self.no_timestamps) if i is not None} | set(self.lang_to_id.values())

    def language_token(self, lang: str) -> int:
        if lang not in self.lang_to_id:
            raise ModelError(f"language {lang!r} is not supported by this Whisper model ({self.path})")
        return self.lang_to_id[lang]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids or token_id >= self.timestamp_begin

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tok.id_to_token(int(token_id))
        if piece is None and token_id >= self.timestamp_begin:
            return f"<|{(token_id - self.timestamp_begin) * 0.02:.2f}|>"
        return piece if piece is not None else f"<|id{token_id}|>"

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of the content tokens; special and timestamp tokens are dropped."""
        return self.tok.decode([int(t) for t in token_ids if not self.is_special(int(t))], skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as Whisper emits it (a leading space before the first word)."""
        text = text.strip()
        return self.tok.encode(" " + text if text else "", add_special_tokens=False).ids
