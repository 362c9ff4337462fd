"""Faults where the tool meets the operating system: signals, dead parents, full disks,
concurrent runs and file modes. Each test starts the CLI as a user (or a supervisor) would."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import apt_vis.batch as apt_batch
import visualize_patches as vp
from conftest import PEARL, TOOL, finished_inputs, run_cli
from test_batch import read_csv, small_photo

IS_ROOT = os.geteuid() == 0


def many_photos(root: Path, count: int, size=(420, 420)) -> Path:
    for k in range(count):
        small_photo(root / f"img{k:03d}.png", size, k)
    return root


def start(*args, **kwargs) -> subprocess.Popen:
    """The CLI in its own process group (as a shell job), so tests can signal the group."""
    return subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def wait_until_working(proc: subprocess.Popen, out: Path, done: int = 2, workers: int = 0) -> set[int]:
    """Wait until `done` inputs are written (and `workers` worker processes exist); their pids."""
    assert wait_for(lambda: finished_inputs(out) >= done and len(descendants(proc.pid)) >= workers,
                    120), "the run did not get going"
    return descendants(proc.pid)


@pytest.fixture
def reaper():
    """Kills whatever a test left running, so that a failing test leaves no orphan."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def complete_folders(out: Path, names) -> set[str]:
    return {p.parent.relative_to(out).as_posix() for p in out.rglob("stats.json")
            if all((p.parent / n).is_file() for n in names)}


def assert_nothing_half_written(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers
    empty = [p for p in out.rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert not empty, empty


# --- signals ------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_stop_like_ctrl_c(tmp_path, reaper, signum, code):
    root, out = many_photos(tmp_path / "in", 40), tmp_path / "out"
    proc = start(root, "-o", out, "--workers", "2")
    workers = wait_until_working(proc, out, workers=2)
    reaper.extend(workers)
    os.kill(proc.pid, signum)  # the main process only, as `kill PID` or a supervisor does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert sum("interrupted" in line for line in stderr.splitlines()) == 1, stderr
    assert wait_for(lambda: not any(alive(p) for p in workers), 5), "worker processes outlived the run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"]
    names = vp.output_names("image", vp.Settings(), vp.RenderOptions())
    ok = {r["path"] for r in read_csv(out / "summary.csv") if r["status"] == "ok"}
    assert ok == complete_folders(out, names)  # counts exactly the inputs whose outputs are complete
    assert summary["images"]["ok"] == len(ok) and summary["images"]["not_processed"] == 40 - len(ok)
    assert_nothing_half_written(out)


def test_workers_die_with_a_killed_parent(tmp_path, reaper):
    root, out = many_photos(tmp_path / "in", 60), tmp_path / "out"
    proc = start(root, "-o", out, "--workers", "2")
    workers = wait_until_working(proc, out, workers=2)
    reaper.extend(workers)
    proc.kill()  # SIGKILL: no handler runs in the parent
    proc.wait(timeout=10)  # not communicate(): workers that outlive it would hold its pipes open
    assert wait_for(lambda: not any(alive(p) for p in workers), 5), "workers survived their parent"


def test_ctrl_c_twice_ends_the_run_at_once(tmp_path, reaper):
    root, out = many_photos(tmp_path / "in", 60, size=(800, 800)), tmp_path / "out"
    proc = start(root, "-o", out, "--workers", "2")
    workers = wait_until_working(proc, out, workers=2)
    reaper.extend(workers)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground group
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a second Ctrl-C did not end the run")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert wait_for(lambda: not any(alive(p) for p in workers), 5)
    summary = json.loads((out / "summary.json").read_text())
    names = vp.output_names("image", vp.Settings(), vp.RenderOptions())
    ok = {r["path"] for r in read_csv(out / "summary.csv") if r["status"] == "ok"}
    assert summary["interrupted"] and ok == complete_folders(out, names)
    assert_nothing_half_written(out)


SLOW_IMPORT = """import os, sys, time
time.sleep(30)  # a slow import: the signal arrives while the tool's imports run, whatever the machine
here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
del sys.modules["argparse"]
import argparse
"""


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """SIGINT while the core's imports run (after the script installed its start-up handlers): one
    line, exit 130. The imports are made slow on purpose (an argparse module that sleeps first,
    found first on PYTHONPATH): the whole run now takes less time than the test's wait used to."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "argparse.py").write_text(SLOW_IMPORT)
    proc = start(PEARL, "-o", tmp_path / "out", env={**os.environ, "PYTHONPATH": str(slow)})
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "interrupted" in stderr


def test_one_ctrl_c_counts_every_finished_input(tmp_path, reaper):
    # enough work that the signal comes while it runs: 40 small photos, --stats-only, take about 0.2 s now
    root, out = many_photos(tmp_path / "in", 80, size=(640, 640)), tmp_path / "out"
    proc = start(root, "-o", out, "--workers", "2", "--stats-only")
    reaper.extend(wait_until_working(proc, out, done=4, workers=2))
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    names = vp.output_names("image", vp.Settings(), vp.RenderOptions(stats_only=True))
    summary = json.loads((out / "summary.json").read_text())
    ok = {r["path"] for r in read_csv(out / "summary.csv") if r["status"] == "ok"}
    assert ok == complete_folders(out, names) and summary["images"]["ok"] == len(ok) >= 4
    assert_nothing_half_written(out)


# --- concurrent runs ------------------------------------------------------------


def test_a_second_run_on_the_same_output_stops_naming_the_first(tmp_path, reaper):
    root, out = many_photos(tmp_path / "in", 30), tmp_path / "out"
    # every output, one worker: seconds of work, so that the first run still holds the lock when
    # the second starts (--stats-only on 30 small photos now ends within the second's start-up)
    first = start(root, "-o", out, "--workers", "1")
    reaper.append(first.pid)
    wait_until_working(first, out, done=1)
    second = run_cli(root, "-o", out, "--stats-only", "--thresholds", "5", "5")
    assert second.returncode == 1, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and str(first.pid) in second.stderr, second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"]["ok"] == 30 and summary["thresholds"] == [3.0, 2.0]
    stats = {json.loads(p.read_text())["settings"]["thresholds"] == [3.0, 2.0] for p in out.rglob("stats.json")}
    assert stats == {True}  # the second run wrote nothing
    assert not (out / vp.LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    (out / vp.LOCK_NAME).write_text(f"{dead}\n")
    proc = run_cli(PEARL, "-o", out, "--stats-only")
    assert proc.returncode == 0, proc.stderr
    assert (out / "stats.json").exists() and not (out / vp.LOCK_NAME).exists()


def test_single_image_runs_take_the_lock_too(tmp_path, reaper):
    root, out = many_photos(tmp_path / "in", 20), tmp_path / "out"
    # every output, so that the batch is still running when the second starts (--stats-only took 0.2 s
    # here once the summary plot stopped importing matplotlib, and this run lost the race)
    first = start(root, "-o", out, "--workers", "1")
    reaper.append(first.pid)
    wait_until_working(first, out, done=1)
    second = run_cli(PEARL, "-o", out)
    assert second.returncode == 1 and str(first.pid) in second.stderr, second.stderr
    assert not (out / "patches_visualization.jpg").exists()
    first.communicate(timeout=120)


# --- file modes -------------------------------------------------------------------


def test_outputs_get_the_modes_of_normally_created_files(tmp_path):
    root = many_photos(tmp_path / "in", 2, size=(200, 200))
    out = tmp_path / "out"
    proc = subprocess.run(["sh", "-c", f"umask 027 && exec '{sys.executable}' '{TOOL}' '{root}' -o '{out}' -q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    for name, mode in modes.items():
        expected = 0o750 if (out / name).is_dir() else 0o640
        assert mode == expected, (name, oct(mode))


# --- full disks -------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs (root only; skipped elsewhere)."""
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def fill(mount: Path, leave: int) -> None:
    """Fill the file system but `leave` bytes."""
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_full_disk_during_a_batch_leaves_no_folder_for_failed_inputs(tiny_disk, tmp_path):
    root = many_photos(tmp_path / "in", 12, size=(600, 600))
    out = tiny_disk / "out"
    proc = run_cli(root, "-o", out, "--workers", "2")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    names = vp.output_names("image", vp.Settings(), vp.RenderOptions())
    folders = {p.relative_to(out).as_posix() for p in out.iterdir() if p.is_dir()}
    assert folders == complete_folders(out, names)  # every folder left is complete
    assert len(folders) < 12
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    present = {n for n in ("summary.csv", "summary.json", "summary.png", "report.html") if (out / n).exists()}
    assert present in (set(), {"summary.csv", "summary.json", "summary.png", "report.html"})


def test_full_disk_while_writing_summaries_writes_none(tiny_disk, tmp_path):
    one = tmp_path / "one"
    assert run_cli(PEARL, "-o", one, "--stats-only").returncode == 0
    stats = json.loads((one / "stats.json").read_text())
    out = tiny_disk / "out"
    out.mkdir()
    jobs = [vp.Job(PEARL, f"img{k}.jpg", out / f"img{k}.jpg", "image") for k in range(40)]
    rows = [apt_batch.summary_row(job, out, stats, "ok") for job in jobs]
    settings = vp.Settings()
    summary = apt_batch.summarize(rows, 0, settings, settings.thresholds, False, 0)
    fill(tiny_disk, 24 * 1024)  # room for the csv and json, not for the plot and the report
    with pytest.raises(vp.ToolError) as info:
        apt_batch.write_summaries(out, rows, summary, settings, None)
    assert "\n" not in str(info.value) and "No space" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == []


def test_an_input_named_like_the_lock_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = out / vp.LOCK_NAME
    victim.write_bytes(PEARL.read_bytes())
    proc = run_cli(victim, "-o", out)
    assert proc.returncode == 1 and "is one of the outputs" in proc.stderr, proc.stderr
    assert victim.read_bytes() == PEARL.read_bytes()


def _live_children_after(seconds: float) -> list:
    import multiprocessing
    deadline = time.time() + seconds
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.05)
    return multiprocessing.active_children()


def test_an_interrupt_while_forked_workers_start_leaves_no_worker(monkeypatch):
    """Ctrl-C while the worker processes are being forked: the Executor is not made, so nothing
    would ever stop the workers already started, and the interpreter's exit would wait for them
    for good. They must be gone when the interrupt propagates."""
    from concurrent.futures import ProcessPoolExecutor

    monkeypatch.setattr(apt_batch, "_fork_is_safe", lambda: True)
    spawn = ProcessPoolExecutor._spawn_process

    def spawn_then_interrupt(self):  # the signal arrives once a worker is running
        spawn(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(ProcessPoolExecutor, "_spawn_process", spawn_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            apt_batch.Executor(2)
        assert _live_children_after(5) == []
    finally:
        import multiprocessing
        for process in multiprocessing.active_children():  # before the fix: or pytest's exit waits for good
            process.kill()


def test_a_signal_before_a_forked_worker_is_set_up_does_not_reach_it(monkeypatch):
    """A forked worker inherits the main process's Python signal handlers (which raise
    KeyboardInterrupt) until _worker_init ignores the stop signals; a SIGTERM in between must not
    break the worker (a multi-line 'Exception in initializer' and a broken pool)."""
    monkeypatch.setattr(apt_batch, "_fork_is_safe", lambda: True)
    real_init = apt_batch._worker_init

    def slow_init(*args):
        time.sleep(0.5)  # the window, widened: the test signals the workers now
        real_init(*args)

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(apt_batch, "_worker_init", slow_init)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        executor = apt_batch.Executor(2)
        for process in list(executor.pool._processes.values()):
            os.kill(process.pid, signal.SIGTERM)
        try:
            pids = {executor.submit(os.getpid).result(timeout=20) for _ in range(6)}
        finally:
            executor.shutdown()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert pids and os.getpid() not in pids


def test_a_signal_as_the_workers_fork_leaves_the_signal_mask_as_it_was(monkeypatch):
    """A stop signal whose handler runs inside the call that blocks the stop signals (it came just
    before) must not leave them blocked in this thread: main() leaves the process as it was."""
    import multiprocessing

    monkeypatch.setattr(apt_batch, "_fork_is_safe", lambda: True)
    real_mask = signal.pthread_sigmask
    state = {"raised": False}

    def mask_then_interrupt(how, signals):
        result = real_mask(how, signals)
        if how == signal.SIG_BLOCK and set(signals) == set(vp.STOP_SIGNALS) and not state["raised"]:
            state["raised"] = True
            raise KeyboardInterrupt  # as the handler of a signal pending at this call would
        return result

    monkeypatch.setattr(apt_batch.signal, "pthread_sigmask", mask_then_interrupt)
    before = real_mask(signal.SIG_BLOCK, ())
    try:
        with pytest.raises(KeyboardInterrupt):
            apt_batch.Executor(2)
        assert real_mask(signal.SIG_BLOCK, ()) == before
        assert _live_children_after(5) == []
    finally:
        real_mask(signal.SIG_SETMASK, before)
        for process in multiprocessing.active_children():
            process.kill()


def test_device_cuda_without_torch_is_one_plain_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ValueError) as caught:
        vp.parse_args([str(PEARL), "--device", "cuda"], raise_errors=True)
    assert str(caught.value).startswith("--device cuda needs torch, which is not installed"), caught.value


def test_an_input_submitted_as_a_signal_arrives_is_still_counted(monkeypatch):
    """A stop signal that arrives while an input is being handed to the workers (queued, but not
    yet registered as in flight) must not lose it: the input runs and writes its folder, so the
    interrupted run's summary must count it (seen in CI: a complete folder missing from
    summary.csv). The signal is raised once the hand-over is complete."""
    from concurrent.futures import ProcessPoolExecutor

    signals = apt_batch.BatchSignals(vp.StopSignals())
    submit = ProcessPoolExecutor.submit

    def submit_then_signal(self, fn, *args, **kwargs):
        future = submit(self, fn, *args, **kwargs)
        if fn is not os.getpid:
            signals._handle(signal.SIGINT, None)  # as if Ctrl-C came now
        return future

    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit_then_signal)
    executor = apt_batch.Executor(2, hold=signals.holding)
    try:
        with pytest.raises(KeyboardInterrupt):
            executor.submit(time.sleep, 0.1, job="an input")
        assert list(executor.inflight.values()) == ["an input"]
        (future,) = executor.inflight
        drained = [job for job, _ in executor.drain()]
        assert drained == ["an input"] or future.cancelled()  # it ran and is counted, or never runs
    finally:
        executor.shutdown()


def test_an_input_its_worker_finished_just_before_the_kill_is_counted(tmp_path):
    """A second Ctrl-C kills the workers; an input whose worker had already put all its outputs in
    place (stats.json last) before the kill, while its result was still on the way, is complete:
    it is counted, not left uncounted beside the summary. Folders a run before this one wrote are
    not this run's work: they are not counted."""
    settings, options = vp.Settings(), vp.RenderOptions(stats_only=True)
    out = tmp_path / "out"
    started = time.time()
    jobs = [vp.Job(PEARL, name, out / name, "image") for name in ("finished", "killed", "older")]
    vp.run_input(jobs[0], settings, options)  # finished by its worker: only the result was lost
    vp.run_input(jobs[2], settings, options)
    old = started - 3600
    for path in (jobs[2].out_dir).iterdir():
        os.utime(path, (old, old))
    (jobs[1].out_dir / f"{vp.STAGING_PREFIX}x").mkdir(parents=True)  # killed while writing
    killed_new = vp.Job(PEARL, "killed_new", out / "sub" / "killed_new", "image")  # a new folder, staged beside
    beside = out / "sub" / f"{vp.STAGING_PREFIX}killed_new"
    beside.mkdir(parents=True)
    (beside / "stats.json").write_text("{}")
    rows = {}
    apt_batch.account_unfinished([*jobs, killed_new], rows, out, settings, options, started)
    assert set(rows) == {jobs[0]} and rows[jobs[0]]["status"] == "ok"
    assert not jobs[1].out_dir.exists()  # its staging folder and the folder made for it: removed
    assert not (out / "sub").exists()  # the staging folder beside a new folder, and its parent made for it
    assert (jobs[2].out_dir / "stats.json").exists()  # an earlier run's outputs: left as they were


def test_a_second_signal_after_the_workers_are_shut_down_is_harmless():
    """The second Ctrl-C kills the workers (Executor.kill); when it comes while the summaries are
    written, the pool is already shut down, and the kill must be a no-op, not a traceback (seen
    in a clean-clone run: AttributeError in kill)."""
    executor = apt_batch.Executor(2)
    assert executor.submit(os.getpid).result(timeout=30) != os.getpid()
    executor.shutdown()
    executor.kill()


def test_staged_writes_clear_a_killed_runs_staging_folder(tmp_path):
    """A staging folder left by a killed run in an existing output folder is removed by the next
    write there; a folder made by the write itself holds exactly the files written."""
    old = tmp_path / "old"
    stale = old / f"{vp.STAGING_PREFIX}killed"
    stale.mkdir(parents=True)
    (stale / "stats.json").write_text("{}")
    vp.write_files(old, {"a.txt": b"a", "stats.json": b"{}"})
    assert sorted(p.name for p in old.iterdir()) == ["a.txt", "stats.json"]
    new = tmp_path / "new" / "deeper"
    vp.write_files(new, {"a.txt": b"a", "stats.json": b"{}"})
    assert sorted(p.name for p in new.iterdir()) == ["a.txt", "stats.json"]


def test_a_new_folder_appears_whole(tmp_path):
    """A folder that does not exist yet is staged beside it (a hidden folder in its parent) and
    renamed into place whole: it never exists half-written, and no staging folder is left."""
    out = tmp_path / "out" / "image"
    with vp.staged_output(out) as staging:
        (staging / "a.txt").write_bytes(b"a")
        (staging / "stats.json").write_bytes(b"{}")
        assert not out.exists()
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "stats.json"]
    assert [p.name for p in out.parent.iterdir()] == ["image"]


def test_a_new_folder_whose_name_is_too_long_to_stage_beside_is_staged_inside(tmp_path):
    """A name that fits the file system but not with the staging prefix (ENAMETOOLONG; 255 bytes on
    most, 143 on eCryptfs) is staged inside the new folder instead, as an existing folder is."""
    out = tmp_path / "out" / ("x" * 250)
    vp.write_files(out, {"a.txt": b"a", "stats.json": b"{}"})
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "stats.json"]
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_killed_runs_staging_folder_beside_a_new_folder_is_replaced(tmp_path):
    """What a killed run left staged beside a folder it was making is removed by the next write,
    not mixed into the folder."""
    out = tmp_path / "out" / "image"
    stale = out.parent / f"{vp.STAGING_PREFIX}image"
    stale.mkdir(parents=True)
    (stale / "old.txt").write_text("killed")
    vp.write_files(out, {"a.txt": b"a", "stats.json": b"{}"})
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "stats.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["image"]


def test_a_new_folder_that_appears_meanwhile_is_merged_into(tmp_path):
    """If the folder appears while it is staged beside it (another input's folder made inside it,
    say a shard holding both img.jpg and img.jpg/k.jpg), the staged files are moved into it one by
    one instead, stats.json last: neither input's outputs are lost."""
    out = tmp_path / "out" / "img.jpg"
    with vp.staged_output(out) as staging:
        (staging / "a.txt").write_bytes(b"a")
        (staging / "stats.json").write_bytes(b"{}")
        (out / "k.jpg").mkdir(parents=True)
        (out / "k.jpg" / "stats.json").write_bytes(b"{}")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "k.jpg", "stats.json"]
    assert (out / "k.jpg" / "stats.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["img.jpg"]


def test_a_failed_write_into_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    """An error while a new folder is staged, or when it is renamed into place (a full disk, say),
    leaves neither the folder nor its staging folder nor the parents made for it."""
    out = tmp_path / "out" / "image"
    with pytest.raises(RuntimeError):
        with vp.staged_output(out) as staging:
            (staging / "a.txt").write_bytes(b"a")
            raise RuntimeError("failed while rendering")
    assert not (tmp_path / "out").exists()

    def failing_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vp.os, "rename", failing_rename)
    with pytest.raises(vp.ToolError, match="No space left on device"):
        vp.write_files(out, {"a.txt": b"a", "stats.json": b"{}"})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_rename_leaves_no_partial_folder(tmp_path, monkeypatch, existing):
    """If moving the staged files into place fails midway (a full directory, say), a folder the
    write made is removed with what was moved into it (nothing half-written); an existing folder
    keeps what it had and gains no stats.json (so it does not look complete). (A new folder is
    staged inside itself, file by file, only when its name is too long to stage it beside.)"""
    out = tmp_path / "out" / ("image" if existing else "x" * 250)
    if existing:
        out.mkdir(parents=True)
        (out / "earlier.txt").write_text("earlier")
    replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(vp.os, "replace", failing_replace)
    with pytest.raises(vp.ToolError, match="No space left on device"):
        vp.write_files(out, {"a.txt": b"a", "b.txt": b"b", "stats.json": b"{}"})
    if existing:
        assert "stats.json" not in {p.name for p in out.iterdir()} and (out / "earlier.txt").exists()
        assert not [p for p in out.iterdir() if p.name.startswith(vp.STAGING_PREFIX)]
    else:
        assert not (tmp_path / "out").exists()
