"""Hand a prepared run to a Ray cluster (job submission API) or to Slurm (sbatch, two modes).

* Ray:          the driver (`xs2t resume RUN`) runs as a Ray job on the cluster; the user may disconnect.
* Slurm ray:    the allocation starts a Ray head (first node) and workers (other nodes), then the driver.
* Slurm array:  one array task per plan shard, each `python -m cluster.shard_worker RUN --shard K`, no Ray.
Slurm's `--signal=B:USR1@grace` warning (and preemption) stops the work after the current commit;
the job then requeues itself and the requeued job skips what is committed.
The run directory must be reachable from the cluster (a shared file system or an object store).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from cluster.driver import PREEMPTED_EXIT
from cluster.plan import read_plan
from cluster.runspec import exec_config
from cluster.status import RAY_JOB, SLURM_JOB
from cluster.store import RunStore
from jobs.errors import RunError


def _run_location(store: RunStore) -> str:
    return store.root if store.local else store.location  # absolute path for local runs


def submit_ray(location: str, address: str, python: str = "python", env: Optional[dict] = None) -> str:
    """Submit the driver of RUN as a Ray job at `address` (http://HEAD:8265); returns the submission id."""
    from ray.job_submission import JobSubmissionClient

    store = RunStore(location)
    read_plan(store)  # fail here, not on the cluster, when the run is not prepared
    entry = f"{python} -m jobs.cli resume {shlex.quote(_run_location(store))} --no-progress"
    try:
        client = JobSubmissionClient(address)
        sid = client.submit_job(entrypoint=entry, runtime_env={"env_vars": env} if env else None,
                                metadata={"xs2t_run": _run_location(store)})
    except Exception as exc:  # noqa: BLE001 -- connection errors are the user's to fix
        raise RunError(f"Ray job submission to {address} failed: {exc}") from exc
    store.write_bytes(RAY_JOB, json.dumps({"submission_id": sid, "address": address, "entrypoint": entry,
                                           "submitted": time.time()}).encode())
    return sid


@dataclass
class SlurmOptions:
    mode: str = "ray"                # 'ray' | 'array'
    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: Optional[int] = None  # ray mode; default: workers' needs
    time: Optional[str] = None       # e.g. '04:00:00'
    max_parallel: Optional[int] = None  # array mode: tasks at once (%N)
    grace_s: int = 120               # USR1 this long before the time limit
    python: str = sys.executable
    extra: tuple[str, ...] = ()      # further raw '#SBATCH' options, e.g. '--account=x'


def _header(name: str, log_dir: str, o: SlurmOptions, lines: list[str]) -> str:
    head = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={log_dir}/slurm-%A_%a.out" if o.mode == "array"
            else f"#SBATCH --output={log_dir}/slurm-%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
            f"#SBATCH --signal=B:USR1@{o.grace_s}"]
    if o.partition:
        head.append(f"#SBATCH --partition={o.partition}")
    if o.time:
        head.append(f"#SBATCH --time={o.time}")
    head += [f"#SBATCH {x}" for x in lines] + [f"#SBATCH {x}" for x in o.extra]
    return "\n".join(head) + "\n"


def slurm_script(location: str, o: SlurmOptions, n_shards: int, cpus_per_worker: int, log_dir: str) -> str:
    run, py = shlex.quote(location), shlex.quote(o.python)
    env = "export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1\n"
    if o.mode == "array":
        lines = [f"--array=0-{n_shards - 1}" + (f"%{o.max_parallel}" if o.max_parallel else ""), "--ntasks=1",
                 f"--cpus-per-task={cpus_per_worker}"] + ([f"--gpus={o.gpus_per_node}"] if o.gpus_per_node else [])
        # exec: python becomes the batch shell, so it receives Slurm's USR1 itself
        return _header("xs2t-array", log_dir, o, lines) + env + f"exec {py} -m cluster.shard_worker {run} --shard \"$SLURM_ARRAY_TASK_ID\"\n"
    if o.mode != "ray":
        raise RunError(f"slurm mode must be 'ray' or 'array', not {o.mode!r}")
    cpus = o.cpus_per_node or cpus_per_worker
    lines = [f"--nodes={o.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}"]
    if o.gpus_per_node:
        lines.append(f"--gpus-per-node={o.gpus_per_node}")
    ray_bin = shlex.quote(os.path.join(os.path.dirname(o.python), "ray"))
    gpus = f" --num-gpus={o.gpus_per_node}" if o.gpus_per_node else ""
    body = f"""{env}RUN={run}
PY={py}
RAY={ray_bin}
TMP=$(mktemp -d -t xs2t-ray-XXXXXX)  # short: Ray's socket paths must fit 107 bytes
PORT=$((20000 + SLURM_JOB_ID % 20000))
# the head runs here (the first node); --block keeps it a child we can stop by pid
"$RAY" start --head --block --port=$PORT --num-cpus={cpus}{gpus} --temp-dir="$TMP" --include-dashboard=false \\
    --disable-usage-stats > "$TMP.head.log" 2>&1 &
HEAD=$!
for i in $(seq 120); do [ -s "$TMP/ray_current_cluster" ] && break; sleep 0.5; done
ADDR=$(cat "$TMP/ray_current_cluster" 2>/dev/null)
[ -n "$ADDR" ] || {{ echo "ray head did not start"; cat "$TMP.head.log"; kill $HEAD; exit 1; }}
echo "ray head at $ADDR"
WORKERS=
if [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then
  srun --nodes=$((SLURM_JOB_NUM_NODES - 1)) --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" \\
    "$RAY" start --address="$ADDR" --block --num-cpus={cpus}{gpus} --disable-usage-stats &
  WORKERS=$!
fi
trap 'kill -USR1 $DRIVER 2>/dev/null' USR1 TERM
"$PY" -m jobs.cli resume "$RUN" --address "$ADDR" --no-progress &
DRIVER=$!
while true; do wait $DRIVER; RC=$?; kill -0 $DRIVER 2>/dev/null || break; done
[ -n "$WORKERS" ] && kill $WORKERS 2>/dev/null
kill $HEAD 2>/dev/null; wait $HEAD 2>/dev/null
rm -rf "$TMP" "$TMP.head.log"
if [ "$RC" = {PREEMPTED_EXIT} ]; then echo "stopped after the current commits; requeueing"; scontrol requeue "$SLURM_JOB_ID"; fi
exit $RC
"""
    return _header("xs2t-ray", log_dir, o, lines) + body


def submit_slurm(location: str, options: SlurmOptions, script_dir: Optional[str] = None) -> str:
    """Write the sbatch script (RUN/slurm/ for local runs) and submit it; returns the Slurm job id."""
    store = RunStore(location)
    plan = read_plan(store)
    cfg = exec_config(store)
    if shutil.which("sbatch") is None:
        raise RunError("sbatch not found: Slurm submission needs the Slurm client tools")
    folder = script_dir or (store.path("slurm") if store.local else os.path.abspath("xs2t-slurm"))
    os.makedirs(folder, exist_ok=True)
    n_shards = max(r["shard"] for r in plan) + 1
    script = slurm_script(_run_location(store), options, n_shards, cfg.cpus_per_worker, folder)
    path = os.path.join(folder, f"xs2t-{options.mode}-{int(time.time())}.sbatch")
    with open(path, "w") as f:
        f.write(script)
    out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RunError(f"sbatch {path} failed: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    store.write_bytes(SLURM_JOB, json.dumps({"job_id": job_id, "mode": options.mode, "script": path,
                                             "submitted": time.time()}).encode())
    return job_id
