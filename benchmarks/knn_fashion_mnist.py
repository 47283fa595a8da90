"""Learning-quality benchmark: does DINO pretraining beat random weights on Fashion-MNIST?

Writes a Fashion-MNIST subset (or, with --dataset rendered_digits, a second offline set: grey
28-px digits drawn in matplotlib's fonts) as train/val image folders, pretrains a ViT with
main_dino.py's --small_data preset on the CPU, then prints the k-NN accuracy (eval_knn.py) of the
teacher, of the same architecture with random weights, and of raw pixels. Flags this script does
not know are passed on to main_dino.py after the recipe below, so they override it (e.g.
`--epochs 2`).
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

import eval_knn
import sample_data
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# main_dino.py's --small_data preset (dino_small_data.py; for 10,000 28-px images: out_dim 1024,
# patch 7, momentum 0.9815 at 12 epochs, teacher 0.04 -> 0.02, lr 0.001, KoLeo 0.1), 12 epochs,
# without local crops: at 28 px they cost 35% of the time and added no k-NN accuracy per epoch.
# Global crops (and k-NN images) of 21 px, 3 x 3 patches, instead of the images' 28: 0.6x the
# FLOPs per image and more k-NN accuracy per epoch (README, "Learning quality"), which is what
# brings float32 on a CPU without native bf16 within half an hour.
DEFAULT_IMAGE_SIZE = 21
CPU_RECIPE = ["--small_data", "true", "--epochs", "12", "--batch_size_per_gpu", "64",
              "--local_crops_number", "0", "--saveckp_freq", "0", "--knn_freq", "2"]
# --full: all 60,000 training images on one GPU in about 10 minutes (crops drawn on the GPU),
# with the preset's four local crops (not yet measured without them).
GPU_RECIPE = CPU_RECIPE + [
    "--epochs", "40", "--warmup_epochs", "4", "--batch_size_per_gpu", "256",
    "--local_crops_number", "4", "--gpu_augment", "true", "--canvas_size", "28",
    "--knn_freq", "5",
]


def recipe_flags(full: bool) -> List[str]:
    """The recipe's main_dino flags; bf16 only where it is native (never emulated on a CPU)."""
    recipe = GPU_RECIPE if full else CPU_RECIPE
    return [*recipe, "--use_bf16", str(utils.fast_bf16_available()).lower()]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO k-NN benchmark on Fashion-MNIST")
    parser.add_argument("--dataset", default="fashion_mnist",
                        choices=["fashion_mnist", "rendered_digits"],
                        help="fashion_mnist: the Debian package's files; rendered_digits: "
                             "sample_data.rendered_digits (train and val drawn with other seeds).")
    parser.add_argument("--fashion_dir", default=sample_data.FASHION_MNIST_DIR, type=str,
                        help="Folder holding the four Fashion-MNIST idx .gz files (the Debian "
                             "package dataset-fashion-mnist installs them in the default place).")
    parser.add_argument("--output_dir", default=os.path.join(REPO, "benchmark_output"), type=str,
                        help="Where the image folders, the checkpoint, the logs and "
                             "results.json go.")
    parser.add_argument("--full", action="store_true",
                        help="The GPU mode: all 60,000 training and 10,000 test images and the "
                             "GPU recipe (default: 10,000/2,000 and the CPU recipe).")
    parser.add_argument("--train_size", default=None, type=int,
                        help="First N training images: the pretraining set and the k-NN bank "
                             "(default 10,000; 60,000 with --full).")
    parser.add_argument("--val_size", default=None, type=int,
                        help="First N test images (default 2,000; 10,000 with --full).")
    parser.add_argument("--arch", default="vit_tiny", type=str)
    parser.add_argument("--patch_size", default=7, type=int)
    parser.add_argument("--image_size", default=DEFAULT_IMAGE_SIZE, type=int,
                        help="Side of the global crops and of the k-NN eval images, a multiple of "
                             "--patch_size (the 28x28 images are resized to it).")
    parser.add_argument("--nb_knn", default=20, type=int, help="k of the reported k-NN accuracy.")
    parser.add_argument("--num_workers", default=2, type=int)
    return parser


def prepare_data(args: argparse.Namespace, data_dir: str, pixel_dir: str) -> Dict[str, int]:
    """Image folders for main_dino/eval_knn and raw-pixel features; the size of each split."""
    default_sizes = (60000, 10000) if args.full else (10000, 2000)
    limits = {"train": args.train_size or default_sizes[0],
              "val": args.val_size or default_sizes[1]}
    if args.dataset == "rendered_digits":
        splits = {split: sample_data.rendered_digits(limit, seed=seed)
                  for (split, limit), seed in zip(limits.items(), (0, 1))}
    else:
        try:
            splits = {split: sample_data.load_fashion_mnist(args.fashion_dir, split, limit)
                      for split, limit in limits.items()}
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"error: {error}")
    shutil.rmtree(data_dir, ignore_errors=True)  # stale images would join the folders
    for split, (images, labels) in splits.items():
        sample_data.write_class_folders(images, labels, os.path.join(data_dir, split))
    eval_knn.dump_feature_bank(eval_knn.pixel_feature_bank(splits), pixel_dir)
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


def pretrain(args: argparse.Namespace, data_dir: str, main_dino_flags: List[str]) -> str:
    """Run main_dino.py from scratch (k-NN on the val split logged per epoch); return its
    output folder."""
    pretrain_dir = os.path.join(args.output_dir, "pretrain")
    shutil.rmtree(pretrain_dir, ignore_errors=True)  # main_dino would resume a checkpoint there
    run_script(["main_dino.py", "--data_path", os.path.join(data_dir, "train"),
                "--output_dir", pretrain_dir, "--arch", args.arch,
                "--patch_size", str(args.patch_size), "--global_crops_size", str(args.image_size),
                "--num_workers", str(args.num_workers), "--knn_data_path", data_dir,
                *main_dino_flags], os.path.join(args.output_dir, "pretrain.log"))
    return pretrain_dir


def knn_curve(pretrain_dir: str) -> List[List[float]]:
    """[[epoch, k-NN top-1], ...] from main_dino's log.txt."""
    with open(os.path.join(pretrain_dir, "log.txt")) as log_file:
        records = [json.loads(line) for line in log_file if line.strip()]
    return [[record["epoch"], record["knn_top1"]] for record in records if "knn_top1" in record]


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
    if args.image_size % args.patch_size:
        sys.exit(f"error: --image_size {args.image_size} is not a multiple of --patch_size "
                 f"{args.patch_size}")
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    data_dir = os.path.join(args.output_dir, "data")
    pixel_dir = os.path.join(args.output_dir, "pixel_features")
    sizes = prepare_data(args, data_dir, pixel_dir)
    main_dino_flags = recipe_flags(args.full) + main_dino_overrides
    pretrain_dir = pretrain(args, data_dir, main_dino_flags)
    pretrain_minutes = (time.time() - start) / 60
    accuracies = knn_accuracies(args, data_dir, os.path.join(pretrain_dir, "checkpoint.pth"),
                                pixel_dir)
    total_minutes = (time.time() - start) / 60
    curve = knn_curve(pretrain_dir)
    with open(os.path.join(args.output_dir, "results.json"), "w") as results_file:
        json.dump({"top1": accuracies, "k": args.nb_knn, "sizes": sizes,
                   "knn_curve": curve, "pretrain_minutes": pretrain_minutes,
                   "total_minutes": total_minutes, "main_dino_flags": main_dino_flags},
                  results_file, indent=1)
    print("Teacher k-NN per epoch: " + ", ".join(f"{epoch}: {top1:.2f}%"
                                                 for epoch, top1 in curve))
    print(f"\n{args.nb_knn}-NN top-1 on {sizes['val']} {args.dataset} test images (bank: "
          f"{sizes['train']} training images), {args.arch}/{args.patch_size} at "
          f"{args.image_size}px:")
    print("  ".join(f"{name}: {accuracy:.2f}%" for name, accuracy in accuracies.items()))
    print(f"Data and pretraining took {pretrain_minutes:.1f} min; the whole benchmark "
          f"{total_minutes:.1f} min.")


if __name__ == "__main__":
    benchmark_args, overrides = get_args_parser().parse_known_args()
    main(benchmark_args, overrides)
