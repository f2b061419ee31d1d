"""The job spec: one YAML file says which corpus, which models, which method settings, how to shard
and where to write. Validation errors name the field (`method.p_input: ...`).

Relative local paths in the file (corpus root, model files, run_dir) are resolved against the job
file's folder, so the resolved spec (frozen into RUN/job.yaml) is self-contained.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.errors import SpecError

Pooling = Literal["2d_max", "2d_avg", "1d_max_1d_avg"]
PAIR_RE = re.compile(r"^[a-z]{2,3}-[a-z]{2,3}$")


def task_of(pair: str) -> str:
    """en-en -> asr (output in the spoken language); en-it -> st."""
    src, tgt = pair.split("-")
    return "asr" if src == tgt else "st"


def _auto_or_positive(v: Any) -> Any:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"must be 'auto' or a positive integer, got {v!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TsvColumns(_Strict):
    """Column names of a fairseq-S2T manifest."""
    id: str = "id"
    audio: str = "audio"
    n_frames: Optional[str] = "n_frames"
    tgt_text: str = "tgt_text"
    src_text: Optional[str] = "src_text"
    speaker: Optional[str] = "speaker"


class CorpusSpec(_Strict):
    kind: Literal["europarl", "tsv", "folder"]
    root: str = Field(validation_alias=AliasChoices("root", "path"))
    pairs: list[str] = Field(default_factory=lambda: ["en-en"], min_length=1)
    split: str = "test"
    max_segments: Optional[int] = Field(default=None, ge=1)
    name: Optional[str] = None
    audio_root: Optional[str] = None
    columns: TsvColumns = Field(default_factory=TsvColumns)

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, pairs: list[str]) -> list[str]:
        for p in pairs:
            if not PAIR_RE.match(p):
                raise ValueError(f"{p!r} is not a language pair like 'en-en' or 'en-it'")
        if len(set(pairs)) != len(pairs):
            raise ValueError("pairs are repeated")
        return pairs

    @model_validator(mode="after")
    def _one_pair(self) -> "CorpusSpec":
        if self.kind in ("tsv", "folder") and len(self.pairs) != 1:
            raise ValueError(f"a {self.kind} corpus holds one language pair; got {self.pairs}")
        return self

    @property
    def corpus_name(self) -> str:
        return self.name or Path(self.root).stem


class ModelSpec(_Strict):
    key: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    name_or_path: str
    spm: Optional[str] = None
    dict_path: Optional[str] = Field(default=None, validation_alias=AliasChoices("dict", "dict_path"),
                                     serialization_alias="dict")   # fairseq dictionary file
    config_yaml: Optional[str] = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    lang: Optional[str] = None     # force this output-language tag instead of the pair's
    task: Optional[Literal["transcribe", "translate"]] = None  # force the task token (Whisper)


class BeamSpec(_Strict):
    beam_size: int = Field(5, ge=1)
    no_repeat_ngram_size: int = Field(5, ge=0)
    len_penalty: float = 1.0
    max_len_a: float = Field(0.0, ge=0)
    max_len_b: int = Field(200, ge=1)
    min_len: int = Field(1, ge=0)


class MethodSpec(_Strict):
    n_input: int = Field(20000, ge=0)
    n_encoder: int = Field(20000, ge=0)
    p_input: float = Field(0.5, gt=0, lt=1)
    p_encoder: float = Field(0.7, gt=0, lt=1)
    seed: int = 0
    pooling: list[Pooling] = Field(default_factory=lambda: ["2d_max", "2d_avg", "1d_max_1d_avg"], min_length=1)
    segments_per_second: list[int] = Field(default_factory=lambda: [400, 500, 600], min_length=1)
    threshold_frames: int = Field(750, ge=1)
    compactness: float = Field(0.1, gt=0)
    sigma: float = Field(0.0, ge=0)
    occlusion: Literal["bin_mean", "zero"] = "bin_mean"
    p_encoder_sweep: list[float] = Field(default_factory=list)
    deletion: bool = False
    size: bool = False
    target_reliability: Optional[float] = Field(default=None, gt=0, le=1)
    beam: BeamSpec = Field(default_factory=BeamSpec)

    @field_validator("pooling")
    @classmethod
    def _unique_pooling(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("pooling methods are repeated")
        return v

    @field_validator("p_encoder_sweep")
    @classmethod
    def _probs(cls, v: list[float]) -> list[float]:
        bad = [p for p in v if not 0 < p < 1]
        if bad:
            raise ValueError(f"probabilities must lie in (0, 1); got {bad}")
        return v

    @field_validator("segments_per_second")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b <= 0 for b in v):
            raise ValueError("segments per second must be positive")
        return v

    @property
    def headline_pooling(self) -> str:
        return self.pooling[0]


class ShardingSpec(_Strict):
    n_shards: Union[Literal["auto"], int] = "auto"
    max_attempts: int = Field(3, ge=1)
    backoff_s: float = Field(1.0, ge=0)
    mask_block: Optional[int] = Field(default=None, ge=1)

    @field_validator("n_shards", mode="before")
    @classmethod
    def _n(cls, v):
        return _auto_or_positive(v)


class ResourcesSpec(_Strict):
    workers: Union[Literal["auto"], int] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    memory_budget_gb: Optional[float] = Field(default=None, gt=0)

    @field_validator("workers", mode="before")
    @classmethod
    def _w(cls, v):
        return _auto_or_positive(v)


class OutputSpec(_Strict):
    run_dir: str


class FrozenInfo(BaseModel):
    """Written by the driver into RUN/job.yaml: what code and libraries produced the run."""
    model_config = ConfigDict(extra="allow")
    code_version: str
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: Optional[str] = None


class JobSpec(_Strict):
    name: Optional[str] = None
    corpus: CorpusSpec
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(key="whisper-base", name_or_path="whisper-base")],
                                    min_length=1)
    method: MethodSpec = Field(default_factory=MethodSpec)
    sharding: ShardingSpec = Field(default_factory=ShardingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec
    frozen: Optional[FrozenInfo] = None

    @field_validator("models")
    @classmethod
    def _unique_keys(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        keys = [m.key for m in v]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"model keys must be unique; repeated: {dup}")
        return v

    # the tasks the pairs imply: [(pair, src, tgt, task)]
    def tasks(self) -> list[tuple[str, str, str, str]]:
        return [(p, *p.split("-"), task_of(p)) for p in self.corpus.pairs]

    def model(self, key: str) -> ModelSpec:
        for m in self.models:
            if m.key == key:
                return m
        raise SpecError(f"models: no model with key {key!r}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def resolved_yaml(self) -> str:
        """The full spec with every default filled in (what RUN/job.yaml holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def frozen_copy(self) -> "JobSpec":
        """This spec with the code and library versions recorded (for RUN/job.yaml)."""
        return self.model_copy(update={"frozen": FrozenInfo(**freeze_info())})


# ---- loading ------------------------------------------------------------------------------------
def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _known_fields(loc: tuple) -> list[str]:
    """Field names allowed at the parent of `loc` (for 'did you mean')."""
    model: Any = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(exc: ValidationError, source: str = "job") -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _known_fields(loc), n=1)
            msg = "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        line = f"  {_loc(loc)}: {msg}"
        if line not in lines:
            lines.append(line)
    return f"{source}: invalid job spec\n" + "\n".join(lines)


def _resolve_path(value: Optional[str], base: Path, must_exist: bool = False) -> Optional[str]:
    if value is None or "://" in value or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value) if value and "://" not in value else value
    candidate = (base / value).resolve()
    if must_exist and not candidate.exists():
        return value  # a model name such as "whisper-base", not a path
    return str(candidate)


def spec_from_dict(data: Any, source: str = "job", base_dir: Optional[Path] = None) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job file must be a YAML mapping (corpus:, models:, method:, ...)")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source)) from None
    if base_dir is not None:
        c = spec.corpus
        c.root = _resolve_path(c.root, base_dir)
        c.audio_root = _resolve_path(c.audio_root, base_dir)
        for m in spec.models:
            m.name_or_path = _resolve_path(m.name_or_path, base_dir, must_exist=True)
            for attr in ("spm", "dict_path", "config_yaml"):
                setattr(m, attr, _resolve_path(getattr(m, attr), base_dir))
        spec.output.run_dir = _resolve_path(spec.output.run_dir, base_dir)
    return spec


def load_job(path: str | os.PathLike) -> JobSpec:
    """Read and validate a job file; raises SpecError naming the file, field and reason."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: job file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    spec = spec_from_dict(data, str(path), path.resolve().parent)
    if spec.name is None:
        spec.name = path.stem
    return spec


def load_job_text(text: str, source: str = "job", base_dir: Optional[Path] = None) -> JobSpec:
    """Validate a spec given as YAML text (e.g. RUN/job.yaml read from an object store)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML ({exc})") from None
    return spec_from_dict(data, source, base_dir)


# ---- versions -------------------------------------------------------------------------------------
def code_version() -> str:
    """`git describe` of the source tree when available, else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version
        return f"xs2t {version('xs2t')}"
    except Exception:
        return "unknown"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib, dist in (("torch", "torch"), ("numpy", "numpy"), ("skimage", "scikit-image"), ("pyarrow", "pyarrow"),
                      ("ray", "ray"), ("xs2t", "xs2t")):
        try:
            out[lib] = version(dist)
        except PackageNotFoundError:
            out[lib] = "not installed"
    return out


def freeze_info() -> dict[str, Any]:
    return {"code_version": code_version(), "versions": library_versions(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_job_yaml(spec: JobSpec, run_dir: Optional[str] = None) -> str:
    """Freeze `spec` (versions added if missing) into RUN/job.yaml (local or URI); returns the path."""
    from jobs.schema import run_filesystem

    frozen = spec if spec.frozen else spec.frozen_copy()
    fs, root = run_filesystem(run_dir or spec.output.run_dir)
    fs.create_dir(root, recursive=True)
    target = f"{root.rstrip('/')}/job.yaml"
    with fs.open_output_stream(target) as f:
        f.write(frozen.resolved_yaml().encode("utf-8"))
    return target


def read_job_yaml(run_dir: str) -> Optional[JobSpec]:
    """The frozen spec of a run, or None when the run has no job.yaml."""
    import pyarrow.fs as pafs
    from jobs.schema import run_filesystem

    fs, root = run_filesystem(run_dir)
    target = f"{root.rstrip('/')}/job.yaml"
    if fs.get_file_info(target).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(target) as f:
        return load_job_text(f.read().decode("utf-8"), f"{run_dir}/job.yaml")


# ---- init-job -------------------------------------------------------------------------------------
_TEMPLATE = """\
# xs2t job file. Every field below is documented; delete a line to get its default.
# Run it with:  xs2t run {out_name}   (it is validated first; errors name the field)
name: {name}

corpus:
  # europarl: EuroParl-ST v1.1 layout <root>/<src>/<tgt>/<split>/segments.lst (+ audios/<id>.m4a)
  # tsv:      a fairseq-S2T manifest (id, audio, n_frames, tgt_text, speaker, src_text); audio must be
  #           a wav/flac path or "path:offset:length" in samples (fbank .npy files are not audio)
  # folder:   a folder of audio files; the reference is read from <file>.txt beside each one if present
  kind: {kind}
  root: {root}
  # Language pairs "src-tgt". src == tgt is transcription (ASR), otherwise translation (ST).
  pairs: [{pairs}]
  split: test            # europarl sub-folder to read (test, dev, train)
  max_segments: null     # keep only the first N segments of each pair (null = all)

models:
  # key: short name used in unit ids and tables; name_or_path: a known model name or a checkpoint.
  # spm / dict / config_yaml: fairseq (FBK) models only. dtype: float32 or bfloat16 (never float16 on CPU).
  - key: {model_key}
    name_or_path: {model}
    dtype: float32

method:
  n_input: {n_input}        # N_X, SPES masks over the input features (paper: 20000)
  n_encoder: {n_encoder}      # N_H, masks over the encoder states (paper: 20000)
  p_input: 0.5          # p_X, probability of occluding a superpixel
  p_encoder: 0.7        # p_H, probability of zeroing an encoder state
  seed: 0               # masks are a pure function of (seed, segment, level, index)
  pooling: [2d_max, 2d_avg, 1d_max_1d_avg]   # SM^X -> CA grid; the first one is the headline
  segments_per_second: [400, 500, 600]       # SLIC levels (superpixels per second of audio)
  threshold_frames: 750  # utterances longer than this keep the superpixel counts of 750 frames
  compactness: 0.1       # SLIC compactness
  sigma: 0.0             # SLIC Gaussian smoothing (paper: 0; the SPES code default is 1)
  occlusion: bin_mean    # value of occluded cells: bin_mean (per-bin utterance mean) or zero
  p_encoder_sweep: []    # extra p_H values for the Table 6 sweep, e.g. [0.1, 0.3, 0.5, 0.9]
  deletion: false        # faithfulness: deletion curves (many extra decodes per utterance)
  size: false            # faithfulness: explanation size
  target_reliability: null   # stop adding masks once split-half reliability reaches this (null = run N)
  beam: {{beam_size: 5, no_repeat_ngram_size: 5, len_penalty: 1.0, max_len_a: 0, max_len_b: 200, min_len: 1}}

sharding:
  n_shards: auto         # work units are grouped into shards (auto: from the number of units)
  max_attempts: 3        # a failing unit is retried this many times, then recorded as failed
  backoff_s: 1.0         # wait before a retry (doubles each time)
  mask_block: null       # split one utterance's masks into blocks of this many (null = no split)

resources:
  workers: auto          # parallel workers (auto: as many as the CPUs/GPUs allow)
  cpus_per_worker: 1
  gpus_per_worker: 0
  memory_budget_gb: null # per worker; batches are sized to fit (null = a safe default)

output:
  run_dir: {run_dir}     # local folder or a URI such as s3://bucket/prefix
"""


def init_job(corpus: str, model: str, out: str | os.PathLike, pairs: Optional[list[str]] = None,
             n_input: int = 20000, n_encoder: int = 20000, run_dir: Optional[str] = None,
             kind: Optional[str] = None) -> Path:
    """Write a commented job file for `corpus` and `model`; checks that it loads back."""
    out = Path(out)
    corpus_path = Path(corpus)
    if kind is None:
        kind = "tsv" if corpus_path.suffix == ".tsv" else (
            "folder" if corpus_path.is_dir() and not any((corpus_path / p).is_dir() for p in ("en", "it", "de", "es", "fr"))
            else "europarl")
    if not pairs:
        pairs = _detect_pairs(corpus_path) if kind == "europarl" else ["en-en"]
    key = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(model).stem if os.sep in model else model).strip("-") or "model"
    root = os.path.abspath(corpus) if "://" not in corpus else corpus
    run = run_dir or str(Path("runs") / out.stem)
    text = _TEMPLATE.format(out_name=out.name, name=out.stem, kind=kind, root=_q(root), pairs=", ".join(pairs),
                            model_key=key, model=_q(model), n_input=n_input, n_encoder=n_encoder, run_dir=_q(run))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    load_job(out)  # fail here, not at run time, if the arguments make an invalid spec
    return out


def _q(value: str) -> str:
    return yaml.safe_dump(value, default_style=None).strip().removesuffix("...").strip()


def _detect_pairs(root: Path) -> list[str]:
    pairs = sorted(f"{s.name}-{t.name}" for s in root.glob("*") if s.is_dir()
                   for t in s.glob("*") if t.is_dir() and t.name != "audios")
    return pairs or ["en-en"]
