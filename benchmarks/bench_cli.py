#!/usr/bin/env python3
"""End to end on the fixture photo: `visualize_patches.py photo.jpg` (every output) and
`--stats-only` against a bare `python -c "import numpy, PIL.Image, loguru"`, runs alternating,
measured in one run (medians). Targets (issue 10): every output <= 2.0x the bare wall time and
<= 2.5x its peak resident memory; --stats-only <= 1.5x its wall time.

With --original SRC (the `Qwen2-VL/transformers/src` folder of WWSneu/apt_code at commit 38c503a,
e.g. `git archive 38c503a Qwen2-VL/transformers/src | tar -x`), also the original tool on the same
photo, paired with this tool's run: targets >= 10x faster, >= 30x less peak memory. It imports
ipdb, einops and torchvision, which are replaced by the stand-ins in benchmarks/original_stubs/
(a no-op set_trace, an unused einops, torchvision.transforms.Normalize in torch).

    .venv/bin/python benchmarks/bench_cli.py [--runs N] [--original SRC]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import PEARL, TOOL, USER_ENV, machine, median, run_measured, warm_up

WALL_TARGET, MEMORY_TARGET, STATS_ONLY_WALL_TARGET = 2.0, 2.5, 1.5
ORIGINAL_SPEED_TARGET, ORIGINAL_MEMORY_TARGET = 10.0, 30.0
STUBS = Path(__file__).resolve().parent / "original_stubs"
BARE = "import numpy, PIL.Image, loguru"


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x (target <= {target}x) {'PASS' if ratio <= target else 'FAIL'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--original", type=Path, help="src folder of WWSneu/apt_code at 38c503a")
    parser.add_argument("--original-runs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apt-bench-") as tmp:
        work = Path(tmp)
        bare, full, stats = [], [], []
        warm_up([sys.executable, str(TOOL), str(PEARL), "-o", str(work / "warm"), "-q"])
        for k in range(args.runs):
            bare.append(run_measured([sys.executable, "-c", BARE]))
            full.append(run_measured([sys.executable, str(TOOL), str(PEARL), "-o", str(work / f"f{k}"), "-q"]))
            stats.append(run_measured([sys.executable, str(TOOL), str(PEARL), "-o", str(work / f"s{k}"), "-q",
                                       "--stats-only"]))
        (bt, bm), (ft, fm), (st, sm) = ((median([t for t, _ in r]), median([m for _, m in r]))
                                        for r in (bare, full, stats))
        print(f"machine: {machine()}")
        print(f"bare `python -c \"{BARE}\"`: {bt * 1000:6.0f} ms, {bm:6.1f} MB peak RSS (median of {args.runs})")
        print(f"every output (Vermeer 826x970 -> 840x980):  {ft * 1000:6.0f} ms, {fm:6.1f} MB")
        print(f"--stats-only:                               {st * 1000:6.0f} ms, {sm:6.1f} MB")
        checks = [(ft / bt, WALL_TARGET), (fm / bm, MEMORY_TARGET), (st / bt, STATS_ONLY_WALL_TARGET)]
        print(f"every output, wall-time ratio:   {verdict(*checks[0])}")
        print(f"every output, peak-memory ratio: {verdict(*checks[1])}")
        print(f"--stats-only, wall-time ratio:   {verdict(*checks[2])}")
        ok = all(r <= t for r, t in checks)
        if args.original is not None:
            ok = compare_with_original(args.original, args.original_runs, work) and ok
        return 0 if ok else 1


def compare_with_original(src: Path, runs: int, work: Path) -> bool:
    """The original visualize_patches.py and this tool on the same photo, alternating (CPU, default
    thresholds 3 2): wall time and peak RSS, medians."""
    script = src / "transformers" / "models" / "qwen2_vl" / "visualize_patches.py"
    env = {**USER_ENV, "PYTHONPATH": str(STUBS)}
    original, ours = [], []
    for k in range(runs):
        original.append(run_measured([sys.executable, str(script), str(PEARL), "-o", str(work / f"orig{k}"),
                                      "--thresholds", "3", "2", "--device", "cpu"], cwd=src, env=env))
        ours.append(run_measured([sys.executable, str(TOOL), str(PEARL), "-o", str(work / f"ours{k}"), "-q",
                                  "--device", "cpu"]))
    (ot, om), (ut, um) = ((median([t for t, _ in r]), median([m for _, m in r])) for r in (original, ours))
    print(f"original tool (apt_code 38c503a, CPU): {ot:6.2f} s, {om:7.1f} MB peak RSS (median of {runs})")
    print(f"this tool, same photo, every output:   {ut:6.2f} s, {um:7.1f} MB")
    speed, memory = ot / ut, om / um
    print(f"faster than the original: {speed:.1f}x (target >= {ORIGINAL_SPEED_TARGET:g}x) "
          f"{'PASS' if speed >= ORIGINAL_SPEED_TARGET else 'FAIL'}")
    print(f"less peak memory: {memory:.1f}x (target >= {ORIGINAL_MEMORY_TARGET:g}x) "
          f"{'PASS' if memory >= ORIGINAL_MEMORY_TARGET else 'FAIL'}")
    return speed >= ORIGINAL_SPEED_TARGET and memory >= ORIGINAL_MEMORY_TARGET


if __name__ == "__main__":
    sys.exit(main())
