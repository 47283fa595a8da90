"""Augmentation throughput: the PIL path per worker process vs the batched augmenter.

Times, on one photo: JPEG decode, main_dino.DataAugmentationDINO and gpu_augment's canvas
transform (each in this process, one thread, as in a DataLoader worker), then
gpu_augment.MultiCropAugmenter on whole batches on --device. Prints a table and writes JSON.

  python -m benchmarks.augment_speed --device cuda --output augment_speed.json
"""
import argparse
import io
import json
import time
from typing import Callable, Dict

import torch
from PIL import Image
from skimage import data

import gpu_augment
import main_dino
import utils

PHOTOS = {"chelsea": data.chelsea, "astronaut": data.astronaut, "coffee": data.coffee}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Augmentation speed", add_help=True)
    parser.add_argument("--photo", default="chelsea", choices=sorted(PHOTOS),
                        help="scikit-image sample photo (chelsea is 451x300, ImageNet-like)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--canvas_size", default=256, type=int)
    parser.add_argument("--global_crops_size", default=224, type=int)
    parser.add_argument("--local_crops_size", default=96, type=int)
    parser.add_argument("--local_crops_number", default=8, type=int)
    parser.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs="+")
    parser.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs="+")
    parser.add_argument("--pil_images", default=100, type=int,
                        help="images timed on each per-worker step")
    parser.add_argument("--batches", default=5, type=int, help="timed augmenter batches")
    parser.add_argument("--threads", default=0, type=int,
                        help="torch threads for the augmenter on the CPU (0: torch's default)")
    parser.add_argument("--output", default="", help="JSON file for the results")
    return parser


def seconds_per_call(function: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    function()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    sync()
    return (time.perf_counter() - start) / calls


def worker_timings(photo: Image.Image, args: argparse.Namespace) -> Dict[str, float]:
    """Seconds per image of the per-worker steps, on one thread."""
    encoded = io.BytesIO()
    photo.save(encoded, format="JPEG", quality=90)
    pil_path = main_dino.DataAugmentationDINO(
        args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
        args.global_crops_size, args.local_crops_size)
    canvas = gpu_augment.CanvasTransform(args.canvas_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "decode_s": seconds_per_call(
                lambda: Image.open(io.BytesIO(encoded.getvalue())).convert("RGB"),
                args.pil_images, lambda: None),
            "pil_augment_s": seconds_per_call(lambda: pil_path(photo), args.pil_images,
                                              lambda: None),
            "canvas_s": seconds_per_call(lambda: canvas(photo), args.pil_images, lambda: None),
        }
    finally:
        torch.set_num_threads(threads)


def augmenter_seconds_per_batch(photo: Image.Image, args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    canvas, size = gpu_augment.CanvasTransform(args.canvas_size)(photo)
    canvases = canvas[None].repeat(args.batch_size, 1, 1, 1)
    sizes = size[None].repeat(args.batch_size, 1)
    if device.type == "cuda":
        canvases = canvases.pin_memory()
    augmenter = gpu_augment.MultiCropAugmenter(
        args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
        args.global_crops_size, args.local_crops_size, seed=0).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return seconds_per_call(lambda: augmenter(canvases, sizes), args.batches, sync)


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    photo = Image.fromarray(PHOTOS[args.photo]())
    crops_per_image = 2 + args.local_crops_number
    worker = worker_timings(photo, args)
    batch_s = augmenter_seconds_per_batch(photo, args)
    results = {
        "photo": f"{args.photo} {photo.size[0]}x{photo.size[1]}",
        "crops": f"2x{args.global_crops_size}+{args.local_crops_number}x{args.local_crops_size}",
        "canvas_size": args.canvas_size, "batch_size": args.batch_size,
        "device": args.device, "augmenter_threads": torch.get_num_threads(), **worker,
        "pil_worker_images_per_s": 1 / (worker["decode_s"] + worker["pil_augment_s"]),
        "canvas_worker_images_per_s": 1 / (worker["decode_s"] + worker["canvas_s"]),
        "augmenter_batch_s": batch_s,
        "augmenter_images_per_s": args.batch_size / batch_s,
        "augmenter_crops_per_s": args.batch_size * crops_per_image / batch_s,
    }
    print(f"{results['photo']}, crops {results['crops']}, canvas {args.canvas_size}")
    print(f"{'step':<44}{'ms / image':>12}{'images/s':>12}")
    rows = [("JPEG decode (1 thread)", worker["decode_s"]),
            ("PIL DataAugmentationDINO (1 thread)", worker["pil_augment_s"]),
            ("canvas resize (1 thread)", worker["canvas_s"]),
            ("PIL worker: decode + augment", worker["decode_s"] + worker["pil_augment_s"]),
            ("GPU-path worker: decode + canvas", worker["decode_s"] + worker["canvas_s"]),
            (f"augmenter on {args.device}, batch {args.batch_size} "
             f"({torch.get_num_threads() if args.device == 'cpu' else 'GPU'} thr.)",
             batch_s / args.batch_size)]
    for name, seconds in rows:
        print(f"{name:<44}{seconds * 1e3:>12.2f}{1 / seconds:>12.1f}")
    print(f"augmenter: {results['augmenter_crops_per_s']:.0f} crops/s")
    if args.output:
        with open(args.output, "w") as output:
            json.dump(results, output, indent=1)


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
