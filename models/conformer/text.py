"""fairseq Dictionary, SentencePiece wrapper and the config.yaml fields that matter at inference."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from models.interface import ModelError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
CTC_BLANK = "<ctc_blank>"


class Dictionary:
    """fairseq layout: <s>=0, <pad>=1, </s>=2, <unk>=3, then the dict txt lines in file order."""

    bos, pad, eos, unk = 0, 1, 2, 3

    def __init__(self):
        self.symbols: list[str] = []
        self.indices: dict[str, int] = {}
        for s in SPECIALS:
            self.add_symbol(s)

    def add_symbol(self, symbol: str, overwrite: bool = False) -> int:
        if symbol in self.indices and not overwrite:
            return self.indices[symbol]
        self.indices[symbol] = len(self.symbols)
        self.symbols.append(symbol)
        return self.indices[symbol]

    @classmethod
    def load(cls, path: str | Path) -> "Dictionary":
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"dictionary file not found: {path}")
        d = cls()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.rstrip()
            if not line:
                continue
            overwrite = line.endswith(" #fairseq:overwrite")
            if overwrite:
                line = line[: -len(" #fairseq:overwrite")]
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ModelError(f"{path}:{n}: expected '<token> <count>', got {line!r}")
            symbol = parts[0]
            if symbol in d.indices and not overwrite:
                raise ModelError(f"{path}:{n}: duplicate token {symbol!r} (add '#fairseq:overwrite' to allow it)")
            d.add_symbol(symbol, overwrite=overwrite)
        return d

    def __len__(self) -> int:
        return len(self.symbols)

    def index(self, symbol: str) -> int:
        return self.indices.get(symbol, self.unk)

    def __getitem__(self, i: int) -> str:
        return self.symbols[i] if 0 <= i < len(self.symbols) else SPECIALS[3]


class SentencePiece:
    def __init__(self, path: str | Path):
        import sentencepiece as spm
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"SentencePiece model not found: {path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode(self, text: str) -> list[str]:
        return list(self.sp.encode(text, out_type=str))

    @staticmethod
    def decode(pieces: Sequence[str]) -> str:
        return " ".join(pieces).replace(" ", "").replace("\u2581", " ").strip()


@dataclass
class DataConfig:
    """What we need from a fairseq S2T config.yaml; paths resolved relative to the yaml's folder."""

    vocab_filename: Optional[Path] = None
    spm_model: Optional[Path] = None
    prepend_tgt_lang_tag: bool = False
    utterance_cmvn: bool = True
    input_feat_per_channel: int = 80
    raw: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "DataConfig":
        import yaml
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"config.yaml not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ModelError(f"{path}: invalid YAML ({e})") from None
        root = path.parent

        def resolve(p):
            if not p:
                return None
            p = Path(p)
            return p if p.is_absolute() else root / p

        bpe = raw.get("bpe_tokenizer") or raw.get("bpe_tokenizer_src") or {}
        if bpe and bpe.get("bpe", "sentencepiece") != "sentencepiece":
            raise ModelError(f"{path}: only sentencepiece BPE is supported, got {bpe.get('bpe')!r}")
        transforms = raw.get("transforms") or {}
        # Inference split: its own entry is unknown, so '_eval' then '*' (fairseq lookup order).
        eval_tf = transforms.get("_eval", transforms.get("*", [])) if isinstance(transforms, dict) else []
        if "global_cmvn" in (eval_tf or []):
            raise ModelError(f"{path}: global_cmvn transform is not supported (only utterance_cmvn)")
        return cls(vocab_filename=resolve(raw.get("vocab_filename")), spm_model=resolve(bpe.get("sentencepiece_model")),
                   prepend_tgt_lang_tag=bool(raw.get("prepend_tgt_lang_tag", False)),
                   utterance_cmvn="utterance_cmvn" in (eval_tf or []),
                   input_feat_per_channel=int(raw.get("input_feat_per_channel", 80)), raw=raw)


def lang_tag(lang: str) -> str:
    return f"<lang:{lang}>"
