"""Augmentation throughput: the PIL path per worker process vs the batched augmenter.

Times, on one photo: JPEG decode (PIL, and torchvision), main_dino.DataAugmentationDINO,
gpu_augment's canvas transform and the --gpu_decode worker (reading the file's bytes), each in
this process on one thread as in a DataLoader worker; then, on whole batches on --device,
decoding JPEG bytes onto canvases (--gpu_decode) and gpu_augment.MultiCropAugmenter (also
compiled with --compile). Prints a table and writes JSON.

  python -m benchmarks.augment_speed --device cuda --compile --output augment_speed.json
"""
import argparse
import io
import json
import os
import tempfile
import time
from typing import Callable, Dict, Optional

import torch
import torchvision
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
    parser.add_argument("--canvas_size", default=512, type=int)
    parser.add_argument("--global_crops_size", default=224, type=int)
    parser.add_argument("--local_crops_size", default=96, type=int)
    parser.add_argument("--local_crops_number", default=8, type=int)
    parser.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs="+")
    parser.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs="+")
    parser.add_argument("--pil_images", default=100, type=int,
                        help="images timed on each per-worker step")
    parser.add_argument("--batches", default=5, type=int, help="timed augmenter batches")
    parser.add_argument("--compile", action="store_true",
                        help="also time the augmenter with its pixel work compiled (CUDA)")
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


def jpeg_bytes(photo: Image.Image) -> bytes:
    encoded = io.BytesIO()
    photo.save(encoded, format="JPEG", quality=90)
    return encoded.getvalue()


def worker_timings(photo: Image.Image, args: argparse.Namespace) -> Dict[str, float]:
    """Seconds per image of the per-worker steps, on one thread."""
    encoded = jpeg_bytes(photo)
    pil_path = main_dino.DataAugmentationDINO(
        args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
        args.global_crops_size, args.local_crops_size)
    canvas = gpu_augment.CanvasTransform(args.canvas_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "photo.jpg")
        with open(path, "wb") as file:
            file.write(encoded)
        as_tensor = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        try:
            return {
                "decode_s": seconds_per_call(
                    lambda: Image.open(io.BytesIO(encoded)).convert("RGB"), args.pil_images,
                    lambda: None),
                "torchvision_decode_s": seconds_per_call(
                    lambda: torchvision.io.decode_jpeg(as_tensor), args.pil_images, lambda: None),
                "pil_augment_s": seconds_per_call(lambda: pil_path(photo), args.pil_images,
                                                  lambda: None),
                "canvas_s": seconds_per_call(lambda: canvas(photo), args.pil_images,
                                             lambda: None),
                "read_bytes_s": seconds_per_call(lambda: gpu_augment.read_image_bytes(path),
                                                 args.pil_images, lambda: None),
            }
        finally:
            torch.set_num_threads(threads)


def device_sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def device_decode_seconds_per_batch(photo: Image.Image, args: argparse.Namespace) -> float:
    """--gpu_decode's main-process step: a batch of JPEG files' bytes onto device canvases."""
    device = torch.device(args.device)
    encoded = torch.frombuffer(bytearray(jpeg_bytes(photo)), dtype=torch.uint8)
    batch = [encoded.clone() for _ in range(args.batch_size)]
    return seconds_per_call(
        lambda: gpu_augment.decode_to_canvases(batch, args.canvas_size, device), args.batches,
        device_sync(device))


def augmenter_seconds_per_batch(photo: Image.Image, args: argparse.Namespace,
                                compile_pixels: bool = False) -> float:
    """One batch through the augmenter; the first (compiling) call is not timed."""
    device = torch.device(args.device)
    canvas, geometry = gpu_augment.CanvasTransform(args.canvas_size)(photo)
    canvases = canvas[None].repeat(args.batch_size, 1, 1, 1)
    geometry = geometry[None].repeat(args.batch_size, 1)
    if device.type == "cuda":  # as the DataLoader delivers them
        canvases, geometry = canvases.pin_memory(), geometry.pin_memory()
    augmenter = gpu_augment.MultiCropAugmenter(
        args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
        args.global_crops_size, args.local_crops_size, seed=0, compile_pixels=compile_pixels,
        device=device)
    return seconds_per_call(lambda: augmenter(canvases, geometry), args.batches,
                            device_sync(device))


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    photo = Image.fromarray(PHOTOS[args.photo]())
    crops_per_image = 2 + args.local_crops_number
    worker = worker_timings(photo, args)
    batch_s = augmenter_seconds_per_batch(photo, args)
    compiled_s: Optional[float] = augmenter_seconds_per_batch(photo, args, True) \
        if args.compile else None
    decode_batch_s = device_decode_seconds_per_batch(photo, args)
    results = {
        "photo": f"{args.photo} {photo.size[0]}x{photo.size[1]}",
        "crops": f"2x{args.global_crops_size}+{args.local_crops_number}x{args.local_crops_size}",
        "canvas_size": args.canvas_size, "batch_size": args.batch_size,
        "device": args.device, "augmenter_threads": torch.get_num_threads(), **worker,
        "pil_worker_images_per_s": 1 / (worker["decode_s"] + worker["pil_augment_s"]),
        "canvas_worker_images_per_s": 1 / (worker["decode_s"] + worker["canvas_s"]),
        "bytes_worker_images_per_s": 1 / worker["read_bytes_s"],
        "device_decode_batch_s": decode_batch_s,
        "device_decode_images_per_s": args.batch_size / decode_batch_s,
        "augmenter_batch_s": batch_s,
        "augmenter_images_per_s": args.batch_size / batch_s,
        "augmenter_crops_per_s": args.batch_size * crops_per_image / batch_s,
        "augmenter_compiled_batch_s": compiled_s,
        "augmenter_compiled_images_per_s": args.batch_size / compiled_s if compiled_s else None,
    }
    print(f"{results['photo']}, crops {results['crops']}, canvas {args.canvas_size}")
    print(f"{'step':<44}{'ms / image':>12}{'images/s':>12}")
    threads = f"{torch.get_num_threads() if args.device == 'cpu' else 'GPU'} thr."
    rows = [("JPEG decode, PIL (1 thread)", worker["decode_s"]),
            ("JPEG decode, torchvision (1 thread)", worker["torchvision_decode_s"]),
            ("PIL DataAugmentationDINO (1 thread)", worker["pil_augment_s"]),
            ("canvas (1 thread)", worker["canvas_s"]),
            ("PIL worker: decode + augment", worker["decode_s"] + worker["pil_augment_s"]),
            ("GPU-path worker: decode + canvas", worker["decode_s"] + worker["canvas_s"]),
            ("--gpu_decode worker: read the file", worker["read_bytes_s"]),
            (f"decode onto canvases on {args.device}, batch {args.batch_size}",
             decode_batch_s / args.batch_size),
            (f"augmenter on {args.device}, batch {args.batch_size} ({threads})",
             batch_s / args.batch_size)]
    if compiled_s:
        rows.append((f"augmenter compiled, batch {args.batch_size}", compiled_s / args.batch_size))
    for name, seconds in rows:
        print(f"{name:<44}{seconds * 1e3:>12.2f}{1 / seconds:>12.1f}")
    print(f"augmenter: {results['augmenter_crops_per_s']:.0f} crops/s")
    if args.output:
        with open(args.output, "w") as output:
            json.dump(results, output, indent=1)


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
