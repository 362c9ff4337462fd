"""The batch report as a person reads it: thumbnails that show the picture, thresholds printed
readably, one progress bar per pass."""

import json
import re

import numpy as np
from PIL import Image

from apt_vis import pages
from conftest import PEARL, random_photo_like, run_cli


def runs(flags: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(edges[1::2] - edges[::2])


def test_thumbnail_borders_are_drawn_1_px_wide_at_thumbnail_scale(tmp_path):
    # a black 896 x 896 image: every patch merges into 56 px ones, 16 x 16, 15 px apart on the 240 px thumbnail
    Image.new("RGB", (896, 896)).save(tmp_path / "black.png")
    proc = run_cli(tmp_path / "black.png", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    thumb = np.asarray(Image.open(tmp_path / "out" / "patches_thumbnail.jpg").convert("RGB")).astype(int)
    assert thumb.shape[:2] == (240, 240)
    green = (thumb[..., 1] > 128) & (thumb[..., 0] < 100) & (thumb[..., 2] < 100)
    for line in (green[127], green[:, 127]):  # a row and a column across the middle, between lines
        assert runs(line) == [1] * 17, runs(line)  # 15 lines between patches and the two outer edges


def test_thumbnail_of_fine_patches_shows_the_picture(tmp_path):
    # nothing merges at thresholds 0: a full grid of 14 px patches would be a line every 3.4 px on
    # the thumbnail, a green veil over the picture
    proc = run_cli(PEARL, "-o", tmp_path / "out", "--thresholds", "0", "0")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["apt_patches"] == stats["uniform_patches"]
    thumb = np.asarray(Image.open(tmp_path / "out" / "patches_thumbnail.jpg").convert("RGB")).astype(int)
    plain = np.asarray(Image.open(tmp_path / "out" / "resized_image.jpg").convert("RGB")
                       .resize((thumb.shape[1], thumb.shape[0]), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(thumb - plain).mean() < 5, np.abs(thumb - plain).mean()  # the picture, not a green grid


SUMMARY = {"images": {"ok": 1, "reused": 0, "failed": 0}, "files_skipped": 0,
           "thresholds": [5.442685127258301, 5.442685127258301], "target_ratio": 0.5, "retained_ratio": None}


def test_report_prints_thresholds_rounded():
    page = pages.report_html([], SUMMARY, (14, 28, 56), "Qwen2-VL")
    assert "5.442685127258301" not in page
    assert "Thresholds 5.44269, 5.44269 (chosen for target ratio 0.5)" in page


def test_batch_progress_counts_inputs_once_per_pass(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for k in range(3):
        Image.fromarray(random_photo_like(rng, 120, 150)).save(folder / f"{k}.png")
    proc = run_cli(folder, "-o", tmp_path / "out", "--target-ratio", "0.5", "--workers", "2", "--stats-only")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["thresholds"]) == 2 and summary["thresholds"][0] == float(summary["thresholds"][0])
    bars = proc.stderr.replace("\r", "\n")
    assert "scoring: 100%" in bars and "writing: 100%" in bars
    assert "3/3" in bars and "6/6" not in bars and "/6 " not in bars


def _row(name: str, pictures: bool) -> dict:
    return {"path": name, "output": name, "status": "ok", "kind": "image", "pictures": pictures,
            "retained_ratio": 0.5, "apt_patches": 2, "uniform_patches": 4, "qwen2vl_tokens": 1,
            "original_width": 30, "original_height": 30, "resized_width": 28, "resized_height": 28}


def test_report_says_where_its_links_go():
    """A --stats-only batch has no thumbnails or explorers: its report must not say that thumbnails
    link to explorers (its names link to each stats.json); a mixed run says both."""
    summary = {**SUMMARY, "target_ratio": None}
    none = pages.report_html([_row("a.jpg", False)], summary, (14, 28, 56), "Qwen2-VL")
    assert "Thumbnails link" not in none and "stats.json" in none.split("<table")[0]
    every = pages.report_html([_row("a.jpg", True)], summary, (14, 28, 56), "Qwen2-VL")
    assert "Thumbnails link to each image's interactive explorer" in every
    mixed = pages.report_html([_row("a.jpg", True), _row("b.jpg", False)], summary, (14, 28, 56), "Qwen2-VL")
    assert "Thumbnails link" in mixed and "without a thumbnail" in mixed


def test_a_large_batch_report_shows_the_extremes_and_says_so():
    """A report of every input is unusable at dataset scale (100,000 rows: 50 MB of HTML and 4.5 s to
    write). Above pages.REPORT_ROWS inputs, the table holds the half with the lowest retained ratio
    and the half with the highest, the page says how many of how many and where the rest is, and
    the failures list stops at as many lines with a count of the others."""
    n, shown = 3 * pages.REPORT_ROWS, pages.REPORT_ROWS
    ratios = np.random.default_rng(2).permutation(n) / n
    rows = [{**_row(f"img{k:05d}.jpg", False), "retained_ratio": float(r)} for k, r in enumerate(ratios)]
    rows += [{**_row(f"bad{k:05d}.jpg", False), "status": "failed", "error": "cannot decode"}
             for k in range(shown + 7)]
    summary = {**SUMMARY, "target_ratio": None, "images": {"ok": n, "reused": 0, "failed": shown + 7}}
    page = pages.report_html(rows, summary, (14, 28, 56), "Qwen2-VL")
    table = page.split("<tbody>")[1].split("</tbody>")[0]
    listed = sorted(float(v) for v in re.findall(r'<td data-value="([0-9.e-]+)">0\.', table))
    expected = sorted([*np.sort(ratios)[: shown // 2], *np.sort(ratios)[-(shown // 2):]])
    assert listed == expected  # exactly the lowest and the highest, each once
    assert f"the {shown // 2:,} inputs with the lowest retained ratio and the {shown // 2:,} with the highest " \
           f"of {n:,}" in page and "summary.csv" in page
    failures = page.split('<ul id="failures">')[1]
    assert failures.count("<li>") == shown + 1 and "and 7 more failures" in failures
    small = pages.report_html(rows[:10], summary, (14, 28, 56), "Qwen2-VL")
    assert small.split("<tbody>")[1].count("<tr") == 10 and "with the highest" not in small
