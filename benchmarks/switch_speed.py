"""Step-time cost of main_dino's DINOv2-era switches, side by side in one process.

Times main_dino.training_step itself (forward, losses, backward, optimizer, EMA) on synthetic
crops for the v1 configuration and for each switch on its own, and prints the median seconds
per iteration and the ratio to v1. All configurations are built first and then step in turn,
one step each per round, so that drifts of a shared machine hit them alike. The distillation
teacher is a randomly initialised --teacher_arch written as a main_dino checkpoint; "fsdp"
shards over the processes of the run (one, without a launcher: the wrapping overhead alone).

Example (CPU): python -m benchmarks.switch_speed --arch vit_tiny --patch_size 16 --out_dim 4096 \
    --batch_size 16 --global_crops_size 96 --local_crops_size 48 --local_crops_number 4
Any other set of main_dino flags joins the comparison as a named configuration, e.g.
    --switches koleo --config "koleo+ibot=--koleo_loss_weight 0.1 --ibot_loss_weight 1"
"""
import argparse
import json
import os
import shlex
import statistics
import tempfile
import time
from typing import Dict, List, Tuple

import torch

import main_dino
import utils
from benchmarks import train_speed
from vision_transformer import DINOHead

SWITCHES = {
    "v1": [],
    "registers": ["--num_register_tokens", "4"],
    "koleo": ["--koleo_loss_weight", "0.1"],
    "ibot": ["--ibot_loss_weight", "1"],
    "ibot-shared-head": ["--ibot_loss_weight", "1", "--ibot_separate_head", "false"],
    "sinkhorn": ["--centering", "sinkhorn_knopp"],
    "dinov2-all": ["--num_register_tokens", "4", "--koleo_loss_weight", "0.1",
                   "--ibot_loss_weight", "1", "--centering", "sinkhorn_knopp"],
    "distill": ["--distill_from", "{teacher}"],  # the checkpoint written by write_teacher
    "fsdp": ["--sharding", "fsdp"],
}


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--out_dim", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=16, help="images per step")
    parser.add_argument("--global_crops_size", type=int, default=96)
    parser.add_argument("--local_crops_size", type=int, default=48)
    parser.add_argument("--local_crops_number", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--compile", default=False, type=utils.bool_flag)
    parser.add_argument("--teacher_arch", default="vit_small",
                        help="architecture of the distillation teacher")
    parser.add_argument("--switches", nargs="*", default=list(SWITCHES), choices=list(SWITCHES))
    parser.add_argument("--config", action="append", default=[], type=named_flags,
                        metavar="NAME=FLAGS",
                        help="another configuration to time: main_dino flags in one string "
                             "(repeatable)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per switch")
    parser.add_argument("--warmup_iters", type=int, default=2)
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args()
    if not args.switches and not args.config:
        parser.error("nothing to time: name --switches or add a --config")
    return args


def named_flags(text: str) -> Tuple[str, List[str]]:
    """"NAME=FLAGS" -> (NAME, FLAGS split as a shell would)."""
    name, separator, flags = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS, got {text!r}")
    return name, shlex.split(flags)


def switch_args(bench: argparse.Namespace, flags: List[str]) -> argparse.Namespace:
    """main_dino's flags for the benchmark's model and crops, then every flag the configuration
    names (even at main_dino's default value)."""
    settings = argparse.Namespace(**vars(bench), num_workers=0, data_path="", gpu_augment=False,
                                  canvas_size=256)
    config = bench.precision + ("+compile" if bench.compile else "")
    args = train_speed.main_dino_args(settings, config)
    parser = main_dino.get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # the namespace then holds only the flags given
    for name, value in vars(parser.parse_args(flags)).items():
        setattr(args, name, value)
    main_dino.check_switch_flags(args)
    return args


def write_teacher(bench: argparse.Namespace, folder: str) -> str:
    """A random --teacher_arch with its DINO head, in main_dino's checkpoint layout."""
    args = switch_args(argparse.Namespace(**{**vars(bench), "arch": bench.teacher_arch}), [])
    backbone, embed_dim = utils.build_backbone(args.arch, args.patch_size)
    network = utils.MultiCropWrapper(backbone, DINOHead(embed_dim, args.out_dim))
    path = os.path.join(folder, "teacher.pth")
    torch.save({"teacher": network.state_dict(), "args": args}, path)
    return path


def timed_step(training: main_dino.DinoTraining, crops: List[torch.Tensor], it: int,
               device: torch.device) -> float:
    """Seconds of one training step, the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    main_dino.set_schedules(training.optimizer, training.schedules, it)
    float(main_dino.training_step(training, [crops], 0, it)["loss"])  # waits for the device
    return time.perf_counter() - start


def main() -> None:
    bench = get_args()
    init_args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(init_args)
    device = utils.device_of(init_args)
    total = bench.warmup_iters + bench.iters
    with tempfile.TemporaryDirectory() as folder:
        teacher = write_teacher(bench, folder) if "distill" in bench.switches else ""
        configs = {**{name: SWITCHES[name] for name in bench.switches}, **dict(bench.config)}
        trainings = {name: main_dino.build_training(
            switch_args(bench, [flag.format(teacher=teacher) for flag in flags]),
            device, iters_per_epoch=total) for name, flags in configs.items()}
    sizes = [bench.global_crops_size] * 2 + [bench.local_crops_size] * bench.local_crops_number
    crops = [torch.randn(bench.batch_size, 3, size, size, device=device) for size in sizes]
    steps: Dict[str, List[float]] = {name: [] for name in trainings}
    for it in range(total):
        for name, training in trainings.items():
            step = timed_step(training, crops, it, device)
            if it >= bench.warmup_iters:
                steps[name].append(step)
    seconds = {name: statistics.median(times) for name, times in steps.items()}
    base = "v1" if "v1" in seconds else next(iter(seconds))
    name_width, ratio_width = max(18, 2 + max(map(len, seconds))), max(7, len(base) + 3)
    print(f"{'switch':<{name_width}}{'s/iter':>9}{'img/s':>9}{'x ' + base:>{ratio_width}}")
    for name, step in seconds.items():
        print(f"{name:<{name_width}}{step:>9.3f}{bench.batch_size / step:>9.1f}"
              f"{step / seconds[base]:>{ratio_width}.2f}")
    if bench.json:
        with open(bench.json, "w") as out:
            json.dump({"device": str(device), "torch": torch.__version__,
                       "settings": vars(bench), "seconds_per_iter": seconds}, out, indent=2)
    utils.cleanup_distributed()


if __name__ == "__main__":
    main()
