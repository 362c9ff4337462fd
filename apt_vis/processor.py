"""--processor: a model's preprocessor_config.json read through transformers (imported here, only
for this option), as Settings fields."""

from __future__ import annotations

from pathlib import Path

from visualize_patches import RESAMPLE_NAMES, ToolError


def load_processor_settings(path: Path) -> dict:
    """Geometry and normalisation from a Qwen2-VL-family preprocessor_config.json
    (or a model folder holding one), read through transformers. Raises ToolError."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        raise ToolError("--processor needs transformers: pip install transformers") from None
    config = path / "preprocessor_config.json" if path.is_dir() else path
    if not config.is_file():
        raise ToolError(f"{config}: no such file (expected a preprocessor_config.json or a model folder)")
    try:
        values, _ = Qwen2VLImageProcessorPil.get_image_processor_dict(str(config))
        processor = Qwen2VLImageProcessorPil(**values)
    except (OSError, ValueError, TypeError) as exc:
        raise ToolError(f"{config}: not a Qwen2-VL image processor config ({exc})") from None
    size = processor.size
    resample = processor.resample
    if not (isinstance(resample, int) and int(resample) in RESAMPLE_NAMES):  # PILImageResampling is an int
        raise ToolError(f"{config}: unknown \"resample\": {resample!r} (PIL's codes: "
                        + ", ".join(f"{k} {v}" for k, v in RESAMPLE_NAMES.items()) + ")")
    return {
        "resample": int(resample),
        "patch_size": int(processor.patch_size), "merge_size": int(processor.merge_size),
        "temporal_patch_size": int(processor.temporal_patch_size),
        "min_pixels": int(size.shortest_edge), "max_pixels": int(size.longest_edge),
        "image_mean": tuple(float(v) for v in processor.image_mean),
        "image_std": tuple(float(v) for v in processor.image_std),
    }
