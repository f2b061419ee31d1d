"""Corpus readers: EuroParl-ST v1.1, fairseq-S2T TSV manifests and folders of audio files.

Every reader yields `Segment`s. A malformed line does not stop the corpus: it becomes a Segment
with `error` set (naming the file, line and reason), which the driver records as a failed unit.
Problems that make the whole corpus unreadable (missing folder, missing TSV columns) raise
CorpusError.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from jobs.errors import CorpusError
from jobs.units import WorkUnit, safe_name
from models.interface import ModelError

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".aac")
FEATURE_SUFFIXES = (".npy", ".zip", ".npz", ".pt")


@dataclass
class Segment:
    segment_id: str
    corpus: str
    split: str
    src_lang: str
    tgt_lang: str
    audio_path: str
    start_s: Optional[float] = None      # None = from the start of the file
    end_s: Optional[float] = None        # None = to the end of the file
    reference: Optional[str] = None      # target-side text (transcript for ASR, translation for ST)
    source_text: Optional[str] = None
    speaker: Optional[str] = None
    duration_s: Optional[float] = None
    error: Optional[str] = None          # set when the segment cannot be used (names file, line, reason)

    @property
    def pair(self) -> str:
        return f"{self.src_lang}-{self.tgt_lang}"

    @property
    def task(self) -> str:
        return "asr" if self.src_lang == self.tgt_lang else "st"

    def to_dict(self) -> dict:
        return asdict(self)


def sanitise(text: str) -> str:
    """File-name-safe id (the same rule as unit ids, jobs.units.safe_name)."""
    return safe_name(text)


def make_units(model_keys: list[str], segments: list[Segment]) -> list[WorkUnit]:
    """Cross models with segments; the task follows from the segment's pair (src == tgt: asr)."""
    return [WorkUnit.make(k, s) for k in model_keys for s in segments]


# ---- EuroParl-ST ----------------------------------------------------------------------------------
def _read_lines(path: Path) -> Optional[list[str]]:
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def read_europarl(root: str | Path, pair: str, split: str = "test", corpus: Optional[str] = None,
                  max_segments: Optional[int] = None) -> list[Segment]:
    """<root>/<src>/<tgt>/<split>/segments.lst ("audio_id start end", seconds) with segments.<src>,
    segments.<tgt> (one line each) and optional speakers.lst; audio <root>/<src>/audios/<id>.m4a."""
    root = Path(root)
    src, tgt = pair.split("-")
    folder = root / src / tgt / split
    corpus = corpus or root.name
    lst = folder / "segments.lst"
    lines = _read_lines(lst)
    if lines is None:
        raise CorpusError(f"{lst}: not found (EuroParl-ST layout <root>/{src}/{tgt}/{split}/segments.lst)")
    src_lines = _read_lines(folder / f"segments.{src}")
    tgt_lines = _read_lines(folder / f"segments.{tgt}")
    if tgt_lines is None:
        raise CorpusError(f"{folder / f'segments.{tgt}'}: not found (references of pair {pair})")
    speakers = _read_speakers(folder / "speakers.lst", len(lines))
    audio_dir = root / src / "audios"
    audio_ok: dict[str, Optional[str]] = {}
    out: list[Segment] = []
    for n, line in enumerate(lines, start=1):
        if max_segments is not None and len(out) >= max_segments:
            break
        if not line.strip():
            continue
        parts = line.split()
        audio_id = parts[0] if parts else f"line{n}"
        seg = Segment(segment_id=sanitise(f"{pair}.{split}.{audio_id}.{n:04d}"), corpus=corpus, split=split,
                      src_lang=src, tgt_lang=tgt, audio_path=str(audio_dir / f"{audio_id}.m4a"))
        where = f"{lst} line {n}"
        try:
            if len(parts) != 3:
                raise ValueError(f"expected 'audio_id start end', got {line.strip()!r}")
            try:
                start, end = float(parts[1]), float(parts[2])
            except ValueError:
                raise ValueError(f"invalid times start={parts[1]!r} end={parts[2]!r} (not numbers)") from None
            if not (np.isfinite(start) and np.isfinite(end)) or start < 0 or end <= start:
                raise ValueError(f"invalid times start={parts[1]} end={parts[2]} (need 0 <= start < end)")
            seg.start_s, seg.end_s, seg.duration_s = start, end, round(end - start, 6)
        except ValueError as exc:
            seg.error = f"{where}: {exc}"
        if n > len(tgt_lines):
            seg.error = seg.error or f"{where}: segments.{tgt} has only {len(tgt_lines)} lines (no reference)"
        else:
            seg.reference = tgt_lines[n - 1].strip()
        if src_lines is not None and n <= len(src_lines):
            seg.source_text = src_lines[n - 1].strip()
        seg.speaker = speakers.get(n) or speakers.get(audio_id)
        if seg.error is None:
            if audio_id not in audio_ok:
                audio_ok[audio_id] = _audio_problem(seg.audio_path)
            if audio_ok[audio_id]:
                seg.error = f"{where}: {audio_ok[audio_id]}"
        out.append(seg)
    return out


def _read_speakers(path: Path, n_segments: int) -> dict:
    """speakers.lst is either one speaker per segment line or "audio_id speaker ..." per talk."""
    lines = _read_lines(path)
    if not lines:
        return {}
    rows = [ln.split() for ln in lines if ln.strip()]
    if all(len(r) >= 2 for r in rows):
        return {r[0]: r[1] for r in rows}
    if len(lines) == n_segments:
        return {i + 1: ln.strip() for i, ln in enumerate(lines)}
    return {}


def _audio_problem(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return f"audio file {path} not found"
    if os.path.getsize(path) == 0:
        return f"audio file {path} is empty (0 bytes)"
    return None


# ---- fairseq-S2T TSV ------------------------------------------------------------------------------
def _probe(path: str) -> tuple[Optional[float], Optional[int]]:
    """(duration in seconds, sample rate) of an audio file from its header, or (None, None)."""
    try:
        import av
        with av.open(path) as c:
            s = c.streams.audio[0]
            rate = s.rate or s.codec_context.sample_rate
            if s.duration is not None and s.time_base is not None:
                return float(s.duration * s.time_base), rate
            if c.duration is not None:
                return c.duration / 1_000_000, rate
            return None, rate
    except Exception:
        return None, None


def read_tsv(manifest: str | Path, pair: str, audio_root: Optional[str] = None, columns=None,
             corpus: Optional[str] = None, split: str = "test", max_segments: Optional[int] = None) -> list[Segment]:
    """A fairseq-S2T manifest. The audio column is a wav/flac/... path (relative to `audio_root`,
    default the manifest's folder) or "path:offset:length" in samples. Feature files (.npy fbank,
    feature zips) are not audio: such rows get an error."""
    from jobs.spec import TsvColumns

    manifest = Path(manifest)
    cols = columns or TsvColumns()
    if not manifest.is_file():
        raise CorpusError(f"{manifest}: TSV manifest not found")
    base = Path(audio_root) if audio_root else manifest.parent
    src, tgt = pair.split("-")
    corpus = corpus or manifest.stem
    with open(manifest, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise CorpusError(f"{manifest}: empty manifest (no header)")
    header = rows[0]
    missing = [c for c in (cols.id, cols.audio, cols.tgt_text) if c not in header]
    if missing:
        raise CorpusError(f"{manifest}: missing column(s) {missing}; header is {header}")
    index = {name: i for i, name in enumerate(header)}
    out: list[Segment] = []
    for n, row in enumerate(rows[1:], start=2):
        if max_segments is not None and len(out) >= max_segments:
            break
        if not row or all(not x.strip() for x in row):
            continue
        get = lambda name: row[index[name]] if name and name in index and index[name] < len(row) else None  # noqa: E731
        sid = get(cols.id) or f"line{n}"
        seg = Segment(segment_id=sanitise(f"{corpus}.{sid}"), corpus=corpus, split=split, src_lang=src,
                      tgt_lang=tgt, audio_path="", reference=get(cols.tgt_text),
                      source_text=get(cols.src_text), speaker=get(cols.speaker))
        where = f"{manifest} line {n} (id {sid})"
        if len(row) != len(header):
            seg.error = f"{where}: {len(row)} fields, the header has {len(header)}"
            out.append(seg)
            continue
        seg.error = _tsv_audio(seg, get(cols.audio) or "", base, where)
        out.append(seg)
    return out


def _tsv_audio(seg: Segment, value: str, base: Path, where: str) -> Optional[str]:
    path, offset, length = value, None, None
    m = re.match(r"^(.*):(\d+):(\d+)$", value)
    if m:
        path, offset, length = m.group(1), int(m.group(2)), int(m.group(3))
    full = path if os.path.isabs(path) else str(base / path)
    seg.audio_path = full
    if not path:
        return f"{where}: empty audio column"
    if Path(path).suffix.lower() in FEATURE_SUFFIXES:
        return (f"{where}: audio column points to a feature file ({path}), not audio; xs2t computes its own "
                f"features and needs the waveform: give a manifest whose audio column is a wav/flac path")
    problem = _audio_problem(full)
    if problem:
        return f"{where}: {problem}"
    duration, rate = _probe(full)
    if offset is not None:
        if not rate:
            return f"{where}: cannot read the sample rate of {full} to cut samples {offset}:{length}"
        if length <= 0:
            return f"{where}: zero-length audio slice {value!r}"
        seg.start_s, seg.end_s = offset / rate, (offset + length) / rate
        seg.duration_s = length / rate
    else:
        seg.duration_s = duration
    return None


# ---- folder of audio files ------------------------------------------------------------------------
def read_folder(root: str | Path, pair: str, corpus: Optional[str] = None, split: str = "test",
                max_segments: Optional[int] = None) -> list[Segment]:
    """Every audio file under `root` (sorted); the reference is `<file stem>.txt` beside it if present."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: audio folder not found")
    src, tgt = pair.split("-")
    corpus = corpus or root.name
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    return [folder_segment(path, src, tgt, corpus, split, root) for path in files[:max_segments]]


def folder_segment(path: str | Path, src_lang: str = "en", tgt_lang: Optional[str] = None,
                   corpus: Optional[str] = None, split: str = "test", root: Optional[Path] = None) -> Segment:
    """One whole audio file as a segment: id "<folder>.<file stem>" (sub-folders joined by '.'),
    reference from "<file stem>.txt" beside it when present."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    corpus = corpus or root.resolve().name
    rel = path.relative_to(root).with_suffix("") if path.is_relative_to(root) else Path(path.stem)
    sidecar = path.with_suffix(".txt")
    ref = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else None
    seg = Segment(segment_id=sanitise(f"{corpus}.{'.'.join(rel.parts)}"), corpus=corpus, split=split,
                  src_lang=src_lang, tgt_lang=tgt_lang or src_lang, audio_path=str(path), reference=ref)
    seg.error = _audio_problem(str(path))
    if seg.error is None:
        seg.duration_s = _probe(str(path))[0]
    return seg


# ---- entry points ---------------------------------------------------------------------------------
def load_corpus(spec) -> list[Segment]:
    """All segments of a `CorpusSpec` (jobs.spec), every pair, in a stable order."""
    segments: list[Segment] = []
    for pair in spec.pairs:
        if spec.kind == "europarl":
            segs = read_europarl(spec.root, pair, spec.split, spec.name, spec.max_segments)
        elif spec.kind == "tsv":
            segs = read_tsv(spec.root, pair, spec.audio_root, spec.columns, spec.name or Path(spec.root).stem,
                            spec.split, spec.max_segments)
        elif spec.kind == "folder":
            segs = read_folder(spec.root, pair, spec.name, spec.split, spec.max_segments)
        else:
            raise CorpusError(f"unknown corpus kind {spec.kind!r}")
        segments.extend(segs)
    if not segments:
        raise CorpusError(f"{spec.root}: no segments found for pairs {spec.pairs}")
    ids = [s.segment_id for s in segments]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise CorpusError(f"{spec.root}: duplicate segment ids {dup}")
    return segments


def load_segment_audio(seg: Segment) -> np.ndarray:
    """16 kHz mono float32 audio of one segment; errors name the segment and the file."""
    from models.audio import load_audio

    if seg.error:
        raise CorpusError(f"segment {seg.segment_id}: {seg.error}")
    try:
        return load_audio(seg.audio_path, start=seg.start_s, end=seg.end_s)
    except ModelError as exc:
        raise CorpusError(f"segment {seg.segment_id}: {exc}") from None
