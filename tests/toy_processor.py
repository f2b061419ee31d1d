"""A small real processor for testing the cluster layer without speech models.

It does deterministic CPU work from the segment (log power spectra of the audio, or of noise seeded
by the segment id when there is no audio file) and returns a `segments` row plus a `toy_spectrum`
table. Knobs (environment, so Ray workers and Slurm tasks inherit them):
  XS2T_TOY_WORK       spectrum passes per unit (CPU cost; default 4)
  XS2T_TOY_FAIL       regex: units whose id matches always fail
  XS2T_TOY_FLAKY      regex: units whose id matches fail on their first attempt only ...
  XS2T_TOY_FLAKY_DIR  ... remembered by marker files in this folder
  XS2T_TOY_PID_DIR    each worker process leaves an empty file named by its pid here
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from cluster.worker import segments_schema

SR = 16000


class ToyError(RuntimeError):
    pass


def toy_audio(segment) -> np.ndarray:
    path = segment.audio_path
    if path and os.path.exists(path):
        from models.audio import load_audio

        x = load_audio(path)
        a = int((segment.start_s or 0) * SR)
        b = int(segment.end_s * SR) if segment.end_s is not None else len(x)
        return x[a:b]
    seed = int.from_bytes(hashlib.sha256(segment.segment_id.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(int(segment.duration_s * SR)).astype(np.float32)


def log_spectrum(x: np.ndarray, passes: int) -> np.ndarray:
    """Mean log power spectrum of 25 ms frames; `passes` repeats the work (the result is identical)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160]
    window = np.hanning(400)
    for _ in range(passes):
        out = np.log1p(np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).mean(axis=0)
    return out.astype(np.float32)


class ToyProcessor:
    def __init__(self, spec, device: str = "cpu", threads: int = 1):
        self.passes = max(1, int(os.environ.get("XS2T_TOY_WORK", "4")))
        self.fail = os.environ.get("XS2T_TOY_FAIL")
        self.flaky = os.environ.get("XS2T_TOY_FLAKY")
        self.flaky_dir = os.environ.get("XS2T_TOY_FLAKY_DIR")
        if os.environ.get("XS2T_TOY_PID_DIR"):
            Path(os.environ["XS2T_TOY_PID_DIR"], str(os.getpid())).touch()
        self.device = device

    def process(self, unit) -> dict[str, pa.Table]:
        seg = unit.segment
        if self.fail and re.search(self.fail, unit.unit_id):
            raise ToyError(f"segment {seg.segment_id}: toy failure requested")
        if self.flaky and self.flaky_dir and re.search(self.flaky, unit.unit_id):
            marker = Path(self.flaky_dir, unit.unit_id)
            if not marker.exists():
                marker.touch()
                raise ToyError(f"segment {seg.segment_id}: flaky first attempt")
        t0 = time.perf_counter()
        x = toy_audio(seg)
        spectrum = log_spectrum(x, self.passes)
        n_frames = int(spectrum.size and max(0, (len(x) - 400) // 160 + 1))
        row = {"unit_id": unit.unit_id, "segment_id": seg.segment_id, "model": unit.model_key, "task": unit.task,
               "corpus": seg.corpus, "split": seg.split, "src_lang": seg.src_lang, "tgt_lang": seg.tgt_lang,
               "shard": unit.shard, "audio_path": seg.audio_path, "start_s": seg.start_s, "end_s": seg.end_s,
               "duration_s": seg.duration_s, "n_frames": n_frames, "reference": seg.reference,
               "source_text": seg.source_text, "hypothesis": f"{float(spectrum.sum()):.4f}",
               "status": "ok", "n_masks_input": n_frames, "n_masks_encoder": 0,
               "t_total_s": time.perf_counter() - t0, "device": self.device}
        schema = segments_schema()
        if schema is None:
            segments = pa.Table.from_pylist([row])
        else:
            segments = pa.Table.from_pylist([{k: row.get(k) for k in schema.names}], schema=schema)
        spec_table = pa.table({"unit_id": [unit.unit_id], "values": pa.array([spectrum.tolist()], pa.list_(pa.float32()))})
        return {"toy_spectrum": spec_table, "segments": segments}


def toy_units(n: int, model_key: str = "toy", corpus: str = "synthetic", seed: int = 0):
    """`n` work units over synthetic segments of varied length (0.5-4 s), two language pairs."""
    from jobs.corpus import Segment, make_units

    rng = np.random.default_rng(seed)
    segments = [Segment(segment_id=f"{corpus}.utt{i:04d}", corpus=corpus, split="test", src_lang="en",
                        tgt_lang="en" if i % 3 == 0 else "it", audio_path="", reference=f"ref {i}",
                        source_text=f"src {i}", duration_s=float(np.round(rng.uniform(0.5, 4.0), 2)))
                for i in range(n)]
    return make_units([model_key], segments)


def toy_spec(run_dir: str, **sections):
    """A valid job spec whose units come from `toy_units` (the corpus section is not read)."""
    from jobs.spec import spec_from_dict

    return spec_from_dict({"name": "toy", "corpus": {"kind": "folder", "root": run_dir, "pairs": ["en-it"]},
                           "models": [{"key": "toy", "name_or_path": "toy"}], "output": {"run_dir": run_dir},
                           **sections})


TOY = "toy_processor:ToyProcessor"
