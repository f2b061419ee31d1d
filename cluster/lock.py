"""RUN/LOCK: held by the one live driver (or one array task per shard: RUN/locks/shard=<k>).

A lock whose holder is gone is taken over: on the same host when its pid no longer runs, and
anywhere when it belongs to the same Slurm job (a requeued job restarts on any node).
"""
from __future__ import annotations

import json
import os
import socket
import time

from cluster.store import RunStore
from jobs.errors import RunError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its parent) is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _slurm_job() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


class RunLock:
    def __init__(self, store: RunStore, name: str = "LOCK"):
        self.store, self.name, self.held = store, name, False
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "slurm_job": _slurm_job()}

    def _stale(self, other: dict) -> bool:
        if other.get("slurm_job") and other["slurm_job"] == self.record["slurm_job"]:
            return True
        return other.get("host") == self.record["host"] and not _pid_alive(int(other.get("pid", -1)))

    def _create(self) -> bool:
        data = json.dumps(self.record).encode()
        if self.store.local:  # O_EXCL: exactly one of two racing drivers wins
            path = self.store.path(self.name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.store.exists(self.name):  # object stores: best effort (no create-if-absent)
            return False
        self.store.write_bytes(self.name, data)
        return True

    def acquire(self) -> "RunLock":
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            try:
                other = json.loads(self.store.read_bytes(self.name))
            except (FileNotFoundError, ValueError):
                continue  # released or half-written by a racing writer: try again
            if not self._stale(other):
                raise RunError(
                    f"{self.store.path(self.name)}: run is locked by pid {other.get('pid')} on "
                    f"{other.get('host')} since {time.ctime(other.get('time', 0))}; if that driver is "
                    f"dead, delete the lock file"
                )
            self.store.delete(self.name)  # holder is gone: take over
        raise RunError(f"{self.store.path(self.name)}: could not take the run lock")

    def release(self) -> None:
        if self.held:
            self.store.delete(self.name)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
