"""Cost of main_dino's checkpoints: seconds to write one (mid-epoch and end-of-epoch), its size on
disk, and the seconds to read it back on resume.

The networks, optimizer (with its state, after one step on small random crops) and checkpoint
code are main_dino's own; crop sizes do not change a checkpoint. A plain torch.save to a path
(what the reference does, without fsync) is timed beside it.

Example: python -m benchmarks.checkpoint_cost --arch vit_small --patch_size 16 --out_dim 65536
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Tuple

import torch

import dino_checkpoint
import main_dino
import utils


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--output_dir", default="",
                        help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="", help="write the results to this file")
    return parser.parse_args()


def trained_bundle(bench: argparse.Namespace, device: torch.device
                   ) -> Tuple[main_dino.DinoTraining, argparse.Namespace]:
    """main_dino's training bundle (and flags) after one step past --freeze_last_layer, so that
    AdamW holds the moments of every parameter, as for most of a run."""
    args = main_dino.get_args_parser().parse_args(
        ["--arch", bench.arch, "--patch_size", str(bench.patch_size), "--out_dim",
         str(bench.out_dim), "--epochs", "2", "--warmup_epochs", "0", "--use_fp16", "false"])
    args.gpu, args.compile = 0, False
    training = main_dino.build_training(args, device, iters_per_epoch=10)
    side = 2 * bench.patch_size
    crops = [torch.randn(2, 3, side, side, device=device) for _ in range(2)]
    main_dino.set_schedules(training.optimizer, training.schedules, 11)
    main_dino.training_step(training, [crops], 1, 11)
    return training, args


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    bench = get_args()
    init_args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(init_args)
    device = utils.device_of(init_args)
    training, args = trained_bundle(bench, device)
    output_dir = bench.output_dir or tempfile.mkdtemp(prefix="checkpoint_cost_")
    os.makedirs(output_dir, exist_ok=True)
    checkpoints = dino_checkpoint.Checkpoints(
        output_dir, saveckp_freq=0, saveckp_iters=1,
        state_of=lambda epoch: main_dino.checkpoint_state(training, epoch, args),
        layout={}, stop=dino_checkpoint.StopSignals())
    progress = dino_checkpoint.EpochProgress(iteration=5, meters={"loss": (50.0, 5)})
    path = os.path.join(output_dir, "checkpoint.pth")
    plain_path = os.path.join(output_dir, "plain.pth")
    state = main_dino.checkpoint_state(training, 1, args)
    results = {
        "arch": f"{bench.arch}/{bench.patch_size}", "out_dim": bench.out_dim,
        "device": str(device),
        "parameters_million": sum(p.numel() for p in training.student.parameters()) / 1e6,
        "mid_epoch_save_s": timed(lambda: checkpoints.save_mid_epoch(0, progress), bench.repeats),
        "mid_epoch_mb": os.path.getsize(path) / 2 ** 20,
        "end_of_epoch_save_s": timed(lambda: checkpoints.save_epoch_end(0), bench.repeats),
        "end_of_epoch_mb": os.path.getsize(path) / 2 ** 20,
        "plain_torch_save_s": timed(lambda: torch.save(state, plain_path), bench.repeats),
        "load_s": timed(lambda: utils.load_checkpoint_file(path), bench.repeats),
    }
    for name, value in results.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    if bench.json:
        with open(bench.json, "w") as json_file:
            json.dump(results, json_file, indent=2)
    if not bench.output_dir:
        for name in os.listdir(output_dir):
            os.remove(os.path.join(output_dir, name))
        os.rmdir(output_dir)


if __name__ == "__main__":
    main()
