"""Video: frames sampled and resized exactly as the Qwen-VL video processors do, temporal
patches scored while streaming, and the video outputs (mp4 and GIF overlays, map animations)."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from loguru import logger

from visualize_patches import (
    BICUBIC,
    CPU,
    Job,
    Outcome,
    QWEN2VL_MAX_ASPECT_RATIO,
    RESAMPLE_NAMES,
    RenderOptions,
    SCORERS,
    Scorer,
    Settings,
    Stopwatch,
    THUMBNAIL_WIDTH,
    ToolError,
    _fit,
    check_input_file,
    color_range,
    colorize,
    compute_masks,
    draw_patch_borders,
    encode_jpeg,
    encode_json,
    encode_npz,
    one_line,
    patch_counts,
    scale_palette,
    smart_resize,
    staged_output,
    stats_record,
)

from apt_vis.batch import Progress
from apt_vis.pictures import _gradient_strip
from apt_vis.machine import release_free_memory
from apt_vis.thresholds import sweep_files
from apt_vis.torch_backend import require_torch

# Which transformers video processor a model's videos follow: frame sampling and sizing differ.
VIDEO_PROCESSOR_OF = {"qwen2-vl": "Qwen2VLVideoProcessor", "qwen2.5-vl": "Qwen2VLVideoProcessor",
                      "qwen3-vl": "Qwen3VLVideoProcessor"}

# --cap-pixels-per-frame, as transformers' video processors' cap_pixels_per_frame (qwen-vl-utils'
# behaviour): Qwen2VLVideoProcessor shares 90 % of max_video_tokens = 128000 tokens' pixels among the
# frames; Qwen3VLVideoProcessor caps each frame at max_video_tokens = 768 tokens; both floor a frame at
# 1.05 x the minimum pixels.
QWEN2VL_CAP_VIDEO_TOKENS = 128000
QWEN2VL_CAP_BUDGET_SHARE = 0.9
QWEN3VL_CAP_FRAME_TOKENS = 768
CAP_MIN_PIXELS_FACTOR = 1.05


def sample_frame_indices(
    total_frames: int, video_fps: float, fps: float, temporal_patch_size: int, min_frames: int, max_frames: int
) -> list[int]:
    """Indices of the frames Qwen2-VL samples from a video, as transformers'
    Qwen2VLVideoProcessor.sample_frames: fps frames per second, clamped to
    [min_frames, max_frames] and the video's length, floored to a multiple of
    temporal_patch_size, spread uniformly. When that leaves no frame (a video, or
    max_frames, shorter than one temporal patch), min(total, max_frames) frames are
    taken; the last tube is then padded by repeating its last frame, as Qwen2-VL's
    patchify does.
    """
    torch = require_torch("video")  # arange's float32 steps, exactly as transformers takes them
    t = temporal_patch_size
    cap = math.floor(min(max_frames, total_frames) / t) * t
    wanted = total_frames / video_fps * fps
    count = math.floor(min(max(wanted, min_frames), cap, total_frames) / t) * t
    if count <= 0:  # fewer frames than one temporal patch allows (transformers divides by zero here)
        count = min(total_frames, max_frames)
        # the float step total/count can make arange yield count + 1 values: keep the first count
        return torch.arange(0, total_frames, total_frames / count).int().tolist()[:count]
    return torch.arange(0, total_frames, total_frames / count).int().tolist()


def sample_frame_indices_qwen3(total_frames: int, video_fps: float, fps: float, min_frames: int,
                               max_frames: int) -> list[int]:
    """Indices of the frames Qwen3-VL samples, as transformers' Qwen3VLVideoProcessor.sample_frames:
    int(duration * fps) frames clamped to [min_frames, max_frames] and the video's length, spread
    evenly from the first frame to the last (numpy's linspace, rounded half to even). The count
    need not be a multiple of the temporal patch size: the last tube is padded."""
    count = min(max(int(total_frames / video_fps * fps), min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()


def smart_resize_qwen3_video(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                             min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's frame size, as transformers' qwen3_vl video smart_resize: the pixel limits bound
    frames x height x width, sides too short for one factor are first scaled up. transformers
    refuses num_frames < temporal_factor; here such a clip is sized as its padded tube."""
    num_frames = max(num_frames, temporal_factor)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    aspect = max(height, width) / min(height, width)
    if aspect > QWEN2VL_MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {aspect:.1f} exceeds Qwen-VL's limit of {QWEN2VL_MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def capped_video_max_pixels(video_processor: str, num_frames: int, factor: int, temporal_factor: int,
                            min_pixels: int, max_pixels: int) -> int:
    """max_pixels for smart_resize under cap_pixels_per_frame, exactly as the named transformers
    video processor's resize computes it from the number of sampled frames."""
    floor = int(min_pixels * CAP_MIN_PIXELS_FACTOR)
    if video_processor == "Qwen3VLVideoProcessor":
        frame_cap = QWEN3VL_CAP_FRAME_TOKENS * factor * factor
        return max(min(frame_cap, max_pixels // num_frames), floor) * num_frames
    total_pixels = int(QWEN2VL_CAP_VIDEO_TOKENS * factor * factor * QWEN2VL_CAP_BUDGET_SHARE)
    return max(min(max_pixels, total_pixels * temporal_factor // num_frames), floor)


GIF_MAX_WIDTH = 480


VIDEO_TRIM_EVERY = 8  # temporal patches between release_free_memory() calls


VIDEO_CODEC = "mp4v"  # MPEG-4 Part 2: written by every OpenCV build; plays in VLC, mpv, QuickTime, Windows


@dataclass(frozen=True)
class VideoInfo:
    total_frames: int
    fps: float
    width: int
    height: int


def _cv2():
    # FFmpeg's and OpenCV's own messages about a damaged file would print beside our one line;
    # set either variable (FFmpeg levels: 16 errors, 24 warnings) to see them
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    try:
        import cv2
    except ImportError:
        raise ToolError("video input needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def _opencv_failure(path: Path, doing: str, exc: Exception) -> ToolError:
    """OpenCV's C++ exception (several lines) as one ToolError line."""
    return ToolError(f"{path}: cannot {doing} video (OpenCV: {' '.join(str(exc).split())})")


def probe_video(path: Path, name: str | None = None) -> VideoInfo:
    """Frame count, rate and size of a video file; ToolError when it cannot be read, naming the
    file, or `name` (a shard member read from a private copy: see video_source)."""
    shown = name or path
    check_input_file(path)
    cv2 = _cv2()
    try:
        capture = cv2.VideoCapture(str(path))
    except cv2.error as exc:
        raise _opencv_failure(shown, "open", exc) from None
    try:
        if not capture.isOpened():
            raise ToolError(f"{shown}: cannot open video (unreadable or unsupported format)")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if total <= 0 or width <= 0 or height <= 0:
            raise ToolError(f"{shown}: video has no frames")
        if not (math.isfinite(fps) and fps > 0):
            raise ToolError(f"{shown}: video has no valid frame rate")
        return VideoInfo(total, fps, width, height)
    except cv2.error as exc:
        raise _opencv_failure(shown, "read", exc) from None
    finally:
        capture.release()


def _plan_qwen2vl(info: VideoInfo, settings: Settings) -> tuple[list[int], tuple[int, int]]:
    """Qwen2VLVideoProcessor: fps sampling floored to whole tubes, per-frame pixel limits."""
    indices = sample_frame_indices(info.total_frames, info.fps, settings.fps, settings.temporal_patch_size,
                                   settings.min_frames, settings.max_frames)
    max_pixels = settings.video_max_pixels
    if settings.cap_pixels_per_frame:
        max_pixels = capped_video_max_pixels("Qwen2VLVideoProcessor", len(indices), settings.factor,
                                             settings.temporal_patch_size, settings.video_min_pixels, max_pixels)
    return indices, smart_resize(info.height, info.width, settings.factor, settings.video_min_pixels, max_pixels)


def _plan_qwen3vl(info: VideoInfo, settings: Settings) -> tuple[list[int], tuple[int, int]]:
    """Qwen3VLVideoProcessor: linspace sampling, pixel limits over all sampled frames."""
    indices = sample_frame_indices_qwen3(info.total_frames, info.fps, settings.fps, settings.min_frames,
                                         settings.max_frames)
    max_pixels = settings.video_max_pixels
    if settings.cap_pixels_per_frame:
        max_pixels = capped_video_max_pixels("Qwen3VLVideoProcessor", len(indices), settings.factor,
                                             settings.temporal_patch_size, settings.video_min_pixels, max_pixels)
    size = smart_resize_qwen3_video(len(indices), info.height, info.width, settings.temporal_patch_size,
                                    settings.factor, settings.video_min_pixels, max_pixels)
    return indices, size


VIDEO_PLANS = {"Qwen2VLVideoProcessor": _plan_qwen2vl, "Qwen3VLVideoProcessor": _plan_qwen3vl}


def video_plan(info: VideoInfo, settings: Settings, label: str) -> tuple[list[int], tuple[int, int]]:
    """(sampled frame indices, resized (H, W)) for a video, by the rules of the model's video processor."""
    try:
        return VIDEO_PLANS[VIDEO_PROCESSOR_OF[settings.model]](info, settings)
    except ValueError as exc:
        raise ToolError(f"{label}: {exc}") from None


# Video frames are resized as transformers' video processors do on the CPU (BaseVideoProcessor ->
# TorchvisionBackend.resize -> torchvision.transforms.v2.functional.resize_image, antialias=True):
# torch's interpolate on the (1, 3, H, W) uint8 tensor itself for bicubic and nearest, and for bilinear
# where torchvision trusts torch's uint8 kernel (AVX2/AVX512 or ARM CPUs); elsewhere on float32, then
# rounded and cast to uint8. PIL's codes map to modes as transformers' pil_torch_interpolation_mapping.
VIDEO_RESIZE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


NATIVE_UINT8_BILINEAR_CPUS = ("AVX2", "AVX512")  # torchvision _do_native_uint8_resize_on_cpu


NATIVE_UINT8_BILINEAR_MACHINES = ("aarch64", "arm64")


def resize_frame(rgb: np.ndarray, size: tuple[int, int], resample: int = BICUBIC) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 at size (h, w), pixel for pixel as transformers' video
    processors resize frames on the CPU (torchvision's resize, without importing torchvision)."""
    if rgb.shape[:2] == tuple(size):
        return rgb  # torchvision returns the frame untouched
    mode = VIDEO_RESIZE_MODES.get(resample)
    if mode is None:
        supported = ", ".join(f"{k} ({RESAMPLE_NAMES[k]})" for k in VIDEO_RESIZE_MODES)
        raise ToolError(f"resample {resample} ({RESAMPLE_NAMES.get(resample, 'unknown')}) is not supported for "
                        f"video frames; supported: {supported}")
    torch = require_torch("video")  # exact frame resizing; an image-only run never imports torch
    F = torch.nn.functional
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W)
    native = mode != "bilinear" or (torch.backends.cpu.get_cpu_capability() in NATIVE_UINT8_BILINEAR_CPUS
                                    or platform.machine() in NATIVE_UINT8_BILINEAR_MACHINES)
    smooth = mode != "nearest-exact"  # torchvision: antialias and align_corners=False for these modes only
    y = F.interpolate(x if native else x.float(), size=tuple(size), mode=mode,
                      align_corners=False if smooth else None, antialias=smooth)
    if not native:
        y = y.round_().to(torch.uint8)
    return y[0].permute(1, 2, 0).contiguous().numpy()


def iter_sampled_frames(path: Path, indices: Sequence[int], size: tuple[int, int],
                        resample: int = BICUBIC, name: str | None = None) -> Iterator[np.ndarray]:
    """Stream the sampled frames as (H, W, 3) uint8 RGB at `size` (see resize_frame), one at a time;
    errors name the file, or `name` (see probe_video)."""
    shown = name or path
    cv2 = _cv2()
    try:
        capture = cv2.VideoCapture(str(path))
    except cv2.error as exc:
        raise _opencv_failure(shown, "open", exc) from None
    wanted = iter(indices)
    target = next(wanted, None)
    position = 0
    try:
        while target is not None:
            if not capture.grab():
                raise ToolError(f"{shown}: video ended at frame {position} before sampled frame {target} "
                                "(truncated or corrupt)")
            if position == target:
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    raise ToolError(f"{shown}: cannot decode frame {position} (truncated or corrupt)")
                resized = resize_frame(frame[..., ::-1], size, resample)
                while target == position:  # an index sampled twice is yielded twice
                    yield resized
                    target = next(wanted, None)
            position += 1
    except cv2.error as exc:  # raised by grab or retrieve (a consumer's exceptions never enter at the yield)
        raise _opencv_failure(shown, "read", exc) from None
    finally:
        capture.release()


def iter_tubes(frames: Iterable[np.ndarray], temporal_patch_size: int) -> Iterator[np.ndarray]:
    """Group frames into (T, H, W, 3) temporal patches; a short last group repeats its last frame."""
    group: list[np.ndarray] = []
    for frame in frames:
        group.append(frame)
        if len(group) == temporal_patch_size:
            yield np.stack(group)
            group = []
    if group:
        group += [group[-1]] * (temporal_patch_size - len(group))
        yield np.stack(group)


@contextlib.contextmanager
def video_source(job: Job) -> Iterator[tuple[Path, str]]:
    """(the file to read, the name errors give) of a job's video: the file itself, or for a member
    of a shard (OpenCV reads files, not bytes) a private copy in a temporary folder, removed when
    the block ends, however it ends."""
    if job.member is None:
        yield job.path, str(job.path)
        return
    from apt_vis.datasets import read_member

    data = read_member(job)
    with tempfile.TemporaryDirectory(prefix="apt-video-") as folder:
        copy = Path(folder) / f"video{Path(job.label).suffix.lower()}"
        try:
            copy.write_bytes(data)
        except OSError as exc:
            raise ToolError(f"{job.path}: cannot copy the video out of its shard into {folder} "
                            f"({exc.strerror or exc})") from None
        del data
        yield copy, str(job.path)


def video_tube_maps(job: Job, settings: Settings, scorer: Scorer, progress: Progress | None = None,
                    source: tuple[Path, str] | None = None) -> list[dict[int, np.ndarray]]:
    """Importance maps of every temporal patch of a video, streaming its frames (source: the
    file to read and its name, from video_source; opened here when not given)."""
    if source is None:
        with video_source(job) as source:
            return video_tube_maps(job, settings, scorer, progress, source)
    info = probe_video(*source)
    indices, size = video_plan(info, settings, job.label)
    maps = []
    pending: list[np.ndarray] = []
    frames = iter_sampled_frames(source[0], indices, size, settings.resample, source[1])
    for tube in iter_tubes(frames, settings.temporal_patch_size):
        pending.append(tube)
        if len(pending) >= scorer.batch:
            maps += scorer.maps(pending, settings)
            pending = []
            if len(maps) % VIDEO_TRIM_EVERY < scorer.batch:
                release_free_memory()
        if progress is not None:
            progress.update(settings.temporal_patch_size)
    if pending:
        maps += scorer.maps(pending, settings)
    return maps


class _VideoWriter:
    """An mp4 file written frame by frame with OpenCV."""

    def __init__(self, path: Path, fps: float, size_wh: tuple[int, int]):
        cv2 = _cv2()
        self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*VIDEO_CODEC), fps, size_wh)
        if not self.writer.isOpened():
            raise ToolError(f"{path}: OpenCV cannot write {VIDEO_CODEC} video here")

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(np.ascontiguousarray(rgb[..., ::-1]))

    def close(self) -> None:
        self.writer.release()


def _map_frame(values: np.ndarray, patch_size: int, size: tuple[int, int], vmin: float, vmax: float,
               caption: str) -> np.ndarray:
    """One animation frame: the cell colours at the frame's size with a colour key below."""
    h, w = size
    cells = np.repeat(np.repeat(colorize(values, vmin, vmax), patch_size, axis=0), patch_size, axis=1)[:h, :w]
    frame = Image.new("RGB", (w, h + 28))
    frame.paste(Image.fromarray(np.ascontiguousarray(cells)), (0, 0))
    frame.paste(_gradient_strip(w, vmin, vmax, caption), (0, h))
    return np.asarray(frame)


def video_stats(job: Job, info: VideoInfo, indices: Sequence[int], size: tuple[int, int], settings: Settings,
                tube_masks: Sequence[Mapping[int, np.ndarray]], device: str, timings: Mapping[str, float]) -> dict:
    """stats.json of a video: the image keys, counted over all temporal patches, plus per-tube counts."""
    h, w = size
    t = settings.temporal_patch_size
    grid_t = len(tube_masks)
    per_tube = []
    totals = {ps: 0 for ps in settings.patch_sizes}
    for k, masks in enumerate(tube_masks):
        counts = patch_counts(masks)
        for ps, n in counts.items():
            totals[ps] += n
        frames = list(indices[k * t:(k + 1) * t])
        per_tube.append({"temporal_patch": k, "frames": frames, "patches_per_scale": {str(ps): n for ps, n in counts.items()},
                         "apt_patches": sum(counts.values())})
    uniform = grid_t * (h // settings.patch_size) * (w // settings.patch_size)
    stats = stats_record(job.label, "video", (info.width, info.height), size, settings, totals, uniform,
                         device, timings)
    # padded_frames: copies of the last sampled frame that fill its tube (as transformers' patchify pads)
    stats.update(frames_total=info.total_frames, video_fps=info.fps, frames_sampled=len(indices),
                 frame_indices=list(indices), padded_frames=grid_t * t - len(indices), temporal_patches=grid_t,
                 per_temporal_patch=per_tube)
    return stats


def run_video(job: Job, settings: Settings, options: RenderOptions, scorer: Scorer = CPU,
              tube_maps: list | None = None, show_progress: bool = False) -> Outcome:
    """A video from path to files: pass 1 scores each temporal patch while streaming the
    sampled frames (unless tube_maps are known); pass 2 streams them again to draw the
    patches. Memory stays bounded by one temporal patch (plus the small GIF frames)."""
    with video_source(job) as source:
        return _run_video(job, source, settings, options, scorer, tube_maps, show_progress)


def _run_video(job: Job, source: tuple[Path, str], settings: Settings, options: RenderOptions, scorer: Scorer,
               tube_maps: list | None, show_progress: bool) -> Outcome:
    """run_video once the video is at hand as a file (source: its path and name)."""
    watch = Stopwatch()
    info = probe_video(*source)
    indices, size = video_plan(info, settings, job.label)
    logger.info(f"{job.label}: {info.total_frames} frames at {info.fps:g} fps, {info.width}x{info.height}; "
                f"sampling {len(indices)} frames at {size[1]}x{size[0]}")
    passes = (0 if options.stats_only else 1) + (tube_maps is None)
    progress = Progress(len(indices) * passes, show_progress and passes > 0, unit="frame")
    try:
        if tube_maps is None:
            tube_maps = video_tube_maps(job, settings, scorer, progress, source)
        watch.lap("importance")
        tube_masks = [compute_masks(m, settings.thresholds) for m in tube_maps]
        files: dict[str, bytes] = {}
        arrays = {f"scale_{ps}": np.stack([m[ps] for m in tube_maps]).astype(np.float32) for ps in settings.patch_sizes}
        arrays.update({f"mask_{ps}": np.stack([m[ps] for m in tube_masks]) for ps in settings.patch_sizes})
        arrays["temporal_patches"] = np.array(len(tube_maps))
        files["importance_maps.npz"] = encode_npz(arrays)
        if options.sweep:
            apt = sum(sum(patch_counts(m).values()) for m in tube_masks)
            files.update(sweep_files(tube_maps, settings, apt, f"Threshold sweep: {one_line(Path(job.label).name)}",
                                     plot=not options.stats_only))
        with staged_output(job.out_dir) as staging:
            if not options.stats_only:
                _write_video_pictures(job, source, staging, indices, size, settings, options, tube_maps,
                                      tube_masks, info, progress)
                watch.lap("render")
            stats = video_stats(job, info, indices, size, settings, tube_masks, scorer.device,
                                {**watch.ms, "total": sum(watch.ms.values())})
            files["stats.json"] = encode_json(stats)
            for name, data in files.items():
                (staging / name).write_bytes(data)
        return Outcome(stats, tube_maps)
    finally:
        progress.close()


def _write_video_pictures(job, source, staging, indices, size, settings, options, tube_maps, tube_masks, info,
                          progress) -> None:
    """patches_visualization.mp4 / .gif and one importance-map animation per scale."""
    h, w = size
    duration_s = info.total_frames / info.fps
    out_fps = max(0.1, len(indices) / duration_s) if duration_s > 0 else settings.fps
    t = settings.temporal_patch_size
    colors = scale_palette(settings.num_scales) if options.color_by_scale else None
    label = SCORERS[settings.method][1]
    ranges = {ps: color_range(np.stack([m[ps] for m in tube_maps])) for ps in settings.patch_sizes}
    overlay_writer = _VideoWriter(staging / "patches_visualization.mp4", out_fps, (w, h))
    map_writers = {ps: _VideoWriter(staging / f"importance_map_scale_{ps}.mp4", out_fps, (w, h + 28))
                   for ps in settings.patch_sizes}
    gif_frames: list[Image.Image] = []
    gif_scale = min(1.0, GIF_MAX_WIDTH / w)
    try:
        for k, frame in enumerate(iter_sampled_frames(source[0], indices, size, settings.resample, source[1])):
            tube = k // t
            overlay = draw_patch_borders(frame, tube_masks[tube], options.line_color, options.line_thickness, colors)
            overlay_writer.write(overlay)
            gif = Image.fromarray(overlay)
            if k == 0:
                (staging / "patches_thumbnail.jpg").write_bytes(
                    encode_jpeg(_fit(gif, THUMBNAIL_WIDTH, 4 * THUMBNAIL_WIDTH)))
            if gif_scale < 1.0:
                gif = gif.resize((round(w * gif_scale), round(h * gif_scale)), Image.Resampling.BILINEAR)
            gif_frames.append(gif.quantize(colors=255, method=Image.Quantize.MEDIANCUT))
            for ps, writer in map_writers.items():
                writer.write(_map_frame(tube_maps[tube][ps], ps, size, *ranges[ps], f"{ps} px {label}"))
            progress.update()
    finally:
        overlay_writer.close()
        for writer in map_writers.values():
            writer.close()
    gif_frames[0].save(staging / "patches_visualization.gif", save_all=True, append_images=gif_frames[1:],
                       duration=round(1000 / out_fps), loop=0)
