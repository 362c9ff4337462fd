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
