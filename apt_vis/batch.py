"""Batch mode: discovery of files, folders and globs, worker processes, the two passes of a
batch (--target-ratio), interrupts, and the summaries (summary.csv/json/png, report.html)."""

from __future__ import annotations

import argparse
import ctypes
import errno
import fnmatch
import functools
import glob
import math
import multiprocessing
import os
import select
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from loguru import logger

from visualize_patches import (
    CPU,
    CUDA_BATCH,
    EXIT_FAILURE,
    EXIT_OK,
    Job,
    LOCK_NAME,
    LOG_LEVEL,
    MODEL_NAMES,
    Outcome,
    OutputLock,
    Prepared,
    RenderOptions,
    Scorer,
    Settings,
    STAGING_PREFIX,
    STOP_SIGNALS,
    StopSignals,
    ToolError,
    WritePaths,
    analyse,
    check_output_dir,
    configure_logging,
    encode_csv,
    encode_json,
    extension,
    finish_image,
    kind_of,
    output_names,
    prepare_image,
    reusable_stats,
    run_input,
    score_input,
    staging_beside,
    write_files,
    _inside,
    _remove_empty_folders,
)
from apt_vis.machine import keep_freed_memory
from apt_vis.datasets import container_jobs, container_kind, expand_braces
from apt_vis.pictures import render_batch_summary_plot
from apt_vis.thresholds import resolve_thresholds, sweep_files


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (one line naming the link), or None."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symbolic link loop"
        return f"{path}: cannot follow symbolic link ({exc.strerror or exc})"
    return None


def _walk(folder: Path, exclude: str, failed: list[tuple[Path, str]], hidden: list[Path],
          above: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Files under folder, sorted, depth first. Links to files and folders are followed and the
    paths keep the link's name; a folder link back into a folder being searched (or one in
    above, real paths) is a loop. Skips the output directory (real path exclude); hidden
    entries go to hidden (their insides unread), unreadable folders, link loops and broken
    links to failed as (path, reason)."""
    stack = [(folder, above | {os.path.realpath(folder)})]  # (folder, real paths of it and its ancestors)
    while stack:
        here, ancestors = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            failed.append((here, f"{here}: cannot read folder ({exc.strerror or exc})"))
            continue
        folders = []
        for entry in entries:
            path = here / entry.name
            if entry.name.startswith("."):
                hidden.append(path)
                continue
            try:
                is_dir = entry.is_dir()  # follows links; False for broken ones
            except OSError:
                is_dir = False
            if not is_dir:
                problem = _link_problem(path) if entry.is_symlink() else None
                if problem is None:
                    yield path
                else:
                    failed.append((path, problem))
                continue
            real = os.path.realpath(path)
            if real == exclude:
                continue
            if real in ancestors:
                failed.append((path, f"{path}: symbolic link loop (leads back to {real})"))
                continue
            folders.append((path, ancestors | {real}))
        stack.extend(reversed(folders))


def _glob(pattern: str, failed: list[tuple[Path, str]]) -> list[str]:
    """glob.glob(pattern, recursive=True), except that '**' never enters a folder link that leads
    back to a folder above it: such a link goes to failed as a loop, once. (glob.glob follows
    folder links, and two loops make its '**' exponential.) Hidden names match only when the
    pattern part starts with a dot, as in glob."""
    if "**" not in pattern:
        return glob.glob(pattern)
    root = _glob_root(pattern)
    parts = Path(pattern).parts[0 if str(root) == "." else len(root.parts):]
    matches: set[str] = set()
    loops: dict[str, str] = {}

    def names(folder: str) -> list[str]:
        try:
            return sorted(os.listdir(folder or "."))
        except OSError:
            return []

    def match(here: str, i: int, ancestors: frozenset[str]) -> None:
        if i == len(parts):
            matches.add(here)
            return
        part = parts[i]
        if part == "**":
            match(here, i + 1, ancestors)  # zero folders
            for name in names(here):
                path = os.path.join(here, name)
                if name.startswith(".") or not os.path.isdir(path):
                    continue
                real = os.path.realpath(path)
                if real in ancestors:
                    loops.setdefault(path, f"{path}: symbolic link loop (leads back to {real})")
                    continue
                if i + 1 == len(parts):
                    matches.add(path)  # a trailing '**' matches the folders too
                match(path, i, ancestors | {real})
        elif glob.has_magic(part):
            for name in names(here):
                if fnmatch.fnmatch(name, part) and (part.startswith(".") or not name.startswith(".")):
                    path = os.path.join(here, name)
                    match(path, i + 1, ancestors | {os.path.realpath(path)})
        else:
            path = os.path.join(here, part)
            if os.path.lexists(path):
                match(path, i + 1, ancestors | {os.path.realpath(path)})

    start = "" if str(root) == "." else str(root)
    match(start, 0, frozenset({os.path.realpath(start or ".")}))
    failed.extend((Path(path), reason) for path, reason in sorted(loops.items()))
    return sorted(matches)


def _loop_on_the_way(path: Path, root: Path, real: Callable[[str], str]) -> tuple[Path | None, frozenset[str]]:
    """For a folder below root: the first folder on the way down from root (itself included)
    that leads back to one before it, if any, and the real paths of those folders.
    glob.glob follows folder links, so a loop yields the same files again and again."""
    folder, reals = root, {real(str(root))}
    for part in Path(os.path.relpath(path, root)).parts:
        folder = folder / part
        here = real(str(folder))
        if here in reals:
            return folder, frozenset(reals)
        reals.add(here)
    return None, frozenset(reals)


def _below(path: str, folder: str) -> str | None:
    """path relative to folder, when path is textually inside it with no '..' on the way: what
    os.path.relpath gives for such paths (both normalised, as pathlib's are), without its two
    abspath calls per path (discovery calls this for every file). None otherwise."""
    if folder in ("", "."):
        return None
    prefix = folder if folder.endswith(os.sep) else folder + os.sep
    if not path.startswith(prefix) or len(path) == len(prefix):
        return None
    rest = path[len(prefix):]
    return None if os.pardir in rest.split(os.sep) else rest


def _keyed(path: Path, root: Path, real: Callable[[str], str] = os.path.realpath) -> tuple[str, str]:
    """(key, root key): the input root's real path, and the path below it as found (link names
    kept, so two links to one file are two inputs). Keys identify inputs and give their labels.
    real: os.path.realpath, or a cached one (many files share a root)."""
    root_key = real(str(root))
    relative = _below(str(path), str(root)) or os.path.normpath(os.path.relpath(path, root))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):  # a glob such as 'a/*/../../x'
        root_key = os.path.realpath(path.parent)
        relative = path.name
    return os.path.join(root_key, relative), root_key


@dataclass
class Discovery:
    jobs: list[Job]
    skipped: int  # files that are neither images nor videos
    failed: list[tuple[str, str]]  # (label, one-line reason): entries found that cannot be read
    hidden: int  # hidden entries skipped (names starting with "."; a hidden folder counts once)


BATCH_FILE_NAMES = ("summary.csv", "summary.json", "summary.png", "report.html")  # as write_summaries
BATCH_SWEEP_NAMES = ("threshold_sweep.csv", "threshold_sweep.png")  # batch sweeps always plot


def discover(inputs: Sequence[str], out_root: Path, image_column: str | None = None,
             id_column: str | None = None) -> Discovery:
    """Expand files, folders (recursively) and glob patterns into jobs.

    Tar shards and Parquet files (found as files, in folders or by globs; brace ranges such as
    'shards/{000..099}.tar' expanded) give one job per image inside (see apt_vis.datasets),
    labelled SHARD.tar/KEY.EXT and FILE.parquet/ID.

    Each input gets one folder mirroring its path (full file name included) relative to the
    inputs' common root (a single file outside a container never comes here: the core's run_one
    writes its outputs straight into the output directory). Raises ToolError for inputs that match nothing.
    Entries that cannot be read (unreadable folders, broken links, link loops)
    become Discovery.failed rather than errors.
    (Long because every kind of input (file, folder, glob, shard, table) meets the same
    bookkeeping of roots, keys, failures and hidden entries in one pass.)
    """
    inputs = [e for text in inputs for e in (expand_braces(text) if "{" in text and not os.path.exists(text)
                                             else [text])]
    exclude = os.path.realpath(out_root)
    real_root = functools.lru_cache(maxsize=None)(os.path.realpath)  # the inputs' roots, resolved once each
    found: list[tuple[Path, str, str, str, tuple | None]] = []  # (file, key, root key, kind, member)
    problems: list[tuple[str, str, str]] = []  # (key, root key, reason)
    hidden: list[Path] = []
    skipped = 0
    for text in inputs:
        path = Path(text)
        failed: list[tuple[Path, str]] = []
        if path.is_file():
            candidates, root = [path], path.parent
        elif path.is_dir():
            if _inside(os.path.realpath(path), exclude):
                raise ToolError(f"{text}: is inside the output directory {out_root}; choose an -o outside it")
            candidates, root = list(_walk(path, exclude, failed, hidden)), path
            if failed and failed[0][0] == path:  # the folder itself is unreadable: as for a missing one
                raise ToolError(failed[0][1])
        elif glob.has_magic(text):
            root = _glob_root(text)
            candidates = []
            real = functools.lru_cache(maxsize=None)(os.path.realpath)
            for match in _glob(text, failed):
                m = Path(match)
                if _inside(real(match), exclude):
                    continue  # the outputs are never inputs
                is_dir = m.is_dir()
                loop, above = _loop_on_the_way(m if is_dir else m.parent, root, real)
                if loop is not None:
                    failed.append((loop, f"{loop}: symbolic link loop (leads back to {real(str(loop))})"))
                elif is_dir:
                    candidates.extend(_walk(m, exclude, failed, hidden, above))
                elif m.is_file():
                    candidates.append(m)
                elif (problem := _link_problem(m)) is not None:
                    failed.append((m, problem))
            if not candidates and not failed:
                raise ToolError(f"{text}: no files match")
        else:
            raise ToolError(_link_problem(path) or f"{text}: no such file or directory")
        usable = 0
        for candidate in candidates:
            if container_kind(candidate) is not None:
                key, root_key = _keyed(candidate, root, real_root)
                members, broken, others = container_jobs(candidate, image_column, id_column)
                found += [(candidate / name, f"{key}/{name}", root_key, kind, member)
                          for name, kind, member in members]
                problems += [(f"{key}/{name}" if name else key, root_key, reason) for name, reason in broken]
                skipped += others
                usable += len(members) + len(broken)
                continue
            kind = kind_of(candidate)
            if kind is None:
                skipped += 1
            else:
                found.append((candidate, *_keyed(candidate, root, real_root), kind, None))
                usable += 1
        problems += [(*_keyed(p, root, real_root), reason) for p, reason in failed]
        if usable == 0 and not failed:
            raise ToolError(f"{text}: no images or videos found ({len(candidates)} other files skipped)")
    common = os.path.commonpath([r for _, _, r, _, _ in found] + [r for _, r, _ in problems])
    jobs, seen = [], set()
    for path, key, _, kind, member in found:
        if key in seen:
            continue
        seen.add(key)
        relative = Path(_below(key, common) or os.path.relpath(key, common))
        jobs.append(Job(path, relative.as_posix(), out_root / relative, kind, member))
    failures = {key: (Path(_below(key, common) or os.path.relpath(key, common)).as_posix(), reason)
                for key, _, reason in problems}
    hidden_keys = {os.path.join(os.path.realpath(p.parent), p.name) for p in hidden}
    return Discovery(jobs, skipped, list(failures.values()), len(hidden_keys))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


MAIN_WATCH_SECONDS = 0.5  # where there is no pidfd: how often a worker checks the main process


def _die_with(main_pid: int) -> None:
    """End this worker when the main process dies, however it dies (SIGKILL included): a thread
    waits on a pidfd of the main process (Linux; elsewhere it polls). Where the fork server is
    this worker's direct parent, it waits for its workers, so it cannot be the one to notice; the
    kernel's parent-death signal covers the fork server (or, forked, the main process) dying first."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    try:
        pidfd = os.pidfd_open(main_pid)
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while _alive(main_pid):
                time.sleep(MAIN_WATCH_SECONDS)
        os._exit(EXIT_FAILURE)

    if not _alive(main_pid):
        os._exit(EXIT_FAILURE)
    threading.Thread(target=watch, name="main-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _worker_init(log_level: str | None, main_pid: int) -> None:
    for signum in STOP_SIGNALS:  # the main process decides when to stop, and stops its workers itself
        signal.signal(signum, signal.SIG_IGN)
    # a forked worker starts with them blocked (Executor), so that the main process's handlers,
    # inherited until the lines above, never run here; a signal that came meanwhile is now ignored
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    keep_freed_memory()  # a fork server's worker does not inherit the program's setting
    _die_with(main_pid)
    if log_level is not None:  # this process is the tool's own: log as the main process does
        configure_logging(log_level)
    if "torch" in sys.modules:  # only CUDA runs and upsample_mse import it; a CPU run never does
        sys.modules["torch"].set_num_threads(1)  # the workers are the parallelism


def _thread_count() -> int:
    """Threads of this process, those that libraries started outside Python (OpenBLAS) included."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _fork_is_safe() -> bool:
    """Whether workers may be forked from this process: on Linux, with no other thread running
    (a fork carries only the calling thread, and a lock another thread held stays locked in the
    child) and torch not loaded (CUDA cannot be used in a forked child). Otherwise they come
    from multiprocessing's fork server, a fresh interpreter that imports the tool once more
    before the first worker starts (about 0.35 s on 2 cores, issue 10). The program keeps
    numpy's OpenBLAS to one thread (see the top of visualize_patches.py) so that it qualifies."""
    return sys.platform == "linux" and _thread_count() == 1 and "torch" not in sys.modules


class Executor:
    """Runs tasks in forked worker processes, or inline when workers == 1.

    It remembers which submitted tasks finish an input (`job` given), so that after an
    interrupt those still running can be waited for and counted (drain), or killed (kill).
    """

    def __init__(self, workers: int, hold: Callable[[], AbstractContextManager] = nullcontext):
        self.workers = workers
        self.pool = None
        self.inflight: dict[Future, Job | None] = {}
        self.hold = hold  # BatchSignals.holding: a stop signal waits until a task is handed over and noted
        if workers > 1:
            fork = _fork_is_safe()
            logger.debug(f"{workers} workers forked from this process" if fork else
                         f"{workers} workers from the fork server (this process has other threads or torch)")
            if fork:
                context = multiprocessing.get_context("fork")
            else:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                            initargs=(LOG_LEVEL[0], os.getpid()))
            if fork:  # start every worker now, while this is still the only thread (tqdm's come later)
                self._start_forked_workers()

    def _start_forked_workers(self) -> None:
        """Fork every worker with the stop signals blocked (see _worker_init); one that arrives
        meanwhile is delivered here, after the fork. If it interrupts (or anything fails), the
        workers already started are killed: nothing else knows of them, and the interpreter's
        exit would wait for them for good."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # this thread's mask, unchanged
        try:
            try:
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a pending signal may raise here
                self.pool.submit(os.getpid)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # one that came meanwhile: raised here
        except BaseException:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a second one waits for the cleanup
            try:
                self.kill()
                self.pool.shutdown(wait=True, cancel_futures=True)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            raise

    def submit(self, fn: Callable, *args, job: Job | None = None) -> Future:
        """fn(*args); `job` marks a task whose success means that job's outputs are complete."""
        if self.pool is not None:
            with self.hold():  # else a signal in between would lose a task that runs all the same
                future = self.pool.submit(fn, *args)
                self.inflight[future] = job
            return future
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - delivered to the caller like a pool would
            future.set_exception(exc)
        return future

    def forget(self, future: Future) -> None:
        """The caller has recorded this task's outcome."""
        self.inflight.pop(future, None)

    def drain(self) -> Iterator[tuple[Job, object]]:
        """After an interrupt: cancel the tasks not started; (job, outcome) of each input-finishing
        task that was already running, as it ends (some may have been recorded already)."""
        for future in self.inflight:
            future.cancel()
        for future, job in list(self.inflight.items()):
            if job is not None and not future.cancelled():
                yield job, _outcome(future.result)

    def unfinished(self) -> list[Job]:
        return [job for job in self.inflight.values() if job is not None]

    def kill(self) -> None:
        """End every worker at once (the second Ctrl-C); nothing once the pool is shut down."""
        processes = getattr(self.pool, "_processes", None) or {}  # noqa: SLF001 - no public handle; None after shutdown
        for process in list(processes.values()):
            process.kill()

    def shutdown(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)


def failure_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ToolError) else f"{type(exc).__name__}: {exc}"


SUMMARY_BASE_COLUMNS = ("path", "kind", "status", "error", "output", "original_width", "original_height",
                        "resized_width", "resized_height")


SUMMARY_TAIL_COLUMNS = ("apt_patches", "uniform_patches", "retained_ratio", "qwen2vl_tokens", "frames_sampled",
                        "temporal_patches", "thresholds")


def summary_row(job: Job, out_root: Path, stats: Mapping | None, status: str, error: str = "",
                pictures: bool = True) -> dict:
    row = {"path": job.label, "kind": job.kind, "status": status, "error": error,
           "output": job.out_dir.relative_to(out_root).as_posix() if job.out_dir != out_root else ".",
           "pictures": pictures}
    if stats is not None:
        (ow, oh), (rw, rh) = stats["original_size"], stats["resized_size"]
        row.update(original_width=ow, original_height=oh, resized_width=rw, resized_height=rh)
        row.update({f"patches_{ps}": n for ps, n in stats["patches_per_scale"].items()})
        row.update({k: stats[k] for k in ("apt_patches", "uniform_patches", "retained_ratio", "qwen2vl_tokens")})
        row["frames_sampled"] = stats.get("frames_sampled", "")
        row["temporal_patches"] = stats.get("temporal_patches", "")
        row["thresholds"] = " ".join(repr(t) for t in stats["thresholds"])
    return row


def percentile(values: Sequence[float], q: float) -> float:
    """numpy.percentile(values, q) (its default 'linear' method), to the last bit: the same
    index, fraction and interpolation. numpy's calls np.unique, whose first call imports numpy.ma
    (8 ms of every batch run). Sorting values already sorted takes one pass."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * (q / 100)
    below = math.floor(position)
    fraction = position - below
    a, b = ordered[below], ordered[min(below + 1, len(ordered) - 1)]
    return b - (b - a) * (1 - fraction) if fraction >= 0.5 else a + (b - a) * fraction


def median(values: Sequence[float]) -> float:
    """numpy.median(values), to the last bit (the middle value, or the mean of the middle two)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarize(rows: Sequence[Mapping], skipped: int, settings: Settings,
              interrupted: bool, pending: int, hidden: int = 0) -> dict:
    """summary.json: counts, token totals and means, retained-ratio statistics, settings."""
    done = [r for r in rows if r["status"] in ("ok", "reused")]
    ratios = np.array([r["retained_ratio"] for r in done], dtype=float)
    totals = {k: int(sum(r[k] for r in done)) for k in ("uniform_patches", "apt_patches", "qwen2vl_tokens")}
    n = max(1, len(done))
    ratio_stats = None
    if done:
        ordered = sorted(ratios.tolist())
        ratio_stats = {
            "mean": float(ratios.mean()), "median": float(median(ordered)),
            "p10": float(percentile(ordered, 10)), "p90": float(percentile(ordered, 90)),
            "min": float(ratios.min()), "max": float(ratios.max()),
            "overall": totals["apt_patches"] / max(1, totals["uniform_patches"]),
        }
    return {
        "images": {
            "found": len(rows) + pending, "ok": sum(r["status"] == "ok" for r in rows),
            "reused": sum(r["status"] == "reused" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows), "not_processed": pending,
        },
        "files_skipped": skipped,
        "hidden_skipped": hidden,
        "interrupted": interrupted,
        "tokens": {
            "vit_patches_uniform_total": totals["uniform_patches"],
            "vit_patches_apt_total": totals["apt_patches"],
            "vit_patches_uniform_mean": totals["uniform_patches"] / n,
            "vit_patches_apt_mean": totals["apt_patches"] / n,
            "qwen2vl_llm_tokens_total": totals["qwen2vl_tokens"],
            "qwen2vl_llm_tokens_mean": totals["qwen2vl_tokens"] / n,
            "saved_fraction": 1 - totals["apt_patches"] / max(1, totals["uniform_patches"]),
        },
        "retained_ratio": ratio_stats,
        "thresholds": list(settings.thresholds),
        "target_ratio": settings.target_ratio,
        "settings": settings.record(),
        "failures": [{"path": r["path"], "error": r["error"]} for r in rows if r["status"] == "failed"],
    }


def write_summaries(out_root: Path, rows: Sequence[Mapping], summary: Mapping, settings: Settings,
                    sweep: dict[str, bytes] | None) -> None:
    """summary.csv, .json, .png, report.html (and the sweep files) as one set: all or none."""
    sizes = settings.patch_sizes
    columns = [*SUMMARY_BASE_COLUMNS, *(f"patches_{ps}" for ps in sizes), *SUMMARY_TAIL_COLUMNS]
    thresholds_text = "thresholds " + ", ".join(f"{t:g}" for t in summary["thresholds"])
    files = {
        "summary.csv": encode_csv(rows, columns),
        "summary.json": encode_json(summary),
        "summary.png": render_batch_summary_plot(rows, summary["retained_ratio"], thresholds_text,
                                                 MODEL_NAMES[settings.model]),
        "report.html": extension("pages").report_html(rows, summary, sizes, MODEL_NAMES[settings.model]).encode(),
        **(sweep or {}),
    }
    write_files(out_root, files, what="the summaries")


class Progress:
    """A tqdm bar on stderr for batches, silent otherwise."""

    def __init__(self, total: int, enabled: bool, desc: str | None = None, unit: str = "file"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_batch_paths(found: Discovery, out_root: Path, settings: Settings, options: RenderOptions) -> None:
    """WritePaths' checks for a batch: the lock, each input's output folder and the folders made on
    the way to it, every file in it, the summaries and sweep files."""
    paths = WritePaths(found.jobs, out_root)
    resolved: dict[str, str] = {}

    def child(parent: str, name: str) -> str:
        """parent (real) / name as a real path: one lstat, shared by siblings."""
        path = os.path.join(parent, name)
        if path not in resolved:
            resolved[path] = os.path.realpath(path) if os.path.islink(path) else path
        return resolved[path]

    names_of = {kind: output_names(kind, settings, options) for kind in ("image", "video")}
    paths.check_names(paths.out_real, out_root, (LOCK_NAME,), "")
    folders = set()
    for job in found.jobs:
        real, shown = paths.out_real, out_root
        parts = Path(job.label).parts
        for k, part in enumerate(parts):
            if part.startswith(STAGING_PREFIX):  # removed as a killed run's leftover, or a sibling's staging
                raise ToolError(f"{job.path}: its output folder {shown / part} would be named like this tool's "
                                f"hidden staging folders ({STAGING_PREFIX}*); rename it or its folder")
            real, shown = child(real, part), shown / part
            paths.check(real, shown, f"output folder of {job.label}", folder=k == len(parts) - 1)
        folders.add(real)
        paths.check_names(real, shown, names_of[job.kind], f" of {job.label}")
    batch_names = BATCH_FILE_NAMES + (BATCH_SWEEP_NAMES if options.sweep else ())
    paths.check_names(paths.out_real, out_root, batch_names, "")
    for name in batch_names:
        if os.path.join(paths.out_real, name) in folders:
            raise ToolError(f"{out_root / name}: is both an input's output folder and a batch file; "
                            "rename that input or choose another -o")


class BatchSignals(StopSignals):
    """The run's StopSignals while a batch runs. The first signal raises KeyboardInterrupt: the run
    stops cleanly (inputs in progress finish, summaries are written). The second calls on_second
    (which kills the workers) and raises again, so the run ends at once. Later ones, and any that
    arrive while `deferred`, are only recorded. It shares the run's record of signals, and its
    handlers replace the run's only where those are installed."""

    def __init__(self, run_signals: StopSignals) -> None:
        super().__init__()
        self.received = run_signals.received
        self.replaces = run_signals.installed
        self.on_second: Callable[[], None] | None = None
        self.deferred = False

    def __enter__(self) -> "BatchSignals":
        return super().__enter__() if self.replaces else self

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        if len(self.received) == 2 and self.on_second is not None:
            self.on_second()
        if not self.deferred and len(self.received) <= 2:
            raise KeyboardInterrupt

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """Signals during the block are recorded, not raised (short, must-finish work)."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Signals during the block are raised when it ends, as they would have been during it: a
        few statements that must happen together (handing an input to the workers and noting it)."""
        if self.deferred:  # already inside deferring(): that decides
            yield
            return
        before = len(self.received)
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False
        if before < 2 and len(self.received) > before:
            raise KeyboardInterrupt


def run_inputs(inputs: Sequence[str], args: argparse.Namespace, settings: Settings, options: RenderOptions,
               scorer: Scorer, signals: StopSignals) -> int:
    """Folders, globs, datasets or several files: one output folder per input, then the summaries."""
    found = discover(inputs, args.output, args.image_column, args.id_column)
    if options.sweep or settings.target_ratio is not None:
        extension("thresholds")
    if any(job.kind == "video" for job in found.jobs):
        extension("video")
    if args.engine == "ray":
        extension("ray_engine").ray_module()  # a missing Ray: one line before any work
    check_batch_paths(found, args.output, settings, options)
    check_output_dir(args.output)
    with OutputLock(args.output):
        hidden = f", {found.hidden} hidden entries skipped" if found.hidden else ""
        if args.engine == "ray":
            logger.info(f"{len(found.jobs)} inputs found, {found.skipped} other files skipped{hidden}; engine ray")
            return extension("ray_engine").run_ray(found, args.output, settings, options, args.skip_existing,
                                                   not args.quiet and len(found.jobs) > 1, args.ray_address)
        logger.info(f"{len(found.jobs)} inputs found, {found.skipped} other files skipped{hidden}; "
                    f"{args.workers} workers, device {scorer.device}")
        with BatchSignals(signals) as batch_signals:
            return run_batch(found, args.output, settings, options, scorer, args.workers, args.skip_existing,
                             show_progress=not args.quiet and len(found.jobs) > 1, signals=batch_signals)


def run_batch(found: Discovery, out_root: Path, settings: Settings, options: RenderOptions, scorer: Scorer,
              workers: int, skip_existing: bool, show_progress: bool, signals: BatchSignals) -> int:
    """Every job, then summaries; exit status 1 when any input failed, 128 + N after signal N.
    (Long because the two nested try blocks are the interrupt protocol: the first signal drains
    the inputs in progress, the second kills the workers; the summaries are written either way.)"""
    unreadable = [Job(Path(label), label, out_root / label, "") for label, _ in found.failed]  # kind "": never run
    jobs = [*unreadable, *found.jobs]
    rows: dict[Job, dict] = {}
    for job, (_, reason) in zip(unreadable, found.failed):
        rows[job] = summary_row(job, out_root, None, "failed", reason)
        logger.error(reason)
    maps_of: dict[Job, list] = {}  # per job: maps of each image / temporal patch (for sweeps and targets)
    executor: Executor | None = None
    started = time.time()
    progress = Progress(0, False)

    def record(job: Job, outcome: object) -> None:
        if isinstance(outcome, BrokenProcessPool) and signals.received:
            return  # its worker was stopped by the signal: not processed
        if isinstance(outcome, BaseException):
            rows[job] = summary_row(job, out_root, None, "failed", failure_text(outcome))
            logger.error(failure_text(outcome) if isinstance(outcome, ToolError)
                         else f"{job.label}: {failure_text(outcome)}")
        else:
            rows[job] = summary_row(job, out_root, outcome.stats, "reused" if outcome.reused else "ok",
                                    pictures=not options.stats_only)
            if options.sweep:  # the only use of pass 2's maps here: hold them for nothing else
                maps_of.setdefault(job, outcome.maps)

    try:
        try:
            # made in here: a signal may come as the workers fork
            executor = Executor(workers if len(found.jobs) > 1 else 1, hold=signals.holding)
            signals.on_second = executor.kill
            if settings.target_ratio is not None:
                # pass 1: every input's maps, so that one threshold serves the whole set
                progress = Progress(len(found.jobs), show_progress, "scoring")
                for job, outcome in _score_all(found.jobs, settings, scorer, executor, progress):
                    if isinstance(outcome, BaseException):
                        record(job, outcome)
                    else:
                        maps_of[job] = outcome
                progress.close()
                settings = resolve_thresholds(settings, [m for ms in maps_of.values() for m in ms])
                logger.info(f"target ratio {settings.target_ratio:g}: shared threshold {settings.thresholds[0]!r}")
            todo = [j for j in found.jobs if j not in rows]
            progress = Progress(len(todo), show_progress, "writing" if settings.target_ratio is not None else None)
            for job, outcome in _process_all(todo, settings, options, scorer, executor, progress, maps_of,
                                             skip_existing):
                record(job, outcome)
        except KeyboardInterrupt:
            logger.error(f"interrupted ({signals.name}): finishing the inputs in progress, then writing the "
                         "summary (Ctrl-C again stops at once)")
            for job, outcome in executor.drain() if executor is not None else ():
                if job not in rows:
                    record(job, outcome)
    except KeyboardInterrupt:  # the second signal: the workers are gone, their inputs unfinished
        logger.error("stopped at once: inputs in progress discarded")
    finally:
        with signals.deferring():
            if executor is not None:
                executor.shutdown(cancel=True)
                account_unfinished(executor.unfinished(), rows, out_root, settings, options, started)
            progress.close()
    with signals.deferring():
        ordered = [rows[j] for j in jobs if j in rows]
        pending = len(jobs) - len(ordered)
        sweep = None
        if options.sweep:
            maps_list = [m for j in jobs if j in rows and rows[j]["status"] != "failed"
                         for m in (maps_of.get(j) or _stored_maps(j, settings))]
            if maps_list:
                sweep = sweep_files(maps_list, settings, None, f"Threshold sweep over {len(ordered)} inputs",
                                    plot=True)
        summary = summarize(ordered, found.skipped, settings, bool(signals.received), pending, found.hidden)
        write_summaries(out_root, ordered, summary, settings, sweep)
    ok = summary["images"]["ok"] + summary["images"]["reused"]
    logger.info(f"{ok} of {len(jobs)} inputs analysed, {summary['images']['failed']} failed, "
                f"{found.skipped} other files skipped; summaries in {out_root}")
    if signals.received:
        return signals.exit_code
    return EXIT_FAILURE if summary["images"]["failed"] else EXIT_OK


def account_unfinished(unfinished: Sequence[Job], rows: dict, out_root: Path, settings: Settings,
                       options: RenderOptions, started: float) -> None:
    """After the workers were stopped: each input handed to them and not yet recorded either had
    all its outputs in place, written by this run (its worker finished, its result was lost with
    the kill): it is recorded as done; or what its worker left of it is removed."""
    for job in unfinished:
        if job in rows:
            continue
        stats = reusable_stats(job, settings, options)
        try:
            ours = stats is not None and (job.out_dir / "stats.json").stat().st_mtime >= started
        except OSError:
            ours = False
        if ours:
            rows[job] = summary_row(job, out_root, stats, "ok", pictures=not options.stats_only)
        else:
            discard_unfinished(job, out_root)


def discard_unfinished(job: Job, out_root: Path) -> None:
    """What a killed worker left of one input: its staging folder, and folders left empty."""
    for stale in job.out_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(staging_beside(job.out_dir), ignore_errors=True)  # a new folder's, staged beside it
    folders = [job.out_dir, *(p for p in job.out_dir.parents if out_root in p.parents)]
    _remove_empty_folders(folders)


def _stored_maps(job: Job, settings: Settings) -> list[dict[int, np.ndarray]]:
    """Maps of an input done by an earlier run (importance_maps.npz), as float64."""
    try:
        with np.load(job.out_dir / "importance_maps.npz") as data:
            if job.kind == "video":
                count = int(data["temporal_patches"])
                return [{ps: data[f"scale_{ps}"][k].astype(np.float64) for ps in settings.patch_sizes}
                        for k in range(count)]
            return [{ps: data[f"scale_{ps}"].astype(np.float64) for ps in settings.patch_sizes}]
    except (OSError, KeyError, ValueError):
        return []


def _outcome(get: Callable[[], object]) -> object:
    """get()'s result, or the exception it raised: one bad input never stops the batch.
    (KeyboardInterrupt is no Exception, so Ctrl-C still stops it.)"""
    try:
        return get()
    except Exception as exc:  # noqa: BLE001 - recorded as that input's failure
        return exc


def _ordered_map(executor: Executor, fn: Callable, calls: Sequence[tuple[Job, tuple]],
                 window: int, final: bool = False) -> Iterator[tuple[Job, object]]:
    """fn(*args) for each (job, args), results (or the exception raised) in order,
    at most `window` calls ahead in the workers; one at a time without workers.
    final: fn's success means the job's outputs are complete (see Executor.drain)."""
    if executor.pool is None:
        for job, args in calls:
            yield job, _outcome(functools.partial(fn, *args))
        return
    queue: list[tuple[Job, Future]] = []
    pending = iter(calls)
    for job, args in pending:
        queue.append((job, executor.submit(fn, *args, job=job if final else None)))
        if len(queue) >= window:
            break
    while queue:
        job, future = queue.pop(0)
        nxt = next(pending, None)
        if nxt is not None:
            queue.append((nxt[0], executor.submit(fn, *nxt[1], job=nxt[0] if final else None)))
        yield job, _outcome(future.result)
        executor.forget(future)  # only once the caller has recorded it


def _score_all(jobs: Sequence[Job], settings: Settings, scorer: Scorer, executor: Executor,
               progress: Progress) -> Iterator[tuple[Job, list | BaseException]]:
    """Pass 1 of --target-ratio: (job, its maps or the exception raised), for every input.
    CPU: each worker scores its inputs. CUDA: workers decode, this process scores."""
    window = 2 * executor.workers
    if scorer.in_workers:
        calls = [(j, (j, settings)) for j in jobs]
        for job, outcome in _ordered_map(executor, score_input, calls, window):
            progress.update()
            yield job, outcome
        return
    calls = [(j, (j, settings, False)) for j in jobs if j.kind == "image"]
    for job, prepared in _ordered_map(executor, prepare_image, calls, window + CUDA_BATCH):
        progress.update()
        yield job, prepared if isinstance(prepared, BaseException) else _outcome(
            functools.partial(scorer.maps, [prepared.resized], settings))
    for job in (j for j in jobs if j.kind == "video"):
        progress.update()
        yield job, _outcome(functools.partial(score_input, job, settings, scorer))


def _process_all(jobs: Sequence[Job], settings: Settings, options: RenderOptions, scorer: Scorer,
                 executor: Executor, progress: Progress, known: Mapping[Job, list],
                 skip_existing: bool) -> Iterator[tuple[Job, Outcome | BaseException]]:
    """Pass 2: (job, its Outcome or the exception raised), for every input. CPU: each worker
    takes an input from file to outputs (run_input). CUDA: workers decode, render and write
    images while this process scores them in batches; videos run here."""
    if scorer.in_workers:
        calls = [(j, (j, settings, options, CPU, skip_existing, known.get(j))) for j in jobs]
        for job, outcome in _ordered_map(executor, _run_input_in_worker, calls, 2 * executor.workers, final=True):
            progress.update()
            yield job, outcome
        return
    yield from _images_on_cuda([j for j in jobs if j.kind == "image"], settings, options, scorer, executor,
                               progress, known, skip_existing)
    for job in (j for j in jobs if j.kind == "video"):
        yield job, _outcome(functools.partial(run_input, job, settings, options, scorer, skip_existing,
                                              known.get(job)))
        progress.update()


def _run_input_in_worker(job: Job, settings: Settings, options: RenderOptions, scorer: Scorer,
                         skip_existing: bool, maps: list | None) -> Outcome:
    """run_input for pass 2 in a worker: the maps travel back only when the main process needs
    them (--sweep), so that the results stay small (about 45 KB of maps per 1 MP image)."""
    outcome = run_input(job, settings, options, scorer, skip_existing, maps)
    return outcome if options.sweep else replace(outcome, maps=[])


def _images_on_cuda(images: Sequence[Job], settings: Settings, options: RenderOptions, scorer: Scorer,
                    executor: Executor, progress: Progress, known: Mapping[Job, list],
                    skip_existing: bool) -> Iterator[tuple[Job, Outcome | BaseException]]:
    finishing: list[tuple[Job, Future, list]] = []

    def drain(block: bool) -> Iterator[tuple[Job, Outcome | BaseException]]:
        while finishing and (block or finishing[0][1].done()):
            job, future, maps = finishing.pop(0)
            progress.update()
            stats = _outcome(future.result)
            yield job, stats if isinstance(stats, BaseException) else Outcome(stats, maps)
            executor.forget(future)

    def score(ready: list[Prepared]) -> None:
        start = time.perf_counter()
        missing = [p for p in ready if p.job not in known]
        computed = iter(scorer.maps([p.resized for p in missing], settings) if missing else [])
        all_maps = [known[p.job][0] if p.job in known else next(computed) for p in ready]
        share = (time.perf_counter() - start) * 1000 / len(ready)  # the batch's time, shared out
        for p, maps in zip(ready, all_maps):
            p.timings["importance"] = share
            result = analyse(p, maps, settings, scorer.device)
            finishing.append((p.job, executor.submit(finish_image, result, options, job=p.job), [maps]))

    todo = []
    for job in images:
        reused = reusable_stats(job, settings, options) if skip_existing else None
        if reused is not None:
            progress.update()
            yield job, Outcome(reused, [], reused=True)
        else:
            todo.append(job)
    pending: list[Prepared] = []
    calls = [(j, (j, settings, not options.stats_only)) for j in todo]
    for job, prepared in _ordered_map(executor, prepare_image, calls, 2 * executor.workers + CUDA_BATCH):
        if isinstance(prepared, BaseException):
            progress.update()
            yield job, prepared
            continue
        pending.append(prepared)
        if len(pending) >= CUDA_BATCH:
            score(pending)
            pending = []
        yield from drain(block=False)
    if pending:
        score(pending)
    yield from drain(block=True)
