"""The HTML report in a real headless Chromium (Debian's package): opens without errors, shows the key numbers.

Chromium is installed by scripts/install_chromium.sh when /usr/bin/chromium is missing; the tests
skip only when that install fails for lack of network. Nothing here leaves this machine: the page
is a local file whose Content-Security-Policy forbids loading anything.
"""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from review_plans import review_plan

from planner.htmlreport import write_report
from planner.pictures import PHASE_COLORS

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
NO_NETWORK = ("Could not resolve", "Temporary failure resolving", "Failed to fetch", "Network is unreachable",
              "Unable to fetch some archives", "Unable to locate package")
MEASURED = [{"name": "chosen", "predicted_step_s": 0.12, "measured_step_s": 0.13, "predicted_mem_gib": 11.8,
             "measured_mem_gib": 11.2}]


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        r = subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], capture_output=True, text=True,
                           timeout=900)
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            if any(n in (r.stdout + r.stderr) for n in NO_NETWORK):
                pytest.skip(f"Chromium is not installed and Debian's packages cannot be reached: {' | '.join(tail)}")
            pytest.fail(f"scripts/install_chromium.sh failed: {' | '.join(tail)}")
    assert shutil.which(CHROMIUM), "chromium is still missing after scripts/install_chromium.sh"
    return CHROMIUM


def run_chromium(chromium: str, tmp_path: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{page.stem}-{len(extra)}"
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
            *extra, page.as_uri()]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def console_messages(stderr: str) -> list[str]:
    """Page console output (errors, uncaught exceptions, CSP violations) as Chromium logs it."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    plan = review_plan(schedule="interleaved", vpp=2, recompute="full")
    path = write_report(plan, tmp_path_factory.mktemp("report") / "report.html", measured=MEASURED)
    return plan, path


def test_console_check_catches_page_errors(chromium, tmp_path):
    """Control: the console check below does see a failing script."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><p>x</p><script>throw new Error('boom-marker')</script>")
    r = run_chromium(chromium, tmp_path, page, "--dump-dom")
    assert any("boom-marker" in line for line in console_messages(r.stderr)), r.stderr[-2000:]


def test_report_opens_without_errors_and_shows_the_key_numbers(chromium, report, tmp_path):
    plan, path = report
    r = run_chromium(chromium, tmp_path, path, "--dump-dom")
    assert console_messages(r.stderr) == []
    dom = r.stdout
    pred = plan.prediction
    expect = {
        "step_time_s": f"{pred['step_time_s']:.3f} s",
        "tokens_per_s": f"{pred['tokens_per_s']:,.0f}",
        "mfu": f"{100 * pred['mfu']:.1f}%",
        "peak_memory_gib": f"{pred['peak_memory_gib']:.2f} GiB",
        "fits": "fits",
    }
    for key, text in expect.items():
        assert re.search(rf'data-key="{key}">{re.escape(text)}<', dom), (key, text)
    for text in ("gpt2-xl on 8 x H100-SXM-80GB", "dp=2 tp=1 pp=4 vpp=2 mb=2x8 interleaved", "Why this plan",
                 "74 GiB fit limit", "why it lost", "all-reduce of all 1.6 B gradients", "Parallel layout",
                 "Pipeline schedule", "Memory per GPU against capacity", "Predicted vs measured"):
        assert text in dom, text
    for st in plan.stages():
        assert f"{st['layers'][0]}-{st['layers'][1]} ({st['num_layers']})" in dom


def test_report_pictures_decode_in_the_browser(chromium, report, tmp_path):
    _, path = report
    html = path.read_text()
    assert "http://" not in html.split("<pre>")[0] and "https://" not in html.split("<pre>")[0]
    # a copy with a probe script (the report itself allows none) that counts decoded images after load
    probe = ("<script>addEventListener('load',()=>{const i=[...document.images];document.body.setAttribute("
             "'data-images',i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)})</script></body>")
    page = tmp_path / "probe.html"
    page.write_text(html.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
                    .replace("</body>", probe))
    r = run_chromium(chromium, tmp_path, page, "--dump-dom")
    assert 'data-images="3/3"' in r.stdout, re.findall(r'data-images="[^"]*"', r.stdout)


def test_report_screenshot_is_not_blank_and_shows_the_timeline(chromium, report, tmp_path):
    _, path = report
    shot = tmp_path / "report.png"
    run_chromium(chromium, tmp_path, path, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 50_000
    rgb = imread(shot)[..., :3]
    assert rgb.shape[:2] == (2400, 1280)
    assert rgb.std() > 0.05 and (rgb.min(axis=-1) < 0.8).mean() > 0.02
    green = (np.abs(rgb - np.array(to_rgb(PHASE_COLORS["backward"]))).max(axis=-1) < 0.04).mean()
    assert green > 0.001, "the timeline's backward blocks are not on the page"


def test_gpu_map_of_512_gpus_fits_the_page(chromium, tmp_path):
    """One box per node, each inside its section and wide enough for its text, at a laptop's window width."""
    plan = review_plan(model="llama-3-70b", dp=4, tp=1, pp=8, cp=16, micro_batch_size=2, global_batch_size=64,
                       seq_len=8192, zero_stage=1)
    html = write_report(plan, tmp_path / "big.html").read_text()
    probe = ("<script>addEventListener('load',()=>{const s=document.getElementById('layout').getBoundingClientRect();"
             "const b=[...document.querySelectorAll('#layout .gpu')];document.body.setAttribute('data-map',b.length+'/'"
             "+b.filter(x=>{const r=x.getBoundingClientRect();return r.left<s.left||r.right>s.right"
             "||x.scrollWidth>x.clientWidth}).length)})</script></body>")
    page = tmp_path / "probe.html"
    page.write_text(html.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
                    .replace("</body>", probe))
    r = run_chromium(chromium, tmp_path, page, "--window-size=1280,2400", "--dump-dom")
    assert 'data-map="64/0"' in r.stdout, re.findall(r'data-map="[^"]*"', r.stdout)
