#!/usr/bin/env python3
"""Batch throughput on 100 real photos, against a single-image run of the same tool, measured in
one run. Targets: --stats-only over 100 images <= 3x the single run's wall time; full outputs
for 100 images <= 12x.

The 100 photos are crops and rescales (200 to 1100 px a side) of the two real photos at hand:
the Vermeer in tests/data and matplotlib's grace_hopper.jpg, plus scikit-image's sample photos
when scikit-image is installed. The single-image run is the Vermeer at its own size.

    .venv/bin/python benchmarks/bench_batch.py [--images N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _common import PEARL, TOOL, machine, median, run_measured

STATS_TARGET, FULL_TARGET = 3.0, 12.0


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


def make_dataset(folder: Path, count: int) -> None:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apt-bench-") as tmp:
        work = Path(tmp)
        photos = work / "photos"
        photos.mkdir()
        make_dataset(photos, args.images)
        python = sys.executable
        device = ["--device", args.device]
        single = [run_measured([python, str(TOOL), str(PEARL), "-o", str(work / f"single{k}"), "-q", *device])[0]
                  for k in range(3)]
        stats = [run_measured([python, str(TOOL), str(photos), "-o", str(work / f"stats{k}"), "-q", "--stats-only",
                               *device])[0] for k in range(2)]
        full = run_measured([python, str(TOOL), str(photos), "-o", str(work / "full"), "-q", *device])[0]
        one = median(single)
        stats_s = median(stats)
        print(f"machine: {machine()}; device {args.device}")
        print(f"{args.images} photos, {sum(p.stat().st_size for p in photos.iterdir()) / 2**20:.1f} MB of JPEG")
        print(f"single image (Vermeer, all outputs): {one:6.2f} s (median of {len(single)})")
        print(f"batch --stats-only:                  {stats_s:6.2f} s (median of {len(stats)}), "
              f"{args.images / stats_s:5.1f} images/s")
        print(f"batch, all outputs:                  {full:6.2f} s, {args.images / full:5.1f} images/s")
        r1, r2 = stats_s / one, full / one
        print(f"stats-only ratio: {r1:.2f}x (target <= {STATS_TARGET:g}x) {'PASS' if r1 <= STATS_TARGET else 'FAIL'}")
        print(f"full-output ratio: {r2:.2f}x (target <= {FULL_TARGET:g}x) {'PASS' if r2 <= FULL_TARGET else 'FAIL'}")
        return 0 if r1 <= STATS_TARGET and r2 <= FULL_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
