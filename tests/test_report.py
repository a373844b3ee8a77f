"""report.py: plots and report.html from hand-built analyses, rendered in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from icnn_compress.analyze import analyze, write_analysis, write_gallery
from icnn_compress.report import build_report, render_analysis, report, report_sections
from conftest import require_system_package
from test_analyze import MapModel, S, _loader, _maps

CHROMIUM = "/usr/bin/chromium"
# Kept after the run (runs/ is git-ignored) so that a person or CI can look at it; ICNN_TEST_ARTIFACTS moves it.
SCREENSHOT_DIR = Path(os.environ.get("ICNN_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "runs" / "test-artifacts"))
# Injected into a copy of the page under test: counts images that failed to decode, resource and script
# errors and console.error calls, and writes them into the title, which --dump-dom reads back.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.tagName))), true);
const __consoleError = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); __consoleError(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  document.title = `probe images=${imgs.length} broken=${broken} errors=${window.__errors.length}`;
});
</script>"""


class _Images:
    """A dataset of colourful images: the gallery's second pass reads ``dataset[i]["image"]``."""

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, S, S, generator=g)}


def _analysis(out: Path, arm: str, scale: float) -> Path:
    maps = _maps()
    maps[:, 4] *= scale
    result = analyze(MapModel(maps), _loader(), layers=["layer"], classes=["a", "b"], landmark_names=["head"],
                     image_size=S, redundancy_threshold=0.95, part_quantile=0.25, top_k=4, estimate_stride=1)
    result["summary"]["arm"] = arm
    write_analysis(result, out)
    write_gallery(result, _Images(), out)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("analyses")
    return _analysis(root / "icnn", "icnn", 1.0), _analysis(root / "baseline", "baseline", 2.0)


def test_render_writes_plots_and_one_file_page(dirs) -> None:
    icnn, base = dirs
    page = render_analysis(icnn, baseline=base)
    assert page == icnn / "report.html"
    for name in ("layer_distributions", "layer_redundancy", "layer_instability"):
        assert (icnn / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', text)
    assert len(srcs) == 4 and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    assert sum(s.startswith("data:image/jpeg") for s in srcs) == 1  # the gallery


def test_sections_and_extra_sections(dirs, tmp_path) -> None:
    icnn, base = dirs
    sections = report_sections(icnn)
    assert [t for t, _ in sections] == ["icnn: summary", "icnn: layer", "icnn: layer filters"]
    page = build_report(tmp_path, analyses=[icnn, base], extra_sections=[("Captum comparison", "<p id=x>hi</p>")])
    text = page.read_text()
    assert "Side by side" in text and text.index("icnn: summary") < text.index("baseline: summary")
    assert text.rstrip().endswith("<h2>Captum comparison</h2><p id=x>hi</p></body></html>")
    with pytest.raises(FileNotFoundError, match="icnn analyze"):
        report_sections(tmp_path / "missing")


def _chromium(args: list[str], user_data: Path) -> subprocess.CompletedProcess:
    require_system_package(Path(CHROMIUM).exists() or shutil.which("chromium") is not None, "chromium",
                           "rendering report.html in a real browser")
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={user_data}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_works_in_chromium(dirs, tmp_path) -> None:
    icnn, base = dirs
    page = report([icnn, base], tmp_path / "side-by-side")
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = _chromium(["--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri()], tmp_path / "ud1")
    title = re.search(r"<title>(probe[^<]*)</title>", dom.stdout)
    assert title, f"the probe did not run; chromium said:\n{dom.stderr[-2000:]}"
    counts = dict(kv.split("=") for kv in title.group(1).split()[1:])
    # icnn: distributions, redundancy, instability vs baseline, gallery; the baseline: all but instability.
    assert int(counts["images"]) == 4 + 3
    assert counts["broken"] == "0", title.group(1)
    assert counts["errors"] == "0", title.group(1)
    assert "Uncaught" not in dom.stderr
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "report.png"
    shot.unlink(missing_ok=True)
    run = _chromium([f"--screenshot={shot}", "--window-size=1400,1800", page.as_uri()], tmp_path / "ud2")
    assert shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
