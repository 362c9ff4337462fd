"""smart_resize: identical to transformers' own function (the independent reference)."""

import itertools

import pytest
from hypothesis import given, settings, strategies as st
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

import visualize_patches as vp


def both(h, w, factor, min_pixels, max_pixels):
    """(ours, theirs), each a size tuple or the string 'ValueError'."""
    results = []
    for fn in (vp.smart_resize, hf_smart_resize):
        try:
            results.append(tuple(fn(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)))
        except ValueError:
            results.append("ValueError")
    return results


def test_fixture_photo_hand_checked():
    # 970 / 28 = 34.64 -> 35 * 28 = 980; 826 / 28 = 29.5 -> round half to even = 30 -> 840
    assert vp.smart_resize(970, 826) == (980, 840)


def test_exhaustive_small_sizes_default_limits():
    for h, w in itertools.product(range(1, 181), range(1, 181)):
        ours, theirs = both(h, w, 28, vp.QWEN2VL_MIN_PIXELS, vp.QWEN2VL_MAX_PIXELS)
        assert ours == theirs, (h, w)


@settings(max_examples=6000, deadline=None)
@given(
    h=st.integers(1, 30000),
    w=st.integers(1, 30000),
    factor=st.one_of(st.sampled_from([14, 16, 28, 32, 56]), st.integers(1, 80)),
    min_pixels=st.integers(1, 2_000_000),
    extra=st.integers(0, 20_000_000),
)
def test_matches_transformers(h, w, factor, min_pixels, extra):
    ours, theirs = both(h, w, factor, min_pixels, min_pixels + extra)
    assert ours == theirs


@pytest.mark.parametrize("h,w", [(1, 201), (700, 3), (10000, 49)])
def test_aspect_ratio_limit(h, w):
    with pytest.raises(ValueError, match="aspect ratio"):
        vp.smart_resize(h, w)


@settings(max_examples=500, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), factor=st.sampled_from([14, 28, 32]))
def test_properties(h, w, factor):
    if max(h, w) / min(h, w) > 200:
        return
    rh, rw = vp.smart_resize(h, w, factor)
    assert rh % factor == 0 and rw % factor == 0
    assert rh >= factor and rw >= factor
