"""Fuzzing: a few hundred seeded mutations of small JPEG, PNG, WebP, GIF, TIFF, BMP and MP4
files through one batch run. Every file ends as complete outputs or one failure row; no
traceback, no raw warning, no temp file, inputs untouched. Long campaigns: benchmarks/fuzz.py."""

import csv
import hashlib
import json
import os
import re

import numpy as np
import pytest

import visualize_patches as vp
from conftest import files_under, run_cli
from fuzzing import seed_files, write_cases

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20240611"))
FUZZ_FILES = 360  # about 25 s with full pictures on 2 cores
SUMMARY_FILES = {"summary.csv", "summary.json", "summary.png", "report.html"}
PY_WARNING = re.compile(r"\.py:\d+: \w*Warning: .*")  # warnings.showwarning's format


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    """(input folder, output folder, completed process, input hashes before the run, rows by path)."""
    root = tmp_path_factory.mktemp("fuzz")
    inputs, out = root / "in", root / "out"
    write_cases(inputs, FUZZ_SEED, 0, FUZZ_FILES, seed_files())
    before = {p.name: digest(p) for p in inputs.iterdir()}
    proc = run_cli(inputs, "-o", out, "--workers", "2")
    rows = {}
    with open(out / "summary.csv", newline="") as f:
        for row in csv.DictReader(f):
            assert row["path"] not in rows, f"two rows for {row['path']}"
            rows[row["path"]] = row
    return inputs, out, proc, before, rows


def test_exit_status_and_stderr(fuzz_run):
    _, _, proc, _, _ = fuzz_run
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not PY_WARNING.search(proc.stderr), PY_WARNING.findall(proc.stderr)[:5]


def test_one_row_per_input(fuzz_run):
    inputs, _, _, before, rows = fuzz_run
    assert set(rows) == set(before)
    assert {row["status"] for row in rows.values()} <= {"ok", "failed"}
    summary = json.loads((fuzz_run[1] / "summary.json").read_text())
    assert summary["images"]["found"] == FUZZ_FILES
    assert summary["images"]["ok"] + summary["images"]["failed"] == FUZZ_FILES


def test_the_unmutated_seeds_succeed(fuzz_run):
    rows = fuzz_run[4]
    clean = [row for path, row in rows.items() if "_clean." in path]
    assert clean, "the campaign should hold a few untouched seeds"
    assert all(row["status"] == "ok" for row in clean), [(r["path"], r["error"]) for r in clean if r["error"]]


def test_ok_rows_have_complete_outputs(fuzz_run):
    _, out, _, _, rows = fuzz_run
    settings, options = vp.Settings(), vp.RenderOptions()
    expected = {kind: set(vp.output_names(kind, settings, options)) for kind in ("image", "video")}
    ok = [row for row in rows.values() if row["status"] == "ok"]
    assert len(ok) >= FUZZ_FILES // 10  # most single mutations still decode somewhere
    for row in ok:
        folder = out / row["output"]
        assert {p.name for p in folder.iterdir()} == expected[row["kind"]], row["path"]
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["apt_patches"] == int(row["apt_patches"]), row["path"]
        with np.load(folder / "importance_maps.npz") as data:
            assert {f"scale_{ps}" for ps in settings.patch_sizes} <= set(data.files), row["path"]


def test_failed_rows_have_one_line_errors(fuzz_run):
    rows = fuzz_run[4]
    failed = [row for row in rows.values() if row["status"] == "failed"]
    assert failed, "the mutations should break some files"
    for row in failed:
        assert row["error"].strip(), row["path"]
        assert "\n" not in row["error"] and "Traceback" not in row["error"], row["path"]


def test_failed_rows_leave_no_output_folder(fuzz_run):
    _, out, _, _, rows = fuzz_run
    left = [row["path"] for row in rows.values() if row["status"] == "failed" and (out / row["output"]).exists()]
    assert not left


def test_no_temp_or_stray_files(fuzz_run):
    inputs, out, _, before, rows = fuzz_run
    hidden = [p for p in [*out.rglob("*"), *inputs.rglob("*")] if p.name.startswith(".")]
    assert not hidden
    ok_folders = {row["output"] for row in rows.values() if row["status"] == "ok"}
    assert {p.name for p in out.iterdir()} == SUMMARY_FILES | ok_folders
    assert {p.name for p in files_under(inputs)} == set(before)


def test_inputs_unchanged(fuzz_run):
    inputs, _, _, before, _ = fuzz_run
    assert {p.name: digest(p) for p in inputs.iterdir()} == before
