"""Are crops from the --gpu_augment canvas as sharp as the PIL path's?

For scikit-image's sample photos, the same random crop boxes (global 224 and local 96 px, the
reference's scales) are cut by PIL from the original photo (DataAugmentationDINO's
RandomResizedCrop) and by gpu_augment from canvases of several sizes, in the layout the workers
write (the image at its own size, shrunk only to fit) and in a stretched layout (the image
resized to the whole square). Sharpness is the mean gradient magnitude of the crops' luma,
reported as a ratio to the PIL crops' (1.00: as sharp; below: softer). Prints a table, writes
JSON.

  python -m benchmarks.crop_sharpness --output crop_sharpness.json
"""
import argparse
import json
from typing import Dict, List

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from skimage import data
from torchvision import transforms

import gpu_augment
import utils

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina")
CROPS = {"global": (224, (0.4, 1.0)), "local": (96, (0.05, 0.4))}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Crop sharpness", add_help=True)
    parser.add_argument("--canvas_sizes", type=int, nargs="+", default=[256, 384, 512, 640])
    parser.add_argument("--stretched_sizes", type=int, nargs="+", default=[256, 512],
                        help="canvas sizes measured in the stretched layout too")
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS), choices=PHOTOS)
    parser.add_argument("--crops", type=int, default=16, help="crops of each kind per photo")
    parser.add_argument("--output", default="", help="JSON file for the results")
    return parser


def sharpness(images: torch.Tensor) -> float:
    """Mean gradient magnitude of the luma of (N, 3, H, W) images in [0, 1]."""
    grey = gpu_augment.luma(images)[:, 0]
    dy, dx = grey[:, 1:, :-1] - grey[:, :-1, :-1], grey[:, :-1, 1:] - grey[:, :-1, :-1]
    return (dy ** 2 + dx ** 2).sqrt().mean().item()


def pil_crops(photo: Image.Image, boxes: torch.Tensor, size: int) -> torch.Tensor:
    bicubic = transforms.InterpolationMode.BICUBIC
    return torch.stack([TF.to_tensor(TF.resized_crop(photo, *map(int, box), [size, size],
                                                     bicubic)) for box in boxes.tolist()])


def stretched_canvas(photo: Image.Image, canvas_size: int):
    canvas = photo.resize((canvas_size, canvas_size), Image.Resampling.BICUBIC)
    geometry = torch.tensor([*photo.size, canvas_size, canvas_size])
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1), geometry


def canvas_crops(canvas: torch.Tensor, geometry: torch.Tensor, boxes: torch.Tensor,
                 size: int) -> torch.Tensor:
    """gpu_augment's resampling of the boxes (original pixels) from one canvas."""
    on_canvas = gpu_augment.canvas_boxes(boxes, geometry[None].expand(len(boxes), -1))
    no_flip = torch.zeros(len(boxes), dtype=torch.bool)
    return gpu_augment.resized_crops(canvas[None].float() / 255, on_canvas, no_flip, size)


def layouts(args: argparse.Namespace) -> Dict[str, tuple]:
    """name: (canvas size, stretched)."""
    fitted = {f"canvas {size}": (size, False) for size in args.canvas_sizes}
    return {**fitted, **{f"stretched {size}": (size, True) for size in args.stretched_sizes}}


def measure(args: argparse.Namespace) -> List[dict]:
    rows = []
    for name in args.photos:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        generator = torch.Generator().manual_seed(0)
        sizes = torch.tensor([photo.size]).repeat(args.crops, 1)
        for kind, (size, scale) in CROPS.items():
            boxes = gpu_augment.sample_crop_boxes(sizes, scale, generator)
            reference = sharpness(pil_crops(photo, boxes, size))
            row = {"photo": f"{name} {photo.size[0]}x{photo.size[1]}", "crop": kind}
            for layout, (canvas_size, stretched) in layouts(args).items():
                canvas, geometry = stretched_canvas(photo, canvas_size) if stretched \
                    else gpu_augment.CanvasTransform(canvas_size)(photo)
                row[layout] = sharpness(canvas_crops(canvas, geometry, boxes, size)) / reference
            rows.append(row)
    return rows


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rows = measure(args)
    names = list(layouts(args))
    print("sharpness of canvas crops / PIL crops (mean gradient magnitude; 1.00 = as sharp)")
    print(f"{'photo':<34}{'crop':<8}" + "".join(f"{name:>14}" for name in names))
    for row in rows:
        print(f"{row['photo']:<34}{row['crop']:<8}" + "".join(f"{row[n]:>14.3f}" for n in names))
    summary = {name: {"min": min(row[name] for row in rows),
                      "mean": float(np.mean([row[name] for row in rows]))} for name in names}
    for statistic in ("min", "mean"):
        print(f"{statistic:<42}" + "".join(f"{summary[n][statistic]:>14.3f}" for n in names))
    if args.output:
        with open(args.output, "w") as output:
            json.dump({"rows": rows, "summary": summary}, output, indent=1)


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
