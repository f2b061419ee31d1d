"""The whole chain with the real pipeline: a synthesized EuroParl-ST corpus with broken inputs ->
`xs2t run` on local Ray with the FBK tiny model -> status -> reduce -> query -> a rerun of one unit
gives identical results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.make_corpus import make_corpus
from jobs.schema import read_results
from models.audio import load_audio, write_m4a

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "fbk_tiny"
BROKEN = {  # audio id -> (segments.lst line, what the error must say)
    "corrupt": ("corrupt 0.0 2.0", "decode"),
    "empty": ("empty 0.0 2.0", "empty"),
    "missing": ("missing 0.0 2.0", "not found"),
    "malformed": ("malformed 1.5", "expected 'audio_id start end'"),
    "long": ("long 0.0 65.0", "exceeds"),
}


def xs2t(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"xs2t {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = tmp / "corpus"
    make_corpus(corpus, langs=("en",), segments=3, rate=170)
    folder, audios = corpus / "en" / "en" / "test", corpus / "en" / "audios"
    (audios / "corrupt.m4a").write_bytes(np.random.default_rng(0).bytes(4000))
    (audios / "empty.m4a").write_bytes(b"")
    talk = load_audio(next(audios.glob("en.*.m4a")))
    write_m4a(audios / "long.m4a", np.tile(talk, int(np.ceil(66 * 16000 / len(talk))))[: 66 * 16000])
    with open(folder / "segments.lst", "a") as lst, open(folder / "segments.en", "a") as ref:
        for line, _ in BROKEN.values():
            lst.write(line + "\n")
            ref.write("A reference that will never be used.\n")
    (folder / "speakers.lst").unlink(missing_ok=True)
    job = {
        "corpus": {"kind": "europarl", "root": str(corpus), "pairs": ["en-en"], "split": "test"},
        "models": [{"key": "tiny", "name_or_path": str(FIXTURE / "checkpoint.pt"),
                    "config_yaml": str(FIXTURE / "config.yaml")}],
        "method": {"n_input": 60, "n_encoder": 90, "deletion": True, "size": True, "p_encoder_sweep": [0.5]},
        "sharding": {"n_shards": 2, "max_attempts": 2, "backoff_s": 0.1},
        "resources": {"workers": 2},
        "output": {"run_dir": str(tmp / "run")},
    }
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    xs2t("run", str(tmp / "job.yaml"), "--no-progress")
    return tmp / "run"


def test_failures_are_recorded_and_the_rest_completes(run_dir):
    status = json.loads(xs2t("status", str(run_dir), "--json").stdout)
    text = json.dumps(status)
    seg = read_results(str(run_dir), "segments").to_pylist()
    ok = [r for r in seg if r["status"] == "ok"]
    failed = {r["segment_id"].split(".")[-2]: r for r in seg if r["status"] == "failed"}
    assert len(ok) == 3 and all(r["hypothesis"] for r in ok)
    assert set(failed) == set(BROKEN), sorted(failed)
    for audio_id, (_, reason) in BROKEN.items():
        err = failed[audio_id]["error"]
        assert reason in err and failed[audio_id]["segment_id"] in err or audio_id in err, err
    assert len({r["unit_id"] for r in seg}) == len(seg) == 8      # nothing twice
    assert "failed" in text and "5" in text


def test_reduce_writes_the_paper_tables(run_dir):
    out = xs2t("reduce", str(run_dir)).stdout
    assert "Table 1" in out and "Table 3" in out
    tables = {p.name for p in (run_dir / "tables").iterdir()}
    assert any(n.endswith(".csv") for n in tables) and any(n.endswith(".tex") for n in tables)
    assert any(n.endswith(".md") for n in tables)


def test_query_reads_committed_results(run_dir):
    rows = json.loads(xs2t("query", str(run_dir), "SELECT target, pooling, p, count(*) AS n, avg(pearson) AS r "
                           "FROM correlations WHERE layer IS NULL AND head IS NULL GROUP BY ALL ORDER BY ALL",
                           "--format", "json").stdout)
    keys = {(r["target"], r["pooling"], r["p"]) for r in rows}
    assert ("encoder", None, 0.7) in keys and ("encoder", None, 0.5) in keys and ("input", "2d_max", 0.5) in keys
    assert all(r["n"] == 3 and -1 <= r["r"] <= 1 for r in rows)
    deletion = json.loads(xs2t("query", str(run_dir), "SELECT explanation, count(*) AS n FROM deletion GROUP BY ALL",
                               "--format", "json").stdout)
    assert {r["explanation"]: r["n"] for r in deletion} == {e: 3 * 21 for e in ("ca", "sm_x_full", "sm_x_agg", "sm_h")}


def test_rerun_of_a_unit_gives_identical_results(run_dir):
    seg_files = sorted((run_dir / "results" / "segments").glob("shard=*/*.parquet"))
    ok_file = next(f for f in seg_files if pq.read_table(f)["status"][0].as_py() == "ok")
    unit = ok_file.stem
    before = {t: pq.read_table(next((run_dir / "results" / t).glob(f"shard=*/{unit}.parquet"))).to_pylist()
              for t in ("saliency_input", "saliency_encoder", "correlations", "cross_attention")}
    ok_file.unlink()  # the unit is no longer committed
    out = xs2t("resume", str(run_dir), "--no-progress").stdout
    assert "1 ok" in out
    after = {t: pq.read_table(next((run_dir / "results" / t).glob(f"shard=*/{unit}.parquet"))).to_pylist()
             for t in before}
    assert after == before
