"""CLI commands that run jobs: run, resume, status, submit, run-shard (registered by jobs.cli)."""
from __future__ import annotations

import json
import os
from typing import Optional

import typer

from jobs.errors import RunError

ADDRESS = typer.Option(None, "--address", help="Ray cluster to use (host:port, or 'auto'); default: start a local Ray.")
WORKERS = typer.Option(None, "--workers", min=1, help="Model actors (default: resources.workers, else all CPUs/GPUs).")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show the progress bar (on a terminal).")


def _prepare(job: str, run_dir: Optional[str], shards: Optional[int], processor: Optional[str]):
    """A job file -> a prepared run directory (frozen job + plan); a run directory is used as is."""
    from cluster.runspec import JOB, create_run
    from cluster.store import RunStore
    from jobs.spec import load_job

    if "://" in job or os.path.isdir(job):
        store = RunStore(job)
        if not store.exists(JOB):
            raise RunError(f"{job}: not a job file nor a run directory (no {JOB})")
        return store
    spec = load_job(job)
    return create_run(spec, run_dir=run_dir, shards=shards, processor=processor)


def _finish(summary) -> None:
    from cluster.driver import PREEMPTED_EXIT

    typer.echo(summary.line())
    for unit, err in list(summary.errors.items())[:10]:
        typer.secho(f"failed: {unit}: {err.splitlines()[0]}", fg=typer.colors.YELLOW, err=True)
    if summary.stopped:
        raise typer.Exit(PREEMPTED_EXIT)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(job: str = typer.Argument(..., help="Job file (YAML); or a run directory to continue."),
            address: Optional[str] = ADDRESS, workers: Optional[int] = WORKERS,
            run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Override output.run_dir (path or URI)."),
            shards: Optional[int] = typer.Option(None, "--shards", min=1, help="Override sharding.n_shards."),
            processor: Optional[str] = typer.Option(None, "--processor", help="module:Class processing one unit (default: the real pipeline)."),
            progress: bool = PROGRESS) -> None:
        """Plan the job into its run directory and process every segment on Ray (local unless --address)."""
        from cluster.driver import drive

        store = _prepare(job, run_dir, shards, processor)
        typer.echo(f"run directory: {store.location}")
        _finish(drive(store.location, address=address, workers=workers, progress=None if progress else False))

    @app.command("resume")
    def resume(run_dir: str = typer.Argument(..., help="Run directory (path or URI)."),
               address: Optional[str] = ADDRESS, workers: Optional[int] = WORKERS, progress: bool = PROGRESS) -> None:
        """Process only the units of RUN that are missing or failed."""
        from cluster.driver import drive

        _finish(drive(run_dir, address=address, workers=workers, progress=None if progress else False))

    @app.command("status")
    def status(run_dir: str = typer.Argument(..., help="Run directory (path or URI)."),
               as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
        """Done / failed / pending units per shard and language pair, and the Ray/Slurm job state."""
        from cluster.status import print_status, run_status

        info = run_status(run_dir)
        if as_json:
            typer.echo(json.dumps(info, indent=1, default=str))
        else:
            print_status(info)

    @app.command("submit")
    def submit(job: str = typer.Argument(..., help="Job file (YAML), or a prepared run directory."),
               ray: Optional[str] = typer.Option(None, "--ray", help="Ray job API of a running cluster, e.g. http://HEAD:8265."),
               slurm: bool = typer.Option(False, "--slurm", help="Submit to Slurm with sbatch."),
               mode: str = typer.Option("ray", "--mode", help="Slurm: 'ray' (Ray inside the allocation) or 'array' (one task per shard)."),
               partition: Optional[str] = typer.Option(None, "--partition"),
               nodes: int = typer.Option(1, "--nodes", min=1),
               gpus_per_node: int = typer.Option(0, "--gpus-per-node", min=0),
               cpus_per_node: Optional[int] = typer.Option(None, "--cpus-per-node", min=1),
               time_limit: Optional[str] = typer.Option(None, "--time", help="Slurm time limit, e.g. 04:00:00."),
               max_parallel: Optional[int] = typer.Option(None, "--max-parallel", min=1, help="Array mode: tasks at once."),
               python: Optional[str] = typer.Option(None, "--python", help="Python on the cluster (default: 'python' for Ray, this one for Slurm)."),
               run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Override output.run_dir (must be reachable from the cluster)."),
               shards: Optional[int] = typer.Option(None, "--shards", min=1),
               processor: Optional[str] = typer.Option(None, "--processor")) -> None:
        """Hand the run to a Ray cluster or to Slurm; follow it with `xs2t status RUN`."""
        if bool(ray) == slurm:
            raise RunError("submit: give exactly one of --ray ADDRESS or --slurm")
        store = _prepare(job, run_dir, shards, processor)
        if ray:
            from cluster.submit import submit_ray

            sid = submit_ray(store.location, ray, python=python or "python")
            typer.echo(f"submitted Ray job {sid} to {ray}; run directory {store.location}")
        else:
            from cluster.submit import SlurmOptions, submit_slurm

            opts = SlurmOptions(mode=mode, partition=partition, nodes=nodes, gpus_per_node=gpus_per_node,
                                cpus_per_node=cpus_per_node, time=time_limit, max_parallel=max_parallel)
            if python:
                opts.python = python
            job_id = submit_slurm(store.location, opts)
            typer.echo(f"submitted Slurm job {job_id} ({mode} mode); run directory {store.location}")

    @app.command("run-shard")
    def run_shard(run_dir: str = typer.Argument(..., help="Run directory (path or URI)."),
                  shard: int = typer.Option(..., "--shard", min=0, help="Plan shard to process."),
                  requeue: bool = typer.Option(True, "--requeue/--no-requeue", help="On SIGUSR1/SIGTERM, requeue the Slurm job.")) -> None:
        """Process one shard in this process, without Ray (what a Slurm array task runs)."""
        from cluster.shard_worker import main

        args = [run_dir, "--shard", str(shard)] + ([] if requeue else ["--no-requeue"])
        raise typer.Exit(main(args))
