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

This file is the core, and can be copied alone: it analyses single images. The package
apt_vis/ next to it adds the rest, one module per capability, each importing this file
(never the reverse at import time; the core reaches them through extension()):
  apt_vis/batch.py        folders, globs, worker processes, summaries and the report
  apt_vis/video.py        video frames as the Qwen-VL video processors sample and resize them
  apt_vis/thresholds.py   --target-ratio, sweeps
  apt_vis/pictures.py     importance overlays, the summary panel, the batch plot
  apt_vis/pages.py        explorer.html and report.html (from apt_vis/static/)
  apt_vis/encode.py       the fast PNG writer (ISA-L) and the thread that encodes while pictures are drawn
  apt_vis/torch_backend.py  the scorers in torch and PatchTokenizer: --device cuda, upsample_mse

Sections, top to bottom:
  1. constants and settings      named numbers with their sources, the Settings dataclass
  2. geometry                    smart_resize, patch grids
  3. importance and masks        exact integer entropy and the other scorers in numpy, APT's masks
  4. rendering                   pure functions: arrays in, images out (heatmaps, patch borders)
  5. input and output            loading, encoding, staged atomic writes, the output lock
  6. pipeline                    one image: prepare, score, analyse, write; run_input for any input
  7. command line                parser, validation, run(), main() and cli()
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":
    # Run as a script (or as the installed command: apt_vis/cli.py). Until cli() installs its own
    # handlers, a stop signal while the imports run ends the run with one line instead of a traceback. Then
    # this file runs as the module `visualize_patches`, so that the apt_vis extensions (which
    # import visualize_patches) and worker processes all see one module, not a __main__ copy.
    import importlib.util

    def _stop_during_start_up(signum, frame):
        sys.stderr.write(f"ERROR   interrupted ({signal.Signals(signum).name}) during start-up\n")
        os._exit(128 + signum)

    for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(_signum, _stop_during_start_up)
    # the tool uses no BLAS: one OpenBLAS thread keeps the process single-threaded, so that batch
    # workers can be forked (apt_vis.batch._fork_is_safe) instead of started from a fork server
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _spec = importlib.util.spec_from_file_location("visualize_patches", __file__)
    _core = importlib.util.module_from_spec(_spec)
    sys.modules["visualize_patches"] = _core
    # cli() replaces loguru's default stderr handler with its own: without it loguru's import does
    # not add the one (each handler costs 5 ms). Only for this import: workers configure their own.
    _autoinit = os.environ.get("LOGURU_AUTOINIT")
    os.environ["LOGURU_AUTOINIT"] = "False"
    try:  # this file's code, compiled once already to run as __main__: run it again, not compile it again
        exec(sys._getframe(0).f_code, _core.__dict__)
    finally:
        if _autoinit is None:
            del os.environ["LOGURU_AUTOINIT"]
        else:
            os.environ["LOGURU_AUTOINIT"] = _autoinit
    sys.exit(_core.cli())

import argparse
import errno
import fcntl
import functools
import gc
import importlib
import importlib.util
import io
import json
import math
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
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
MODEL_NAMES = {"qwen2-vl": "Qwen2-VL", "qwen2.5-vl": "Qwen2.5-VL", "qwen3-vl": "Qwen3-VL"}  # in pictures and pages

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
# The numpy entropy counts histograms one horizontal strip of cells at a time, about this many
# pixels per strip, so that a strip's histograms stay in the CPU cache (1 MP at once: 21 MB of int64).
ENTROPY_STRIP_PIXELS = 2**16

DEFAULT_OUTPUT_DIR = "./visualizations"
SAMPLE_IMAGE = "pearl_earring.jpg"  # in apt_vis/data/ (provenance and licence: its README.md)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
CONTAINER_EXTENSIONS = {".tar": "tar", ".parquet": "parquet"}  # WebDataset shards, Parquet tables (apt_vis.datasets)

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
PANEL_TILE = (340, 380)  # (w, h) box of each picture in summary_panel.png (apt_vis/pictures.py)
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


# Names of this module's face that live in an extension, imported on first use: the notebook API
# (the README's "In Python") and the torch implementation (its "Library use").
LAZY_NAMES = {"PatchTokenizer": "torch_backend", "select_patches": "torch_backend",
              "analyze": "api", "Analysis": "api"}


def __getattr__(name: str):
    if name in LAZY_NAMES:
        try:
            return getattr(extension(LAZY_NAMES[name]), name)
        except ToolError as exc:  # without apt_vis the name is absent (hasattr, help() and dir() keep working)
            raise AttributeError(str(exc)) from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:  # so that a notebook's tab completion offers them too
    return sorted({*globals(), *(LAZY_NAMES if has_extensions() else ())})


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


# The scorers in numpy, so that a CPU run never imports torch. Their torch twins, the CUDA path and
# the reference they are tested against, are in apt_vis/torch_backend.py (PatchTokenizer, score_*).
# Entropy is bit-identical to score_entropy (the same exact int64 sums), laplacian equal to
# score_laplacian to 1e-12 relative (only the summation order differs), masks identical;
# upsample_mse uses torch's interpolate, imported on first use (tests/test_numpy_backend.py).


@functools.lru_cache(maxsize=8)
def _c_log2_c_fixed(n: int) -> np.ndarray:
    """(n + 1,) int64: c * round(log2(c) * 2**ENTROPY_FIXED_POINT_BITS), _log2_fixed_table times c,
    so that sum_b g[c_b] = sum over a patch's pixels of log2 c_bin(pixel) in fixed point."""
    c = np.arange(n + 1, dtype=np.float64)
    table = np.round(np.log2(np.maximum(c, 1)) * 2.0**ENTROPY_FIXED_POINT_BITS).astype(np.int64)
    return table * np.arange(n + 1, dtype=np.int64)


def _check_images_np(images_u8: np.ndarray) -> None:
    if images_u8.ndim != 5 or images_u8.shape[-1] != 3 or images_u8.dtype != np.uint8:
        raise ValueError(f"expected uint8 (B, T, H, W, 3), got {images_u8.dtype} {tuple(images_u8.shape)}")


def _check_doubling(patch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sorted(patch_sizes))
    if any(b != 2 * a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"patch sizes must double from scale to scale, got {sizes}")
    return sizes


def gray_bins_np(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int32 histogram bin in [0, 510), as gray_bins:
    floor(2 * (0.2989 R + 0.5870 G + 0.1140 B)) in exact integer arithmetic."""
    wr, wg, wb = LUMA_WEIGHTS_1E4
    acc = np.multiply(rgb[..., 0], wr, dtype=np.int32)  # at most 255 * 10**4: int32 is enough
    part = np.multiply(rgb[..., 1], wg, dtype=np.int32)
    acc += part
    acc += np.multiply(rgb[..., 2], wb, out=part, dtype=np.int32)
    acc //= LUMA_BIN_DIVISOR
    return acc


def _halve(hist: np.ndarray) -> np.ndarray:
    """(rows, cols, bins) histograms -> (rows // 2, cols // 2, bins), each the sum of its 2 x 2 children."""
    rows, cols = hist.shape[0] // 2, hist.shape[1] // 2
    pairs = hist[: 2 * rows, : 2 * cols].reshape(rows, 2, cols, 2, hist.shape[2])
    across = pairs[:, :, :, 0] + pairs[:, :, :, 1]  # (rows, 2, cols, bins)
    return across[:, 0] + across[:, 1]


def entropy_maps_np(images_u8: np.ndarray, patch_sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """(B, T, H, W, 3) uint8 -> {patch size: (B, rows, cols) float64 entropy in bits}, NaN in padded cells.

    Bit-identical to score_entropy + the NaN fill of importance_from_uint8: the same exact
    int64 sum N * H * 2**fixed_bits = N log2 N - sum_b c_b log2 c_b, taken over each complete
    cell's histogram instead of over its pixels, then the same float64 rounding. Padded cells
    are NaN, so their zero padding is never counted. The histograms of scale i + 1 are the sums
    of 2 x 2 cells of scale i: a complete cell is made of complete children.
    """
    _check_images_np(images_u8)
    sizes = _check_doubling(patch_sizes)
    b, t, h, w, _ = images_u8.shape
    base, top = sizes[0], sizes[-1]
    full_cols = w // base
    used_w = full_cols * base
    # strips are whole rows of the largest cells, so every cell lies in one strip
    strip_h = max(1, ENTROPY_STRIP_PIXELS // max(1, t * used_w * top)) * top
    sums = {ps: np.zeros((b, h // ps, w // ps), dtype=np.int64) for ps in sizes}  # sum_b c_b log2 c_b
    # flat (cell, bin) key offset of every pixel of a strip, shared by all strips; intp, which bincount
    # counts without converting its input first
    y, x = np.arange(strip_h) // base, np.arange(used_w) // base
    offsets = ((y[:, None] * full_cols + x[None, :]) * ENTROPY_BINS).astype(np.intp)  # (strip_h, used_w)
    # the larger scales' histograms are summed in the narrowest type that holds a top cell's count
    # (a quarter of the memory traffic of int64)
    count_type = np.uint16 if t * top * top <= np.iinfo(np.uint16).max else np.int64
    for k in range(b):
        for y0 in range(0, h, strip_h):
            rows = min(strip_h, h - y0) // base  # complete base cells in this strip
            if rows == 0 or full_cols == 0:
                continue
            pixels = images_u8[k, :, y0:y0 + rows * base, :used_w]  # (T, rows * base, used_w, 3)
            keys = np.add(gray_bins_np(pixels), offsets[: rows * base])  # (T, rows * base, used_w) flat (cell, bin)
            hist = np.bincount(keys.ravel(), minlength=rows * full_cols * ENTROPY_BINS)
            hist = hist.reshape(rows, full_cols, ENTROPY_BINS)
            for i, ps in enumerate(sizes):
                if i:
                    hist = _halve(hist.astype(count_type, copy=False))
                if hist.size == 0:
                    break
                g = _c_log2_c_fixed(t * ps * ps)
                r0 = y0 // ps
                sums[ps][k, r0:r0 + hist.shape[0], : hist.shape[1]] = g.take(hist).sum(axis=-1)
    maps = {}
    for ps in sizes:
        n = t * ps * ps
        deficit = _c_log2_c_fixed(n)[n] - sums[ps]  # table[n] * n - sum: exact int64 N * H * 2**fixed_bits
        scale = float(n * 2 ** (ENTROPY_FIXED_POINT_BITS - ENTROPY_QUANTUM_BITS))
        entropy = np.round(deficit.astype(np.float64) / scale) / 2.0**ENTROPY_QUANTUM_BITS
        out = np.full((b, *grid_shape(h, w, ps)), np.nan)
        out[:, : h // ps, : w // ps] = entropy
        maps[ps] = out
    return maps


def _gray_unit_np(images_u8: np.ndarray) -> np.ndarray:
    """(B, T, H, W, 3) uint8 -> (B, T, H, W) float64 luma in [0, 1], the same operations as _gray_unit."""
    wr, wg, wb = LUMA_WEIGHTS
    channel = [images_u8[..., c].astype(np.float64) / 255 for c in range(3)]
    return wr * channel[0] + wg * channel[1] + wb * channel[2]


def _aggregate_np(values: np.ndarray, patch_size: int, how: str) -> np.ndarray:
    """(B, T, H, W) per-pixel scores -> (B, rows, cols) per complete patch, NaN in padded cells."""
    b, t, h, w = values.shape
    rows, cols = h // patch_size, w // patch_size
    cells = values[:, :, : rows * patch_size, : cols * patch_size]
    cells = cells.reshape(b, t, rows, patch_size, cols, patch_size).transpose(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(b, rows, cols, t * patch_size * patch_size)
    if how == "mean":
        full = cells.mean(axis=-1)
    elif how == "max":
        full = cells.max(axis=-1)
    elif how == "std":
        full = cells.std(axis=-1, ddof=1)  # unbiased, as torch.std
    else:
        raise ValueError(f"unknown aggregate {how!r}")
    out = np.full((b, *grid_shape(h, w, patch_size)), np.nan)
    out[:, :rows, :cols] = full
    return out


def laplacian_maps_np(images_u8: np.ndarray, patch_sizes: Sequence[int], aggregate: str) -> dict[int, np.ndarray]:
    """(B, T, H, W, 3) uint8 -> {patch size: (B, rows, cols) float64}: |8-neighbour Laplacian| of
    [0, 1] gray (reflect padding) aggregated per patch, NaN in padded cells, as score_laplacian."""
    _check_images_np(images_u8)
    gray = _gray_unit_np(images_u8)
    h, w = gray.shape[-2:]
    mode = "reflect" if min(h, w) > 1 else "edge"  # torch's reflect needs 2 pixels; it replicates then
    padded = np.pad(gray, ((0, 0), (0, 0), (1, 1), (1, 1)), mode=mode)
    response = np.zeros_like(gray)
    for dy, kernel_row in enumerate(LAPLACIAN_KERNEL):
        for dx, weight in enumerate(kernel_row):
            shifted = padded[:, :, dy:dy + h, dx:dx + w]
            response += shifted if weight == 1.0 else weight * shifted  # x * 1.0 == x exactly
    np.abs(response, out=response)
    return {ps: _aggregate_np(response, ps, aggregate) for ps in patch_sizes}


# name -> (scorer, what its scores are, for colour bars). Only entropy is integer-exact
# and bit-identical across devices; the others are float64 arithmetic.
SCORERS: dict[str, tuple[Callable[..., dict[int, np.ndarray]], str]] = {
    "entropy": (lambda images, sizes, aggregate: entropy_maps_np(images, sizes), "entropy (bits)"),
    "laplacian": (laplacian_maps_np, "|Laplacian| of [0,1] gray"),
    "upsample_mse": (lambda images, sizes, aggregate: extension("torch_backend").upsample_mse_maps_np(
        images, sizes, aggregate), "down-up resampling MSE"),  # torch's interpolate: in apt_vis
}
AGGREGATES = ("mean", "max", "std")


def importance_maps_np(images_u8: np.ndarray, patch_sizes: Sequence[int], method: str,
                       aggregate: str = "mean") -> dict[int, np.ndarray]:
    """(B, T, H, W, 3) uint8 RGB -> {patch size: (B, rows, cols) float64}, NaN in padded cells:
    what PatchTokenizer(method=..., aggregate=...).importance_from_uint8 returns for the same
    pixels as (B, T, 3, H, W). Patch sizes must double from one scale to the next."""
    if method not in SCORERS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(SCORERS)}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; choose from {AGGREGATES}")
    return SCORERS[method][0](images_u8, tuple(patch_sizes), aggregate)


def select_patches_np(maps: Mapping[int, np.ndarray], thresholds: Sequence[float]) -> dict[int, np.ndarray]:
    """APT's patch choice from importance maps (smallest patch size first).

    From the largest scale down, a patch of scale i >= 1 is chosen where its
    score < thresholds[i-1] and no larger chosen patch covers it; every base
    cell not covered is a base patch. NaN (padded) cells are never chosen.
    Returns {patch size: (..., rows, cols) bool}; the chosen patches tile the grid once.
    """
    sizes = sorted(maps)
    if len(thresholds) != len(sizes) - 1:
        raise ValueError(f"{len(sizes)} scales need {len(sizes) - 1} thresholds, got {len(thresholds)}")
    masks: dict[int, np.ndarray] = {}
    covered = None
    for i in range(len(sizes) - 1, -1, -1):
        scores = np.asarray(maps[sizes[i]])
        rows, cols = scores.shape[-2:]
        if covered is None:
            covered = np.zeros(scores.shape, dtype=bool)
        else:
            covered = covered.repeat(2, axis=-2).repeat(2, axis=-1)[..., :rows, :cols]
        chosen = ~covered if i == 0 else (scores < thresholds[i - 1]) & ~covered
        masks[sizes[i]] = chosen
        covered = covered | chosen
    return {ps: masks[ps] for ps in sizes}


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

    Long because it draws one picture top to bottom (map, colour bar, ticks, legend); the
    geometry lives in heatmap_geometry.
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
    """Per-pixel (patch id, scale index) maps, both (H, W) int32, from per-scale masks: a chosen
    patch's pixels get its id (its scale's offset + row * cols + col) and its scale's index.

    Patch sizes double from scale to scale, so the maps are made on the grid of base cells (each
    scale's cells repeated 2**k times) and only that grid is repeated up to pixels."""
    sizes = sorted(masks)
    base = sizes[0]
    rows, cols = masks[base].shape
    cell_ids = np.full((rows, cols), -1, dtype=np.int32)
    cell_scale = np.full((rows, cols), -1, dtype=np.int32)
    offset = 0
    for k, ps in enumerate(sizes):
        mask = masks[ps]
        r, c = mask.shape
        step = ps // base
        ids = np.where(mask, offset + np.arange(r * c, dtype=np.int32).reshape(r, c), -1)
        ids = np.repeat(np.repeat(ids, step, axis=0), step, axis=1)[:rows, :cols]
        chosen = ids >= 0
        cell_ids[chosen] = ids[chosen]
        cell_scale[chosen] = k
        offset += r * c

    def to_pixels(grid: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(grid, base, axis=0), base, axis=1)[:height, :width]

    return to_pixels(cell_ids), to_pixels(cell_scale)


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


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR)


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


def load_image(path: Path, data: bytes | None = None) -> Image.Image:
    """Decode the first frame, apply the EXIF orientation, convert to RGB.

    data: the encoded image (a member of a shard or table), path then only names it.
    Raises ToolError naming the path for every way a file can fail to be an image; PIL's
    warnings about a damaged file (such as corrupt EXIF data) become one logged line.
    """
    if data is None:
        check_input_file(path)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
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


@functools.lru_cache(maxsize=1)
def has_extensions() -> bool:
    """Whether the apt_vis package is there: without it, this file alone still writes the
    core outputs (heatmaps, patch overlay, images, stats.json, maps) of single images."""
    return importlib.util.find_spec("apt_vis") is not None


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


def kind_by_name(name: str) -> str | None:
    """'image' or 'video' by the name's extension, else None."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    return None


def kind_of(path: Path) -> str | None:
    """'image' or 'video' by extension, else by content; None for other files."""
    return kind_by_name(path.name) or sniff_kind(path)


@dataclass(frozen=True)
class Job:
    """One input file and where its outputs go."""

    path: Path  # the file to read
    label: str  # how summaries name it: its path relative to the input root
    out_dir: Path  # this input's output folder
    kind: str  # 'image' or 'video'
    member: tuple | None = None  # inside a tar shard or Parquet file: how apt_vis.datasets reads it


def _inside(path: str, folder: str) -> bool:
    """Whether the real path lies in (or is) the real folder."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


PNG_MODES = ("L", "RGB", "RGBA")  # the 8-bit modes apt_vis.encode writes itself


def encode_png(image: Image.Image | np.ndarray, compress_level: int = 3) -> bytes:
    """Lossless PNG of a PIL image or an (H, W[, 3 | 4]) uint8 array: apt_vis.encode's writer for
    8-bit gray, RGB and RGBA (numpy and ISA-L: 4x PIL's speed, on any thread) when the package is
    there, else PIL's."""
    if has_extensions() and (isinstance(image, np.ndarray) or image.mode in PNG_MODES):
        return extension("encode").encode_png_pixels(np.asarray(image), compress_level)
    buf = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buf, format="PNG",
                                                                             compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_npz(arrays: Mapping[str, np.ndarray], compressed: bool = True) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def encode_json(data: object) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()


def encode_csv(rows: Sequence[Mapping], columns: Sequence[str]) -> bytes:
    import csv  # summaries and sweeps only: a single image's run does without it

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
    """Context manager: a hidden staging folder whose files are moved into out_dir when the block
    succeeds; when it fails (an error, a full disk, Ctrl-C), the staging folder and any folder
    this created are deleted, so a failed input leaves nothing.

    A folder that does not exist yet is staged beside it (staging_beside: in its parent) and
    renamed into place whole, so it appears complete or not at all; per input that is two
    directory operations fewer than staging inside it, which counts on network file systems.
    Into an existing folder (or one that appeared meanwhile, or whose name is too long to stage
    beside it), the staged files are renamed one by one, stats.json last (an older one removed
    first): a folder with a stats.json is complete. What a killed run left staged is removed
    first (the output lock makes sure no other run is writing there)."""

    def __init__(self, out_dir: Path, what: str = "outputs"):
        self.out_dir = out_dir
        self.what = what
        self.staging: Path | None = None
        self.created: list[Path] = []  # folders made for this block, out_dir's parents included
        self.made_out_dir = False  # out_dir itself is one of them
        self.whole = False  # staged beside out_dir, to be renamed into place whole

    def __enter__(self) -> Path:
        try:
            if not os.path.lexists(self.out_dir):
                self.created = _make_folders(self.out_dir.parent)
                beside = staging_beside(self.out_dir)
                try:
                    try:
                        os.mkdir(beside)
                    except FileExistsError:  # left by a killed run
                        shutil.rmtree(beside, ignore_errors=True)
                        os.mkdir(beside)
                    self.staging, self.whole = beside, True
                    return self.staging
                except OSError as exc:
                    if exc.errno != errno.ENAMETOOLONG:  # the prefix made the name too long: stage inside
                        raise
            made = _make_folders(self.out_dir)
            self.created += made
            self.made_out_dir = bool(made)
            if not made:  # a folder made just now holds nothing stale
                for stale in self.out_dir.glob(f"{STAGING_PREFIX}*"):
                    shutil.rmtree(stale, ignore_errors=True)
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out_dir))
        except OSError as exc:
            _remove_empty_folders(self.created)
            raise ToolError(f"{self.out_dir}: cannot create output directory ({exc.strerror or exc})") from None
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        placed = False
        try:
            if exc_type is None:
                placed = self.whole and self._rename_whole()
                if not placed:
                    self._move_into_place()
            elif issubclass(exc_type, OSError):
                raise ToolError(f"{self.out_dir}: writing {self.what} failed ({exc.strerror or exc})") from None
        except OSError as err:
            exc_type = type(err)
            raise ToolError(f"{self.out_dir}: writing {self.what} failed ({err.strerror or err})") from None
        finally:
            if not placed:
                try:
                    os.rmdir(self.staging)  # empty after the renames: one call, not rmtree's walk
                except OSError:
                    shutil.rmtree(self.staging, ignore_errors=True)
            if exc_type is not None:
                _remove_empty_folders(self.created)

    def _rename_whole(self) -> bool:
        """Rename the folder staged beside out_dir into place; False if out_dir appeared meanwhile
        with something in it (another input's folder made inside it): its files are then moved."""
        try:
            os.rename(self.staging, self.out_dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return False
        return True

    def _move_into_place(self) -> None:
        """Rename the staged files into out_dir, stats.json last. If a rename fails in a folder
        made for this block, the files moved already go again (the folder is then removed)."""
        items = sorted(self.staging.iterdir(), key=lambda item: (item.name == "stats.json", item.name))
        if items and items[-1].name == "stats.json" and not self.made_out_dir:
            (self.out_dir / "stats.json").unlink(missing_ok=True)
        moved = []
        try:
            for item in items:
                os.replace(item, self.out_dir / item.name)
                moved.append(self.out_dir / item.name)
        except OSError:
            if self.made_out_dir:
                for path in moved:
                    path.unlink(missing_ok=True)
            raise


def staging_beside(out_dir: Path) -> Path:
    """Where staged_output stages a folder that does not exist yet: a hidden folder beside it, named
    after it (one input, one name: under the output lock, no other run stages there)."""
    return out_dir.parent / f"{STAGING_PREFIX}{out_dir.name}"


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


class WritePaths:
    """The checks made before anything is written: ToolError unless every path a run writes stays
    inside out_root, links followed, and is not an input nor (for folders) holds one. Staging
    folders and temporary files get fresh random names. check_write_paths checks a single run's
    files; apt_vis.batch.check_batch_paths each input's folder, its files and the summaries."""

    def __init__(self, jobs: Iterable[Job], out_root: Path):
        self.out_root, self.out_real = out_root, os.path.realpath(out_root)
        real_folder = functools.lru_cache(maxsize=None)(os.path.realpath)
        self.inputs: dict[str, Path] = {}  # real path -> input; a link counts as itself and as its target
        for job in jobs:
            entry = os.path.join(real_folder(str(job.path.parent)), job.path.name)
            self.inputs[entry] = job.path
            if os.path.islink(entry):
                self.inputs[os.path.realpath(entry)] = job.path
        self.holders: dict[str, Path] = {}  # every folder above an input -> that input
        for real, path in self.inputs.items():
            folder = os.path.dirname(real)
            while folder not in self.holders:
                self.holders[folder] = path
                folder, below = os.path.dirname(folder), folder
                if folder == below:
                    break

    def check(self, real: str, shown: Path, what: str, folder: bool) -> None:
        if not _inside(real, self.out_real):
            raise ToolError(f"{shown}: {what} would be written outside {self.out_root} through a symbolic link; "
                            "remove the link or choose another -o")
        if real in self.inputs:
            raise ToolError(f"{self.inputs[real]}: is one of the outputs ({what}) in {self.out_root}; choose another -o")
        if folder and real in self.holders:
            raise ToolError(f"{shown}: the {what} would hold the input {self.holders[real]}; choose another -o")

    def check_names(self, folder: str, shown: Path, names: Iterable[str], whose: str) -> None:
        """Only names already there can be an input or a link (one directory read, not a stat per name)."""
        try:
            with os.scandir(folder) as it:
                present = {e.name: e.is_symlink() for e in it}
        except OSError:  # not there yet (or unreadable: then writing fails with its own one line)
            return
        for name in names:
            if name in present:
                path = os.path.join(folder, name)
                self.check(os.path.realpath(path) if present[name] else path, shown / name, f"{name}{whose}",
                           folder=True)


def check_write_paths(job: Job, out_root: Path, settings: Settings, options: RenderOptions) -> None:
    """WritePaths' checks for a single input, whose files (and the lock) go straight into out_root."""
    paths = WritePaths([job], out_root)
    paths.check_names(paths.out_real, out_root, (LOCK_NAME, *output_names(job.kind, settings, options)), "")


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
    data = None if job.member is None else extension("datasets").read_member(job)
    original = load_image(job.path, data)
    watch.lap("load")
    return prepare_loaded(job, original, settings, pictures, watch)


def prepare_loaded(job: Job, original: Image.Image, settings: Settings, pictures: bool,
                   watch: Stopwatch | None = None) -> Prepared:
    """prepare_image for an image already loaded as RGB (the CLI's file, or analyze()'s image)."""
    watch = watch or Stopwatch()
    resized = resize_for_qwen2vl(original, settings, str(job.path))
    watch.lap("resize")
    jpeg = preview = None
    if pictures:
        jpeg, preview = original_pictures(original)
        watch.lap("encode")
    return Prepared(job, (original.width, original.height), resized, jpeg, preview, watch.ms)


def original_pictures(original: Image.Image) -> tuple[bytes, Image.Image]:
    """original_image.jpg and the summary panel's copy of the original, at the panel's size (one
    resize from the full image)."""
    return encode_jpeg(original), _fit(original, *PANEL_TILE)


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
        Inputs of equal shape are scored together, self.batch at a time. On the CPU by numpy (no
        torch); on CUDA by PatchTokenizer, and the maps cross to numpy here."""
        if self.device == "cpu":
            results = []
            for image in images:
                tube = image if image.ndim == 4 else image[None]  # (T, H, W, 3)
                maps = importance_maps_np(tube[None], settings.patch_sizes, settings.method, settings.aggregate)
                results.append({ps: m[0] for ps, m in maps.items()})
            return results
        return extension("torch_backend").cuda_maps(images, settings, self.device, self.batch)


CPU = Scorer("cpu")


def compute_masks(maps: Mapping[int, np.ndarray], thresholds: Sequence[float]) -> dict[int, np.ndarray]:
    """The APT choice for numpy maps (the same rule as select_patches on the device, in numpy)."""
    return select_patches_np(maps, thresholds)


def between_images() -> None:
    """What a process that analyses input after input does between two: apt_vis.machine trims the
    heap every IMAGE_TRIM_EVERY images (the core alone analyses one image a run)."""
    if has_extensions():
        machine = extension("machine")
        machine.release_free_memory(every=machine.IMAGE_TRIM_EVERY)


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


IMAGE_PICTURES = ("patches_visualization.jpg", "original_image.jpg", "resized_image.jpg")
# apt_vis/pictures.py's, with the importance overlays (the thumbnail is the batch report's)
EXTRA_IMAGE_PICTURES = ("explorer.html", "summary_panel.png", "patches_thumbnail.jpg")
VIDEO_PICTURES = ("patches_visualization.mp4", "patches_visualization.gif", "patches_thumbnail.jpg")
SWEEP_NAMES = ("threshold_sweep.csv", "threshold_sweep.png")


def output_names(kind: str, settings: Settings, options: RenderOptions) -> list[str]:
    """Every file one input ('image' or 'video') writes into its folder: the one registry."""
    names = ["stats.json", "importance_maps.npz"]
    if not options.stats_only:
        if kind == "video":
            names += [*VIDEO_PICTURES, *(f"importance_map_scale_{ps}.mp4" for ps in settings.patch_sizes)]
        else:
            names += [heatmap_name(ps) for ps in settings.patch_sizes] + list(IMAGE_PICTURES)
            if has_extensions():
                names += [overlay_name(ps) for ps in settings.patch_sizes] + list(EXTRA_IMAGE_PICTURES)
    if options.sweep:
        names += SWEEP_NAMES[:1] if options.stats_only else SWEEP_NAMES
    return names


def maps_npz(maps: Mapping[int, np.ndarray], masks: Mapping[int, np.ndarray]) -> bytes:
    arrays = {f"scale_{ps}": m.astype(np.float32) for ps, m in maps.items()}
    arrays.update({f"mask_{ps}": m for ps, m in masks.items()})
    # stored: one image's maps are small (29 KB against 20 KB deflated for a 1 MP image) and a
    # batch saves 0.7 ms per image
    return encode_npz(arrays, compressed=False)


def scale_heatmap(result: ImageResult, patch_size: int) -> Image.Image:
    """importance_map_scale_<patch_size>.png of one image."""
    settings = result.settings
    i = settings.patch_sizes.index(patch_size)
    threshold = settings.thresholds[i - 1] if i >= 1 else None
    return render_heatmap(result.maps[patch_size], patch_size, result.prepared.resized.shape[:2], threshold,
                          patch_counts(result.masks)[patch_size], SCORERS[settings.method][1])


def patch_overlay(result: ImageResult, options: RenderOptions) -> tuple[np.ndarray, Image.Image]:
    """The chosen patches' borders on the resized image: (the array, the picture of
    patches_visualization.jpg, with a legend of the scales' colours under --color-by-scale)."""
    colors = scale_palette(result.settings.num_scales) if options.color_by_scale else None
    overlay = draw_patch_borders(result.prepared.resized, result.masks, options.line_color, options.line_thickness,
                                 colors)
    overlay_image = Image.fromarray(overlay)
    if colors is not None:
        overlay_image = add_scale_legend(overlay_image, patch_counts(result.masks), colors)
    return overlay, overlay_image


@dataclass
class PngPicture:
    """A picture to be written as PNG: (H, W[, C]) uint8 pixels and the zlib level."""

    pixels: np.ndarray
    compress_level: int


class PictureTasks:
    """One image's output files, each made by a task (render, encode) in the order added. A task
    may return a PngPicture, encoded here; apt_vis.encode.PictureThreads encodes those on a helper thread. As a
    context manager, so that a subclass can clean up after an error."""

    def __init__(self) -> None:
        self.files: dict[str, object] = {}

    def __enter__(self) -> "PictureTasks":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass

    def add(self, name: str, make: Callable[..., bytes | PngPicture] | bytes, *args) -> None:
        """The file `name`: the bytes given, or make(*args)'s (a PngPicture: encoded)."""
        data = make(*args) if callable(make) else make
        self.files[name] = self.encode(data) if isinstance(data, PngPicture) else data

    def encode(self, picture: PngPicture) -> object:
        return encode_png(picture.pixels, picture.compress_level)

    def result(self) -> dict[str, bytes]:
        """Every file's bytes, keyed by name, in the order added."""
        return dict(self.files)


def _heatmap_png(result: ImageResult, patch_size: int) -> PngPicture:
    # flat colours and text: zlib's level 1 is as small as its level 3 (+2%) in half the time;
    # ISA-L's level 1 (apt_vis.encode) is 12% larger again, in a tenth of zlib's level-1 time
    return PngPicture(np.asarray(scale_heatmap(result, patch_size)), compress_level=1)


def image_files(result: ImageResult, stats: Mapping, options: RenderOptions) -> dict[str, bytes]:
    """All per-image outputs, encoded, keyed by file name. The order of the pictures keeps the
    PNG encoder thread (apt_vis.encode.PictureThreads) busy: the long PNGs early, between other work."""
    p, settings = result.prepared, result.settings
    counts = patch_counts(result.masks)
    tasks = extension("encode").PictureThreads(not options.stats_only) if has_extensions() else PictureTasks()
    with tasks:
        tasks.add("importance_maps.npz", maps_npz, result.maps, result.masks)
        if options.sweep:
            sweep = extension("thresholds").sweep_files(
                [result.maps], settings, sum(counts.values()),
                f"Threshold sweep: {one_line(Path(p.job.label).name)}", plot=not options.stats_only)
            for name, data in sweep.items():
                tasks.add(name, data)
        if options.stats_only:
            return tasks.result()
        pictures = extension("pictures") if has_extensions() else None
        sizes = list(settings.patch_sizes)
        if pictures is not None:
            for ps in sizes[:2]:
                tasks.add(overlay_name(ps), pictures.importance_overlay_picture, result, ps)
            tasks.add("patches_thumbnail.jpg", pictures.thumbnail_jpeg, result, options)
        overlay, overlay_image = patch_overlay(result, options)
        tasks.add("patches_visualization.jpg", encode_jpeg, overlay_image)
        if pictures is not None:
            tasks.add("summary_panel.png", pictures.summary_panel_picture, result, stats, overlay, overlay_image)
            for ps in sizes[2:]:
                tasks.add(overlay_name(ps), pictures.importance_overlay_picture, result, ps)
        for ps in sizes:
            tasks.add(heatmap_name(ps), _heatmap_png, result, ps)
        tasks.add("original_image.jpg", p.original_jpeg or b"")
        resized_jpeg = encode_jpeg(Image.fromarray(p.resized))
        tasks.add("resized_image.jpg", resized_jpeg)
        if pictures is not None:
            tasks.add("explorer.html", pictures.explorer_page, result, stats, options, resized_jpeg)
        return tasks.result()


def finish_image(result: ImageResult, options: RenderOptions) -> dict:
    """Render and write one image's outputs (worker-safe: numpy, PIL, matplotlib only)."""
    stats, files = image_outputs(result, options)
    write_files(result.prepared.job.out_dir, files)
    return stats


def image_outputs(result: ImageResult, options: RenderOptions) -> tuple[dict, dict[str, bytes]]:
    """One image's stats.json record and every output file, encoded, keyed by name."""
    watch = Stopwatch()
    stats = image_stats(result)
    files = image_files(result, stats, options)
    watch.lap("render")
    stats["timings_ms"]["render"] = round(watch.ms["render"], 1)
    stats["timings_ms"]["total"] = round(sum(v for k, v in stats["timings_ms"].items() if k != "total"), 1)
    files["stats.json"] = encode_json(stats)
    return stats, files


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


def analyse(prepared: Prepared, maps: Mapping[int, np.ndarray], settings: Settings, device: str) -> ImageResult:
    """The APT choice for one scored image, at the settings' (final) thresholds."""
    return ImageResult(prepared, dict(maps), compute_masks(maps, settings.thresholds), settings, device)


def score_input(job: Job, settings: Settings, scorer: Scorer = CPU) -> list[dict[int, np.ndarray]]:
    """An input's maps, one per image or temporal patch (pass 1 of --target-ratio)."""
    if job.kind == "video":
        return extension("video").video_tube_maps(job, settings, scorer)
    prepared = prepare_image(job, settings, pictures=False)
    maps = scorer.maps([prepared.resized], settings)
    between_images()
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
        return extension("video").run_video(job, settings, options, scorer, maps, show_progress)
    prepared = prepare_image(job, settings, pictures=not options.stats_only)
    watch = Stopwatch()
    image_maps = maps[0] if maps else scorer.maps([prepared.resized], settings)[0]
    result = analyse(prepared, image_maps, settings, scorer.device)
    between_images()
    watch.lap("importance")
    prepared.timings.update(watch.ms)
    return Outcome(finish_image(result, options), [image_maps])


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP all act as Ctrl-C: the first two raise KeyboardInterrupt (the run
    stops; staged outputs leave nothing behind), later ones are only recorded. Exit status: 128 +
    the first signal's number. apt_vis.batch.BatchSignals adds what a batch's worker processes need."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def installed(self) -> bool:
        """Whether this object's handlers are the process's (cli(); main() leaves the process's alone)."""
        return bool(self._previous)

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        if len(self.received) <= 2:
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.received[0]).name if self.received else "SIGINT"

    @property
    def exit_code(self) -> int:
        return 128 + self.received[0] if self.received else EXIT_INTERRUPTED


# ---------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a single line on stderr, exit 2 (or, with raise_errors set,
    as analyze() uses it, a ValueError of that line)."""

    raise_errors = False

    def error(self, message: str):  # noqa: D401 - argparse API
        if self.raise_errors:
            raise ValueError(message)
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
    """The command line: one add_argument per flag, in their help groups (long, and flat on purpose)."""
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
                       "merge and temporal sizes, min/max pixels, mean, std and resampling are read from it (needs transformers).")

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
    machine = extension("machine") if has_extensions() else None  # the core alone analyses single images
    workers = (f"one per CPU core, fewer if the available memory would not give each "
               f"{machine.WORKER_MEMORY_BUDGET // 2**20} MB: %(default)s" if machine else "%(default)s")
    batch.add_argument("--workers", type=positive_int, default=machine.default_workers() if machine else 1, metavar="N",
                       help=f"Worker processes that decode, resize, render and write (default: {workers}).")
    batch.add_argument("--skip-existing", action="store_true",
                       help="Reuse inputs whose outputs of the same settings already exist (resume a run).")
    batch.add_argument("--stats-only", action="store_true",
                       help="Numbers only: stats.json and importance_maps.npz per input, no pictures.")
    batch.add_argument("--image-column", metavar="COL",
                       help="Parquet inputs: the column of encoded images (default: the first binary column, "
                       "or struct with a 'bytes' field).")
    batch.add_argument("--id-column", metavar="COL",
                       help="Parquet inputs: the column naming each row (default: the image struct's 'path', "
                       "else the row number).")
    batch.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="'local': worker processes on this machine; 'ray': a Ray Data pipeline, on a cluster "
                       "(needs pip install 'ray[data]'; -o must be writable by every worker; its workers score on their CPUs) "
                       "(default: %(default)s).")
    batch.add_argument("--ray-address", metavar="ADDR",
                       help="--engine ray: the cluster to join (default: $RAY_ADDRESS, else a local Ray for the run).")

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
                     help="Where to score: 'cpu' (numpy, no torch), 'cuda' (torch), or 'auto': CUDA when an "
                          "NVIDIA GPU is visible (/dev/nvidia* or /proc/driver/nvidia, CUDA_VISIBLE_DEVICES not "
                          "empty) and torch.cuda.is_available(), else cpu (default: %(default)s).")
    verbosity = run.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="Print errors only.")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="Print debug messages too.")
    run.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


SETTINGS_FLAGS = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "method",
                  "aggregate", "target_ratio", "fps", "min_frames", "max_frames", "video_min_pixels",
                  "video_max_pixels")  # None when not given; --model and --processor set them otherwise


def parse_args(argv: Sequence[str] | None,
               raise_errors: bool = False) -> tuple[argparse.Namespace, Settings, RenderOptions, Scorer]:
    """The command line checked and turned into settings; a usage error exits 2 (raise_errors:
    raises ValueError instead)."""
    parser = build_parser()
    parser.raise_errors = raise_errors
    args = parser.parse_args(argv)
    if args.engine == "ray" and args.device == "cuda":
        parser.error("--engine ray scores with numpy on its workers' CPUs: --device cuda is not supported "
                     "with it (use the local engine on a GPU machine)")
    device = "cpu"  # the core alone, and Ray's workers, analyse on the CPU: --device auto stays there
    if args.device == "cuda" or (args.device == "auto" and args.engine == "local" and has_extensions()
                                 and extension("machine").nvidia_gpu_visible()):
        try:
            device = extension("torch_backend").resolve_device(args.device)  # the CUDA path
        except ToolError as exc:
            parser.error(str(exc) if str(exc).startswith("--device") else f"--device cuda: {exc}")
    if args.method != "entropy" and args.thresholds is None and args.target_ratio is None:
        parser.error(f"--method {args.method} needs --thresholds or --target-ratio "
                     "(the default thresholds are entropy bits)")
    if args.aggregate is not None and args.method != "laplacian":
        parser.error("--aggregate applies to --method laplacian only")
    base = Settings(**MODEL_PRESETS[args.model], model=args.model, cap_pixels_per_frame=args.cap_pixels_per_frame)
    if args.processor is not None:
        try:
            base = replace(base, **extension("processor").load_processor_settings(args.processor))
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
        path = Path(inputs[0])
        if len(inputs) == 1 and path.is_file() and path.suffix.lower() not in CONTAINER_EXTENSIONS:
            return run_one(Job(path, str(path), args.output, kind_of(path) or "image"), args, settings, options, scorer)
        return extension("batch").run_inputs(inputs, args, settings, options, scorer, signals)
    except ToolError as exc:
        logger.error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logger.error(f"interrupted ({signals.name})")
        return signals.exit_code


def run_one(job: Job, args: argparse.Namespace, settings: Settings, options: RenderOptions, scorer: Scorer) -> int:
    """A single input file, outputs straight into the output directory."""
    if options.sweep or settings.target_ratio is not None:
        extension("thresholds")
    if job.kind == "video":
        extension("video")
    check_write_paths(job, args.output, settings, options)
    check_output_dir(args.output)
    with OutputLock(args.output):
        return analyse_one(job, args, settings, options, scorer)


def analyse_one(job: Job, args: argparse.Namespace, settings: Settings, options: RenderOptions,
                scorer: Scorer) -> int:
    """run_one's work once the output directory is checked and locked."""
    maps = None
    if settings.target_ratio is not None:
        maps = score_input(job, settings, scorer)
        settings = extension("thresholds").resolve_thresholds(settings, maps)
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
    if has_extensions():
        extension("machine").keep_freed_memory()
    with StopSignals() as signals:
        return run(*parsed, signals)


# Run as a script: see the top of the file (the imports first, then cli()).
