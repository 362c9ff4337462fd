#!/usr/bin/env python3
"""The numpy entropy (visualize_patches.entropy_maps_np) before and after a change, in one run:
the function of a git revision (--before; default be268b6, the last commit before the change it was
written for) against the working tree's, on a photo resized to several sizes, T = 1 and T = 2,
patch sizes 14/28/56 and Qwen3-VL's 16/32/64. Medians of warm calls, interleaved so that the
load of other processes on the machine affects both alike; the spread is the min-max of the
per-round medians. The outputs are checked bit-identical first.

    .venv/bin/python benchmarks/bench_entropy.py [--before REV] [--rounds 5] [--calls 15]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import PEARL, ROOT, machine

CASES = (  # (width, height, frames, patch sizes)
    (400, 470, 1, (14, 28, 56)),
    (700, 812, 1, (14, 28, 56)),
    (840, 980, 1, (14, 28, 56)),
    (896, 1120, 1, (14, 28, 56)),
    (1400, 700, 1, (14, 28, 56)),
    (840, 980, 2, (14, 28, 56)),
    (896, 1120, 1, (16, 32, 64)),
    (832, 960, 2, (16, 32, 64)),
)


def load_revision(rev: str):
    """The core module as it was at git revision rev, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:visualize_patches.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "visualize_patches_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("visualize_patches_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def timed(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="be268b6", help="git revision to compare with (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=15, help="calls per round, median taken (default: %(default)s)")
    args = parser.parse_args()
    import visualize_patches as after

    before = load_revision(args.before)
    photo = Image.open(PEARL).convert("RGB")
    print(f"machine: {machine()}")
    print(f"before: {args.before}; after: working tree; {args.rounds} rounds x {args.calls} calls, warm")
    print(f"{'size':>10} {'T':>2} {'patches':>10} {'before ms':>16} {'after ms':>16} {'speed-up':>9}")
    for width, height, frames, sizes in CASES:
        frame = np.asarray(photo.resize((width, height), Image.Resampling.BICUBIC))
        images = np.ascontiguousarray(np.stack([frame, np.roll(frame, 7, axis=1)][:frames])[None])
        old, new = before.entropy_maps_np(images, sizes), after.entropy_maps_np(images, sizes)
        for ps in sizes:
            if not np.array_equal(old[ps], new[ps], equal_nan=True):
                raise SystemExit(f"outputs differ at {width}x{height} T={frames} patch size {ps}")
        rounds_old, rounds_new = [], []
        for _ in range(args.rounds):
            rounds_old.append(timed(lambda: before.entropy_maps_np(images, sizes), args.calls))
            rounds_new.append(timed(lambda: after.entropy_maps_np(images, sizes), args.calls))
        o, n = statistics.median(rounds_old) * 1e3, statistics.median(rounds_new) * 1e3
        spread = lambda r: f"{min(r) * 1e3:.1f}-{max(r) * 1e3:.1f}"
        print(f"{width:>4}x{height:<5} {frames:>2} {'/'.join(map(str, sizes)):>10} "
              f"{o:6.2f} ({spread(rounds_old):>9}) {n:6.2f} ({spread(rounds_new):>9}) {o / n:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
