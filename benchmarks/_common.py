"""Helpers shared by the benchmark scripts: paths, child processes measured for time and memory."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "visualize_patches.py"
PEARL = ROOT / "tests" / "data" / "pearl_earring.jpg"
sys.path.insert(0, str(ROOT))

# Python caches the bytecode of the modules it imports (__pycache__) unless PYTHONDONTWRITEBYTECODE
# is set, as it is on this project's machine; a user's machine caches it after the first run. So the
# measured commands run with caching on, and each benchmark runs every command once, unmeasured,
# before measuring (warm_up), so that the caches exist as they would for a user.
USER_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores{mem}, Python {platform.python_version()}"


def run_measured(args: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the largest of the child and the descendants it waited for)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=USER_ENV if env is None else env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed with exit {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def warm_up(*commands: list[str]) -> None:
    """Run each command once, unmeasured: the first run writes the bytecode caches (see USER_ENV)."""
    for args in commands:
        run_measured(args)


def median(values) -> float:
    return statistics.median(values)
