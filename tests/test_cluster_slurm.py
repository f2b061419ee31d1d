"""`xs2t submit --slurm` against a real single-node Slurm on loopback: array mode, ray mode, and a
preemption signal that stops a task after its current commit and requeues it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.runspec import create_run
from cluster.status import run_status
from cluster.store import RunStore
from slurm_cluster import monkeypatch_module, slurm  # noqa: F401 -- pytest fixtures
from test_cluster_store import check_results
from toy_processor import TOY, toy_spec, toy_units

pytestmark = pytest.mark.slurm
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def job_env(monkeypatch):
    # sbatch exports the submitting environment: the toy processor must be importable in the jobs
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT)]))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")


def _submit(run: str, *options: str) -> str:
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", run, "--slurm", *options],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    return json.loads(RunStore(run).read_bytes("slurm_job.json"))["job_id"]


def _logs(run: str) -> str:
    return "\n".join(p.read_text() for p in sorted(Path(run, "slurm").glob("*.out")))


def test_slurm_array_mode(slurm, tmp_path):
    units = toy_units(9, seed=4)
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run), units, shards=3, processor=TOY)
    job = _submit(run, "--mode", "array")
    assert "--array=0-2" in Path(next(Path(run, "slurm").glob("*.sbatch"))).read_text()
    assert run_status(run)["slurm_job"]["job_id"] == job
    slurm.wait_gone(job)
    check_results(store, units)
    assert _logs(run).count("ok, 0 failed") == 3, _logs(run)
    assert "not in queue" in run_status(run)["slurm_job"]["state"]


def test_slurm_array_preemption_requeues(slurm, tmp_path, monkeypatch):
    units = toy_units(14, seed=5)
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run), units, shards=1, processor=TOY)
    monkeypatch.setenv("XS2T_TOY_WORK", "200")
    job = _submit(run, "--mode", "array")
    deadline = time.time() + 120
    while len(store.list_files("results/segments")) < 3:
        assert time.time() < deadline, _logs(run)
        time.sleep(0.1)
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what Slurm sends before the time limit
    deadline = time.time() + 60
    while "stopped by signal" not in _logs(run):
        assert time.time() < deadline, _logs(run)
        time.sleep(0.2)
    n_at_stop = len(store.committed())
    assert n_at_stop < 14
    deadline = time.time() + 60
    while "PENDING" not in slurm.queue(job):  # requeued
        assert time.time() < deadline, (slurm.queue(job), _logs(run))
        time.sleep(0.2)
    time.sleep(5)  # let slurmd finish tearing down the cancelled run (what the hold-off is for)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip the rest of Slurm's requeue hold-off
    # squeue may briefly lose a requeued array task while it is restarted, so wait for the commits
    # themselves, then for the job to leave the queue.
    deadline = time.time() + 240
    while len(store.committed()) < 14:
        assert time.time() < deadline, _logs(run) + slurm.run("scontrol", "show", "job", job, check=False)
        time.sleep(0.5)
    slurm.wait_gone(job, timeout=120)
    check_results(store, units)
    workers = {r["worker"] for f in store.list_files("results/segments") for r in store.read_table(f, ["worker"]).to_pylist()}
    assert len(workers) == 2  # the task ran twice: before and after the requeue


def test_slurm_ray_mode(slurm, tmp_path):
    units = toy_units(8, seed=6)
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run), units, shards=2, processor=TOY)
    job = _submit(run, "--mode", "ray", "--cpus-per-node", "2")
    slurm.wait_gone(job, timeout=300)
    assert "ray head at" in _logs(run), _logs(run)
    check_results(store, units)
    assert not store.exists("LOCK")
