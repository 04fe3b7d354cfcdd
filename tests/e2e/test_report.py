"""report.html of a real 2-iteration run, opened in headless Chromium: every image loads, the page's text holds the
run's figures, nothing is fetched from outside the file, and a screenshot is saved under the test's tmp dir."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image, ImageDraw
from rich.console import Console

from rlalign import driver
from rlalign.config import load_config, save_config
from rlalign.driver import train
from rlalign.metrics import read_metrics, save_image_grid
from rlalign.report import write_report

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
INSTALL = "apt-get update && apt-get install -y chromium  (Debian's package; .ci/run installs it)"

# appended to a copy of the page: marks <body> once every <img> has loaded (naturalWidth > 0); fetches nothing
IMAGES_OK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(f"chromium is not installed; this test opens the report in headless Chromium. Install: {INSTALL}")
    return path


def _run_chromium(*args: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_of_a_tiny_run_in_headless_chromium(tiny_overrides: list[str], tmp_path: Path) -> None:
    _chromium()  # fail before the run when the browser is missing
    cfg = load_config(CONFIG, ["sampler.num_workers=1", *tiny_overrides])
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    try:
        result = train(cfg, Console(quiet=True))
    finally:
        ray.shutdown()
    report = result.run_dir / "report.html"
    assert report.is_file(), "the run writes report.html at its end"
    page = report.read_text()
    # self-contained: no external URL in any src/href, every image a data URI, a CSP that forbids the network
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//|file:)""", page)
    srcs = re.findall(r"<img[^>]*\ssrc='([^']*)'", page)
    assert len(srcs) >= 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "default-src 'none'" in page

    probe = tmp_path / "report_probe.html"
    probe.write_text(page.replace("</body>", IMAGES_OK + "</body>"))
    dom = _run_chromium("--virtual-time-budget=3000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-images-ok="(\d+)/(\d+)"', dom)
    assert found, "the probe script did not run: " + dom[:500]
    assert found.group(1) == found.group(2) == str(len(srcs)), f"images loaded: {found.group(0)}"

    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    text = re.sub(r"\s+", " ", text)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    loss = [r["loss/total"] for r in rows if "loss/total" in r][-1]
    after = [r for r in rows if "eval/digit_accuracy" in r][-1]
    assert "algorithm tailorpo" in text
    assert "iterations 2 of 2 planned" in text
    assert f"{after['eval/digit_accuracy']:.4g}" in text and "eval/digit_accuracy" in text
    assert f"loss/total = {loss:.4g}" in text and "Per-stage time" in text
    assert 'pipe.load_lora_weights("' + str((result.run_dir / "ckpt" / "iter_000001" / "diffusers_lora").resolve()) in (
        text
    )
    assert "sampler.num_steps 10 4" in text  # config diff: tiny.yaml sets 4 steps, the TailorPO digits preset 10
    assert "Held-out images, before and after" in text
    # before/after pairs as cards: each held-out prompt in page text (not a bitmap), with its two tiles
    side = json.loads((result.run_dir / "images" / "eval_before_iter_000000.png").with_suffix(".json").read_text())
    assert page.count("<div class='card'>") == len(side["captions"]) >= 8
    assert all(f" {html.unescape(c)} before after " in f" {text} " for c in side["captions"][:8])
    assert "plain/weighted/mean" in text  # TailorPO's search reward and the policy's own plain-sample reward

    shot = tmp_path / "report.png"
    _run_chromium(f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", report.as_uri())
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1280, 2400)
        arr = np.asarray(img.convert("L"))
    assert arr.std() > 20 and (arr < 128).mean() > 0.02, "the screenshot is (nearly) blank"
    print(f"report screenshot: {shot}")


def test_report_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path)


def test_monitor_table_and_alarms_from_metrics(tmp_path: Path) -> None:
    """A run directory written by hand: config.yaml and metrics.jsonl with audit/* and monitor/* rows, no images
    and no checkpoints; the page shows one monitor row per evaluation, marks the alarm and says what is missing."""
    save_config(load_config(CONFIG), tmp_path / "config.yaml")
    rows = [
        {"iteration": 0, "eval/brightness/mean": 0.2, "audit/judge/mean": 0.6, "monitor/alarm": 0.0},
        {"iteration": 1, "loss/total": 0.69, "time/iteration_s": 2.0, "reward/brightness/mean": 0.3},
        {"iteration": 1, "eval/brightness/mean": 0.5, "audit/judge/mean": 0.41, "monitor/diversity_ratio": 0.37,
         "monitor/alarm": 1.0},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the sentence as the run persisted it (driver.ALARMS_FILE): a report written later, without the run, shows it
    alarm = {"iteration": 1, "alarm": "audit/judge/mean fell by 0.19 while the trained reward rose"}
    (tmp_path / driver.ALARMS_FILE).write_text(json.dumps(alarm) + "\n")
    page = write_report(tmp_path)
    # <wbr>: where a long key may wrap (no space in the rendered text)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.read_text().replace("<wbr>", ""))))
    assert "iteration audit/judge/mean monitor/diversity_ratio alarm" in text
    assert "1 0.41 0.37 ALARM" in text and "0 0.6 " in text
    assert "iteration 1: audit/judge/mean fell by 0.19 while the trained reward rose" in text
    assert "no checkpoint was saved" in text and "no evaluation image grids" in text
    assert "audit/judge/mean 0.6 0.41 -0.19" in text  # before/after table


def test_a_failing_report_only_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> Path:
        raise ValueError("boom")

    monkeypatch.setattr("rlalign.report.write_report", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        driver._write_report(tmp_path, driver.RunResult(tmp_path, 0), Console(quiet=True))
    assert any("report.html not written (ValueError: boom)" in str(w.message) for w in caught)


def test_grid_captions_wrap_at_spaces(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    drawn: list[str] = []
    original = ImageDraw.ImageDraw.text

    def record(self: ImageDraw.ImageDraw, xy: object, text: str, *args: object, **kwargs: object) -> None:
        drawn.append(text)
        original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    captions = ["a handwritten digit seven", "a drawing of the digit 3"]
    save_image_grid(np.zeros((2, 8, 8, 3), dtype=np.uint8), captions, tmp_path / "g.png", tile=32)
    # every word comes back whole and in order, and long captions take more than one line
    assert [w for line in drawn for w in line.split()] == [w for c in captions for w in c.split()]
    assert len(drawn) > len(captions)
