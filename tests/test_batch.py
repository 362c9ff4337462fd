"""Batch mode: discovery, layout, failures and exit status, resume, stats-only, workers, summaries."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import visualize_patches as vp
from apt_vis import machine
from conftest import PEARL, TOOL, finished_inputs, run_cli, sample_photo


def small_photo(path, size, seed, source=PEARL):
    """A real-photo crop of the given (w, h), saved to path."""
    rng = np.random.default_rng(seed)
    with Image.open(source) as im:
        im = im.convert("RGB")
        w, h = size
        x = int(rng.integers(0, im.width - w + 1))
        y = int(rng.integers(0, im.height - h + 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        im.crop((x, y, x + w, y + h)).save(path)
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def dataset(tmp_path):
    """in/a/x.jpg, in/b/x.jpg, in/a/x.png (same name, different folders and formats), a nested
    folder, a file without extension that is a JPEG, a corrupt .jpg and a text file."""
    root = tmp_path / "in"
    small_photo(root / "a" / "x.jpg", (300, 260), 1)
    small_photo(root / "b" / "x.jpg", (260, 300), 2)
    small_photo(root / "a" / "x.png", (200, 200), 3)
    small_photo(root / "a" / "deep" / "deeper" / "y.webp", (180, 240), 4)
    shutil.copy(sample_photo(), root / "b" / "photo_without_extension")
    (root / "b" / "broken.jpg").write_bytes(PEARL.read_bytes()[:2000])
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def test_recursion_layout_and_collisions(dataset, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(dataset, "-o", out, "-q", "--workers", "2")
    assert proc.returncode == 1  # broken.jpg failed
    rows = {r["path"]: r for r in read_csv(out / "summary.csv")}
    assert set(rows) == {"a/x.jpg", "b/x.jpg", "a/x.png", "a/deep/deeper/y.webp", "b/photo_without_extension",
                         "b/broken.jpg"}
    for name in ("a/x.jpg", "b/x.jpg", "a/x.png", "a/deep/deeper/y.webp", "b/photo_without_extension"):
        folder = out / name
        assert (folder / "stats.json").exists() and (folder / "patches_visualization.jpg").exists(), name
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["image"] == name and rows[name]["status"] == "ok"
    sizes = {n: json.loads((out / n / "stats.json").read_text())["original_size"] for n in ("a/x.jpg", "b/x.jpg")}
    assert sizes == {"a/x.jpg": [300, 260], "b/x.jpg": [260, 300]}  # no collision
    assert rows["b/broken.jpg"]["status"] == "failed" and "cannot decode" in rows["b/broken.jpg"]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == {"found": 6, "ok": 5, "reused": 0, "failed": 1, "not_processed": 0}
    assert summary["files_skipped"] == 1  # notes.txt
    assert not list(out.rglob(".staging-*")) and not list(out.glob(".summary*"))


def test_glob_patterns(dataset, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(str(dataset / "**" / "*.jpg"), "-o", out, "-q")
    assert proc.returncode == 1  # broken.jpg matches too
    rows = read_csv(out / "summary.csv")
    assert sorted(r["path"] for r in rows) == ["a/x.jpg", "b/broken.jpg", "b/x.jpg"]
    proc = run_cli(str(dataset / "a" / "*.png"), str(dataset / "b" / "x.jpg"), "-o", tmp_path / "o2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["path"] for r in read_csv(tmp_path / "o2" / "summary.csv")) == ["a/x.png", "b/x.jpg"]
    proc = run_cli(str(dataset / "*.nothing"), "-o", tmp_path / "o3")
    assert proc.returncode == 1 and "no files match" in proc.stderr


def test_exit_status_all_good_is_zero(tmp_path):
    root = tmp_path / "good"
    for k in range(3):
        small_photo(root / f"{k}.jpg", (120 + 20 * k, 140), k)
    proc = run_cli(root, "-o", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    proc = run_cli(tmp_path / "docs", "-o", tmp_path / "out")
    assert proc.returncode == 1 and "no images" in proc.stderr and "1 other files skipped" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_summary_matches_per_image_stats(dataset, tmp_path):
    out = tmp_path / "out"
    run_cli(dataset, "-o", out, "-q")
    rows = [r for r in read_csv(out / "summary.csv") if r["status"] == "ok"]
    summary = json.loads((out / "summary.json").read_text())
    ratios, uniform, apt, tokens = [], 0, 0, 0
    for row in rows:
        stats = json.loads((out / row["output"] / "stats.json").read_text())
        assert int(row["apt_patches"]) == stats["apt_patches"]
        assert int(row["uniform_patches"]) == stats["uniform_patches"]
        assert float(row["retained_ratio"]) == stats["retained_ratio"]
        assert int(row["qwen2vl_tokens"]) == stats["qwen2vl_tokens"]
        for ps, n in stats["patches_per_scale"].items():
            assert int(row[f"patches_{ps}"]) == n
        assert [int(row["original_width"]), int(row["original_height"])] == stats["original_size"]
        ratios.append(stats["retained_ratio"])
        uniform += stats["uniform_patches"]
        apt += stats["apt_patches"]
        tokens += stats["qwen2vl_tokens"]
    t = summary["tokens"]
    assert (t["vit_patches_uniform_total"], t["vit_patches_apt_total"], t["qwen2vl_llm_tokens_total"]) == (
        uniform, apt, tokens)
    assert t["vit_patches_apt_mean"] == pytest.approx(apt / len(rows))
    r = summary["retained_ratio"]
    assert r["mean"] == pytest.approx(np.mean(ratios)) and r["median"] == pytest.approx(np.median(ratios))
    assert r["p10"] == pytest.approx(np.percentile(ratios, 10)) and r["p90"] == pytest.approx(np.percentile(ratios, 90))
    assert r["overall"] == pytest.approx(apt / uniform)
    assert summary["thresholds"] == [3.0, 2.0] and summary["settings"]["method"] == "entropy"
    assert [f["path"] for f in summary["failures"]] == ["b/broken.jpg"]
    with Image.open(out / "summary.png") as im:
        assert im.width >= 800 and im.height >= 400


def test_stats_only_writes_numbers_not_pictures(dataset, tmp_path):
    full, fast = tmp_path / "full", tmp_path / "fast"
    run_cli(dataset, "-o", full, "-q")
    run_cli(dataset, "-o", fast, "-q", "--stats-only")
    for folder in (fast / "a" / "x.jpg", fast / "b" / "photo_without_extension"):
        assert sorted(p.name for p in folder.iterdir()) == ["importance_maps.npz", "stats.json"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "output"} for r in rows]  # noqa: E731
    assert strip(read_csv(full / "summary.csv")) == strip(read_csv(fast / "summary.csv"))
    assert (fast / "summary.json").exists() and (fast / "report.html").exists()


def test_workers_do_not_change_results(dataset, tmp_path):
    one, two = tmp_path / "w1", tmp_path / "w2"
    run_cli(dataset, "-o", one, "-q", "--workers", "1", "--stats-only")
    run_cli(dataset, "-o", two, "-q", "--workers", "2", "--stats-only")
    assert read_csv(one / "summary.csv") == read_csv(two / "summary.csv")
    for npz in (one).rglob("importance_maps.npz"):
        a, b = np.load(npz), np.load(two / npz.relative_to(one))
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_skip_existing_resumes(dataset, tmp_path):
    out = tmp_path / "out"
    run_cli(dataset / "a", "-o", out / "a", "-q")  # an earlier, partial run over part of the set
    before = {p: p.stat().st_mtime_ns for p in (out / "a").rglob("stats.json")}
    proc = run_cli(dataset, "-o", out, "-q", "--skip-existing")
    assert proc.returncode == 1  # broken.jpg still fails
    rows = {r["path"]: r["status"] for r in read_csv(out / "summary.csv")}
    assert rows["a/x.jpg"] == rows["a/x.png"] == rows["a/deep/deeper/y.webp"] == "reused"
    assert rows["b/x.jpg"] == "ok" and rows["b/broken.jpg"] == "failed"
    assert {p: p.stat().st_mtime_ns for p in (out / "a").rglob("stats.json")} == before
    # other settings are not reused
    proc = run_cli(dataset / "a", "-o", out / "a", "-q", "--skip-existing", "--thresholds", "5", "4")
    assert {r["status"] for r in read_csv(out / "a" / "summary.csv")} == {"ok"}


def test_interrupt_writes_summary_and_resume_completes(tmp_path):
    root = tmp_path / "many"
    for k in range(24):
        small_photo(root / f"img{k:02d}.png", (400, 400), k)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(TOOL), str(root), "-o", str(out), "--workers", "1", "-q"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and finished_inputs(out) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    done = summary["images"]["ok"]
    assert summary["interrupted"] and 2 <= done < 24 and summary["images"]["not_processed"] == 24 - done
    assert len(read_csv(out / "summary.csv")) == done
    proc = run_cli(root, "-o", out, "-q", "--skip-existing", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "summary.json").read_text())
    assert final["images"]["reused"] >= done and final["images"]["reused"] + final["images"]["ok"] == 24


def test_output_inside_input_is_not_reprocessed(tmp_path):
    root = tmp_path / "photos"
    small_photo(root / "p.jpg", (150, 150), 9)
    small_photo(root / "q.jpg", (150, 170), 10)
    for _ in range(2):
        proc = run_cli(root, "-o", root / "out", "-q")
        assert proc.returncode == 0, proc.stderr
    assert sorted(r["path"] for r in read_csv(root / "out" / "summary.csv")) == ["p.jpg", "q.jpg"]


def test_output_that_contains_the_input_is_refused(tmp_path):
    root = tmp_path / "photos"
    small_photo(root / "p.jpg", (150, 150), 9)
    for out in (root, tmp_path):
        proc = run_cli(root, "-o", out)
        assert proc.returncode == 1 and "inside the output directory" in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["p.jpg"]


def test_progress_bar_shown_and_quiet_silences_it(tmp_path):
    root = tmp_path / "two"
    small_photo(root / "1.jpg", (100, 120), 1)
    small_photo(root / "2.jpg", (120, 100), 2)
    proc = run_cli(root, "-o", tmp_path / "o", "--stats-only")
    assert "2/2" in proc.stderr and "file/s" in proc.stderr
    proc = run_cli(root, "-o", tmp_path / "o", "--stats-only", "-q")
    assert proc.stderr == ""


def test_report_opens_in_a_browser(dataset, tmp_path, browser):
    out = tmp_path / "out"
    run_cli(dataset, "-o", out, "-q")
    browser.open((out / "report.html").as_uri())
    total = int(browser.evaluate("document.body.dataset.imagesTotal"))
    loaded = int(browser.evaluate("document.body.dataset.imagesLoaded"))
    assert total == loaded == 5
    assert browser.evaluate("document.querySelectorAll('tr.result').length") == 5
    assert browser.evaluate("document.querySelectorAll('#failures li').length") == 1
    ratios = browser.evaluate("Array.from(document.querySelectorAll('tr.result')).map(r => +r.cells[1].dataset.value)")
    assert ratios == sorted(ratios)
    browser.evaluate("document.querySelectorAll('th')[1].click()")  # sort by ratio again: now descending
    resorted = browser.evaluate(
        "Array.from(document.querySelectorAll('tr.result')).map(r => +r.cells[1].dataset.value)")
    assert resorted == sorted(ratios, reverse=True)
    links = browser.evaluate("Array.from(document.querySelectorAll('tr.result a')).map(a => a.getAttribute('href'))")
    assert all(not link.startswith(("http", "/")) for link in links)  # relative, offline
    assert all((out / link).exists() for link in links)
    assert browser.console_errors() == []


def test_batch_summaries_drawn_without_matplotlib(tmp_path):
    """summary.png is drawn with PIL: importing matplotlib cost a batch about a second (issue 10).
    The plot itself: a labelled picture of the PLOT_SIZE, not blank."""
    photos = tmp_path / "in"
    for k in range(3):
        small_photo(photos / f"p{k}.jpg", (200 + 40 * k, 240), k)
    code = ("import sys, visualize_patches as vp; "
            f"code = vp.main([{str(photos)!r}, '-o', {str(tmp_path / 'out')!r}, '-q', '--workers', '1']); "
            "print(code, 'matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=TOOL.parent, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["0", "False"], proc.stderr + proc.stdout
    with Image.open(tmp_path / "out" / "summary.png") as im:
        assert im.size == (1200, 500) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert (pixels != 255).any(axis=-1).mean() > 0.02  # axes, bars, dots and text drawn


def test_workers_are_forked_only_when_that_is_safe(monkeypatch):
    """Forked from the main process (no second import of the tool), but never with another thread
    running or torch loaded: then from the fork server, as before."""
    from apt_vis import batch

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(batch, "_thread_count", lambda: 1)
    assert batch._fork_is_safe() == (sys.platform == "linux")
    monkeypatch.setattr(batch, "_thread_count", lambda: 2)
    assert not batch._fork_is_safe()
    monkeypatch.setattr(batch, "_thread_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "torch", object())
    assert not batch._fork_is_safe()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_thread_count_sees_threads_python_did_not_start():
    """numpy's OpenBLAS starts its own threads, which threading.active_count() does not see; a
    fork then copies a multi-threaded process (Python 3.12 warns about it)."""
    from apt_vis import batch

    assert batch._thread_count() == len(os.listdir("/proc/self/task")) >= threading.active_count()


def test_the_program_forks_its_workers(tmp_path):
    """Run as a program, the tool keeps numpy's BLAS to one thread (it uses no BLAS), so that the
    process stays single-threaded and its workers are forked, not started from the fork server."""
    folder = tmp_path / "in"
    for k in range(2):
        small_photo(folder / f"p{k}.png", (120, 100), k)
    proc = run_cli(folder, "-o", tmp_path / "out", "-v", "--stats-only", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "workers forked from this process" in proc.stderr, proc.stderr


def test_default_workers_follow_the_cores_within_the_memory(monkeypatch):
    """--workers' default: one per usable core, however many (no fixed cap), as long as each
    gets WORKER_MEMORY_BUDGET of the available memory; at least one."""
    budget = machine.WORKER_MEMORY_BUDGET
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(64)))
    for available, expected in ((None, 64), (1000 * budget, 64), (8 * budget + budget // 2, 8),
                                (budget // 3, 1)):
        monkeypatch.setattr(machine, "available_memory", lambda available=available: available)
        assert machine.default_workers() == expected, available
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(machine, "available_memory", lambda: 1000 * budget)
    assert machine.default_workers() == 2


def fake_cgroup(tmp_path, monkeypatch, own="/job/step"):
    """A machine with /proc/meminfo and a cgroup v2 tree; this process in the group `own`."""
    meminfo, proc_cgroup, root = tmp_path / "meminfo", tmp_path / "proc_cgroup", tmp_path / "cgroup"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    proc_cgroup.write_text(f"0::{own}\n")
    (root / own.lstrip("/")).mkdir(parents=True)
    monkeypatch.setattr(machine, "MEMINFO", str(meminfo))
    monkeypatch.setattr(machine, "PROC_SELF_CGROUP", str(proc_cgroup))
    monkeypatch.setattr(machine, "CGROUP_ROOT", str(root))
    return meminfo, root


def write_group(folder, limit, current, inactive_file=0, cpu=None):
    (folder / "memory.max").write_text(f"{limit}\n")
    (folder / "memory.current").write_text(f"{current}\n")
    (folder / "memory.stat").write_text(f"anon 1\nfile {inactive_file + 5}\ninactive_file {inactive_file}\n")
    if cpu is not None:
        (folder / "cpu.max").write_text(f"{cpu}\n")


def test_available_memory_follows_this_process_cgroup(tmp_path, monkeypatch):
    """MemAvailable, lowered to what the tightest cgroup v2 limit on this process's own group or
    the groups above it leaves, page cache that the kernel can drop (inactive_file) not counted."""
    meminfo, root = fake_cgroup(tmp_path, monkeypatch)
    gib = 2**30
    assert machine.available_memory() == 20000000 * 1024  # no cgroup files: the machine's
    write_group(root / "job" / "step", "max", 123)
    assert machine.available_memory() == 20000000 * 1024  # no limit
    write_group(root / "job" / "step", 4 * gib, 3 * gib, inactive_file=2 * gib)
    assert machine.available_memory() == 3 * gib  # 1 GiB in use once the reclaimable cache is left out
    write_group(root / "job", 2 * gib, gib)  # the job's limit is tighter than the step's
    assert machine.available_memory() == gib
    write_group(root, 64 * gib, 0)  # a cgroup namespace's root, or the machine's
    assert machine.available_memory() == gib
    meminfo.write_text("garbage\n")
    assert machine.available_memory() == gib
    for folder in (root, root / "job", root / "job" / "step"):
        (folder / "memory.max").unlink()
    assert machine.available_memory() is None


def test_usable_cores_follow_a_cpu_quota(tmp_path, monkeypatch):
    """A container limited to 2.5 CPUs on a 64-core node: 3 usable cores, not 64."""
    _, root = fake_cgroup(tmp_path, monkeypatch, own="/")
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert machine.usable_cores() == 64
    write_group(root, "max", 0, cpu="max 100000")
    assert machine.usable_cores() == 64
    write_group(root, "max", 0, cpu="250000 100000")
    assert machine.usable_cores() == 3
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1})
    assert machine.usable_cores() == 2


def fake_cgroup_v1(tmp_path, monkeypatch, memory="/slurm/uid_1/job_7", cpu="/slurm/uid_1/job_7"):
    """A machine with cgroup v1 (as many HPC clusters still run): one hierarchy per controller,
    mounted at <root>/<controller>; this process in the groups given. Its folders, memory and cpu."""
    meminfo, proc_cgroup, root = tmp_path / "meminfo", tmp_path / "proc_cgroup", tmp_path / "cgroup"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    proc_cgroup.write_text(f"9:pids:/\n4:memory:{memory}\n2:cpu,cpuacct:{cpu}\n1:name=systemd:/x\n0::/\n")
    for name, own in (("memory", memory), ("cpu,cpuacct", cpu)):
        (root / name / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "cpu").symlink_to("cpu,cpuacct")  # as systemd mounts it
    monkeypatch.setattr(machine, "MEMINFO", str(meminfo))
    monkeypatch.setattr(machine, "PROC_SELF_CGROUP", str(proc_cgroup))
    monkeypatch.setattr(machine, "CGROUP_ROOT", str(root))
    return root / "memory" / memory.lstrip("/"), root / "cpu" / cpu.lstrip("/")


def write_group_v1(folder, limit=None, usage=0, inactive_file=0, quota=None):
    if limit is not None:
        (folder / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (folder / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(f"cache 9\ninactive_file 1\ntotal_inactive_file {inactive_file}\n")
    if quota is not None:
        (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (folder / "cpu.cfs_period_us").write_text("100000\n")


def test_cgroup_v1_limits_count_too(tmp_path, monkeypatch):
    """Under cgroup v1 a job's memory limit (memory.limit_in_bytes, page cache the kernel can drop
    left out) and CPU quota (cpu.cfs_quota_us) on its group or a group above it count as under v2;
    'no limit' (a huge limit, quota -1) changes nothing."""
    gib, no_limit = 2**30, 9223372036854771712
    memory, cpu = fake_cgroup_v1(tmp_path, monkeypatch)
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert machine.available_memory() == 20000000 * 1024 and machine.usable_cores() == 64
    write_group_v1(memory, no_limit, 123)
    write_group_v1(cpu, quota=-1)
    assert machine.available_memory() == 20000000 * 1024 and machine.usable_cores() == 64
    write_group_v1(memory, 4 * gib, 3 * gib, inactive_file=2 * gib)
    write_group_v1(cpu, quota=250000)
    assert machine.available_memory() == 3 * gib and machine.usable_cores() == 3
    write_group_v1(memory.parent, 2 * gib, gib)  # the user's limit above the job's is tighter
    assert machine.available_memory() == gib
    assert machine.default_workers() == min(3, gib // machine.WORKER_MEMORY_BUDGET)


def test_cgroup_v1_inside_a_container_reads_its_own_mount(tmp_path, monkeypatch):
    """In a container, /proc/self/cgroup names the host's path of the group, while the container
    mounts that group itself at the controller's root: the root's limits are read."""
    memory, cpu = fake_cgroup_v1(tmp_path, monkeypatch, memory="/docker/abc", cpu="/docker/abc")
    mounts = tmp_path / "cgroup"
    shutil.rmtree(mounts / "memory" / "docker")
    shutil.rmtree(mounts / "cpu,cpuacct" / "docker")
    write_group_v1(mounts / "memory", 2**30, 0)
    write_group_v1(mounts / "cpu", quota=150000)
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert machine.available_memory() == 2**30 and machine.usable_cores() == 2


@pytest.mark.parametrize("sweep", [False, True])
def test_batch_keeps_maps_in_the_main_process_only_for_a_sweep(tmp_path, sweep):
    """Pass 2's outcomes carry each input's maps back from the workers only when the main process
    needs them (--sweep); otherwise a long run would hold every input's maps (about 45 KB per
    1 MP image) until it ends."""
    import apt_vis.batch as apt_batch

    folder = tmp_path / "in"
    for k in range(3):
        small_photo(folder / f"p{k}.png", (200, 160), k)
    found = apt_batch.discover([str(folder)], tmp_path / "out", None, None)
    options = vp.RenderOptions(stats_only=True, sweep=sweep)
    executor = apt_batch.Executor(2)
    try:
        outcomes = list(apt_batch._process_all(found.jobs, vp.Settings(), options, vp.CPU, executor,
                                               apt_batch.Progress(0, False), {}, False))
    finally:
        executor.shutdown()
    assert len(outcomes) == 3 and all(isinstance(o, vp.Outcome) for _, o in outcomes)
    assert all(len(o.maps) == (1 if sweep else 0) for _, o in outcomes)


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_processes_that_analyse_many_inputs_keep_freed_memory(monkeypatch):
    """glibc hands big freed blocks back to the system at once (mmap), and the next image faults
    them in again (measured: 90 % of a --stats-only worker's page faults); the program and every
    batch worker raise the mmap and trim thresholds instead."""
    from apt_vis import batch

    libc = FakeLibc()
    monkeypatch.setattr(machine, "_libc", lambda: libc)
    machine.keep_freed_memory()
    assert dict(libc.calls) == {machine.M_MMAP_THRESHOLD: machine.KEEP_FREED_BYTES,
                                machine.M_TRIM_THRESHOLD: 2 * machine.KEEP_FREED_BYTES}
    libc.calls.clear()
    monkeypatch.setattr(batch, "_die_with", lambda pid: None)
    monkeypatch.setattr(batch.signal, "signal", lambda *args: None)
    monkeypatch.setattr(batch.signal, "pthread_sigmask", lambda *args: set())
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # or it would set this process's torch threads
    batch._worker_init(None, os.getpid())
    assert {p for p, _ in libc.calls} == {machine.M_MMAP_THRESHOLD, machine.M_TRIM_THRESHOLD}
    monkeypatch.setattr(machine, "_libc", lambda: None)
    machine.keep_freed_memory()  # no glibc: nothing to do, no error


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=40),
       st.sampled_from([0, 10, 25, 50, 90, 100]))
def test_percentile_is_numpys(values, q):
    """summary.json's p10/median/p90 and the batch plot's median: numpy's values exactly (its
    'linear' percentile, its median), computed without np.unique, whose first call imports
    numpy.ma (8 ms of every batch run)."""
    from apt_vis.batch import median, percentile

    assert percentile(values, q) == np.percentile(np.array(values), q)
    assert median(values) == np.median(np.array(values))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "..", "x.jpg", "é", "a b", "/"]), min_size=0, max_size=6),
       st.lists(st.sampled_from(["a", "b", "..", "x.jpg", "é", "a b"]), min_size=1, max_size=6),
       st.booleans())
def test_below_is_relpath_where_it_answers(folder_parts, rest_parts, absolute):
    """apt_vis.batch._below (discovery's fast relpath) gives what os.path.relpath gives, or None."""
    import apt_vis.batch as apt_batch

    folder = str(Path("/" if absolute else ".", *folder_parts))
    path = str(Path(folder, *rest_parts))
    below = apt_batch._below(path, folder)
    if below is not None:
        assert below == os.path.relpath(path, folder)
    assert apt_batch._below(path, path) is None
