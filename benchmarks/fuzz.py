#!/usr/bin/env python3
"""Long fuzz campaign: N seeded mutations of small JPEG, PNG, WebP, GIF, TIFF, BMP and MP4
files (tests/fuzzing.py), run through the tool's batch mode in chunks.

Each chunk is one batch run of the CLI on a folder of K files. A chunk that exits other
than 0 or 1, prints a traceback, or runs longer than the tool's startup plus 10 s is split
in half and rerun, down to single files, so that each such file is named. A file counts as
a hang when its run alone takes over 10 s beyond the startup; as a crash when its run
exits other than 0 or 1 (a signal, say); as a traceback when its run prints one. Every
file must also have exactly one summary row; a failed row whose message is not one of the
tool's own (a ToolError naming the file) is counted as an unexpected exception.

    .venv/bin/python benchmarks/fuzz.py --n 10000 [--seed S] [--workers N] [--chunk K] [--pictures]

Files are a function of (seed, index): fuzzing.fuzz_case(seeds, S, I) rebuilds any of them.
Exit status 0 when nothing above was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import ROOT, TOOL, machine

sys.path.insert(0, str(ROOT / "tests"))
from fuzzing import seed_files, write_cases  # noqa: E402

PY_WARNING = re.compile(r"\.py:\d+: \w*Warning: ")  # a raw Python warning on stderr
HANG_S = 10.0  # a file whose run takes longer than this (beyond startup) is a hang
STARTUP_RUNS = 3


@dataclass
class Tally:
    files: int = 0
    ok: int = 0
    failed: int = 0
    tracebacks: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    missing_rows: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # failed rows with a message not from ToolError
    leftovers: list[str] = field(default_factory=list)  # failed inputs' output folders, hidden files
    raw_warnings: int = 0  # Python warnings printed as such rather than logged
    bisections: int = 0

    def problems(self) -> int:
        return sum(map(len, (self.tracebacks, self.hangs, self.crashes, self.missing_rows, self.unexpected,
                             self.leftovers))) + self.raw_warnings


def run_batch(folder: Path, out: Path, args, timeout: float) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, stderr, wall seconds) of one batch run on folder."""
    command = [sys.executable, str(TOOL), str(folder), "-o", str(out), "--workers", str(args.workers)]
    command += [] if args.pictures else ["--stats-only"]
    start = time.perf_counter()
    # its own process group, so that a timeout also ends the tool's worker processes
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        return None, stderr, time.perf_counter() - start
    return proc.returncode, stderr, time.perf_counter() - start


def startup_seconds(args, work: Path, seeds: dict[str, bytes]) -> float:
    """Median wall time of a batch run on one small clean file: the tool's fixed cost."""
    folder = work / "startup"
    folder.mkdir()
    (folder / "seed.png").write_bytes(seeds["seed.png"])
    times = []
    for k in range(STARTUP_RUNS):
        status, stderr, wall = run_batch(folder, work / f"startup_out{k}", args, timeout=120)
        if status != 0:
            raise SystemExit(f"the tool fails on a clean PNG (exit {status}):\n{stderr[-2000:]}")
        times.append(wall)
    return statistics.median(times)


def check_outputs(files: list[Path], out: Path, tally: Tally) -> None:
    """Rows of a batch that exited 0 or 1 in time: one per file; failed ones leave nothing."""
    rows: dict[str, dict] = {}
    try:
        with open(out / "summary.csv", newline="") as f:
            for row in csv.DictReader(f):
                rows.setdefault(row["path"], row)
    except OSError:
        pass
    for path in files:
        row = rows.get(path.name)
        tally.files += 1
        if row is None:
            tally.missing_rows.append(path.name)
        elif row["status"] == "ok":
            tally.ok += 1
        else:
            tally.failed += 1
            if path.name not in row["error"] or "\n" in row["error"]:
                tally.unexpected.append(f"{path.name}: {row['error']}")
            if (out / row["output"]).exists():
                tally.leftovers.append(f"{path.name}: output folder left for a failed input")
    tally.leftovers += [f"{p.relative_to(out)}: hidden file" for p in out.rglob(".*")]


def run_files(files: list[Path], work: Path, args, limit: float, tally: Tally) -> None:
    """Run files as one batch; split and rerun when the batch crashed, hung or printed a traceback."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        folder, out = Path(tmp) / "in", Path(tmp) / "out"
        folder.mkdir()
        for path in files:
            (folder / path.name).write_bytes(path.read_bytes())
        status, stderr, _ = run_batch(folder, out, args, timeout=limit)
        bad = status not in (0, 1) or "Traceback" in stderr
        if not bad:
            check_outputs(files, out, tally)
            tally.raw_warnings += len(PY_WARNING.findall(stderr))
            return
    if len(files) > 1:
        tally.bisections += 1
        half = len(files) // 2
        run_files(files[:half], work, args, limit, tally)
        run_files(files[half:], work, args, limit, tally)
        return
    name = files[0].name
    tally.files += 1
    if status is None:
        tally.hangs.append(name)
    elif status not in (0, 1):
        tally.crashes.append(f"{name}: exit {status}")
    else:
        tally.tracebacks.append(f"{name}: {stderr[stderr.find('Traceback'):][-600:]}")
    print(f"  found: {name} ({'hang' if status is None else f'exit {status}'})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="files to generate and run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed (default: %(default)s)")
    parser.add_argument("--start", type=int, default=0, help="index of the first file (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="the tool's --workers (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=100, help="files per batch run (default: %(default)s)")
    parser.add_argument("--pictures", action="store_true", help="write all pictures, not only --stats-only")
    args = parser.parse_args()
    seeds = seed_files()
    tally = Tally()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="apt-fuzz-") as tmp:
        work = Path(tmp)
        startup = startup_seconds(args, work, seeds)
        limit = startup + HANG_S
        print(f"machine: {machine()}")
        print(f"seed {args.seed}, files {args.start}..{args.start + args.n - 1}, chunks of {args.chunk}, "
              f"{args.workers} workers, {'all pictures' if args.pictures else '--stats-only'}; "
              f"startup {startup:.1f} s, so a run over {limit:.1f} s is split down to single files", flush=True)
        for first in range(args.start, args.start + args.n, args.chunk):
            count = min(args.chunk, args.start + args.n - first)
            with tempfile.TemporaryDirectory(dir=work) as chunk_tmp:
                files = write_cases(Path(chunk_tmp), args.seed, first, count, seeds)
                run_files(files, work, args, limit, tally)
            elapsed = time.perf_counter() - began
            print(f"{tally.files:6d} files  {tally.ok} ok  {tally.failed} failed  {tally.problems()} problems  "
                  f"{elapsed:6.0f} s  {tally.files / elapsed:5.1f} files/s", flush=True)
    wall = time.perf_counter() - began
    print()
    print(f"files:                 {tally.files}")
    print(f"ok:                    {tally.ok}")
    print(f"failed rows:           {tally.failed}")
    print(f"tracebacks:            {len(tally.tracebacks)}")
    print(f"hangs over {HANG_S:g} s:      {len(tally.hangs)}")
    print(f"crashes (exit not 0/1): {len(tally.crashes)}")
    print(f"missing rows:          {len(tally.missing_rows)}")
    print(f"unexpected exceptions: {len(tally.unexpected)}")
    print(f"leftover outputs:      {len(tally.leftovers)}")
    print(f"raw Python warnings:   {tally.raw_warnings}")
    print(f"batch runs split:      {tally.bisections}")
    print(f"wall time:             {wall:.0f} s ({tally.files / wall:.1f} files/s)")
    for title, items in (("tracebacks", tally.tracebacks), ("hangs", tally.hangs), ("crashes", tally.crashes),
                         ("missing rows", tally.missing_rows), ("unexpected exceptions", tally.unexpected),
                         ("leftover outputs", tally.leftovers)):
        for item in items[:20]:
            print(f"{title}: {item}")
    return 1 if tally.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
