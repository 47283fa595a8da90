"""A video of a DINO ViT's [CLS] self-attention (mean over heads), frame by frame.

Input: a video file (its frames are extracted to <output_path>/frames/), a folder of .jpg/.png
frames, or with --video_only a folder of attn-*.jpg images to assemble. Attention images go to
<output_path>/attention/, the video to <output_path>/video.<fmt>. Frames are streamed: only one
batch is held in memory.
"""
import argparse
import glob
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import cv2
import matplotlib.image
import torch
from tqdm import tqdm

import attention_maps
import utils

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOURCC = {"mp4": "mp4v", "avi": "XVID"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Generation self-attention video")
    utils.add_backbone_args(parser, utils.VIT_ARCHS, default_patch_size=8)
    parser.add_argument("--input_path", required=True, type=str,
                        help="A video file, a folder of .jpg/.png frames, or with --video_only a "
                             "folder of attn-*.jpg images.")
    parser.add_argument("--output_path", default="./", type=str,
                        help="Output folder: frames/, attention/ and video.<format> go there.")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="Accepted for compatibility; like the reference, no output uses it.")
    parser.add_argument("--resize", default=None, type=int, nargs="+",
                        help="Resize frames: one value sets the shorter side, two give height "
                             "width. Attention memory grows with the square of the patch count.")
    parser.add_argument("--video_only", action="store_true",
                        help="Only assemble a video from the attn-*.jpg images in --input_path "
                             "(no model is loaded).")
    parser.add_argument("--fps", default=30.0, type=float,
                        help="FPS of the output video; taken from the input when it is a video.")
    parser.add_argument("--video_format", default="mp4", type=str, choices=["mp4", "avi"],
                        help="Format of the output video.")
    parser.add_argument("--batch_size", default=4, type=int,
                        help="Frames per forward pass (lower it for large frames).")
    return parser


def extract_frames(video_path: str, frames_dir: str) -> Tuple[List[str], float]:
    """Write each frame of a video to frames_dir/frame-%04d.jpg; return the paths and the fps."""
    capture = cv2.VideoCapture(video_path)
    if not capture.isOpened():
        raise utils.InputError(f"cannot open {video_path!r} as a video")
    fps = capture.get(cv2.CAP_PROP_FPS)
    os.makedirs(frames_dir, exist_ok=True)
    paths = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        path = os.path.join(frames_dir, f"frame-{len(paths):04d}.jpg")
        cv2.imwrite(path, frame)
        paths.append(path)
    capture.release()
    if not paths:
        raise utils.InputError(f"no frame could be read from {video_path!r}")
    print(f"Extracted {len(paths)} frames to {frames_dir} (video at {fps:g} fps).")
    return paths, fps


def list_images(folder: str, pattern: str, extensions: Sequence[str]) -> List[str]:
    """Sorted files of `folder` matching a glob pattern and extensions; an error if none."""
    paths = sorted(path for path in glob.glob(os.path.join(folder, pattern))
                   if path.lower().endswith(tuple(extensions)) and os.path.isfile(path))
    if not paths:
        raise utils.InputError(f"no {pattern} file with extension {'/'.join(extensions)} "
                               f"in {folder!r}")
    return paths


def frame_batches(frame_paths: Sequence[str], patch_size: int, resize: Optional[Sequence[int]],
                  batch_size: int) -> Iterator[Tuple[List[str], torch.Tensor]]:
    """Consecutive frames, preprocessed, as batches of at most batch_size same-sized images."""
    paths, images = [], []
    for path in frame_paths:
        image = attention_maps.image_to_tensor(attention_maps.open_rgb(path), patch_size, resize)
        if images and (len(images) == batch_size or image.shape != images[0].shape):
            yield paths, torch.stack(images)
            paths, images = [], []
        paths.append(path)
        images.append(image)
    if images:
        yield paths, torch.stack(images)


def write_attention_images(model: torch.nn.Module, frame_paths: Sequence[str],
                           attention_dir: str, args: argparse.Namespace) -> List[str]:
    """Save the head-averaged attention of every frame as attention_dir/attn-<name>.jpg."""
    os.makedirs(attention_dir, exist_ok=True)
    device = next(model.parameters()).device
    written = []
    with tqdm(total=len(frame_paths), desc="attention", unit="frame") as progress:
        for paths, images in frame_batches(frame_paths, args.patch_size, args.resize,
                                           args.batch_size):
            maps = attention_maps.cls_attention(model, images.to(device), args.patch_size)
            maps = attention_maps.upsample_patches(maps.mean(dim=1, keepdim=True), args.patch_size)
            for path, attention in zip(paths, maps[:, 0].cpu().numpy()):
                name = os.path.splitext(os.path.basename(path))[0]
                out_path = os.path.join(attention_dir, f"attn-{name}.jpg")
                matplotlib.image.imsave(out_path, attention, cmap="inferno", format="jpg")
                written.append(out_path)
            progress.update(len(paths))
    return written


def write_video(image_paths: Sequence[str], video_path: str, fps: float, video_format: str) -> None:
    """Encode images into a video the size of the first one (others are resized to it)."""
    first = cv2.imread(image_paths[0])
    if first is None:
        raise utils.InputError(f"cannot read image {image_paths[0]!r}")
    height, width = first.shape[:2]
    writer = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*FOURCC[video_format]), fps,
                             (width, height))
    if not writer.isOpened():
        raise utils.InputError(f"OpenCV cannot write a {video_format} video to {video_path!r}")
    for path in tqdm(image_paths, desc="video", unit="frame"):
        frame = cv2.imread(path)
        if frame is None:
            writer.release()
            raise utils.InputError(f"cannot read image {path!r}")
        if frame.shape[:2] != (height, width):
            frame = cv2.resize(frame, (width, height))
        writer.write(frame)
    writer.release()
    print(f"Done: {video_path} ({len(image_paths)} frames at {fps:g} fps).")


def check_args(args: argparse.Namespace) -> None:
    if not os.path.exists(args.input_path):
        raise utils.InputError(f"--input_path {args.input_path!r} does not exist")
    if args.video_only and not os.path.isdir(args.input_path):
        raise utils.InputError("--video_only needs --input_path to be a folder of attn-*.jpg "
                               "images")
    if args.fps <= 0:
        raise utils.InputError(f"--fps {args.fps}: use a positive frame rate")
    if args.batch_size < 1:
        raise utils.InputError(f"--batch_size {args.batch_size}: use at least 1")


def main(args: argparse.Namespace) -> None:
    check_args(args)
    os.makedirs(args.output_path, exist_ok=True)
    video_path = os.path.join(args.output_path, f"video.{args.video_format}")
    if args.video_only:
        write_video(list_images(args.input_path, "attn-*", [".jpg"]), video_path, args.fps,
                    args.video_format)
        return
    if os.path.isfile(args.input_path):
        frame_paths, video_fps = extract_frames(args.input_path,
                                                os.path.join(args.output_path, "frames"))
        if video_fps > 0:
            args.fps = video_fps
    else:
        frame_paths = list_images(args.input_path, "*", FRAME_EXTENSIONS)
    model, _ = utils.build_frozen_backbone(args.arch, args.patch_size, args.pretrained_weights,
                                           args.checkpoint_key, attention_maps.inference_device(),
                                           visualisation=True)
    attention_paths = write_attention_images(model, frame_paths,
                                             os.path.join(args.output_path, "attention"), args)
    write_video(attention_paths, video_path, args.fps, args.video_format)


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
