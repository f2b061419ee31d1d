"""A real single-node Slurm (munged + slurmctld + slurmd) on loopback for tests.

State lives in a folder the caller gives (pytest's tmp dir); ports are free ones; the daemons are
stopped by the pids recorded at start. Needs root and the Debian packages slurm-wlm and munge.
Use the `slurm` fixture: it yields a LocalSlurm with SLURM_CONF exported for the test session.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus, self.procs = Path(root), cpus, {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        S, sock = self.root, self.root / "munge" / "run" / "munge.socket"
        self.conf.write_text(f"""ClusterName=xs2ttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={S}/state
SlurmdSpoolDir={S}/spool/slurmd-%n
SlurmctldPidFile={S}/run/slurmctld.pid
SlurmdPidFile={S}/run/slurmd-%n.pid
SlurmctldLogFile={S}/log/slurmctld.log
SlurmdLogFile={S}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
# AF_UNSPEC lookups: in a loopback-only network namespace glibc's AF_INET + AI_ADDRCONFIG finds no
# address (loopback does not count), so without this the daemons cannot bind
CommunicationParameters=EnableIPv6
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={S}/log/jobcomp.txt
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
MaxArraySize=1001
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def up(self) -> "LocalSlurm":
        S = self.root
        for d in ("etc", "munge/etc", "munge/run", "munge/lib", "state", "spool/slurmd-localhost", "log", "run"):
            (S / d).mkdir(parents=True, exist_ok=True)
        os.chmod(S / "munge" / "etc", 0o700)
        key = S / "munge" / "etc" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._write_conf()
        sock = S / "munge" / "run" / "munge.socket"
        self._start("munged", ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--log-file={S}/log/munged.log", f"--pid-file={S}/munge/run/munged.pid",
                               f"--seed-file={S}/munge/lib/munged.seed"])
        self._wait(lambda: sock.exists(), "munged")
        self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._start("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False), "slurm node")
        return self

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(f.read_text()[-2000:] for f in (self.root / "log").glob("*") if f.is_file())
                self.down()
                raise RuntimeError(f"{what} did not come up (dead: {dead})\n{logs}")
            time.sleep(0.1)

    def run(self, *argv: str, check: bool = True) -> str:
        out = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
        return out.stdout

    def queue(self, job_id: str) -> list[str]:
        """States of the job's (array) tasks still in the queue ([] once it has left)."""
        for _ in range(20):
            out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=self.env, capture_output=True,
                                 text=True, timeout=60)
            if out.returncode == 0 or "Invalid job id" in out.stderr:
                return out.stdout.split()
            time.sleep(0.5)  # a busy controller: an error is not "gone"
        raise RuntimeError(f"squeue -j {job_id}: {out.stderr.strip()}")

    def wait_gone(self, job_id: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while self.queue(job_id):
            if time.time() > deadline:
                raise TimeoutError(f"slurm job {job_id} still queued: {self.queue(job_id)}")
            time.sleep(0.5)

    def down(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, monkeypatch_module):
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        raise RuntimeError("the Slurm tests need root and the packages slurm-wlm and munge (see tests/run.sh)")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).up()
    monkeypatch_module.setenv("SLURM_CONF", str(cluster.conf))
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
