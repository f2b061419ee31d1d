"""Job spec: validation errors name the field, defaults, path resolution, freezing, init-job round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.errors import SpecError
from jobs.spec import JobSpec, init_job, load_job, read_job_yaml, spec_from_dict, task_of, write_job_yaml

MINIMAL = {"corpus": {"kind": "europarl", "root": "corpus", "pairs": ["en-en", "en-it"]},
           "output": {"run_dir": "runs/r1"}}


def _error(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, "job.yaml")
    return str(info.value)


def test_defaults_and_tasks():
    spec = spec_from_dict(MINIMAL)
    assert spec.models[0].key == "whisper-base" and spec.models[0].dtype == "float32"
    m = spec.method
    assert (m.n_input, m.n_encoder, m.p_input, m.p_encoder, m.seed) == (20000, 20000, 0.5, 0.7, 0)
    assert m.pooling == ["2d_max", "2d_avg", "1d_max_1d_avg"] and m.headline_pooling == "2d_max"
    assert (m.segments_per_second, m.threshold_frames, m.compactness, m.sigma) == ([400, 500, 600], 750, 0.1, 0.0)
    assert m.occlusion == "bin_mean" and not m.deletion and not m.size and m.target_reliability is None
    assert m.beam.beam_size == 5 and m.beam.no_repeat_ngram_size == 5
    assert spec.sharding.n_shards == "auto" and spec.sharding.max_attempts == 3
    assert spec.resources.workers == "auto" and spec.corpus.split == "test"
    assert spec.tasks() == [("en-en", "en", "en", "asr"), ("en-it", "en", "it", "st")]
    assert task_of("it-it") == "asr" and task_of("it-en") == "st"


def test_errors_name_every_bad_field():
    data = {**MINIMAL,
            "corpus": {"kind": "europarl", "root": "c", "pairs": ["en-en", "english"]},
            "models": [{"key": "a b", "name_or_path": "m", "dtype": "float16"}],
            "method": {"n_imput": 5, "p_input": 1.5, "pooling": ["2d_max", "3d_max"], "n_encoder": -1},
            "sharding": {"n_shards": 0},
            "resources": {"workers": "many"}}
    msg = _error(data)
    assert msg.startswith("job.yaml: invalid job spec")
    for line in ("corpus.pairs: 'english' is not a language pair",
                 "models[0].key: String should match pattern",
                 "models[0].dtype: Input should be 'float32' or 'bfloat16'",
                 "method.p_input: Input should be less than 1",
                 "method.pooling[1]: Input should be '2d_max'",
                 "method.n_imput: unknown field (did you mean 'n_input'?)",
                 "method.n_encoder: Input should be greater than or equal to 0",
                 "sharding.n_shards: must be 'auto' or a positive integer, got 0",
                 "resources.workers: must be 'auto' or a positive integer, got 'many'"):
        assert line in msg, (line, msg)


def test_more_errors():
    assert "output: required field is missing" in _error({"corpus": MINIMAL["corpus"]})
    assert "corpus.kind: Input should be 'europarl', 'tsv' or 'folder'" in _error({**MINIMAL, "corpus": {"kind": "csv", "root": "x"}})
    assert "corpus: a tsv corpus holds one language pair" in _error(
        {**MINIMAL, "corpus": {"kind": "tsv", "root": "x.tsv", "pairs": ["en-en", "en-it"]}})
    assert "models: model keys must be unique" in _error(
        {**MINIMAL, "models": [{"key": "a", "name_or_path": "x"}, {"key": "a", "name_or_path": "y"}]})
    assert "method.p_encoder_sweep: probabilities must lie in (0, 1)" in _error({**MINIMAL, "method": {"p_encoder_sweep": [0.5, 1.2]}})
    assert "method.occlusion: Input should be 'bin_mean' or 'zero'" in _error({**MINIMAL, "method": {"occlusion": "noise"}})
    assert "corpus.max_segments: Input should be greater than or equal to 1" in _error(
        {**MINIMAL, "corpus": {**MINIMAL["corpus"], "max_segments": 0}})
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        spec_from_dict(["not", "a", "mapping"])


def test_yaml_errors_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus:\n  kind: europarl\n  root: [unclosed\noutput: {run_dir: r}\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+, column \d+ not valid YAML"):
        load_job(bad)
    with pytest.raises(SpecError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


def test_paths_resolve_against_the_job_file_and_yaml_round_trips(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    job = tmp_path / "jobs" / "j.yaml"
    job.parent.mkdir()
    data = {**MINIMAL, "models": [{"key": "fbk", "name_or_path": "../ckpt.pt", "spm": "../spm.model", "dict": "d.txt"},
                                  {"key": "wb", "name_or_path": "whisper-base"}]}
    job.write_text(yaml.safe_dump(data))
    spec = load_job(job)
    assert spec.name == "j"
    assert spec.corpus.root == str(tmp_path / "jobs" / "corpus")
    assert spec.output.run_dir == str(tmp_path / "jobs" / "runs" / "r1")
    assert spec.models[0].name_or_path == str(tmp_path / "ckpt.pt")
    assert spec.models[0].dict_path == str(tmp_path / "jobs" / "d.txt")
    assert spec.models[1].name_or_path == "whisper-base"  # a model name, not a path
    text = spec.resolved_yaml()
    assert "dict: " in text and "dict_path" not in text
    again = spec_from_dict(yaml.safe_load(text))
    assert again == spec


def test_freeze_into_run_dir(tmp_path):
    spec = spec_from_dict({**MINIMAL, "output": {"run_dir": str(tmp_path / "run")}})
    path = write_job_yaml(spec)
    assert Path(path).is_file()
    frozen = read_job_yaml(str(tmp_path / "run"))
    assert frozen.frozen is not None and frozen.frozen.code_version
    assert set(frozen.frozen.versions) >= {"torch", "numpy", "skimage", "pyarrow", "ray", "xs2t"}
    assert frozen.frozen.versions["numpy"][0].isdigit()
    assert frozen.model_copy(update={"frozen": None}) == spec
    assert read_job_yaml(str(tmp_path / "nothing")) is None


def test_init_job_writes_a_commented_file_that_loads(tmp_path):
    corpus = tmp_path / "corpus"
    for pair in ("en/en", "en/it", "it/it"):
        (corpus / pair / "test").mkdir(parents=True)
    (corpus / "en" / "audios").mkdir()
    out = init_job(str(corpus), "whisper-base", tmp_path / "job.yaml", None, 300, 200, None)
    text = out.read_text()
    assert text.count("#") > 30  # comments explain the fields
    spec = load_job(out)
    assert spec.corpus.kind == "europarl" and spec.corpus.pairs == ["en-en", "en-it", "it-it"]
    assert (spec.method.n_input, spec.method.n_encoder) == (300, 200)
    assert spec.models[0].name_or_path == "whisper-base"
    assert spec.output.run_dir == str(tmp_path / "runs" / "job")
    tsv = tmp_path / "m.tsv"
    tsv.write_text("id\taudio\tn_frames\ttgt_text\n")
    spec = load_job(init_job(str(tsv), "fbk", tmp_path / "j2.yaml", ["it-en"], 10, 10, "s3://bucket/prefix"))
    assert spec.corpus.kind == "tsv" and spec.corpus.pairs == ["it-en"] and spec.output.run_dir == "s3://bucket/prefix"


def test_init_job_cli(tmp_path):
    (tmp_path / "audio").mkdir()
    result = CliRunner().invoke(app, ["init-job", "--corpus", str(tmp_path / "audio"), "--model", "whisper-base",
                                      "--out", str(tmp_path / "job.yaml"), "--pairs", "it-it",
                                      "--n-input", "100", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    spec = load_job(tmp_path / "job.yaml")
    assert isinstance(spec, JobSpec) and spec.corpus.kind == "folder" and spec.corpus.pairs == ["it-it"]
    assert spec.method.n_input == 100 and spec.output.run_dir == str(tmp_path / "run")
