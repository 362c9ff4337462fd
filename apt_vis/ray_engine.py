"""--engine ray: the batch as a Ray Data pipeline, on this machine or a cluster.

The driver discovers the inputs as the local engine does and hands Ray the jobs' small
descriptors (a file path, or a member of a shard or table that the worker reads itself);
map_batches runs the core's per-input pipeline (run_input / score_input) in the Ray workers,
which write each input's outputs under -o (a path every worker can write). Only stats rows
come back, and for --target-ratio and --sweep each batch's scores reduced to the step
function of one shared threshold (SharedThresholdCounts: sorted score arrays that merge by
concatenation), never the maps. The driver writes the summaries with apt_vis.batch's functions.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from loguru import logger

from visualize_patches import (
    CPU,
    EXIT_FAILURE,
    EXIT_OK,
    LOG_LEVEL,
    Job,
    RenderOptions,
    Settings,
    ToolError,
    run_input,
    score_input,
)
from apt_vis.batch import Discovery, Progress, _stored_maps, failure_text, summarize, summary_row, write_summaries
from apt_vis.thresholds import SharedThresholdCounts, choose_shared_threshold, sweep_files
from apt_vis.machine import keep_freed_memory

RAY_HINT = "pip install 'ray[data]' (or, in the tool's folder, pip install '.[ray]')"
BATCH_SIZE = 4  # inputs per map_batches call


def ray_module():
    try:
        import ray
        import ray.data  # noqa: F401
    except ModuleNotFoundError:
        raise ToolError(f"--engine ray needs Ray: {RAY_HINT}") from None
    return ray


def merge_counts(parts: Sequence[SharedThresholdCounts]) -> SharedThresholdCounts | None:
    """The step functions of several sets of images as one: the sorted arrays merged, the
    uniform counts added (equal to SharedThresholdCounts.from_maps over all their maps)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    sizes = parts[0].patch_sizes
    return SharedThresholdCounts(
        sizes,
        {ps: np.sort(np.concatenate([p.lower[ps] for p in parts])) for ps in sizes},
        {ps: np.sort(np.concatenate([p.upper[ps] for p in parts])) for ps in sizes},
        sum(p.uniform for p in parts),
    )


def _failure(job: Job, exc: BaseException) -> str:
    """As the local engine logs a failed input: ToolErrors name it themselves."""
    return failure_text(exc) if isinstance(exc, ToolError) else f"{job.label}: {failure_text(exc)}"


def _step_column(maps_list: list, rows: int) -> list[bytes]:
    """A batch's maps reduced to one step function (SharedThresholdCounts), pickled into the first
    of its rows' "step" cells; the other cells empty."""
    counts = SharedThresholdCounts.from_maps(maps_list) if maps_list else None
    return [pickle.dumps(counts)] + [b""] * (rows - 1)


def _score_batch(batch: dict, settings: Settings) -> dict:
    """Pass 1 of --target-ratio in a Ray worker: per input an error or nothing; the batch's
    maps reduced to one step function (first row of the batch carries it)."""
    _enter(batch["cwd"][0])
    errors, maps_list = [], []
    for blob in batch["job"]:
        job = pickle.loads(blob)
        try:
            maps_list += score_input(job, settings, CPU)
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - that input's failure
            errors.append(_failure(job, exc))
    step = _step_column(maps_list, len(errors))
    return {"index": np.asarray(batch["index"]), "error": np.array(errors, dtype=object),
            "step": np.array(step, dtype=object)}


def _run_batch(batch: dict, settings: Settings, options: RenderOptions, skip_existing: bool,
               want_counts: bool) -> dict:
    """Pass 2 in a Ray worker: each input from its source to its outputs under -o; per input
    its stats (pickled) or an error; with want_counts, the batch's step function."""
    _enter(batch["cwd"][0])
    stats, errors, reused, maps_list = [], [], [], []
    for blob in batch["job"]:
        job = pickle.loads(blob)
        try:
            outcome = run_input(job, settings, options, CPU, skip_existing, None)
        except Exception as exc:  # noqa: BLE001 - that input's failure
            stats.append(b"")
            errors.append(_failure(job, exc))
            reused.append(False)
            continue
        stats.append(pickle.dumps(outcome.stats))
        errors.append("")
        reused.append(outcome.reused)
        if want_counts:
            maps_list += outcome.maps or _stored_maps(job, settings)
    step = _step_column(maps_list, len(errors))
    return {"index": np.asarray(batch["index"]), "stats": np.array(stats, dtype=object),
            "error": np.array(errors, dtype=object), "reused": np.array(reused),
            "step": np.array(step, dtype=object)}


def _enter(folder: str) -> None:
    """Run in the driver's folder, so that relative inputs and -o mean the same (and errors read the
    same) on every node; a Ray worker process serves one run only. The folder must be shared."""
    if os.getcwd() != folder and os.path.isdir(folder):
        os.chdir(folder)
    keep_freed_memory()  # a Ray worker analyses input after input, as a batch worker does


def _map(ray, jobs: Sequence[tuple[int, Job]], fn, fn_kwargs: dict, show_progress: bool,
         desc: str | None = None) -> list[dict]:
    """fn over the jobs as a Ray Data pipeline; the output rows, in the jobs' order."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # Ray's bars log a line a second where stderr is no terminal
    if LOG_LEVEL[0] != "DEBUG":
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    items = [{"index": k, "job": pickle.dumps(job), "cwd": os.getcwd()} for k, job in jobs]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * cpus)))
    ds = ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=BATCH_SIZE, batch_format="numpy")
    progress = Progress(len(items), show_progress, desc)
    rows = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows += [dict(zip(batch, values)) for values in zip(*batch.values())]
        progress.update(len(batch["index"]))
    progress.close()
    return sorted(rows, key=lambda r: int(r["index"]))


def _counts_of(rows: Sequence[dict]) -> SharedThresholdCounts | None:
    return merge_counts([pickle.loads(r["step"]) for r in rows if len(r["step"])])


def _start(ray, address: str | None) -> bool:
    """Connect to (or start) Ray; whether this run started it (and so stops it)."""
    if ray.is_initialized():
        return False
    tool_dir = str(Path(__import__("visualize_patches").__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tool_dir, os.environ.get("PYTHONPATH")) if p)
    try:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": path}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ToolError(f"--engine ray: cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS')} "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return True


def run_ray(found: Discovery, out_root: Path, settings: Settings, options: RenderOptions, skip_existing: bool,
            show_progress: bool, address: str | None = None) -> int:
    """The batch on Ray, then the summaries as the local engine writes them; the exit status."""
    ray = ray_module()
    started = _start(ray, address)
    try:
        unreadable = [Job(Path(label), label, out_root / label, "") for label, _ in found.failed]
        rows: dict[Job, dict] = {}
        for job, (_, reason) in zip(unreadable, found.failed):
            rows[job] = summary_row(job, out_root, None, "failed", reason)
            logger.error(reason)
        todo = list(enumerate(found.jobs))
        if settings.target_ratio is not None and todo:
            scored = _map(ray, todo, _score_batch, {"settings": settings}, show_progress, "scoring")
            for row in scored:
                if row["error"]:
                    job = found.jobs[int(row["index"])]
                    rows[job] = summary_row(job, out_root, None, "failed", row["error"])
                    logger.error(row["error"])
            counts = _counts_of(scored)
            if counts is not None:
                threshold, _ = choose_shared_threshold(counts, settings.target_ratio)
                settings = replace(settings, thresholds=(threshold,) * (settings.num_scales - 1))
                logger.info(f"target ratio {settings.target_ratio:g}: shared threshold {settings.thresholds[0]!r}")
            todo = [(k, j) for k, j in todo if j not in rows]
        done = _map(ray, todo, _run_batch, {"settings": settings, "options": options,
                                            "skip_existing": skip_existing, "want_counts": options.sweep},
                    show_progress) if todo else []
        for row in done:
            job = found.jobs[int(row["index"])]
            if row["error"]:
                rows[job] = summary_row(job, out_root, None, "failed", row["error"])
                logger.error(row["error"])
            else:
                rows[job] = summary_row(job, out_root, pickle.loads(row["stats"]),
                                        "reused" if row["reused"] else "ok", pictures=not options.stats_only)
        jobs = [*unreadable, *found.jobs]
        ordered = [rows[j] for j in jobs if j in rows]
        sweep = None
        if options.sweep:
            counts = _counts_of(done)
            if counts is not None:
                sweep = sweep_files(counts, settings, None, f"Threshold sweep over {len(ordered)} inputs", plot=True)
        summary = summarize(ordered, found.skipped, settings, False, len(jobs) - len(ordered), found.hidden)
        write_summaries(out_root, ordered, summary, settings, sweep)
    finally:
        if started:
            ray.shutdown()
    ok = summary["images"]["ok"] + summary["images"]["reused"]
    logger.info(f"{ok} of {len(jobs)} inputs analysed on Ray, {summary['images']['failed']} failed, "
                f"{found.skipped} other files skipped; summaries in {out_root}")
    return EXIT_FAILURE if summary["images"]["failed"] else EXIT_OK
