"""Token budgets: exact shared-threshold counts, the --target-ratio search against brute force, sweeps."""

import csv
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import apt_vis.thresholds as apt_thresholds
import visualize_patches as vp
from conftest import PEARL, run_cli, sample_photo


def random_maps(rng, rows, cols, patch_size=14, scales=3, levels=None):
    """Random score maps on a grid of rows x cols base cells (NaN where padded);
    with `levels`, scores are drawn from that few values so that ties abound."""
    height, width = rows * patch_size, cols * patch_size
    maps = {}
    for i in range(scales):
        ps = patch_size * 2**i
        shape = vp.grid_shape(height, width, ps)
        values = rng.integers(0, levels, size=shape) * 0.5 if levels else rng.uniform(0, 8, size=shape)
        values = values.astype(np.float64)
        values[vp.padded_cells(height, width, ps)] = np.nan
        maps[ps] = values
    return maps


def total_by_rule(maps_list, t):
    """Patches for one shared threshold t, by select_patches itself (the reference)."""
    total = 0
    for maps in maps_list:
        thresholds = [t] * (len(maps) - 1)
        masks = vp.select_patches({ps: torch.from_numpy(m) for ps, m in maps.items()}, thresholds)
        total += sum(int(m.sum()) for m in masks.values())
    return total


def brute_force_thresholds(maps_list):
    """Every threshold worth trying: all distinct scores, midpoints, and values beyond both ends."""
    values = np.unique(np.concatenate([m[np.isfinite(m)].ravel() for maps in maps_list for m in maps.values()]))
    mids = (values[:-1] + values[1:]) / 2
    return np.concatenate([values, mids, [values[0] - 1, values[-1] + 1], np.nextafter(values, np.inf)])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), images=st.integers(1, 3), scales=st.integers(2, 4),
       ties=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_shared_counts_equal_the_rule(rows, cols, images, scales, ties, seed):
    rng = np.random.default_rng(seed)
    maps_list = [random_maps(rng, rows, cols, scales=scales, levels=6 if ties else None) for _ in range(images)]
    counts = apt_thresholds.SharedThresholdCounts.from_maps(maps_list)
    probes = brute_force_thresholds(maps_list)
    got = counts.total(probes)
    for t, n in zip(probes, got):
        assert n == total_by_rule(maps_list, t), t
    assert counts.uniform == sum(m[min(m)].size for m in maps_list)


def closest(outcomes, uniform, target):
    """The outcome nearest to target * uniform in exact arithmetic; ties: more patches."""
    goal = Fraction(target) * uniform
    return min(outcomes, key=lambda n: (abs(n - goal), -n))


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), images=st.integers(1, 3), ties=st.booleans(),
       target=st.floats(0.01, 1.0), seed=st.integers(0, 2**32 - 1))
def test_target_ratio_search_matches_brute_force(rows, cols, images, ties, target, seed):
    rng = np.random.default_rng(seed)
    maps_list = [random_maps(rng, rows, cols, levels=5 if ties else None) for _ in range(images)]
    counts = apt_thresholds.SharedThresholdCounts.from_maps(maps_list)
    threshold, total = apt_thresholds.choose_shared_threshold(counts, target)
    assert total == total_by_rule(maps_list, threshold)  # the reported total is what the rule gives
    outcomes = {total_by_rule(maps_list, t) for t in brute_force_thresholds(maps_list)}
    assert total == closest(outcomes, counts.uniform, target)


@settings(max_examples=80, deadline=None)
@given(cols=st.sampled_from([2, 4, 8]), k=st.integers(1, 31), seed=st.integers(0, 2**32 - 1))
def test_exact_ties_go_to_more_patches(cols, k, seed):
    """Grids of 2 x cols base cells make k / (4 cols) dyadic: exact midpoints between outcomes."""
    rng = np.random.default_rng(seed)
    maps = random_maps(rng, 2, cols, levels=4)
    uniform = 2 * cols
    target = min(1.0, k / (2 * uniform))
    counts = apt_thresholds.SharedThresholdCounts.from_maps([maps])
    _, total = apt_thresholds.choose_shared_threshold(counts, target)
    outcomes = {total_by_rule([maps], t) for t in brute_force_thresholds([maps])}
    assert total == closest(outcomes, uniform, target)


def test_sweep_counts_never_increase(tmp_path):
    out = tmp_path / "o"
    proc = run_cli(PEARL, "-o", out, "-q", "--sweep")
    assert proc.returncode == 0, proc.stderr
    with open(out / "threshold_sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["threshold", "patches_14", "patches_28", "patches_56", "apt_patches", "retained_ratio"]
    thresholds = [float(r["threshold"]) for r in rows]
    totals = [int(r["apt_patches"]) for r in rows]
    assert thresholds == sorted(thresholds) and len(rows) >= 100
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    assert totals[0] == 4200  # nothing merges at the low end: the uniform grid
    for r in rows:
        assert int(r["patches_14"]) + int(r["patches_28"]) + int(r["patches_56"]) == int(r["apt_patches"])
        assert float(r["retained_ratio"]) == pytest.approx(int(r["apt_patches"]) / 4200)
    # spot-check rows against a run with that shared threshold
    data = np.load(out / "importance_maps.npz")
    maps = {ps: data[f"scale_{ps}"].astype(np.float64) for ps in (14, 28, 56)}
    for r in rows[::40]:
        assert total_by_rule([maps], float(r["threshold"])) == int(r["apt_patches"])
    from PIL import Image
    with Image.open(out / "threshold_sweep.png") as im:
        assert im.size == (900, 550)


def test_target_ratio_single_image(tmp_path):
    out = tmp_path / "o"
    proc = run_cli(PEARL, "-o", out, "-q", "--target-ratio", "0.5")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    t = stats["thresholds"]
    assert len(t) == 2 and t[0] == t[1] and stats["target_ratio"] == 0.5
    data = np.load(out / "importance_maps.npz")
    maps = {ps: data[f"scale_{ps}"].astype(np.float64) for ps in (14, 28, 56)}
    outcomes = {total_by_rule([maps], x) for x in brute_force_thresholds([maps])}
    best = min(outcomes, key=lambda n: (abs(n / 4200 - 0.5), -n))
    assert stats["apt_patches"] == best
    # the recorded threshold reproduces the result when given explicitly
    again = tmp_path / "again"
    assert run_cli(PEARL, "-o", again, "-q", "--thresholds", repr(t[0]), repr(t[1])).returncode == 0
    assert json.loads((again / "stats.json").read_text())["apt_patches"] == stats["apt_patches"]


def test_target_ratio_batch_one_threshold_for_the_set(tmp_path):
    from test_batch import small_photo

    root = tmp_path / "set"
    small_photo(root / "a.jpg", (300, 300), 1)
    small_photo(root / "b.jpg", (240, 320), 2)
    small_photo(root / "c.png", (200, 260), 3, source=sample_photo())
    out = tmp_path / "o"
    proc = run_cli(root, "-o", out, "-q", "--target-ratio", "0.6", "--sweep")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    t = summary["thresholds"]
    assert summary["target_ratio"] == 0.6 and len(set(t)) == 1
    maps_list = []
    for name in ("a.jpg", "b.jpg", "c.png"):
        stats = json.loads((out / name / "stats.json").read_text())
        assert stats["thresholds"] == t
        data = np.load(out / name / "importance_maps.npz")
        maps_list.append({ps: data[f"scale_{ps}"].astype(np.float64) for ps in (14, 28, 56)})
    uniform = sum(m[14].size for m in maps_list)
    outcomes = {total_by_rule(maps_list, x) for x in brute_force_thresholds(maps_list)}
    best = min(outcomes, key=lambda n: (abs(n / uniform - 0.6), -n))
    assert summary["tokens"]["vit_patches_apt_total"] == best
    assert (out / "threshold_sweep.csv").exists() and (out / "threshold_sweep.png").exists()
    assert "target ratio 0.6" in (out / "report.html").read_text()


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "x"])
def test_target_ratio_validated(tmp_path, value):
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--target-ratio", value)
    assert proc.returncode == 2 and "--target-ratio" in proc.stderr
