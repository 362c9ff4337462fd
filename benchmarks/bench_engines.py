#!/usr/bin/env python3
"""--stats-only throughput of the two engines on the same photos: the local process pool and a
local Ray (--engine ray, a Ray started for the run on this machine's cores), as a folder and as
WebDataset shards. Images/s is over the whole command (start-up included, as a user sees it).

The photos are bench_batch.py's crops and rescales of real photos (200 to 1100 px a side).

    .venv/bin/python benchmarks/bench_engines.py [--images 1000] [--per-shard 250]
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
from pathlib import Path

from _common import TOOL, machine, run_measured
from bench_batch import make_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=250)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apt-bench-") as tmp:
        work = Path(tmp)
        photos = make_dataset(work / "photos", args.images)
        files = sorted(photos.iterdir())
        shards = work / "shards"
        shards.mkdir()
        for s in range(0, len(files), args.per_shard):
            with tarfile.open(shards / f"{s // args.per_shard:03d}.tar", "w") as tar:
                for f in files[s:s + args.per_shard]:
                    tar.add(f, arcname=f.name)
        python = sys.executable
        print(f"machine: {machine()}")
        print(f"{args.images} photos, {sum(f.stat().st_size for f in files) / 2**20:.1f} MB of JPEG")
        for what, source in (("folder", photos), ("shards", shards)):
            for engine in ("local", "ray"):
                out = work / f"out-{what}-{engine}"
                wall = run_measured([python, str(TOOL), str(source), "-o", str(out), "-q", "--stats-only",
                                     "--engine", engine])[0]
                print(f"{what:6s} --engine {engine:5s}: {wall:7.1f} s, {args.images / wall:6.1f} images/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
