#!/usr/bin/env python3
"""End to end: `visualize_patches.py photo.jpg` (every output) against a bare
`python -c "import torch, matplotlib, PIL, cv2"`, runs interleaved, measured in one run.
Targets: <= 1.5x its wall time and <= 1.5x its peak resident memory.

    .venv/bin/python benchmarks/bench_cli.py [--runs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import PEARL, TOOL, machine, median, run_measured

TARGET = 1.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apt-bench-") as tmp:
        work = Path(tmp)
        bare, tool = [], []
        for k in range(args.runs):
            bare.append(run_measured([sys.executable, "-c", "import torch, matplotlib, PIL, cv2"]))
            tool.append(run_measured([sys.executable, str(TOOL), str(PEARL), "-o", str(work / f"o{k}"), "-q"]))
        bare_t, bare_m = median([t for t, _ in bare]), median([m for _, m in bare])
        tool_t, tool_m = median([t for t, _ in tool]), median([m for _, m in tool])
        print(f"machine: {machine()}")
        print(f"bare imports:                 {bare_t:5.2f} s, {bare_m:6.1f} MB peak RSS (median of {args.runs})")
        print(f"visualize_patches.py (Vermeer, 840x980, all outputs): {tool_t:5.2f} s, {tool_m:6.1f} MB")
        rt, rm = tool_t / bare_t, tool_m / bare_m
        print(f"wall-time ratio: {rt:.2f}x (target <= {TARGET}x) {'PASS' if rt <= TARGET else 'FAIL'}")
        print(f"peak-memory ratio: {rm:.2f}x (target <= {TARGET}x) {'PASS' if rm <= TARGET else 'FAIL'}")
        return 0 if rt <= TARGET and rm <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
