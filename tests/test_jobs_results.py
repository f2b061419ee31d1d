"""Reducer and query on result Parquet files written with the schema (hand-computed expectations),
locally and on S3 (moto server)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.query import connect, query, write_result
from jobs.reducer import reduce_run
from jobs.schema import TABLES, failed_row, result_file, segments_row, table_from_rows

NAN = float("nan")


def _write(run: Path, table: str, shard: int, unit: str, rows: list[dict]) -> None:
    path = Path(result_file(str(run), table, shard, unit))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table_from_rows(table, rows), path)


def _corr(unit, target, layer, head, r, pooling=None, p=None):
    return dict(unit_id=unit, segment_id=unit, model="m", task="asr", src_lang="en", tgt_lang="en", target=target,
                layer=layer, head=head, pooling=pooling, p=p, pearson=r)


def build_run(run: Path) -> Path:
    """u1, u2: ok ASR units; u3: failed (stale rows must be ignored); u4: not committed; u5: ok ST."""
    seg = lambda unit, shard, task, tgt, hyp, ref, **kw: segments_row(  # noqa: E731
        unit_id=unit, segment_id=unit, model="m", task=task, corpus="c", split="test", src_lang="en", tgt_lang=tgt,
        shard=shard, hypothesis=hyp, reference=ref, hyp_tokens=hyp.split(), **kw)
    for unit, shard, hyp, scale, nan_layer0 in (("u1", 0, "a b c d", 0.1, False), ("u2", 1, "a x c", 0.3, True)):
        rows = []
        for layer in (0, 1):
            for head in (0, 1):
                rows.append(_corr(unit, "input", layer, head, scale * (layer + 1) + 0.01 * head, "2d_max", 0.5))
            per_layer = {"u1": 0.5 + 0.1 * layer, "u2": 0.7 + 0.1 * layer}[unit]
            rows.append(_corr(unit, "input", layer, None, NAN if nan_layer0 and layer == 0 else per_layer, "2d_max", 0.5))
            rows.append(_corr(unit, "input", layer, None, {"u1": 0.2, "u2": 0.4}[unit], "2d_avg", 0.5))
            rows.append(_corr(unit, "encoder", layer, None, {"u1": 0.6, "u2": 0.8}[unit] + 0.1 * layer, None, 0.7))
            rows.append(_corr(unit, "encoder", layer, None, 0.4, None, 0.3))
        for head in (0, 1):
            rows.append(_corr(unit, "input", None, head, {"u1": 0.2, "u2": 0.4}[unit] + 0.1 * head, "2d_max", 0.5))
        rows.append(_corr(unit, "input", None, None, {"u1": 0.6, "u2": 0.8}[unit], "2d_max", 0.5))
        rows.append(_corr(unit, "input", None, None, 0.25, "2d_avg", 0.5))
        rows.append(_corr(unit, "encoder", None, None, {"u1": 0.75, "u2": 0.85}[unit], None, 0.7))
        rows.append(_corr(unit, "encoder", None, None, 0.45, None, 0.3))
        _write(run, "correlations", shard, unit, rows)
        curve = {"u1": {0: "a b c d", 50: "a b", 100: ""}, "u2": {0: "a b c d", 50: "a b c d e f g h i j", 100: ""}}[unit]
        dels = [dict(unit_id=unit, explanation="ca", side="input", percent=q, hypothesis=h, reference="a b c d")
                for q, h in curve.items()]
        dels += [dict(unit_id=unit, explanation="sm_x_agg", side="input", percent=q, hypothesis=h, reference="a b c d",
                      pooling="2d_avg") for q, h in ((0, "a b c d"), (100, ""))]
        if unit == "u1":
            dels += [dict(unit_id=unit, explanation="sm_h", side="encoder", percent=q, hypothesis=h, reference="a b c d",
                          p=0.3) for q, h in ((0, "a b c d"), (100, "z"))]
        _write(run, "deletion", shard, unit, dels)
        shares = {"u1": (100.0, 40.0, 0.0), "u2": (100.0, 20.0, 10.0)}[unit]
        _write(run, "size", shard, unit, [dict(unit_id=unit, explanation="sm_x_full", threshold=t, share=s)
                                          for t, s in zip((0.0, 0.5, 1.0), shares)])
        _write(run, "saliency_encoder", shard, unit, [dict(unit_id=unit, token_index=0, token="a", n_steps=2, values=[0.5, 1.5])])
        _write(run, "segments", shard, unit, [seg(unit, shard, "asr", "en", hyp, "a b c d")])
    # u3 failed after writing some rows; u4 never committed its segments row
    _write(run, "correlations", 1, "u3", [_corr("u3", "input", None, None, 0.99, "2d_max", 0.5)])
    _write(run, "segments", 1, "u3", [failed_row("u3", "AudioError: broken.m4a: cannot decode", 3, segment_id="u3",
                                                 model="m", task="asr", src_lang="en", tgt_lang="en", shard=1)])
    _write(run, "correlations", 0, "u4", [_corr("u4", "input", None, None, 0.99, "2d_max", 0.5)])
    _write(run, "correlations", 0, "u5", [dict(_corr("u5", "input", None, None, 0.33, "2d_max", 0.5), task="st", tgt_lang="it")])
    _write(run, "segments", 0, "u5", [seg("u5", 0, "st", "it", "uno due", "uno tre")])
    # a temporary file of an in-flight write is never read
    (run / "results" / "correlations" / "shard=0" / ".u9.parquet.abcd.tmp").write_bytes(b"partial")
    return run


@pytest.fixture()
def run(tmp_path) -> Path:
    return build_run(tmp_path / "run")


def _report(reports, name):
    return next(r for r in reports if r.name == name)


def _row(report, **match):
    rows = [dict(zip(report.columns, r)) for r in report.rows]
    hits = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, (match, rows)
    return hits[0]


def test_reducer_tables(run):
    reports = reduce_run(run)
    grid = _report(reports, "grid_sm_x")
    l1 = _row(grid, model="m", task="asr", layer="1")
    assert (l1["h1"], l1["h2"], l1["head-avg"]) == pytest.approx((0.2, 0.21, 0.5))  # u2's NaN left out
    l2 = _row(grid, task="asr", layer="2")
    assert (l2["h1"], l2["h2"], l2["head-avg"]) == pytest.approx((0.4, 0.41, 0.7))
    avg = _row(grid, task="asr", layer="layer-avg")
    assert (avg["h1"], avg["h2"], avg["head-avg"]) == pytest.approx((0.3, 0.4, 0.7))  # u3 (failed) ignored

    layers_x = _row(_report(reports, "layers_sm_x"), task="asr")
    assert (layers_x["l1"], layers_x["l2"], layers_x["layer-avg"], layers_x["n"]) == pytest.approx((0.5, 0.7, 0.7, 2))
    st = _row(_report(reports, "layers_sm_x"), task="st")
    assert st["layer-avg"] == pytest.approx(0.33) and st["tgt"] == "it"
    layers_h = _row(_report(reports, "layers_sm_h"), task="asr")
    assert (layers_h["l1"], layers_h["l2"], layers_h["layer-avg"]) == pytest.approx((0.7, 0.8, 0.8))
    gap = _row(_report(reports, "gap"), task="asr")
    assert (gap["l1"], gap["l2"], gap["layer-avg"]) == pytest.approx((0.2, 0.1, 0.1))

    pooling = _report(reports, "pooling")
    assert [r[4] for r in pooling.rows if r[3] == "asr"] == ["2d_max", "2d_avg"]  # headline first
    assert _row(pooling, pooling="2d_avg")["l1"] == pytest.approx(0.3)
    assert _row(pooling, pooling="2d_avg")["layer-avg"] == pytest.approx(0.25)
    assert _row(pooling, pooling="2d_avg")["deletion"] == pytest.approx(50.0)
    assert _row(pooling, pooling="2d_max", task="asr")["deletion"] is None
    assert _row(pooling, pooling="2d_max", task="st")["layer-avg"] == pytest.approx(0.33)

    sweep = _report(reports, "p_sweep")
    assert [r[4] for r in sweep.rows] == [0.7, 0.3]
    assert (_row(sweep, p_H=0.3)["l1"], _row(sweep, p_H=0.3)["layer-avg"]) == pytest.approx((0.4, 0.45))
    assert _row(sweep, p_H=0.3)["deletion"] == pytest.approx(50.0)  # u1 only: WER 0 then 100

    quality = _report(reports, "quality")
    asr = _row(quality, task="asr")
    assert (asr["ok"], asr["failed"]) == (2, 1)
    assert asr["WER"] == pytest.approx(25.0)  # (1 sub + 1 del) / 8 words
    # corpus WER per percent: 0 -> 0, 50 -> min(100, 8/8*100), 100 -> 100; trapezoid / 100
    assert asr["del ca input"] == pytest.approx(75.0)
    assert asr["size sm_x_full"] == pytest.approx(41.25)  # mean curve (100, 30, 5) over thresholds (0, .5, 1)
    assert _row(quality, task="st")["WER"] == pytest.approx(50.0)

    tables = run / "tables"
    for name in ("grid_sm_x", "layers_sm_x", "layers_sm_h", "gap", "pooling", "p_sweep", "quality"):
        for ext in ("csv", "md", "tex"):
            assert (tables / f"{name}.{ext}").stat().st_size > 0
    rows = list(csv.DictReader(io.StringIO((tables / "layers_sm_x.csv").read_text())))
    assert float(next(r for r in rows if r["task"] == "asr")["l2"]) == pytest.approx(0.7)
    md = (tables / "tables.md").read_text()
    assert "| en | en | m | asr | 0.500 | 0.700 | 0.700 | 2 |" in md
    assert "\\begin{tabular}" in (tables / "tables.tex").read_text() and "layer-avg" in (tables / "tables.tex").read_text()


def test_reduce_cli_prints_tables(run):
    result = CliRunner().invoke(app, ["reduce", str(run)])
    assert result.exit_code == 0, result.output
    assert "Table 2" in result.output and "0.700" in result.output and "tables written to" in result.output


def test_query_views_only_show_committed_units(run):
    seg = query(run, "SELECT unit_id, status, shard FROM segments ORDER BY unit_id").to_pylist()
    assert [(r["unit_id"], r["status"]) for r in seg] == [("u1", "ok"), ("u2", "ok"), ("u3", "failed"), ("u5", "ok")]
    n = query(run, "SELECT unit_id, count(*) AS n FROM correlations GROUP BY unit_id ORDER BY unit_id").to_pylist()
    assert n == [{"unit_id": "u1", "n": 18}, {"unit_id": "u2", "n": 18}, {"unit_id": "u5", "n": 1}]
    sal = query(run, "SELECT unit_id, shard, values FROM saliency_encoder ORDER BY unit_id").to_pylist()
    assert sal == [{"unit_id": "u1", "shard": 0, "values": [0.5, 1.5]}, {"unit_id": "u2", "shard": 1, "values": [0.5, 1.5]}]
    assert query(run, "SELECT count(*) AS n FROM cross_attention").to_pylist() == [{"n": 0}]
    con = connect(run)
    assert {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()} >= set(TABLES)
    con.close()


def test_query_formats(run):
    sql = "SELECT unit_id, hyp_tokens, reference FROM segments WHERE status = 'ok' ORDER BY unit_id"
    out = io.StringIO()
    write_result(query(run, sql), "json", out)
    rows = json.loads(out.getvalue())
    assert rows == [{"unit_id": "u1", "hyp_tokens": ["a", "b", "c", "d"], "reference": "a b c d"},
                    {"unit_id": "u2", "hyp_tokens": ["a", "x", "c"], "reference": "a b c d"},
                    {"unit_id": "u5", "hyp_tokens": ["uno", "due"], "reference": "uno tre"}]
    out = io.StringIO()
    write_result(query(run, sql), "csv", out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "unit_id,hyp_tokens,reference"
    assert list(csv.reader([lines[2]])) == [["u2", '["a", "x", "c"]', "a b c d"]]
    runner = CliRunner()
    result = runner.invoke(app, ["query", str(run), "SELECT unit_id, status FROM segments ORDER BY unit_id"])
    assert result.exit_code == 0 and "u3" in result.output and "failed" in result.output and "4 row(s)" in result.output
    result = runner.invoke(app, ["query", str(run), "SELECT count(*) AS n FROM deletion", "--format", "json"])
    assert json.loads(result.output) == [{"n": 12}]
    result = runner.invoke(app, ["query", str(run), "SELECT error FROM segments WHERE status='failed'", "-f", "csv"])
    assert result.output.splitlines() == ["error", "AudioError: broken.m4a: cannot decode"]


def test_query_errors_are_clear(run, tmp_path):
    from jobs.errors import RunError, XS2TError

    with pytest.raises(XS2TError, match="(?s)query failed.*nope.*views: segments"):
        query(run, "SELECT nope FROM segments")
    with pytest.raises(RunError, match="run directory not found"):
        query(tmp_path / "missing", "SELECT 1")


# ---- the same on S3 (moto server) ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_run(tmp_path, monkeypatch):
    import boto3

    port = _free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        client = None
        for _ in range(100):
            try:
                client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                                      aws_secret_access_key="testing", region_name="us-east-1")
                client.create_bucket(Bucket="xs2t")
                break
            except Exception:
                time.sleep(0.1)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(k, "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        local = build_run(tmp_path / "run")
        for path in local.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "xs2t", f"runs/r1/{path.relative_to(local).as_posix()}")
        yield f"s3://xs2t/runs/r1?endpoint_override=127.0.0.1:{port}&scheme=http", client
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_reduce_and_query_on_s3(s3_run):
    uri, client = s3_run
    seg = query(uri, "SELECT unit_id FROM segments WHERE status = 'ok' ORDER BY unit_id").to_pylist()
    assert [r["unit_id"] for r in seg] == ["u1", "u2", "u5"]
    assert query(uri, "SELECT count(*) AS n FROM correlations").to_pylist() == [{"n": 37}]
    reports = reduce_run(uri)
    assert _row(_report(reports, "layers_sm_x"), task="asr")["l2"] == pytest.approx(0.7)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="xs2t", Prefix="runs/r1/tables/")["Contents"]}
    assert "runs/r1/tables/tables.md" in keys and "runs/r1/tables/quality.csv" in keys
    assert math.isclose(_row(_report(reports, "quality"), task="asr")["WER"], 25.0)
