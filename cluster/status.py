"""`xs2t status RUN`: what the files say (done / failed / pending per shard and language pair),
plus the lock holder and the state of a Ray or Slurm job the run was submitted as."""
from __future__ import annotations

import collections
import json
import subprocess

from cluster.plan import read_plan
from cluster.store import RunStore

RAY_JOB = "ray_job.json"
SLURM_JOB = "slurm_job.json"


def _count(rows: list[dict], status: dict, key) -> dict:
    out: dict = collections.defaultdict(lambda: {"done": 0, "failed": 0, "pending": 0})
    for r in rows:
        s = status.get(r["unit_id"])
        out[key(r)]["done" if s == "ok" else "failed" if s == "failed" else "pending"] += 1
    return dict(sorted(out.items()))


def ray_job_state(info: dict) -> str:
    try:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(info["address"]).get_job_status(info["submission_id"]).value)
    except Exception as exc:  # noqa: BLE001 -- the cluster may be gone; say so instead of failing
        return f"unknown ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def slurm_job_state(info: dict) -> str:
    job = str(info["job_id"])
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode == 0 and lines:
        states = collections.Counter(ln.split()[1] for ln in lines)
        return ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return f"unknown (squeue: {out.stderr.strip()[:120]})"
    return "not in queue (finished)"


def run_status(location: str) -> dict:
    store = RunStore(location)
    plan = read_plan(store)
    status = store.committed()
    info: dict = {
        "run": store.location,
        "total": len(plan),
        "totals": _count(plan, status, lambda r: "all")["all"] if plan else {"done": 0, "failed": 0, "pending": 0},
        "shards": _count(plan, status, lambda r: r["shard"]),
        "pairs": _count(plan, status, lambda r: f"{r['model_key']} {r['task']} {r['src_lang']}-{r['tgt_lang']}"),
        "failed_units": sorted(u for u, s in status.items() if s == "failed"),
    }
    if store.exists("LOCK"):
        info["lock"] = json.loads(store.read_bytes("LOCK"))
    if store.exists(RAY_JOB):
        job = json.loads(store.read_bytes(RAY_JOB))
        info["ray_job"] = dict(job, state=ray_job_state(job))
    if store.exists(SLURM_JOB):
        job = json.loads(store.read_bytes(SLURM_JOB))
        info["slurm_job"] = dict(job, state=slurm_job_state(job))
    return info


def print_status(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = info["totals"]
    console.print(f"[bold]{info['run']}[/]: {info['total']} units: {t['done']} done, {t['failed']} failed, {t['pending']} pending", soft_wrap=True)
    for title, rows in (("shard", info["shards"]), ("model task pair", info["pairs"])):
        table = Table(title=None)
        for col in (title, "done", "failed", "pending"):
            table.add_column(col, justify="left" if col == title else "right")
        for key, c in rows.items():
            table.add_row(str(key), str(c["done"]), str(c["failed"]), str(c["pending"]))
        console.print(table)
    if info.get("lock"):
        lk = info["lock"]
        console.print(f"lock: pid {lk.get('pid')} on {lk.get('host')}")
    if info.get("ray_job"):
        j = info["ray_job"]
        console.print(f"ray job {j['submission_id']} at {j['address']}: {j['state']}")
    if info.get("slurm_job"):
        j = info["slurm_job"]
        console.print(f"slurm job {j['job_id']} ({j.get('mode')}): {j['state']}")
    if info["failed_units"]:
        console.print(f"failed: {', '.join(info['failed_units'][:10])}" + (" ..." if len(info["failed_units"]) > 10 else ""))
