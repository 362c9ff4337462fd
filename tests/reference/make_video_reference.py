"""Record what transformers' real video processors make of a few clips: tests/reference/video_reference.npz.

The project's test environment has no torchvision (transformers' video processors import it), so
tests/test_video_resize.py compares the tool against this recorded reference. Produced with:

    python3 -m venv /work/tvenv
    /work/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0 pillow numpy
    /work/tvenv/bin/python tests/reference/make_video_reference.py

Clips are cut from the real photo tests/data/pearl_earring.jpg with numpy slicing only (so the test
rebuilds the same frames without decoding anything), passed to the processor as a (T, H, W, 3) uint8
array with VideoMetadata, and sampled by the processor itself (do_sample_frames=True). Each frame the
model sees is read back from pixel_values_videos (un-normalised; the values are integers within 0.01)
and stored as a SHA-256 digest (one small frame also as pixels).
"""

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

if __name__ == "__main__":  # the tests import pan() and CASES from here without torchvision
    import torch
    import torchvision
    import transformers
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

HERE = Path(__file__).resolve().parent
PEARL = HERE.parent / "data" / "pearl_earring.jpg"
OUT = HERE / "video_reference.npz"
STORE_PIXELS = ("qwen2_down",)  # cases whose first frame is also stored whole (for diagnostics)

QWEN3_VIDEO = dict(size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16, temporal_patch_size=2,
                   merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3, fps=2, min_frames=4, max_frames=768)
PROCESSOR_NAMES = ("Qwen2VLVideoProcessor", "Qwen3VLVideoProcessor")  # resize_sizes' first column indexes this


def pan(frames: int, width: int, height: int, step: int = 1) -> np.ndarray:
    """(frames, height, width, 3) uint8: a window moving diagonally across the photo (every step-th pixel)."""
    photo = np.asarray(Image.open(PEARL).convert("RGB"))[::step, ::step]
    span_y, span_x = photo.shape[0] - height, photo.shape[1] - width
    return np.stack([photo[k * span_y // (frames - 1):][:height, k * span_x // (frames - 1):][:, :width]
                     for k in range(frames)])


# name: (clip arguments, video fps, processor, its keyword arguments)
CASES = {
    "qwen2_default": ((12, 640, 480), 10.0, "Qwen2VLVideoProcessor", {}),
    "qwen2_down": ((12, 640, 480), 10.0, "Qwen2VLVideoProcessor", dict(size={"shortest_edge": 3136,
                                                                              "longest_edge": 28 * 28 * 64})),
    "qwen2_down_bilinear": ((12, 640, 480), 10.0, "Qwen2VLVideoProcessor",
                            dict(size={"shortest_edge": 3136, "longest_edge": 28 * 28 * 64}, resample=2)),
    "qwen2_down_nearest": ((12, 640, 480), 10.0, "Qwen2VLVideoProcessor",
                           dict(size={"shortest_edge": 3136, "longest_edge": 28 * 28 * 64}, resample=0)),
    "qwen2_up": ((8, 150, 110, 4), 4.0, "Qwen2VLVideoProcessor", {}),
    "qwen3_published": ((12, 630, 470), 10.0, "Qwen3VLVideoProcessor", QWEN3_VIDEO),
    "qwen3_odd": ((13, 310, 230, 2), 5.0, "Qwen3VLVideoProcessor", QWEN3_VIDEO),  # 5 frames: one padded
}


def frames_seen(out, kwargs, cls) -> np.ndarray:
    """(T, H, W, 3) uint8 frames read back from pixel_values_videos (padding frames dropped later)."""
    p = kwargs.get("patch_size", cls.patch_size)
    m = kwargs.get("merge_size", cls.merge_size)
    t = kwargs.get("temporal_patch_size", cls.temporal_patch_size)
    mean = np.array(kwargs.get("image_mean", cls.image_mean), dtype=np.float64)
    std = np.array(kwargs.get("image_std", cls.image_std), dtype=np.float64)
    gt, gh, gw = (int(v) for v in out["video_grid_thw"][0])
    x = np.asarray(out["pixel_values_videos"], dtype=np.float64)
    x = x.reshape(gt, gh // m, gw // m, m, m, 3, t, p, p)
    # (gt, gh/m, gw/m, m_h, m_w, C, T, p_h, p_w) -> (gt, T, gh/m, m_h, p_h, gw/m, m_w, p_w, C)
    x = x.transpose(0, 6, 1, 3, 7, 2, 4, 8, 5).reshape(gt * t, gh * p, gw * p, 3)
    u = (x * std + mean) * 255
    assert np.abs(u - np.round(u)).max() < 0.01, np.abs(u - np.round(u)).max()
    return np.round(u).astype(np.uint8)


def resize_sizes() -> list[list[int]]:
    """Rows [processor index, cap, frames, height, width, min_pixels, max_pixels, factor, t, out_h, out_w]:
    the size each processor's resize() asks torchvision for, with and without cap_pixels_per_frame."""
    asked = {}

    def record_size(self, image, size, resample=None, **kwargs):
        asked["size"] = (size.height, size.width)

    TorchvisionBackend.resize = record_size
    rows = []
    limits = {"Qwen2VLVideoProcessor": [(128 * 28 * 28, 28 * 28 * 768, 14)],
              "Qwen3VLVideoProcessor": [(4096, 25165824, 16), (128 * 32 * 32, 32 * 32 * 768, 16)]}
    for k, (name, cls) in enumerate(zip(PROCESSOR_NAMES, (Qwen2VLVideoProcessor, Qwen3VLVideoProcessor))):
        for min_pixels, max_pixels, patch in limits[name]:
            processor = cls(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch)
            size = transformers.image_utils.SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
            for frames in (2, 3, 4, 16, 50, 101, 400, 768):
                for height, width in ((720, 1280), (480, 640), (1080, 1920), (240, 320), (90, 2000), (30, 40)):
                    for cap in (False, True):
                        video = types.SimpleNamespace(shape=(1, frames, 3, height, width))
                        processor.resize(video, size=size, resample=3, factor=patch * 2, temporal_factor=2,
                                         cap_pixels_per_frame=cap)
                        rows.append([k, int(cap), frames, height, width, min_pixels, max_pixels, patch * 2, 2,
                                     *asked["size"]])
    return rows


def main() -> None:
    arrays: dict[str, np.ndarray] = {}
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "cases": {}}
    for name, (clip, video_fps, processor_name, kwargs) in CASES.items():
        cls = {"Qwen2VLVideoProcessor": Qwen2VLVideoProcessor, "Qwen3VLVideoProcessor": Qwen3VLVideoProcessor}[
            processor_name]
        video = pan(*clip)
        processor = cls(**{"do_sample_frames": True, "fps": 2, "cap_pixels_per_frame": False, **kwargs})
        metadata = VideoMetadata(total_num_frames=len(video), fps=video_fps, width=video.shape[2],
                                 height=video.shape[1])
        indices = processor.sample_frames(metadata=VideoMetadata(total_num_frames=len(video), fps=video_fps))
        out = processor(videos=[video], video_metadata=[metadata], return_tensors="np")
        frames = frames_seen(out, kwargs, cls)[:len(indices)]
        meta["cases"][name] = {"clip": list(clip), "video_fps": video_fps, "processor": processor_name,
                               "kwargs": kwargs, "indices": [int(i) for i in indices],
                               "grid_thw": [int(v) for v in out["video_grid_thw"][0]],
                               "frame_hw": list(frames.shape[1:3]),
                               "sha256": [hashlib.sha256(f.tobytes()).hexdigest() for f in frames]}
        if name in STORE_PIXELS:
            arrays[f"{name}_frame0"] = frames[0]
        print(name, meta["cases"][name]["indices"], meta["cases"][name]["grid_thw"], frames.shape, file=sys.stderr)
    arrays["resize_sizes"] = np.array(resize_sizes(), dtype=np.int64)
    arrays["meta_json"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
