#!/usr/bin/env python3
"""See what Adaptive Patch Tokenization (APT) does to an image before Qwen2-VL sees it.

The tool loads an image (or a folder of them, or a video), resizes it exactly
as Qwen2-VL's processor does (smart_resize + PIL bicubic + OpenAI-CLIP
normalisation), scores every patch at several scales (14, 28, 56 px by default)
by the Shannon entropy of its grayscale histogram, turns the scores into APT's
patch choice (low-entropy regions get large patches) and writes heatmaps, patch
overlays, an interactive explorer, the raw maps and the token accounting.

    python visualize_patches.py photo.jpg -o out/
    python visualize_patches.py photos/ -o out/ --stats-only
    python visualize_patches.py photo.jpg --target-ratio 0.5 --sweep

Sections, top to bottom:
  1. constants and settings      named numbers with their sources, the Settings dataclass
  2. geometry                    smart_resize, patch grids, video frame sampling
  3. importance and masks        exact integer entropy, other scorers, PatchTokenizer,
                                 exact threshold search
  4. rendering                   pure functions: arrays in, images out (the HTML pages: apt_vis/pages.py)
  5. input and output            loading, discovery, encoding, staged atomic writes
  6. pipeline                    one image, one video, a whole batch
  7. command line                parser, validation, main()
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":
    # Run as a script. Until cli() installs its own handlers, a stop signal while the imports run
    # (torch alone takes over a second) ends the run with one line instead of a traceback. Then
    # this file runs as the module `visualize_patches`, so that the apt_vis extensions (which
    # import visualize_patches) and worker processes all see one module, not a __main__ copy.
    import importlib.util

    def _stop_during_start_up(signum, frame):
        sys.stderr.write(f"ERROR   interrupted ({signal.Signals(signum).name}) during start-up\n")
        os._exit(128 + signum)

    for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(_signum, _stop_during_start_up)
    _spec = importlib.util.spec_from_file_location("visualize_patches", __file__)
    _core = importlib.util.module_from_spec(_spec)
    sys.modules["visualize_patches"] = _core
    try:
        _spec.loader.exec_module(_core)
    except ModuleNotFoundError as _missing:
        if _missing.name != "torch":
            raise
        # torch is an extra of the pip package (see the README's Set-up): one line, not a traceback
        sys.stderr.write("ERROR   torch is not installed: pip install torch (CPU only: pip install torch "
                         "--index-url https://download.pytorch.org/whl/cpu); see the README's Set-up\n")
        sys.exit(1)
    sys.exit(_core.cli())

import argparse
import csv
import ctypes
import errno
import fcntl
import functools
import gc
import glob
import importlib
import io
import json
import math
import multiprocessing
import platform
import select
import shutil
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

import torch
import torch.nn.functional as F
from loguru import logger
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

__version__ = "1.0.0"

# ---------------------------------------------------------------------------
# 1. Constants and settings
# ---------------------------------------------------------------------------

# OpenAI CLIP normalisation, as transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD
# (transformers/utils/constants.py), used by every Qwen2-VL image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2-VL image processor defaults (transformers Qwen2VLImageProcessor: size
# shortest_edge / longest_edge) and smart_resize's aspect-ratio limit.
QWEN2VL_MIN_PIXELS = 56 * 56
QWEN2VL_MAX_PIXELS = 28 * 28 * 1280
QWEN2VL_MAX_ASPECT_RATIO = 200

# Qwen2-VL video defaults: transformers Qwen2VLVideoProcessor (size shortest_edge
# 128*28*28, longest_edge 28*28*768, min_frames 4, max_frames 768) and
# qwen-vl-utils (FPS = 2.0).
QWEN2VL_VIDEO_MIN_PIXELS = 128 * 28 * 28
QWEN2VL_VIDEO_MAX_PIXELS = 28 * 28 * 768
QWEN2VL_VIDEO_FPS = 2.0
QWEN2VL_VIDEO_MIN_FRAMES = 4
QWEN2VL_VIDEO_MAX_FRAMES = 768

# Resampling, as PIL's codes (Image.Resampling), the form of preprocessor_config.json's "resample".
# Every Qwen-VL processor resizes bicubic (resample 3). Images are resized by PIL (as transformers'
# Qwen2VLImageProcessorPil); video frames as transformers' video processors do on the CPU: torchvision's
# resize, which calls torch's interpolate with antialias (see resize_frame).
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
BICUBIC = 3

# --model: every number of a preset, with its source. "class" is transformers 5.24's processor class
# defaults (Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLVideoProcessor); "config" is the model
# repository's published preprocessor_config.json / video_preprocessor_config.json on Hugging Face;
# "qwen-vl-utils" is the Qwen team's reference preprocessing (vision_process.py: FPS = 2.0).
QWEN25VL_MAX_PIXELS = 12845056  # config: Qwen/Qwen2.5-VL-7B-Instruct/preprocessor_config.json "max_pixels"
QWEN3VL_PATCH_SIZE = 16  # config: Qwen/Qwen3-VL-2B-Instruct/preprocessor_config.json "patch_size"
QWEN3VL_MEAN = QWEN3VL_STD = (0.5, 0.5, 0.5)  # config: Qwen3-VL's "image_mean" / "image_std"
QWEN3VL_MIN_PIXELS = 65536  # config: Qwen3-VL's preprocessor_config.json size.shortest_edge
QWEN3VL_MAX_PIXELS = 16777216  # config: Qwen3-VL's preprocessor_config.json size.longest_edge
QWEN3VL_VIDEO_MIN_PIXELS = 4096  # config: Qwen3-VL's video_preprocessor_config.json size.shortest_edge
QWEN3VL_VIDEO_MAX_PIXELS = 25165824  # config: same file, size.longest_edge (frames x height x width)
# Qwen3-VL video_preprocessor_config.json also gives fps 2, min_frames 4, max_frames 768 (= the class's).
MODEL_PRESETS: dict[str, dict] = {
    "qwen2-vl": dict(  # class defaults (today's defaults; the published file raises max_pixels to 12845056)
        patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=QWEN2VL_MIN_PIXELS,
        max_pixels=QWEN2VL_MAX_PIXELS, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        video_min_pixels=QWEN2VL_VIDEO_MIN_PIXELS, video_max_pixels=QWEN2VL_VIDEO_MAX_PIXELS,
        fps=QWEN2VL_VIDEO_FPS, min_frames=QWEN2VL_VIDEO_MIN_FRAMES, max_frames=QWEN2VL_VIDEO_MAX_FRAMES),
    "qwen2.5-vl": dict(  # config for images (patch 14, merge 2, temporal 2, min 3136, CLIP mean/std);
        # video numbers: the class defaults (Qwen2.5-VL uses Qwen2VLVideoProcessor) = qwen-vl-utils' VIDEO_*_PIXELS
        patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=QWEN2VL_MIN_PIXELS,
        max_pixels=QWEN25VL_MAX_PIXELS, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        video_min_pixels=QWEN2VL_VIDEO_MIN_PIXELS, video_max_pixels=QWEN2VL_VIDEO_MAX_PIXELS,
        fps=QWEN2VL_VIDEO_FPS, min_frames=QWEN2VL_VIDEO_MIN_FRAMES, max_frames=QWEN2VL_VIDEO_MAX_FRAMES),
    "qwen3-vl": dict(  # config (both files; merge 2 and temporal 2 there too)
        patch_size=QWEN3VL_PATCH_SIZE, temporal_patch_size=2, merge_size=2, min_pixels=QWEN3VL_MIN_PIXELS,
        max_pixels=QWEN3VL_MAX_PIXELS, image_mean=QWEN3VL_MEAN, image_std=QWEN3VL_STD,
        video_min_pixels=QWEN3VL_VIDEO_MIN_PIXELS, video_max_pixels=QWEN3VL_VIDEO_MAX_PIXELS,
        fps=2.0, min_frames=4, max_frames=768),
}
DEFAULT_MODEL = "qwen2-vl"
# Which transformers video processor a model's videos follow: frame sampling and sizing differ.
VIDEO_PROCESSOR_OF = {"qwen2-vl": "Qwen2VLVideoProcessor", "qwen2.5-vl": "Qwen2VLVideoProcessor",
                      "qwen3-vl": "Qwen3VLVideoProcessor"}

# --cap-pixels-per-frame, as transformers' video processors' cap_pixels_per_frame (qwen-vl-utils'
# behaviour): Qwen2VLVideoProcessor shares 90 % of max_video_tokens = 128000 tokens' pixels among the
# frames; Qwen3VLVideoProcessor caps each frame at max_video_tokens = 768 tokens; both floor a frame at
# 1.05 x the minimum pixels.
QWEN2VL_CAP_VIDEO_TOKENS = 128000
QWEN2VL_CAP_BUDGET_SHARE = 0.9
QWEN3VL_CAP_FRAME_TOKENS = 768
CAP_MIN_PIXELS_FACTOR = 1.05

# APT reference (arXiv 2510.18091, entropy_utils.py): grayscale by the luma
# weights 0.2989 / 0.5870 / 0.1140 and a 512-bin histogram over [0, 256).
# bin = floor(2 * (0.2989 R + 0.5870 G + 0.1140 B)) is computed exactly in
# integers as (2989 R + 5870 G + 1140 B) // 5000, so it cannot differ between
# float32 and float64, CPU and GPU.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)
LUMA_WEIGHTS_1E4 = (2989, 5870, 1140)
LUMA_BIN_DIVISOR = 5000
ENTROPY_BINS = 512

# Entropy arithmetic: per-pixel log2 counts in fixed point with this many
# fractional bits (exact int64 sums, independent of reduction order), and the
# result rounded to a multiple of 2**-ENTROPY_QUANTUM_BITS bits.  The fixed-point
# error is at most 2**-28, far below half the quantum (2**-21), so values that
# are exact multiples of the quantum (0, 1, 2, 1.5, ...) come out exact and
# ties with a threshold are decided as the mathematics says.
ENTROPY_FIXED_POINT_BITS = 28
ENTROPY_QUANTUM_BITS = 20

# APT reference scorers: 8-neighbour Laplacian kernel on [0, 1] grayscale with
# reflect padding; down-and-up bilinear resampling by 0.5**scale for upsample_mse
# (the reference passes [1.0, 0.5, 0.25] for three scales).
LAPLACIAN_KERNEL = ((1.0, 1.0, 1.0), (1.0, -8.0, 1.0), (1.0, 1.0, 1.0))

DEFAULT_OUTPUT_DIR = "./visualizations"
SAMPLE_IMAGE = "pearl_earring.jpg"  # in apt_vis/data/ (provenance and licence: its README.md)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")

# Rendering.
BORDER_GREEN = (0, 255, 0)
BORDER_THICKNESS = 2
SCALE_COLORS = ((0, 255, 0), (0, 190, 255), (255, 40, 200), (255, 170, 0), (255, 255, 255))
PADDED_CELL_RGB = (159, 184, 207)  # pale steel blue: absent from inferno, so padded cells stand out
THRESHOLD_RGB = (0, 229, 255)
OVERLAY_WEIGHT, OVERLAY_CELL_WEIGHT = 20, 11  # the importance colour covers 11/20 of each pixel
OVERLAY_ALPHA = OVERLAY_CELL_WEIGHT / OVERLAY_WEIGHT
JPEG_QUALITY = 95
THUMBNAIL_WIDTH = 240
# matplotlib's 'inferno' colormap (Nathaniel J. Smith and Stefan van der Walt,
# CC0; matplotlib/_cm_listed.py) sampled at 256 levels as RGB hex; kept here so
# that rendering needs no matplotlib import, and tested equal to matplotlib's.
INFERNO_HEX = (
    "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722"
    "0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48"
    "210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964"
    "3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d"
    "57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e"
    "71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a"
    "8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62"
    "a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655"
    "bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545"
    "d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933"
    "e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f"
    "f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a"
    "f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f"
    "fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932"
    "f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865"
    "f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4"
)
INFERNO = np.frombuffer(bytes.fromhex(INFERNO_HEX), dtype=np.uint8).reshape(256, 3)

# Batch mode.
MAX_DEFAULT_WORKERS = 8
CUDA_BATCH = 16  # images of one size scored together on CUDA

# Exit codes of main().
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ToolError(Exception):
    """A failure the user can act on; reported as one line, exit 1."""


def extension(name: str):
    """The module apt_vis.<name>, imported on first use: the capabilities beyond the core pipeline live
    in the package apt_vis next to this file (see its __init__)."""
    try:
        return importlib.import_module(f"apt_vis.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("apt_vis", f"apt_vis.{name}"):
            raise
        raise ToolError(f"apt_vis.{name} not found: {Path(__file__).name} needs the apt_vis package "
                        f"next to it ({exc})") from None


@dataclass(frozen=True)
class Settings:
    """Every knob of the analysis, with the defaults in this one place."""

    patch_size: int = 14  # base (ViT) patch side in pixels
    temporal_patch_size: int = 2  # frames per temporal patch (tube); an image is one tube
    merge_size: int = 2  # Qwen2-VL merges merge_size x merge_size patches into one LLM token
    thresholds: tuple[float, ...] = (3.0, 2.0)  # thresholds[i-1] applies to patch_size * 2**i
    min_pixels: int = QWEN2VL_MIN_PIXELS  # smart_resize lower bound on h*w (images)
    max_pixels: int = QWEN2VL_MAX_PIXELS  # smart_resize upper bound on h*w (images)
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    method: str = "entropy"  # importance scorer, a key of SCORERS
    aggregate: str = "mean"  # per-patch reduction of the laplacian scorer
    target_ratio: float | None = None  # choose one shared threshold for this retained ratio
    fps: float = QWEN2VL_VIDEO_FPS  # video frames sampled per second
    min_frames: int = QWEN2VL_VIDEO_MIN_FRAMES
    max_frames: int = QWEN2VL_VIDEO_MAX_FRAMES
    video_min_pixels: int = QWEN2VL_VIDEO_MIN_PIXELS  # Qwen3-VL: over all sampled frames (t x h x w)
    video_max_pixels: int = QWEN2VL_VIDEO_MAX_PIXELS
    model: str = DEFAULT_MODEL  # a key of MODEL_PRESETS; picks the video processor's rules too
    resample: int = BICUBIC  # PIL's resampling code, for images and video frames
    cap_pixels_per_frame: bool = False  # transformers' cap_pixels_per_frame (off, as its 5.24 default)

    @property
    def num_scales(self) -> int:
        return len(self.thresholds) + 1

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        return tuple(self.patch_size * 2**i for i in range(self.num_scales))

    @property
    def factor(self) -> int:
        """smart_resize's factor: resized sides are multiples of this."""
        return self.patch_size * self.merge_size

    def record(self) -> dict:
        """The settings that determine the numbers, as stored in stats.json."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RenderOptions:
    """What to draw and write besides the numbers."""

    line_color: tuple[int, int, int] = BORDER_GREEN
    line_thickness: int = BORDER_THICKNESS
    color_by_scale: bool = False
    stats_only: bool = False  # numbers only: stats.json and the raw maps, no pictures
    sweep: bool = False  # also threshold_sweep.csv / .png


# ---------------------------------------------------------------------------
# 2. Geometry
# ---------------------------------------------------------------------------


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = QWEN2VL_MIN_PIXELS,
    max_pixels: int = QWEN2VL_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): sides multiples of factor, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible.

    Same arithmetic as transformers' qwen2_vl smart_resize (Python floats,
    banker's rounding), so results are identical; raises ValueError when the
    aspect ratio exceeds 200.
    """
    aspect = max(height, width) / min(height, width)
    if aspect > QWEN2VL_MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {aspect:.1f} exceeds Qwen2-VL's limit of {QWEN2VL_MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) covering height x width, the last row/col possibly padded."""
    return -(-height // patch_size), -(-width // patch_size)


def padded_cells(height: int, width: int, patch_size: int) -> np.ndarray:
    """(rows, cols) bool: True for cells that extend past the image edge."""
    rows, cols = grid_shape(height, width, patch_size)
    pad = np.zeros((rows, cols), dtype=bool)
    if rows * patch_size > height:
        pad[-1, :] = True
    if cols * patch_size > width:
        pad[:, -1] = True
    return pad


def sample_frame_indices(
    total_frames: int, video_fps: float, fps: float, temporal_patch_size: int, min_frames: int, max_frames: int
) -> list[int]:
    """Indices of the frames Qwen2-VL samples from a video, as transformers'
    Qwen2VLVideoProcessor.sample_frames: fps frames per second, clamped to
    [min_frames, max_frames] and the video's length, floored to a multiple of
    temporal_patch_size, spread uniformly. When that leaves no frame (a video, or
    max_frames, shorter than one temporal patch), min(total, max_frames) frames are
    taken; the last tube is then padded by repeating its last frame, as Qwen2-VL's
    patchify does.
    """
    t = temporal_patch_size
    cap = math.floor(min(max_frames, total_frames) / t) * t
    wanted = total_frames / video_fps * fps
    count = math.floor(min(max(wanted, min_frames), cap, total_frames) / t) * t
    if count <= 0:  # fewer frames than one temporal patch allows (transformers divides by zero here)
        count = min(total_frames, max_frames)
        # the float step total/count can make arange yield count + 1 values: keep the first count
        return torch.arange(0, total_frames, total_frames / count).int().tolist()[:count]
    return torch.arange(0, total_frames, total_frames / count).int().tolist()


def sample_frame_indices_qwen3(total_frames: int, video_fps: float, fps: float, min_frames: int,
                               max_frames: int) -> list[int]:
    """Indices of the frames Qwen3-VL samples, as transformers' Qwen3VLVideoProcessor.sample_frames:
    int(duration * fps) frames clamped to [min_frames, max_frames] and the video's length, spread
    evenly from the first frame to the last (numpy's linspace, rounded half to even). The count
    need not be a multiple of the temporal patch size: the last tube is padded."""
    count = min(max(int(total_frames / video_fps * fps), min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()


def smart_resize_qwen3_video(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                             min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's frame size, as transformers' qwen3_vl video smart_resize: the pixel limits bound
    frames x height x width, sides too short for one factor are first scaled up. transformers
    refuses num_frames < temporal_factor; here such a clip is sized as its padded tube."""
    num_frames = max(num_frames, temporal_factor)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    aspect = max(height, width) / min(height, width)
    if aspect > QWEN2VL_MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {aspect:.1f} exceeds Qwen-VL's limit of {QWEN2VL_MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def capped_video_max_pixels(video_processor: str, num_frames: int, factor: int, temporal_factor: int,
                            min_pixels: int, max_pixels: int) -> int:
    """max_pixels for smart_resize under cap_pixels_per_frame, exactly as the named transformers
    video processor's resize computes it from the number of sampled frames."""
    floor = int(min_pixels * CAP_MIN_PIXELS_FACTOR)
    if video_processor == "Qwen3VLVideoProcessor":
        frame_cap = QWEN3VL_CAP_FRAME_TOKENS * factor * factor
        return max(min(frame_cap, max_pixels // num_frames), floor) * num_frames
    total_pixels = int(QWEN2VL_CAP_VIDEO_TOKENS * factor * factor * QWEN2VL_CAP_BUDGET_SHARE)
    return max(min(max_pixels, total_pixels * temporal_factor // num_frames), floor)


# ---------------------------------------------------------------------------
# 3. Importance maps and masks
# ---------------------------------------------------------------------------


def normalize_image(rgb: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, (x / 255 - mean) / std as Qwen2-VL's processor."""
    x = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
    for c in range(3):  # one channel at a time keeps the temporaries small; same float32 operations
        np.divide(rgb[..., c], np.float32(255), out=x[c], dtype=np.float32)
        x[c] -= np.float32(mean[c])
        x[c] /= np.float32(std[c])
    return x


def recover_uint8(normalized: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., 3, H, W) CLIP-normalised float -> (..., 3, H, W) uint8 by rounding.

    Exact for tensors that came from uint8 pixels: float32 round-off is ~1e-4
    of a level, far from the 0.5 that rounding needs.
    """
    out = torch.empty(normalized.shape, dtype=torch.uint8, device=normalized.device)
    for c in range(3):  # one channel at a time keeps the float temporaries small
        levels = normalized[..., c, :, :] * std[c]
        out[..., c, :, :] = levels.add_(mean[c]).mul_(255).round_().clamp_(0, 255)
    return out


def gray_bins(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> (..., H, W) int32 histogram bin in [0, 510).

    bin = floor(2 * (0.2989 R + 0.5870 G + 0.1140 B)), in exact integer arithmetic.
    """
    wr, wg, wb = LUMA_WEIGHTS_1E4
    acc = rgb[..., 0, :, :].to(torch.int32).mul_(wr)  # one channel at a time: small temporaries
    acc.add_(rgb[..., 1, :, :].to(torch.int32).mul_(wg))
    acc.add_(rgb[..., 2, :, :].to(torch.int32).mul_(wb))
    return acc.floor_divide_(LUMA_BIN_DIVISOR)


@functools.lru_cache(maxsize=32)
def _log2_fixed_table(n: int, device: torch.device) -> torch.Tensor:
    """(n + 1,) int64: round(log2(c) * 2**ENTROPY_FIXED_POINT_BITS), computed once on the CPU."""
    c = np.arange(n + 1, dtype=np.float64)
    table = np.round(np.log2(np.maximum(c, 1)) * 2.0**ENTROPY_FIXED_POINT_BITS)
    return torch.from_numpy(table.astype(np.int64)).to(device)


def _patch_pixels(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, T, H, W) -> (B, rows, cols, T * p * p): each patch's pixels, zero-padded past the edge."""
    b, t, h, w = x.shape
    rows, cols = grid_shape(h, w, patch_size)
    if rows * patch_size != h or cols * patch_size != w:
        x = F.pad(x, (0, cols * patch_size - w, 0, rows * patch_size - h))
    cells = x.view(b, t, rows, patch_size, cols, patch_size).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, rows, cols, t * patch_size * patch_size)


def patch_entropy(bins: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Shannon entropy in bits of each patch's 512-bin histogram.

    bins: (B, T, H, W) integer bins; the T frames of a temporal patch share one
    histogram (T = 1 for images). Pixels past the right/bottom edge count as
    zero padding (bin 0), as in the APT reference.
    Returns (B, rows, cols) float64, bit-identical on every device.

    H = log2 N - (1/N) sum_b c_b log2 c_b = (1/N) sum_pixels (log2 N - log2 c_bin(pixel)),
    with N = T * patch_size**2 and the counts c by scatter-add (no one-hot tensor).
    """
    cells = _patch_pixels(bins, patch_size)
    b, rows, cols, n = cells.shape
    num_patches = b * rows * cols
    offsets = torch.arange(num_patches, device=bins.device, dtype=torch.int64).mul_(ENTROPY_BINS)
    keys = cells.reshape(num_patches, n).to(torch.int64).add_(offsets[:, None])  # flat (patch, bin)
    del cells
    counts = torch.zeros(num_patches * ENTROPY_BINS, dtype=torch.int32, device=bins.device)
    counts.scatter_add_(0, keys.view(-1), torch.ones(1, dtype=torch.int32, device=bins.device).expand(keys.numel()))
    own_count = counts.gather(0, keys.view(-1))  # per pixel: how many pixels of its patch share its bin
    del counts
    own_count = keys.view(-1).copy_(own_count)  # widened to int64 in the keys' buffer, no longer needed
    del keys
    table = _log2_fixed_table(n, bins.device)
    per_pixel = table.gather(0, own_count).view(num_patches, n)  # fixed-point log2 c
    del own_count
    deficit = table[n] * n - per_pixel.sum(dim=1)  # exact int64: N * H * 2**fixed_bits
    scale = float(n * 2 ** (ENTROPY_FIXED_POINT_BITS - ENTROPY_QUANTUM_BITS))
    entropy = torch.round(deficit.to(torch.float64) / scale) / 2.0**ENTROPY_QUANTUM_BITS
    return entropy.view(b, rows, cols)


def _gray_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) uint8 -> (B, T, H, W) float64 luma in [0, 1]."""
    x = images_u8.to(torch.float64) / 255
    wr, wg, wb = LUMA_WEIGHTS
    return wr * x[:, :, 0] + wg * x[:, :, 1] + wb * x[:, :, 2]


def _aggregate(values: torch.Tensor, patch_size: int, how: str) -> torch.Tensor:
    """(B, T, H, W) per-pixel scores -> (B, rows, cols) per patch (zero padding counts)."""
    cells = _patch_pixels(values, patch_size)
    if how == "mean":
        return cells.mean(dim=-1)
    if how == "max":
        return cells.amax(dim=-1)
    if how == "std":
        return cells.std(dim=-1)  # unbiased, as torch.std in the reference
    raise ValueError(f"unknown aggregate {how!r}")


def score_entropy(images_u8: torch.Tensor, patch_sizes: Sequence[int], aggregate: str) -> dict[int, torch.Tensor]:
    bins = gray_bins(images_u8)
    return {ps: patch_entropy(bins, ps) for ps in patch_sizes}


def score_laplacian(images_u8: torch.Tensor, patch_sizes: Sequence[int], aggregate: str) -> dict[int, torch.Tensor]:
    """|8-neighbour Laplacian| of [0, 1] grayscale (reflect padding), aggregated per patch."""
    gray = _gray_unit(images_u8)
    b, t, h, w = gray.shape
    kernel = torch.tensor(LAPLACIAN_KERNEL, dtype=gray.dtype, device=gray.device).view(1, 1, 3, 3)
    flat = F.pad(gray.reshape(b * t, 1, h, w), (1, 1, 1, 1), mode="reflect" if min(h, w) > 1 else "replicate")
    response = F.conv2d(flat, kernel).abs().view(b, t, h, w)
    return {ps: _aggregate(response, ps, aggregate) for ps in patch_sizes}


def score_upsample_mse(images_u8: torch.Tensor, patch_sizes: Sequence[int], aggregate: str) -> dict[int, torch.Tensor]:
    """Mean squared error of a bilinear down-and-up resampling by 0.5**scale, mean per patch."""
    x = images_u8.to(torch.float64) / 255
    b, t, c, h, w = x.shape
    flat = x.reshape(b * t, c, h, w)
    maps = {}
    for i, ps in enumerate(patch_sizes):
        factor = 0.5**i
        if factor == 1.0:
            error = torch.zeros((b, t, h, w), dtype=x.dtype, device=x.device)
        else:
            down = F.interpolate(flat, scale_factor=factor, mode="bilinear", align_corners=False)
            up = F.interpolate(down, scale_factor=1 / factor, mode="bilinear", align_corners=False)
            if up.shape[-2:] != (h, w):
                up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
            error = ((flat - up) ** 2).mean(dim=1).view(b, t, h, w)
        maps[ps] = _aggregate(error, ps, "mean")
    return maps


# name -> (scorer, what its scores are, for colour bars). Only entropy is integer-exact
# and bit-identical across devices; the others are float64 arithmetic.
SCORERS: dict[str, tuple[Callable[..., dict[int, torch.Tensor]], str]] = {
    "entropy": (score_entropy, "entropy (bits)"),
    "laplacian": (score_laplacian, "|Laplacian| of [0,1] gray"),
    "upsample_mse": (score_upsample_mse, "down-up resampling MSE"),
}
AGGREGATES = ("mean", "max", "std")


def select_patches(maps: Mapping[int, torch.Tensor], thresholds: Sequence[float]) -> dict[int, torch.Tensor]:
    """APT's patch choice from importance maps (smallest patch size first).

    From the largest scale down, a patch of scale i >= 1 is chosen where its
    score < thresholds[i-1] and no larger chosen patch covers it; every base
    cell not covered is a base patch. NaN (padded) cells are never chosen.
    Returns {patch size: (..., rows, cols) bool}; the chosen patches tile the grid once.
    """
    sizes = sorted(maps)
    if len(thresholds) != len(sizes) - 1:
        raise ValueError(f"{len(sizes)} scales need {len(sizes) - 1} thresholds, got {len(thresholds)}")
    masks: dict[int, torch.Tensor] = {}
    covered = None
    for i in range(len(sizes) - 1, -1, -1):
        scores = maps[sizes[i]]
        rows, cols = scores.shape[-2:]
        if covered is None:
            covered = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        else:
            covered = covered.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., :rows, :cols]
        chosen = ~covered if i == 0 else (scores < thresholds[i - 1]) & ~covered
        masks[sizes[i]] = chosen
        covered = covered | chosen
    return {ps: masks[ps] for ps in sizes}


class PatchTokenizer:
    """Multi-scale importance maps and APT masks for CLIP-normalised images.

    Works on whatever device its input lives on; scales are base_patch_size * 2**i
    for i < num_scales.
    """

    def __init__(
        self,
        num_scales: int = 3,
        base_patch_size: int = 14,
        thresholds: Sequence[float] = (3.0, 2.0),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        method: str = "entropy",
        aggregate: str = "mean",
    ):
        if len(thresholds) != num_scales - 1:
            raise ValueError(f"{num_scales} scales need {num_scales - 1} thresholds, got {len(thresholds)}")
        if method not in SCORERS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(SCORERS)}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; choose from {AGGREGATES}")
        self.num_scales = num_scales
        self.base_patch_size = base_patch_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.method = method
        self.aggregate = aggregate

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        return tuple(self.base_patch_size * 2**i for i in range(self.num_scales))

    @torch.inference_mode()
    def compute_importance_maps(self, normalized_images: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, 3, H, W) or (B, T, 3, H, W) normalised -> {patch size: (B, rows, cols) float64}.

        The uint8 pixels are recovered by rounding, then scored by importance_from_uint8.
        """
        x = normalized_images
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"expected (B, 3, H, W) or (B, T, 3, H, W), got {tuple(normalized_images.shape)}")
        return self.importance_from_uint8(recover_uint8(x, self.mean, self.std))

    @torch.inference_mode()
    def importance_from_uint8(self, images_u8: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, T, 3, H, W) uint8 RGB -> {patch size: (B, rows, cols) float64}.

        The T frames of each temporal patch are scored together (one histogram per
        tube; T = 1 for images). Padded edge cells are NaN. Same result as
        compute_importance_maps on the normalised pixels, without the round trip.
        """
        if images_u8.dim() != 5 or images_u8.shape[2] != 3 or images_u8.dtype != torch.uint8:
            raise ValueError(f"expected uint8 (B, T, 3, H, W), got {images_u8.dtype} {tuple(images_u8.shape)}")
        scorer = SCORERS[self.method][0]
        h, w = images_u8.shape[-2:]
        maps = {}
        for ps, m in scorer(images_u8, self.patch_sizes, self.aggregate).items():
            pad = torch.from_numpy(padded_cells(h, w, ps)).to(m.device)
            maps[ps] = m.to(torch.float64).masked_fill(pad, float("nan"))
        return maps

    @torch.inference_mode()
    def construct_masks(self, maps: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{patch size: scores} -> {patch size: bool mask of chosen patches}."""
        return select_patches(maps, self.thresholds)


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


# ---------------------------------------------------------------------------
# 4. Rendering (pure: arrays in, images out; nothing touches the disk)
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def color_range(values: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) over the finite cells only, widened when all are equal."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(...) float -> (..., 3) uint8 inferno colours over [vmin, vmax]; NaN -> the padded colour."""
    finite = np.isfinite(values)
    level = np.zeros(values.shape, dtype=np.int64)
    level[finite] = np.clip(np.round((values[finite] - vmin) / (vmax - vmin) * 255), 0, 255)
    rgb = INFERNO[level]
    rgb[~finite] = PADDED_CELL_RGB
    return rgb


def nice_ticks(lo: float, hi: float, max_ticks: int = 7) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) inside [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, max_ticks - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def format_tick(value: float) -> str:
    return f"{value:.4g}"


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = font(size).getbbox(text)
    return right - left, bottom - top


def _draw_vertical_text(canvas: Image.Image, text: str, center: tuple[float, float], size: int) -> None:
    """Text rotated 90 degrees counter-clockwise, centred on `center`."""
    w, h = _text_size(text, size)
    tile = Image.new("RGBA", (w + 4, h + 8), (255, 255, 255, 0))
    ImageDraw.Draw(tile).text((2, 2), text, font=font(size), fill=(0, 0, 0, 255))
    tile = tile.rotate(90, expand=True)
    canvas.paste(tile, (int(center[0] - tile.width / 2), int(center[1] - tile.height / 2)), tile)


def _dashed_line(draw: ImageDraw.ImageDraw, start, end, fill, width=1, dash=6) -> None:
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    for s in np.arange(0, length, 2 * dash):
        e = min(s + dash, length)
        draw.line([(x0 + (x1 - x0) * s / length, y0 + (y1 - y0) * s / length),
                   (x0 + (x1 - x0) * e / length, y0 + (y1 - y0) * e / length)], fill=fill, width=width)


@dataclass(frozen=True)
class HeatmapGeometry:
    """Pixel layout of a heatmap picture; cells are `cell` x `cell` px squares."""

    cell: int
    left: int
    top: int
    map_w: int
    map_h: int
    width: int
    height: int


HEATMAP_MAP_BOX = (600, 720)  # the map fits in this many pixels (w, h) when cells allow


def heatmap_geometry(rows: int, cols: int, legend_lines: int = 2) -> HeatmapGeometry:
    cell = max(1, min(HEATMAP_MAP_BOX[0] // cols, HEATMAP_MAP_BOX[1] // rows))
    map_w, map_h = cols * cell, rows * cell
    left, top, right = 70, 62, 150
    bottom = 56 + 22 * legend_lines + 8
    return HeatmapGeometry(cell, left, top, map_w, map_h, left + max(map_w, 330) + right, top + max(map_h, 160) + bottom)


def heatmap_map_box(rows: int, cols: int) -> tuple[int, int, int, int]:
    """Where the map lies in a rendered heatmap: (x0, y0, x1, y1) pixels from the top left."""
    g = heatmap_geometry(rows, cols)
    return g.left, g.top, g.left + g.map_w, g.top + g.map_h


def render_heatmap(
    values: np.ndarray,
    patch_size: int,
    image_size: tuple[int, int],
    threshold: float | None = None,
    chosen: int | None = None,
    label: str = "entropy (bits)",
) -> Image.Image:
    """One square cell per patch, inferno over the finite range, padded cells apart.

    values: (rows, cols) float, NaN for padded cells; image_size: (H, W) of the
    resized image in px; threshold: marked on the colour bar (scales >= 1);
    chosen: patches of this size in the APT tiling, for the title.
    """
    rows, cols = values.shape
    height, width = image_size
    g = heatmap_geometry(rows, cols)
    vmin, vmax = color_range(values)
    canvas = Image.new("RGB", (g.width, g.height), "white")
    draw = ImageDraw.Draw(canvas)
    cells = np.repeat(np.repeat(colorize(values, vmin, vmax), g.cell, axis=0), g.cell, axis=1)
    canvas.paste(Image.fromarray(cells), (g.left, g.top))
    draw.rectangle([g.left - 1, g.top - 1, g.left + g.map_w, g.top + g.map_h], outline="black")
    px = g.cell / patch_size  # picture pixels per image pixel
    has_padding = bool(np.isnan(values).any())
    if has_padding:  # the image edge inside the padded cells
        xe, ye = g.left + width * px, g.top + height * px
        if xe < g.left + g.map_w - 1:
            _dashed_line(draw, (xe, g.top), (xe, min(ye, g.top + g.map_h)), fill="black")
        if ye < g.top + g.map_h - 1:
            _dashed_line(draw, (g.left, ye), (min(xe, g.left + g.map_w), ye), fill="black")

    # axes in px of the resized image
    small = font(12)
    for x in nice_ticks(0, cols * patch_size, 7):
        sx = g.left + x * px
        draw.line([(sx, g.top + g.map_h), (sx, g.top + g.map_h + 5)], fill="black")
        draw.text((sx, g.top + g.map_h + 7), format_tick(x), font=small, fill="black", anchor="mt")
    for y in nice_ticks(0, rows * patch_size, 7):
        sy = g.top + y * px
        draw.line([(g.left - 5, sy), (g.left, sy)], fill="black")
        draw.text((g.left - 8, sy), format_tick(y), font=small, fill="black", anchor="rm")
    draw.text((g.left + g.map_w / 2, g.top + g.map_h + 26), "x (px of the resized image)", font=small,
              fill="black", anchor="mt")
    _draw_vertical_text(canvas, "y (px)", (16, g.top + g.map_h / 2), 12)
    title = f"Importance at {patch_size}x{patch_size} px: grid {cols} x {rows} patches"
    draw.text((g.left + g.map_w / 2, 10), title, font=font(15), fill="black", anchor="mt")
    if chosen is not None:
        draw.text((g.left + g.map_w / 2, 32), f"{chosen} patches of this size in the APT tiling",
                  font=font(13), fill=(60, 60, 60), anchor="mt")

    # colour bar with the threshold
    bx, bw = g.left + g.map_w + 26, 22
    ramp = INFERNO[np.linspace(255, 0, g.map_h).round().astype(int)]
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None, :], bw, axis=1)), (bx, g.top))
    draw.rectangle([bx - 1, g.top - 1, bx + bw, g.top + g.map_h], outline="black")
    to_y = lambda v: g.top + (vmax - v) / (vmax - vmin) * (g.map_h - 1)  # noqa: E731
    for v in nice_ticks(vmin, vmax, 7):
        draw.line([(bx + bw, to_y(v)), (bx + bw + 5, to_y(v))], fill="black")
        draw.text((bx + bw + 8, to_y(v)), format_tick(v), font=small, fill="black", anchor="lm")
    _draw_vertical_text(canvas, label, (bx + bw + 62, g.top + g.map_h / 2), 13)
    legend = []
    if threshold is not None:
        inside = vmin <= threshold <= vmax
        if inside:
            y = to_y(threshold)
            draw.rectangle([bx - 6, y - 2, bx + bw + 6, y + 1], fill=THRESHOLD_RGB, outline="black")
        where = "" if inside else (" (below the range)" if threshold < vmin else " (above the range)")
        legend.append(("threshold", f"threshold {threshold:g}{where}: cells below it merge"))
    if has_padding:
        legend.append(("padded", "padded edge cell: extends past the image edge (dashed), never merged"))
    y = g.top + g.map_h + 50
    for kind, text in legend:
        if kind == "threshold":
            draw.rectangle([12, y + 5, 40, y + 9], fill=THRESHOLD_RGB, outline="black")
        else:
            draw.rectangle([12, y, 40, y + 14], fill=PADDED_CELL_RGB, outline="black")
        draw.text((48, y + 7), text, font=small, fill="black", anchor="lm")
        y += 22
    return canvas


def patch_id_maps(masks: Mapping[int, np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (patch id, scale index) maps, both (H, W) int32, from per-scale masks."""
    ids = np.full((height, width), -1, dtype=np.int32)
    scale_of = np.full((height, width), -1, dtype=np.int32)
    offset = 0
    for k, ps in enumerate(sorted(masks)):
        mask = masks[ps]
        rows, cols = mask.shape
        cell_ids = np.where(mask, offset + np.arange(rows * cols, dtype=np.int32).reshape(rows, cols), -1)
        pixel_ids = np.repeat(np.repeat(cell_ids, ps, axis=0), ps, axis=1)[:height, :width]
        chosen = pixel_ids >= 0
        ids[chosen] = pixel_ids[chosen]
        scale_of[chosen] = k
        offset += rows * cols
    return ids, scale_of


def border_mask(ids: np.ndarray, thickness: int) -> np.ndarray:
    """(H, W) bool: pixels on a patch boundary, each boundary drawn once.

    An interior boundary is a line `thickness` px wide centred on the edge
    between two patches; the image's outer edge gets a line of the same width
    inside the image.
    """
    h, w = ids.shape
    out = np.zeros((h, w), dtype=bool)
    t = max(1, min(thickness, h, w))
    before, after = t // 2, t - t // 2
    vert = ids[:, 1:] != ids[:, :-1]  # edge at x = 1 .. w-1, between columns x-1 and x
    horiz = ids[1:, :] != ids[:-1, :]
    for d in range(-before, after):
        # column x + d gets the edge at x, for x in 1 .. w-1
        lo, hi = max(0, 1 + d), min(w, w + d)
        if lo < hi:
            out[:, lo:hi] |= vert[:, lo - d - 1 : hi - d - 1]
        lo, hi = max(0, 1 + d), min(h, h + d)
        if lo < hi:
            out[lo:hi, :] |= horiz[lo - d - 1 : hi - d - 1, :]
    out[:, :t] = out[:, w - t :] = True
    out[:t, :] = out[h - t :, :] = True
    return out


def draw_patch_borders(
    rgb: np.ndarray,
    masks: Mapping[int, np.ndarray],
    color: tuple[int, int, int] = BORDER_GREEN,
    thickness: int = BORDER_THICKNESS,
    scale_colors: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 image with the chosen patches' outlines -> new (H, W, 3) uint8.

    With scale_colors, each side of a boundary takes the colour of the scale of
    the patch it lies in; otherwise every line is `color`.
    """
    h, w = rgb.shape[:2]
    ids, scale_of = patch_id_maps(masks, h, w)
    lines = border_mask(ids, thickness)
    out = rgb.copy()
    if scale_colors is None:
        out[lines] = color
    else:
        palette = np.asarray(scale_colors, dtype=np.uint8)
        out[lines] = palette[scale_of[lines] % len(palette)]
    return out


def scale_palette(count: int) -> list[tuple[int, int, int]]:
    return [SCALE_COLORS[i % len(SCALE_COLORS)] for i in range(count)]


def add_scale_legend(image: Image.Image, counts: Mapping[int, int], colors: Sequence[tuple[int, int, int]]) -> Image.Image:
    """The image with a strip below naming each scale's border colour and patch count."""
    strip_h = 30
    out = Image.new("RGB", (image.width, image.height + strip_h), (24, 24, 24))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    x = 8
    for color, (ps, n) in zip(colors, sorted(counts.items())):
        draw.rectangle([x, image.height + 9, x + 22, image.height + 21], outline=color, width=3)
        text = f"{ps} px: {n}"
        draw.text((x + 30, image.height + 15), text, font=font(13), fill="white", anchor="lm")
        x += 30 + _text_size(text, 13)[0] + 22
    return out


def _gradient_strip(width: int, vmin: float, vmax: float, caption: str) -> Image.Image:
    """A 28 px strip: caption, min, an inferno ramp, max."""
    strip = Image.new("RGB", (width, 28), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    lo, hi = format_tick(vmin), format_tick(vmax)
    x = 8
    draw.text((x, 14), caption, font=font(13), fill="white", anchor="lm")
    x += _text_size(caption, 13)[0] + 12
    draw.text((x, 14), lo, font=font(13), fill="white", anchor="lm")
    x += _text_size(lo, 13)[0] + 6
    ramp_w = max(40, min(240, width - x - _text_size(hi, 13)[0] - 20))
    ramp = INFERNO[np.linspace(0, 255, ramp_w).round().astype(int)]
    strip.paste(Image.fromarray(np.repeat(ramp[None], 14, axis=0)), (x, 7))
    draw.text((x + ramp_w + 6, 14), hi, font=font(13), fill="white", anchor="lm")
    return strip


def blend_importance(rgb: np.ndarray, values: np.ndarray, patch_size: int, vmin: float, vmax: float) -> np.ndarray:
    """(H, W, 3) uint8 image with each cell's colour over it at OVERLAY_ALPHA -> (H, W, 3) uint8.

    Integer arithmetic: (w_image * pixel + w_cell * colour) / OVERLAY_WEIGHT, rounded half up.
    """
    h, w = rgb.shape[:2]
    rows, cols = values.shape
    colors = colorize(values, vmin, vmax).astype(np.uint16) * OVERLAY_CELL_WEIGHT
    out = rgb.astype(np.uint16) * (OVERLAY_WEIGHT - OVERLAY_CELL_WEIGHT) + OVERLAY_WEIGHT // 2
    # add each cell's weighted colour to its block of pixels through a (rows, p, cols, p, 3) view
    full = np.zeros((rows * patch_size, cols * patch_size, 3), dtype=np.uint16)
    full.reshape(rows, patch_size, cols, patch_size, 3)[...] = colors[:, None, :, None, :]
    out += full[:h, :w]
    out //= OVERLAY_WEIGHT
    return out.astype(np.uint8)


def render_importance_overlay(rgb: np.ndarray, values: np.ndarray, patch_size: int, label: str) -> Image.Image:
    """The importance map of one scale blended over the resized image, with a colour key below."""
    vmin, vmax = color_range(values)
    blended = Image.fromarray(blend_importance(rgb, values, patch_size, vmin, vmax))
    out = Image.new("RGB", (blended.width, blended.height + 28))
    out.paste(blended, (0, 0))
    out.paste(_gradient_strip(blended.width, vmin, vmax, f"{patch_size} px {label}"), (0, blended.height))
    return out


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR)


def render_summary_panel(
    title: str,
    original: Image.Image,
    original_size: tuple[int, int],
    overlay: np.ndarray,
    maps: Mapping[int, np.ndarray],
    lines: Sequence[str],
    label: str,
) -> Image.Image:
    """One picture for a report: original, the final patches, the key numbers, each scale's map.

    original: a (possibly downscaled) copy of the input, original_size its true (W, H).
    """
    tile_w, tile_h, gap, head = 340, 380, 16, 46
    sizes = sorted(maps)
    columns = max(3, len(sizes))
    width = columns * tile_w + (columns + 1) * gap
    height = head + 2 * (tile_h + 26) + 3 * gap
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((gap, 14), title, font=font(18), fill="black")

    def put(image: Image.Image, col: int, row: int, caption: str) -> None:
        x = gap + col * (tile_w + gap)
        y = head + row * (tile_h + 26 + gap)
        fitted = _fit(image, tile_w, tile_h)
        panel.paste(fitted, (x + (tile_w - fitted.width) // 2, y))
        draw.text((x + tile_w / 2, y + tile_h + 4), caption, font=font(13), fill="black", anchor="mt")

    put(original, 0, 0, f"original {original_size[0]} x {original_size[1]}")
    put(Image.fromarray(overlay), 1, 0, f"APT patches on the resized {overlay.shape[1]} x {overlay.shape[0]}")
    x, y = gap + 2 * (tile_w + gap) + 6, head + 4
    for line in lines:
        draw.text((x, y), line, font=font(14), fill="black")
        y += 22
    for col, ps in enumerate(sizes):
        vmin, vmax = color_range(maps[ps])
        cells = colorize(maps[ps], vmin, vmax)
        rows, cols = cells.shape[:2]
        cell = max(1, min(tile_w // cols, tile_h // rows))
        image = Image.fromarray(np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1))
        put(image, col, 1, f"{ps} px {label}: {format_tick(vmin)} .. {format_tick(vmax)}")
    return panel


def _figure_png(fig) -> bytes:
    """A matplotlib Figure (object API, no pyplot state) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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


def render_batch_summary_plot(rows: Sequence[Mapping], thresholds_text: str) -> bytes:
    """Retained-ratio histogram and APT vs uniform patches per image (PNG bytes)."""
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["status"] in ("ok", "reused")]
    ratios = np.array([r["retained_ratio"] for r in ok], dtype=float)
    uniform = np.array([r["uniform_patches"] for r in ok], dtype=float)
    apt = np.array([r["apt_patches"] for r in ok], dtype=float)
    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    if ratios.size:
        left.hist(ratios, bins=min(30, max(5, ratios.size // 3)), range=(0, 1), color="#4c72b0", edgecolor="white")
        for value, name, style in ((ratios.mean(), "mean", "-"), (np.median(ratios), "median", "--")):
            left.axvline(value, color="black", linestyle=style, label=f"{name} {value:.3f}")
        left.legend()
        right.scatter(uniform, apt, s=14, alpha=0.7, color="#dd8452")
        top = max(uniform.max(), 1) * 1.05
        right.plot([0, top], [0, top], color="gray", linestyle="--", linewidth=1, label="no saving (APT = uniform)")
        right.plot([0, top], [0, top * ratios.mean()], color="black", linewidth=1,
                   label=f"mean ratio {ratios.mean():.3f}")
        right.set_xlim(0, top)
        right.set_ylim(0, top)
        right.legend(loc="upper left")
    left.set_xlim(0, 1)
    left.set_xlabel("retained ratio (APT patches / uniform patches)")
    left.set_ylabel("images")
    left.set_title(f"Retained ratio over {ratios.size} images")
    right.set_xlabel("uniform patches (Qwen2-VL ViT tokens without APT)")
    right.set_ylabel("APT patches")
    right.set_title("APT vs uniform patches per image")
    fig.suptitle(f"APT summary ({thresholds_text})")
    return _figure_png(fig)


# Characters that would break a line of text: C0 and C1 controls, DEL, the Unicode line and paragraph
# separators, and lone surrogates (a file name's undecodable bytes, which UTF-8 text cannot hold).
ONE_LINE_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
ONE_LINE_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0xD800, 0xE000))})
ONE_LINE_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def one_line(text: str) -> str:
    """text with those characters written as visible escapes (\\n, \\x1b, \\u2028, \\udcff), so that a
    file name or an error prints as one line and encodes as UTF-8; other text is unchanged."""
    return text.translate(ONE_LINE_ESCAPES)


# ---------------------------------------------------------------------------
# 5. Input and output
# ---------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB as Qwen2-VL's processor (transformers convert_to_rgb) does:
    transparency composited onto white, everything else by Image.convert."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_input_file(path: Path) -> None:
    if not path.exists():
        raise ToolError(f"{path}: no such file")
    if path.is_dir():
        raise ToolError(f"{path}: is a directory, expected a file")
    if path.stat().st_size == 0:
        raise ToolError(f"{path}: file is empty")


def load_image(path: Path) -> Image.Image:
    """Decode the first frame, apply the EXIF orientation, convert to RGB.

    Raises ToolError naming the path for every way a file can fail to be an image; PIL's
    warnings about a damaged file (such as corrupt EXIF data) become one logged line.
    """
    check_input_file(path)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                image.load()
                mode = image.mode
                rgb = to_rgb(ImageOps.exif_transpose(image))
                rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ToolError(f"{path}: image too large, refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ToolError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ToolError(f"{path}: cannot decode image ({exc})") from None
    finally:
        # Pillow warns (e.g. 'Corrupt EXIF data') about metadata it skipped or a file it read in a
        # fallback way, and decodes the image all the same: one debug line each, naming the file
        for text in dict.fromkeys(str(w.message).strip() for w in caught):
            logger.debug(f"{path}: {text}")
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        logger.warning(f"{path}: {mode} image; values above 255 clip to white, as in Qwen2-VL's processor")
    return rgb


def sample_image_path() -> Path:
    """The sample photo shipped in apt_vis/data/, for a first run with no file at hand: a Vermeer whose
    plain background merges at the default thresholds."""
    return Path(__file__).resolve().parent / "apt_vis" / "data" / SAMPLE_IMAGE


def sniff_kind(path: Path) -> str | None:
    """'image' or 'video' from the file's first bytes, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n" or head[:6] in (b"GIF87a", b"GIF89a"):
        return "image"
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "video"
    return None


def kind_of(path: Path) -> str | None:
    """'image' or 'video' by extension, else by content; None for other files."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    return sniff_kind(path)


@dataclass(frozen=True)
class Job:
    """One input file and where its outputs go."""

    path: Path  # the file to read
    label: str  # how summaries name it: its path relative to the input root
    out_dir: Path  # this input's output folder
    kind: str  # 'image' or 'video'


@dataclass
class Discovery:
    jobs: list[Job]
    skipped: int  # files that are neither images nor videos
    flat: bool  # a single file: outputs directly in the output directory
    failed: list[tuple[str, str]]  # (label, one-line reason): entries found that cannot be read
    hidden: int  # hidden entries skipped (names starting with "."; a hidden folder counts once)


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _inside(path: str, folder: str) -> bool:
    """Whether the real path lies in (or is) the real folder."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (one line naming the link), or None."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symbolic link loop"
        return f"{path}: cannot follow symbolic link ({exc.strerror or exc})"
    return None


def _walk(folder: Path, exclude: str, failed: list[tuple[Path, str]], hidden: list[Path],
          above: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Files under folder, sorted, depth first. Links to files and folders are followed and the
    paths keep the link's name; a folder link back into a folder being searched (or one in
    above, real paths) is a loop. Skips the output directory (real path exclude); hidden
    entries go to hidden (their insides unread), unreadable folders, link loops and broken
    links to failed as (path, reason)."""
    stack = [(folder, above | {os.path.realpath(folder)})]  # (folder, real paths of it and its ancestors)
    while stack:
        here, ancestors = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            failed.append((here, f"{here}: cannot read folder ({exc.strerror or exc})"))
            continue
        folders = []
        for entry in entries:
            path = here / entry.name
            if entry.name.startswith("."):
                hidden.append(path)
                continue
            try:
                is_dir = entry.is_dir()  # follows links; False for broken ones
            except OSError:
                is_dir = False
            if not is_dir:
                problem = _link_problem(path) if entry.is_symlink() else None
                if problem is None:
                    yield path
                else:
                    failed.append((path, problem))
                continue
            real = os.path.realpath(path)
            if real == exclude:
                continue
            if real in ancestors:
                failed.append((path, f"{path}: symbolic link loop (leads back to {real})"))
                continue
            folders.append((path, ancestors | {real}))
        stack.extend(reversed(folders))


def _loop_on_the_way(path: Path, root: Path, real: Callable[[str], str]) -> tuple[Path | None, frozenset[str]]:
    """For a folder below root: the first folder on the way down from root (itself included)
    that leads back to one before it, if any, and the real paths of those folders.
    glob.glob follows folder links, so a loop yields the same files again and again."""
    folder, reals = root, {real(str(root))}
    for part in Path(os.path.relpath(path, root)).parts:
        folder = folder / part
        here = real(str(folder))
        if here in reals:
            return folder, frozenset(reals)
        reals.add(here)
    return None, frozenset(reals)


def _keyed(path: Path, root: Path) -> tuple[str, str]:
    """(key, root key): the input root's real path, and the path below it as found (link names
    kept, so two links to one file are two inputs). Keys identify inputs and give their labels."""
    root_key = os.path.realpath(root)
    relative = os.path.normpath(os.path.relpath(path, root))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):  # a glob such as 'a/*/../../x'
        root_key = os.path.realpath(path.parent)
        relative = path.name
    return os.path.join(root_key, relative), root_key


def discover(inputs: Sequence[str], out_root: Path) -> Discovery:
    """Expand files, folders (recursively) and glob patterns into jobs.

    A single existing file keeps the flat layout; anything else gets one
    folder per input mirroring its path (full file name included) relative to
    the inputs' common root. Raises ToolError for inputs that match nothing.
    Entries that cannot be read (unreadable folders, broken links, link loops)
    become Discovery.failed rather than errors.
    """
    if len(inputs) == 1 and Path(inputs[0]).is_file():
        path = Path(inputs[0])
        return Discovery([Job(path, str(path), out_root, kind_of(path) or "image")], 0, True, [], 0)
    exclude = os.path.realpath(out_root)
    found: list[tuple[Path, str, str, str]] = []  # (file, key, root key, kind)
    problems: list[tuple[str, str, str]] = []  # (key, root key, reason)
    hidden: list[Path] = []
    skipped = 0
    for text in inputs:
        path = Path(text)
        failed: list[tuple[Path, str]] = []
        if path.is_file():
            candidates, root = [path], path.parent
        elif path.is_dir():
            if _inside(os.path.realpath(path), exclude):
                raise ToolError(f"{text}: is inside the output directory {out_root}; choose an -o outside it")
            candidates, root = list(_walk(path, exclude, failed, hidden)), path
            if failed and failed[0][0] == path:  # the folder itself is unreadable: as for a missing one
                raise ToolError(failed[0][1])
        elif glob.has_magic(text):
            root = _glob_root(text)
            candidates = []
            real = functools.lru_cache(maxsize=None)(os.path.realpath)
            for match in sorted(glob.glob(text, recursive=True)):
                m = Path(match)
                if _inside(real(match), exclude):
                    continue  # the outputs are never inputs
                is_dir = m.is_dir()
                loop, above = _loop_on_the_way(m if is_dir else m.parent, root, real)
                if loop is not None:
                    failed.append((loop, f"{loop}: symbolic link loop (leads back to {real(str(loop))})"))
                elif is_dir:
                    candidates.extend(_walk(m, exclude, failed, hidden, above))
                elif m.is_file():
                    candidates.append(m)
                elif (problem := _link_problem(m)) is not None:
                    failed.append((m, problem))
            if not candidates and not failed:
                raise ToolError(f"{text}: no files match")
        else:
            raise ToolError(_link_problem(path) or f"{text}: no such file or directory")
        usable = 0
        for candidate in candidates:
            kind = kind_of(candidate)
            if kind is None:
                skipped += 1
            else:
                found.append((candidate, *_keyed(candidate, root), kind))
                usable += 1
        problems += [(*_keyed(p, root), reason) for p, reason in failed]
        if usable == 0 and not failed:
            raise ToolError(f"{text}: no images or videos found ({len(candidates)} other files skipped)")
    common = os.path.commonpath([r for _, _, r, _ in found] + [r for _, r, _ in problems])
    jobs, seen = [], set()
    for path, key, _, kind in found:
        if key in seen:
            continue
        seen.add(key)
        relative = Path(os.path.relpath(key, common))
        jobs.append(Job(path, relative.as_posix(), out_root / relative, kind))
    failures = {key: (Path(os.path.relpath(key, common)).as_posix(), reason) for key, _, reason in problems}
    hidden_keys = {os.path.join(os.path.realpath(p.parent), p.name) for p in hidden}
    return Discovery(jobs, skipped, False, list(failures.values()), len(hidden_keys))


def encode_png(image: Image.Image, compress_level: int = 3) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def encode_json(data: object) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()


def encode_csv(rows: Sequence[Mapping], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: one_line(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows)
    return buf.getvalue().encode()


def check_output_dir(out_dir: Path) -> None:
    """Fail early, leaving nothing behind, unless out_dir is (or can be made) a writable directory."""
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "output path" if probe == out_dir else f"{probe} (a parent of the output directory)"
        raise ToolError(f"{out_dir}: {where} exists and is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ToolError(f"{out_dir}: output directory is not writable ({exc.strerror or exc})") from None


STAGING_PREFIX = ".staging-"  # hidden folder where one input's outputs are written before they are renamed into place
LOCK_NAME = ".visualize_patches.lock"  # in the output directory while a run writes there; holds the run's PID


def _remove_empty_folders(folders: Iterable[Path]) -> None:
    """rmdir each folder that is empty, deepest first; anything with content stays."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


def _make_folders(out_dir: Path) -> list[Path]:
    """mkdir -p out_dir; the folders it created, so that a failure can remove them again."""
    created = []
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        created.append(probe)
        probe = probe.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    return created


class staged_output:
    """Context manager: a hidden staging folder inside out_dir whose files are renamed
    into out_dir when the block succeeds; when it fails (an error, a full disk, Ctrl-C), the
    staging folder and any folder this created are deleted, so a failed input leaves nothing.

    stats.json is renamed last (and an older one removed first): a folder with a stats.json
    is complete. Staging folders left by a killed run are removed first (the output lock makes
    sure no other run is writing there)."""

    def __init__(self, out_dir: Path, what: str = "outputs"):
        self.out_dir = out_dir
        self.what = what
        self.staging: Path | None = None
        self.created: list[Path] = []

    def __enter__(self) -> Path:
        try:
            self.created = _make_folders(self.out_dir)
            for stale in self.out_dir.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out_dir))
        except OSError as exc:
            _remove_empty_folders(self.created)
            raise ToolError(f"{self.out_dir}: cannot create output directory ({exc.strerror or exc})") from None
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                items = sorted(self.staging.iterdir(), key=lambda item: (item.name == "stats.json", item.name))
                if items and items[-1].name == "stats.json":
                    (self.out_dir / "stats.json").unlink(missing_ok=True)
                for item in items:
                    os.replace(item, self.out_dir / item.name)
            elif issubclass(exc_type, OSError):
                raise ToolError(f"{self.out_dir}: writing {self.what} failed ({exc.strerror or exc})") from None
        except OSError as err:
            raise ToolError(f"{self.out_dir}: writing {self.what} failed ({err.strerror or err})") from None
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            if exc_type is not None:
                _remove_empty_folders(self.created)


def write_files(out_dir: Path, files: Mapping[str, bytes], what: str = "outputs") -> None:
    """Write all files or none: stage them in a hidden folder, then rename into place."""
    with staged_output(out_dir, what) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)


class OutputLock:
    """An exclusive lock on the output directory for the whole run: flock on LOCK_NAME, which
    holds the PID. A second run stops with one line naming the first; the kernel drops the lock
    of a run that died, so its stale file is simply taken over. Creates the directory; on exit,
    removes the lock file and any folder it created that stayed empty."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> "OutputLock":
        try:
            self.created = _make_folders(self.out_dir)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    _remove_empty_folders(self.created)
                    raise ToolError(f"{self.out_dir}: another run of this tool is writing there (PID {owner}); "
                                    "wait for it to finish or choose another -o") from None
                try:  # a run that finished unlinks its lock file: make sure ours is still the one in place
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd = fd
                else:
                    os.close(fd)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            self.__exit__(None, None, None)
            raise ToolError(f"{self.out_dir}: cannot lock the output directory ({exc.strerror or exc})") from None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so no other run can be holding it
            os.close(self.fd)
            self.fd = None
        _remove_empty_folders(self.created)


BATCH_FILE_NAMES = ("summary.csv", "summary.json", "summary.png", "report.html")  # as write_summaries
BATCH_SWEEP_NAMES = ("threshold_sweep.csv", "threshold_sweep.png")  # batch sweeps always plot


def check_write_paths(found: Discovery, out_root: Path, settings: Settings, options: RenderOptions) -> None:
    """Before anything is written: ToolError unless every path the run writes (each input's
    output folder and the folders made on the way to it, every file in it, and in batch mode
    the summaries and sweep files) stays inside out_root, links followed, and is not an input
    nor (for folders) holds one. Staging folders and temporary files get fresh random names."""
    out_real = os.path.realpath(out_root)
    real_folder = functools.lru_cache(maxsize=None)(os.path.realpath)
    inputs: dict[str, Path] = {}  # real path -> input; a link counts as itself and as its target
    for job in found.jobs:
        entry = os.path.join(real_folder(str(job.path.parent)), job.path.name)
        inputs[entry] = job.path
        if os.path.islink(entry):
            inputs[os.path.realpath(entry)] = job.path
    holders: dict[str, Path] = {}  # every folder above an input -> that input
    for real, path in inputs.items():
        folder = os.path.dirname(real)
        while folder not in holders:
            holders[folder] = path
            folder, below = os.path.dirname(folder), folder
            if folder == below:
                break
    resolved: dict[str, str] = {}

    def child(parent: str, name: str) -> str:
        """parent (real) / name as a real path: one lstat, shared by siblings."""
        path = os.path.join(parent, name)
        if path not in resolved:
            resolved[path] = os.path.realpath(path) if os.path.islink(path) else path
        return resolved[path]

    def check(real: str, shown: Path, what: str, folder: bool) -> None:
        if not _inside(real, out_real):
            raise ToolError(f"{shown}: {what} would be written outside {out_root} through a symbolic link; "
                            "remove the link or choose another -o")
        if real in inputs:
            raise ToolError(f"{inputs[real]}: is one of the outputs ({what}) in {out_root}; choose another -o")
        if folder and real in holders:
            raise ToolError(f"{shown}: the {what} would hold the input {holders[real]}; choose another -o")

    def check_names(folder: str, shown: Path, names: Iterable[str], whose: str) -> None:
        """Only names already there can be an input or a link (one directory read, not a stat per name)."""
        try:
            with os.scandir(folder) as it:
                present = {e.name: e.is_symlink() for e in it}
        except OSError:  # not there yet (or unreadable: then writing fails with its own one line)
            return
        for name in names:
            if name in present:
                path = os.path.join(folder, name)
                check(os.path.realpath(path) if present[name] else path, shown / name, f"{name}{whose}", folder=True)

    names_of = {kind: output_names(kind, settings, options) for kind in ("image", "video")}
    check_names(out_real, out_root, (LOCK_NAME,), "")
    if found.flat:
        check_names(out_real, out_root, names_of[found.jobs[0].kind], "")
        return
    folders = set()
    for job in found.jobs:
        real, shown = out_real, out_root
        parts = Path(job.label).parts
        for k, part in enumerate(parts):
            real, shown = child(real, part), shown / part
            check(real, shown, f"output folder of {job.label}", folder=k == len(parts) - 1)
        folders.add(real)
        check_names(real, shown, names_of[job.kind], f" of {job.label}")
    batch_names = BATCH_FILE_NAMES + (BATCH_SWEEP_NAMES if options.sweep else ())
    check_names(out_real, out_root, batch_names, "")
    for name in batch_names:
        if os.path.join(out_real, name) in folders:
            raise ToolError(f"{out_root / name}: is both an input's output folder and a batch file; "
                            "rename that input or choose another -o")


def load_processor_settings(path: Path) -> dict:
    """Geometry and normalisation from a Qwen2-VL-family preprocessor_config.json
    (or a model folder holding one), read through transformers. Raises ToolError."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        raise ToolError("--processor needs transformers: pip install transformers") from None
    config = path / "preprocessor_config.json" if path.is_dir() else path
    if not config.is_file():
        raise ToolError(f"{config}: no such file (expected a preprocessor_config.json or a model folder)")
    try:
        values, _ = Qwen2VLImageProcessorPil.get_image_processor_dict(str(config))
        processor = Qwen2VLImageProcessorPil(**values)
    except (OSError, ValueError, TypeError) as exc:
        raise ToolError(f"{config}: not a Qwen2-VL image processor config ({exc})") from None
    size = processor.size
    resample = processor.resample
    if not (isinstance(resample, int) and int(resample) in RESAMPLE_NAMES):  # PILImageResampling is an int
        raise ToolError(f"{config}: unknown \"resample\": {resample!r} (PIL's codes: "
                        + ", ".join(f"{k} {v}" for k, v in RESAMPLE_NAMES.items()) + ")")
    return {
        "resample": int(resample),
        "patch_size": int(processor.patch_size), "merge_size": int(processor.merge_size),
        "temporal_patch_size": int(processor.temporal_patch_size),
        "min_pixels": int(size.shortest_edge), "max_pixels": int(size.longest_edge),
        "image_mean": tuple(float(v) for v in processor.image_mean),
        "image_std": tuple(float(v) for v in processor.image_std),
    }


# ---------------------------------------------------------------------------
# 6. Pipeline
# ---------------------------------------------------------------------------


class Stopwatch:
    """Milliseconds per named step."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self._last) * 1000
        self._last = now


@dataclass
class Prepared:
    """A decoded, resized image (made in a worker process: no torch here)."""

    job: Job
    original_size: tuple[int, int]  # (W, H) after EXIF orientation
    resized: np.ndarray  # (H, W, 3) uint8, what the model sees
    original_jpeg: bytes | None  # original_image.jpg, when pictures are written
    original_preview: Image.Image | None  # small copy of the original for the summary panel
    timings: dict[str, float]


def resize_for_qwen2vl(image: Image.Image, settings: Settings, label: str = "image") -> np.ndarray:
    """RGB PIL image -> (H, W, 3) uint8 at smart_resize's size (image pixel limits), resampled by PIL
    with settings.resample (bicubic unless a processor config says otherwise), as Qwen2VLImageProcessorPil."""
    try:
        height, width = smart_resize(image.height, image.width, settings.factor, settings.min_pixels,
                                     settings.max_pixels)
    except ValueError as exc:
        raise ToolError(f"{label}: {exc}") from None
    return np.array(image.resize((width, height), Image.Resampling(settings.resample)))


def prepare_image(job: Job, settings: Settings, pictures: bool) -> Prepared:
    """Load, orient, convert and resize one image; encode the original when pictures are wanted."""
    watch = Stopwatch()
    original = load_image(job.path)
    watch.lap("load")
    resized = resize_for_qwen2vl(original, settings, str(job.path))
    watch.lap("resize")
    jpeg = preview = None
    if pictures:
        jpeg = encode_jpeg(original)
        preview = _fit(original, 680, 760)
        watch.lap("encode")
    return Prepared(job, (original.width, original.height), resized, jpeg, preview, watch.ms)


class Scorer:
    """Where importance maps are computed, chosen once from --device.

    cpu: in the process that needs them, one input at a time (batch workers score their own
    inputs). cuda: in the main process, inputs of one shape CUDA_BATCH at a time, while the
    workers decode and write. The maps are the same either way (tested).
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.batch = CUDA_BATCH if device == "cuda" else 1

    @property
    def in_workers(self) -> bool:
        return self.device == "cpu"

    def maps(self, images: Sequence[np.ndarray], settings: Settings) -> list[dict[int, np.ndarray]]:
        """Importance maps of several (H, W, 3) uint8 images, or (T, H, W, 3) tubes, as numpy.
        Inputs of equal shape are scored together, self.batch at a time. The one crossing to numpy."""
        tokenizer = PatchTokenizer(
            num_scales=settings.num_scales, base_patch_size=settings.patch_size, thresholds=settings.thresholds,
            mean=settings.image_mean, std=settings.image_std, method=settings.method, aggregate=settings.aggregate,
        )
        results: list[dict[int, np.ndarray] | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for k, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(k)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch):
                chunk = indices[start:start + self.batch]
                stacked = np.stack([images[k] if images[k].ndim == 4 else images[k][None] for k in chunk])
                # (B, T, H, W, 3) -> (B, T, 3, H, W); the normalise-and-round trip of
                # compute_importance_maps returns these same uint8 values (tested), so skip it
                tensor = torch.from_numpy(stacked).to(self.device).permute(0, 1, 4, 2, 3)
                maps = tokenizer.importance_from_uint8(tensor)
                arrays = {ps: m.cpu().numpy() for ps, m in maps.items()}
                for j, k in enumerate(chunk):
                    # copies in numpy's own memory: holding many small torch-allocated buffers
                    # fragments the heap (measured: +260 MB over a 600-frame video)
                    results[k] = {ps: a[j].copy() for ps, a in arrays.items()}
        return results  # type: ignore[return-value]


CPU = Scorer("cpu")


def compute_masks(maps: Mapping[int, np.ndarray], thresholds: Sequence[float]) -> dict[int, np.ndarray]:
    """The APT choice for numpy maps (same rule and code as on the device)."""
    chosen = select_patches({ps: torch.from_numpy(m) for ps, m in maps.items()}, thresholds)
    return {ps: m.numpy() for ps, m in chosen.items()}


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; no-op elsewhere).

    Scoring input after input in one process fragments glibc's heap, and the resident
    size otherwise creeps up by about 0.6 MB per image or temporal patch (measured).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def patch_counts(masks: Mapping[int, np.ndarray]) -> dict[int, int]:
    return {ps: int(m.sum()) for ps, m in sorted(masks.items())}


@dataclass
class ImageResult:
    """Everything needed to write one image's outputs (sent to a worker process)."""

    prepared: Prepared
    maps: dict[int, np.ndarray]  # patch size -> (rows, cols) float64, NaN = padded
    masks: dict[int, np.ndarray]  # patch size -> (rows, cols) bool, chosen patches
    settings: Settings  # thresholds final (after --target-ratio)
    device: str


@dataclass
class Outcome:
    """What one input's run gives back: its stats.json record and its maps (one per image or
    temporal patch, for sweeps and --target-ratio; empty when reused)."""

    stats: dict
    maps: list[dict[int, np.ndarray]]
    reused: bool = False


def stats_record(label: str, kind: str, original_size: Sequence[int], resized_hw: tuple[int, int],
                 settings: Settings, counts: Mapping[int, int], uniform: int, device: str,
                 timings: Mapping[str, float]) -> dict:
    """The stats.json keys shared by images and videos. counts: patches per size; uniform:
    patches without APT (for a video, over all its temporal patches)."""
    height, width = resized_hw
    apt = sum(counts.values())
    return {
        "image": label,
        "kind": kind,
        "original_size": list(original_size),
        "resized_size": [width, height],
        "patch_size": settings.patch_size,
        "merge_size": settings.merge_size,
        "temporal_patch_size": settings.temporal_patch_size,
        "thresholds": list(settings.thresholds),
        "patch_sizes": list(settings.patch_sizes),
        "patches_per_scale": {str(ps): n for ps, n in sorted(counts.items())},
        "apt_patches": apt,
        "uniform_patches": uniform,
        "retained_ratio": apt / uniform,
        "qwen2vl_tokens": uniform // settings.merge_size**2,
        "method": settings.method,
        "target_ratio": settings.target_ratio,
        "device": device,
        "settings": settings.record(),
        "timings_ms": {k: round(v, 1) for k, v in timings.items()},
    }


def image_stats(result: ImageResult) -> dict:
    """The stats.json record of one image."""
    p, settings = result.prepared, result.settings
    height, width = p.resized.shape[:2]
    uniform = (height // settings.patch_size) * (width // settings.patch_size)
    return stats_record(p.job.label, "image", p.original_size, (height, width), settings,
                        patch_counts(result.masks), uniform, result.device, p.timings)


def heatmap_name(patch_size: int) -> str:
    return f"importance_map_scale_{patch_size}.png"


def overlay_name(patch_size: int) -> str:
    return f"importance_overlay_scale_{patch_size}.png"


IMAGE_PICTURES = ("patches_visualization.jpg", "patches_thumbnail.jpg", "original_image.jpg", "resized_image.jpg",
                  "explorer.html", "summary_panel.png")
VIDEO_PICTURES = ("patches_visualization.mp4", "patches_visualization.gif", "patches_thumbnail.jpg")
SWEEP_NAMES = ("threshold_sweep.csv", "threshold_sweep.png")


def output_names(kind: str, settings: Settings, options: RenderOptions) -> list[str]:
    """Every file one input ('image' or 'video') writes into its folder: the one registry."""
    names = ["stats.json", "importance_maps.npz"]
    if not options.stats_only:
        if kind == "video":
            names += [*VIDEO_PICTURES, *(f"importance_map_scale_{ps}.mp4" for ps in settings.patch_sizes)]
        else:
            names += [heatmap_name(ps) for ps in settings.patch_sizes] + [overlay_name(ps) for ps in settings.patch_sizes]
            names += IMAGE_PICTURES
    if options.sweep:
        names += SWEEP_NAMES[:1] if options.stats_only else SWEEP_NAMES
    return names


def maps_npz(maps: Mapping[int, np.ndarray], masks: Mapping[int, np.ndarray]) -> bytes:
    arrays = {f"scale_{ps}": m.astype(np.float32) for ps, m in maps.items()}
    arrays.update({f"mask_{ps}": m for ps, m in masks.items()})
    return encode_npz(arrays)


SWEEP_COLUMNS_FIXED = ("threshold", "apt_patches", "retained_ratio")


def sweep_files(
    maps_list: Sequence[Mapping[int, np.ndarray]], settings: Settings, current: int | None, title: str, plot: bool,
) -> dict[str, bytes]:
    """threshold_sweep.csv (and .png): counts against one threshold shared by all scales.
    current: the run's own APT patch count at settings.thresholds, marked on the plot."""
    counts = SharedThresholdCounts.from_maps(maps_list)
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


def image_files(result: ImageResult, stats: Mapping, options: RenderOptions) -> dict[str, bytes]:
    """All per-image outputs, encoded, keyed by file name."""
    p, settings = result.prepared, result.settings
    files: dict[str, bytes] = {"importance_maps.npz": maps_npz(result.maps, result.masks)}
    counts = patch_counts(result.masks)
    if options.sweep:
        files.update(sweep_files([result.maps], settings, sum(counts.values()),
                                 f"Threshold sweep: {Path(p.job.label).name}", plot=not options.stats_only))
    if options.stats_only:
        return files
    label = SCORERS[settings.method][1]
    sizes = settings.patch_sizes
    for i, ps in enumerate(sizes):
        threshold = settings.thresholds[i - 1] if i >= 1 else None
        files[heatmap_name(ps)] = encode_png(render_heatmap(result.maps[ps], ps, p.resized.shape[:2], threshold,
                                                            counts[ps], label))
        files[overlay_name(ps)] = encode_png(render_importance_overlay(p.resized, result.maps[ps], ps, label),
                                             compress_level=1)
    colors = scale_palette(len(sizes)) if options.color_by_scale else None
    overlay = draw_patch_borders(p.resized, result.masks, options.line_color, options.line_thickness, colors)
    overlay_image = Image.fromarray(overlay)
    if colors is not None:
        overlay_image = add_scale_legend(overlay_image, counts, colors)
    files["patches_visualization.jpg"] = encode_jpeg(overlay_image)
    files["patches_thumbnail.jpg"] = encode_jpeg(_fit(overlay_image, THUMBNAIL_WIDTH, 4 * THUMBNAIL_WIDTH))
    files["original_image.jpg"] = p.original_jpeg or b""
    resized_jpeg = encode_jpeg(Image.fromarray(p.resized))
    files["resized_image.jpg"] = resized_jpeg
    files["explorer.html"] = extension("pages").explorer_html(
        p.job.label, resized_jpeg, result.maps, settings.thresholds, counts, stats["uniform_patches"],
        stats["qwen2vl_tokens"], label, options,
    ).encode()
    lines = [
        f"original {p.original_size[0]} x {p.original_size[1]} -> resized {p.resized.shape[1]} x {p.resized.shape[0]}",
        f"method {settings.method}, thresholds {', '.join(f'{t:g}' for t in settings.thresholds)}",
        *(f"  {ps:>4} px patches: {n}" for ps, n in counts.items()),
        f"APT patches: {stats['apt_patches']} of {stats['uniform_patches']} uniform",
        f"retained ratio: {stats['retained_ratio']:.4f} ({stats['retained_ratio']:.1%})",
        f"Qwen2-VL LLM tokens without APT: {stats['qwen2vl_tokens']}",
    ]
    if settings.target_ratio is not None:
        lines.insert(2, f"threshold chosen for target ratio {settings.target_ratio:g}")
    panel = render_summary_panel(f"APT: {Path(p.job.label).name}", p.original_preview or overlay_image, p.original_size, overlay,
                                 result.maps, lines, label)
    files["summary_panel.png"] = encode_png(panel, compress_level=1)
    return files


def finish_image(result: ImageResult, options: RenderOptions) -> dict:
    """Render and write one image's outputs (worker-safe: numpy, PIL, matplotlib only)."""
    watch = Stopwatch()
    stats = image_stats(result)
    files = image_files(result, stats, options)
    watch.lap("render")
    stats["timings_ms"]["render"] = round(watch.ms["render"], 1)
    stats["timings_ms"]["total"] = round(sum(v for k, v in stats["timings_ms"].items() if k != "total"), 1)
    files["stats.json"] = encode_json(stats)
    write_files(result.prepared.job.out_dir, files)
    return stats


def reusable_stats(job: Job, settings: Settings, options: RenderOptions) -> dict | None:
    """The stats of an earlier run of the same settings whose outputs are all there, else None."""
    try:
        stats = json.loads((job.out_dir / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict) or stats.get("settings") != settings.record():
        return None
    if not all((job.out_dir / name).exists() for name in output_names(job.kind, settings, options)):
        return None
    return stats


def resolve_thresholds(settings: Settings, maps_list: Sequence[Mapping[int, np.ndarray]]) -> Settings:
    """The settings with final thresholds: for --target-ratio, one shared threshold chosen over
    all the given maps (one per image or temporal patch); otherwise unchanged. Done once per run."""
    if settings.target_ratio is None or not maps_list:
        return settings
    counts = SharedThresholdCounts.from_maps(maps_list)
    threshold, _ = choose_shared_threshold(counts, settings.target_ratio)
    return replace(settings, thresholds=(threshold,) * (settings.num_scales - 1))


def analyse(prepared: Prepared, maps: Mapping[int, np.ndarray], settings: Settings, device: str) -> ImageResult:
    """The APT choice for one scored image, at the settings' (final) thresholds."""
    return ImageResult(prepared, dict(maps), compute_masks(maps, settings.thresholds), settings, device)


def score_input(job: Job, settings: Settings, scorer: Scorer = CPU) -> list[dict[int, np.ndarray]]:
    """An input's maps, one per image or temporal patch (pass 1 of --target-ratio)."""
    if job.kind == "video":
        return video_tube_maps(job, settings, scorer)
    prepared = prepare_image(job, settings, pictures=False)
    maps = scorer.maps([prepared.resized], settings)
    release_free_memory()
    return maps


def run_input(job: Job, settings: Settings, options: RenderOptions, scorer: Scorer = CPU,
              skip_existing: bool = False, maps: list | None = None, show_progress: bool = False) -> Outcome:
    """One input from file to outputs in this process: the per-input pipeline of a single run
    and of every batch worker. settings' thresholds are final; maps: known from pass 1."""
    if skip_existing:
        reused = reusable_stats(job, settings, options)
        if reused is not None:
            logger.debug(f"{job.label}: outputs of the same settings exist, reused (--skip-existing)")
            return Outcome(reused, [], reused=True)
    if job.kind == "video":
        return run_video(job, settings, options, scorer, maps, show_progress)
    prepared = prepare_image(job, settings, pictures=not options.stats_only)
    watch = Stopwatch()
    image_maps = maps[0] if maps else scorer.maps([prepared.resized], settings)[0]
    result = analyse(prepared, image_maps, settings, scorer.device)
    release_free_memory()
    watch.lap("importance")
    prepared.timings.update(watch.ms)
    return Outcome(finish_image(result, options), [image_maps])


# --- batch -------------------------------------------------------------------


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


PR_SET_PDEATHSIG = 1  # linux/prctl.h
MAIN_WATCH_SECONDS = 0.5  # where there is no pidfd: how often a worker checks the main process
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _die_with(main_pid: int) -> None:
    """End this worker when the main process dies, however it dies (SIGKILL included): a thread
    waits on a pidfd of the main process (Linux; elsewhere it polls). The fork server, this
    worker's direct parent, waits for its workers, so it cannot be the one to notice; the
    kernel's parent-death signal covers the fork server dying first."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    try:
        pidfd = os.pidfd_open(main_pid)
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while _alive(main_pid):
                time.sleep(MAIN_WATCH_SECONDS)
        os._exit(EXIT_FAILURE)

    if not _alive(main_pid):
        os._exit(EXIT_FAILURE)
    threading.Thread(target=watch, name="main-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _worker_init(log_level: str | None, main_pid: int) -> None:
    for signum in STOP_SIGNALS:  # the main process decides when to stop, and stops its workers itself
        signal.signal(signum, signal.SIG_IGN)
    _die_with(main_pid)
    if log_level is not None:  # this process is the tool's own: log as the main process does
        configure_logging(log_level)
    torch.set_num_threads(1)  # the workers are the parallelism


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP all act as Ctrl-C. The first raises KeyboardInterrupt: the run
    stops cleanly (inputs in progress finish, summaries are written). The second calls on_second
    (which kills the workers) and raises again, so the run ends at once. Later ones, and any that
    arrive while `deferred`, are only recorded. Exit status: 128 + the first signal's number."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.on_second: Callable[[], None] | None = None
        self.deferred = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        if len(self.received) == 2 and self.on_second is not None:
            self.on_second()
        if not self.deferred and len(self.received) <= 2:
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.received[0]).name if self.received else "SIGINT"

    @property
    def exit_code(self) -> int:
        return 128 + self.received[0] if self.received else EXIT_INTERRUPTED

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """Signals during the block are recorded, not raised (short, must-finish work)."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False


class Executor:
    """Runs tasks in forked worker processes, or inline when workers == 1.

    It remembers which submitted tasks finish an input (`job` given), so that after an
    interrupt those still running can be waited for and counted (drain), or killed (kill).
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        self.inflight: dict[Future, Job | None] = {}
        if workers > 1:
            # Workers are forked from multiprocessing's fork server, never from this process,
            # which may have started threads (torch, CUDA, tqdm) that a fork does not carry over.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                            initargs=(LOG_LEVEL[0], os.getpid()))

    def submit(self, fn: Callable, *args, job: Job | None = None) -> Future:
        """fn(*args); `job` marks a task whose success means that job's outputs are complete."""
        if self.pool is not None:
            future = self.pool.submit(fn, *args)
            self.inflight[future] = job
            return future
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - delivered to the caller like a pool would
            future.set_exception(exc)
        return future

    def forget(self, future: Future) -> None:
        """The caller has recorded this task's outcome."""
        self.inflight.pop(future, None)

    def drain(self) -> Iterator[tuple[Job, object]]:
        """After an interrupt: cancel the tasks not started; (job, outcome) of each input-finishing
        task that was already running, as it ends (some may have been recorded already)."""
        for future in self.inflight:
            future.cancel()
        for future, job in list(self.inflight.items()):
            if job is not None and not future.cancelled():
                yield job, _outcome(future.result)

    def unfinished(self) -> list[Job]:
        return [job for job in self.inflight.values() if job is not None]

    def kill(self) -> None:
        """End every worker at once (the second Ctrl-C)."""
        if self.pool is not None:
            for process in list(self.pool._processes.values()):  # noqa: SLF001 - no public handle
                process.kill()

    def shutdown(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)


def failure_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ToolError) else f"{type(exc).__name__}: {exc}"


SUMMARY_BASE_COLUMNS = ("path", "kind", "status", "error", "output", "original_width", "original_height",
                        "resized_width", "resized_height")
SUMMARY_TAIL_COLUMNS = ("apt_patches", "uniform_patches", "retained_ratio", "qwen2vl_tokens", "frames_sampled",
                        "temporal_patches", "thresholds")


def summary_row(job: Job, out_root: Path, stats: Mapping | None, status: str, error: str = "",
                pictures: bool = True) -> dict:
    row = {"path": job.label, "kind": job.kind, "status": status, "error": error,
           "output": job.out_dir.relative_to(out_root).as_posix() if job.out_dir != out_root else ".",
           "pictures": pictures}
    if stats is not None:
        (ow, oh), (rw, rh) = stats["original_size"], stats["resized_size"]
        row.update(original_width=ow, original_height=oh, resized_width=rw, resized_height=rh)
        row.update({f"patches_{ps}": n for ps, n in stats["patches_per_scale"].items()})
        row.update({k: stats[k] for k in ("apt_patches", "uniform_patches", "retained_ratio", "qwen2vl_tokens")})
        row["frames_sampled"] = stats.get("frames_sampled", "")
        row["temporal_patches"] = stats.get("temporal_patches", "")
        row["thresholds"] = " ".join(repr(t) for t in stats["thresholds"])
    return row


def summarize(rows: Sequence[Mapping], skipped: int, settings: Settings,
              interrupted: bool, pending: int, hidden: int = 0) -> dict:
    """summary.json: counts, token totals and means, retained-ratio statistics, settings."""
    done = [r for r in rows if r["status"] in ("ok", "reused")]
    ratios = np.array([r["retained_ratio"] for r in done], dtype=float)
    totals = {k: int(sum(r[k] for r in done)) for k in ("uniform_patches", "apt_patches", "qwen2vl_tokens")}
    n = max(1, len(done))
    ratio_stats = None
    if done:
        ratio_stats = {
            "mean": float(ratios.mean()), "median": float(np.median(ratios)),
            "p10": float(np.percentile(ratios, 10)), "p90": float(np.percentile(ratios, 90)),
            "min": float(ratios.min()), "max": float(ratios.max()),
            "overall": totals["apt_patches"] / max(1, totals["uniform_patches"]),
        }
    return {
        "images": {
            "found": len(rows) + pending, "ok": sum(r["status"] == "ok" for r in rows),
            "reused": sum(r["status"] == "reused" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows), "not_processed": pending,
        },
        "files_skipped": skipped,
        "hidden_skipped": hidden,
        "interrupted": interrupted,
        "tokens": {
            "vit_patches_uniform_total": totals["uniform_patches"],
            "vit_patches_apt_total": totals["apt_patches"],
            "vit_patches_uniform_mean": totals["uniform_patches"] / n,
            "vit_patches_apt_mean": totals["apt_patches"] / n,
            "qwen2vl_llm_tokens_total": totals["qwen2vl_tokens"],
            "qwen2vl_llm_tokens_mean": totals["qwen2vl_tokens"] / n,
            "saved_fraction": 1 - totals["apt_patches"] / max(1, totals["uniform_patches"]),
        },
        "retained_ratio": ratio_stats,
        "thresholds": list(settings.thresholds),
        "target_ratio": settings.target_ratio,
        "settings": settings.record(),
        "failures": [{"path": r["path"], "error": r["error"]} for r in rows if r["status"] == "failed"],
    }


def write_summaries(out_root: Path, rows: Sequence[Mapping], summary: Mapping, settings: Settings,
                    sweep: dict[str, bytes] | None) -> None:
    """summary.csv, .json, .png, report.html (and the sweep files) as one set: all or none."""
    sizes = settings.patch_sizes
    columns = [*SUMMARY_BASE_COLUMNS, *(f"patches_{ps}" for ps in sizes), *SUMMARY_TAIL_COLUMNS]
    thresholds_text = "thresholds " + ", ".join(f"{t:g}" for t in summary["thresholds"])
    files = {
        "summary.csv": encode_csv(rows, columns),
        "summary.json": encode_json(summary),
        "summary.png": render_batch_summary_plot(rows, thresholds_text),
        "report.html": extension("pages").report_html(rows, summary, sizes).encode(),
        **(sweep or {}),
    }
    write_files(out_root, files, what="the summaries")


class Progress:
    """A tqdm bar on stderr for batches, silent otherwise."""

    def __init__(self, total: int, enabled: bool, desc: str | None = None, unit: str = "file"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(found: Discovery, out_root: Path, settings: Settings, options: RenderOptions, scorer: Scorer,
              workers: int, skip_existing: bool, show_progress: bool, signals: StopSignals) -> int:
    """Every job, then summaries; exit status 1 when any input failed, 128 + N after signal N."""
    unreadable = [Job(Path(label), label, out_root / label, "") for label, _ in found.failed]  # kind "": never run
    jobs = [*unreadable, *found.jobs]
    rows: dict[Job, dict] = {}
    for job, (_, reason) in zip(unreadable, found.failed):
        rows[job] = summary_row(job, out_root, None, "failed", reason)
        logger.error(reason)
    maps_of: dict[Job, list] = {}  # per job: maps of each image / temporal patch (for sweeps and targets)
    executor = Executor(workers if len(found.jobs) > 1 else 1)
    signals.on_second = executor.kill
    progress = Progress(0, False)

    def record(job: Job, outcome: object) -> None:
        if isinstance(outcome, BrokenProcessPool) and signals.received:
            return  # its worker was stopped by the signal: not processed
        if isinstance(outcome, BaseException):
            rows[job] = summary_row(job, out_root, None, "failed", failure_text(outcome))
            logger.error(failure_text(outcome) if isinstance(outcome, ToolError)
                         else f"{job.label}: {failure_text(outcome)}")
        else:
            rows[job] = summary_row(job, out_root, outcome.stats, "reused" if outcome.reused else "ok",
                                    pictures=not options.stats_only)
            maps_of.setdefault(job, outcome.maps)

    try:
        try:
            if settings.target_ratio is not None:
                # pass 1: every input's maps, so that one threshold serves the whole set
                progress = Progress(len(found.jobs), show_progress, "scoring")
                for job, outcome in _score_all(found.jobs, settings, scorer, executor, progress):
                    if isinstance(outcome, BaseException):
                        record(job, outcome)
                    else:
                        maps_of[job] = outcome
                progress.close()
                settings = resolve_thresholds(settings, [m for ms in maps_of.values() for m in ms])
                logger.info(f"target ratio {settings.target_ratio:g}: shared threshold {settings.thresholds[0]!r}")
            todo = [j for j in found.jobs if j not in rows]
            progress = Progress(len(todo), show_progress, "writing" if settings.target_ratio is not None else None)
            for job, outcome in _process_all(todo, settings, options, scorer, executor, progress, maps_of,
                                             skip_existing):
                record(job, outcome)
        except KeyboardInterrupt:
            logger.error(f"interrupted ({signals.name}): finishing the inputs in progress, then writing the "
                         "summary (Ctrl-C again stops at once)")
            for job, outcome in executor.drain():
                if job not in rows:
                    record(job, outcome)
    except KeyboardInterrupt:  # the second signal: the workers are gone, their inputs unfinished
        logger.error("stopped at once: inputs in progress discarded")
    finally:
        with signals.deferring():
            executor.shutdown(cancel=True)
            for job in executor.unfinished():
                if job not in rows:
                    discard_unfinished(job, out_root)
            progress.close()
    with signals.deferring():
        ordered = [rows[j] for j in jobs if j in rows]
        pending = len(jobs) - len(ordered)
        sweep = None
        if options.sweep:
            maps_list = [m for j in jobs if j in rows and rows[j]["status"] != "failed"
                         for m in (maps_of.get(j) or _stored_maps(j, settings))]
            if maps_list:
                sweep = sweep_files(maps_list, settings, None, f"Threshold sweep over {len(ordered)} inputs",
                                    plot=True)
        summary = summarize(ordered, found.skipped, settings, bool(signals.received), pending, found.hidden)
        write_summaries(out_root, ordered, summary, settings, sweep)
    ok = summary["images"]["ok"] + summary["images"]["reused"]
    logger.info(f"{ok} of {len(jobs)} inputs analysed, {summary['images']['failed']} failed, "
                f"{found.skipped} other files skipped; summaries in {out_root}")
    if signals.received:
        return signals.exit_code
    return EXIT_FAILURE if summary["images"]["failed"] else EXIT_OK


def discard_unfinished(job: Job, out_root: Path) -> None:
    """What a killed worker left of one input: its staging folder, and folders left empty."""
    for stale in job.out_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    folders = [job.out_dir, *(p for p in job.out_dir.parents if out_root in p.parents)]
    _remove_empty_folders(folders)


def _stored_maps(job: Job, settings: Settings) -> list[dict[int, np.ndarray]]:
    """Maps of an input done by an earlier run (importance_maps.npz), as float64."""
    try:
        with np.load(job.out_dir / "importance_maps.npz") as data:
            if job.kind == "video":
                count = int(data["temporal_patches"])
                return [{ps: data[f"scale_{ps}"][k].astype(np.float64) for ps in settings.patch_sizes}
                        for k in range(count)]
            return [{ps: data[f"scale_{ps}"].astype(np.float64) for ps in settings.patch_sizes}]
    except (OSError, KeyError, ValueError):
        return []


def _outcome(get: Callable[[], object]) -> object:
    """get()'s result, or the exception it raised: one bad input never stops the batch.
    (KeyboardInterrupt is no Exception, so Ctrl-C still stops it.)"""
    try:
        return get()
    except Exception as exc:  # noqa: BLE001 - recorded as that input's failure
        return exc


def _ordered_map(executor: Executor, fn: Callable, calls: Sequence[tuple[Job, tuple]],
                 window: int, final: bool = False) -> Iterator[tuple[Job, object]]:
    """fn(*args) for each (job, args), results (or the exception raised) in order,
    at most `window` calls ahead in the workers; one at a time without workers.
    final: fn's success means the job's outputs are complete (see Executor.drain)."""
    if executor.pool is None:
        for job, args in calls:
            yield job, _outcome(functools.partial(fn, *args))
        return
    queue: list[tuple[Job, Future]] = []
    pending = iter(calls)
    for job, args in pending:
        queue.append((job, executor.submit(fn, *args, job=job if final else None)))
        if len(queue) >= window:
            break
    while queue:
        job, future = queue.pop(0)
        nxt = next(pending, None)
        if nxt is not None:
            queue.append((nxt[0], executor.submit(fn, *nxt[1], job=nxt[0] if final else None)))
        yield job, _outcome(future.result)
        executor.forget(future)  # only once the caller has recorded it


def _score_all(jobs: Sequence[Job], settings: Settings, scorer: Scorer, executor: Executor,
               progress: Progress) -> Iterator[tuple[Job, list | BaseException]]:
    """Pass 1 of --target-ratio: (job, its maps or the exception raised), for every input.
    CPU: each worker scores its inputs. CUDA: workers decode, this process scores."""
    window = 2 * executor.workers
    if scorer.in_workers:
        calls = [(j, (j, settings)) for j in jobs]
        for job, outcome in _ordered_map(executor, score_input, calls, window):
            progress.update()
            yield job, outcome
        return
    calls = [(j, (j, settings, False)) for j in jobs if j.kind == "image"]
    for job, prepared in _ordered_map(executor, prepare_image, calls, window + CUDA_BATCH):
        progress.update()
        yield job, prepared if isinstance(prepared, BaseException) else _outcome(
            functools.partial(scorer.maps, [prepared.resized], settings))
    for job in (j for j in jobs if j.kind == "video"):
        progress.update()
        yield job, _outcome(functools.partial(score_input, job, settings, scorer))


def _process_all(jobs: Sequence[Job], settings: Settings, options: RenderOptions, scorer: Scorer,
                 executor: Executor, progress: Progress, known: Mapping[Job, list],
                 skip_existing: bool) -> Iterator[tuple[Job, Outcome | BaseException]]:
    """Pass 2: (job, its Outcome or the exception raised), for every input. CPU: each worker
    takes an input from file to outputs (run_input). CUDA: workers decode, render and write
    images while this process scores them in batches; videos run here."""
    if scorer.in_workers:
        calls = [(j, (j, settings, options, CPU, skip_existing, known.get(j))) for j in jobs]
        for job, outcome in _ordered_map(executor, run_input, calls, 2 * executor.workers, final=True):
            progress.update()
            yield job, outcome
        return
    yield from _images_on_cuda([j for j in jobs if j.kind == "image"], settings, options, scorer, executor,
                               progress, known, skip_existing)
    for job in (j for j in jobs if j.kind == "video"):
        yield job, _outcome(functools.partial(run_input, job, settings, options, scorer, skip_existing,
                                              known.get(job)))
        progress.update()


def _images_on_cuda(images: Sequence[Job], settings: Settings, options: RenderOptions, scorer: Scorer,
                    executor: Executor, progress: Progress, known: Mapping[Job, list],
                    skip_existing: bool) -> Iterator[tuple[Job, Outcome | BaseException]]:
    finishing: list[tuple[Job, Future, list]] = []

    def drain(block: bool) -> Iterator[tuple[Job, Outcome | BaseException]]:
        while finishing and (block or finishing[0][1].done()):
            job, future, maps = finishing.pop(0)
            progress.update()
            stats = _outcome(future.result)
            yield job, stats if isinstance(stats, BaseException) else Outcome(stats, maps)
            executor.forget(future)

    def score(ready: list[Prepared]) -> None:
        start = time.perf_counter()
        missing = [p for p in ready if p.job not in known]
        computed = iter(scorer.maps([p.resized for p in missing], settings) if missing else [])
        all_maps = [known[p.job][0] if p.job in known else next(computed) for p in ready]
        share = (time.perf_counter() - start) * 1000 / len(ready)  # the batch's time, shared out
        for p, maps in zip(ready, all_maps):
            p.timings["importance"] = share
            result = analyse(p, maps, settings, scorer.device)
            finishing.append((p.job, executor.submit(finish_image, result, options, job=p.job), [maps]))

    todo = []
    for job in images:
        reused = reusable_stats(job, settings, options) if skip_existing else None
        if reused is not None:
            progress.update()
            yield job, Outcome(reused, [], reused=True)
        else:
            todo.append(job)
    pending: list[Prepared] = []
    calls = [(j, (j, settings, not options.stats_only)) for j in todo]
    for job, prepared in _ordered_map(executor, prepare_image, calls, 2 * executor.workers + CUDA_BATCH):
        if isinstance(prepared, BaseException):
            progress.update()
            yield job, prepared
            continue
        pending.append(prepared)
        if len(pending) >= CUDA_BATCH:
            score(pending)
            pending = []
        yield from drain(block=False)
    if pending:
        score(pending)
    yield from drain(block=True)


# --- video -------------------------------------------------------------------

GIF_MAX_WIDTH = 480
VIDEO_TRIM_EVERY = 8  # temporal patches between release_free_memory() calls
VIDEO_CODEC = "mp4v"  # MPEG-4 Part 2: written by every OpenCV build; plays in VLC, mpv, QuickTime, Windows


@dataclass(frozen=True)
class VideoInfo:
    total_frames: int
    fps: float
    width: int
    height: int


def _cv2():
    # FFmpeg's and OpenCV's own messages about a damaged file would print beside our one line;
    # set either variable (FFmpeg levels: 16 errors, 24 warnings) to see them
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    try:
        import cv2
    except ImportError:
        raise ToolError("video input needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def _opencv_failure(path: Path, doing: str, exc: Exception) -> ToolError:
    """OpenCV's C++ exception (several lines) as one ToolError line."""
    return ToolError(f"{path}: cannot {doing} video (OpenCV: {' '.join(str(exc).split())})")


def probe_video(path: Path) -> VideoInfo:
    """Frame count, rate and size of a video file; ToolError when it cannot be read."""
    check_input_file(path)
    cv2 = _cv2()
    try:
        capture = cv2.VideoCapture(str(path))
    except cv2.error as exc:
        raise _opencv_failure(path, "open", exc) from None
    try:
        if not capture.isOpened():
            raise ToolError(f"{path}: cannot open video (unreadable or unsupported format)")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if total <= 0 or width <= 0 or height <= 0:
            raise ToolError(f"{path}: video has no frames")
        if not (math.isfinite(fps) and fps > 0):
            raise ToolError(f"{path}: video has no valid frame rate")
        return VideoInfo(total, fps, width, height)
    except cv2.error as exc:
        raise _opencv_failure(path, "read", exc) from None
    finally:
        capture.release()


def _plan_qwen2vl(info: VideoInfo, settings: Settings) -> tuple[list[int], tuple[int, int]]:
    """Qwen2VLVideoProcessor: fps sampling floored to whole tubes, per-frame pixel limits."""
    indices = sample_frame_indices(info.total_frames, info.fps, settings.fps, settings.temporal_patch_size,
                                   settings.min_frames, settings.max_frames)
    max_pixels = settings.video_max_pixels
    if settings.cap_pixels_per_frame:
        max_pixels = capped_video_max_pixels("Qwen2VLVideoProcessor", len(indices), settings.factor,
                                             settings.temporal_patch_size, settings.video_min_pixels, max_pixels)
    return indices, smart_resize(info.height, info.width, settings.factor, settings.video_min_pixels, max_pixels)


def _plan_qwen3vl(info: VideoInfo, settings: Settings) -> tuple[list[int], tuple[int, int]]:
    """Qwen3VLVideoProcessor: linspace sampling, pixel limits over all sampled frames."""
    indices = sample_frame_indices_qwen3(info.total_frames, info.fps, settings.fps, settings.min_frames,
                                         settings.max_frames)
    max_pixels = settings.video_max_pixels
    if settings.cap_pixels_per_frame:
        max_pixels = capped_video_max_pixels("Qwen3VLVideoProcessor", len(indices), settings.factor,
                                             settings.temporal_patch_size, settings.video_min_pixels, max_pixels)
    size = smart_resize_qwen3_video(len(indices), info.height, info.width, settings.temporal_patch_size,
                                    settings.factor, settings.video_min_pixels, max_pixels)
    return indices, size


VIDEO_PLANS = {"Qwen2VLVideoProcessor": _plan_qwen2vl, "Qwen3VLVideoProcessor": _plan_qwen3vl}


def video_plan(info: VideoInfo, settings: Settings, label: str) -> tuple[list[int], tuple[int, int]]:
    """(sampled frame indices, resized (H, W)) for a video, by the rules of the model's video processor."""
    try:
        return VIDEO_PLANS[VIDEO_PROCESSOR_OF[settings.model]](info, settings)
    except ValueError as exc:
        raise ToolError(f"{label}: {exc}") from None


# Video frames are resized as transformers' video processors do on the CPU (BaseVideoProcessor ->
# TorchvisionBackend.resize -> torchvision.transforms.v2.functional.resize_image, antialias=True):
# torch's interpolate on the (1, 3, H, W) uint8 tensor itself for bicubic and nearest, and for bilinear
# where torchvision trusts torch's uint8 kernel (AVX2/AVX512 or ARM CPUs); elsewhere on float32, then
# rounded and cast to uint8. PIL's codes map to modes as transformers' pil_torch_interpolation_mapping.
VIDEO_RESIZE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
NATIVE_UINT8_BILINEAR_CPUS = ("AVX2", "AVX512")  # torchvision _do_native_uint8_resize_on_cpu
NATIVE_UINT8_BILINEAR_MACHINES = ("aarch64", "arm64")


def resize_frame(rgb: np.ndarray, size: tuple[int, int], resample: int = BICUBIC) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 at size (h, w), pixel for pixel as transformers' video
    processors resize frames on the CPU (torchvision's resize, without importing torchvision)."""
    if rgb.shape[:2] == tuple(size):
        return rgb  # torchvision returns the frame untouched
    mode = VIDEO_RESIZE_MODES.get(resample)
    if mode is None:
        supported = ", ".join(f"{k} ({RESAMPLE_NAMES[k]})" for k in VIDEO_RESIZE_MODES)
        raise ToolError(f"resample {resample} ({RESAMPLE_NAMES.get(resample, 'unknown')}) is not supported for "
                        f"video frames; supported: {supported}")
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W)
    native = mode != "bilinear" or (torch.backends.cpu.get_cpu_capability() in NATIVE_UINT8_BILINEAR_CPUS
                                    or platform.machine() in NATIVE_UINT8_BILINEAR_MACHINES)
    smooth = mode != "nearest-exact"  # torchvision: antialias and align_corners=False for these modes only
    y = F.interpolate(x if native else x.float(), size=tuple(size), mode=mode,
                      align_corners=False if smooth else None, antialias=smooth)
    if not native:
        y = y.round_().to(torch.uint8)
    return y[0].permute(1, 2, 0).contiguous().numpy()


def iter_sampled_frames(path: Path, indices: Sequence[int], size: tuple[int, int],
                        resample: int = BICUBIC) -> Iterator[np.ndarray]:
    """Stream the sampled frames as (H, W, 3) uint8 RGB at `size` (see resize_frame), one at a time."""
    cv2 = _cv2()
    try:
        capture = cv2.VideoCapture(str(path))
    except cv2.error as exc:
        raise _opencv_failure(path, "open", exc) from None
    wanted = iter(indices)
    target = next(wanted, None)
    position = 0
    try:
        while target is not None:
            if not capture.grab():
                raise ToolError(f"{path}: video ended at frame {position} before sampled frame {target} "
                                "(truncated or corrupt)")
            if position == target:
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    raise ToolError(f"{path}: cannot decode frame {position} (truncated or corrupt)")
                resized = resize_frame(frame[..., ::-1], size, resample)
                while target == position:  # an index sampled twice is yielded twice
                    yield resized
                    target = next(wanted, None)
            position += 1
    except cv2.error as exc:  # raised by grab or retrieve (a consumer's exceptions never enter at the yield)
        raise _opencv_failure(path, "read", exc) from None
    finally:
        capture.release()


def iter_tubes(frames: Iterable[np.ndarray], temporal_patch_size: int) -> Iterator[np.ndarray]:
    """Group frames into (T, H, W, 3) temporal patches; a short last group repeats its last frame."""
    group: list[np.ndarray] = []
    for frame in frames:
        group.append(frame)
        if len(group) == temporal_patch_size:
            yield np.stack(group)
            group = []
    if group:
        group += [group[-1]] * (temporal_patch_size - len(group))
        yield np.stack(group)


def video_tube_maps(job: Job, settings: Settings, scorer: Scorer,
                    progress: Progress | None = None) -> list[dict[int, np.ndarray]]:
    """Importance maps of every temporal patch of a video, streaming its frames."""
    info = probe_video(job.path)
    indices, size = video_plan(info, settings, job.label)
    maps = []
    pending: list[np.ndarray] = []
    frames = iter_sampled_frames(job.path, indices, size, settings.resample)
    for tube in iter_tubes(frames, settings.temporal_patch_size):
        pending.append(tube)
        if len(pending) >= scorer.batch:
            maps += scorer.maps(pending, settings)
            pending = []
            if len(maps) % VIDEO_TRIM_EVERY < scorer.batch:
                release_free_memory()
        if progress is not None:
            progress.update(settings.temporal_patch_size)
    if pending:
        maps += scorer.maps(pending, settings)
    return maps


class _VideoWriter:
    """An mp4 file written frame by frame with OpenCV."""

    def __init__(self, path: Path, fps: float, size_wh: tuple[int, int]):
        cv2 = _cv2()
        self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*VIDEO_CODEC), fps, size_wh)
        if not self.writer.isOpened():
            raise ToolError(f"{path}: OpenCV cannot write {VIDEO_CODEC} video here")

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(np.ascontiguousarray(rgb[..., ::-1]))

    def close(self) -> None:
        self.writer.release()


def _map_frame(values: np.ndarray, patch_size: int, size: tuple[int, int], vmin: float, vmax: float,
               caption: str) -> np.ndarray:
    """One animation frame: the cell colours at the frame's size with a colour key below."""
    h, w = size
    cells = np.repeat(np.repeat(colorize(values, vmin, vmax), patch_size, axis=0), patch_size, axis=1)[:h, :w]
    frame = Image.new("RGB", (w, h + 28))
    frame.paste(Image.fromarray(np.ascontiguousarray(cells)), (0, 0))
    frame.paste(_gradient_strip(w, vmin, vmax, caption), (0, h))
    return np.asarray(frame)


def video_stats(job: Job, info: VideoInfo, indices: Sequence[int], size: tuple[int, int], settings: Settings,
                tube_masks: Sequence[Mapping[int, np.ndarray]], device: str, timings: Mapping[str, float]) -> dict:
    """stats.json of a video: the image keys, counted over all temporal patches, plus per-tube counts."""
    h, w = size
    t = settings.temporal_patch_size
    grid_t = len(tube_masks)
    per_tube = []
    totals = {ps: 0 for ps in settings.patch_sizes}
    for k, masks in enumerate(tube_masks):
        counts = patch_counts(masks)
        for ps, n in counts.items():
            totals[ps] += n
        frames = list(indices[k * t:(k + 1) * t])
        per_tube.append({"temporal_patch": k, "frames": frames, "patches_per_scale": {str(ps): n for ps, n in counts.items()},
                         "apt_patches": sum(counts.values())})
    uniform = grid_t * (h // settings.patch_size) * (w // settings.patch_size)
    stats = stats_record(job.label, "video", (info.width, info.height), size, settings, totals, uniform,
                         device, timings)
    # padded_frames: copies of the last sampled frame that fill its tube (as transformers' patchify pads)
    stats.update(frames_total=info.total_frames, video_fps=info.fps, frames_sampled=len(indices),
                 frame_indices=list(indices), padded_frames=grid_t * t - len(indices), temporal_patches=grid_t,
                 per_temporal_patch=per_tube)
    return stats


def run_video(job: Job, settings: Settings, options: RenderOptions, scorer: Scorer = CPU,
              tube_maps: list | None = None, show_progress: bool = False) -> Outcome:
    """A video from path to files: pass 1 scores each temporal patch while streaming the
    sampled frames (unless tube_maps are known); pass 2 streams them again to draw the
    patches. Memory stays bounded by one temporal patch (plus the small GIF frames)."""
    watch = Stopwatch()
    info = probe_video(job.path)
    indices, size = video_plan(info, settings, job.label)
    logger.info(f"{job.label}: {info.total_frames} frames at {info.fps:g} fps, {info.width}x{info.height}; "
                f"sampling {len(indices)} frames at {size[1]}x{size[0]}")
    passes = (0 if options.stats_only else 1) + (tube_maps is None)
    progress = Progress(len(indices) * passes, show_progress and passes > 0, unit="frame")
    try:
        if tube_maps is None:
            tube_maps = video_tube_maps(job, settings, scorer, progress)
        watch.lap("importance")
        tube_masks = [compute_masks(m, settings.thresholds) for m in tube_maps]
        files: dict[str, bytes] = {}
        arrays = {f"scale_{ps}": np.stack([m[ps] for m in tube_maps]).astype(np.float32) for ps in settings.patch_sizes}
        arrays.update({f"mask_{ps}": np.stack([m[ps] for m in tube_masks]) for ps in settings.patch_sizes})
        arrays["temporal_patches"] = np.array(len(tube_maps))
        files["importance_maps.npz"] = encode_npz(arrays)
        if options.sweep:
            apt = sum(sum(patch_counts(m).values()) for m in tube_masks)
            files.update(sweep_files(tube_maps, settings, apt, f"Threshold sweep: {Path(job.label).name}",
                                     plot=not options.stats_only))
        with staged_output(job.out_dir) as staging:
            if not options.stats_only:
                _write_video_pictures(job, staging, indices, size, settings, options, tube_maps, tube_masks, info,
                                      progress)
                watch.lap("render")
            stats = video_stats(job, info, indices, size, settings, tube_masks, scorer.device,
                                {**watch.ms, "total": sum(watch.ms.values())})
            files["stats.json"] = encode_json(stats)
            for name, data in files.items():
                (staging / name).write_bytes(data)
        return Outcome(stats, tube_maps)
    finally:
        progress.close()


def _write_video_pictures(job, staging, indices, size, settings, options, tube_maps, tube_masks, info,
                          progress) -> None:
    """patches_visualization.mp4 / .gif and one importance-map animation per scale."""
    h, w = size
    duration_s = info.total_frames / info.fps
    out_fps = max(0.1, len(indices) / duration_s) if duration_s > 0 else settings.fps
    t = settings.temporal_patch_size
    colors = scale_palette(settings.num_scales) if options.color_by_scale else None
    label = SCORERS[settings.method][1]
    ranges = {ps: color_range(np.stack([m[ps] for m in tube_maps])) for ps in settings.patch_sizes}
    overlay_writer = _VideoWriter(staging / "patches_visualization.mp4", out_fps, (w, h))
    map_writers = {ps: _VideoWriter(staging / f"importance_map_scale_{ps}.mp4", out_fps, (w, h + 28))
                   for ps in settings.patch_sizes}
    gif_frames: list[Image.Image] = []
    gif_scale = min(1.0, GIF_MAX_WIDTH / w)
    try:
        for k, frame in enumerate(iter_sampled_frames(job.path, indices, size, settings.resample)):
            tube = k // t
            overlay = draw_patch_borders(frame, tube_masks[tube], options.line_color, options.line_thickness, colors)
            overlay_writer.write(overlay)
            gif = Image.fromarray(overlay)
            if k == 0:
                (staging / "patches_thumbnail.jpg").write_bytes(
                    encode_jpeg(_fit(gif, THUMBNAIL_WIDTH, 4 * THUMBNAIL_WIDTH)))
            if gif_scale < 1.0:
                gif = gif.resize((round(w * gif_scale), round(h * gif_scale)), Image.Resampling.BILINEAR)
            gif_frames.append(gif.quantize(colors=255, method=Image.Quantize.MEDIANCUT))
            for ps, writer in map_writers.items():
                writer.write(_map_frame(tube_maps[tube][ps], ps, size, *ranges[ps], f"{ps} px {label}"))
            progress.update()
    finally:
        overlay_writer.close()
        for writer in map_writers.values():
            writer.close()
    gif_frames[0].save(staging / "patches_visualization.gif", save_all=True, append_images=gif_frames[1:],
                       duration=round(1000 / out_fps), loop=0)


# ---------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a single line on stderr, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _bounded_int(text: str, low: int, high: float, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _bounded_int(text, 1, math.inf, "a positive integer")


def color_level(text: str) -> int:
    return _bounded_int(text, 0, 255, "an integer 0..255")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def ratio(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1], got {text!r}")
    return value


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    parser = OneLineParser(
        prog="visualize-patches" if Path(sys.argv[0]).stem == "visualize-patches" else "visualize_patches.py",
        description="Visualise APT (Adaptive Patch Tokenization) for Qwen2-VL: multi-scale importance heatmaps, "
        "the chosen patches, an interactive threshold explorer, raw maps and token counts, for images, "
        "folders of images and videos.",
        epilog="The defaults shown for model and video flags are --model qwen2-vl's; another --model, then "
        "--processor, replace them; explicit flags win over both.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="Image or video files, folders (searched recursively) or glob patterns. A single "
                        "file writes its outputs straight into the output directory; anything else writes one "
                        f"folder per input plus summaries. Without INPUT, the sample photo {SAMPLE_IMAGE} (a Vermeer).")
    parser.add_argument("-o", "--output", type=Path, default=Path(DEFAULT_OUTPUT_DIR), metavar="DIR",
                        help=f"Directory for the outputs; created if missing (default: {DEFAULT_OUTPUT_DIR}).")

    model = parser.add_argument_group("model geometry (Qwen-VL image processor)")
    model.add_argument("--model", choices=tuple(MODEL_PRESETS), default=DEFAULT_MODEL,
                       help="Which Qwen-VL generation's processor to follow: its patch, merge and temporal sizes, "
                       "pixel limits, mean/std, video frame sampling and sizing (see the README's table of "
                       "presets and their sources). --processor and explicit flags win over it "
                       "(default: %(default)s).")
    model.add_argument("--patch-size", type=positive_int, metavar="PX",
                       help=f"Base ViT patch side in pixels; scales are PX * 2**i (default: {d.patch_size}).")
    model.add_argument("--temporal-patch-size", type=positive_int, metavar="N",
                       help=f"Frames per temporal patch of a video; recorded for images "
                       f"(default: {d.temporal_patch_size}).")
    model.add_argument("--merge-size", type=positive_int, metavar="N",
                       help="Patches merged per side into one LLM token; resized sides are multiples of "
                       f"patch size * merge size (default: {d.merge_size}).")
    model.add_argument("--min-pixels", type=positive_int, metavar="N",
                       help=f"smart_resize lower bound on an image's resized height*width (default: {d.min_pixels}).")
    model.add_argument("--max-pixels", type=positive_int, metavar="N",
                       help=f"smart_resize upper bound on an image's resized height*width (default: {d.max_pixels}).")
    model.add_argument("--processor", type=Path, metavar="PATH",
                       help="A Qwen2-VL-family preprocessor_config.json, or a model folder holding one: patch, "
                       "merge and temporal sizes, min/max pixels, mean and std are read from it (needs transformers).")

    apt = parser.add_argument_group("APT thresholds and scoring")
    apt.add_argument("--thresholds", type=finite_float, nargs="+", metavar="T",
                     help="One threshold per scale above the base; the i-th applies to patches of PX * 2**i. A patch "
                     "merges where its score is below its threshold: higher thresholds give more large patches and "
                     "fewer tokens. Number of scales = number of thresholds + 1 "
                     f"(default: {' '.join(f'{t:g}' for t in d.thresholds)}, in entropy bits).")
    apt.add_argument("--target-ratio", type=ratio, metavar="R",
                     help="Instead of the thresholds' values: choose one threshold shared by all scales that brings "
                     "APT patches / uniform patches closest to R (0 < R <= 1; ties: more patches), by exact search. "
                     "For several inputs, one threshold for the whole set's total.")
    apt.add_argument("--method", choices=tuple(SCORERS), default=d.method,
                     help="Patch score: 'entropy' of the grayscale histogram (bits), 'laplacian' (|8-neighbour "
                     "Laplacian| of [0,1] gray), or 'upsample_mse' (error of a bilinear down-up resampling) "
                     "(default: %(default)s).")
    apt.add_argument("--aggregate", choices=AGGREGATES,
                     help=f"Per-patch reduction for --method laplacian (default: {d.aggregate}).")
    apt.add_argument("--sweep", action="store_true",
                     help="Also write threshold_sweep.csv and .png: patches against one shared threshold.")

    draw = parser.add_argument_group("drawing")
    draw.add_argument("--color-by-scale", action="store_true",
                      help="Colour patch borders by scale, with a legend, instead of one colour.")
    draw.add_argument("--line-color", type=color_level, nargs=3, metavar=("R", "G", "B"),
                      default=list(BORDER_GREEN),
                      help=f"Border colour (default: {' '.join(map(str, BORDER_GREEN))}, green).")
    draw.add_argument("--line-thickness", type=positive_int, default=BORDER_THICKNESS, metavar="PX",
                      help="Border width in pixels (default: %(default)s).")

    batch = parser.add_argument_group("several inputs")
    batch.add_argument("--workers", type=positive_int, default=default_workers(), metavar="N",
                       help="Worker processes that decode, resize, render and write (default: the CPU cores, "
                       f"at most {MAX_DEFAULT_WORKERS}: %(default)s).")
    batch.add_argument("--skip-existing", action="store_true",
                       help="Reuse inputs whose outputs of the same settings already exist (resume a run).")
    batch.add_argument("--stats-only", action="store_true",
                       help="Numbers only: stats.json and importance_maps.npz per input, no pictures.")

    video = parser.add_argument_group("video (Qwen2-VL video processor)")
    video.add_argument("--fps", type=positive_float, metavar="F",
                       help=f"Frames sampled per second of video (default: {d.fps:g}).")
    video.add_argument("--min-frames", type=positive_int, metavar="N",
                       help=f"Fewest frames to sample (default: {d.min_frames}).")
    video.add_argument("--max-frames", type=positive_int, metavar="N",
                       help=f"Most frames to sample (default: {d.max_frames}).")
    video.add_argument("--video-min-pixels", type=positive_int, metavar="N",
                       help=f"smart_resize lower bound per video frame (default: {d.video_min_pixels}).")
    video.add_argument("--video-max-pixels", type=positive_int, metavar="N",
                       help=f"smart_resize upper bound per video frame (default: {d.video_max_pixels}). "
                       "For --model qwen3-vl both bounds apply to frames x height x width, as its processor does.")
    video.add_argument("--cap-pixels-per-frame", action="store_true",
                       help="Shrink frames when many are sampled, as transformers' cap_pixels_per_frame=True "
                       "(qwen-vl-utils' behaviour; off by default, as in transformers 5.24).")

    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                     help="Where to score: 'auto' picks CUDA when available (default: %(default)s).")
    verbosity = run.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="Print errors only.")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="Print debug messages too.")
    run.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


SETTINGS_FLAGS = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "method",
                  "aggregate", "target_ratio", "fps", "min_frames", "max_frames", "video_min_pixels",
                  "video_max_pixels")  # None when not given; --model and --processor set them otherwise


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings, RenderOptions, Scorer]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if args.method != "entropy" and args.thresholds is None and args.target_ratio is None:
        parser.error(f"--method {args.method} needs --thresholds or --target-ratio "
                     "(the default thresholds are entropy bits)")
    if args.aggregate is not None and args.method != "laplacian":
        parser.error("--aggregate applies to --method laplacian only")
    base = Settings(**MODEL_PRESETS[args.model], model=args.model, cap_pixels_per_frame=args.cap_pixels_per_frame)
    if args.processor is not None:
        try:
            base = replace(base, **load_processor_settings(args.processor))
        except ToolError as exc:
            parser.error(f"--processor: {exc}")
    overrides = {k: getattr(args, k) for k in SETTINGS_FLAGS if getattr(args, k) is not None}
    if args.thresholds is not None:
        overrides["thresholds"] = tuple(args.thresholds)
    settings = replace(base, **overrides)
    for low, high in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels"),
                      ("min_frames", "max_frames")):
        if getattr(settings, low) > getattr(settings, high):
            parser.error(f"--{low.replace('_', '-')} ({getattr(settings, low)}) exceeds "
                         f"--{high.replace('_', '-')} ({getattr(settings, high)})")
    options = RenderOptions(
        line_color=tuple(args.line_color), line_thickness=args.line_thickness, color_by_scale=args.color_by_scale,
        stats_only=args.stats_only, sweep=args.sweep,
    )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    return args, settings, options, Scorer(device)


def _log_sink(message: str) -> None:
    """Write log lines above a running progress bar, if any."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        tqdm_module.tqdm.write(message, end="", file=sys.stderr)
    else:
        sys.stderr.write(message)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings nobody handled where they arose: one log line each, not warnings' two lines."""
    logger.warning(f"{category.__name__}: {message} ({Path(filename).name}:{lineno})")


LOG_FORMAT = "<level>{level: <7}</level> {extra[line]}\n{exception}"
LOG_LEVEL: list[str | None] = [None]  # set by configure_logging: the program's level, for its workers


def _log_format(record: dict) -> str:
    """Every log line one line, whatever file names or exception texts it quotes."""
    record["extra"]["line"] = one_line(record["message"])
    return LOG_FORMAT


def configure_logging(level: str) -> None:
    """The program's logging (process-wide: only cli() and the tool's worker processes call
    this): one line per message on stderr at `level`, Python warnings included."""
    logger.remove()
    logger.add(_log_sink, level=level, format=_log_format, colorize=sys.stderr.isatty())
    warnings.showwarning = _log_warning
    LOG_LEVEL[0] = level


def run(args: argparse.Namespace, settings: Settings, options: RenderOptions, scorer: Scorer,
        signals: StopSignals) -> int:
    """Analyse what the parsed command line asks for; the exit status."""
    logger.debug(f"device {scorer.device}; {settings}")
    try:
        inputs = [str(p) for p in args.inputs]
        if not inputs:
            inputs = [str(sample_image_path())]
            logger.info(f"no input given: using the sample photo {inputs[0]}")
        found = discover(inputs, args.output)
        check_write_paths(found, args.output, settings, options)
        check_output_dir(args.output)
        with OutputLock(args.output):
            if found.flat:
                return run_one(found.jobs[0], args, settings, options, scorer)
            hidden = f", {found.hidden} hidden entries skipped" if found.hidden else ""
            logger.info(f"{len(found.jobs)} inputs found, {found.skipped} other files skipped{hidden}; "
                        f"{args.workers} workers, device {scorer.device}")
            return run_batch(found, args.output, settings, options, scorer, args.workers, args.skip_existing,
                             show_progress=not args.quiet and len(found.jobs) > 1, signals=signals)
    except ToolError as exc:
        logger.error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logger.error(f"interrupted ({signals.name})")
        return signals.exit_code


def run_one(job: Job, args: argparse.Namespace, settings: Settings, options: RenderOptions, scorer: Scorer) -> int:
    """A single input file, outputs straight into the output directory."""
    maps = None
    if settings.target_ratio is not None:
        maps = score_input(job, settings, scorer)
        settings = resolve_thresholds(settings, maps)
    outcome = run_input(job, settings, options, scorer, args.skip_existing, maps, show_progress=not args.quiet)
    stats = outcome.stats
    if outcome.reused:
        logger.info(f"{job.label}: outputs of the same settings exist, skipped (--skip-existing)")
    elif job.kind == "image":
        (ow, oh), (rw, rh) = stats["original_size"], stats["resized_size"]
        logger.info(f"{job.label}: {ow}x{oh} -> {rw}x{rh}")
    counts = ", ".join(f"{n} x {ps}px" for ps, n in stats["patches_per_scale"].items())
    chosen = f" (threshold {stats['thresholds'][0]!r} for target ratio {settings.target_ratio:g})" \
        if settings.target_ratio is not None else ""
    logger.info(f"APT patches {stats['apt_patches']} of {stats['uniform_patches']} uniform "
                f"({stats['retained_ratio']:.1%} retained){chosen}: {counts}")
    if stats["apt_patches"] == stats["uniform_patches"] and settings.target_ratio is None:
        logger.info("no patch merged at these thresholds: see the heatmaps' colour bars or "
                    "explorer.html for the scores, or try --target-ratio 0.5 or --sweep")
    logger.info(f"wrote outputs to {args.output} (device {scorer.device})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The command line run inside this process (tests, notebooks), leaving the process's
    logging, signal handlers and garbage collector as they are; cli() is the program."""
    return run(*parse_args(argv), StopSignals())


def cli(argv: Sequence[str] | None = None) -> int:
    """The program (`python visualize_patches.py`, `visualize-patches`): one-line logs on stderr,
    SIGINT, SIGTERM and SIGHUP as Ctrl-C, then run()."""
    parsed = parse_args(argv)
    args = parsed[0]
    configure_logging("ERROR" if args.quiet else ("DEBUG" if args.verbose else "INFO"))
    gc.freeze()  # the imported modules live for the whole run: keep the collector from rescanning them
    with StopSignals() as signals:
        return run(*parsed, signals)


# Run as a script: see the top of the file (the imports first, then cli()).
