"""--model presets: each one's image numbers against transformers' own Qwen2VLImageProcessorPil built
from the same numbers, on real photos; precedence of --processor and explicit flags; the stats record.
(The presets' video numbers are tested in test_video_resize.py against the recorded video processors.)"""

import json

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import visualize_patches as vp
from conftest import PEARL, run_cli, sample_photo
from test_preprocess import unpatchify
from test_processor import SIXTEEN_PX, write_config


def test_default_settings_are_the_qwen2_vl_preset():
    assert vp.Settings() == vp.Settings(**vp.MODEL_PRESETS["qwen2-vl"]) and vp.Settings().model == "qwen2-vl"


def test_qwen3_vl_numbers():
    preset = vp.MODEL_PRESETS["qwen3-vl"]
    settings = vp.Settings(**preset)
    assert settings.patch_sizes == (16, 32, 64) and settings.factor == 32
    assert preset["image_mean"] == preset["image_std"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("model", list(vp.MODEL_PRESETS))
@pytest.mark.parametrize("photo", ["pearl", "grace_hopper"])
def test_preset_matches_transformers_image_processor(model, photo):
    settings = vp.Settings(**vp.MODEL_PRESETS[model], model=model)
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
        patch_size=settings.patch_size, temporal_patch_size=settings.temporal_patch_size,
        merge_size=settings.merge_size, image_mean=list(settings.image_mean), image_std=list(settings.image_std))
    image = vp.load_image(PEARL if photo == "pearl" else sample_photo())
    out = processor(images=image, return_tensors="np")
    grid = [int(v) for v in out["image_grid_thw"][0]]
    resized = vp.resize_for_qwen2vl(image, settings)
    h, w = resized.shape[:2]
    assert grid == [1, h // settings.patch_size, w // settings.patch_size]
    ref = unpatchify(out["pixel_values"], grid, settings.patch_size, settings.merge_size,
                     settings.temporal_patch_size)
    mine = vp.normalize_image(resized, settings.image_mean, settings.image_std)
    assert mine.shape == ref.shape and np.abs(mine - ref).max() <= 1e-6
    tokens = grid[1] * grid[2] // settings.merge_size**2  # what the processor's caller counts per image
    assert tokens == (h // settings.patch_size) * (w // settings.patch_size) // settings.merge_size**2


def test_cli_model_preset_and_stats(tmp_path):
    out = tmp_path / "o"
    proc = run_cli(PEARL, "-o", out, "-q", "--stats-only", "--model", "qwen3-vl")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["settings"]["model"] == "qwen3-vl" and stats["patch_sizes"] == [16, 32, 64]
    assert stats["settings"]["image_mean"] == [0.5, 0.5, 0.5]
    h, w = vp.smart_resize(970, 826, 32, 65536, 16777216)
    assert stats["resized_size"] == [w, h] and stats["qwen2vl_tokens"] == (h // 16) * (w // 16) // 4


def test_processor_and_explicit_flags_win_over_model(tmp_path):
    config = write_config(tmp_path / "model", {**SIXTEEN_PX, "size": {"shortest_edge": 3136,
                                                                      "longest_edge": 200704}})
    out = tmp_path / "o"
    proc = run_cli(PEARL, "-o", out, "-q", "--stats-only", "--model", "qwen2.5-vl", "--processor", config,
                   "--merge-size", "1", "--fps", "3")
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "stats.json").read_text())["settings"]
    assert s["model"] == "qwen2.5-vl" and s["patch_size"] == 16 and s["max_pixels"] == 200704  # from the file
    assert s["merge_size"] == 1 and s["fps"] == 3  # explicit flags
    assert s["video_max_pixels"] == vp.QWEN2VL_VIDEO_MAX_PIXELS  # the preset, untouched by the image config


def test_unknown_model_lists_the_known_ones(tmp_path):
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--model", "qwen4-vl")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert all(f"'{name}'" in proc.stderr for name in vp.MODEL_PRESETS)


def test_pictures_and_pages_name_the_model_analysed(tmp_path):
    """Under --model qwen3-vl the explorer and the batch report speak of Qwen3-VL's tokens, not
    Qwen2-VL's (the stats keep their key qwen2vl_tokens, the count of LLM tokens without APT)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(PEARL.read_bytes())
    (folder / "b.jpg").write_bytes(PEARL.read_bytes())
    out = tmp_path / "o"
    proc = run_cli(folder, "-o", out, "-q", "--model", "qwen3-vl")
    assert proc.returncode == 0, proc.stderr
    for page in (out / "a.jpg" / "explorer.html", out / "report.html"):
        text = page.read_text()
        assert "Qwen3-VL" in text and "Qwen2-VL" not in text, page.name
