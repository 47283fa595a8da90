"""`--small_data true`: a DINO recipe for a few thousand small images, from their number and size.

DINO's defaults assume ImageNet: 1.28M images of 224 px, ~1,250 steps per epoch, a teacher that
moves slowly (momentum 0.996) and 65,536 prototypes. With a few thousand small images a run is a
few hundred or thousand steps, and at initialisation a ViT's [CLS] features of different images are
nearly parallel (mean pairwise cosine 0.97 on the digits), so the centred teacher gives every image
nearly the same distribution and training drifts to the uniform collapse (loss = ln out_dim).
The preset (measured in the README, "Small data"):

- KoLeo on the student's [CLS] features (weight 0.1, as DINOv2) spreads them apart, which keeps
  the teacher's outputs different between images: the measured cure for the drift;
- out_dim: a power of two near one prototype per 8 images, 256 to 4,096;
- epochs: about 3,000 optimiser steps (10 to 300 epochs), warm-up a tenth of them;
- teacher momentum 1 - 0.8 / sqrt(total steps), 0.9 to 0.996 (0.95 for the demo's 240 steps,
  0.985 for 3,000, the reference's 0.996 from 40,000 on);
- the teacher cools from 0.04 to 0.02 over the whole run; lr 0.001 (per 256 images), weight decay
  0.04 to 0.1 (not 0.4), no drop-path, no frozen last layer;
- crops from the image side: global crops the size of the images (a multiple of the patch size),
  four local crops half of it (with an earlier Fashion-MNIST recipe 4 beat 2 and 6 in the same
  time; with this preset at 28 px, none learned as much per epoch in 0.65x the time, so the
  Fashion-MNIST benchmark turns them off), milder crop scales for images of 32 px or less (a
  40% crop of a 28-px digit loses what makes it that digit); patch size side / 4, so a ViT sees
  4 x 4 patches.

Only flags left at main_dino's defaults are changed, so any flag given on the command line wins;
the run prints what the preset set. Off by default: v1 runs are unchanged.
"""
import argparse
import math
import statistics
from typing import Any, Dict, List, Optional

from PIL import Image

import utils

TARGET_STEPS = 3000          # optimiser steps of a preset run when --epochs is left at its default
IMAGES_PER_PROTOTYPE = 8
SIZE_SAMPLE = 64             # images opened (headers only) to measure the image side
SMALL_IMAGE_SIDE = 32        # at or below: the milder crop scales


def add_small_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small_data", default=False, type=utils.bool_flag,
                        help="Set out_dim, epochs, teacher momentum and temperature, lr, crops and "
                             "KoLeo from the number and size of the images (dino_small_data.py), "
                             "for a few thousand small images. Flags given explicitly win.")


def image_side(paths: List[str]) -> int:
    """The median short side of up to SIZE_SAMPLE images spread over the list (headers only)."""
    step = max(1, len(paths) // SIZE_SAMPLE)
    sides = []
    for path in paths[::step][:SIZE_SAMPLE]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError):
            continue  # the training loop skips unreadable images too
    if not sides:
        raise utils.InputError(f"--small_data: none of the sampled images under the data folder "
                               f"could be read (first: {paths[0]!r})")
    return int(statistics.median(sides))


def power_of_two_near(value: float, low: int, high: int) -> int:
    return int(min(high, max(low, 2 ** round(math.log2(max(value, 1.0))))))


def small_data_settings(num_images: int, side: int, images_per_step: int,
                        epochs: Optional[int] = None, patch_size: Optional[int] = None
                        ) -> Dict[str, Any]:
    """The preset's values for `num_images` images of `side` pixels at `images_per_step` images per
    optimiser step (all ranks); `epochs` / `patch_size`, when given, are kept and used."""
    steps_per_epoch = max(1, num_images // images_per_step)
    if epochs is None:
        epochs = min(300, max(10, round(TARGET_STEPS / steps_per_epoch)))
    if patch_size is None:
        patch_size = min(16, max(4, side // 4))
    global_size = max(2 * patch_size, side // patch_size * patch_size)
    local_size = max(patch_size, global_size // 2 // patch_size * patch_size)
    small = side <= SMALL_IMAGE_SIDE
    momentum = 1 - 0.8 / math.sqrt(epochs * steps_per_epoch)
    return {
        "out_dim": power_of_two_near(num_images / IMAGES_PER_PROTOTYPE, 256, 4096),
        "epochs": epochs,
        "warmup_epochs": max(1, epochs // 10),
        "momentum_teacher": round(min(0.996, max(0.9, momentum)), 4),
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.02,
        "warmup_teacher_temp_epochs": epochs,
        "lr": 0.001,
        "min_lr": 1e-5,
        "weight_decay_end": 0.1,
        "drop_path_rate": 0.0,
        "freeze_last_layer": 0,
        "koleo_loss_weight": 0.1,
        "patch_size": patch_size,
        "global_crops_size": global_size,
        "local_crops_size": local_size,
        "local_crops_number": 4,
        "global_crops_scale": (0.6, 1.0) if small else (0.4, 1.0),
        "local_crops_scale": (0.25, 0.6) if small else (0.1, 0.4),
    }


def apply_small_data_preset(args: argparse.Namespace, parser: argparse.ArgumentParser,
                            world_size: int = 1) -> Dict[str, Any]:
    """Set the preset's values on `args` where the flag is still at the parser's default, for
    `world_size` processes; return what was set."""
    paths = utils.find_images(args.data_path)
    side = image_side(paths)
    # The crop scales' defaults are tuples and argparse gives typed values as lists, so a scale
    # typed at its default value (`--global_crops_scale 0.4 1`) is kept too.
    at_default = {name for name in vars(args) if getattr(args, name) == parser.get_default(name)}
    images_per_step = args.batch_size_per_gpu * args.grad_accum_steps * world_size
    settings = small_data_settings(
        len(paths), side, images_per_step,
        epochs=None if "epochs" in at_default else args.epochs,
        patch_size=None if "patch_size" in at_default else args.patch_size)
    applied = {name: value for name, value in settings.items()
               if name in at_default and not same_value(getattr(args, name), value)}
    for name, value in applied.items():
        setattr(args, name, list(value) if isinstance(value, tuple) else value)
    print(f"--small_data: {len(paths)} images of about {side} px; set "
          + ", ".join(f"--{name} {format_value(value)}" for name, value in applied.items()))
    return applied


def same_value(current: Any, value: Any) -> bool:
    return tuple(current) == value if isinstance(value, tuple) else current == value


def format_value(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
