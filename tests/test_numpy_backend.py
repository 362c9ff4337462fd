"""The numpy backend (the CPU path of visualize_patches) against the torch path (CUDA, and the
reference): entropy maps bit-identical, laplacian maps equal to 1e-12 relative, upsample_mse and
masks identical, and no torch on the numpy functions' path."""

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from PIL import Image

import visualize_patches as vp
from apt_vis import torch_backend as tb
from conftest import PEARL, random_photo_like

LAPLACIAN_RTOL = 1e-12
# Where the 9 kernel terms cancel (flat regions) the response is rounding noise whose value
# depends on the summation order, and torch's own conv2d is not consistent there (the same
# constant frame gives 1.1e-16 at one pixel and -5.0e-16 at another). A response sums 9 terms
# of total magnitude <= 16 (8 neighbours <= 1, centre 8 * <= 1), so any order is within
# 8 * 16 * eps of any other: that absolute slack, on top of the relative tolerance.
LAPLACIAN_ATOL = 8 * 16 * np.finfo(np.float64).eps  # 2.8e-14


def torch_maps(images: np.ndarray, patch_sizes, method: str, aggregate: str = "mean") -> dict[int, np.ndarray]:
    """Today's path: PatchTokenizer.importance_from_uint8 on (B, T, H, W, 3) uint8, as numpy."""
    tokenizer = vp.PatchTokenizer(num_scales=len(patch_sizes), base_patch_size=patch_sizes[0],
                                  thresholds=(1.0,) * (len(patch_sizes) - 1), method=method, aggregate=aggregate)
    assert tokenizer.patch_sizes == tuple(patch_sizes)
    maps = tokenizer.importance_from_uint8(torch.from_numpy(images.copy()).permute(0, 1, 4, 2, 3))
    return {ps: m.numpy() for ps, m in maps.items()}


def torch_masks(maps: dict[int, np.ndarray], thresholds) -> dict[int, np.ndarray]:
    chosen = vp.select_patches({ps: torch.from_numpy(m) for ps, m in maps.items()}, thresholds)
    return {ps: m.numpy() for ps, m in chosen.items()}


def assert_maps_identical(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for ps in theirs:
        assert ours[ps].dtype == theirs[ps].dtype == np.float64
        assert ours[ps].shape == theirs[ps].shape
        assert np.array_equal(ours[ps], theirs[ps], equal_nan=True), f"patch size {ps}"


def assert_maps_close(ours: dict, theirs: dict, rtol: float, atol: float) -> None:
    assert list(ours) == list(theirs)
    for ps in theirs:
        assert ours[ps].dtype == theirs[ps].dtype == np.float64
        assert ours[ps].shape == theirs[ps].shape
        assert np.array_equal(np.isnan(ours[ps]), np.isnan(theirs[ps])), f"NaN cells differ at patch size {ps}"
        np.testing.assert_allclose(ours[ps], theirs[ps], rtol=rtol, atol=atol, equal_nan=True,
                                   err_msg=f"patch size {ps}")


def assert_masks_identical(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for ps in theirs:
        assert ours[ps].dtype == theirs[ps].dtype == np.bool_
        assert np.array_equal(ours[ps], theirs[ps]), f"patch size {ps}"


def make_frames(kind: str, seed: int, frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8 test content of one kind."""
    rng = np.random.default_rng(seed)
    shape = (frames, height, width, 3)
    if kind == "noise":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    if kind == "few_levels":  # a handful of colours: many equal counts, entropies on the quantum grid
        palette = rng.integers(0, 256, size=(int(rng.integers(1, 5)), 3), dtype=np.uint8)
        return palette[rng.integers(0, len(palette), size=shape[:-1])]
    if kind == "constant":  # entropy exactly 0, Laplacian exactly 0
        return np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), shape).copy()
    if kind == "checkerboard":  # two gray bins, half each in every even cell: entropy exactly 1.0
        y, x = np.mgrid[0:height, 0:width]
        a, b = np.uint8(rng.integers(0, 128)), np.uint8(rng.integers(128, 256))
        board = np.where((y + x) % 2 == 0, a, b).astype(np.uint8)
        return np.broadcast_to(board[None, :, :, None], shape).copy()
    if kind == "photo":
        return np.stack([random_photo_like(rng, height, width) for _ in range(frames)])
    raise ValueError(kind)


KINDS = ("noise", "few_levels", "constant", "checkerboard", "photo")

images_strategy = st.builds(
    lambda kind, seed, b, t, h, w: np.stack([make_frames(kind, seed + k, t, h, w) for k in range(b)]),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    b=st.integers(1, 2),
    t=st.integers(1, 2),
    h=st.integers(1, 90),
    w=st.integers(1, 90),
)
patch_sizes_strategy = st.builds(lambda base, scales: tuple(base * 2**i for i in range(scales)),
                                 st.sampled_from((2, 4, 6, 14)), st.integers(1, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=images_strategy, patch_sizes=patch_sizes_strategy, strip_pixels=st.sampled_from((1, vp.ENTROPY_STRIP_PIXELS)))
def test_entropy_bit_identical(images, patch_sizes, strip_pixels):
    """strip_pixels=1: one row of the largest cells per strip, so strips meet inside the image."""
    with mock.patch.object(vp, "ENTROPY_STRIP_PIXELS", strip_pixels):
        ours = vp.importance_maps_np(images, patch_sizes, "entropy", "mean")
    assert_maps_identical(ours, torch_maps(images, patch_sizes, "entropy"))


@pytest.mark.parametrize("frames", [3, 4])
@pytest.mark.parametrize("kind", ["constant", "few_levels"])
def test_entropy_bit_identical_at_the_count_type_limit(kind, frames):
    """The larger scales' histograms are summed as uint16 while a top cell holds at most 65,535
    pixels: T=3 with 128-pixel cells (49,152, one bin holding all of them in a constant image)
    is summed as uint16, T=4 (65,536, which would wrap to 0) as int64."""
    images = make_frames(kind, 3, frames, 260, 140)[None]
    patch_sizes = (32, 64, 128)
    assert_maps_identical(vp.importance_maps_np(images, patch_sizes, "entropy", "mean"),
                          torch_maps(images, patch_sizes, "entropy"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=images_strategy, patch_sizes=patch_sizes_strategy, aggregate=st.sampled_from(vp.AGGREGATES))
def test_laplacian_close(images, patch_sizes, aggregate):
    ours = vp.importance_maps_np(images, patch_sizes, "laplacian", aggregate)
    assert_maps_close(ours, torch_maps(images, patch_sizes, "laplacian", aggregate), LAPLACIAN_RTOL, LAPLACIAN_ATOL)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=images_strategy, patch_sizes=patch_sizes_strategy)
def test_upsample_mse_identical(images, patch_sizes):
    # today's scorer raises for images under 2**(scales - 1) pixels (interpolate to size 0)
    assume(min(images.shape[2:4]) >= 2 ** (len(patch_sizes) - 1))
    ours = vp.importance_maps_np(images, patch_sizes, "upsample_mse", "mean")
    assert_maps_identical(ours, torch_maps(images, patch_sizes, "upsample_mse"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=images_strategy, patch_sizes=patch_sizes_strategy.filter(lambda s: len(s) > 1),
       data=st.data())
def test_masks_identical(images, patch_sizes, data):
    """Thresholds drawn from the map's own values (ties: score == threshold is not chosen)
    and around them, on maps with NaN padding; each image of the batch separately."""
    maps = vp.importance_maps_np(images, patch_sizes, "entropy", "mean")
    values = np.unique(np.concatenate([m[np.isfinite(m)] for m in maps.values()] + [np.array([0.0, 1.0])]))
    threshold = st.one_of(st.sampled_from(sorted(values.tolist())), st.floats(-1, 10))
    thresholds = data.draw(st.lists(threshold, min_size=len(patch_sizes) - 1, max_size=len(patch_sizes) - 1))
    assert_masks_identical(vp.select_patches_np(maps, thresholds), torch_masks(maps, thresholds))
    for k in range(images.shape[0]):
        one = {ps: m[k] for ps, m in maps.items()}
        assert_masks_identical(vp.compute_masks(one, thresholds), torch_masks(one, thresholds))


def test_checkerboard_entropy_is_exactly_one_and_ties_do_not_merge():
    images = make_frames("checkerboard", 0, 1, 56, 56)[None]
    maps = vp.importance_maps_np(images, (14, 28, 56), "entropy", "mean")
    for m in maps.values():
        assert np.all(m == 1.0)
    masks = vp.select_patches_np(maps, (1.0, 1.0))
    assert masks[14].all() and not masks[28].any() and not masks[56].any()
    masks = vp.select_patches_np(maps, (np.nextafter(1.0, 2.0),) * 2)
    assert masks[56].all() and not masks[14].any() and not masks[28].any()


@pytest.fixture(scope="module")
def pearl() -> np.ndarray:
    with Image.open(PEARL) as image:
        return np.asarray(image.convert("RGB"))  # 826 x 970: padded cells on the right and bottom


def test_real_photo(pearl):
    images = pearl[None, None]
    sizes = (14, 28, 56)
    entropy = vp.importance_maps_np(images, sizes, "entropy", "mean")
    assert_maps_identical(entropy, torch_maps(images, sizes, "entropy"))
    assert any(np.isnan(m).any() for m in entropy.values())
    for aggregate in vp.AGGREGATES:
        assert_maps_close(vp.importance_maps_np(images, sizes, "laplacian", aggregate),
                          torch_maps(images, sizes, "laplacian", aggregate), LAPLACIAN_RTOL, LAPLACIAN_ATOL)
    one = {ps: m[0] for ps, m in entropy.items()}
    for thresholds in ((3.0, 2.0), (5.0, 4.0), (7.0, 6.5)):
        assert_masks_identical(vp.compute_masks(one, thresholds), torch_masks(one, thresholds))


def test_real_photo_tube(pearl):
    """T = 2 (a temporal patch) on a real photo and a shifted copy of it."""
    images = np.stack([pearl[:600, :500], pearl[5:605, 3:503]])[None]
    sizes = (14, 28, 56)
    assert_maps_identical(vp.importance_maps_np(images, sizes, "entropy", "mean"),
                          torch_maps(images, sizes, "entropy"))
    assert_maps_close(vp.importance_maps_np(images, sizes, "laplacian", "std"),
                      torch_maps(images, sizes, "laplacian", "std"), LAPLACIAN_RTOL, LAPLACIAN_ATOL)


def test_scorer_cpu_equals_torch_cpu(pearl):
    """What a CPU run computes (Scorer("cpu"), numpy) against the torch path on the CPU, on the
    test photo at its model size: entropy bit-identical, laplacian to 1e-12, both image and tube."""
    resized = vp.resize_for_qwen2vl(Image.fromarray(pearl), vp.Settings())
    for method, aggregate in (("entropy", "mean"), ("laplacian", "mean"), ("laplacian", "std")):
        settings = vp.Settings(method=method, aggregate=aggregate, thresholds=(0.1, 0.05))
        tube = np.stack([resized, resized[::-1]])
        ours = vp.CPU.maps([resized, tube], settings)
        theirs = [torch_maps(images[None], settings.patch_sizes, method, aggregate)
                  for images in (resized[None], tube)]
        for one, other in zip(ours, theirs):
            other = {ps: m[0] for ps, m in other.items()}
            if method == "entropy":
                assert_maps_identical(one, other)
            else:
                assert_maps_close(one, other, LAPLACIAN_RTOL, LAPLACIAN_ATOL)


def test_cuda_runner_on_torch_cpu_equals_the_cpu_scorer(pearl):
    """The CUDA scorer's runner (inputs grouped by shape, `batch` at a time, maps back to numpy),
    driven on torch's CPU device: the same maps, in the input order, as the numpy CPU scorer, for a
    mix of shapes and tubes that splits into several batches."""
    resized = vp.resize_for_qwen2vl(Image.fromarray(pearl), vp.Settings())
    small = resized[:280, :392]
    inputs = [resized, small, resized[::-1].copy(), np.stack([small, small[::-1]]), small[:, ::-1].copy()]
    settings = vp.Settings()
    ours = tb.cuda_maps(inputs, settings, "cpu", batch=1 + 1)
    theirs = vp.CPU.maps(inputs, settings)
    assert len(ours) == len(theirs) == len(inputs)
    for one, other in zip(ours, theirs):
        assert_maps_identical(one, other)


def test_numpy_functions_do_not_use_torch(monkeypatch):
    """With torch unimportable and every torch object visualize_patches holds poisoned, the
    entropy and laplacian maps and the masks still compute (upsample_mse alone may import it)."""

    class Poisoned:
        def __getattr__(self, name):
            raise AssertionError(f"torch used: .{name}")

    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    for name, value in list(vars(vp).items()):
        if getattr(value, "__name__", "").startswith("torch") or value is torch:
            monkeypatch.setattr(vp, name, Poisoned())
    images = make_frames("photo", 1, 2, 40, 50)[None]
    for method in ("entropy", "laplacian"):
        maps = vp.importance_maps_np(images, (4, 8, 16), method, "std")
        vp.select_patches_np(maps, (1.0, 0.5))
    with pytest.raises(vp.ToolError, match="needs torch"):
        vp.importance_maps_np(images, (4, 8, 16), "upsample_mse", "mean")


@pytest.mark.parametrize("bad", [
    np.zeros((1, 8, 8, 3), np.uint8),  # no T axis
    np.zeros((1, 1, 8, 8, 4), np.uint8),  # RGBA
    np.zeros((1, 1, 8, 8, 3), np.float32),
])
def test_bad_input_shapes(bad):
    with pytest.raises(ValueError):
        vp.importance_maps_np(bad, (4, 8), "entropy", "mean")
    with pytest.raises(ValueError):
        vp.importance_maps_np(bad, (4, 8), "laplacian", "mean")


def test_unknown_method_and_aggregate_and_sizes():
    images = np.zeros((1, 1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        vp.importance_maps_np(images, (4, 8), "sobel", "mean")
    with pytest.raises(ValueError):
        vp.importance_maps_np(images, (4, 8), "entropy", "median")
    with pytest.raises(ValueError):
        vp.importance_maps_np(images, (4, 12), "entropy", "mean")
