"""Resize + CLIP normalisation against transformers' Qwen2VLImageProcessorPil, and exact uint8 recovery."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import visualize_patches as vp
from apt_vis import torch_backend as tb
from conftest import PEARL, random_photo_like, sample_photo


def unpatchify(pixel_values, grid_thw, patch_size, merge_size, temporal_patch_size):
    """transformers' flat (patches, C*T*p*p) layout -> (3, H, W), first temporal copy."""
    _, gh, gw = (int(v) for v in grid_thw)
    m, p, t = merge_size, patch_size, temporal_patch_size
    x = np.asarray(pixel_values).reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
    # (gh/m, gw/m, m_h, m_w, C, p_h, p_w) -> (C, gh/m, m_h, p_h, gw/m, m_w, p_w)
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)


def ours(image: Image.Image, settings: vp.Settings) -> np.ndarray:
    resized = vp.resize_for_qwen2vl(vp.to_rgb(image), settings)
    return vp.normalize_image(resized, settings.image_mean, settings.image_std)


def theirs(image: Image.Image, settings: vp.Settings):
    processor = Qwen2VLImageProcessorPil(
        patch_size=settings.patch_size, merge_size=settings.merge_size,
        temporal_patch_size=settings.temporal_patch_size,
        size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
    )
    out = processor(images=image, return_tensors="np")
    grid = out["image_grid_thw"][0]
    return unpatchify(out["pixel_values"], grid, settings.patch_size, settings.merge_size,
                      settings.temporal_patch_size), grid


@pytest.mark.parametrize("path", [PEARL, sample_photo()], ids=["pearl", "grace_hopper"])
def test_real_photos_match_transformers(path):
    settings = vp.Settings()
    image = vp.load_image(path)
    mine = ours(image, settings)
    ref, grid = theirs(image, settings)
    assert mine.shape == ref.shape
    assert np.abs(mine - ref).max() <= 1e-6
    assert list(grid) == [1, mine.shape[1] // 14, mine.shape[2] // 14]


@pytest.mark.parametrize(
    "size,settings",
    [
        ((37, 53), vp.Settings()),
        ((1, 1), vp.Settings()),
        ((300, 2000), vp.Settings(max_pixels=200_000)),
        ((640, 480), vp.Settings(patch_size=16, merge_size=2)),
        ((500, 333), vp.Settings(patch_size=14, merge_size=1, min_pixels=100_000)),
    ],
)
def test_synthetic_sizes_and_geometry_match_transformers(size, settings):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(random_photo_like(rng, *size))
    mine = ours(image, settings)
    ref, _ = theirs(image, settings)
    assert mine.shape == ref.shape
    assert np.abs(mine - ref).max() <= 1e-6


def test_fixture_resized_size():
    resized = vp.resize_for_qwen2vl(vp.load_image(PEARL), vp.Settings())
    assert resized.shape == (980, 840, 3)


def test_uint8_recovered_exactly_for_every_level():
    levels = np.arange(256, dtype=np.uint8)
    rgb = np.stack(np.meshgrid(levels, levels[::-1], indexing="ij"), axis=-1)  # (256, 256, 2)
    rgb = np.concatenate([rgb, rgb[..., :1] // 3 + 7], axis=-1).astype(np.uint8)
    normalized = torch.from_numpy(vp.normalize_image(rgb))
    recovered = tb.recover_uint8(normalized, vp.CLIP_MEAN, vp.CLIP_STD)
    assert torch.equal(recovered.permute(1, 2, 0), torch.from_numpy(rgb))


def test_uint8_recovered_exactly_from_transformers_output():
    image = vp.load_image(PEARL)
    settings = vp.Settings()
    ref, _ = theirs(image, settings)
    resized = vp.resize_for_qwen2vl(image, settings)
    recovered = tb.recover_uint8(torch.from_numpy(ref), vp.CLIP_MEAN, vp.CLIP_STD)
    assert torch.equal(recovered.permute(1, 2, 0), torch.from_numpy(resized))
