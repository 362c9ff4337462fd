"""The torch implementation of APT's scorers: the CUDA path (--device cuda), upsample_mse's
bilinear resampling (torch's interpolate, on any device), and the reference the core's numpy
scorers are tested against (tests/test_numpy_backend.py: entropy bit-identical, laplacian to
1e-12 relative). torch is imported inside the functions, so importing this module is cheap;
visualize_patches reaches it through extension("torch_backend")."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from visualize_patches import (
    AGGREGATES,
    CLIP_MEAN,
    CLIP_STD,
    ENTROPY_BINS,
    ENTROPY_FIXED_POINT_BITS,
    ENTROPY_QUANTUM_BITS,
    LAPLACIAN_KERNEL,
    LUMA_BIN_DIVISOR,
    LUMA_WEIGHTS,
    LUMA_WEIGHTS_1E4,
    Settings,
    ToolError,
    _check_images_np,
    grid_shape,
    padded_cells,
    select_patches_np,
)
from apt_vis.machine import nvidia_gpu_visible

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


TORCH_INSTALL_HINT = ("pip install torch (CPU only: pip install torch --index-url "
                      "https://download.pytorch.org/whl/cpu); see the README's Set-up")


def require_torch(what: str):
    """The torch module, imported now (CUDA, video, upsample_mse); a ToolError naming `what` without it."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        raise ToolError(f"{what} needs torch, which is not installed: {TORCH_INSTALL_HINT}") from None
    return torch


def cuda_available() -> bool:
    """torch.cuda.is_available(), importing torch; False when torch is not installed."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_device(requested: str) -> str:
    """--device's 'auto' or 'cuda' -> the device to use: 'cuda' when requested and available
    (else a ToolError), or for 'auto' when an NVIDIA GPU is visible and torch sees CUDA (torch
    is imported only then), else 'cpu'."""
    if requested == "auto":
        return "cuda" if nvidia_gpu_visible() and cuda_available() else "cpu"  # the core probed first
    require_torch("--device cuda")
    if not cuda_available():
        raise ToolError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return "cuda"


def recover_uint8(normalized: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., 3, H, W) CLIP-normalised float -> (..., 3, H, W) uint8 by rounding.

    Exact for tensors that came from uint8 pixels: float32 round-off is ~1e-4
    of a level, far from the 0.5 that rounding needs.
    """
    import torch

    out = torch.empty(normalized.shape, dtype=torch.uint8, device=normalized.device)
    for c in range(3):  # one channel at a time keeps the float temporaries small
        levels = normalized[..., c, :, :] * std[c]
        out[..., c, :, :] = levels.add_(mean[c]).mul_(255).round_().clamp_(0, 255)
    return out


def gray_bins(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> (..., H, W) int32 histogram bin in [0, 510).

    bin = floor(2 * (0.2989 R + 0.5870 G + 0.1140 B)), in exact integer arithmetic.
    """
    import torch

    wr, wg, wb = LUMA_WEIGHTS_1E4
    acc = rgb[..., 0, :, :].to(torch.int32).mul_(wr)  # one channel at a time: small temporaries
    acc.add_(rgb[..., 1, :, :].to(torch.int32).mul_(wg))
    acc.add_(rgb[..., 2, :, :].to(torch.int32).mul_(wb))
    return acc.floor_divide_(LUMA_BIN_DIVISOR)


@functools.lru_cache(maxsize=32)
def _log2_fixed_table(n: int, device: torch.device) -> torch.Tensor:
    """(n + 1,) int64: round(log2(c) * 2**ENTROPY_FIXED_POINT_BITS), computed once on the CPU."""
    import torch

    c = np.arange(n + 1, dtype=np.float64)
    table = np.round(np.log2(np.maximum(c, 1)) * 2.0**ENTROPY_FIXED_POINT_BITS)
    return torch.from_numpy(table.astype(np.int64)).to(device)


def _patch_pixels(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, T, H, W) -> (B, rows, cols, T * p * p): each patch's pixels, zero-padded past the edge."""
    import torch.nn.functional as F

    b, t, h, w = x.shape
    rows, cols = grid_shape(h, w, patch_size)
    if rows * patch_size != h or cols * patch_size != w:
        x = F.pad(x, (0, cols * patch_size - w, 0, rows * patch_size - h))
    cells = x.view(b, t, rows, patch_size, cols, patch_size).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, rows, cols, t * patch_size * patch_size)


def patch_entropy(bins: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Shannon entropy in bits of each patch's 512-bin histogram.

    bins: (B, T, H, W) integer bins; the T frames of a temporal patch share one
    histogram (T = 1 for images). Pixels past the right/bottom edge count as
    zero padding (bin 0), as in the APT reference.
    Returns (B, rows, cols) float64, bit-identical on every device.

    H = log2 N - (1/N) sum_b c_b log2 c_b = (1/N) sum_pixels (log2 N - log2 c_bin(pixel)),
    with N = T * patch_size**2 and the counts c by scatter-add (no one-hot tensor).
    """
    import torch

    cells = _patch_pixels(bins, patch_size)
    b, rows, cols, n = cells.shape
    num_patches = b * rows * cols
    offsets = torch.arange(num_patches, device=bins.device, dtype=torch.int64).mul_(ENTROPY_BINS)
    keys = cells.reshape(num_patches, n).to(torch.int64).add_(offsets[:, None])  # flat (patch, bin)
    del cells
    counts = torch.zeros(num_patches * ENTROPY_BINS, dtype=torch.int32, device=bins.device)
    counts.scatter_add_(0, keys.view(-1), torch.ones(1, dtype=torch.int32, device=bins.device).expand(keys.numel()))
    own_count = counts.gather(0, keys.view(-1))  # per pixel: how many pixels of its patch share its bin
    del counts
    own_count = keys.view(-1).copy_(own_count)  # widened to int64 in the keys' buffer, no longer needed
    del keys
    table = _log2_fixed_table(n, bins.device)
    per_pixel = table.gather(0, own_count).view(num_patches, n)  # fixed-point log2 c
    del own_count
    deficit = table[n] * n - per_pixel.sum(dim=1)  # exact int64: N * H * 2**fixed_bits
    scale = float(n * 2 ** (ENTROPY_FIXED_POINT_BITS - ENTROPY_QUANTUM_BITS))
    entropy = torch.round(deficit.to(torch.float64) / scale) / 2.0**ENTROPY_QUANTUM_BITS
    return entropy.view(b, rows, cols)


def _gray_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) uint8 -> (B, T, H, W) float64 luma in [0, 1]."""
    import torch

    x = images_u8.to(torch.float64) / 255
    wr, wg, wb = LUMA_WEIGHTS
    return wr * x[:, :, 0] + wg * x[:, :, 1] + wb * x[:, :, 2]


def _aggregate(values: torch.Tensor, patch_size: int, how: str) -> torch.Tensor:
    """(B, T, H, W) per-pixel scores -> (B, rows, cols) per patch (zero padding counts)."""
    cells = _patch_pixels(values, patch_size)
    if how == "mean":
        return cells.mean(dim=-1)
    if how == "max":
        return cells.amax(dim=-1)
    if how == "std":
        return cells.std(dim=-1)  # unbiased, as torch.std in the reference
    raise ValueError(f"unknown aggregate {how!r}")


def score_entropy(images_u8: torch.Tensor, patch_sizes: Sequence[int], aggregate: str) -> dict[int, torch.Tensor]:
    bins = gray_bins(images_u8)
    return {ps: patch_entropy(bins, ps) for ps in patch_sizes}


def score_laplacian(images_u8: torch.Tensor, patch_sizes: Sequence[int], aggregate: str) -> dict[int, torch.Tensor]:
    """|8-neighbour Laplacian| of [0, 1] grayscale (reflect padding), aggregated per patch."""
    import torch
    import torch.nn.functional as F

    gray = _gray_unit(images_u8)
    b, t, h, w = gray.shape
    kernel = torch.tensor(LAPLACIAN_KERNEL, dtype=gray.dtype, device=gray.device).view(1, 1, 3, 3)
    flat = F.pad(gray.reshape(b * t, 1, h, w), (1, 1, 1, 1), mode="reflect" if min(h, w) > 1 else "replicate")
    response = F.conv2d(flat, kernel).abs().view(b, t, h, w)
    return {ps: _aggregate(response, ps, aggregate) for ps in patch_sizes}


def score_upsample_mse(images_u8: torch.Tensor, patch_sizes: Sequence[int], aggregate: str) -> dict[int, torch.Tensor]:
    """Mean squared error of a bilinear down-and-up resampling by 0.5**scale, mean per patch."""
    import torch
    import torch.nn.functional as F

    x = images_u8.to(torch.float64) / 255
    b, t, c, h, w = x.shape
    flat = x.reshape(b * t, c, h, w)
    maps = {}
    for i, ps in enumerate(patch_sizes):
        factor = 0.5**i
        if factor == 1.0:
            error = torch.zeros((b, t, h, w), dtype=x.dtype, device=x.device)
        else:
            down = F.interpolate(flat, scale_factor=factor, mode="bilinear", align_corners=False)
            up = F.interpolate(down, scale_factor=1 / factor, mode="bilinear", align_corners=False)
            if up.shape[-2:] != (h, w):
                up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
            error = ((flat - up) ** 2).mean(dim=1).view(b, t, h, w)
        maps[ps] = _aggregate(error, ps, "mean")
    return maps


# The torch scorers by name, as SCORERS (the numpy ones, which CPU runs use).
TORCH_SCORERS: dict[str, Callable[..., dict[int, torch.Tensor]]] = {
    "entropy": score_entropy,
    "laplacian": score_laplacian,
    "upsample_mse": score_upsample_mse,
}


def select_patches(maps: Mapping[int, torch.Tensor], thresholds: Sequence[float]) -> dict[int, torch.Tensor]:
    """select_patches_np for torch maps (any device): bool tensors on the maps' device. The masks
    are a few thousand cells, so the one rule runs in numpy whatever the device."""
    import torch

    device = next(iter(maps.values())).device
    chosen = select_patches_np({ps: m.detach().cpu().numpy() for ps, m in maps.items()}, thresholds)
    return {ps: torch.from_numpy(m).to(device) for ps, m in chosen.items()}


def _inference_mode(method: Callable) -> Callable:
    """torch.inference_mode() as a decorator that imports torch on the first call, not at import."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)

    return wrapper


class PatchTokenizer:
    """Multi-scale importance maps and APT masks for CLIP-normalised images.

    Works on whatever device its input lives on; scales are base_patch_size * 2**i
    for i < num_scales.
    """

    def __init__(
        self,
        num_scales: int = 3,
        base_patch_size: int = 14,
        thresholds: Sequence[float] = (3.0, 2.0),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        method: str = "entropy",
        aggregate: str = "mean",
    ):
        if len(thresholds) != num_scales - 1:
            raise ValueError(f"{num_scales} scales need {num_scales - 1} thresholds, got {len(thresholds)}")
        if method not in TORCH_SCORERS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(TORCH_SCORERS)}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; choose from {AGGREGATES}")
        self.num_scales = num_scales
        self.base_patch_size = base_patch_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.method = method
        self.aggregate = aggregate

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        return tuple(self.base_patch_size * 2**i for i in range(self.num_scales))

    @_inference_mode
    def compute_importance_maps(self, normalized_images: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, 3, H, W) or (B, T, 3, H, W) normalised -> {patch size: (B, rows, cols) float64}.

        The uint8 pixels are recovered by rounding, then scored by importance_from_uint8.
        """
        x = normalized_images
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"expected (B, 3, H, W) or (B, T, 3, H, W), got {tuple(normalized_images.shape)}")
        return self.importance_from_uint8(recover_uint8(x, self.mean, self.std))

    @_inference_mode
    def importance_from_uint8(self, images_u8: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, T, 3, H, W) uint8 RGB -> {patch size: (B, rows, cols) float64}.

        The T frames of each temporal patch are scored together (one histogram per
        tube; T = 1 for images). Padded edge cells are NaN. Same result as
        compute_importance_maps on the normalised pixels, without the round trip.
        """
        import torch

        if images_u8.dim() != 5 or images_u8.shape[2] != 3 or images_u8.dtype != torch.uint8:
            raise ValueError(f"expected uint8 (B, T, 3, H, W), got {images_u8.dtype} {tuple(images_u8.shape)}")
        scorer = TORCH_SCORERS[self.method]
        h, w = images_u8.shape[-2:]
        maps = {}
        for ps, m in scorer(images_u8, self.patch_sizes, self.aggregate).items():
            pad = torch.from_numpy(padded_cells(h, w, ps)).to(m.device)
            maps[ps] = m.to(torch.float64).masked_fill(pad, float("nan"))
        return maps

    @_inference_mode
    def construct_masks(self, maps: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{patch size: scores} -> {patch size: bool mask of chosen patches}."""
        return select_patches(maps, self.thresholds)


def cuda_maps(images: Sequence[np.ndarray], settings: Settings, device: str,
              batch: int) -> list[dict[int, np.ndarray]]:
    """Scorer.maps on a torch device: PatchTokenizer on inputs of equal shape, `batch` at a time."""
    tokenizer = PatchTokenizer(
        num_scales=settings.num_scales, base_patch_size=settings.patch_size, thresholds=settings.thresholds,
        mean=settings.image_mean, std=settings.image_std, method=settings.method, aggregate=settings.aggregate,
    )
    torch = require_torch("--device cuda")
    results: list[dict[int, np.ndarray] | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for k, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(k)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            stacked = np.stack([images[k] if images[k].ndim == 4 else images[k][None] for k in chunk])
            # (B, T, H, W, 3) -> (B, T, 3, H, W); the normalise-and-round trip of
            # compute_importance_maps returns these same uint8 values (tested), so skip it
            tensor = torch.from_numpy(stacked).to(device).permute(0, 1, 4, 2, 3)
            maps = tokenizer.importance_from_uint8(tensor)
            arrays = {ps: m.cpu().numpy() for ps, m in maps.items()}
            for j, k in enumerate(chunk):
                # copies in numpy's own memory: holding many small torch-allocated buffers
                # fragments the heap (measured: +260 MB over a 600-frame video)
                results[k] = {ps: a[j].copy() for ps, a in arrays.items()}
    return results  # type: ignore[return-value]


def upsample_mse_maps_np(images_u8: np.ndarray, patch_sizes: Sequence[int], aggregate: str) -> dict[int, np.ndarray]:
    """As score_upsample_mse, whose bilinear resampling is torch's interpolate: torch is imported
    here, on first use, and only for this method."""
    torch = require_torch("--method upsample_mse")
    _check_images_np(images_u8)
    h, w = images_u8.shape[2:4]
    tensor = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 1, 4, 2, 3)
    with torch.inference_mode():
        maps = score_upsample_mse(tensor, patch_sizes, aggregate)
    out = {}
    for ps, m in maps.items():
        values = m.to(torch.float64).numpy().copy()
        values[:, padded_cells(h, w, ps)] = np.nan
        out[ps] = values
    return out
