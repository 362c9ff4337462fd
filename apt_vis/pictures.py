"""Pictures beyond the core's heatmaps and patch borders: importance overlays, the summary
panel and the batch summary plot (pure: arrays in, images or PNG bytes out)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from visualize_patches import (
    BORDER_GREEN,
    INFERNO,
    MODEL_NAMES,
    OVERLAY_CELL_WEIGHT,
    OVERLAY_WEIGHT,
    PANEL_TILE,
    PngPicture,
    SCORERS,
    THUMBNAIL_WIDTH,
    _fit,
    _text_size,
    border_mask,
    color_range,
    colorize,
    encode_jpeg,
    encode_png,
    font,
    format_tick,
    nice_ticks,
    one_line,
    patch_counts,
    patch_id_maps,
    scale_palette,
)
from apt_vis.pages import explorer_html


THUMBNAIL_MIN_CELL = 8  # px: thumbnails draw base patches' outlines only when they are this large


def draw_thumbnail_borders(
    rgb: np.ndarray,
    masks: Mapping[int, np.ndarray],
    width: int,
    height: int,
    color: tuple[int, int, int] = BORDER_GREEN,
    scale_colors: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
    """The patch overlay as a thumbnail that fits width x height: the (H, W, 3) uint8 image scaled
    down first, then the chosen patches' outlines drawn 1 px wide at the thumbnail's scale.
    (Scaling down a full-size overlay smears its borders into bands that hide a small picture.)
    Where base patches would be under THUMBNAIL_MIN_CELL px, only the outlines of merged (larger)
    patches are drawn: a grid that fine would cover the picture."""
    thumb = _fit(Image.fromarray(rgb), width, height)
    h, w = rgb.shape[:2]
    ids, scale_of = patch_id_maps(masks, h, w)
    rows = np.minimum(((np.arange(thumb.height) + 0.5) * h / thumb.height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(thumb.width) + 0.5) * w / thumb.width).astype(np.int64), w - 1)
    scales = scale_of[np.ix_(rows, cols)]  # each thumbnail pixel takes the patch under its centre
    lines = border_mask(ids[np.ix_(rows, cols)], 1)
    if min(masks) * thumb.width / w < THUMBNAIL_MIN_CELL:
        merged = scales > 0
        near = merged.copy()  # a line pixel lies in a merged patch or just after one
        near[:, 1:] |= merged[:, :-1]
        near[1:, :] |= merged[:-1, :]
        lines &= near
    out = np.array(thumb)
    if scale_colors is None:
        out[lines] = color
    else:
        palette = np.asarray(scale_colors, dtype=np.uint8)
        out[lines] = palette[scales[lines] % len(palette)]
    return Image.fromarray(out)


def thumbnail_jpeg(result, options) -> bytes:
    """patches_thumbnail.jpg of one image, for the batch report (result: the core's ImageResult)."""
    colors = scale_palette(result.settings.num_scales) if options.color_by_scale else None
    return encode_jpeg(draw_thumbnail_borders(result.prepared.resized, result.masks, THUMBNAIL_WIDTH,
                                              4 * THUMBNAIL_WIDTH, options.line_color, colors))


STRIP_HEIGHT = 28  # px of the colour key under an importance overlay


def _gradient_strip(width: int, vmin: float, vmax: float, caption: str) -> Image.Image:
    """A 28 px strip: caption, min, an inferno ramp, max."""
    strip = Image.new("RGB", (width, STRIP_HEIGHT), (24, 24, 24))
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


def blend_importance(rgb: np.ndarray, values: np.ndarray, patch_size: int, vmin: float, vmax: float,
                     out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 image with each cell's colour over it at OVERLAY_ALPHA -> (H, W, 3) uint8
    (written into `out` when given).

    Integer arithmetic: (w_image * pixel + w_cell * colour) / OVERLAY_WEIGHT, rounded half up.
    """
    h, w = rgb.shape[:2]
    rows, cols = values.shape
    colors = colorize(values, vmin, vmax).astype(np.uint16) * OVERLAY_CELL_WEIGHT + OVERLAY_WEIGHT // 2
    acc = rgb.astype(np.uint16)
    acc *= OVERLAY_WEIGHT - OVERLAY_CELL_WEIGHT
    # each row of cells' weighted colours, one per pixel column: (rows, W, 3)
    strips = np.repeat(colors, patch_size, axis=1)[:, :w]
    # add them to their bands of pixel rows in place, through a (rows, p, W, 3) view (the last band may be short)
    full = min(rows, h // patch_size)
    acc[:full * patch_size].reshape(full, patch_size, w, 3)[...] += strips[:full, None]
    if full < rows:
        acc[full * patch_size:] += strips[full]
    if out is None:
        out = np.empty((h, w, 3), dtype=np.uint8)
    return np.floor_divide(acc, OVERLAY_WEIGHT, out=out, casting="unsafe")


def importance_overlay_pixels(rgb: np.ndarray, values: np.ndarray, patch_size: int, label: str) -> np.ndarray:
    """The importance map of one scale blended over the resized image, with a colour key below:
    (H + STRIP_HEIGHT, W, 3) uint8."""
    vmin, vmax = color_range(values)
    h, w = rgb.shape[:2]
    pixels = np.empty((h + STRIP_HEIGHT, w, 3), dtype=np.uint8)
    blend_importance(rgb, values, patch_size, vmin, vmax, out=pixels[:h])
    pixels[h:] = np.asarray(_gradient_strip(w, vmin, vmax, f"{patch_size} px {label}"))
    return pixels


def render_importance_overlay(rgb: np.ndarray, values: np.ndarray, patch_size: int, label: str) -> Image.Image:
    """The importance map of one scale blended over the resized image, with a colour key below."""
    return Image.fromarray(importance_overlay_pixels(rgb, values, patch_size, label))


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
    (tile_w, tile_h), gap, head = PANEL_TILE, 16, 46
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


PLOT_SIZE = (1200, 500)  # the batch summary plot, px
PLOT_SUPERSAMPLE = 2  # drawn this many times larger, then shrunk: smooth lines, dots and text
HIST_RGB, SCATTER_RGB, DIAGONAL_RGB = (76, 114, 176), (221, 132, 82), (128, 128, 128)
SCATTER_ALPHA = 0.7


class _Axes:
    """One plot frame of the summary plot on a supersampled canvas: data -> pixel mapping, ticks,
    labels, title, legend (coordinates given in final pixels)."""

    def __init__(self, canvas: Image.Image, box: tuple[int, int, int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float]):
        self.canvas, self.draw, self.s = canvas, ImageDraw.Draw(canvas), PLOT_SUPERSAMPLE
        self.box, self.xlim, self.ylim = box, xlim, ylim

    def xy(self, x: float, y: float) -> tuple[float, float]:
        """Data (x, y) -> supersampled canvas pixels."""
        x0, y0, x1, y1 = self.box
        (a, b), (c, d) = self.xlim, self.ylim
        return (x0 + (x - a) / (b - a) * (x1 - x0)) * self.s, (y1 - (y - c) / (d - c) * (y1 - y0)) * self.s

    def text(self, xy: tuple[float, float], text: str, size: int, anchor: str, fill=(0, 0, 0)) -> None:
        self.draw.text((xy[0] * self.s, xy[1] * self.s), text, font=font(size * self.s), fill=fill, anchor=anchor)

    def frame(self, title: str, xlabel: str, ylabel: str, xticks: Sequence[float], yticks: Sequence[float]) -> None:
        x0, y0, x1, y1 = self.box
        s = self.s
        self.draw.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], outline=(0, 0, 0), width=s)
        for t in xticks:
            x = self.xy(t, self.ylim[0])[0]
            self.draw.line([(x, y1 * s), (x, (y1 + 5) * s)], fill=(0, 0, 0), width=s)
            self.text((x / s, y1 + 8), format_tick(t), 12, "mt")
        for t in yticks:
            y = self.xy(self.xlim[0], t)[1]
            self.draw.line([((x0 - 5) * s, y), (x0 * s, y)], fill=(0, 0, 0), width=s)
            self.text((x0 - 8, y / s), format_tick(t), 12, "rm")
        self.text(((x0 + x1) / 2, y1 + 28), xlabel, 13, "mt")
        self.text(((x0 + x1) / 2, y0 - 8), title, 15, "mb")
        w, h = _text_size(ylabel, 13 * s)
        tile = Image.new("L", (w + 4 * s, h + 8 * s), 0)
        ImageDraw.Draw(tile).text((2 * s, 2 * s), ylabel, font=font(13 * s), fill=255)
        tile = tile.rotate(90, expand=True)
        ticks_w = max((_text_size(format_tick(t), 12)[0] for t in yticks), default=0)
        cx, cy = (x0 - 14 - ticks_w - 10) * s, (y0 + y1) / 2 * s
        self.canvas.paste((0, 0, 0), (int(cx - tile.width / 2), int(cy - tile.height / 2)), tile)

    def line(self, start: tuple[float, float], end: tuple[float, float], fill, width: float = 1.5,
             dash: float | None = None) -> None:
        """A data-space line clipped to nothing (callers keep it inside); dash: px of dash and gap."""
        a, b = self.xy(*start), self.xy(*end)
        w = round(width * self.s)
        if dash is None:
            self.draw.line([a, b], fill=fill, width=w)
            return
        length = float(np.hypot(b[0] - a[0], b[1] - a[1]))
        step = dash * self.s
        for d in np.arange(0, length, 2 * step):
            e = min(d + step, length)
            self.draw.line([(a[0] + (b[0] - a[0]) * d / length, a[1] + (b[1] - a[1]) * d / length),
                            (a[0] + (b[0] - a[0]) * e / length, a[1] + (b[1] - a[1]) * e / length)],
                           fill=fill, width=w)

    def legend(self, corner: str, entries: Sequence[tuple[str, tuple[int, int, int], float | None]]) -> None:
        """Lines with their labels in a framed box at the axes' upper `corner` ('left' or 'right');
        entries: (label, colour, dash or None)."""
        x0, y0, x1, _ = self.box
        width = 48 + max(_text_size(label, 13)[0] for label, _, _ in entries)
        height = 10 + 22 * len(entries)
        left = x0 + 8 if corner == "left" else x1 - 8 - width
        s = self.s
        self.draw.rectangle([left * s, (y0 + 8) * s, (left + width) * s, (y0 + 8 + height) * s],
                            fill=(255, 255, 255), outline=(204, 204, 204), width=s)
        for k, (label, color, dash) in enumerate(entries):
            y = y0 + 8 + 16 + 22 * k
            if dash is None:
                self.draw.line([((left + 8) * s, y * s), ((left + 36) * s, y * s)], fill=color, width=round(1.5 * s))
            else:
                for x in np.arange(left + 8, left + 36, 2 * dash):
                    self.draw.line([(x * s, y * s), (min(x + dash, left + 36) * s, y * s)], fill=color,
                                   width=round(1.5 * s))
            self.text((left + 42, y), label, 13, "lm")


def render_batch_summary_plot(rows: Sequence[Mapping], ratio_stats: Mapping | None, thresholds_text: str,
                              model_name: str) -> bytes:
    """Retained-ratio histogram and APT vs uniform patches per image (PNG bytes), drawn with PIL;
    ratio_stats: summary.json's "retained_ratio" (its mean and median are drawn)."""
    ok = [r for r in rows if r["status"] in ("ok", "reused")]
    ratios = np.array([r["retained_ratio"] for r in ok], dtype=float)
    uniform = np.array([r["uniform_patches"] for r in ok], dtype=float)
    apt = np.array([r["apt_patches"] for r in ok], dtype=float)
    s = PLOT_SUPERSAMPLE
    canvas = Image.new("RGB", (PLOT_SIZE[0] * s, PLOT_SIZE[1] * s), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PLOT_SIZE[0] / 2 * s, 8 * s), one_line(f"APT summary ({thresholds_text})"), font=font(16 * s),
              fill=(0, 0, 0), anchor="mt")

    counts, edges = np.histogram(ratios, bins=min(30, max(5, ratios.size // 3)), range=(0, 1))
    count_top = max(1.0, counts.max(initial=0) * 1.05)
    left = _Axes(canvas, (70, 64, 585, 446), (0.0, 1.0), (0.0, count_top))
    for n, a, b in zip(counts, edges[:-1], edges[1:]):
        if n:
            (xa, ya), (xb, yb) = left.xy(a, n), left.xy(b, 0)
            draw.rectangle([xa, ya, xb, yb], fill=HIST_RGB, outline=(255, 255, 255), width=s)
    entries = []
    if ratios.size:
        for value, name, dash in ((ratio_stats["mean"], "mean", None), (ratio_stats["median"], "median", 5.0)):
            left.line((value, 0), (value, count_top), (0, 0, 0), width=2, dash=dash)
            entries.append((f"{name} {value:.3f}", (0, 0, 0), dash))
    left.frame(f"Retained ratio over {ratios.size} images", "retained ratio (APT patches / uniform patches)",
               "images", nice_ticks(0, 1, 6), [t for t in nice_ticks(0, count_top, 8) if t == int(t)])
    if entries:
        left.legend("left", entries)

    top = max(uniform.max(initial=0), 1) * 1.05
    right = _Axes(canvas, (690, 64, 1185, 446), (0.0, top), (0.0, top))
    entries = []
    if ratios.size:
        radius = 2.8 * s
        x0, y0, x1, y1 = (round(v * s) for v in right.box)
        pad = round(radius) + 1  # dots on the frame's edge spill over it, as matplotlib's do
        dots = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)  # their coverage
        dots_draw = ImageDraw.Draw(dots)
        for u, a in zip(uniform, apt):
            x, y = right.xy(u, a)
            x, y = x - x0 + pad, y - y0 + pad
            dots_draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=round(255 * SCATTER_ALPHA))
        canvas.paste(SCATTER_RGB, (x0 - pad, y0 - pad, x1 + pad, y1 + pad), dots)
        right.line((0, 0), (top, top), DIAGONAL_RGB, width=1, dash=4.0)
        right.line((0, 0), (top, top * ratio_stats["mean"]), (0, 0, 0), width=1)
        entries = [("no saving (APT = uniform)", DIAGONAL_RGB, 4.0),
                   (f"mean ratio {ratio_stats['mean']:.3f}", (0, 0, 0), None)]
    right.frame("APT vs uniform patches per image", f"uniform patches ({model_name} ViT patches without APT)",
                "APT patches", nice_ticks(0, top, 7), nice_ticks(0, top, 7))
    if entries:
        right.legend("left", entries)
    # reduce: = resize(PLOT_SIZE, BOX) within 1 level, 4x faster; level 1 (ISA-L): 45 KB in 0.7 ms,
    # against zlib level 6's 32 KB in 7 ms, on every batch run
    return encode_png(canvas.reduce(s), compress_level=1)


def importance_overlay_picture(result, patch_size: int) -> PngPicture:
    """importance_overlay_scale_<patch_size>.png of one image (result: the core's ImageResult)."""
    label = SCORERS[result.settings.method][1]
    pixels = importance_overlay_pixels(result.prepared.resized, result.maps[patch_size], patch_size, label)
    return PngPicture(pixels, compress_level=1)


def summary_panel_picture(result, stats: Mapping, overlay: np.ndarray, overlay_image: Image.Image) -> PngPicture:
    """summary_panel.png of one image (result: the core's ImageResult; overlay: the chosen
    patches' borders on the resized image, as an array and a picture)."""
    p, settings = result.prepared, result.settings
    counts = patch_counts(result.masks)
    lines = [
        f"original {p.original_size[0]} x {p.original_size[1]} -> resized {p.resized.shape[1]} x {p.resized.shape[0]}",
        f"method {settings.method}, thresholds {', '.join(f'{t:g}' for t in settings.thresholds)}",
        *(f"  {ps:>4} px patches: {n}" for ps, n in counts.items()),
        f"APT patches: {stats['apt_patches']} of {stats['uniform_patches']} uniform",
        f"retained ratio: {stats['retained_ratio']:.4f} ({stats['retained_ratio']:.1%})",
        f"{MODEL_NAMES[settings.model]} LLM tokens without APT: {stats['qwen2vl_tokens']}",
    ]
    if settings.target_ratio is not None:
        lines.insert(2, f"threshold chosen for target ratio {settings.target_ratio:g}")
    panel = render_summary_panel(f"APT: {one_line(Path(p.job.label).name)}", p.original_preview or overlay_image,
                                 p.original_size, overlay, result.maps, lines, SCORERS[settings.method][1])
    return PngPicture(np.asarray(panel), compress_level=1)


def explorer_page(result, stats: Mapping, options, resized_jpeg: bytes) -> bytes:
    """explorer.html of one image (result: the core's ImageResult)."""
    settings = result.settings
    return explorer_html(
        result.prepared.job.label, resized_jpeg, result.maps, settings.thresholds, patch_counts(result.masks),
        stats["uniform_patches"], stats["qwen2vl_tokens"], MODEL_NAMES[settings.model], SCORERS[settings.method][1],
        options,
    ).encode()
