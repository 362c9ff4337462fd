#!/usr/bin/env python3
"""Batch --stats-only over 100 real photos of mixed sizes against the unavoidable work, measured in
one run: a plain loop, with the same number of processes, that only decodes each file with PIL,
applies EXIF orientation, converts to RGB and resizes it bicubically to its smart-resize size.
Target (issue 10): <= 1.5x its wall time (medians of alternating runs). Also prints the batch with
every output, and the largest process's peak RSS (main process or a worker).

The 100 photos are crops and rescales (200 to 1100 px a side) of the two real photos at hand:
the Vermeer in tests/data and matplotlib's grace_hopper.jpg, plus scikit-image's sample photos
when scikit-image is installed.

    .venv/bin/python benchmarks/bench_batch.py [--images N] [--runs N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from _common import PEARL, TOOL, machine, median, run_measured, warm_up

STATS_TARGET = 1.5

# the unavoidable work, in as many processes as the tool's workers
PLAIN_LOOP = r"""
import json, sys
from concurrent.futures import ProcessPoolExecutor
from PIL import Image, ImageOps

def decode(item):
    path, (height, width) = item
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        return image.resize((width, height), Image.Resampling.BICUBIC).size

if __name__ == "__main__":
    items, workers = json.load(open(sys.argv[1])), int(sys.argv[2])
    if workers == 1:
        list(map(decode, items))
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(decode, items, chunksize=1))
"""


def source_photos() -> list[Image.Image]:
    from matplotlib import cbook

    photos = [Image.open(PEARL).convert("RGB"),
              Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")]
    try:
        from skimage import data  # optional: more real photos
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
            photos.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
    except ImportError:
        pass
    return photos


def make_dataset(folder: Path, count: int) -> Path:
    """`count` photos of mixed sizes in `folder` (made if missing); the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = source_photos()
    for k in range(count):
        photo = photos[k % len(photos)]
        w = int(rng.integers(photo.width // 2, photo.width + 1))
        h = int(rng.integers(photo.height // 2, photo.height + 1))
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        scale = float(rng.uniform(0.4, 1.4))
        crop = photo.crop((x, y, x + w, y + h))
        crop = crop.resize((max(200, int(w * scale)), max(200, int(h * scale))), Image.Resampling.BICUBIC)
        crop.save(folder / f"photo_{k:03d}.jpg", quality=92)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    sys.path.insert(0, str(TOOL.parent))
    import visualize_patches as vp

    from apt_vis.machine import default_workers

    workers = default_workers()
    settings = vp.Settings()
    with tempfile.TemporaryDirectory(prefix="apt-bench-") as tmp:
        work = Path(tmp)
        photos = make_dataset(work / "photos", args.images)
        items = []
        for path in sorted(photos.iterdir()):
            with Image.open(path) as image:
                w, h = ImageOps.exif_transpose(image).size
            items.append((str(path), vp.smart_resize(h, w, settings.factor, settings.min_pixels, settings.max_pixels)))
        (work / "items.json").write_text(json.dumps(items))
        (work / "plain_loop.py").write_text(PLAIN_LOOP)
        python = sys.executable
        tool = [python, str(TOOL), str(photos), "-q", "--workers", str(workers), "--device", args.device]
        plain, stats = [], []
        warm_up([python, str(work / "plain_loop.py"), str(work / "items.json"), str(workers)],
                [*tool, "-o", str(work / "warm"), "--stats-only"])
        for k in range(args.runs):
            plain.append(run_measured([python, str(work / "plain_loop.py"), str(work / "items.json"), str(workers)]))
            stats.append(run_measured([*tool, "-o", str(work / f"stats{k}"), "--stats-only"]))
        full = run_measured([*tool, "-o", str(work / "full")])
        plain_s, stats_s = median([t for t, _ in plain]), median([t for t, _ in stats])
        print(f"machine: {machine()}; device {args.device}; {workers} workers (the default here)")
        print(f"{args.images} photos, {sum(p.stat().st_size for p in photos.iterdir()) / 2**20:.1f} MB of JPEG")
        print(f"plain loop (decode, orient, RGB, resize): {plain_s:6.2f} s (median of {args.runs}), "
              f"largest process {median([m for _, m in plain]):6.1f} MB")
        print(f"batch --stats-only:                       {stats_s:6.2f} s (median of {args.runs}), "
              f"{args.images / stats_s:5.1f} images/s, largest process {median([m for _, m in stats]):6.1f} MB")
        print(f"batch, every output:                      {full[0]:6.2f} s, {args.images / full[0]:5.1f} images/s, "
              f"largest process {full[1]:6.1f} MB")
        ratio = stats_s / plain_s
        print(f"stats-only / plain loop: {ratio:.2f}x (target <= {STATS_TARGET:g}x) "
              f"{'PASS' if ratio <= STATS_TARGET else 'FAIL'}")
        return 0 if ratio <= STATS_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
