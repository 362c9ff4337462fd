"""The explorer and report pages: self-contained HTML written next to the other outputs.

The markup, style and scripts live in apt_vis/static/ (<page>.html with $placeholders, <page>_parts.html
with the pieces it repeats, <page>.css, <page>.js), read at run time; this module only computes the values
and escapes each one for its context: html.escape for text and attributes, _json_for_script for data in a
<script>, relative_url for links. The CSS and JavaScript are inlined so that a page is one file that works
from file://.
"""

from __future__ import annotations

import base64
import heapq
import html
import json
import os
import re
import urllib.parse
from pathlib import Path
from string import Template
from typing import Mapping, Sequence

import numpy as np

import visualize_patches as vp

STATIC = Path(__file__).resolve().parent / "static"
PART = re.compile(r"<!--part:(\w+)-->(.*)")  # one line of a <page>_parts.html file: the name, then the HTML
# report.html's table and failures list hold at most this many rows each: a page of every input is
# unusable at dataset scale (100,000 inputs: 50 MB of HTML, 4.5 s to write); summary.csv has them all
REPORT_ROWS = 1000


def relative_url(path: str) -> str:
    """A URL for the relative POSIX path: './' and each segment percent-encoded (undecodable bytes as
    they are on disk), so that no file name can make it absolute, a script, a query or a fragment."""
    return "./" + "/".join(urllib.parse.quote(os.fsencode(part), safe="") for part in path.split("/"))


def _json_for_script(data: object) -> str:
    """JSON safe to embed in an HTML <script> element."""
    return json.dumps(data, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")


def _maps_for_json(maps: Mapping[int, np.ndarray]) -> dict[str, list]:
    """{size: rows of floats, null for padded cells}; floats round-trip exactly."""
    return {str(ps): [[v if v == v else None for v in row] for row in m.tolist()]  # v != v: NaN
            for ps, m in sorted(maps.items())}


def _static(name: str) -> str:
    """The text of apt_vis/static/<name> without its final newline (the templates hold their own)."""
    path = STATIC / name
    try:
        return path.read_text(encoding="utf-8").removesuffix("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise vp.ToolError(f"cannot read the page template {vp.one_line(str(path))}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None


def _page(page: str, **values: object) -> str:
    """<page>.html filled in with values (each already escaped for its context), its CSS and JS inlined.
    string.Template substitutes in one pass: an inserted value is never scanned for placeholders."""
    style, script = _static(f"{page}.css"), _static(f"{page}.js")
    return Template(_static(f"{page}.html")).substitute(values, style=style, script=script) + "\n"


def _parts(page: str) -> dict[str, Template]:
    """{part name: template} from <page>_parts.html."""
    return {m[1]: Template(m[2]) for m in PART.finditer(_static(f"{page}_parts.html"))}


def explorer_html(
    title: str,
    image_jpeg: bytes,
    maps: Mapping[int, np.ndarray],
    thresholds: Sequence[float],
    counts: Mapping[int, int],
    uniform: int,
    qwen2vl_tokens: int,
    model_name: str,
    label: str,
    options: vp.RenderOptions,
) -> str:
    """A self-contained page: the image, patch borders, one slider per threshold and live counts
    recomputed in the page with the same rule as select_patches."""
    sizes = sorted(maps)
    values = np.concatenate([maps[ps][np.isfinite(maps[ps])] for ps in sizes[1:]] + [np.empty(0)])
    lo = float(min(0.0, *thresholds, values.min(initial=0.0)))
    hi = float(max([*thresholds, values.max(initial=1.0)]))
    hi += max(hi - lo, 1e-9) * 0.01  # so that every cell can merge
    height, width = maps[sizes[0]].shape[0] * sizes[0], maps[sizes[0]].shape[1] * sizes[0]
    data = {
        "image": "data:image/jpeg;base64," + base64.b64encode(image_jpeg).decode(),
        "width": width, "height": height, "patch_sizes": list(sizes), "maps": _maps_for_json(maps),
        "thresholds": list(thresholds), "uniform": uniform, "label": label,
        "colormap": vp.INFERNO.tolist(), "padded_rgb": list(vp.PADDED_CELL_RGB), "alpha": vp.OVERLAY_ALPHA,
        "line_color": list(options.line_color), "line_thickness": options.line_thickness,
        "scale_colors": vp.scale_palette(len(sizes)) if options.color_by_scale else None,
        "cli_apt_patches": sum(counts.values()),
    }
    esc = html.escape
    part = _parts("explorer")
    sliders = "\n".join(
        part["slider"].substitute(k=k, size=ps, min=repr(lo), max=repr(hi), value=repr(float(t)), shown=f"{t:g}")
        for k, (ps, t) in enumerate(zip(sizes[1:], thresholds))
    )
    count_rows = "\n".join(part["count_row"].substitute(size=ps, count=counts[ps]) for ps in sizes)
    scale_options = "".join(part["scale_option"].substitute(size=ps) for ps in sizes)
    return _page(
        "explorer",
        name=esc(vp.one_line(Path(title).name)), path=esc(vp.one_line(title)),
        sliders=sliders, count_rows=count_rows, scale_options=scale_options,
        apt_patches=sum(counts.values()), uniform=uniform, qwen2vl_tokens=qwen2vl_tokens, model_name=esc(model_name),
        retained_ratio=f"{sum(counts.values()) / uniform:.4f}",
        retained_percent=f"{100 * sum(counts.values()) / uniform:.1f}",
        label=esc(label), base_size=sizes[0], width=width, height=height, data=_json_for_script(data),
    )


def report_html(rows: Sequence[Mapping], summary: Mapping, patch_sizes: Sequence[int], model_name: str) -> str:
    """A static gallery of a batch run: overlay thumbnails and numbers, sortable, failures listed.

    rows: the summary rows; their 'output' is the image's folder relative to the report.
    """
    def esc(text: str) -> str:  # a name or message shown as text: one line, HTML-escaped
        return html.escape(vp.one_line(text))

    part = _parts("report")
    ok, shown_note = _report_rows([r for r in rows if r["status"] in ("ok", "reused")])
    failed = [r for r in rows if r["status"] == "failed"]
    body = []
    for r in ok:
        folder = Path(r["output"]).as_posix()
        thumb = relative_url(f"{folder}/patches_thumbnail.jpg")
        has_picture = r.get("pictures", True)
        view = "explorer.html" if r["kind"] == "image" else "patches_visualization.gif"
        link = relative_url(f"{folder}/{view}" if has_picture else f"{folder}/stats.json")
        picture = (part["picture"].substitute(link=esc(link), thumb=esc(thumb), path=esc(r["path"]),
                                              width=vp.THUMBNAIL_WIDTH)
                   if has_picture else part["no_picture"].substitute())
        numbers = [(repr(float(r["retained_ratio"])), f'{r["retained_ratio"]:.4f}'),  # (sort key, text)
                   *((r[key],) * 2 for key in ("apt_patches", "uniform_patches", "qwen2vl_tokens")),
                   *((r.get(f"patches_{ps}", 0),) * 2 for ps in patch_sizes)]
        cells = [
            part["input_cell"].substitute(path=esc(r["path"]), picture=picture, link=esc(link)),
            *(part["cell"].substitute(value=value, text=text) for value, text in numbers),
            part["size_cell"].substitute(r, area=r["resized_width"] * r["resized_height"]),
        ]
        body.append(part["row"].substitute(cells="".join(cells)))
    heads = ["image", "retained ratio", "APT patches", "uniform patches", f"{model_name} LLM tokens (no APT)",
             *(f"{ps} px" for ps in patch_sizes), "size"]
    types = ["text"] + ["number"] * (len(heads) - 1)
    head = "".join(part["sorted_head" if k == 1 else "head"].substitute(type=t, text=esc(h))
                   for k, (h, t) in enumerate(zip(heads, types)))  # rows start sorted by ratio
    failures = "".join(part["failure"].substitute(path=esc(r["path"]), error=esc(r["error"]))
                       for r in failed[:REPORT_ROWS])
    if len(failed) > REPORT_ROWS:
        failures += part["more_failures"].substitute(count=f"{len(failed) - REPORT_ROWS:,}")
    ratio = summary["retained_ratio"]
    stats_line = (
        f'{summary["images"]["ok"] + summary["images"]["reused"]:,} images analysed, {summary["images"]["failed"]:,} failed, '
        f'{summary["files_skipped"]:,} other files skipped. Thresholds {", ".join(f"{t:g}" for t in summary["thresholds"])}'  # full precision: summary.json
        + (f' (chosen for target ratio {summary["target_ratio"]:g})' if summary.get("target_ratio") else "")
        + (f'. Retained ratio mean {ratio["mean"]:.4f}, median {ratio["median"]:.4f}, '
           f'p10 {ratio["p10"]:.4f}, p90 {ratio["p90"]:.4f}; overall {ratio["overall"]:.4f}.' if ratio else ".")
    )
    return _page("report", stats_line=stats_line, head=head, rows="\n".join(body), failed=len(failed),
                 failures=failures, links_note=_links_note([r.get("pictures", True) for r in ok]),
                 shown_note=shown_note)


def _report_rows(ok: Sequence[Mapping]) -> tuple[list[Mapping], str]:
    """The analysed rows report.html shows, by retained ratio (lowest first), and a sentence on which
    they are: all of them, or beyond REPORT_ROWS the half with the lowest ratio and the half with the
    highest (the inputs where APT saves most and least), picked without sorting every row."""
    if len(ok) <= REPORT_ROWS:
        return sorted(ok, key=lambda r: r["retained_ratio"]), ""
    half = REPORT_ROWS // 2
    key = lambda k: (ok[k]["retained_ratio"], k)  # noqa: E731 - the index breaks ties: no row is picked twice
    picked = [*heapq.nsmallest(half, range(len(ok)), key=key), *heapq.nlargest(half, range(len(ok)), key=key)[::-1]]
    return [ok[k] for k in picked], (f"The table shows the {half:,} inputs with the lowest retained ratio and the "
                                     f"{half:,} with the highest of {len(ok):,}; summary.csv lists every input.")


def _links_note(pictures: Sequence[bool]) -> str:
    """Where the report's links go: explorers, or stats.json for inputs without pictures (--stats-only)."""
    if not any(pictures):
        return "Each name links to that input's stats.json (a --stats-only run draws no pictures)."
    note = "Thumbnails link to each image's interactive explorer (a video's: its animated overlay)."
    return note + (" Rows without a thumbnail link to their stats.json." if not all(pictures) else "")
