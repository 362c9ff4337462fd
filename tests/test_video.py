"""Video: Qwen2-VL's frame sampling, temporal patches, the outputs, errors, batches, bounded memory."""

import ast
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from PIL import Image

import apt_vis.video as apt_video
import visualize_patches as vp
from conftest import PEARL, TOOL, run_cli
from test_entropy import slow_entropy_map


def transformers_sample_frames():
    """transformers' own Qwen2VLVideoProcessor.sample_frames, run from its source: importing the
    video processor module needs torchvision, which this project does not install."""
    import torch
    import transformers.models.qwen2_vl as package

    source = (Path(package.__file__).parent / "video_processing_qwen2_vl.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames")
    fn.decorator_list, fn.returns = [], None
    for arg in fn.args.args + fn.args.kwonlyargs:
        arg.annotation = None  # the annotations name types from modules not imported here
    namespace = {"math": math, "torch": torch}
    exec(compile(ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[])), "sample_frames", "exec"),
         namespace)
    return namespace["sample_frames"]


SAMPLE_FRAMES = transformers_sample_frames()


def transformers_source_function(module: str, name: str, cls: str | None = None, **namespace):
    """A function (or a method, given its class) from transformers' source, compiled without importing
    its module (the video processor modules need torchvision)."""
    import transformers.models as models

    package, file = module.split(".")
    tree = ast.parse((Path(models.__file__).parent / package / f"{file}.py").read_text())
    body = tree.body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list, fn.returns = [], None
    for arg in fn.args.args + fn.args.kwonlyargs:
        arg.annotation = None
    scope = {"math": math, "np": np, **namespace}
    exec(compile(ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[])), name, "exec"), scope)
    return scope[name]


QWEN3_SAMPLE_FRAMES = transformers_source_function("qwen3_vl.video_processing_qwen3_vl", "sample_frames",
                                                   "Qwen3VLVideoProcessor", logger=None)
QWEN3_SMART_RESIZE = transformers_source_function("qwen3_vl.video_processing_qwen3_vl", "smart_resize")


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 3000), video_fps=st.floats(1, 120), fps=st.floats(0.1, 10),
       min_frames=st.integers(1, 16), extra=st.integers(0, 800))
def test_qwen3_sampling_matches_transformers(total, video_fps, fps, min_frames, extra):
    from transformers.video_utils import VideoMetadata

    max_frames = min_frames + extra
    processor = types.SimpleNamespace(fps=fps, min_frames=min_frames, max_frames=max_frames)
    theirs = QWEN3_SAMPLE_FRAMES(processor, VideoMetadata(total_num_frames=total, fps=video_fps)).tolist()
    assert apt_video.sample_frame_indices_qwen3(total, video_fps, fps, min_frames, max_frames) == theirs


@settings(max_examples=400, deadline=None)
@given(frames=st.integers(2, 800), h=st.integers(1, 3000), w=st.integers(1, 3000),
       low=st.integers(1, 2**22), span=st.integers(0, 2**25))
def test_qwen3_video_size_matches_transformers(frames, h, w, low, span):
    args = dict(temporal_factor=2, factor=32, min_pixels=low, max_pixels=low + span)
    try:
        theirs = QWEN3_SMART_RESIZE(frames, h, w, **args)
    except ValueError:  # aspect ratio over 200
        with pytest.raises(ValueError):
            apt_video.smart_resize_qwen3_video(frames, h, w, 2, 32, low, low + span)
        return
    assert apt_video.smart_resize_qwen3_video(frames, h, w, 2, 32, low, low + span) == theirs


@settings(max_examples=400, deadline=None)
@given(total=st.integers(1, 3000), video_fps=st.floats(1, 120), fps=st.floats(0.1, 10), t=st.integers(1, 3),
       min_frames=st.integers(1, 16), extra=st.integers(0, 800))
@example(total=228, video_fps=65.0, fps=0.5, t=3, min_frames=2, extra=23)  # float steps once gave 26 of 25 frames
def test_sampling_matches_transformers(total, video_fps, fps, t, min_frames, extra):
    from transformers.video_utils import VideoMetadata

    max_frames = min_frames + extra
    ours = apt_video.sample_frame_indices(total, video_fps, fps, t, min_frames, max_frames)
    processor = types.SimpleNamespace(num_frames=None, fps=fps, temporal_patch_size=t, min_frames=min_frames,
                                      max_frames=max_frames)
    try:
        theirs = SAMPLE_FRAMES(processor, VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps).tolist()
    except ZeroDivisionError:  # no whole temporal patch fits: transformers fails, we take what there is
        assert len(ours) == min(total, max_frames) and ours == sorted(set(ours))
        return
    assert ours == theirs


def write_pan(path: Path, frames: int, fps: float = 10.0, size=(320, 240)) -> Path:
    """A pan across the real photo, written with OpenCV."""
    image = np.asarray(Image.open(PEARL).convert("RGB"))
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for k in range(frames):
        x = int(k * (image.shape[1] - w) / max(1, frames - 1))
        y = int(k * (image.shape[0] - h) / max(1, frames - 1))
        writer.write(np.ascontiguousarray(image[y:y + h, x:x + w, ::-1]))
    writer.release()
    return path


@pytest.fixture(scope="module")
def pan_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    video = write_pan(folder / "pan.mp4", 40)
    out = folder / "out"
    proc = run_cli(video, "-o", out)
    assert proc.returncode == 0, proc.stderr
    return video, out, proc


def decode(path: Path, indices, size):
    capture = cv2.VideoCapture(str(path))
    frames, k = {}, 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if k in indices:
            # frames resized as transformers' video processor does (tested in test_video_resize.py)
            frames[k] = apt_video.resize_frame(frame[..., ::-1], size)
        k += 1
    return frames


def test_stats_follow_the_definitions(pan_run):
    video, out, _ = pan_run
    stats = json.loads((out / "stats.json").read_text())
    # 40 frames at 10 fps = 4 s; 2 fps -> 8 frames, a multiple of temporal_patch_size 2
    assert stats["kind"] == "video" and stats["frames_total"] == 40 and stats["frames_sampled"] == 8
    assert stats["frame_indices"] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert stats["temporal_patches"] == 4
    h, w = vp.smart_resize(240, 320, 28, 128 * 28 * 28, 28 * 28 * 768)
    assert stats["resized_size"] == [w, h] == [392, 280]
    cells = (h // 14) * (w // 14)
    assert stats["uniform_patches"] == 4 * cells and stats["qwen2vl_tokens"] == 4 * cells // 4
    totals = {ps: 0 for ps in ("14", "28", "56")}
    for k, tube in enumerate(stats["per_temporal_patch"]):
        assert tube["frames"] == stats["frame_indices"][2 * k:2 * k + 2]
        n = tube["patches_per_scale"]
        assert n["14"] + 4 * n["28"] + 16 * n["56"] == cells  # each tube tiles the frame
        assert tube["apt_patches"] == sum(n.values())
        for ps in totals:
            totals[ps] += n[ps]
    assert stats["patches_per_scale"] == totals and stats["apt_patches"] == sum(totals.values())


def test_tube_entropy_is_one_histogram_over_its_frames(pan_run):
    video, out, _ = pan_run
    stats = json.loads((out / "stats.json").read_text())
    w, h = stats["resized_size"]
    frames = decode(video, set(stats["frame_indices"]), (h, w))
    data = np.load(out / "importance_maps.npz")
    assert data["scale_28"].shape == (4, *vp.grid_shape(h, w, 28))
    for k in (0, 3):
        tube = np.stack([frames[i] for i in stats["frame_indices"][2 * k:2 * k + 2]])
        crop = tube[:, 56:168, 112:224]  # 4 x 4 cells of 28 px, 2 x 2 of 56 px
        ref28 = slow_entropy_map(crop, 28)
        np.testing.assert_allclose(data["scale_28"][k, 2:6, 4:8], ref28, rtol=0, atol=1e-6)
        ref56 = slow_entropy_map(crop, 56)
        np.testing.assert_allclose(data["scale_56"][k, 1:3, 2:4], ref56, rtol=0, atol=1e-6)
        single = slow_entropy_map(crop[:1], 28)
        assert not np.allclose(single, ref28)  # the second frame counts


def test_video_outputs_play(pan_run):
    _, out, proc = pan_run
    stats = json.loads((out / "stats.json").read_text())
    w, h = stats["resized_size"]
    names = ["patches_visualization.mp4"] + [f"importance_map_scale_{ps}.mp4" for ps in (14, 28, 56)]
    for name in names:
        capture = cv2.VideoCapture(str(out / name))
        assert capture.isOpened(), name
        count = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            count += 1
            assert frame.shape[1] == w and frame.shape[0] in (h, h + 28)
        assert count == 8, name
    with Image.open(out / "patches_visualization.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (w, h)
        gif.seek(0)
        first = np.asarray(gif.convert("RGB")).astype(int)
    green = (first[..., 1] > 200) & (first[..., 0] < 80) & (first[..., 2] < 80)
    assert green[:, :2].mean() > 0.9  # the patch frame is drawn
    data = np.load(out / "importance_maps.npz")
    assert int(data["temporal_patches"]) == 4 and data["mask_14"].shape[0] == 4
    assert "frame/s" in proc.stderr  # progress over frames


def test_short_video_pads_the_last_tube(tmp_path):
    video = write_pan(tmp_path / "one.mp4", 1)
    out = tmp_path / "o"
    proc = run_cli(video, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["frames_sampled"] == 1 and stats["temporal_patches"] == 1
    assert stats["per_temporal_patch"][0]["frames"] == [0]
    assert stats["padded_frames"] == 1  # the one frame, repeated to fill the two-frame tube


def bad_video(tmp_path, kind):
    if kind == "text":
        path = tmp_path / "notes.mp4"
        path.write_text("not a video\n")
    elif kind == "truncated":
        good = write_pan(tmp_path / "good.mp4", 60)
        path = tmp_path / "cut.mp4"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "zero frames":
        path = tmp_path / "empty.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
        writer.release()
    elif kind == "empty file":
        path = tmp_path / "zero.mp4"
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind", ["text", "truncated", "zero frames", "empty file"])
def test_bad_videos(tmp_path, kind):
    path = bad_video(tmp_path, kind)
    out = tmp_path / "out"
    proc = run_cli(path, "-o", out)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and path.name in errors[0] and "Traceback" not in proc.stderr
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True


def test_video_in_a_batch_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_pan(folder / "clip.mp4", 20)
    Image.open(PEARL).convert("RGB").resize((200, 240)).save(folder / "still.jpg")
    out = tmp_path / "out"
    proc = run_cli(folder, "-o", out, "-q", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    import csv
    with open(out / "summary.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert rows["clip.mp4"]["kind"] == "video" and rows["clip.mp4"]["status"] == "ok"
    assert int(rows["clip.mp4"]["frames_sampled"]) == 4 and int(rows["clip.mp4"]["temporal_patches"]) == 2
    assert rows["still.jpg"]["kind"] == "image"
    assert (out / "clip.mp4" / "patches_visualization.gif").exists()
    assert (out / "clip.mp4" / "patches_thumbnail.jpg").exists()


def peak_rss_mb(args) -> float:
    """Peak resident memory of one run of the tool, in MB."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, str(TOOL), *map(str, args)],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout)


def test_memory_does_not_grow_with_video_length(tmp_path):
    short = write_pan(tmp_path / "short.mp4", 20, fps=30)
    long = write_pan(tmp_path / "long.mp4", 600, fps=30)
    # sample every frame: 600 resized frames would take 600 x 392 x 280 x 3 bytes = 198 MB if held
    flags = ["--fps", "30", "--stats-only", "-q"]
    small = peak_rss_mb([short, "-o", tmp_path / "s", *flags])
    big = peak_rss_mb([long, "-o", tmp_path / "l", *flags])
    stats = json.loads((tmp_path / "l" / "stats.json").read_text())
    assert stats["frames_sampled"] == 600
    assert big - small < 40, (small, big)


def one_video_breaks(folder: Path) -> Path:
    """Two small videos and a photo in folder; the caller makes bad.mp4 fail."""
    folder.mkdir()
    write_pan(folder / "bad.mp4", 8, size=(64, 48))
    write_pan(folder / "good.mp4", 8, size=(64, 48))
    Image.open(PEARL).convert("RGB").resize((80, 96)).save(folder / "still.jpg")
    return folder


@pytest.mark.parametrize("extra", [[], ["--target-ratio", "0.5"]], ids=["thresholds", "target-ratio"])
def test_an_unexpected_error_in_one_video_is_that_inputs_failure(tmp_path, monkeypatch, extra):
    """Batch mode records any exception from a video as that video's failed row, as it does
    for images, in both passes (pass 1 runs only with --target-ratio)."""
    folder = one_video_breaks(tmp_path / "in")
    probe = apt_video.probe_video

    def faulty_probe(path, name=None):
        if path.name == "bad.mp4":
            raise RuntimeError("injected fault")
        return probe(path, name)

    monkeypatch.setattr(apt_video, "probe_video", faulty_probe)
    out = tmp_path / "out"
    assert vp.main([str(folder), "-o", str(out), "-q", "--workers", "1", "--stats-only", *extra]) == 1
    import csv
    with open(out / "summary.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert rows["bad.mp4"]["status"] == "failed" and rows["bad.mp4"]["error"] == "RuntimeError: injected fault"
    assert rows["good.mp4"]["status"] == "ok" and rows["still.jpg"]["status"] == "ok"
    assert not (out / "bad.mp4").exists()


@pytest.mark.parametrize("where", ["open", "read"])
def test_opencv_errors_are_one_line_tool_errors(tmp_path, monkeypatch, capsys, where):
    """cv2.error (OpenCV's C++ exceptions, multi-line) from opening or reading a video ends as
    one ToolError line naming the file, exit 1, in the single-file mode too."""
    video = write_pan(tmp_path / "clip.mp4", 8, size=(64, 48))
    real = cv2.VideoCapture

    class Faulty:
        def __init__(self, name):
            if where == "open":
                raise cv2.error("OpenCV(5.0.0) cap.cpp:1: error: (-5:Bad argument) injected\n in function 'open'\n")
            self.capture = real(name)

        def __getattr__(self, name):
            return getattr(self.capture, name)

        def grab(self):
            raise cv2.error("OpenCV(5.0.0) cap.cpp:2: error: (-2:Unspecified error) injected\n in function 'grab'\n")

    monkeypatch.setattr(cv2, "VideoCapture", Faulty)
    assert vp.cli([str(video), "-o", str(tmp_path / "out"), "-q", "--stats-only"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR") and str(video) in errors[0], errors
    assert "injected" in errors[0]


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_bad_video_is_one_line_without_decoder_chatter(tmp_path, kind):
    """FFmpeg's and OpenCV's own messages ("moov atom not found", "[ERROR:0@...] ...") would
    print beside ours: the failure is our one line only. Found by tests/test_fuzz.py."""
    path = bad_video(tmp_path, kind)
    proc = run_cli(path, "-o", tmp_path / "out")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR") and path.name in lines[0], proc.stderr
