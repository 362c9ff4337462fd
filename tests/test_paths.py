"""Which inputs are found and where the tool writes: never onto an input, never outside -o;
symbolic links, unreadable folders and hidden files reported, not raised or lost."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import PIL
from PIL import Image

import apt_vis.batch as apt_batch
import visualize_patches as vp
from conftest import ROOT, TOOL, run_cli


def tiny_png(path: Path, seed: int) -> Path:
    """A 64 x 64 noise PNG (content matters only as far as being an image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: files by content hash, links by target, folders by name."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def read_rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def refused(capsys, *args) -> str:
    """Run main in this process (refusals happen before any image is read) and return its one
    stderr line, checking exit status 1."""
    capsys.readouterr()
    code = vp.cli([str(a) for a in args])  # the program, with its one-line logging
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- outputs never land on an input --------------------------------------------------------------


def test_batch_summary_never_replaces_an_input(tmp_path, capsys):
    """The reported case: per-input folders collide with the inputs, then summary.png replaced one."""
    d = tmp_path / "d"
    tiny_png(d / "summary.png", 1)
    tiny_png(d / "x.png", 2)
    before = snapshot(d)
    assert "summary.png" in refused(capsys, d / "summary.png", d / "x.png", "-o", d, "--stats-only")
    assert snapshot(d) == before  # inputs byte-identical, nothing written


@pytest.mark.parametrize("name, extra", [("summary.csv", ()), ("report.html", ()),
                                         ("threshold_sweep.png", ("--sweep",))])
def test_input_named_like_a_batch_file_in_the_output(tmp_path, capsys, name, extra):
    """d/<name> is an input (a PNG by content) whose own folder goes to d/d/<name>; the batch file
    d/<name> would still replace it."""
    d, e = tmp_path / "d", tmp_path / "e"
    tiny_png(d / name, 1)
    tiny_png(e / "x.png", 2)
    before = snapshot(tmp_path)
    assert name in refused(capsys, d / name, e / "x.png", "-o", d, "--stats-only", *extra)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("label", [".staging-a.png", ".staging-d/x.png"])
def test_input_named_like_a_staging_folder(tmp_path, capsys, monkeypatch, label):
    """An input given by name whose output folder (or a folder on the way to it) would be named like
    the tool's hidden staging folders (.staging-*) is refused before anything is written: such a
    folder is removed as a killed run's leftover (the summaries' write removed .staging-a.png/ with
    that input's outputs, while summary.csv counted it as done), or is where a sibling is staged."""
    tiny_png(tmp_path / label, 1)
    tiny_png(tmp_path / "a.png", 2)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert vp.STAGING_PREFIX in refused(capsys, label, "a.png", "-o", "out", "--stats-only")
    assert snapshot(tmp_path) == before


def test_input_inside_a_per_input_folder(tmp_path, capsys, monkeypatch):
    """out/x.png/original_image.jpg is an input, and out/x.png/ is where x.png's outputs go."""
    tiny_png(tmp_path / "x.png", 1)
    victim = tiny_png(tmp_path / "out" / "x.png" / "original_image.jpg", 2)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert "original_image.jpg" in refused(capsys, "x.png", victim.relative_to(tmp_path), "-o", "out")
    assert snapshot(tmp_path) == before


def test_link_in_the_output_cannot_lead_outside(tmp_path, capsys):
    """A link left in the output folder must not carry the outputs elsewhere."""
    tiny_png(tmp_path / "in" / "a.png", 1)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").symlink_to(tmp_path / "elsewhere")
    assert "outside" in refused(capsys, tmp_path / "in", "-o", tmp_path / "out", "--stats-only")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_glob_does_not_reprocess_the_output(tmp_path):
    """'i*' matches both the input folder and the output folder inout/ (holding a picture from
    an earlier run): outputs are no inputs."""
    tiny_png(tmp_path / "in" / "a.png", 1)
    tiny_png(tmp_path / "inout" / "summary.png", 2)
    proc = run_cli("i*", "-o", "inout", "--stats-only", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(read_rows(tmp_path / "inout")) == ["in/a.png"]


# --- symbolic links ------------------------------------------------------------------------------


def test_single_broken_link_or_loop_is_one_line(tmp_path, capsys):
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    for name, reason in (("dangling.png", "broken symbolic link"), ("loop.png", "symbolic link loop")):
        line = refused(capsys, tmp_path / name, "-o", tmp_path / "out")
        assert name in line and reason in line
    assert not (tmp_path / "out").exists()


def test_links_in_a_batch(tmp_path):
    """Links to files (inside and outside the folder) and to folders are followed and named by
    the link; a loop, a broken link and a folder loop are failed rows naming the link."""
    root = tmp_path / "in"
    tiny_png(root / "a.png", 1)
    tiny_png(tmp_path / "outside" / "o.png", 2)
    (root / "ext.png").symlink_to("../outside/o.png")
    (root / "dirlink").symlink_to("../outside")
    (root / "loop.png").symlink_to("loop.png")
    (root / "dangling.png").symlink_to("gone.png")
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to("..")
    tiny_png(root / "sub" / "b.png", 3)
    outside_before = snapshot(tmp_path / "outside")
    out = tmp_path / "out"
    proc = run_cli(root, "-o", out, "--stats-only", "--workers", "1")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = read_rows(out)
    assert {p: r["status"] for p, r in rows.items()} == {
        "a.png": "ok", "ext.png": "ok", "dirlink/o.png": "ok", "sub/b.png": "ok",
        "loop.png": "failed", "dangling.png": "failed", "sub/up": "failed"}
    assert "broken symbolic link" in rows["dangling.png"]["error"]
    assert "symbolic link loop" in rows["loop.png"]["error"]
    assert "symbolic link loop" in rows["sub/up"]["error"]
    for name in ("loop.png", "dangling.png", "sub/up"):  # one line each in the log
        assert sum(name in line for line in proc.stderr.splitlines() if "ERROR" in line) == 1, proc.stderr
    assert json.loads((out / "ext.png" / "stats.json").read_text())["image"] == "ext.png"
    assert (out / "dirlink" / "o.png" / "stats.json").is_file()
    assert snapshot(tmp_path / "outside") == outside_before  # nothing written through a link
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"]["failed"] == 3 and summary["images"]["ok"] == 4


def test_glob_through_a_folder_loop_finds_each_file_once(tmp_path, monkeypatch):
    """glob.glob follows folder links, so '**' under sub/up -> .. repeats every file ~40 times."""
    root = tmp_path / "in"
    tiny_png(root / "a.png", 1)
    tiny_png(root / "sub" / "b.png", 2)
    (root / "sub" / "up").symlink_to("..")
    monkeypatch.chdir(tmp_path)
    for pattern in ("in/**/*.png", "in/**", "in/*"):
        found = apt_batch.discover([pattern], tmp_path / "out")
        assert [j.label for j in found.jobs] == ["a.png", "sub/b.png"], pattern
        assert [label for label, _ in found.failed] == ["sub/up"], pattern
        assert "symbolic link loop" in found.failed[0][1]


def test_glob_through_several_folder_loops_does_not_hang(tmp_path):
    """Two or more links back up make glob.glob's '**' recurse exponentially (it follows folder
    links): discovery must stay linear and report each loop once. In a subprocess, with a limit."""
    root = tmp_path / "in"
    tiny_png(root / "a.png", 1)
    tiny_png(root / "sub" / "b.png", 2)
    for name in ("up1", "up2", "up3"):
        (root / "sub" / name).symlink_to("..")
    code = ("import sys, apt_vis.batch as b; from pathlib import Path; "
            "f = b.discover(['in/**/*.png'], Path('out')); "
            "print(sorted(j.label for j in f.jobs), sorted(l for l, _ in f.failed))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("discovery of in/**/*.png did not finish in 30 s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['a.png', 'sub/b.png'] ['sub/up1', 'sub/up2', 'sub/up3']"


def test_same_file_twice_counts_once_two_links_count_twice(tmp_path):
    root = tmp_path / "in"
    tiny_png(root / "a.png", 1)
    (root / "l1.png").symlink_to("a.png")
    (root / "l2.png").symlink_to("a.png")
    out = tmp_path / "out"
    proc = run_cli(root, root / "l1.png", root / "a.png", "-o", out, "--stats-only", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(read_rows(out)) == ["a.png", "l1.png", "l2.png"]


def test_only_broken_links_still_writes_the_summary(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "x.png").symlink_to("gone.png")
    proc = run_cli(root, "-o", tmp_path / "out", "--stats-only")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert read_rows(tmp_path / "out")["x.png"]["status"] == "failed"


# --- unreadable folders and hidden files ---------------------------------------------------------


def _as_nobody() -> list[str]:
    """The command prefix that runs the tool without root's permission bypass, or skip."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot test an unreadable folder")
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    readable = "import os, sys; sys.exit(not all(os.access(p, os.R_OK) for p in sys.argv[1:]))"
    probe = subprocess.run([*prefix, sys.executable, "-c", readable, str(TOOL), np.__file__, PIL.__file__],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the user nobody cannot run the tool here")
    return prefix


def test_unreadable_subfolder_is_a_failed_row():
    prefix = _as_nobody()
    with tempfile.TemporaryDirectory() as tmp:  # under /tmp: reachable by nobody, unlike pytest's tmp_path
        base = Path(tmp)
        base.chmod(0o777)
        root = base / "in"
        tiny_png(root / "a.png", 1)
        tiny_png(root / "locked" / "b.png", 2)
        for path in (root, root / "a.png"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (root / "locked").chmod(0)

        def run(*args):
            return subprocess.run([*prefix, sys.executable, str(TOOL), *map(str, args), "--stats-only"],
                                  capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "MPLCONFIGDIR": str(base / "mpl")})

        try:
            proc = run(root / "locked", "-o", base / "out1")  # the only input: one line, like a missing one
            assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
            assert "cannot read folder (Permission denied)" in proc.stderr and not (base / "out1").exists()
            proc = run(root, "-o", base / "out")
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            rows = read_rows(base / "out")
            assert rows["a.png"]["status"] == "ok"
            assert rows["locked"]["status"] == "failed" and "ermission denied" in rows["locked"]["error"]
            summary = json.loads((base / "out" / "summary.json").read_text())
            assert summary["failures"] == [{"path": "locked", "error": rows["locked"]["error"]}]
        finally:
            (root / "locked").chmod(0o755)


def test_hidden_entries_are_counted(tmp_path):
    root = tmp_path / "in"
    tiny_png(root / "a.png", 1)
    tiny_png(root / ".hidden.png", 2)
    tiny_png(root / ".git" / "c.png", 3)  # a hidden folder counts once, its contents unread
    tiny_png(root / "sub" / ".d.png", 4)
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    proc = run_cli(root, "-o", out, "--stats-only")
    assert proc.returncode == 0, proc.stderr
    assert list(read_rows(out)) == ["a.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hidden_skipped"] == 3 and summary["files_skipped"] == 1
