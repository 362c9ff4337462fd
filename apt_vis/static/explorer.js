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
