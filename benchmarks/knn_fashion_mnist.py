"""Learning-quality benchmark: does DINO pretraining beat random weights on Fashion-MNIST?

Writes a Fashion-MNIST subset as train/val image folders, pretrains a ViT with main_dino.py on the
CPU, then prints the k-NN accuracy (eval_knn.py) of the teacher, of the same architecture with
random weights, and of raw pixels. Flags this script does not know are passed on to main_dino.py
after the recipe below, so they override it (e.g. `--epochs 2`).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

import eval_knn
import sample_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# main_dino.py flags for 28x28 grey images and a CPU budget of about 25 minutes (see the README).
RECIPE = [
    "--local_crops_size", "14", "--local_crops_number", "4",
    "--global_crops_scale", "0.4", "1", "--local_crops_scale", "0.15", "0.4",
    "--out_dim", "1024", "--teacher_temp", "0.02", "--warmup_teacher_temp", "0.02",
    "--momentum_teacher", "0.99", "--lr", "0.002", "--min_lr", "1e-5", "--warmup_epochs", "2",
    "--epochs", "16", "--batch_size_per_gpu", "64", "--drop_path_rate", "0.0",
    "--norm_last_layer", "true", "--freeze_last_layer", "0",
    "--weight_decay", "0.04", "--weight_decay_end", "0.1", "--use_bf16", "true",
    "--saveckp_freq", "0",
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO k-NN benchmark on Fashion-MNIST")
    parser.add_argument("--fashion_dir", default=sample_data.FASHION_MNIST_DIR, type=str,
                        help="Folder holding the four Fashion-MNIST idx .gz files (the Debian "
                             "package dataset-fashion-mnist installs them in the default place).")
    parser.add_argument("--output_dir", default=os.path.join(REPO, "benchmark_output"), type=str,
                        help="Where the image folders, the checkpoint, the logs and "
                             "results.json go.")
    parser.add_argument("--train_size", default=10000, type=int,
                        help="First N training images: the pretraining set and the k-NN bank.")
    parser.add_argument("--val_size", default=2000, type=int, help="First N test images.")
    parser.add_argument("--arch", default="vit_tiny", type=str)
    parser.add_argument("--patch_size", default=7, type=int)
    parser.add_argument("--image_size", default=28, type=int,
                        help="Side of the global crops and of the k-NN eval images (the 28x28 "
                             "images are upsampled above 28).")
    parser.add_argument("--nb_knn", default=20, type=int, help="k of the reported k-NN accuracy.")
    parser.add_argument("--num_workers", default=2, type=int)
    return parser


def dump_pixel_features(splits: Dict[str, Sequence[np.ndarray]], folder: str) -> None:
    """Raw pixels, L2-normalised, in eval_knn.py's --load_features layout."""
    bank = {}
    for prefix, (images, labels) in (("train", splits["train"]), ("test", splits["val"])):
        pixels = torch.tensor(images.reshape(len(images), -1), dtype=torch.float)
        bank[f"{prefix}feat"] = torch.nn.functional.normalize(pixels, dim=1)
        bank[f"{prefix}labels"] = torch.tensor(labels)
    eval_knn.dump_feature_bank(bank, folder)


def prepare_data(args: argparse.Namespace, data_dir: str, pixel_dir: str) -> Dict[str, int]:
    """Image folders for main_dino/eval_knn and raw-pixel features; the size of each split."""
    limits = {"train": args.train_size, "val": args.val_size}
    try:
        splits = {split: sample_data.load_fashion_mnist(args.fashion_dir, split, limit)
                  for split, limit in limits.items()}
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    shutil.rmtree(data_dir, ignore_errors=True)  # stale images would join the folders
    for split, (images, labels) in splits.items():
        sample_data.write_class_folders(images, labels, os.path.join(data_dir, split))
    dump_pixel_features(splits, pixel_dir)
    sizes = {split: len(labels) for split, (_, labels) in splits.items()}
    print(f"Wrote {sizes['train']} train and {sizes['val']} val images to {data_dir}.")
    return sizes


def run_script(command: List[str], log_path: str) -> str:
    """Run a repo script with this Python, streaming its output to the console and a log file."""
    print("$", " ".join(command), flush=True)
    lines = []
    with open(log_path, "w") as log_file, subprocess.Popen(
            [sys.executable, *command], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            log_file.write(line)
            lines.append(line)
    if process.returncode != 0:
        sys.exit(f"error: {command[0]} failed (exit {process.returncode}); see {log_path}")
    return "".join(lines)


def pretrain(args: argparse.Namespace, data_dir: str, main_dino_overrides: List[str]) -> str:
    """Run main_dino.py from scratch with the recipe; return its checkpoint path."""
    pretrain_dir = os.path.join(args.output_dir, "pretrain")
    shutil.rmtree(pretrain_dir, ignore_errors=True)  # main_dino would resume a checkpoint there
    run_script(["main_dino.py", "--data_path", os.path.join(data_dir, "train"),
                "--output_dir", pretrain_dir, "--arch", args.arch,
                "--patch_size", str(args.patch_size), "--global_crops_size", str(args.image_size),
                "--num_workers", str(args.num_workers), *RECIPE, *main_dino_overrides],
               os.path.join(args.output_dir, "pretrain.log"))
    return os.path.join(pretrain_dir, "checkpoint.pth")


def knn_top1(output: str, k: int) -> float:
    match = re.search(rf"^{k}-NN classifier result: Top1: ([0-9.]+)", output, re.MULTILINE)
    if match is None:
        sys.exit(f"error: no {k}-NN result line in eval_knn.py's output")
    return float(match.group(1))


def eval_knn_command(args: argparse.Namespace, data_dir: str, extra: Sequence[str]) -> List[str]:
    return ["eval_knn.py", "--data_path", data_dir, "--arch", args.arch,
            "--patch_size", str(args.patch_size), "--resize_size", str(args.image_size),
            "--crop_size", str(args.image_size), "--nb_knn", str(args.nb_knn),
            "--num_workers", str(args.num_workers), "--batch_size_per_gpu", "256", *extra]


def knn_accuracies(args: argparse.Namespace, data_dir: str, checkpoint: str,
                   pixel_dir: str) -> Dict[str, float]:
    runs = {
        "DINO teacher": ["--pretrained_weights", checkpoint, "--checkpoint_key", "teacher"],
        "random init": ["--pretrained_weights", "random"],
        "raw pixels": ["--load_features", pixel_dir],
    }
    accuracies = {}
    for name, extra in runs.items():
        log_path = os.path.join(args.output_dir, f"knn_{name.replace(' ', '_')}.log")
        output = run_script(eval_knn_command(args, data_dir, extra), log_path)
        accuracies[name] = knn_top1(output, args.nb_knn)
    return accuracies


def main(args: argparse.Namespace, main_dino_overrides: List[str]) -> None:
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    data_dir = os.path.join(args.output_dir, "data")
    pixel_dir = os.path.join(args.output_dir, "pixel_features")
    sizes = prepare_data(args, data_dir, pixel_dir)
    checkpoint = pretrain(args, data_dir, main_dino_overrides)
    pretrain_minutes = (time.time() - start) / 60
    accuracies = knn_accuracies(args, data_dir, checkpoint, pixel_dir)
    total_minutes = (time.time() - start) / 60
    with open(os.path.join(args.output_dir, "results.json"), "w") as results_file:
        json.dump({"top1": accuracies, "k": args.nb_knn, "sizes": sizes,
                   "pretrain_minutes": pretrain_minutes, "total_minutes": total_minutes,
                   "main_dino_flags": RECIPE + main_dino_overrides}, results_file, indent=1)
    print(f"\n{args.nb_knn}-NN top-1 on {sizes['val']} Fashion-MNIST test images (bank: "
          f"{sizes['train']} training images), {args.arch}/{args.patch_size} at "
          f"{args.image_size}px:")
    print("  ".join(f"{name}: {accuracy:.2f}%" for name, accuracy in accuracies.items()))
    print(f"Data and pretraining took {pretrain_minutes:.1f} min; the whole benchmark "
          f"{total_minutes:.1f} min.")


if __name__ == "__main__":
    benchmark_args, overrides = get_args_parser().parse_known_args()
    main(benchmark_args, overrides)
