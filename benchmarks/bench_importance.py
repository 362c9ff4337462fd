#!/usr/bin/env python3
"""Importance maps of a 1,003,520-pixel photo: this tool's CPU path (numpy, counting histograms
per strip of cells), its torch path (CUDA's, here on the CPU) and a one-hot implementation of the
same definition (the original tool's approach), measured in one run. Targets (issue 10): numpy
>= 100x faster than one-hot and <= 15 ms warm; <= 64 MB extra memory.

Each implementation runs in a fresh process; its extra memory is the peak resident size during
the call minus the resident size just before it (the peak is reset first via
/proc/self/clear_refs), after a warm-up call on a small image so that code pages and caches
are not counted.

    .venv/bin/python benchmarks/bench_importance.py
"""

from __future__ import annotations

import json
import subprocess
import sys

from _common import PEARL, ROOT, machine, median

WIDTH, HEIGHT = 896, 1120  # 1,003,520 pixels = Qwen2-VL's default max_pixels
SPEED_TARGET, MEMORY_TARGET_MB, WARM_TARGET_MS = 100.0, 64.0, 15.0

CHILD = r"""
import json, math, sys, time
import numpy as np, torch
from PIL import Image
sys.path.insert(0, ROOT)
import visualize_patches as vp
from apt_vis import torch_backend as tb

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def one_hot_maps(normalized, patch_sizes):
    # the original tool's algorithm on the same integer bins: every pixel becomes a 512-wide
    # one-hot row, summed per patch into a histogram, then -sum p log2 p
    u8 = tb.recover_uint8(normalized[:, None], vp.CLIP_MEAN, vp.CLIP_STD)
    bins = tb.gray_bins(u8)  # (1, 1, H, W)
    maps = {}
    for ps in patch_sizes:
        cells = tb._patch_pixels(bins, ps)  # (1, rows, cols, N)
        b, rows, cols, n = cells.shape
        flat = cells.reshape(-1, n).long()
        one_hot = torch.zeros(flat.shape[0], n, vp.ENTROPY_BINS)
        one_hot.scatter_(2, flat.unsqueeze(2), 1)
        hist = one_hot.sum(1)
        del one_hot
        p = hist.double() / n
        maps[ps] = (-(p * torch.log2(p.clamp_min(1e-300))).sum(1)).view(rows, cols)
    return maps

def main(mode, repeats):
    image = Image.open(PEARL).convert("RGB").resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    normalized = torch.from_numpy(vp.normalize_image(np.asarray(image)))[None]
    small = normalized[..., :112, :112].contiguous()
    tok = vp.PatchTokenizer()
    if mode == "numpy":  # what a CPU run does: uint8 pixels in, no torch
        pixels = np.asarray(image)[None, None]
        normalized, small = pixels, pixels[:, :, :112, :112]
        run = lambda x: {ps: m[0] for ps, m in vp.importance_maps_np(x, tok.patch_sizes, "entropy").items()}
    elif mode == "torch":
        run = lambda x: tok.compute_importance_maps(x)
    else:
        run = lambda x: one_hot_maps(x, tok.patch_sizes)
    run(small)  # warm-up
    exact_peak = reset_peak()
    before = status("VmRSS")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        maps = run(normalized)
        times.append(time.perf_counter() - t)
    extra = status("VmHWM") - before
    values = {str(ps): m.reshape(m.shape[-2:]).tolist() for ps, m in maps.items()}
    print(json.dumps({"times": times, "extra_mb": extra, "exact_peak": exact_peak, "maps": values}))

main(sys.argv[1], int(sys.argv[2]))
"""


def child(mode: str, repeats: int) -> dict:
    code = f"ROOT = {str(ROOT)!r}; PEARL = {str(PEARL)!r}; WIDTH, HEIGHT = {WIDTH}, {HEIGHT}\n" + CHILD
    out = subprocess.run([sys.executable, "-c", code, mode, str(repeats)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> int:
    import numpy as np

    print(f"machine: {machine()}")
    print(f"image: {PEARL.name} resized to {WIDTH}x{HEIGHT} = {WIDTH * HEIGHT:,} pixels; patch sizes 14, 28, 56")
    ours = child("numpy", 15)
    torch_path = child("torch", 5)
    onehot = child("onehot", 1)
    ours_s, onehot_s = median(ours["times"]), median(onehot["times"])
    # padded cells are NaN in ours and finite in the one-hot maps: compare finite cells only
    mismatch = 0
    for ps in ours["maps"]:
        if ours["maps"][ps] != torch_path["maps"][ps]:  # NaN != NaN in lists: compare as arrays below
            a, b = np.array(ours["maps"][ps], dtype=float), np.array(torch_path["maps"][ps], dtype=float)
            if not np.array_equal(a, b, equal_nan=True):
                raise SystemExit(f"numpy and torch maps differ at patch size {ps}")
        a, b = np.array(ours["maps"][ps], dtype=float), np.array(onehot["maps"][ps], dtype=float)
        finite = np.isfinite(a)
        mismatch = max(mismatch, float(np.abs(a[finite] - b[finite]).max()))
    speedup = onehot_s / ours_s
    torch_s = median(torch_path["times"])
    print(f"numpy, CPU path (this tool):     {ours_s * 1000:8.1f} ms (median of {len(ours['times'])}), "
          f"extra memory {ours['extra_mb']:7.1f} MB")
    print(f"torch, CUDA path on the CPU:     {torch_s * 1000:8.1f} ms (median of {len(torch_path['times'])}), "
          f"extra memory {torch_path['extra_mb']:7.1f} MB; numpy maps bit-identical")
    print(f"one-hot histograms (original):   {onehot_s * 1000:8.1f} ms (1 run),        "
          f"extra memory {onehot['extra_mb']:7.1f} MB")
    print(f"largest difference between the two maps (finite cells): {mismatch:.2e} bits")
    if not (ours["exact_peak"] and onehot["exact_peak"]):
        print("note: /proc/self/clear_refs unavailable; extra memory is an upper bound")
    print(f"speed ratio: {speedup:.0f}x (target >= {SPEED_TARGET:.0f}x) "
          f"{'PASS' if speedup >= SPEED_TARGET else 'FAIL'}")
    print(f"extra memory: {ours['extra_mb']:.1f} MB (target <= {MEMORY_TARGET_MB:.0f} MB) "
          f"{'PASS' if ours['extra_mb'] <= MEMORY_TARGET_MB else 'FAIL'}; "
          f"one-hot needs {onehot['extra_mb'] / max(ours['extra_mb'], 1e-9):.0f}x more")
    print(f"numpy warm: {ours_s * 1000:.1f} ms (target <= {WARM_TARGET_MS:g} ms) "
          f"{'PASS' if ours_s * 1000 <= WARM_TARGET_MS else 'FAIL'}; {torch_s / ours_s:.0f}x faster than torch")
    return 0 if (speedup >= SPEED_TARGET and ours["extra_mb"] <= MEMORY_TARGET_MB and mismatch < 1e-6
                 and ours_s * 1000 <= WARM_TARGET_MS) else 1


if __name__ == "__main__":
    sys.exit(main())
