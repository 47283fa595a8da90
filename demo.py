"""Demo: pretrain a tiny ViT with DINO on scikit-learn's bundled digits, on the CPU, in minutes.

Writes the digits as an image folder (demo_data/), then runs main_dino.py on it with small crops;
checkpoints and log.txt land in demo_output/. Any main_dino flag given here overrides the demo's.
"""
import argparse
import os
import shlex
import sys

import main_dino
import utils
from sample_data import write_digits_folder

# A small-data recipe: a sharper teacher (0.02), few prototypes, a low learning rate and no
# last-layer freeze keep this short run clear of both collapses that main_dino warns about
# (uniform with the reference defaults here, one-hot with a sharp teacher and a high rate).
DEMO_FLAGS = [
    "--arch", "vit_tiny", "--patch_size", "8", "--out_dim", "256",
    "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "4",
    "--global_crops_scale", "0.4", "1.0", "--local_crops_scale", "0.1", "0.4",
    "--batch_size_per_gpu", "64", "--epochs", "3", "--warmup_epochs", "1", "--lr", "0.0005",
    "--min_lr", "1e-5", "--momentum_teacher", "0.996", "--teacher_temp", "0.02",
    "--warmup_teacher_temp", "0.02", "--freeze_last_layer", "0", "--weight_decay", "0.04",
    "--weight_decay_end", "0.04", "--drop_path_rate", "0.0", "--num_workers", "2",
    "--saveckp_freq", "5",
]


def main() -> None:
    demo_parser = argparse.ArgumentParser(description=__doc__, add_help=True)
    demo_parser.add_argument("--data_dir", default="demo_data", help="where to write the digits")
    demo_parser.add_argument("--output_dir", default="demo_output", help="main_dino's output_dir")
    demo_args, overrides = demo_parser.parse_known_args()
    if not os.path.isdir(demo_args.data_dir):
        write_digits_folder(demo_args.data_dir, size=32)
    argv = ["--data_path", demo_args.data_dir, "--output_dir", demo_args.output_dir,
            *DEMO_FLAGS, *overrides]
    print("Running: python main_dino.py " + shlex.join(argv), flush=True)
    parser = argparse.ArgumentParser("DINO", parents=[main_dino.get_args_parser()])
    utils.run_cli(main_dino.main, parser.parse_args(argv))
    checkpoint = os.path.join(demo_args.output_dir, "checkpoint.pth")
    print(f"Done: the teacher's weights are in {checkpoint} (key 'teacher'); "
          f"per-epoch losses in {os.path.join(demo_args.output_dir, 'log.txt')}.")


if __name__ == "__main__":
    sys.exit(main())
