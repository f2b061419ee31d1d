"""`xs2t report`: one self-contained HTML page, checked in headless Chromium (figures decoded,
tables rendered, screenshot not blank)."""
import re
import shutil
import subprocess

import matplotlib.image as mpimg
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from test_viz_synthetic import write_synthetic_run

CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const mark = document.createElement('div');
  mark.id = 'xs2t-check';
  mark.textContent = `images ${ok}/${imgs.length} tables ${document.querySelectorAll('table').length}`;
  document.body.appendChild(mark);
});</script>"""


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "the Debian package chromium must be installed for this test"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("viz_report")
    run, _ = write_synthetic_run(tmp)
    out = tmp / "report.html"
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(out), "--segments", "2", "--top", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    return out, out.read_text(encoding="utf-8")


def test_report_content(report):
    _, html = report
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # self-contained: no file or network references, every figure inline
    assert not re.search(r'(src|href)="(?!data:)', html)
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', html)
    assert len(imgs) == 1 + 3 + 1 + 2               # layer curves, 3 grids, deletion, 2 segments
    for section in ("Run record", "Failed units (1)", "paper Tables 2–3", "paper Table 1", "paper Table 4",
                    "paper Table 6", "Deletion", "Size (SPES)", "alignment heads", "Word timestamps",
                    "Example segments"):
        assert section in html, section
    assert "broken.m4a: cannot decode audio" in html           # the failure and its reason
    assert "fbk-abc123" in html and "667,667,666" in html        # the run record
    assert "[[1, 0], [1, 1], [1, 2]]" in html                    # saliency-chosen heads
    assert "-1.000" not in html                                  # the uncommitted unit's rows are ignored


def test_report_renders_in_chromium(report, tmp_path):
    path, html = report
    checked = tmp_path / "checked.html"
    checked.write_text(html.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, "--dump-dom", checked.as_uri()).stdout
    mark = re.search(r'id="xs2t-check">images (\d+)/(\d+) tables (\d+)<', dom)
    assert mark, dom[-500:]
    ok, total, tables = map(int, mark.groups())
    assert total == 7 and ok == total and tables >= 10

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri())
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2000, 1280)
    rgb = img[..., :3]
    assert rgb.std() > 0.05                                      # text, tables and figures, not a blank page
    dark_rows = (rgb.mean(-1) < 0.5).any(1)
    assert dark_rows[:1000].mean() > 0.2 and dark_rows[1000:].mean() > 0.2
