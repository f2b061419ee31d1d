"""Run directory, atomic commits (local and S3 via a moto server), lock, planner, run-shard, status (no Ray)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from cluster.lock import RunLock
from cluster.plan import balance_shards, read_plan, unit_from_row
from cluster.runspec import create_run, exec_config
from cluster.shard_worker import run_shard
from cluster.status import run_status
from cluster.store import RunStore
from jobs.errors import RunError
from toy_processor import TOY, ToyProcessor, toy_spec, toy_units


def expected_tables(units):
    """What an undisturbed run must contain: the processor applied to each unit directly."""
    proc = ToyProcessor(None)
    return {u.unit_id: proc.process(u) for u in units}


def check_results(store: RunStore, units, failed=()):
    committed = store.committed()
    assert sorted(committed) == sorted(u.unit_id for u in units)
    assert {u for u, s in committed.items() if s == "failed"} == set(failed)
    want = expected_tables([u for u in units if u.unit_id not in failed])
    files = store.list_files("results/toy_spectrum", ".parquet")
    assert len(files) == len(want)  # one file per ok unit, none for failed ones
    for f in files:
        got = store.read_table(f)
        uid = got.column("unit_id")[0].as_py()
        np.testing.assert_array_equal(got.column("values")[0].as_py(), want[uid]["toy_spectrum"].column("values")[0].as_py())
    seg_files = store.list_files("results/segments", ".parquet")
    ids = [store.read_table(f, ["unit_id"]).column(0)[0].as_py() for f in seg_files]
    assert len(ids) == len(set(ids)) == len(units)


def test_balance_shards_by_length():
    durations = [10.0, 9.0, 1.0, 1.0, 5.0, 4.0, 3.0, 3.0]
    shards = balance_shards(durations, 3)
    loads = [sum(d for d, s in zip(durations, shards) if s == k) for k in range(3)]
    assert max(loads) - min(loads) <= 2.0
    assert balance_shards(durations, 3) == shards  # deterministic


def test_plan_is_stable_and_rebuilds_units(tmp_path):
    units = toy_units(12)
    store = create_run(toy_spec(str(tmp_path / "run")), units, shards=3, processor=TOY)
    plan = read_plan(store)
    assert [r["unit_id"] for r in plan] == sorted(u.unit_id for u in units)
    assert {r["shard"] for r in plan} == {0, 1, 2}
    by_id = {u.unit_id: u for u in units}
    for row in plan:
        unit = unit_from_row(row)
        assert unit.segment == by_id[row["unit_id"]].segment and unit.shard == row["shard"]
    # the same job again reuses the run; a different job is refused
    assert read_plan(create_run(toy_spec(str(tmp_path / "run")), toy_units(12), processor=TOY)) == plan
    with pytest.raises(RunError, match="different job"):
        create_run(toy_spec(str(tmp_path / "run"), sharding={"max_attempts": 5}), units, processor=TOY)
    cfg = exec_config(store)
    assert cfg.processor == TOY and cfg.max_attempts == 3


def test_commit_is_atomic(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"))
    table = pa.table({"unit_id": ["u1"], "status": ["ok"]})
    real_replace = os.replace

    def crash_on_segments(src, dst):
        if "/segments/" in dst:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_segments)
    with pytest.raises(OSError):
        store.commit_unit("u1", 0, {"segments": table, "other": table})
    assert store.committed() == {}  # the half-done unit is not committed
    assert store.list_files("results/segments") == []  # its temp file stays hidden
    monkeypatch.setattr(os, "replace", real_replace)
    store.commit_unit("u1", 0, {"segments": table, "other": table})
    store.commit_unit("u1", 0, {"segments": table, "other": table})  # a rerun overwrites, never duplicates
    assert store.committed() == {"u1": "ok"}
    assert store.list_files("results/other") == ["results/other/shard=0/u1.parquet"]


def test_lock_excludes_live_driver_and_takes_over_dead_one(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    with RunLock(store):
        with pytest.raises(RunError, match="locked by pid"):
            RunLock(store).acquire()
    assert not store.exists("LOCK")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.write_bytes("LOCK", json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}).encode())
    with RunLock(store) as lock:
        assert json.loads(store.read_bytes("LOCK"))["pid"] == os.getpid() and lock.held


def test_run_shard_retries_records_failures_and_resumes(tmp_path, monkeypatch):
    units = toy_units(10)
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run, sharding={"max_attempts": 2, "backoff_s": 0.01}), units, shards=2, processor=TOY)
    bad, flaky = units[1].unit_id, units[2].unit_id
    monkeypatch.setenv("XS2T_TOY_FAIL", bad)
    monkeypatch.setenv("XS2T_TOY_FLAKY", flaky)
    monkeypatch.setenv("XS2T_TOY_FLAKY_DIR", str(tmp_path))
    s0, s1 = run_shard(run, 0), run_shard(run, 1)
    assert s0.ok + s1.ok == 9 and s0.failed + s1.failed == 1 and s0.retries + s1.retries == 2
    check_results(store, units, failed={bad})
    failed = store.read_table(f"results/segments/shard={read_plan(store)[[r['unit_id'] for r in read_plan(store)].index(bad)]['shard']}/{bad}.parquet").to_pylist()[0]
    assert failed["attempts"] == 2 and "toy failure" in failed["error"] and failed["status"] == "failed"
    info = run_status(run)
    assert info["totals"] == {"done": 9, "failed": 1, "pending": 0}
    assert sum(c["done"] for c in info["pairs"].values()) == 9 and len(info["pairs"]) == 2
    # resume: only the failed unit runs again
    monkeypatch.delenv("XS2T_TOY_FAIL")
    shard = next(r["shard"] for r in read_plan(store) if r["unit_id"] == bad)
    again = run_shard(run, shard)
    assert again.ok == 1 and again.skipped == again.total - 1
    check_results(store, units)
    from typer.testing import CliRunner

    from jobs.cli import app

    res = CliRunner().invoke(app, ["status", run])
    assert res.exit_code == 0 and "10 units: 10 done, 0 failed, 0 pending" in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, ["status", run, "--json"])
    assert json.loads(res.output)["totals"] == {"done": 10, "failed": 0, "pending": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    moto_bin = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([moto_bin, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="xs2t")
        yield port
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_s3_run_directory(moto_s3, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    run = f"s3://xs2t/runs/r1?endpoint_override=127.0.0.1:{moto_s3}&scheme=http"
    units = toy_units(6)
    store = create_run(toy_spec(run), units, shards=2, processor=TOY)
    assert not store.local and store.exists("plan.parquet") and store.exists("job.yaml")
    with RunLock(store):
        with pytest.raises(RunError, match="locked"):
            RunLock(store).acquire()
    run_shard(run, 0)
    info = run_status(run)
    assert info["totals"]["done"] == sum(1 for r in read_plan(store) if r["shard"] == 0)
    assert info["shards"][1]["pending"] == info["shards"][1]["done"] + info["shards"][1]["pending"]
    run_shard(run, 1)
    check_results(store, units)
    assert all(f.startswith("results/") and ".tmp" not in f for f in store.list_files("results"))
