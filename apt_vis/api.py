"""The notebook API: analyze(image, **options) -> Analysis, one image analysed in this process
as `visualize_patches.py IMAGE` does, with the command line's options, defaults and checks.
Reached as visualize_patches.analyze / visualize_patches.Analysis (imported on first use)."""

from __future__ import annotations

import argparse
import base64
import html
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from visualize_patches import (
    SCORERS,
    ImageResult,
    Job,
    OutputLock,
    RenderOptions,
    Scorer,
    Settings,
    Stopwatch,
    analyse,
    build_parser,
    check_output_dir,
    encode_jpeg,
    extension,
    image_outputs,
    image_stats,
    load_image,
    one_line,
    original_pictures,
    parse_args,
    patch_overlay,
    prepare_loaded,
    scale_heatmap,
    to_rgb,
    write_files,
)


# Command-line options that make no sense for one image analysed in memory.
API_EXCLUDED = frozenset({"help", "version", "inputs", "output", "workers", "skip_existing", "quiet", "verbose"})


def _argv_from_options(options: Mapping[str, object]) -> list[str]:
    """analyze()'s keyword options as the equivalent command line (dest names -> flags), so that
    parse_args checks them by the CLI's own rules."""
    actions = {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest not in API_EXCLUDED}
    argv: list[str] = []
    for name, value in options.items():
        action = actions.get(name)
        if action is None:
            raise ValueError(f"unknown option {name!r}; options are: {', '.join(sorted(actions))}")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name}: expected True or False, got {value!r}")
            argv += [flag] if value else []
            continue
        if value is None:
            continue
        many = action.nargs is not None and action.nargs != "?"
        values = list(value) if many and isinstance(value, (list, tuple, np.ndarray)) else [value]
        if not many and isinstance(value, (list, tuple, np.ndarray)):
            raise ValueError(f"{name}: expected one value, got {value!r}")
        argv.append(flag)
        for v in values:
            if isinstance(v, (bool, np.bool_)):
                raise ValueError(f"{name}: expected a value, got {v!r}")
            text = repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)
            argv.append(text)
    return argv


def _options_error(message: str) -> str:
    """A parser message with the flags spelt as analyze()'s option names (--target-ratio -> target_ratio)."""
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m[1].replace("-", "_"), message)


def api_settings(options: Mapping[str, object]) -> tuple[Settings, RenderOptions, Scorer]:
    """analyze()'s options checked as the command line checks them: ValueError naming the bad one."""
    try:
        _, settings, render, scorer = parse_args(_argv_from_options(options), raise_errors=True)
    except ValueError as exc:
        raise ValueError(_options_error(str(exc))) from None
    return settings, render, scorer


def _api_image(image: object) -> tuple[Image.Image, str, Path]:
    """(RGB image, label, path) of analyze()'s image argument."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return load_image(path), str(image), path
    if isinstance(image, Image.Image):
        # as load_image does with a file: the EXIF orientation applied, converted as Qwen2-VL does
        image.load()
        return to_rgb(ImageOps.exif_transpose(image)), "<PIL image>", Path("<PIL image>")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {image.dtype} of shape {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image), "RGB"), "<array>", Path("<array>")
    raise ValueError(f"image: expected a path, a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")


class Analysis:
    """One image analysed as the command line would (see analyze()).

    stats     the stats.json record (its timings_ms are this analysis's own)
    maps      patch size -> (rows, cols) float64 scores, NaN = padded (importance_maps.npz's scale_<size>)
    masks     patch size -> (rows, cols) bool, the chosen patches (the npz's mask_<size>)
    resized   the PIL image the model sees
    settings  the Settings (thresholds final: chosen, under target_ratio)
    """

    def __init__(self, result: ImageResult, original: Image.Image, render: RenderOptions,
                 options: Mapping[str, object]):
        self._result, self._original, self._render, self._options = result, original, render, dict(options)
        self.stats = image_stats(result)
        self.maps, self.masks, self.settings = result.maps, result.masks, result.settings
        self.resized = Image.fromarray(result.prepared.resized)

    def __repr__(self) -> str:
        s = self.stats
        return (f"<Analysis {s['image']}: {s['apt_patches']} of {s['uniform_patches']} patches "
                f"({s['retained_ratio']:.1%}), thresholds {', '.join(f'{t:g}' for t in self.settings.thresholds)}>")

    def patches_image(self, line_color: Sequence[int] | None = None, line_thickness: int | None = None,
                      color_by_scale: bool | None = None) -> Image.Image:
        """patches_visualization.jpg's picture: the chosen patches' borders on the resized image
        (drawing options as the CLI's; by default, those given to analyze())."""
        changes = {k: v for k, v in (("line_color", line_color), ("line_thickness", line_thickness),
                                     ("color_by_scale", color_by_scale)) if v is not None}
        render = self._render
        if changes:
            _, render, _ = api_settings({**self._options, **changes})
        return patch_overlay(self._result, render)[1]

    def heatmap(self, size: int) -> Image.Image:
        """importance_map_scale_<size>.png's picture: the scores of the patches of that side."""
        return scale_heatmap(self._result, self._size(size))

    def overlay(self, size: int) -> Image.Image:
        """importance_overlay_scale_<size>.png's picture: the scores over the image (needs apt_vis)."""
        size = self._size(size)
        return extension("pictures").render_importance_overlay(
            self._result.prepared.resized, self.maps[size], size, SCORERS[self.settings.method][1])

    def _size(self, size: int) -> int:
        if size not in self.maps:
            raise ValueError(f"size: expected one of the patch sizes {', '.join(map(str, self.maps))}, got {size!r}")
        return size

    def with_thresholds(self, *thresholds: float) -> "Analysis":
        """The same image at other thresholds (one per scale above the base, as many as now),
        re-thresholding the maps without scoring again: equal to a fresh analyze() with them."""
        if len(thresholds) == 1 and isinstance(thresholds[0], (list, tuple, np.ndarray)):
            thresholds = tuple(thresholds[0])
        options = {**self._options, "thresholds": list(thresholds), "target_ratio": None}
        settings, render, _ = api_settings(options)
        if settings.patch_sizes != self.settings.patch_sizes:
            raise ValueError(f"thresholds: expected {self.settings.num_scales - 1} (one per scale above the base), "
                             f"got {len(thresholds)}; for other scales call analyze()")
        result = analyse(self._result.prepared, self.maps, settings, self._result.device)
        return Analysis(result, self._original, render, options)

    def save(self, out_dir: str | os.PathLike) -> dict:
        """Write the files the CLI writes for this one image into out_dir (created if missing; files
        of the same names are replaced, all or none); the stats.json record written."""
        out = Path(out_dir)
        prepared = self._result.prepared
        if not self._render.stats_only and prepared.original_jpeg is None:
            jpeg, preview = original_pictures(self._original)
            prepared = replace(prepared, original_jpeg=jpeg, original_preview=preview)
        result = replace(self._result, prepared=replace(prepared, job=replace(prepared.job, out_dir=out),
                                                        timings=dict(prepared.timings)))
        if self._render.sweep or self.settings.target_ratio is not None:
            extension("thresholds")
        check_output_dir(out)
        with OutputLock(out):
            stats, files = image_outputs(result, self._render)
            write_files(out, files)
        return stats

    def _repr_html_(self) -> str:
        s = self.stats
        thumb = self.patches_image()
        thumb.thumbnail((480, 480))
        picture = base64.b64encode(encode_jpeg(thumb)).decode()
        rows = "".join(f"<tr><td>{ps} px</td><td>{n}</td></tr>" for ps, n in s["patches_per_scale"].items())
        return (f"<div><div><b>{html.escape(one_line(s['image']))}</b>: "
                f"{s['resized_size'][0]} x {s['resized_size'][1]} resized, method {html.escape(s['method'])}, "
                f"thresholds {', '.join(f'{t:g}' for t in self.settings.thresholds)}</div>"
                f'<img src="data:image/jpeg;base64,{picture}" width="{thumb.width}" height="{thumb.height}" '
                f'alt="chosen patches" style="max-width:100%;height:auto">'
                f"<table><tr><th>patches</th><th>count</th></tr>{rows}"
                f"<tr><td>APT</td><td>{s['apt_patches']}</td></tr>"
                f"<tr><td>uniform</td><td>{s['uniform_patches']}</td></tr>"
                f"<tr><td>retained</td><td>{s['retained_ratio']:.1%}</td></tr></table></div>")


def analyze(image: object, **options: object) -> Analysis:
    """Analyse one image as `visualize_patches.py IMAGE` does, in this process, for notebooks.

    image: a path (loaded as the CLI loads it), a PIL image (its EXIF orientation applied and
    converted to RGB, as the CLI does with a file) or an (H, W, 3) uint8 RGB array (taken as it is).
    options: the command line's, by their Python names (thresholds=[3, 2], target_ratio=0.5,
    method="laplacian", model="qwen2.5-vl", device="cpu", patch_size=14, line_color=(255, 0, 0),
    color_by_scale=True, stats_only=True, ...), with the same defaults and checks: a bad one raises
    ValueError naming it. A file that cannot be read raises ToolError. Nothing is written (see
    Analysis.save) and the process's logging and signal handlers are left alone.
    """
    settings, render, scorer = api_settings(options)
    watch = Stopwatch()
    original, label, path = _api_image(image)
    watch.lap("load")
    prepared = prepare_loaded(Job(path, label, Path("."), "image"), original, settings, False, watch)
    maps = scorer.maps([prepared.resized], settings)[0]
    if settings.target_ratio is not None:
        settings = extension("thresholds").resolve_thresholds(settings, [maps])
    result = analyse(prepared, maps, settings, scorer.device)
    watch.lap("importance")
    prepared.timings.update(watch.ms)
    return Analysis(result, original, render, options)
