"""Demo: DINO learns on scikit-learn's bundled digits in a few CPU minutes, and shows it.

Writes the 1,797 digits as train/ and val/ image folders (demo_data/, 500 held out), pretrains a
ViT-T/8 on train/ with main_dino.py (no labels; k-NN on val/ every epoch), then compares the
weighted 20-NN top-1 on val/ of the DINO teacher, of the same network with random weights and of
raw pixels, draws the teacher's attention maps on a few digits and on a photo, and writes
demo_output/summary.json. Any main_dino flag given here overrides the demo's recipe.
"""
import argparse
import json
import os
import shlex
import sys
import time
from typing import Dict, List

import torch

import attention_maps
import eval_knn
import main_dino
import utils
import visualize_attention
from sample_data import digits_train_val, write_splits

ARCH, IMAGE_SIZE = "vit_tiny", 32
# The recipe (README, "The demo" and "Small data"): main_dino's --small_data preset, which reads
# the 1,297 training digits (written at 32 px) and sets 8-px patches, 32/16-px crops with scales
# that keep a digit a digit, out_dim 256, teacher momentum 0.948 for the run's 240 steps, a teacher
# cooling from 0.04 to 0.02 over the run, lr 0.001 and KoLeo (which keeps the teacher's outputs
# apart: without it they drift to uniform); six epochs at batch 32 fit the five-minute budget.
DEMO_FLAGS = [
    "--small_data", "true", "--arch", ARCH, "--epochs", "6", "--batch_size_per_gpu", "32",
    "--num_workers", "1", "--saveckp_freq", "0",
]
ATTENTION_DIGITS = 4  # digits shown in the attention figure (the first val image of 0, 1, ...)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", default="demo_data", help="where to write the digits")
    parser.add_argument("--output_dir", default="demo_output",
                        help="main_dino's output_dir; the figures and summary.json go there too")
    return parser


def recipe_flags() -> List[str]:
    """The demo's main_dino flags; bf16 only where it is native (never emulated on a CPU)."""
    return [*DEMO_FLAGS, "--use_bf16", str(utils.fast_bf16_available()).lower()]


def pretrain(data_dir: str, output_dir: str, overrides: List[str]) -> None:
    """main_dino on data_dir/train (k-NN on data_dir/val every epoch), in this process."""
    parser = argparse.ArgumentParser("DINO", parents=[main_dino.get_args_parser()])
    argv = ["--data_path", os.path.join(data_dir, "train"), "--output_dir", output_dir,
            "--knn_data_path", data_dir, *recipe_flags(), *overrides]
    print("Running: python main_dino.py " + shlex.join(argv), flush=True)
    utils.run_cli(main_dino.main, parser.parse_args(argv))


def trained_args(output_dir: str) -> argparse.Namespace:
    """The run's flags as main_dino saved them: what the preset and any override chose."""
    return utils.load_checkpoint_file(os.path.join(output_dir, "checkpoint.pth"), mmap=True)["args"]


def knn_accuracies(data_dir: str, output_dir: str, run: argparse.Namespace, splits: dict
                   ) -> Dict[str, float]:
    """20-NN top-1 on val/: the teacher's (main_dino's last k-NN), random weights', pixels'."""
    with open(os.path.join(output_dir, "log.txt")) as log_file:
        dino = [json.loads(line) for line in log_file if line.strip()][-1]["knn_top1"]
    loader_args = argparse.Namespace(batch_size_per_gpu=128, num_workers=1)
    monitor = eval_knn.KnnMonitor(data_dir, run.global_crops_size, loader_args)
    utils.fix_random_seeds(0)
    device = attention_maps.inference_device()
    random_model, _ = utils.build_frozen_backbone(run.arch, run.patch_size, "random", None,
                                                  device)
    random = monitor.top1(random_model, device, torch.autocast(device.type, enabled=False))
    pixels = eval_knn.bank_top1(eval_knn.pixel_feature_bank(splits))
    return {"dino": dino, "random": random, "pixels": pixels}


def attention_figure(data_dir: str, output_dir: str, run: argparse.Namespace) -> str:
    """The trained teacher's last-block [CLS] attention on a few val digits and on a photo."""
    device = attention_maps.inference_device()
    patch_size = run.patch_size
    model, _ = utils.build_frozen_backbone(run.arch, patch_size,
                                           os.path.join(output_dir, "checkpoint.pth"), "teacher",
                                           device)
    images = [(f"digit {label}", attention_maps.open_rgb(os.path.join(
        data_dir, "val", str(label), sorted(os.listdir(os.path.join(data_dir, "val",
                                                                       str(label))))[0])),
               [IMAGE_SIZE * 2]) for label in range(ATTENTION_DIGITS)]
    images.append(("photo", visualize_attention.default_photo(), [IMAGE_SIZE * 3]))
    rows = []
    for name, image, size in images:
        tensor = attention_maps.image_to_tensor(image, patch_size, size)
        patch_maps = attention_maps.cls_attention(model, tensor[None].to(device), patch_size)
        pixel_maps = attention_maps.upsample_patches(patch_maps.float().cpu(), patch_size)[0]
        rows.append((name, visualize_attention.to_display(tensor), pixel_maps.numpy()))
    path = os.path.join(output_dir, "attention.png")
    visualize_attention.save_attention_rows(rows, path)
    return path


def main() -> None:
    start = time.time()
    demo_args, overrides = get_args_parser().parse_known_args()
    splits = digits_train_val()
    if not os.path.isdir(demo_args.data_dir):
        write_splits(splits, demo_args.data_dir, size=IMAGE_SIZE)
    pretrain(demo_args.data_dir, demo_args.output_dir, overrides)
    run = trained_args(demo_args.output_dir)
    accuracies = knn_accuracies(demo_args.data_dir, demo_args.output_dir, run, splits)
    figures = [attention_figure(demo_args.data_dir, demo_args.output_dir, run),
               os.path.join(demo_args.output_dir, "curves.png")]
    minutes = (time.time() - start) / 60
    summary = {"knn_top1": accuracies, "figures": figures, "minutes": round(minutes, 2)}
    with open(os.path.join(demo_args.output_dir, "summary.json"), "w") as summary_file:
        json.dump(summary, summary_file, indent=1)
    held_out = len(splits["val"][1])
    print(f"\nWeighted 20-NN top-1 on {held_out} held-out digits (bank: the "
          f"{len(splits['train'][1])} training digits):")
    names = {"dino": "DINO teacher", "random": "random weights (same ViT)",
             "pixels": "raw pixels"}
    for key, name in names.items():
        print(f"  {name:<26} {accuracies[key]:6.2f}%")
    print(f"Figures: {', '.join(figures)}; summary: "
          f"{os.path.join(demo_args.output_dir, 'summary.json')} ({minutes:.1f} min).")


if __name__ == "__main__":
    sys.exit(main())
