"""The Ray driver against a real `ray start --head` on loopback: retries, failed rows, lock, worker and
driver SIGKILL + resume (final tables equal an undisturbed run, no unit twice), Ray job submission."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cluster.driver import drive
from cluster.lock import RunLock
from cluster.runspec import create_run
from cluster.status import run_status
from cluster.submit import submit_ray
from jobs.errors import RunError
from test_cluster_store import check_results
from toy_processor import TOY, toy_spec, toy_units

pytestmark = pytest.mark.ray
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """One Ray head (2 CPUs, job API on loopback) for the whole module; stopped by its pid."""
    temp = tempfile.mkdtemp(prefix="xs2t-rt-")  # short path: Ray's socket names must fit 107 bytes
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{bindir}:{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    dash = _free_port()
    log = open(os.path.join(temp, "head.log"), "w")
    proc = subprocess.Popen([os.path.join(bindir, "ray"), "start", "--head", "--block", f"--port={_free_port()}",
                             "--num-cpus=2", f"--temp-dir={temp}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        current = os.path.join(temp, "ray_current_cluster")
        for _ in range(240):
            if os.path.exists(current) and os.path.getsize(current):
                break
            assert proc.poll() is None, open(os.path.join(temp, "head.log")).read()
            time.sleep(0.25)
        address = open(current).read().strip()
        os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever of its session is left
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _cli(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_drive_retries_failures_and_resume(ray_head, tmp_path, monkeypatch):
    units = toy_units(16)
    run = str(tmp_path / "run")
    create_run(toy_spec(run, sharding={"max_attempts": 3, "backoff_s": 0.05}), units, shards=3, processor=TOY)
    bad, flaky = units[4].unit_id, units[5].unit_id
    monkeypatch.setenv("XS2T_TOY_FAIL", bad)
    monkeypatch.setenv("XS2T_TOY_FLAKY", flaky)
    monkeypatch.setenv("XS2T_TOY_FLAKY_DIR", str(tmp_path))
    s = drive(run, address=ray_head["address"], workers=2, progress=False)
    assert (s.ok, s.failed, s.retries, s.pending) == (15, 1, 3, 0)  # bad: 2 retries, flaky: 1
    assert "toy failure" in s.errors[bad]
    from cluster.store import RunStore

    store = RunStore(run)
    check_results(store, units, failed={bad})
    seg = {r["unit_id"]: r for f in store.list_files("results/segments") for r in store.read_table(f).to_pylist()}
    assert seg[flaky]["attempts"] == 2 and seg[flaky]["status"] == "ok" and seg[bad]["attempts"] == 3
    assert len({seg[u]["worker"] for u in seg if u != bad}) == 2  # both workers pulled work
    assert run_status(run)["totals"] == {"done": 15, "failed": 1, "pending": 0}
    monkeypatch.delenv("XS2T_TOY_FAIL")
    again = drive(run, address=ray_head["address"], workers=2, progress=False)
    assert (again.ok, again.skipped, again.failed) == (1, 15, 0)
    check_results(store, units)


def test_lock_refuses_second_driver(ray_head, tmp_path):
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run), toy_units(3), processor=TOY)
    with RunLock(store):
        with pytest.raises(RunError, match="locked"):
            drive(run, address=ray_head["address"], progress=False)
    assert store.committed() == {}


def test_worker_sigkill_is_retried(ray_head, tmp_path, monkeypatch):
    units = toy_units(24, seed=1)
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run, sharding={"max_attempts": 3, "backoff_s": 0.05}), units, processor=TOY)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("XS2T_TOY_PID_DIR", str(pids))
    monkeypatch.setenv("XS2T_TOY_WORK", "150")
    killed = []

    def kill_one_worker():
        deadline = time.time() + 60
        while time.time() < deadline and len(store.list_files("results/segments")) < 6:
            time.sleep(0.05)
        pid = int(sorted(os.listdir(pids))[0])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    s = drive(run, address=ray_head["address"], workers=2, progress=False)
    killer.join()
    assert killed and s.workers_lost == 1 and s.failed == 0 and s.ok == 24
    assert len(os.listdir(pids)) == 3  # the dead worker was replaced
    check_results(store, units)


def test_driver_sigkill_then_resume(ray_head, tmp_path):
    units = toy_units(30, seed=2)
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run), units, shards=4, processor=TOY)
    env = dict(ray_head["env"], XS2T_TOY_WORK="150")
    driver = _cli(env, "resume", run, "--address", ray_head["address"], "--no-progress")
    deadline = time.time() + 90
    while len(store.list_files("results/segments")) < 5:
        assert driver.poll() is None and time.time() < deadline, driver.stdout.read()
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_at_kill = len(store.committed())
    assert 5 <= done_at_kill < 30 and store.exists("LOCK")  # the dead driver's lock is left behind
    resumed = _cli(env, "resume", run, "--address", ray_head["address"], "--no-progress")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    assert "already done" in out and not store.exists("LOCK")
    check_results(store, units)
    info = run_status(run)
    assert info["totals"] == {"done": 30, "failed": 0, "pending": 0} and len(info["shards"]) == 4


def test_ray_job_submission(ray_head, tmp_path):
    units = toy_units(8, seed=3)
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run), units, shards=2, processor=TOY)
    sid = submit_ray(run, ray_head["dashboard"], python=sys.executable)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["dashboard"])
    deadline = time.time() + 120
    while client.get_job_status(sid) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline
        time.sleep(0.5)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED, client.get_job_logs(sid)
    info = run_status(run)
    assert info["ray_job"]["submission_id"] == sid and info["ray_job"]["state"] == "SUCCEEDED"
    check_results(store, units)


def _write_wav(path: Path, seconds: float, freq: float) -> None:
    import wave

    import numpy as np

    t = np.arange(int(seconds * 16000)) / 16000
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes())


def test_cli_run_job_file_on_audio_folder(ray_head, tmp_path):
    audio = tmp_path / "clips"
    audio.mkdir()
    for i in range(4):
        _write_wav(audio / f"clip{i}.wav", 0.5 + 0.5 * i, 200 + 100 * i)
    (audio / "broken.wav").write_bytes(b"")  # a corpus error: recorded as a failed unit, not a crash
    job = tmp_path / "job.yaml"
    job.write_text("corpus: {kind: folder, root: clips, pairs: [en-en]}\n"
                   "models: [{key: toy, name_or_path: toy}]\n"
                   "sharding: {n_shards: 2, max_attempts: 2, backoff_s: 0.01}\n"
                   "output: {run_dir: out/run}\n")
    proc = _cli(ray_head["env"], "run", str(job), "--address", ray_head["address"], "--processor", TOY, "--no-progress")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "4 ok, 1 failed" in out and "broken" in out
    info = run_status(str(tmp_path / "out" / "run"))
    assert info["totals"] == {"done": 4, "failed": 1, "pending": 0} and set(info["shards"]) == {0, 1}
    assert list(info["pairs"]) == ["toy asr en-en"]
    from cluster.store import RunStore

    store = RunStore(str(tmp_path / "out" / "run"))
    seg = {r["unit_id"]: r for f in store.list_files("results/segments") for r in store.read_table(f).to_pylist()}
    durations = sorted(r["duration_s"] for r in seg.values() if r["status"] == "ok")
    assert durations == pytest.approx([0.5, 1.0, 1.5, 2.0], abs=0.01)
    seg_broken = next(r for r in seg.values() if r["status"] == "failed")
    assert seg_broken["attempts"] == 1 and "empty" in seg_broken["error"]  # a corpus error is not retried
    # a second `run` of the same job continues the same run directory: only the failed unit again
    again = _cli(ray_head["env"], "run", str(job), "--address", ray_head["address"], "--no-progress")
    out2, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "0 ok, 1 failed, 4 already done" in out2, out2


def test_driver_stops_cleanly_on_sigusr1(ray_head, tmp_path):
    units = toy_units(30, seed=7)
    run = str(tmp_path / "run")
    store = create_run(toy_spec(run), units, processor=TOY)
    driver = _cli(dict(ray_head["env"], XS2T_TOY_WORK="150"), "resume", run, "--address", ray_head["address"], "--no-progress")
    deadline = time.time() + 90
    while len(store.list_files("results/segments")) < 3:
        assert driver.poll() is None and time.time() < deadline, driver.stdout.read()
        time.sleep(0.05)
    driver.send_signal(signal.SIGUSR1)
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 3 and "stopped by signal" in out, out  # PREEMPTED_EXIT
    assert not store.exists("LOCK")
    done = store.committed()
    assert 3 <= len(done) < 30 and set(done.values()) == {"ok"}
    # every committed unit is complete: its other table is there too
    assert len(store.list_files("results/toy_spectrum")) == len(done)
