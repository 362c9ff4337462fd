#!/usr/bin/env python3
"""Regenerate the README's pictures with the tool itself (and Chromium for the page screenshots).

    .venv/bin/python docs/make_pictures.py
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import visualize_patches as vp  # noqa: E402
from browser import Chromium, find_chromium  # noqa: E402


def tool(*args, cwd: Path, check: bool = True) -> None:
    """The tool as a user runs it: from `cwd`, with the paths as typed there (relative), so that no picture
    shows the folders of the machine that made it."""
    subprocess.run([sys.executable, str(ROOT / "visualize_patches.py"), *map(str, args), "-q"], cwd=cwd,
                   check=check)


def screenshot(browser: Chromium, page: Path, target: Path, width: int, height: int) -> None:
    browser.call("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)
    browser.open(page.as_uri())
    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=True)
    target.write_bytes(base64.b64decode(shot["data"]))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="apt-pictures-"))
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        # the README's first picture: a newcomer's first run, no argument, as they get it
        tool(cwd=work)
        shutil.copy(work / "visualizations" / "patches_visualization.jpg", OUT / "first_run.jpg")
        # the other runs name a copy of the sample photo by its bare file name
        sample = Path(shutil.copy(vp.sample_image_path(), work)).name
        tool(sample, "-o", "default", cwd=work)
        tool(sample, "-o", "half", "--target-ratio", "0.5", "--sweep", "--color-by-scale", cwd=work)
        shutil.copy(work / "default" / "importance_map_scale_28.png", OUT / "heatmap_28.png")
        shutil.copy(work / "half" / "patches_visualization.jpg", OUT / "patches_target_0.5.jpg")
        shutil.copy(work / "half" / "threshold_sweep.png", OUT / "threshold_sweep.png")
        Image.open(work / "half" / "summary_panel.png").convert("RGB").save(OUT / "summary_panel.jpg", quality=85)
        # a short video: a slow pan across the sample photo, written with OpenCV
        photo = np.asarray(Image.open(work / sample).convert("RGB"))
        writer = cv2.VideoWriter(str(work / "pan.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (320, 320))
        for k in range(48):
            y = int(k * (photo.shape[0] - 320) / 47)
            writer.write(np.ascontiguousarray(photo[y:y + 320, 96:416, ::-1]))
        writer.release()
        tool("pan.mp4", "-o", "video", "--target-ratio", "0.6", cwd=work)
        shutil.copy(work / "video" / "patches_visualization.gif", OUT / "video_patches.gif")
        # a batch over a few crops of the sample photo and of matplotlib's grace_hopper.jpg
        from matplotlib import cbook

        hopper = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        photos = work / "photos"
        photos.mkdir()
        for k, (path, box) in enumerate([(hopper, (0, 0, 400, 400)), (hopper, (100, 150, 512, 600)),
                                         (work / sample, (0, 0, 826, 970)), (work / sample, (200, 100, 700, 600))]):
            Image.open(path).convert("RGB").crop(box).save(photos / f"photo_{k}.jpg", quality=92)
        (photos / "broken.jpg").write_bytes(b"not a picture")
        tool("photos", "-o", "batch", cwd=work, check=False)  # exit 1: broken.jpg fails, on purpose
        shutil.copy(work / "batch" / "summary.png", OUT / "batch_summary.png")
        browser = Chromium(find_chromium())
        try:
            screenshot(browser, work / "half" / "explorer.html", OUT / "explorer.png", 1400, 1090)
            screenshot(browser, work / "batch" / "report.html", OUT / "report.png", 1150, 720)
        finally:
            browser.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in sorted(OUT.iterdir()):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
