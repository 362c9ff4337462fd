"""Threshold search and sweeps: APT patch counts as an exact function of one threshold shared
by all scales, the --target-ratio choice, and threshold_sweep.csv / .png."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np

from visualize_patches import (
    SCORERS,
    Settings,
    encode_csv,
)
from apt_vis.pictures import _figure_png


def _ancestor_minimum(maps: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """For each cell, the smallest score among the larger cells containing it (+inf if none).

    With one shared threshold t, a cell of scale i >= 1 is chosen iff
    score < t <= ancestor minimum, and a base cell iff t <= ancestor minimum.
    NaN (padded) scores count as +inf: they never merge.
    """
    sizes = sorted(maps)
    result: dict[int, np.ndarray] = {}
    above = None  # ancestor minimum including the parent scale itself
    for i in range(len(sizes) - 1, -1, -1):
        rows, cols = maps[sizes[i]].shape
        if above is None:
            result[sizes[i]] = np.full((rows, cols), np.inf)
        else:
            result[sizes[i]] = np.repeat(np.repeat(above, 2, axis=0), 2, axis=1)[:rows, :cols]
        own = np.nan_to_num(maps[sizes[i]], nan=np.inf, posinf=np.inf)
        above = np.minimum(result[sizes[i]], own)
    return {ps: result[ps] for ps in sizes}


@dataclass
class SharedThresholdCounts:
    """Patch counts as a function of one threshold shared by all scales, exactly.

    Built from any number of images' maps (one dataset); counts(t) is exact for
    every t, by binary search over the scores where the count can change.
    """

    patch_sizes: tuple[int, ...]
    lower: dict[int, np.ndarray]  # sorted scores of the cells that can be chosen (-inf for base)
    upper: dict[int, np.ndarray]  # their ancestor minima, sorted
    uniform: int  # base cells, i.e. patches without APT

    @classmethod
    def from_maps(cls, maps_list: Sequence[Mapping[int, np.ndarray]]) -> "SharedThresholdCounts":
        sizes = tuple(sorted(maps_list[0]))
        lower: dict[int, list] = {ps: [] for ps in sizes}
        upper: dict[int, list] = {ps: [] for ps in sizes}
        uniform = 0
        for maps in maps_list:
            minima = _ancestor_minimum(maps)
            uniform += maps[sizes[0]].size
            for i, ps in enumerate(sizes):
                v = np.full(maps[ps].shape, -np.inf) if i == 0 else np.nan_to_num(maps[ps], nan=np.inf)
                m = minima[ps]
                possible = v < m  # else the interval v < t <= m is empty
                lower[ps].append(v[possible].ravel())
                upper[ps].append(m[possible].ravel())
        return cls(
            sizes,
            {ps: np.sort(np.concatenate(lower[ps])) for ps in sizes},
            {ps: np.sort(np.concatenate(upper[ps])) for ps in sizes},
            uniform,
        )

    def counts(self, thresholds: np.ndarray) -> dict[int, np.ndarray]:
        """{patch size: patches of that size} for each shared threshold t (vector)."""
        t = np.asarray(thresholds, dtype=np.float64)
        return {
            ps: np.searchsorted(self.lower[ps], t, side="left") - np.searchsorted(self.upper[ps], t, side="left")
            for ps in self.patch_sizes
        }

    def total(self, thresholds: np.ndarray) -> np.ndarray:
        return sum(self.counts(thresholds).values())

    def candidates(self) -> np.ndarray:
        """One threshold inside every interval where the count is constant, ascending."""
        values = np.concatenate([self.lower[ps] for ps in self.patch_sizes[1:]] + [np.empty(0)])
        values = np.unique(values[np.isfinite(values)])
        if values.size == 0:
            return np.array([0.0])
        return np.append(values, np.nextafter(values[-1], np.inf))

    def useful_range(self) -> tuple[float, float]:
        """Thresholds from 'nothing merges' to 'everything that can merge does'."""
        c = self.candidates()
        return float(c[0]), float(c[-1])


def choose_shared_threshold(counts: SharedThresholdCounts, target_ratio: float) -> tuple[float, int]:
    """(threshold, total patches) whose retained ratio is closest to target_ratio; ties go
    to more patches. Exact: every distinct outcome is one candidate, and distances are
    compared in rational arithmetic, so a target such as 0.5 exactly between two outcomes
    is a true tie."""
    candidates = counts.candidates()
    totals = counts.total(candidates)  # non-increasing: a higher threshold never adds patches
    goal = Fraction(target_ratio) * counts.uniform
    lo, hi = 0, len(totals)  # first index whose total <= goal
    while lo < hi:
        mid = (lo + hi) // 2
        if totals[mid] <= goal:
            hi = mid
        else:
            lo = mid + 1
    options = [k for k in (lo - 1, lo) if 0 <= k < len(totals)]
    best = min(options, key=lambda k: (abs(int(totals[k]) - goal), -int(totals[k])))
    return float(candidates[best]), int(totals[best])


def sweep_thresholds(counts: SharedThresholdCounts, points: int = 201) -> np.ndarray:
    """Evenly spaced shared thresholds over the useful range, both ends included."""
    lo, hi = counts.useful_range()
    if hi <= lo:
        return np.array([lo])
    return np.unique(np.append(np.linspace(lo, hi, points), hi))


def render_sweep_plot(
    table: Mapping[str, np.ndarray], patch_sizes: Sequence[int], uniform: int,
    current: tuple[Sequence[float], int] | None, label: str, title: str,
) -> bytes:
    """Patches per scale and in total, and the retained ratio, against a shared threshold (PNG bytes).

    table: columns 'threshold', 'patches_<ps>', 'apt_patches', 'retained_ratio';
    current: (thresholds, apt_patches) of the run's own setting, marked.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    t = table["threshold"]
    for ps, color in zip(patch_sizes, ("#2ca02c", "#1f77b4", "#d62728", "#ff7f0e", "#9467bd", "#8c564b")):
        ax.plot(t, table[f"patches_{ps}"], color=color, linewidth=1.2, label=f"{ps} px patches")
    ax.plot(t, table["apt_patches"], color="black", linewidth=2.2, label="APT patches (total)")
    ax.axhline(uniform, color="gray", linestyle="--", linewidth=1, label=f"uniform grid: {uniform} patches")
    if current is not None:
        thresholds, apt = current
        if len(set(thresholds)) == 1:
            ax.plot([thresholds[0]], [apt], marker="*", markersize=14, color="#e377c2", linestyle="none",
                    label=f"this run: threshold {thresholds[0]:g}, {apt} patches")
        else:
            ax.axhline(apt, color="#e377c2", linestyle=":", linewidth=1.5,
                       label=f"this run: thresholds {', '.join(f'{v:g}' for v in thresholds)}, {apt} patches")
    ax.set_xlabel(f"threshold shared by all scales ({label})")
    ax.set_ylabel("patches")
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.set_ylim(0, ax.get_ylim()[1] / uniform)
    right.set_ylabel("retained ratio (APT / uniform)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    return _figure_png(fig)


SWEEP_COLUMNS_FIXED = ("threshold", "apt_patches", "retained_ratio")


def sweep_files(
    maps_list: Sequence[Mapping[int, np.ndarray]], settings: Settings, current: int | None, title: str, plot: bool,
) -> dict[str, bytes]:
    """threshold_sweep.csv (and .png): counts against one threshold shared by all scales.
    current: the run's own APT patch count at settings.thresholds, marked on the plot.
    maps_list may also be their SharedThresholdCounts, already built (--engine ray)."""
    counts = maps_list if isinstance(maps_list, SharedThresholdCounts) else SharedThresholdCounts.from_maps(maps_list)
    thresholds = sweep_thresholds(counts)
    per_scale = counts.counts(thresholds)
    total = sum(per_scale.values())
    table = {"threshold": thresholds, "apt_patches": total, "retained_ratio": total / counts.uniform}
    table.update({f"patches_{ps}": per_scale[ps] for ps in counts.patch_sizes})
    columns = ["threshold", *(f"patches_{ps}" for ps in counts.patch_sizes), "apt_patches", "retained_ratio"]
    rows = [{c: (repr(float(table[c][k])) if c in ("threshold", "retained_ratio") else int(table[c][k]))
             for c in columns} for k in range(len(thresholds))]
    files = {"threshold_sweep.csv": encode_csv(rows, columns)}
    if plot:
        label = SCORERS[settings.method][1]
        marked = None if current is None else (settings.thresholds, current)
        files["threshold_sweep.png"] = render_sweep_plot(table, counts.patch_sizes, counts.uniform, marked, label, title)
    return files


def resolve_thresholds(settings: Settings, maps_list: Sequence[Mapping[int, np.ndarray]]) -> Settings:
    """The settings with final thresholds: for --target-ratio, one shared threshold chosen over
    all the given maps (one per image or temporal patch); otherwise unchanged. Done once per run."""
    if settings.target_ratio is None or not maps_list:
        return settings
    counts = SharedThresholdCounts.from_maps(maps_list)
    threshold, _ = choose_shared_threshold(counts, settings.target_ratio)
    return replace(settings, thresholds=(threshold,) * (settings.num_scales - 1))
