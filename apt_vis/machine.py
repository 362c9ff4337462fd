"""What this machine gives the tool: usable CPU cores and available memory, cgroup limits (v2
and v1) included, hence --workers' default; whether an NVIDIA GPU is visible (without torch); and the heap of a process that analyses input after input
(glibc's thresholds, trims). No import of the core: cheap enough for every start-up."""

from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path

# --workers' default: one per usable core, while each can have this much of the available memory.
# A worker's peak resident size: 75-80 MB with 1 MP photos (qwen2-vl), 477 MB with a 16 MP image
# (qwen3-vl, every output) (measured).
WORKER_MEMORY_BUDGET = 512 * 2**20
MEMINFO = "/proc/meminfo"
PROC_SELF_CGROUP = "/proc/self/cgroup"  # v2's line "0::/path"; v1's "N:memory:/path", "N:cpu,cpuacct:/path"
CGROUP_ROOT = "/sys/fs/cgroup"  # where cgroup v2 is mounted; v1 mounts each controller at CGROUP_ROOT/<controller>
V1_NO_LIMIT = 2**62  # cgroup v1 writes "no memory limit" as a page-rounded 2**63 - 1


def nvidia_gpu_visible() -> bool:
    """Whether this process may see an NVIDIA GPU, without importing torch: the driver's device
    files or /proc entry exist and CUDA_VISIBLE_DEVICES does not hide every device (empty or -1).
    --device auto imports torch only when this holds (a CPU run never imports it)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia") or any(Path("/dev").glob("nvidia[0-9]*"))


@functools.lru_cache(maxsize=4)
def _cgroup_entries(path: str) -> tuple[tuple[str, str, str], ...]:
    """The lines of /proc/self/cgroup as (hierarchy number, controllers, path); read once a process
    (a process's own groups do not change while it runs)."""
    try:
        with open(path) as f:
            return tuple(tuple(entry) for line in f if len(entry := line.rstrip("\n").split(":", 2)) == 3)
    except OSError:
        return ()


def _cgroup_folders(controller: str | None = None) -> list[Path]:
    """This process's cgroup folder and those above it up to the root, deepest first: a limit on
    any of them applies (a container sees its own group as the root; a cluster job's step sits
    below its job). controller None: cgroup v2's; 'memory' or 'cpu': that cgroup v1 hierarchy's,
    mounted at CGROUP_ROOT/<controller> (in a container whose mount is its own group, where the
    host's path named in /proc/self/cgroup does not exist, the mount's root). Empty without it."""
    entries = _cgroup_entries(PROC_SELF_CGROUP)
    if controller is None:
        own = next((path for number, names, path in entries if number == "0" and names == ""), None)
        root = Path(CGROUP_ROOT)
    else:
        own = next((path for _, names, path in entries if controller in names.split(",")), None)
        root = Path(CGROUP_ROOT) / controller
    if own is None:
        return []
    folder = root / own.lstrip("/")
    if controller is not None and not folder.is_dir():
        folder = root
    folders = [folder]
    while folder != root and root in folder.parents:
        folder = folder.parent
        folders.append(folder)
    return folders


def _read_numbers(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def usable_cores() -> int:
    """The CPU cores this process may run on, fewer under a cgroup CPU quota (cpu.max)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        cores = os.cpu_count() or 1
    quotas = [_read_numbers(folder / "cpu.max") for folder in _cgroup_folders()]  # "max 100000", "250000 100000"
    quotas += [_read_numbers(folder / "cpu.cfs_quota_us") + _read_numbers(folder / "cpu.cfs_period_us")
               for folder in _cgroup_folders("cpu")]  # v1: "-1" (none) or "250000", then "100000"
    for quota in quotas:  # microseconds of CPU time per period
        if len(quota) == 2 and quota[0] not in ("max", "-1"):
            try:
                cores = min(cores, max(1, math.ceil(int(quota[0]) / int(quota[1]))))
            except (ValueError, ZeroDivisionError):
                pass
    return cores


def available_memory() -> int | None:
    """Bytes this process can still use: the machine's MemAvailable, lowered to what the tightest
    cgroup v2 memory limit on its group leaves, page cache the kernel can drop (inactive_file) not
    counted as used; None when none of this can be read."""
    found = []
    try:
        with open(MEMINFO) as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    groups = [(folder, "memory.max", "memory.current", "inactive_file") for folder in _cgroup_folders()]
    groups += [(folder, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")  # v1
               for folder in _cgroup_folders("memory")]
    for folder, limit_file, usage_file, cache_key in groups:
        limit = _read_numbers(folder / limit_file)
        try:
            if limit in ([], ["max"]) or int(limit[0]) >= V1_NO_LIMIT:
                continue  # no limit here: the usage and statistics are not needed
            current = _read_numbers(folder / usage_file)
            stat = _read_numbers(folder / "memory.stat")
            cache = dict(zip(stat[::2], stat[1::2])).get(cache_key, "0")
            if current:
                found.append(max(0, int(limit[0]) - (int(current[0]) - int(cache))))
        except ValueError:
            pass
    return min(found) if found else None


def default_workers() -> int:
    """--workers' default: one per usable core, fewer when the available memory would not give
    each worker WORKER_MEMORY_BUDGET; at least one."""
    workers = usable_cores()
    memory = available_memory()
    if memory is not None:
        workers = min(workers, memory // WORKER_MEMORY_BUDGET)
    return max(1, workers)


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, for malloc_trim and mallopt; None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both, or neither
    except (OSError, AttributeError):
        return None
    return libc


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 32 * 2**20  # glibc's largest default mmap threshold


def keep_freed_memory() -> None:
    """For a process that analyses input after input (the program, each batch worker; not a
    notebook's): glibc hands freed blocks above its mmap threshold back to the system at once, and
    the next image faults the same pages in again. Raising the mmap threshold to 32 MB and the trim
    threshold to twice that keeps them for the next image (measured on 200 photos, --stats-only:
    page faults 168,000 -> 17,000, 10 to 20 % less time, the same peak resident size);
    release_free_memory() still trims every IMAGE_TRIM_EVERY images."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * KEEP_FREED_BYTES)


IMAGE_TRIM_EVERY = 64  # images a process scores between two release_free_memory() trims
_TRIM_CALLS = [0]


def release_free_memory(every: int = 1) -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; no-op elsewhere), on
    every `every`-th call only.

    Scoring input after input in one process can fragment glibc's heap and let the resident size
    creep up (measured with torch: about 0.6 MB per image or temporal patch). A trim is not free:
    the pages it returns fault back in on the next image (measured on 100 photos, trimming after
    each image made a --stats-only worker 25 % slower than never trimming, whose resident size
    stayed at 55 MB over 300 images), hence the spacing.
    """
    _TRIM_CALLS[0] += 1
    libc = _libc()
    if libc is not None and _TRIM_CALLS[0] % every == 0:
        libc.malloc_trim(0)
