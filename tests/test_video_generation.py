import os
import subprocess
import sys
from argparse import Namespace

import cv2
import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from skimage import data

import attention_maps
import utils
import video_generation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, WIDTH, HEIGHT, FPS = 8, 64, 48, 5.0


def pan_zoom_frames(count: int = FRAMES, width: int = WIDTH, height: int = HEIGHT):
    """RGB frames of scikit-image's astronaut photo, the view panning right and zooming in."""
    photo = data.astronaut()
    frames = []
    for i in range(count):
        top, left = 20 + 10 * i, 40 + 12 * i
        crop = photo[top:top + 300 - 15 * i, left:left + 400 - 20 * i]
        frames.append(cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA))
    return frames


def write_clip(path: str, frames, fps: float = FPS) -> None:
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                             (frames[0].shape[1], frames[0].shape[0]))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def read_back(video_path: str):
    """(number of decoded frames, fps, (width, height)) of a video file."""
    capture = cv2.VideoCapture(video_path)
    fps = capture.get(cv2.CAP_PROP_FPS)
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count, fps, size


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "video_generation.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def parse(*args: str) -> Namespace:
    return video_generation.get_args_parser().parse_args(list(args))


@pytest.mark.slow
def test_video_file_gives_frames_attention_and_a_video_then_video_only_reassembles(tmp_path):
    clip = str(tmp_path / "clip.mp4")
    write_clip(clip, pan_zoom_frames())
    out = tmp_path / "out"
    result = run_script("--input_path", clip, "--output_path", str(out), "--arch", "vit_tiny",
                        "--patch_size", "16", "--pretrained_weights", "random",
                        "--batch_size", "3")
    assert result.returncode == 0, result.stderr
    names = [f"frame-{i:04d}.jpg" for i in range(FRAMES)]
    assert sorted(os.listdir(out / "frames")) == names
    assert sorted(os.listdir(out / "attention")) == ["attn-" + name for name in names]
    for name in names:
        assert Image.open(out / "frames" / name).size == (WIDTH, HEIGHT)
        assert Image.open(out / "attention" / ("attn-" + name)).size == (WIDTH, HEIGHT)
    assert "attention: 100%" in result.stderr  # the progress bar
    # --fps defaults to 30 but a video input sets it from the file.
    assert read_back(str(out / "video.mp4")) == (FRAMES, FPS, (WIDTH, HEIGHT))

    result = run_script("--video_only", "--input_path", str(out / "attention"),
                        "--output_path", str(tmp_path / "again"), "--video_format", "avi",
                        "--fps", "12")
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path / "again") == ["video.avi"]
    assert read_back(str(tmp_path / "again" / "video.avi")) == (FRAMES, 12.0, (WIDTH, HEIGHT))


def write_png_frames(folder, sizes):
    os.makedirs(folder, exist_ok=True)
    frames = pan_zoom_frames(len(sizes))
    for i, (frame, size) in enumerate(zip(frames, sizes)):
        Image.fromarray(frame).resize(size).save(os.path.join(folder, f"{i:03d}.png"))
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def test_frames_are_batched_in_order_by_size_and_batch_size(tmp_path):
    paths = write_png_frames(tmp_path, [(64, 48)] * 3 + [(48, 64), (64, 48)])
    batches = list(video_generation.frame_batches(paths, 16, None, batch_size=2))
    assert [batch_paths for batch_paths, _ in batches] == \
        [paths[0:2], paths[2:3], paths[3:4], paths[4:5]]
    assert [tuple(images.shape) for _, images in batches] == \
        [(2, 3, 48, 64), (1, 3, 48, 64), (1, 3, 64, 48), (1, 3, 48, 64)]


def test_attention_images_are_the_inferno_mean_over_heads(tmp_path):
    paths = write_png_frames(tmp_path / "frames", [(64, 48)] * 3)
    torch.manual_seed(0)
    model, _ = utils.build_frozen_backbone("vit_tiny", 16, "random", None, torch.device("cpu"),
                                           visualisation=True)
    args = parse("--input_path", ".", "--patch_size", "16", "--batch_size", "2")
    written = video_generation.write_attention_images(model, paths, str(tmp_path / "attn"), args)
    assert [os.path.basename(path) for path in written] == ["attn-000.jpg", "attn-001.jpg",
                                                            "attn-002.jpg"]
    for frame_path, attention_path in zip(paths, written):
        image = attention_maps.image_to_tensor(attention_maps.open_rgb(frame_path), 16)
        mean = attention_maps.cls_attention(model, image[None], 16)[0].mean(dim=0).numpy()
        scaled = (mean - mean.min()) / (mean.max() - mean.min())
        expected = colormaps["inferno"](scaled)[..., :3].repeat(16, 0).repeat(16, 1)
        saved = np.asarray(Image.open(attention_path).convert("RGB"), dtype=np.float64) / 255
        assert saved.shape == expected.shape == (48, 64, 3)
        assert np.abs(saved - expected).mean() < 0.02  # JPEG compression only


def test_png_folder_with_resize_streams_to_a_video(tmp_path):
    write_png_frames(tmp_path / "frames", [(64, 48)] * 6)
    video_generation.main(parse("--input_path", str(tmp_path / "frames"), "--output_path",
                                str(tmp_path / "out"), "--arch", "vit_tiny", "--patch_size",
                                "16", "--pretrained_weights", "random", "--resize", "40"))
    # Shorter side 48 -> 40 (64 -> 53), then cropped to multiples of 16: 32 high, 48 wide.
    attention = sorted(os.listdir(tmp_path / "out" / "attention"))
    assert attention == [f"attn-{i:03d}.jpg" for i in range(6)]
    assert Image.open(tmp_path / "out" / "attention" / attention[0]).size == (48, 32)
    assert read_back(str(tmp_path / "out" / "video.mp4")) == (6, 30.0, (48, 32))
    assert not os.path.exists(tmp_path / "out" / "frames")


def test_missing_or_unreadable_inputs_are_clear_errors(tmp_path):
    not_a_video = tmp_path / "clip.mp4"
    not_a_video.write_text("not a video")
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    cases = [
        (["--input_path", str(tmp_path / "missing.mp4")], "does not exist"),
        (["--input_path", str(not_a_video)], "cannot open"),
        (["--input_path", str(tmp_path / "empty")], "no \\* file with extension"),
        (["--input_path", str(tmp_path / "empty"), "--video_only"], "no attn-\\* file"),
        (["--input_path", str(not_a_video), "--video_only"], "needs --input_path to be a folder"),
    ]
    for flags, message in cases:
        with pytest.raises(utils.InputError, match=message):
            video_generation.main(parse(*flags, "--output_path", out, "--arch", "vit_tiny",
                                        "--pretrained_weights", "random"))


def test_reference_flags_and_defaults():
    args = parse("--input_path", "clip.mp4")
    assert (args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key) == \
        ("vit_small", 8, "", "teacher")
    assert (args.output_path, args.threshold, args.resize, args.video_only, args.fps,
            args.video_format) == ("./", 0.6, None, False, 30.0, "mp4")
