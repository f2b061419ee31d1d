"""Run one plan shard in this process, without Ray (a Slurm array task: `xs2t run-shard RUN --shard K`).

SIGUSR1 (Slurm's `--signal` warning before the time limit) or SIGTERM (preemption) stops the loop
after the current unit's commit; the task then asks Slurm to requeue it, and the requeued task
skips everything already committed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from cluster.driver import PREEMPTED_EXIT, RunSummary, _StopFlag
from cluster.lock import RunLock
from cluster.plan import read_plan
from cluster.runspec import exec_config
from cluster.store import SEGMENTS, RunStore
from cluster.worker import UnitWorker, backoff_s, failure_table


def run_shard(location: str, shard: int, **overrides) -> RunSummary:
    store = RunStore(location)
    cfg = exec_config(store, **overrides)
    with RunLock(store, f"locks/shard={shard}.LOCK"), _StopFlag() as stop:
        plan = [r for r in read_plan(store) if r["shard"] == shard]
        status = store.committed()
        todo = sorted((r for r in plan if status.get(r["unit_id"]) != "ok"), key=lambda r: (-(r["duration_s"] or 0.0), r["unit_id"]))
        summary = RunSummary(total=len(plan), skipped=len(plan) - len(todo))
        t0 = time.perf_counter()
        worker = UnitWorker(location, cfg) if todo else None
        for row in todo:
            if stop.set:
                break
            for attempt in range(1, 1 + (1 if row.get("error") else cfg.max_attempts)):  # corpus errors are final
                result = worker.run(row, attempt)
                if result["status"] == "ok" or stop.set:
                    break
                if attempt < cfg.max_attempts and not row.get("error"):
                    summary.retries += 1
                    time.sleep(backoff_s(cfg, attempt))
            if result["status"] == "ok":
                summary.ok += 1
                summary.masks += result.get("n_masks", 0)
            elif not stop.set:
                store.commit_unit(row["unit_id"], row["shard"], {SEGMENTS: failure_table(row, result["error"], attempt, worker.name)})
                summary.failed += 1
                summary.errors[row["unit_id"]] = result["error"]
        summary.stopped = stop.set and summary.pending > 0
        summary.seconds = time.perf_counter() - t0
    return summary


def requeue_self() -> bool:
    """Ask Slurm to requeue this job (array task); False outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")  # an array task's own job id
    if not job:
        return False
    for _ in range(5):  # the controller may be busy; a lost requeue would leave the shard unfinished
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if out.returncode == 0:
            print(f"requeued slurm job {job}", flush=True)
            return True
        print(f"scontrol requeue {job} failed: {out.stderr.strip()}", flush=True)
        time.sleep(2)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.shard_worker", description=__doc__)
    ap.add_argument("run")
    ap.add_argument("--shard", type=int, default=None, help="default: $SLURM_ARRAY_TASK_ID")
    ap.add_argument("--no-requeue", action="store_true")
    args = ap.parse_args(argv)
    shard = args.shard if args.shard is not None else int(os.environ["SLURM_ARRAY_TASK_ID"])
    summary = run_shard(args.run, shard)
    print(f"shard {shard}: {summary.line()}", flush=True)
    if summary.stopped:
        if not args.no_requeue:
            requeue_self()
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
