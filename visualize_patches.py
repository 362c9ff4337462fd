#!/usr/bin/env python3
"""See what Adaptive Patch Tokenization (APT) does to an image before Qwen2-VL sees it.

The tool loads an image, resizes it exactly as Qwen2-VL's image processor does
(smart_resize + PIL bicubic + OpenAI-CLIP normalisation), scores every patch at
several scales (14, 28, 56 px by default) by the Shannon entropy of its
grayscale histogram, turns the scores into APT's patch choice (low-entropy
regions get large patches) and writes heatmaps, a patch overlay, the raw maps
and a stats.json with the token accounting.

    python visualize_patches.py photo.jpg -o out/

Sections, top to bottom:
  1. constants and settings      named numbers with their sources, the Settings dataclass
  2. geometry                    smart_resize, patch grids
  3. importance and masks        exact integer entropy, PatchTokenizer
  4. rendering                   pure functions: arrays in, images out
  5. input and output            loading, encoding, staged atomic writes
  6. pipeline                    one image from path to files
  7. command line                parser, validation, main()
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from PIL import Image, ImageOps, UnidentifiedImageError

__version__ = "1.0.0"

# ---------------------------------------------------------------------------
# 1. Constants and settings
# ---------------------------------------------------------------------------

# OpenAI CLIP normalisation, as transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD
# (transformers/utils/constants.py), used by every Qwen2-VL image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2-VL image processor defaults (Qwen2VLImageProcessor: size shortest_edge /
# longest_edge, patch_size, temporal_patch_size, merge_size) and smart_resize's
# aspect-ratio limit.
QWEN2VL_MIN_PIXELS = 56 * 56
QWEN2VL_MAX_PIXELS = 28 * 28 * 1280
QWEN2VL_MAX_ASPECT_RATIO = 200

# APT reference (arXiv 2510.18091, entropy_utils.py): grayscale by the ITU-R 601
# luma weights 0.2989 / 0.5870 / 0.1140 and a 512-bin histogram over [0, 256).
# bin = floor(2 * (0.2989 R + 0.5870 G + 0.1140 B)) is computed exactly in
# integers as (2989 R + 5870 G + 1140 B) // 5000, so it cannot differ between
# float32 and float64, CPU and GPU.
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

DEFAULT_OUTPUT_DIR = "./visualizations"
SAMPLE_IMAGE = "grace_hopper.jpg"  # shipped by matplotlib, see matplotlib.cbook.get_sample_data
BORDER_GREEN = (0, 255, 0)
BORDER_THICKNESS = 2
PADDED_CELL_COLOR = "#9fb8cf"  # pale steel blue: absent from 'inferno', so padded cells stand out
THRESHOLD_LINE_COLOR = "#00e5ff"
JPEG_QUALITY = 95
HEATMAP_CMAP = "inferno"

# Exit codes of main().
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ToolError(Exception):
    """A failure the user can act on; main() prints it as one line and exits 1."""


@dataclass(frozen=True)
class Settings:
    """Every knob of the pipeline, with the defaults in this one place."""

    patch_size: int = 14  # base (ViT) patch side in pixels
    temporal_patch_size: int = 2  # frames per temporal patch; an image counts as one
    merge_size: int = 2  # Qwen2-VL merges merge_size x merge_size patches into one LLM token
    thresholds: tuple[float, ...] = (3.0, 2.0)  # thresholds[i-1] applies to patch_size * 2**i
    min_pixels: int = QWEN2VL_MIN_PIXELS  # smart_resize lower bound on h*w
    max_pixels: int = QWEN2VL_MAX_PIXELS  # smart_resize upper bound on h*w
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

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
    x = rgb.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def recover_uint8(normalized: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., 3, H, W) CLIP-normalised float -> (..., 3, H, W) uint8 by rounding.

    Exact for tensors that came from uint8 pixels: float32 round-off is ~1e-4
    of a level, far from the 0.5 that rounding needs.
    """
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=normalized.dtype, device=normalized.device).view(shape)
    std_t = torch.tensor(std, dtype=normalized.dtype, device=normalized.device).view(shape)
    levels = (normalized * std_t + mean_t) * 255
    return levels.round().clamp(0, 255).to(torch.uint8)


def gray_bins(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> (..., H, W) int32 histogram bin in [0, 510).

    bin = floor(2 * (0.2989 R + 0.5870 G + 0.1140 B)), in exact integer arithmetic.
    """
    x = rgb.to(torch.int32)
    wr, wg, wb = LUMA_WEIGHTS_1E4
    return (wr * x[..., 0, :, :] + wg * x[..., 1, :, :] + wb * x[..., 2, :, :]) // LUMA_BIN_DIVISOR


@functools.lru_cache(maxsize=32)
def _log2_fixed_table(n: int, device: torch.device) -> torch.Tensor:
    """(n + 1,) int64: round(log2(c) * 2**ENTROPY_FIXED_POINT_BITS), computed once on the CPU."""
    c = np.arange(n + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        table = np.where(c > 0, np.round(np.log2(np.maximum(c, 1)) * 2.0**ENTROPY_FIXED_POINT_BITS), 0)
    return torch.from_numpy(table.astype(np.int64)).to(device)


def patch_entropy(bins: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Shannon entropy in bits of each patch's 512-bin histogram.

    bins: (B, T, H, W) integer bins; the T frames of a temporal patch share one
    histogram (T = 1 for images). Pixels past the right/bottom edge count as
    zero padding (bin 0), as in the APT reference.
    Returns (B, rows, cols) float64, bit-identical on every device.

    H = log2 N - (1/N) sum_b c_b log2 c_b = (1/N) sum_pixels (log2 N - log2 c_bin(pixel)),
    with N = T * patch_size**2 and the counts c by scatter-add (no one-hot tensor).
    """
    b, t, h, w = bins.shape
    rows, cols = grid_shape(h, w, patch_size)
    padded = F.pad(bins, (0, cols * patch_size - w, 0, rows * patch_size - h))
    n = t * patch_size * patch_size
    num_patches = b * rows * cols
    # (B, T, rows, p, cols, p) -> (patches, N): each patch's pixels contiguous
    cells = padded.view(b, t, rows, patch_size, cols, patch_size).permute(0, 2, 4, 1, 3, 5).reshape(num_patches, n)
    offsets = torch.arange(num_patches, device=bins.device, dtype=torch.int64).mul_(ENTROPY_BINS)
    keys = cells.to(torch.int64).add_(offsets[:, None])  # (patches, N) flat (patch, bin) index
    counts = torch.zeros(num_patches * ENTROPY_BINS, dtype=torch.int32, device=bins.device)
    counts.scatter_add_(0, keys.view(-1), torch.ones(1, dtype=torch.int32, device=bins.device).expand(keys.numel()))
    table = _log2_fixed_table(n, bins.device)
    per_pixel = table[counts[keys].to(torch.int64)]  # (patches, N) fixed-point log2 c
    deficit = table[n] * n - per_pixel.sum(dim=1)  # exact int64: N * H * 2**fixed_bits
    scale = float(n * 2 ** (ENTROPY_FIXED_POINT_BITS - ENTROPY_QUANTUM_BITS))
    entropy = torch.round(deficit.to(torch.float64) / scale) / 2.0**ENTROPY_QUANTUM_BITS
    return entropy.view(b, rows, cols)


def entropy_maps(
    images_u8: torch.Tensor, patch_sizes: Sequence[int]
) -> dict[int, torch.Tensor]:
    """(B, T, 3, H, W) uint8 -> {patch size: (B, rows, cols) float64 entropy, NaN where padded}."""
    bins = gray_bins(images_u8)
    h, w = bins.shape[-2:]
    maps = {}
    for ps in patch_sizes:
        m = patch_entropy(bins, ps)
        pad = torch.from_numpy(padded_cells(h, w, ps)).to(m.device)
        maps[ps] = m.masked_fill(pad, float("nan"))
    return maps


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

    Works on whatever device its input lives on; all scales are
    patch_size * 2**i for i < num_scales.
    """

    def __init__(
        self,
        num_scales: int = 3,
        base_patch_size: int = 14,
        thresholds: Sequence[float] = (3.0, 2.0),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        if len(thresholds) != num_scales - 1:
            raise ValueError(f"{num_scales} scales need {num_scales - 1} thresholds, got {len(thresholds)}")
        self.num_scales = num_scales
        self.base_patch_size = base_patch_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.mean = tuple(mean)
        self.std = tuple(std)

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        return tuple(self.base_patch_size * 2**i for i in range(self.num_scales))

    @torch.inference_mode()
    def compute_importance_maps(self, normalized_images: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, 3, H, W) or (B, T, 3, H, W) normalised -> {patch size: (B, rows, cols) float64 bits}.

        With a T axis, the T frames of each temporal patch share one histogram.
        Padded edge cells are NaN.
        """
        x = normalized_images
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"expected (B, 3, H, W) or (B, T, 3, H, W), got {tuple(normalized_images.shape)}")
        return entropy_maps(recover_uint8(x, self.mean, self.std), self.patch_sizes)

    @torch.inference_mode()
    def construct_masks(self, maps: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{patch size: scores} -> {patch size: bool mask of chosen patches}."""
        return select_patches(maps, self.thresholds)


# ---------------------------------------------------------------------------
# 4. Rendering (pure: arrays in, images out; nothing touches the disk)
# ---------------------------------------------------------------------------


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
        out[lines] = palette[scale_of[lines]]
    return out


def _figure_to_image(fig) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def color_range(values: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) over the finite cells only, widened when all are equal."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


HEATMAP_DPI = 100


def heatmap_layout(rows: int, cols: int) -> tuple[float, float, float, float, float, float]:
    """Heatmap figure geometry in inches: (fig_w, fig_h, map_left, map_bottom, map_w, map_h).

    Square cells within a 6 x 8 in box; margins hold labels, colorbar and legend.
    """
    map_w = min(6.0, 8.0 * cols / rows)
    map_h = map_w * rows / cols
    left, right, bottom, top = 0.8, 1.6, 1.0, 0.7
    return left + map_w + right, bottom + map_h + top, left, bottom, map_w, map_h


def heatmap_map_box(rows: int, cols: int) -> tuple[float, float, float, float]:
    """Where the map lies in the rendered heatmap: (x0, y0, x1, y1) in pixels from the top left."""
    fig_w, fig_h, left, bottom, map_w, map_h = heatmap_layout(rows, cols)
    top = fig_h - bottom - map_h
    return left * HEATMAP_DPI, top * HEATMAP_DPI, (left + map_w) * HEATMAP_DPI, (top + map_h) * HEATMAP_DPI


def render_heatmap(
    values: np.ndarray,
    patch_size: int,
    image_size: tuple[int, int],
    threshold: float | None = None,
    chosen: int | None = None,
    label: str = "entropy (bits)",
) -> Image.Image:
    """One cell per patch, inferno colours over the finite range, padded cells apart.

    values: (rows, cols) float with NaN for padded cells; image_size: (H, W) of
    the resized image; threshold: marked on the colorbar (scales >= 1);
    chosen: how many patches this scale contributes, for the title.
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    rows, cols = values.shape
    height, width = image_size
    vmin, vmax = color_range(values)
    cmap = matplotlib.colormaps[HEATMAP_CMAP].with_extremes(bad=PADDED_CELL_COLOR)
    extent_w, extent_h = cols * patch_size, rows * patch_size
    fig_w, fig_h, left, bottom, map_w, map_h = heatmap_layout(rows, cols)
    fig = Figure(figsize=(fig_w, fig_h), dpi=HEATMAP_DPI)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, map_w / fig_w, map_h / fig_h))
    im = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax,
        extent=(0, extent_w, extent_h, 0), interpolation="nearest",
    )
    handles = []
    if np.isnan(values).any():
        ax.add_patch(Rectangle((0, 0), width, height, fill=False, edgecolor="black", linestyle="--", linewidth=1))
        handles.append(Patch(facecolor=PADDED_CELL_COLOR, edgecolor="black", linewidth=0.5,
                             label="padded edge cell: extends past the image edge (dashed), never merged"))
    ax.set_xlabel("x (px of the resized image)", fontsize=9)
    ax.set_ylabel("y (px)", fontsize=9)
    ax.tick_params(labelsize=8)
    title = f"Importance at {patch_size}x{patch_size} px: grid {cols} x {rows} patches"
    if chosen is not None:
        title += f"\n{chosen} patches of this size in the APT tiling"
    ax.set_title(title, fontsize=10)
    cax = fig.add_axes(((left + map_w + 0.25) / fig_w, bottom / fig_h, 0.22 / fig_w, map_h / fig_h))
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label(label, fontsize=9)
    cax.tick_params(labelsize=8)
    if threshold is not None:
        where = "" if vmin <= threshold <= vmax else (" (below range)" if threshold < vmin else " (above range)")
        if not where:
            cax.axhline(threshold, color=THRESHOLD_LINE_COLOR, linewidth=3)
        handles.insert(0, Line2D([], [], color=THRESHOLD_LINE_COLOR, linewidth=3,
                                 label=f"threshold {threshold:g} bits{where}: cells below it merge"))
    if handles:
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.1 / fig_w, 0.05 / fig_h),
                   fontsize=8, frameon=False)
    return _figure_to_image(fig)


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


def load_image(path: Path) -> Image.Image:
    """Decode the first frame, apply the EXIF orientation, convert to RGB.

    Raises ToolError naming the path for every way a file can fail to be an image.
    """
    if not path.exists():
        raise ToolError(f"{path}: no such file")
    if path.is_dir():
        raise ToolError(f"{path}: is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise ToolError(f"{path}: file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                image.load()
                mode = image.mode
                upright = ImageOps.exif_transpose(image)
                rgb = to_rgb(upright)
                rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ToolError(f"{path}: image too large, refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ToolError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ToolError(f"{path}: cannot decode image ({exc})") from None
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        logger.warning(f"{path}: {mode} image; values above 255 clip to white, as in Qwen2-VL's processor")
    return rgb


def sample_image_path() -> Path:
    """A real photo shipped with matplotlib, for a first run with no file at hand."""
    from matplotlib import cbook

    return Path(cbook.get_sample_data(SAMPLE_IMAGE, asfileobj=False))


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
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


def write_files(out_dir: Path, files: Mapping[str, bytes]) -> list[Path]:
    """Write all files or none: stage them in a hidden folder, then rename into place."""
    staging = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        written = []
        for name in files:
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out_dir / name)
            written.append(out_dir / name)
        return written
    except OSError as exc:
        raise ToolError(f"{out_dir}: writing outputs failed ({exc.strerror or exc})") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def refuse_overwriting_input(input_path: Path, out_dir: Path, names: Sequence[str]) -> None:
    """Stop before writing if any output would replace the input file itself."""
    target = input_path.resolve()
    for name in names:
        if (out_dir / name).resolve() == target:
            raise ToolError(f"{input_path}: is one of the outputs ({name}) in {out_dir}; choose another -o")


# ---------------------------------------------------------------------------
# 6. Pipeline
# ---------------------------------------------------------------------------


@dataclass
class ImageAnalysis:
    """Everything computed for one image, on the CPU as numpy."""

    original: Image.Image  # EXIF-corrected RGB input
    resized: np.ndarray  # (H, W, 3) uint8, what the model sees
    maps: dict[int, np.ndarray]  # patch size -> (rows, cols) float64 bits, NaN = padded
    masks: dict[int, np.ndarray]  # patch size -> (rows, cols) bool, chosen patches
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def resized_size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.resized.shape[0], self.resized.shape[1]


def resize_for_qwen2vl(image: Image.Image, settings: Settings, label: str = "image") -> np.ndarray:
    """RGB PIL image -> (H, W, 3) uint8 at smart_resize's size, PIL bicubic."""
    try:
        height, width = smart_resize(
            image.height, image.width, settings.factor, settings.min_pixels, settings.max_pixels
        )
    except ValueError as exc:
        raise ToolError(f"{label}: {exc}") from None
    return np.array(image.resize((width, height), Image.Resampling.BICUBIC))


def analyse(resized: np.ndarray, settings: Settings, device: torch.device) -> tuple[dict, dict]:
    """(H, W, 3) uint8 resized image -> (maps, masks) as numpy, computed on device."""
    normalized = torch.from_numpy(normalize_image(resized, settings.image_mean, settings.image_std))
    tokenizer = PatchTokenizer(
        num_scales=settings.num_scales, base_patch_size=settings.patch_size, thresholds=settings.thresholds,
        mean=settings.image_mean, std=settings.image_std,
    )
    maps_t = tokenizer.compute_importance_maps(normalized.unsqueeze(0).to(device))
    masks_t = tokenizer.construct_masks(maps_t)
    # the one crossing from torch to numpy
    maps = {ps: m[0].cpu().numpy() for ps, m in maps_t.items()}
    masks = {ps: m[0].cpu().numpy() for ps, m in masks_t.items()}
    return maps, masks


def patch_counts(masks: Mapping[int, np.ndarray]) -> dict[int, int]:
    return {ps: int(m.sum()) for ps, m in sorted(masks.items())}


def build_stats(
    image_label: str, analysis: ImageAnalysis, settings: Settings, device: torch.device
) -> dict:
    """The stats.json record of one image."""
    height, width = analysis.resized_size
    counts = patch_counts(analysis.masks)
    grid_h, grid_w = height // settings.patch_size, width // settings.patch_size
    uniform = grid_h * grid_w
    apt = sum(counts.values())
    return {
        "image": image_label,
        "original_size": [analysis.original.width, analysis.original.height],
        "resized_size": [width, height],
        "patch_size": settings.patch_size,
        "merge_size": settings.merge_size,
        "temporal_patch_size": settings.temporal_patch_size,
        "thresholds": list(settings.thresholds),
        "patch_sizes": list(settings.patch_sizes),
        "patches_per_scale": {str(ps): n for ps, n in counts.items()},
        "apt_patches": apt,
        "uniform_patches": uniform,
        "retained_ratio": apt / uniform,
        "qwen2vl_tokens": uniform // settings.merge_size**2,
        "device": device.type,
        "timings_ms": {k: round(v, 1) for k, v in analysis.timings_ms.items()},
    }


def heatmap_name(patch_size: int) -> str:
    return f"importance_map_scale_{patch_size}.png"


def output_names(settings: Settings) -> list[str]:
    names = [heatmap_name(ps) for ps in settings.patch_sizes]
    return names + ["patches_visualization.jpg", "original_image.jpg", "resized_image.jpg",
                    "importance_maps.npz", "stats.json"]


def render_outputs(analysis: ImageAnalysis, settings: Settings) -> dict[str, bytes]:
    """All per-image pictures and data, encoded, keyed by file name."""
    counts = patch_counts(analysis.masks)
    files: dict[str, bytes] = {}
    for i, ps in enumerate(settings.patch_sizes):
        threshold = settings.thresholds[i - 1] if i >= 1 else None
        heatmap = render_heatmap(analysis.maps[ps], ps, analysis.resized_size, threshold, counts[ps])
        files[heatmap_name(ps)] = encode_png(heatmap)
    overlay = draw_patch_borders(analysis.resized, analysis.masks)
    files["patches_visualization.jpg"] = encode_jpeg(Image.fromarray(overlay))
    files["original_image.jpg"] = encode_jpeg(analysis.original)
    files["resized_image.jpg"] = encode_jpeg(Image.fromarray(analysis.resized))
    arrays = {f"scale_{ps}": m.astype(np.float32) for ps, m in analysis.maps.items()}
    arrays.update({f"mask_{ps}": m for ps, m in analysis.masks.items()})
    files["importance_maps.npz"] = encode_npz(arrays)
    return files


def run_image(path: Path, out_dir: Path, settings: Settings, device: torch.device, label: str | None = None) -> dict:
    """One image from path to files in out_dir; returns its stats."""
    label = label or str(path)
    check_output_dir(out_dir)
    refuse_overwriting_input(path, out_dir, output_names(settings))
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timings[name] = (now - start) * 1000
        start = now

    original = load_image(path)
    lap("load")
    resized = resize_for_qwen2vl(original, settings, label)
    lap("resize")
    logger.info(f"{label}: {original.width}x{original.height} -> {resized.shape[1]}x{resized.shape[0]}")
    maps, masks = analyse(resized, settings, device)
    lap("importance")
    analysis = ImageAnalysis(original, resized, maps, masks, timings)
    files = render_outputs(analysis, settings)
    lap("render")
    timings["total"] = sum(timings.values())
    stats = build_stats(label, analysis, settings, device)
    files["stats.json"] = encode_json(stats)
    write_files(out_dir, files)
    return stats


# ---------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a single line on stderr, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    parser = OneLineParser(
        prog="visualize_patches.py",
        description="Visualise APT (Adaptive Patch Tokenization) patch importance for Qwen2-VL: "
        "multi-scale entropy heatmaps, the chosen patches, raw maps and token counts.",
    )
    parser.add_argument("image", nargs="?", metavar="IMAGE", type=Path,
                        help="Image file to analyse. Without it, the tool runs on matplotlib's sample "
                        f"photo {SAMPLE_IMAGE}.")
    parser.add_argument("-o", "--output", type=Path, default=Path(DEFAULT_OUTPUT_DIR), metavar="DIR",
                        help="Directory for the outputs; created if missing (default: %(default)s).")
    model = parser.add_argument_group("model geometry (Qwen2-VL image processor)")
    model.add_argument("--patch-size", type=positive_int, default=d.patch_size, metavar="PX",
                       help="Base ViT patch side in pixels; scales are PX * 2**i (default: %(default)s).")
    model.add_argument("--temporal-patch-size", type=positive_int, default=d.temporal_patch_size, metavar="N",
                       help="Frames per temporal patch; recorded for images (default: %(default)s).")
    model.add_argument("--merge-size", type=positive_int, default=d.merge_size, metavar="N",
                       help="Patches merged per side into one LLM token; resized sides are multiples "
                       "of patch size * merge size (default: %(default)s).")
    model.add_argument("--min-pixels", type=positive_int, default=d.min_pixels, metavar="N",
                       help="smart_resize lower bound on resized height*width (default: %(default)s).")
    model.add_argument("--max-pixels", type=positive_int, default=d.max_pixels, metavar="N",
                       help="smart_resize upper bound on resized height*width (default: %(default)s).")
    apt = parser.add_argument_group("APT")
    apt.add_argument("--thresholds", type=finite_float, nargs="+", default=list(d.thresholds), metavar="BITS",
                     help="Entropy thresholds in bits, one per scale above the base; the i-th applies to "
                     "patches of PX * 2**i. A patch merges where its entropy is below its threshold: "
                     "higher thresholds give more large patches and fewer tokens. Number of scales = "
                     "number of thresholds + 1 (default: %(default)s).")
    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                     help="Where to compute: 'auto' picks CUDA when available (default: %(default)s).")
    verbosity = run.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="Print errors only.")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="Print debug messages too.")
    run.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings, torch.device]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_pixels > args.max_pixels:
        parser.error(f"--min-pixels ({args.min_pixels}) exceeds --max-pixels ({args.max_pixels})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    settings = Settings(
        patch_size=args.patch_size, temporal_patch_size=args.temporal_patch_size, merge_size=args.merge_size,
        thresholds=tuple(args.thresholds), min_pixels=args.min_pixels, max_pixels=args.max_pixels,
    )
    return args, settings, resolve_device(args.device)


def configure_logging(quiet: bool, verbose: bool) -> None:
    logger.remove()
    level = "ERROR" if quiet else ("DEBUG" if verbose else "INFO")
    logger.add(sys.stderr, level=level, format="<level>{level: <7}</level> {message}", colorize=None)


def main(argv: Sequence[str] | None = None) -> int:
    args, settings, device = parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    try:
        path = args.image if args.image is not None else sample_image_path()
        if args.image is None:
            logger.info(f"no image given: using matplotlib's sample photo {path}")
        logger.debug(f"device {device.type}, patch sizes {list(settings.patch_sizes)}, "
                     f"thresholds {list(settings.thresholds)}")
        stats = run_image(path, args.output, settings, device)
        counts = ", ".join(f"{n} x {ps}px" for ps, n in stats["patches_per_scale"].items())
        logger.info(f"APT patches {stats['apt_patches']} of {stats['uniform_patches']} uniform "
                    f"({stats['retained_ratio']:.1%} retained): {counts}")
        logger.info(f"wrote {len(output_names(settings))} files to {args.output}")
        return EXIT_OK
    except ToolError as exc:
        logger.error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logger.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
