"""Head ranking by correlation with saliency, the run's tables, and `xs2t heads` exports."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.viz.data import RunData
from jobs.viz.heads import load_heads, rank_heads, top_heads, whisper_mask_dump, whisper_mask_load
from jobs.viz.summary import Summary
from test_viz_synthetic import write_synthetic_run

FBK = ("fbk", "asr", "en", "en")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("viz_heads"))


def test_summary_means_over_committed_units(synthetic):
    run, _ = synthetic
    data = RunData(run)
    s = Summary(data)
    assert s.groups == [FBK, ("fbk", "st", "en", "it"), ("whisper", "asr", "en", "en")]
    assert s.headline_pooling == "2d_max" and s.headline_p == 0.7
    assert s.settings(FBK, "input") == ["1d_max_1d_avg", "2d_avg", "2d_max"] and s.settings(FBK, "encoder") == [0.7, 0.3]
    grid = s.grid(FBK, "input")
    assert grid.n == 2 and grid.r.shape == (2, 4)
    # the same mean computed by hand from the raw rows (the uncommitted unit's r = -1 is ignored)
    rows = [r for r in data.table("correlations").to_pylist() if r["model"] == "fbk" and r["task"] == "asr"
            and r["target"] == "input" and r["pooling"] == "2d_max" and r["layer"] == 1 and r["head"] == 0]
    assert len(rows) == 2 and grid.r[1, 0] == pytest.approx(np.mean([r["pearson"] for r in rows]))
    assert grid.overall > 0.5
    layers, overall = s.gap(FBK)
    assert overall == pytest.approx(s.grid(FBK, "encoder").overall - grid.overall)
    deletion = s.deletion()
    full, ca = deletion[(FBK, "sm_x_full", "input", None, None)], deletion[(FBK, "ca", "input", None, None)]
    assert full["percent"] == list(range(0, 101, 5)) and full["wer"][0] == 0 and full["wer"][-1] == 100
    assert full["auc"] > ca["auc"] and full["n"] == 2


def test_rank_heads_finds_the_aligned_heads(synthetic):
    s = Summary(RunData(synthetic[0]))
    for by in ("input", "encoder", "both"):
        heads, averages = rank_heads(s, FBK, by)
        assert top_heads(heads, 3) == [[1, 0], [1, 1], [1, 2]]
        assert (heads[-1].layer, heads[-1].head) == (1, 3)        # the shifted head comes last
        assert averages[-1].label == "layer 1 (avg)"
    with pytest.raises(ValueError):
        rank_heads(s, FBK, "best")


def test_whisper_mask_round_trip():
    pairs = [[0, 3], [2, 1], [3, 7]]
    dump = whisper_mask_dump(pairs, 4, 8)
    assert whisper_mask_load(dump, 4, 8) == pairs
    assert dump == whisper_mask_dump(pairs, 4, 8)                 # deterministic (no gzip time stamp)


def test_heads_cli_exports(synthetic, tmp_path):
    run, _ = synthetic
    runner = CliRunner()
    out = tmp_path / "heads.json"
    res = runner.invoke(app, ["heads", str(run), "--top", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "alignment_heads = [[1, 0], [1, 1], [1, 2]]" in res.output
    data = json.loads(out.read_text())
    assert set(data) == {"fbk/asr/en/en", "fbk/st/en/it", "whisper/asr/en/en"}
    entry = data["whisper/asr/en/en"]
    assert entry["n_text_layer"] == 2 and entry["n_text_head"] == 4
    assert whisper_mask_load(entry["whisper_dump"], 2, 4) == entry["alignment_heads"]
    assert load_heads(str(out), ("whisper", "asr", "en", "en")) == entry["alignment_heads"]
    assert load_heads(str(out), ("other", "asr", "en", "en")) is None

    plain = tmp_path / "list.json"
    res = runner.invoke(app, ["heads", str(run), "--model", "whisper", "--by", "encoder", "-k", "2", "-o", str(plain),
                              "--format", "list"])
    assert res.exit_code == 0, res.output
    assert json.loads(plain.read_text()) == [[1, 0], [1, 1]]
    assert load_heads(str(plain)) == [[1, 0], [1, 1]]

    res = runner.invoke(app, ["heads", str(run), "--format", "whisper", "-o", str(tmp_path / "x.txt")])
    assert res.exit_code != 0 and "one group" in str(res.exception)
    res = runner.invoke(app, ["heads", str(run), "--model", "nope"])
    assert res.exit_code != 0 and "fbk/asr/en/en" in str(res.exception)
