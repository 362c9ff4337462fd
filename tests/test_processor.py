"""--processor: geometry and normalisation from a Qwen2-VL-family preprocessor_config.json."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import visualize_patches as vp
from apt_vis.processor import load_processor_settings
from conftest import PEARL, run_cli
from test_preprocess import unpatchify

QWEN2_VL = {  # the keys of Qwen2-VL's preprocessor_config.json (legacy min/max_pixels form)
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": list(vp.CLIP_MEAN), "image_std": list(vp.CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}
SIXTEEN_PX = {  # a successor with 16 px patches and 0.5 normalisation, in the newer 'size' form
    "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def write_config(folder, config):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "preprocessor_config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config,as_folder", [(QWEN2_VL, False), (SIXTEEN_PX, True)])
def test_settings_from_processor_and_pixels_match(tmp_path, config, as_folder):
    path = write_config(tmp_path / "model", config)
    settings = vp.Settings(**load_processor_settings(path.parent if as_folder else path))
    assert settings.patch_size == config["patch_size"]
    assert settings.image_mean == tuple(config["image_mean"])
    processor = Qwen2VLImageProcessorPil(**{k: v for k, v in config.items() if k != "image_processor_type"})
    image = vp.load_image(PEARL)
    out = processor(images=image, return_tensors="np")
    ref = unpatchify(out["pixel_values"], out["image_grid_thw"][0], settings.patch_size, settings.merge_size,
                     settings.temporal_patch_size)
    resized = vp.resize_for_qwen2vl(image, settings)
    mine = vp.normalize_image(resized, settings.image_mean, settings.image_std)
    assert mine.shape == ref.shape and np.abs(mine - ref).max() <= 1e-6


def test_cli_processor_and_explicit_flags_win(tmp_path):
    path = write_config(tmp_path / "model", SIXTEEN_PX)
    out = tmp_path / "o"
    proc = run_cli(PEARL, "-o", out, "-q", "--processor", path.parent)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["patch_sizes"] == [16, 32, 64] and stats["settings"]["image_mean"] == [0.5, 0.5, 0.5]
    w, h = stats["resized_size"]
    assert (h, w) == vp.smart_resize(970, 826, 32, 65536, 16777216)
    out2 = tmp_path / "o2"
    proc = run_cli(PEARL, "-o", out2, "-q", "--processor", path, "--patch-size", "14", "--max-pixels", "200000")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out2 / "stats.json").read_text())
    assert stats["patch_sizes"] == [14, 28, 56] and stats["settings"]["max_pixels"] == 200000
    assert stats["settings"]["image_std"] == [0.5, 0.5, 0.5]  # not overridden, so from the file


def test_processor_errors(tmp_path):
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--processor", tmp_path / "missing.json")
    assert proc.returncode == 2 and "no such file" in proc.stderr
    bad = tmp_path / "bad" / "preprocessor_config.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--processor", bad)
    assert proc.returncode == 2 and "--processor" in proc.stderr and "Traceback" not in proc.stderr


def test_processor_without_transformers(tmp_path):
    fake = tmp_path / "fake"
    (fake / "transformers").mkdir(parents=True)
    (fake / "transformers" / "__init__.py").write_text("raise ImportError('transformers is not installed')\n")
    path = write_config(tmp_path / "model", QWEN2_VL)
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--processor", path, env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 2 and "needs transformers" in proc.stderr
    # and the default path never imports transformers
    proc = run_cli(PEARL, "-o", tmp_path / "o2", "-q", env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "o2" / "patches_visualization.jpg").size == (840, 980)


@pytest.mark.parametrize("resample", [2, 0, 1, 4, 5])
def test_resample_in_config_is_honoured(tmp_path, resample):
    """A config's "resample" (PIL's codes) resizes images as Qwen2VLImageProcessorPil does with it."""
    small = {**QWEN2_VL, "max_pixels": 200704}  # a smaller resized photo keeps the test quick
    path = write_config(tmp_path / "model", {**small, "resample": resample})
    settings = vp.Settings(**load_processor_settings(path))
    config = {k: v for k, v in small.items() if k != "image_processor_type"}
    out = Qwen2VLImageProcessorPil(**config, resample=resample)(images=vp.load_image(PEARL), return_tensors="np")
    ref = unpatchify(out["pixel_values"], out["image_grid_thw"][0], 14, 2, 2)
    mine = vp.normalize_image(vp.resize_for_qwen2vl(vp.load_image(PEARL), settings), vp.CLIP_MEAN, vp.CLIP_STD)
    assert mine.shape == ref.shape and np.abs(mine - ref).max() <= 1e-6


def test_unknown_resample_is_one_line(tmp_path):
    path = write_config(tmp_path / "model", {**QWEN2_VL, "resample": 9})
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--processor", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert '"resample": 9' in proc.stderr and "3 bicubic" in proc.stderr
