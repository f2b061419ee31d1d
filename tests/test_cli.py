"""The command line on the FBK tiny model: transcribe, explain, and errors without tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "fbk_tiny"
MODEL = ["--model", str(FIXTURE / "checkpoint.pt"), "--config-yaml", str(FIXTURE / "config.yaml")]


def xs2t(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=600)


def test_transcribe_json_matches_the_reference_hypotheses():
    wavs = [str(FIXTURE / "wav" / f"test_{k}.wav") for k in range(3)]
    proc = xs2t("transcribe", *MODEL, *wavs, "--lang", "en", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3
    for k, row in enumerate(rows):
        golden = np.load(FIXTURE / "golden" / f"golden_{k}.npz")
        assert row["token_ids"] == golden["hyp_token_ids"].tolist()
        assert row["text"] == str(golden["hyp_detok"])
        assert len(row["token_log_probs"]) == len(row["token_ids"]) and all(p <= 0 for p in row["token_log_probs"])


def test_explain_writes_documented_tables(tmp_path):
    proc = xs2t("explain", *MODEL, str(FIXTURE / "wav" / "test_0.wav"), "--out", str(tmp_path),
                "--n-input", "60", "--n-encoder", "60", "--skip", "input")
    assert proc.returncode == 0, proc.stderr
    names = {p.stem for p in tmp_path.glob("*.parquet")}
    assert names == {"segments", "cross_attention", "saliency_encoder", "correlations"}
    seg = pq.read_table(tmp_path / "segments.parquet").to_pylist()[0]
    assert seg["n_masks_input"] == 0 and seg["n_masks_encoder"] == 60
    assert {r["target"] for r in pq.read_table(tmp_path / "correlations.parquet").to_pylist()} == {"encoder"}


def test_user_errors_are_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nothing.wav"
    proc = xs2t("transcribe", *MODEL, str(missing))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(missing) in proc.stderr and "not found" in proc.stderr
    short = tmp_path / "short.wav"
    from models.audio import write_wav

    write_wav(short, np.zeros(100, np.float32))
    proc = xs2t("transcribe", *MODEL, str(short))
    assert proc.returncode == 2 and "too short" in proc.stderr and "Traceback" not in proc.stderr
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"not a model")
    proc = xs2t("transcribe", "--model", str(bogus), str(FIXTURE / "wav" / "test_0.wav"))
    assert proc.returncode == 2 and str(bogus) in proc.stderr and "Traceback" not in proc.stderr
