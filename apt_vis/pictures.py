"""Pictures beyond the core's heatmaps and patch borders: importance overlays, the summary
panel and the batch summary plot (pure: arrays in, images or PNG bytes out)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from visualize_patches import (
    INFERNO,
    OVERLAY_CELL_WEIGHT,
    OVERLAY_WEIGHT,
    SCORERS,
    _fit,
    _text_size,
    color_range,
    colorize,
    encode_png,
    font,
    format_tick,
    one_line,
    overlay_name,
    patch_counts,
)
from apt_vis.pages import explorer_html


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


def extra_image_files(result, stats: Mapping, options, overlay: np.ndarray, overlay_image: Image.Image,
                      resized_jpeg: bytes) -> dict[str, bytes]:
    """The per-image outputs beyond the core's: importance overlays, explorer.html and
    summary_panel.png, encoded, keyed by file name (result: the core's ImageResult)."""
    p, settings = result.prepared, result.settings
    label = SCORERS[settings.method][1]
    counts = patch_counts(result.masks)
    files = {overlay_name(ps): encode_png(render_importance_overlay(p.resized, result.maps[ps], ps, label),
                                          compress_level=1) for ps in settings.patch_sizes}
    files["explorer.html"] = explorer_html(
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
    panel = render_summary_panel(f"APT: {one_line(Path(p.job.label).name)}", p.original_preview or overlay_image, p.original_size,
                                 overlay, result.maps, lines, label)
    files["summary_panel.png"] = encode_png(panel, compress_level=1)
    return files
