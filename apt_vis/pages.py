"""The explorer and report pages: self-contained HTML written next to the other outputs."""

from __future__ import annotations

import base64
import html
import json
import os
import urllib.parse
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

import visualize_patches as vp


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


EXPLORER_SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const sizes = D.patch_sizes, n = sizes.length;
const dims = sizes.map(s => [D.maps[s].length, D.maps[s][0].length]);
const canvas = document.getElementById('view'), ctx = canvas.getContext('2d');
const img = new Image();
function select(th) {
  // the rule of select_patches: from the largest scale down, a cell of scale i >= 1 is
  // chosen where score < th[i-1] and no larger chosen cell covers it; the rest are base cells
  const masks = new Array(n); let covered = null, parentCols = 0;
  for (let i = n - 1; i >= 0; i--) {
    const [rows, cols] = dims[i], m = new Uint8Array(rows * cols), cov = new Uint8Array(rows * cols);
    const values = D.maps[sizes[i]];
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
      const up = covered ? covered[(r >> 1) * parentCols + (c >> 1)] : 0;
      const v = values[r][c];
      const chosen = !up && (i === 0 || (v !== null && v < th[i - 1]));
      m[r * cols + c] = chosen ? 1 : 0; cov[r * cols + c] = (up || chosen) ? 1 : 0;
    }
    masks[i] = m; covered = cov; parentCols = cols;
  }
  return masks;
}
function thresholds() {
  return sizes.slice(1).map((_, k) => parseFloat(document.getElementById('threshold-' + k).value));
}
function drawMap(scale) {
  const i = sizes.indexOf(scale), [rows, cols] = dims[i], values = D.maps[scale];
  let lo = Infinity, hi = -Infinity;
  for (const row of values) for (const v of row) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!(hi - lo > 1e-12)) { lo -= 0.5; hi += 0.5; }
  const off = document.createElement('canvas'); off.width = cols; off.height = rows;
  const octx = off.getContext('2d'), data = octx.createImageData(cols, rows);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const v = values[r][c], k = 4 * (r * cols + c);
    const rgb = v === null ? D.padded_rgb : D.colormap[Math.max(0, Math.min(255, Math.round((v - lo) / (hi - lo) * 255)))];
    data.data[k] = rgb[0]; data.data[k + 1] = rgb[1]; data.data[k + 2] = rgb[2]; data.data[k + 3] = 255;
  }
  octx.putImageData(data, 0, 0);
  ctx.save(); ctx.globalAlpha = D.alpha; ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, cols * scale, rows * scale); ctx.restore();
  document.getElementById('map-range').textContent = lo.toPrecision(4) + ' .. ' + hi.toPrecision(4) + ' ' + D.label;
}
function update() {
  const th = thresholds(), masks = select(th);
  let total = 0;
  sizes.forEach((s, i) => {
    const count = masks[i].reduce((a, b) => a + b, 0); total += count;
    document.getElementById('count-' + s).textContent = count;
  });
  th.forEach((t, k) => { document.getElementById('threshold-value-' + k).textContent = t.toPrecision(6); });
  document.getElementById('apt-patches').textContent = total;
  document.getElementById('retained-ratio').textContent = (total / D.uniform).toFixed(4);
  document.getElementById('retained-percent').textContent = (100 * total / D.uniform).toFixed(1) + '%';
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(img, 0, 0);
  if (document.getElementById('show-map').checked) drawMap(parseInt(document.getElementById('map-scale').value));
  else document.getElementById('map-range').textContent = '';
  if (document.getElementById('show-borders').checked) {
    ctx.save(); ctx.beginPath(); ctx.rect(0, 0, D.width, D.height); ctx.clip();
    ctx.lineWidth = D.line_thickness;
    sizes.forEach((s, i) => {
      ctx.strokeStyle = D.scale_colors ? 'rgb(' + D.scale_colors[i % D.scale_colors.length].join(',') + ')'
                                       : 'rgb(' + D.line_color.join(',') + ')';
      const [rows, cols] = dims[i], m = masks[i];
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++)
        if (m[r * cols + c]) ctx.strokeRect(c * s, r * s, s, s);
    });
    ctx.restore();
  }
  document.body.dataset.ready = '1';
}
document.querySelectorAll('input, select').forEach(e => { e.addEventListener('input', update); e.addEventListener('change', update); });
document.getElementById('reset').addEventListener('click', () => {
  D.thresholds.forEach((t, k) => { document.getElementById('threshold-' + k).value = t; }); update();
});
img.onload = update;
img.src = D.image;
"""


def explorer_html(
    title: str,
    image_jpeg: bytes,
    maps: Mapping[int, np.ndarray],
    thresholds: Sequence[float],
    counts: Mapping[int, int],
    uniform: int,
    qwen2vl_tokens: int,
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
    sliders = "\n".join(
        f'<div class="slider"><label for="threshold-{k}">threshold for {ps} px patches</label>'
        f'<input type="range" id="threshold-{k}" min="{lo!r}" max="{hi!r}" step="any" value="{float(t)!r}">'
        f'<output id="threshold-value-{k}">{t:g}</output></div>'
        for k, (ps, t) in enumerate(zip(sizes[1:], thresholds))
    )
    count_rows = "\n".join(f'<tr><td>{ps} px patches</td><td id="count-{ps}">{counts[ps]}</td></tr>' for ps in sizes)
    scale_options = "".join(f'<option value="{ps}">{ps} px</option>' for ps in sizes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>APT explorer: {esc(vp.one_line(Path(title).name))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 10px; }}
.layout {{ display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }}
.panel {{ min-width: 320px; max-width: 420px; }}
.slider {{ margin: 8px 0; }} .slider label {{ display: block; font-size: 14px; }}
.slider input {{ width: 260px; vertical-align: middle; }} output {{ font-family: monospace; margin-left: 8px; }}
table {{ border-collapse: collapse; margin-top: 10px; }} td {{ padding: 3px 10px; border-bottom: 1px solid #ddd; }}
td:last-child {{ text-align: right; font-family: monospace; }} tr.total td {{ font-weight: bold; }}
canvas {{ max-width: 100%; height: auto; border: 1px solid #aaa; image-rendering: pixelated; }}
.note {{ font-size: 12px; color: #555; margin-top: 10px; }}
</style></head>
<body>
<h1>APT explorer: {esc(vp.one_line(Path(title).name))}</h1>
<p class="note">{esc(vp.one_line(title))}</p>
<div class="layout">
<div class="panel">
{sliders}
<button id="reset" type="button">reset to this run's thresholds</button>
<table>
{count_rows}
<tr class="total"><td>APT patches (total)</td><td id="apt-patches">{sum(counts.values())}</td></tr>
<tr><td>uniform patches (no APT)</td><td id="uniform-patches">{uniform}</td></tr>
<tr><td>retained ratio</td><td><span id="retained-ratio">{sum(counts.values()) / uniform:.4f}</span>
 (<span id="retained-percent">{100 * sum(counts.values()) / uniform:.1f}%</span>)</td></tr>
<tr><td>Qwen2-VL LLM tokens without APT</td><td id="qwen2vl-tokens">{qwen2vl_tokens}</td></tr>
</table>
<p><label><input type="checkbox" id="show-borders" checked> patch borders</label><br>
<label><input type="checkbox" id="show-map"> importance map of scale</label>
<select id="map-scale">{scale_options}</select> <span id="map-range" class="note"></span></p>
<p class="note">A patch of scale i merges where its {esc(label)} is below the i-th threshold and no
larger chosen patch covers it; the rest of the image stays in {sizes[0]} px patches. Padded edge cells
never merge. Counts are recomputed here with the same rule as the command line.</p>
</div>
<canvas id="view" width="{width}" height="{height}"></canvas>
</div>
<script id="data" type="application/json">{_json_for_script(data)}</script>
<script>{EXPLORER_SCRIPT}</script>
</body></html>
"""


REPORT_SCRIPT = r"""
const table = document.getElementById('results');
table.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = table.tBodies[0], rows = Array.from(body.rows);
  const numeric = th.dataset.type === 'number', asc = th.dataset.order !== 'asc';
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
    const d = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
    return asc ? d : -d;
  });
  table.querySelectorAll('th').forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? 'asc' : 'desc';
  rows.forEach(r => body.appendChild(r));
}));
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def report_html(rows: Sequence[Mapping], summary: Mapping, patch_sizes: Sequence[int]) -> str:
    """A static gallery of a batch run: overlay thumbnails and numbers, sortable, failures listed.

    rows: the summary rows; their 'output' is the image's folder relative to the report.
    """
    def esc(text: str) -> str:  # a name or message shown as text: one line, HTML-escaped
        return html.escape(vp.one_line(text))

    ok = sorted((r for r in rows if r["status"] in ("ok", "reused")), key=lambda r: r["retained_ratio"])
    failed = [r for r in rows if r["status"] == "failed"]
    body = []
    for r in ok:
        folder = Path(r["output"]).as_posix()
        thumb = relative_url(f"{folder}/patches_thumbnail.jpg")
        has_picture = r.get("pictures", True)
        view = "explorer.html" if r["kind"] == "image" else "patches_visualization.gif"
        link = relative_url(f"{folder}/{view}" if has_picture else f"{folder}/stats.json")
        picture = (f'<a href="{esc(link)}"><img src="{esc(thumb)}" alt="patches of {esc(r["path"])}" '
                   f'width="{vp.THUMBNAIL_WIDTH}"></a>') if has_picture else '<span class="note">stats only</span>'
        cells = [
            f'<td data-value="{esc(r["path"])}">{picture}<br><a href="{esc(link)}">{esc(r["path"])}</a></td>',
            f'<td data-value="{float(r["retained_ratio"])!r}">{r["retained_ratio"]:.4f}</td>',
            f'<td data-value="{r["apt_patches"]}">{r["apt_patches"]}</td>',
            f'<td data-value="{r["uniform_patches"]}">{r["uniform_patches"]}</td>',
            f'<td data-value="{r["qwen2vl_tokens"]}">{r["qwen2vl_tokens"]}</td>',
            *(f'<td data-value="{r.get(f"patches_{ps}", 0)}">{r.get(f"patches_{ps}", 0)}</td>' for ps in patch_sizes),
            f'<td data-value="{r["resized_width"] * r["resized_height"]}">'
            f'{r["original_width"]}x{r["original_height"]} &rarr; {r["resized_width"]}x{r["resized_height"]}</td>',
        ]
        body.append(f'<tr class="result">{"".join(cells)}</tr>')
    heads = ["image", "retained ratio", "APT patches", "uniform patches", "Qwen2-VL tokens (no APT)",
             *(f"{ps} px" for ps in patch_sizes), "size"]
    types = ["text"] + ["number"] * (len(heads) - 1)
    head = "".join(f'<th data-type="{t}"{" data-order=asc" if k == 1 else ""}>{esc(h)}</th>'
                   for k, (h, t) in enumerate(zip(heads, types)))  # rows start sorted by ratio
    failures = "".join(f'<li><code>{esc(r["path"])}</code>: {esc(r["error"])}</li>' for r in failed)
    ratio = summary["retained_ratio"]
    stats_line = (
        f'{summary["images"]["ok"] + summary["images"]["reused"]} images analysed, {summary["images"]["failed"]} failed, '
        f'{summary["files_skipped"]} other files skipped. Thresholds {esc(str(summary["thresholds"]))}'
        + (f' (chosen for target ratio {summary["target_ratio"]})' if summary.get("target_ratio") else "")
        + (f'. Retained ratio mean {ratio["mean"]:.4f}, median {ratio["median"]:.4f}, '
           f'p10 {ratio["p10"]:.4f}, p90 {ratio["p90"]:.4f}; overall {ratio["overall"]:.4f}.' if ratio else ".")
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>APT batch report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #222; }}
table {{ border-collapse: collapse; }} th {{ cursor: pointer; background: #eee; padding: 6px; position: sticky; top: 0; }}
th[data-order=asc]::after {{ content: " \\25B2"; }} th[data-order=desc]::after {{ content: " \\25BC"; }}
td {{ padding: 6px; border-bottom: 1px solid #ddd; vertical-align: top; font-family: monospace; }}
td:first-child {{ font-family: system-ui, sans-serif; }} .note {{ color: #666; }}
</style></head>
<body>
<h1>APT batch report</h1>
<p>{stats_line}</p>
<p class="note">Rows are ordered by retained ratio (lowest first: the most tokens saved); click a
column to sort. Thumbnails link to each image's interactive explorer. See summary.png, summary.csv
and summary.json next to this page.</p>
<table id="results"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Failures ({len(failed)})</h2>
<ul id="failures">{failures}</ul>
<script>{REPORT_SCRIPT}</script>
</body></html>
"""
