"""APT patch choice: a slow reference of the rule, exact tiling, monotonicity in the thresholds."""

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

import visualize_patches as vp
from conftest import random_photo_like


def slow_select(maps: dict, thresholds) -> dict:
    """The rule patch by patch: a patch of scale i >= 1 is chosen iff its score < thresholds[i-1]
    and no ancestor (the patch of a larger scale containing it) is chosen; a base cell is chosen
    iff no ancestor is."""
    sizes = sorted(maps)
    chosen = {ps: np.zeros(maps[ps].shape, dtype=bool) for ps in sizes}

    def ancestor_chosen(i, r, c):
        for j in range(i + 1, len(sizes)):
            k = 2 ** (j - i)
            if chosen[sizes[j]][r // k, c // k]:
                return True
        return False

    for i in range(len(sizes) - 1, -1, -1):
        rows, cols = maps[sizes[i]].shape
        for r in range(rows):
            for c in range(cols):
                if ancestor_chosen(i, r, c):
                    continue
                value = maps[sizes[i]][r, c]
                chosen[sizes[i]][r, c] = True if i == 0 else bool(value < thresholds[i - 1])  # NaN -> False
    return chosen


def coverage(masks: dict, height: int, width: int) -> np.ndarray:
    """How many chosen patches cover each pixel of the padded canvas."""
    size = max(masks) * 2
    count = np.zeros((height + size, width + size), dtype=np.int32)
    for ps, mask in masks.items():
        for r, c in zip(*np.nonzero(mask)):
            count[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps] += 1
    return count


def random_maps(rng, height, width, patch_size, num_scales):
    maps = {}
    for i in range(num_scales):
        ps = patch_size * 2**i
        values = rng.uniform(0, 8, size=vp.grid_shape(height, width, ps))
        values[vp.padded_cells(height, width, ps)] = np.nan
        maps[ps] = values
    return maps


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 12), cols=st.integers(1, 12), patch_size=st.integers(1, 6),
    num_scales=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
    thresholds=st.lists(st.floats(-1, 9, allow_nan=False), min_size=3, max_size=3),
)
def test_tiles_exactly_once_and_matches_slow_rule(rows, cols, patch_size, num_scales, seed, thresholds):
    rng = np.random.default_rng(seed)
    height, width = rows * patch_size, cols * patch_size  # base cells divide the image, as after smart_resize
    maps = random_maps(rng, height, width, patch_size, num_scales)
    thr = thresholds[: num_scales - 1]
    got = vp.select_patches({ps: torch.from_numpy(m) for ps, m in maps.items()}, thr)
    got = {ps: m.numpy() for ps, m in got.items()}
    ref = slow_select(maps, thr)
    for ps in maps:
        np.testing.assert_array_equal(got[ps], ref[ps])
    cover = coverage(got, height, width)
    assert (cover[:height, :width] == 1).all()  # every pixel exactly once
    assert cover[height:, :].sum() == 0 and cover[:, width:].sum() == 0  # nothing past the edge


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 8), w=st.integers(1, 8), seed=st.integers(0, 2**32 - 1),
    thresholds=st.lists(st.floats(0, 8, allow_nan=False), min_size=2, max_size=2),
)
def test_real_entropy_maps_tile_the_image(h, w, seed, thresholds):
    rng = np.random.default_rng(seed)
    height, width = h * 28, w * 28
    rgb = random_photo_like(rng, height, width)
    rgb[: height // 2, : width // 2] = 90  # a flat region so that large patches get chosen
    tok = vp.PatchTokenizer(thresholds=thresholds)
    masks = tok.construct_masks(tok.compute_importance_maps(torch.from_numpy(vp.normalize_image(rgb))[None]))
    cover = coverage({ps: m[0].numpy() for ps, m in masks.items()}, height, width)
    assert (cover[:height, :width] == 1).all()
    assert cover.sum() == height * width


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 10), cols=st.integers(1, 10), seed=st.integers(0, 2**32 - 1),
    low=st.lists(st.floats(0, 8, allow_nan=False), min_size=2, max_size=2),
    raise_by=st.lists(st.floats(0, 4, allow_nan=False), min_size=2, max_size=2),
)
def test_raising_thresholds_never_adds_patches(rows, cols, seed, low, raise_by):
    rng = np.random.default_rng(seed)
    maps = {ps: torch.from_numpy(m) for ps, m in random_maps(rng, rows * 14, cols * 14, 14, 3).items()}
    high = [a + b for a, b in zip(low, raise_by)]

    def count(thr):
        return sum(int(m.sum()) for m in vp.select_patches(maps, thr).values())

    assert count(high) <= count(low)
    assert count([-1.0, -1.0]) == rows * cols  # nothing merges below zero bits: the uniform grid


def test_threshold_count_must_match_scales():
    maps = {14: torch.zeros(2, 2), 28: torch.zeros(1, 1)}
    try:
        vp.select_patches(maps, [1.0, 2.0])
    except ValueError as exc:
        assert "thresholds" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_flat_image_is_all_largest_patches():
    rgb = np.full((112, 168, 3), 128, dtype=np.uint8)
    tok = vp.PatchTokenizer()
    masks = tok.construct_masks(tok.compute_importance_maps(torch.from_numpy(vp.normalize_image(rgb))[None]))
    assert {ps: int(m.sum()) for ps, m in masks.items()} == {14: 0, 28: 0, 56: 6}
