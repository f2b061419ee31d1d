"""Scaling of the Ray driver: the same CPU-bound corpus with 1 and with 2 workers (one thread each).

    python -m bench.scaling [--units 32] [--work 600] [--workers 1 2]

Each unit computes log power spectra of a synthetic signal whose length and seed come from the
segment (pure CPU, single-threaded numpy FFTs), commits its Parquet files like the real pipeline,
and the script prints units/s per worker count and the speed ratio. Run it inside a loopback-only
network namespace with RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 (see tests/run.sh).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from cluster.driver import drive
from cluster.runspec import create_run
from jobs import schema
from jobs.corpus import Segment, make_units
from jobs.spec import spec_from_dict


class SpectrumProcessor:
    """CPU-bound stand-in for the pipeline: `XS2T_BENCH_WORK` spectrum passes per second of audio."""

    def __init__(self, spec, device: str = "cpu", threads: int = 1):
        self.passes = int(os.environ.get("XS2T_BENCH_WORK", "600"))

    def process(self, unit) -> dict[str, pa.Table]:
        seg = unit.segment
        seed = int.from_bytes(hashlib.sha256(seg.segment_id.encode()).digest()[:8], "little")
        x = np.random.default_rng(seed).standard_normal(int(seg.duration_s * 16000)).astype(np.float32)
        frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * np.hanning(400)
        for _ in range(self.passes):
            spectrum = np.log1p(np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(axis=0)
        row = schema.segments_row(unit_id=unit.unit_id, segment_id=seg.segment_id, model=unit.model_key,
                                  task=unit.task, src_lang=seg.src_lang, tgt_lang=seg.tgt_lang, shard=unit.shard,
                                  duration_s=seg.duration_s, hypothesis=f"{spectrum.sum():.4f}",
                                  n_masks_input=self.passes)
        return {"segments": schema.table_from_rows("segments", [row])}


def make_run(folder: str, n_units: int) -> str:
    rng = np.random.default_rng(0)
    segments = [Segment(segment_id=f"bench.utt{i:04d}", corpus="bench", split="test", src_lang="en", tgt_lang="en",
                        audio_path="", duration_s=float(rng.uniform(1.0, 3.0))) for i in range(n_units)]
    spec = spec_from_dict({"name": "bench", "corpus": {"kind": "folder", "root": folder},
                           "models": [{"key": "bench", "name_or_path": "bench"}], "output": {"run_dir": folder}})
    create_run(spec, make_units(["bench"], segments), processor="bench.scaling:SpectrumProcessor")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--work", type=int, default=600, help="spectrum passes per unit")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    os.environ["XS2T_BENCH_WORK"] = str(args.work)
    rates = {}
    with tempfile.TemporaryDirectory(prefix="xs2t-bench-") as tmp:
        for n in args.workers:
            run = make_run(os.path.join(tmp, f"w{n}"), args.units)
            t = time.perf_counter()
            s = drive(run, workers=n, progress=False)
            rates[n] = s.ok / s.seconds
            print(f"{n} worker(s): {s.ok} units in {s.seconds:.2f} s of processing "
                  f"({time.perf_counter() - t:.1f} s with Ray start/stop): {rates[n]:.2f} units/s", flush=True)
    base = rates[args.workers[0]]
    for n in args.workers[1:]:
        print(f"speed-up {args.workers[0]} -> {n} workers: {rates[n] / base:.2f}x")


if __name__ == "__main__":
    main()
