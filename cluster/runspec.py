"""The frozen job of a run (RUN/job.yaml, a jobs.spec.JobSpec) and the execution settings read from it.

Execution settings come from the spec's `resources:` (workers, cpus_per_worker, gpus_per_worker) and
`sharding:` (n_shards, max_attempts, backoff_s) sections; command-line options override them. The
processor class (`module:Class` with `.process(unit) -> dict[str, pa.Table]`, default the real
pipeline) is recorded in the spec's `frozen:` block, so resume and submitted jobs use the same one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Optional

from cluster.plan import plan_units, read_plan, write_plan
from cluster.store import RunStore
from jobs.errors import RunError, SpecError
from jobs.spec import FrozenInfo, JobSpec, freeze_info, load_job_text

JOB = "job.yaml"
DEFAULT_PROCESSOR = "jobs.pipeline:SegmentPipeline"


@dataclass(frozen=True)
class ExecConfig:
    processor: str = DEFAULT_PROCESSOR
    workers: Optional[int] = None
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    device: Optional[str] = None
    max_attempts: int = 3
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 60.0
    shards: Optional[int] = None

    def __post_init__(self) -> None:
        if self.device is None:
            object.__setattr__(self, "device", "cuda" if self.gpus_per_worker else "cpu")
        if self.max_attempts < 1 or self.cpus_per_worker < 1:
            raise SpecError("max_attempts and cpus_per_worker must be >= 1")

    @classmethod
    def from_spec(cls, spec: JobSpec, **overrides: Any) -> "ExecConfig":
        r, s = spec.resources, spec.sharding
        frozen = spec.frozen.model_dump() if spec.frozen else {}
        cfg = dict(processor=frozen.get("processor") or DEFAULT_PROCESSOR,
                   workers=None if r.workers == "auto" else r.workers,
                   cpus_per_worker=max(1, int(round(r.cpus_per_worker))), gpus_per_worker=r.gpus_per_worker,
                   max_attempts=s.max_attempts, retry_backoff_s=s.backoff_s,
                   shards=None if s.n_shards == "auto" else s.n_shards)
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)


def load_run_spec(store: RunStore) -> JobSpec:
    """The frozen spec of the run (what the processor gets)."""
    if not store.exists(JOB):
        raise RunError(f"{store.path(JOB)}: not a run directory (no {JOB})")
    return load_job_text(store.read_bytes(JOB).decode("utf-8"), store.path(JOB))


def _body(spec: JobSpec) -> dict:
    d = spec.to_dict()
    d.pop("frozen", None)
    d.get("output", {}).pop("run_dir", None)  # the same job may be addressed by another path
    return d


def spec_units(spec: JobSpec) -> list:
    """Work units of a job: every corpus segment crossed with every model."""
    from jobs.corpus import load_corpus, make_units

    return make_units([m.key for m in spec.models], load_corpus(spec.corpus))


def create_run(spec: JobSpec, units: Optional[Iterable[Any]] = None, run_dir: Optional[str] = None,
               shards: Optional[int] = None, processor: Optional[str] = None) -> RunStore:
    """Freeze the job and write the plan; an existing run must hold the same job (it is then reused)."""
    store = RunStore(run_dir or spec.output.run_dir)
    if store.exists(JOB):
        old = load_run_spec(store)
        if _body(old) != _body(spec):
            raise RunError(f"{store.path(JOB)}: this run directory holds a different job; "
                           f"choose another output.run_dir, or continue it with `xs2t resume`")
        read_plan(store)
        return store
    units = list(spec_units(spec) if units is None else units)
    if not units:
        raise RunError("plan: the job selects no segments")
    cfg = ExecConfig.from_spec(spec)
    n_shards = shards or cfg.shards or max(1, min(len(units), 64, -(-len(units) // 8)))
    write_plan(store, plan_units(units, n_shards))
    info = freeze_info()
    info["processor"] = processor or DEFAULT_PROCESSOR
    frozen = spec.model_copy(update={"frozen": FrozenInfo(**info)})
    store.write_bytes(JOB, frozen.resolved_yaml().encode("utf-8"))  # last: a job.yaml means the plan is there
    return store


def exec_config(store: RunStore, **overrides: Any) -> ExecConfig:
    return ExecConfig.from_spec(load_run_spec(store), **overrides)


def with_overrides(cfg: ExecConfig, **overrides: Any) -> ExecConfig:
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
