"""Entropy maps against a direct, slow implementation of the definition and hand-computed cases."""

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import visualize_patches as vp
from apt_vis import torch_backend as tb
from conftest import PEARL, random_photo_like

QUANTUM = 2.0**-vp.ENTROPY_QUANTUM_BITS
LUMA = (Fraction(2989, 10000), Fraction(5870, 10000), Fraction(1140, 10000))


def exact_bin(r, g, b) -> int:
    """floor(2 * (0.2989 R + 0.5870 G + 0.1140 B)) in exact rational arithmetic."""
    return math.floor(2 * (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b))


def slow_entropy_map(rgb: np.ndarray, patch_size: int, frames: int = 1) -> np.ndarray:
    """Direct definition: per patch, Counter of exact bins over its pixels (zero padding
    beyond the edge counted as bin 0), then -sum p log2 p in float64.

    rgb: (T, H, W, 3) uint8 or (H, W, 3). Returns (rows, cols), padded cells included.
    """
    if rgb.ndim == 3:
        rgb = rgb[None]
    t, h, w, _ = rgb.shape
    rows, cols = -(-h // patch_size), -(-w // patch_size)
    bins = {}
    out = np.zeros((rows, cols))
    n = t * patch_size * patch_size
    for i in range(rows):
        for j in range(cols):
            counter = Counter()
            for f in range(t):
                for y in range(i * patch_size, (i + 1) * patch_size):
                    for x in range(j * patch_size, (j + 1) * patch_size):
                        if y < h and x < w:
                            key = tuple(int(v) for v in rgb[f, y, x])
                            if key not in bins:
                                bins[key] = exact_bin(*key)
                            counter[bins[key]] += 1
                        else:
                            counter[0] += 1
            out[i, j] = -sum(c / n * math.log2(c / n) for c in counter.values())
    return out


def fast_map(rgb: np.ndarray, patch_size: int) -> np.ndarray:
    """Our patch_entropy on one image or one (T, H, W, 3) tube, padded cells included."""
    if rgb.ndim == 3:
        rgb = rgb[None]
    tensor = torch.from_numpy(rgb).permute(0, 3, 1, 2)[None]  # (1, T, 3, H, W)
    return tb.patch_entropy(tb.gray_bins(tensor), patch_size)[0].numpy()


@settings(max_examples=300, deadline=None)
@given(r=st.integers(0, 255), g=st.integers(0, 255), b=st.integers(0, 255))
def test_integer_binning_is_exact(r, g, b):
    got = tb.gray_bins(torch.tensor([[[[r]], [[g]], [[b]]]], dtype=torch.uint8))
    assert int(got) == exact_bin(r, g, b)


def test_integer_binning_all_grays_and_extremes():
    levels = torch.arange(256, dtype=torch.uint8)
    grays = tb.gray_bins(levels.view(1, 1, 256).expand(3, 1, 256))
    assert grays.flatten().tolist() == [exact_bin(v, v, v) for v in range(256)]
    assert int(tb.gray_bins(torch.full((3, 1, 1), 255, dtype=torch.uint8))) == exact_bin(255, 255, 255) == 509


def test_float32_binning_would_differ_somewhere():
    """The reason for integer binning: float32 disagrees with the exact bin on some pixels."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(200_000, 3)).astype(np.float32)
    f32 = np.floor(2 * (np.float32(0.2989) * rgb[:, 0] + np.float32(0.5870) * rgb[:, 1]
                        + np.float32(0.1140) * rgb[:, 2])).astype(np.int64)
    ours = tb.gray_bins(torch.from_numpy(rgb.T.astype(np.uint8)).view(3, 1, -1)).flatten().numpy()
    mismatch = np.nonzero(f32 != ours)[0]
    assert mismatch.size > 0
    for k in mismatch[:20]:
        assert ours[k] == exact_bin(*(int(v) for v in rgb[k]))


@pytest.mark.parametrize("size,patch_size", [((28, 42), 14), ((30, 45), 14), ((20, 20), 8), ((17, 9), 4)])
def test_matches_slow_definition_random(size, patch_size):
    rng = np.random.default_rng(size[0] * 100 + size[1])
    rgb = random_photo_like(rng, *size)
    np.testing.assert_allclose(fast_map(rgb, patch_size), slow_entropy_map(rgb, patch_size), rtol=0,
                               atol=QUANTUM / 2 + 2.0**-27)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 24), w=st.integers(1, 24), patch_size=st.integers(1, 9), levels=st.integers(1, 256),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_slow_definition_property(h, w, patch_size, levels, seed):
    rng = np.random.default_rng(seed)
    rgb = (rng.integers(0, levels, size=(h, w, 3)) * (255 // max(1, levels - 1) if levels > 1 else 0)).astype(np.uint8)
    np.testing.assert_allclose(fast_map(rgb, patch_size), slow_entropy_map(rgb, patch_size), rtol=0,
                               atol=QUANTUM / 2 + 2.0**-27)


def test_temporal_tube_shares_one_histogram():
    rng = np.random.default_rng(5)
    tube = np.stack([random_photo_like(rng, 28, 28), random_photo_like(rng, 28, 28)])
    np.testing.assert_allclose(fast_map(tube, 14), slow_entropy_map(tube, 14), rtol=0, atol=QUANTUM)


def test_real_photo_patch_sample_matches_slow_definition():
    image = vp.resize_for_qwen2vl(vp.load_image(PEARL), vp.Settings())
    crop = image[392:392 + 112, 280:280 + 112]  # a 2 x 2 block of 56 px cells on the face
    for ps in (14, 28, 56):
        np.testing.assert_allclose(fast_map(crop, ps), slow_entropy_map(crop, ps), rtol=0,
                                   atol=QUANTUM / 2 + 2.0**-27)


def tile(values, patch_size=14):
    """(rows, cols) gray levels -> RGB image of flat patches."""
    a = np.repeat(np.repeat(np.asarray(values, dtype=np.uint8), patch_size, 0), patch_size, 1)
    return np.repeat(a[..., None], 3, axis=-1)


def test_hand_computed_values_are_exact():
    flat = np.full((14, 14, 3), 77, dtype=np.uint8)
    assert fast_map(flat, 14)[0, 0] == 0.0
    half = flat.copy()
    half[:, 7:] = 200  # two bins of 98 pixels: exactly 1 bit
    assert fast_map(half, 14)[0, 0] == 1.0
    quarters = tile([[0, 60], [120, 250]], 7)  # one 14 px patch of four 49-pixel bins: 2 bits
    assert fast_map(quarters, 14)[0, 0] == 2.0
    eighths = np.concatenate([np.full((56, 7, 3), 30 * k, dtype=np.uint8) for k in range(8)], axis=1)
    assert fast_map(eighths, 56)[0, 0] == 3.0  # 8 equal stripes in a 56 px patch
    assert fast_map(eighths, 28)[0, 0] == 2.0  # 4 stripes per 28 px patch


def test_maximum_entropy_of_distinct_pixels():
    values = np.arange(196, dtype=np.int64).reshape(14, 14)
    rgb = np.zeros((14, 14, 3), dtype=np.uint8)
    rgb[..., 0] = rgb[..., 1] = rgb[..., 2] = (values * 255) // 195
    # 196 gray levels spread over 510 bins stay distinct -> log2(196)
    assert abs(fast_map(rgb, 14)[0, 0] - math.log2(196)) <= QUANTUM


def test_padded_cells_are_nan_and_others_finite():
    rng = np.random.default_rng(1)
    rgb = random_photo_like(rng, 70, 98)  # 70 = 2*28 + 14, 98 = 3*28 + 14 -> last row/col padded at 28 and 56
    normalized = torch.from_numpy(vp.normalize_image(rgb))[None]
    maps = vp.PatchTokenizer(num_scales=3, base_patch_size=14).compute_importance_maps(normalized)
    assert not torch.isnan(maps[14]).any()
    for ps in (28, 56):
        nan = torch.isnan(maps[ps][0]).numpy()
        np.testing.assert_array_equal(nan, vp.padded_cells(70, 98, ps))
    # the finite 28 px cells equal the direct definition
    ref = slow_entropy_map(rgb, 28)
    got = maps[28][0].numpy()
    finite = np.isfinite(got)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=0, atol=QUANTUM / 2 + 2.0**-27)


def test_padding_counts_as_zero_bin():
    """A padded cell's (unmasked) entropy counts the zero padding, as the APT reference does."""
    rgb = np.full((14, 10, 3), 255, dtype=np.uint8)  # 140 white pixels + 56 padding zeros in a 14 px patch
    p = np.array([140, 56]) / 196
    assert abs(fast_map(rgb, 14)[0, 0] - float(-(p * np.log2(p)).sum())) <= QUANTUM


def test_batch_of_images_equals_each_alone():
    rng = np.random.default_rng(3)
    images = [random_photo_like(rng, 56, 84) for _ in range(3)]
    tok = vp.PatchTokenizer()
    batch = torch.from_numpy(np.stack([vp.normalize_image(im) for im in images]))
    together = tok.compute_importance_maps(batch)
    for k, image in enumerate(images):
        alone = tok.compute_importance_maps(torch.from_numpy(vp.normalize_image(image))[None])
        for ps in tok.patch_sizes:
            assert torch.equal(together[ps][k].nan_to_num(-1), alone[ps][0].nan_to_num(-1))


def test_tie_with_threshold_is_decided_exactly():
    """A 28 px patch of exactly 2 bits merges with threshold 2.0000001 but not with 2."""
    image = tile([[0, 60], [120, 250]], 14)  # 28 x 28: four 14 px flat quarters -> 2 bits at 28
    normalized = torch.from_numpy(vp.normalize_image(image))[None]
    for thr, merged in ((2.0, 0), (2.0000001, 1)):
        tok = vp.PatchTokenizer(num_scales=2, base_patch_size=14, thresholds=[thr])
        masks = tok.construct_masks(tok.compute_importance_maps(normalized))
        assert int(masks[28].sum()) == merged


def test_uint8_entry_point_equals_normalised_entry_point():
    """The pipeline scores the uint8 pixels directly; the seed's API takes normalised ones."""
    from conftest import sample_photo

    tok = vp.PatchTokenizer()
    for path in (PEARL, sample_photo()):
        rgb = vp.resize_for_qwen2vl(vp.load_image(path), vp.Settings())
        direct = tok.importance_from_uint8(torch.from_numpy(rgb).permute(2, 0, 1)[None, None])
        normalised = tok.compute_importance_maps(torch.from_numpy(vp.normalize_image(rgb))[None])
        for ps in tok.patch_sizes:
            assert torch.equal(direct[ps].nan_to_num(-1), normalised[ps].nan_to_num(-1))
