"""The Ray driver: one long-lived worker actor per GPU (or CPU slot), fed from a pull-based queue.

Each idle actor gets the next unit, so fast workers take more. Actors commit their own results;
the driver only tracks completion, retries failed units with exponential backoff, records a
failed row after `max_attempts`, and replaces actors that die. Whatever is committed is done:
`resume` runs the same loop over the units not yet committed as 'ok'.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from cluster.lock import RunLock
from cluster.plan import read_plan
from cluster.runspec import ExecConfig, exec_config
from cluster.store import SEGMENTS, RunStore
from cluster.worker import UnitWorker, backoff_s, failure_table, worker_name
from jobs.errors import RunError

PREEMPTED_EXIT = 3  # exit code of a driver stopped by SIGUSR1/SIGTERM after its current commits


@dataclass
class RunSummary:
    total: int
    skipped: int  # already committed as ok before this session
    ok: int = 0
    failed: int = 0
    retries: int = 0
    workers_lost: int = 0
    masks: int = 0
    seconds: float = 0.0
    stopped: bool = False  # stopped early by a signal (preemption)
    errors: dict = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return self.total - self.skipped - self.ok - self.failed

    def line(self) -> str:
        rate = self.ok / self.seconds if self.seconds else 0.0
        return (f"{self.ok} ok, {self.failed} failed, {self.skipped} already done, {self.pending} pending "
                f"of {self.total} units in {self.seconds:.1f} s ({rate:.2f} units/s, {self.retries} retries, "
                f"{self.workers_lost} workers lost)" + ("; stopped by signal" if self.stopped else ""))


class _StopFlag:
    """SIGUSR1 (Slurm's advance warning) or SIGTERM: stop dispatching, let running units commit."""

    def __init__(self) -> None:
        self.set, self.old = False, {}

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def todo_units(store: RunStore) -> tuple[list[dict], int]:
    """Plan rows not committed as ok (missing or failed), longest first; and the number done."""
    plan = read_plan(store)
    status = store.committed()
    todo = [r for r in plan if status.get(r["unit_id"]) != "ok"]
    todo.sort(key=lambda r: (-(r["duration_s"] or 0.0), r["unit_id"]))  # long units first: shorter tail
    return todo, len(plan) - len(todo)


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool):
        self.t0, self.total, self.done0, self.enabled = time.perf_counter(), total, done, enabled
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("[bold]xs2t"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rates]}"), console=Console(stderr=True),
                                transient=False)
            self.task = self.bar.add_task("run", total=total, completed=done, rates="")
            self.bar.start()

    def update(self, s: RunSummary) -> None:
        if not self.bar:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        finished = s.ok + s.failed
        ups = finished / dt
        eta = s.pending / ups if ups > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        rates = f"{ups:.2f} seg/s  {s.masks / dt:.0f} masks/s  ETA {eta_s}  failed {s.failed}"
        self.bar.update(self.task, completed=self.done0 + finished, rates=rates)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def _start_ray(address: Optional[str], cfg: ExecConfig, workers: Optional[int]):
    """Connect to `address`, or start a private local Ray sized for the workers; returns a cleanup."""
    import ray

    if ray.is_initialized():  # e.g. a test's Ray, or an embedding program's: leave it running
        return lambda: None
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=False)
        return ray.shutdown
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private single-machine cluster in its own temp dir
    temp = tempfile.mkdtemp(prefix="xs2t-ray-")  # short path: Ray's socket names must fit 107 bytes
    n_cpus = os.cpu_count() or 1
    if workers:
        n_cpus = max(n_cpus, workers * cfg.cpus_per_worker)
    ray.init(num_cpus=n_cpus, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             configure_logging=False)

    def cleanup() -> None:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    return cleanup


def _n_workers(cfg: ExecConfig, requested: Optional[int], n_units: int) -> int:
    import ray

    n = requested or cfg.workers
    if not n:
        res = ray.cluster_resources()
        n = int(res.get("GPU", 0) // cfg.gpus_per_worker) if cfg.gpus_per_worker else int(res.get("CPU", 1) // cfg.cpus_per_worker)
    return max(1, min(n, n_units))


def drive(location: str, address: Optional[str] = None, workers: Optional[int] = None,
          progress: Optional[bool] = None, **overrides) -> RunSummary:
    """Run every unit of RUN not yet committed as ok; returns when all are committed or a signal stopped it."""
    import ray
    from ray.exceptions import RayActorError

    store = RunStore(location)
    cfg = exec_config(store, **overrides)
    with RunLock(store), _StopFlag() as stop:
        todo, done = todo_units(store)
        summary = RunSummary(total=len(todo) + done, skipped=done)
        if not todo:
            return summary
        cleanup = _start_ray(address, cfg, workers)
        bar = _Progress(summary.total, done, sys.stderr.isatty() if progress is None else progress)
        t0 = time.perf_counter()
        try:
            # XS2T_* settings of the driver's environment reach the workers, on any cluster
            env = {k: v for k, v in os.environ.items() if k.startswith("XS2T_")}
            Actor = ray.remote(UnitWorker).options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                                                   max_restarts=0, max_task_retries=0,
                                                   runtime_env={"env_vars": env} if env else None)
            n = _n_workers(cfg, workers, len(todo))
            actors = [Actor.remote(store.location, cfg) for _ in range(n)]
            try:  # a processor that cannot even start is the user's error, not a unit's
                ray.get([a.ping.remote() for a in actors])
            except RayActorError as exc:
                raise RunError(f"workers failed to start: {exc}") from exc
            t0 = time.perf_counter()  # throughput counts from ready workers (model loading excluded)

            queue = collections.deque((row, 1, 0.0) for row in todo)  # (plan row, attempt, not before)
            idle = list(range(n))
            inflight: dict = {}  # ObjectRef -> (actor index, row, attempt)
            while (queue or inflight) and not (stop.set and not inflight):
                now = time.monotonic()
                while idle and queue and not stop.set:
                    ready = next((i for i, item in enumerate(queue) if item[2] <= now), None)
                    if ready is None:
                        break
                    row, attempt, _ = queue[ready]
                    del queue[ready]
                    slot = idle.pop()
                    inflight[actors[slot].run.remote(row, attempt)] = (slot, row, attempt)
                if not inflight:
                    time.sleep(min(0.2, max(0.0, min(q[2] for q in queue) - now)) if queue else 0)
                    continue
                finished, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in finished:
                    slot, row, attempt = inflight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayActorError as exc:  # the worker died (killed, OOM, node lost): replace it
                        summary.workers_lost += 1
                        actors[slot] = Actor.remote(store.location, cfg)
                        result = {"status": "error", "error": f"worker died: {type(exc).__name__}"}
                    idle.append(slot)
                    if result["status"] == "ok":
                        summary.ok += 1
                        summary.masks += result.get("n_masks", 0)
                    elif attempt < cfg.max_attempts and not row.get("error"):  # corpus errors are final
                        summary.retries += 1
                        queue.append((row, attempt + 1, time.monotonic() + backoff_s(cfg, attempt)))
                    else:
                        # rare, small and schema-only: the driver writes the failed row itself
                        store.commit_unit(row["unit_id"], row["shard"],
                                          {SEGMENTS: failure_table(row, result["error"], attempt, worker_name())})
                        summary.failed += 1
                        summary.errors[row["unit_id"]] = result["error"]
                    bar.update(summary)
            summary.stopped = stop.set and bool(queue)
        finally:
            summary.seconds = time.perf_counter() - t0
            bar.close()
            cleanup()
    return summary

