"""Video frames as transformers' real video processors make them: sampled indices, frame size,
pixels (equal, by SHA-256), padding, and cap_pixels_per_frame's sizes.

The reference (tests/reference/video_reference.npz) was recorded with the real Qwen2VLVideoProcessor and
Qwen3VLVideoProcessor (transformers 5.24, torchvision 0.29.1, torch 2.14.1), which this test environment
cannot import (no torchvision); tests/reference/make_video_reference.py made it and says how.
"""

import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import apt_vis.video as apt_video
import visualize_patches as vp
from conftest import run_cli

REFERENCE = Path(__file__).resolve().parent / "reference"
sys.path.insert(0, str(REFERENCE))
from make_video_reference import CASES, PROCESSOR_NAMES, pan  # noqa: E402

with np.load(REFERENCE / "video_reference.npz") as _data:
    RECORDED = {name: _data[name] for name in _data.files}
META = json.loads(RECORDED["meta_json"].tobytes())
MODEL_OF = {"Qwen2VLVideoProcessor": "qwen2-vl", "Qwen3VLVideoProcessor": "qwen3-vl"}


def settings_for(processor: str, kwargs: dict) -> vp.Settings:
    """The tool's settings for a recorded processor and its keyword arguments."""
    model = MODEL_OF[processor]
    values = dict(vp.MODEL_PRESETS[model], model=model)
    if processor == "Qwen2VLVideoProcessor":  # the class defaults, as the recording used
        values.update(video_min_pixels=128 * 28 * 28, video_max_pixels=28 * 28 * 768)
    if "size" in kwargs:
        values.update(video_min_pixels=kwargs["size"]["shortest_edge"], video_max_pixels=kwargs["size"]["longest_edge"])
    for key in ("patch_size", "merge_size", "temporal_patch_size", "min_frames", "max_frames", "resample"):
        if key in kwargs:
            values[key] = kwargs[key]
    if "fps" in kwargs:
        values["fps"] = float(kwargs["fps"])
    return vp.Settings(**values)


@pytest.mark.parametrize("name", list(CASES))
def test_frames_equal_transformers(name):
    case = META["cases"][name]
    clip = pan(*case["clip"])
    settings = settings_for(case["processor"], case["kwargs"])
    info = apt_video.VideoInfo(len(clip), case["video_fps"], clip.shape[2], clip.shape[1])
    indices, size = apt_video.video_plan(info, settings, name)
    assert indices == case["indices"] and list(size) == case["frame_hw"]
    t = settings.temporal_patch_size
    grid_t = -(-len(indices) // t)
    assert [grid_t, size[0] // settings.patch_size, size[1] // settings.patch_size] == case["grid_thw"]
    frames = [apt_video.resize_frame(clip[i], size, settings.resample) for i in indices]
    if f"{name}_frame0" in RECORDED:
        diff = np.abs(frames[0].astype(int) - RECORDED[f"{name}_frame0"].astype(int))
        assert diff.max() == 0, f"{(diff > 0).mean():.1%} of values differ, by up to {diff.max()}"
    assert [hashlib.sha256(f.tobytes()).hexdigest() for f in frames] == case["sha256"]


def test_pil_bicubic_is_not_what_transformers_does():
    """Why resize_frame exists: PIL's bicubic (the image path's resize) misses the recorded frames."""
    case = META["cases"]["qwen2_down"]
    clip = pan(*case["clip"])
    h, w = case["frame_hw"]
    pil = np.asarray(Image.fromarray(clip[0]).resize((w, h), Image.Resampling.BICUBIC))
    assert np.abs(pil.astype(int) - RECORDED["qwen2_down_frame0"].astype(int)).max() > 0


def test_cap_pixels_per_frame_sizes_match_transformers():
    rows = RECORDED["resize_sizes"]
    assert len(rows) == 288  # 3 limit pairs x 8 frame counts x 6 sizes x cap off/on
    for k, cap, frames, height, width, min_pixels, max_pixels, factor, t, out_h, out_w in rows.tolist():
        processor = PROCESSOR_NAMES[k]
        limit = max_pixels
        if cap:
            limit = apt_video.capped_video_max_pixels(processor, frames, factor, t, min_pixels, max_pixels)
        if processor == "Qwen3VLVideoProcessor":
            size = apt_video.smart_resize_qwen3_video(frames, height, width, t, factor, min_pixels, limit)
        else:
            size = vp.smart_resize(height, width, factor, min_pixels, limit)
        assert size == (out_h, out_w), (processor, cap, frames, height, width)
    # the example: 400 sampled 720p frames with the cap on
    assert [int(v) for v in rows[(rows[:, 0] == 0) & (rows[:, 1] == 1) & (rows[:, 2] == 400)
                                 & (rows[:, 3] == 720)][0, -2:]] == [504, 896]


def write_clip(path: Path, clip: np.ndarray, fps: float) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (clip.shape[2], clip.shape[1]))
    for frame in clip:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    return path


VIDEO_FIELDS = ("temporal_patch_size", "video_min_pixels", "video_max_pixels", "fps", "min_frames", "max_frames")


def test_qwen25_vl_videos_are_qwen2_vl_videos():
    """Qwen2.5-VL uses Qwen2VLVideoProcessor with its class defaults: the same video numbers."""
    qwen2, qwen25 = vp.MODEL_PRESETS["qwen2-vl"], vp.MODEL_PRESETS["qwen2.5-vl"]
    assert [qwen2[k] for k in VIDEO_FIELDS] == [qwen25[k] for k in VIDEO_FIELDS]
    assert apt_video.VIDEO_PROCESSOR_OF["qwen2.5-vl"] == apt_video.VIDEO_PROCESSOR_OF["qwen2-vl"] == "Qwen2VLVideoProcessor"


@pytest.mark.parametrize("model,name", [("qwen2-vl", "qwen2_default"), ("qwen3-vl", "qwen3_published"),
                                        ("qwen3-vl", "qwen3_odd")])
def test_model_presets_on_video_match_the_recorded_processor(tmp_path, model, name):
    """--model's video numbers reproduce the family's processor: indices, size, tubes, tokens, padding."""
    case = META["cases"][name]
    clip = pan(*case["clip"])
    video = write_clip(tmp_path / "clip.mp4", clip, case["video_fps"])
    proc = run_cli(video, "-o", tmp_path / "o", "-q", "--stats-only", "--model", model)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    gt, gh, gw = case["grid_thw"]
    assert stats["frame_indices"] == case["indices"] and stats["resized_size"] == case["frame_hw"][::-1]
    assert stats["temporal_patches"] == gt and stats["uniform_patches"] == gt * gh * gw
    assert stats["qwen2vl_tokens"] == gt * gh * gw // 4
    assert stats["padded_frames"] == gt * 2 - len(case["indices"]) and stats["settings"]["model"] == model


def test_cap_pixels_per_frame_flag(tmp_path):
    clip = np.repeat(np.repeat(pan(8, 800, 960), 2, axis=1), 2, axis=2)  # 8 frames of 1600 x 1920
    video = write_clip(tmp_path / "big.mp4", clip, 4.0)  # 2 s: 4 frames sampled at 2 fps
    sizes = {}
    for flag in ([], ["--cap-pixels-per-frame"]):
        out = tmp_path / f"o{len(flag)}"
        proc = run_cli(video, "-o", out, "-q", "--stats-only", "--model", "qwen3-vl", *flag)
        assert proc.returncode == 0, proc.stderr
        stats = json.loads((out / "stats.json").read_text())
        assert stats["settings"]["cap_pixels_per_frame"] is bool(flag) and stats["frames_sampled"] == 4
        sizes[bool(flag)] = stats["resized_size"]
    # off: 4 x 1920 x 1600 is within 25165824, frames keep their size; on: 768 tokens of 32 x 32 px a frame
    assert sizes[False] == [1600, 1920]
    w, h = sizes[True]
    assert w * h <= 768 * 32 * 32 and (h, w) == (960, 800)


def test_unsupported_resample_for_video_is_one_line(tmp_path):
    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps({"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "resample": 1,
                                  "image_processor_type": "Qwen2VLImageProcessor"}))
    video = write_clip(tmp_path / "c.mp4", pan(8, 160, 120, 4), 4.0)
    proc = run_cli(video, "-o", tmp_path / "o", "--processor", config)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "resample 1 (lanczos) is not supported for video" in errors[0]
