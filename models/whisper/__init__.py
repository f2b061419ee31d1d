"""Whisper (OpenAI) encoder-decoder models: our own PyTorch implementation, loaders for the
CTranslate2, Hugging Face and openai-whisper formats, and the `SpeechModel` adapter."""
from pathlib import Path
from typing import Optional

from models.whisper.adapter import WhisperModel
from models.whisper.loaders import WhisperCheckpoint, detect_format, load_checkpoint
from models.whisper.model import Whisper, WhisperDims


def load_whisper(path: str | Path, device: str = "cpu", name: Optional[str] = None,
                 tokenizer: Optional[str | Path] = None, memory_budget_mb: Optional[int] = None) -> WhisperModel:
    """A Whisper model from a CTranslate2 folder, a Hugging Face folder or an openai `.pt`."""
    return WhisperModel(load_checkpoint(path, tokenizer), device=device, name=name, memory_budget_mb=memory_budget_mb)


__all__ = ["WhisperModel", "WhisperCheckpoint", "Whisper", "WhisperDims", "detect_format", "load_checkpoint", "load_whisper"]
