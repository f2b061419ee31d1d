"""Figures: rendered for real (Agg), checked for their structure and that the PNGs are not blank."""
import matplotlib.image as mpimg
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.viz import figures as F
from jobs.viz.data import RunData
from jobs.viz.summary import Summary
from jobs.viz.words import WordTimings
from test_viz_synthetic import write_synthetic_run

UNIT = "fbk.asr.en-en.test.en.synth.000.001.0001"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("viz_figures"))


def panels(fig):
    """The map panels of a segment figure (colour bars have no title)."""
    return [ax for ax in fig.axes if ax.get_title(loc="left")]


def _not_blank(path, min_size=(300, 500)):
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert h >= min_size[0] and w >= min_size[1], (path, img.shape)
    rgb = img[..., :3]
    assert rgb.std() > 0.05                                   # not a flat page
    assert (rgb.mean(-1) < 0.5).mean() > 0.02                 # some ink: dark pixels exist
    return h, w


def test_segment_figure_structure(synthetic):
    run, _ = synthetic
    data = RunData(run)
    u = data.unit(UNIT)
    words = WordTimings().words(u.row)
    fig = F.segment_figure(u, layer=1, head=0, words=words)
    heat = panels(fig)
    assert [ax.get_title(loc="left").split(",")[0].split(" of ")[0] for ax in heat] == [
        "SM^X", "SM^X", "SM^H (encoder states)", "cross-attention"]
    assert heat[0].get_yscale() == "log" and heat[0].get_ylim()[1] > 5000
    assert "layer 2 head 1" in heat[3].get_title(loc="left")
    content = ["▁the", "▁parli", "ament", "▁is", "▁now", "▁open."]
    for ax in heat[1:]:
        assert [t.get_text() for t in ax.get_yticklabels()] == content
        assert ax.get_xlim() == pytest.approx((0.0, 3.0))     # shared time axis in seconds
    # the default time-frequency token is the one with the sharpest map, a content row
    assert u.content.start <= F.pick_token(u) < u.content.stop
    fig.clf()
    fig = F.segment_figure(u, all_rows=True)
    assert len(panels(fig)[1].get_yticklabels()) == u.n_tokens
    with pytest.raises(ValueError, match="layer 3 out of range"):
        F.segment_figure(u, layer=2)
    # without SM^X (not loaded) the figure has the SM^H and CA panels only
    w = data.unit(data.find_unit("whisper.asr.en-en.test.en.synth.000.001.0002"), input_map=False)
    fig = F.segment_figure(w)
    assert [ax.get_title(loc="left").split(" ")[0] for ax in panels(fig)] == ["SM^H", "cross-attention,"]
    assert panels(fig)[0].get_xlim() == pytest.approx((0.0, 3.0))


def test_run_figures_structure(synthetic):
    s = Summary(RunData(synthetic[0]))
    g = ("fbk", "asr", "en", "en")
    fig = F.grid_figure(s, g)
    grids = [ax for ax in fig.axes if ax.get_title().startswith("r(CA")]
    assert len(grids) == 2 and [t.get_text() for t in grids[0].get_xticklabels()] == ["h1", "h2", "h3", "h4", "avg"]
    cells = [t.get_text() for t in grids[0].texts]
    assert len(cells) == 3 * 5 and f"{s.grid(g, 'input').overall:.2f}" == cells[-1]
    fig = F.layer_curves_figure(s)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3 and all(len(ax.collections) == 1 for ax in visible)   # the shaded gap
    fig = F.deletion_figure(s, [g])
    (ax,) = [ax for ax in fig.axes if ax.get_visible()]
    assert len(ax.lines) == 4 and ax.get_xlim() == (0, 100)


def test_plot_cli_writes_png_and_pdf(synthetic, tmp_path):
    run, _ = synthetic
    out = tmp_path / "figs"
    runner = CliRunner()
    res = runner.invoke(app, ["plot", str(run), "-s", "0002", "-o", str(out), "--no-progress"])
    assert res.exception is not None and "matches 2 units" in str(res.exception)   # ambiguous part of an id
    res = runner.invoke(app, ["plot", str(run), "-s", UNIT, "--layer", "2", "--head", "4", "--no-run-figures",
                              "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [f"segment_{UNIT}.pdf", f"segment_{UNIT}.png"]
    assert (out / f"segment_{UNIT}.pdf").read_bytes()[:5] == b"%PDF-"
    h, w = _not_blank(out / f"segment_{UNIT}.png", min_size=(800, 1000))
    assert h > w * 0.6                                                 # four stacked panels

    res = runner.invoke(app, ["plot", str(run), "--first", "0", "--format", "png", "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    for stem in ("grid_fbk_asr_en_en", "grid_whisper_asr_en_en", "grid_fbk_st_en_it", "layers", "deletion"):
        _not_blank(out / f"{stem}.png")
        assert not (out / f"{stem}.pdf").exists()

    res = runner.invoke(app, ["plot", str(run), "--head", "0", "-o", str(out)])
    assert res.exit_code != 0 and "counts from 1" in str(res.exception)
    res = runner.invoke(app, ["plot", str(run), "--format", "gif", "-o", str(out)])
    assert res.exit_code != 0 and "--format" in str(res.exception)
