"""DINO self-supervised pretraining: a student ViT matches an EMA teacher on multi-crop views.

Reads top-down: the command line, the run (`train_dino`), one epoch, one training step and its
pieces, the DINO loss, the models and their optimisation, and the data. The DINOv2-era switches,
all off by default, live in their own modules: dino_objectives.py (KoLeo, iBOT, Sinkhorn-Knopp),
dino_distillation.py (--distill_from) and dino_sharding.py (--sharding fsdp).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import (Callable, ContextManager, Dict, Iterable, List, NamedTuple, Optional,
                    Sequence, Tuple, Union)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

import dino_checkpoint
import dino_distillation
import dino_objectives
import dino_sharding
import dino_small_data
import eval_knn
import gpu_augment
import plot_log
import utils
from vision_transformer import DINOHead

PRINT_FREQ = 10


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO", add_help=False)

    # Model
    parser.add_argument("--arch", default="vit_small", type=utils.canonical_arch,
                        choices=utils.arch_choices(),
                        help="Name of architecture to train. For quick experiments with ViTs, "
                             "we recommend using vit_tiny or vit_small.")
    parser.add_argument("--patch_size", default=16, type=int,
                        help="Size in pixels of input square patches - default 16 (for 16x16 "
                             "patches). Using smaller values leads to better performance but "
                             "requires more memory. Applies only for ViTs. If <16, we recommend "
                             "disabling mixed precision training (--use_fp16 false).")
    parser.add_argument("--out_dim", default=65536, type=int,
                        help="Dimensionality of the DINO head output. For complex and large "
                             "datasets large values (like 65k) work well.")
    parser.add_argument("--head_hidden_dim", default=2048, type=int,
                        help="Width of the DINO (and iBOT) head's hidden layers (default 2048, "
                             "the reference's; DINOv2's head_hidden_dim). A narrower head costs "
                             "less where the backbone is small (README, \"Learning quality\").")
    parser.add_argument("--norm_last_layer", default=True, type=utils.bool_flag,
                        help="Whether or not to weight normalize the last layer of the DINO head. "
                             "Not normalizing leads to better performance but can make the "
                             "training unstable. We typically set this to False with vit_small "
                             "and True with vit_base.")
    parser.add_argument("--momentum_teacher", default=0.996, type=float,
                        help="Base EMA parameter for teacher update. The value is increased to 1 "
                             "during training with cosine schedule. We recommend setting a higher "
                             "value with small batches: for example use 0.9995 with batch size "
                             "of 256.")
    parser.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag,
                        help="Whether to use batch normalizations in projection head (Default: "
                             "False)")
    parser.add_argument("--num_register_tokens", default=0, type=int,
                        help="Learned register tokens after [CLS] (Darcet et al. 2023; DINOv2 "
                             "uses 4). ViTs only; 0 (default) keeps the reference's network.")

    # Temperature teacher parameters
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                        help="Initial value for the teacher temperature: 0.04 works well in most "
                             "cases. Try decreasing it if the training loss does not decrease.")
    parser.add_argument("--teacher_temp", default=0.04, type=float,
                        help="Final value (after linear warmup) of the teacher temperature. For "
                             "most experiments, anything above 0.07 is unstable. We recommend "
                             "starting with the default value of 0.04 and increase this slightly "
                             "if needed.")
    parser.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                        help="Number of warmup epochs for the teacher temperature (Default: 0).")

    # Training/Optimization parameters
    parser.add_argument("--use_fp16", type=utils.bool_flag, default=True,
                        help="Whether or not to use half precision (fp16 autocast and a "
                             "GradScaler) for training. Improves training time and memory "
                             "requirements, but can provoke instability and slight decay of "
                             "performance. We recommend disabling mixed precision if the loss is "
                             "unstable, if reducing the patch size or if training with bigger "
                             "ViTs. Needs CUDA: ignored on the CPU.")
    parser.add_argument("--use_bf16", type=utils.bool_flag, default=False,
                        help="Use bfloat16 autocast instead (no GradScaler needed); takes "
                             "precedence over --use_fp16. Softmax, loss and center stay float32.")
    parser.add_argument("--compile", type=utils.bool_flag, default=None,
                        help="torch.compile the backbones and heads (default: on with CUDA, off "
                             "on the CPU). Same results up to float rounding.")
    parser.add_argument("--compile_scope", default="modules", choices=["modules", "step"],
                        help="With --compile: compile the backbones and heads one by one "
                             "(modules), or the teacher and student forward passes and the loss "
                             "as one graph with its backward (step).")
    parser.add_argument("--compile_mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode with --compile; reduce-overhead replays CUDA "
                             "graphs (fewer kernel launches; static shapes, more memory).")
    parser.add_argument("--packed_forward", type=utils.bool_flag, default=False,
                        help="One ViT pass for the global and local crops together: token-wise "
                             "layers on all tokens at once, attention per resolution. Same "
                             "outputs up to float rounding, but drop-path draws differ.")
    parser.add_argument("--efficient_drop_path", type=utils.bool_flag, default=False,
                        help="Stochastic depth that runs each residual branch only on the images "
                             "it keeps (a fixed number per batch, rescaled to the same expected "
                             "update) instead of computing and masking; ViTs only. Draws differ "
                             "from the reference's.")
    parser.add_argument("--weight_decay", type=float, default=0.04,
                        help="Initial value of the weight decay. With ViT, a smaller value at the "
                             "beginning of training works well.")
    parser.add_argument("--weight_decay_end", type=float, default=0.4,
                        help="Final value of the weight decay. We use a cosine schedule for WD "
                             "and using a larger decay by the end of training improves "
                             "performance for ViTs.")
    parser.add_argument("--clip_grad", type=float, default=3.0,
                        help="Maximal parameter gradient norm if using gradient clipping. "
                             "Clipping with norm .3 ~ 1.0 can help optimization for larger ViT "
                             "architectures. 0 for disabling.")
    parser.add_argument("--batch_size_per_gpu", default=64, type=int,
                        help="Per-GPU batch-size : number of distinct images loaded on one GPU. "
                             "With --grad_accum_steps K, the size of each of the K "
                             "micro-batches (one forward and backward).")
    parser.add_argument("--grad_accum_steps", default=1, type=int,
                        help="Micro-batches per optimizer step: gradients are summed over K "
                             "batches of --batch_size_per_gpu, and the step, teacher EMA, center "
                             "update and schedules happen once per K, as with one batch K times "
                             "larger (also for the --lr scaling). Models with batch norm see "
                             "statistics of each micro-batch, not of the whole step.")
    parser.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    parser.add_argument("--freeze_last_layer", default=1, type=int,
                        help="Number of epochs during which we keep the output layer fixed. "
                             "Typically doing so during the first epoch helps training. Try "
                             "increasing this value if the loss does not decrease.")
    parser.add_argument("--lr", default=0.0005, type=float,
                        help="Learning rate at the end of linear warmup (highest LR used during "
                             "training). The learning rate is linearly scaled with the batch "
                             "size, and specified here for a reference batch size of 256.")
    parser.add_argument("--warmup_epochs", default=10, type=int,
                        help="Number of epochs for the linear learning-rate warm up.")
    parser.add_argument("--min_lr", type=float, default=1e-6,
                        help="Target LR at the end of optimization. We use a cosine LR schedule "
                             "with linear warmup.")
    parser.add_argument("--optimizer", default="adamw", type=str,
                        choices=["adamw", "sgd", "lars"],
                        help="Type of optimizer. We recommend using adamw with ViTs.")
    parser.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth rate")

    # Multi-crop parameters
    parser.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.),
                        help="Scale range of the cropped image before resizing, relatively to "
                             "the origin image. Used for large global view cropping. When "
                             "disabling multi-crop (--local_crops_number 0), we recommand using a "
                             "wider range of scale (\"--global_crops_scale 0.14 1.\" for example)")
    parser.add_argument("--local_crops_number", type=int, default=8,
                        help="Number of small local views to generate. Set this parameter to 0 "
                             "to disable multi-crop training. When disabling multi-crop we "
                             "recommend to use \"--global_crops_scale 0.14 1.\" ")
    parser.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4),
                        help="Scale range of the cropped image before resizing, relatively to "
                             "the origin image. Used for small local view cropping of multi-crop.")
    parser.add_argument("--global_crops_size", type=int, default=224,
                        help="Side in pixels of the global crops (224 as the reference; lower it "
                             "for small images).")
    parser.add_argument("--local_crops_size", type=int, default=96,
                        help="Side in pixels of the local crops (96 as the reference).")
    gpu_augment.add_gpu_augment_args(parser)

    # DINOv2-era switches, all off by default (DINO v1)
    dino_objectives.add_objective_args(parser)
    dino_distillation.add_distillation_args(parser)
    dino_sharding.add_sharding_args(parser)
    dino_small_data.add_small_data_args(parser)

    # Misc
    parser.add_argument("--data_path", default="/path/to/imagenet/train/", type=str,
                        help="Folder of training images: an ImageFolder (class sub-folders, "
                             "labels ignored) or any folder of images, searched recursively.")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="Path to save logs and checkpoints.")
    parser.add_argument("--saveckp_freq", default=20, type=int,
                        help="Save checkpoint every x epochs.")
    parser.add_argument("--saveckp_iters", default=0, type=int,
                        help="Also write checkpoint.pth every N iterations (0: only after each "
                             "epoch), with what a resumed run needs to continue the epoch "
                             "exactly where it stopped.")
    parser.add_argument("--init_from", default="", type=str,
                        help="Start a new run (epoch 0, fresh optimizer and schedules) from these "
                             "weights: a main_dino checkpoint (student, teacher and heads), a "
                             "reference release or any backbone state_dict (fresh heads). "
                             "Ignored when --output_dir already holds checkpoint.pth.")
    parser.add_argument("--freeze_backbone_epochs", default=0, type=int,
                        help="Train only the heads for this many first epochs (e.g. fresh heads "
                             "on an --init_from backbone).")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--num_workers", default=10, type=int,
                        help="Number of data loading workers per GPU.")

    # Monitoring
    parser.add_argument("--knn_data_path", default="", type=str,
                        help="Folder with train/ and val/ class sub-folders: every --knn_freq "
                             "epochs and at the last one, log the teacher's weighted 20-NN top-1 "
                             "on val/ against train/ (knn_top1 in log.txt), images resized to "
                             "--global_crops_size. Off when empty.")
    parser.add_argument("--knn_freq", default=1, type=int,
                        help="Epochs between two k-NN evaluations (with --knn_data_path).")
    parser.add_argument("--tensorboard_dir", default="", type=str,
                        help="Also write the per-epoch scalars of log.txt to TensorBoard event "
                             "files in this folder (needs the tensorboard package).")
    utils.add_distributed_args(parser)
    parser.add_argument("--dist_timeout_minutes", default=10.0, type=float,
                        help="How long a process waits for the others (at a collective) before "
                             "it stops with an error: a frozen or dead process ends the run.")
    return parser


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> None:
    if args.small_data:
        dino_small_data.apply_small_data_preset(args, get_args_parser(),
                                                utils.launched_world_size())
    check_flags(args)
    dino_checkpoint.prepare_output_dir(args.output_dir)
    try:
        train_dino(args)
    except NonFiniteLossError as error:
        print(str(error), force=True)
        exit_cleanly(1)
    except dino_checkpoint.TrainingStopped as stopped:
        print(str(stopped))
        stopped.pass_on()
        exit_cleanly(stopped.exit_status)
    except RuntimeError as error:
        message = dino_checkpoint.lost_process_message(error, args.dist_timeout_minutes)
        if message is None:
            raise
        print(message, force=True)
        exit_cleanly(1)


def exit_cleanly(status: int) -> None:
    utils.cleanup_distributed()
    sys.exit(status)


# Flags that must be positive, or at least 0, for a run to make sense.
POSITIVE_FLAGS = ("lr", "batch_size_per_gpu", "grad_accum_steps", "out_dim", "head_hidden_dim",
                  "patch_size", "global_crops_size", "local_crops_size", "teacher_temp",
                  "warmup_teacher_temp", "dist_timeout_minutes")
NON_NEGATIVE_FLAGS = ("min_lr", "weight_decay", "weight_decay_end", "clip_grad", "drop_path_rate",
                      "warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer",
                      "freeze_backbone_epochs", "local_crops_number", "num_workers",
                      "saveckp_freq", "saveckp_iters", "num_register_tokens",
                      "koleo_loss_weight", "ibot_loss_weight", "distill_head_warmup_epochs")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse, in one line, flags that cannot give a sensible run, before anything is built."""
    check_schedule_flags(args)
    for name in POSITIVE_FLAGS:
        if not getattr(args, name) > 0:  # also refuses NaN
            raise utils.InputError(f"--{name} must be positive (got {getattr(args, name)})")
    for name in NON_NEGATIVE_FLAGS:
        if not getattr(args, name) >= 0:
            raise utils.InputError(f"--{name} must be 0 or more (got {getattr(args, name)})")
    if args.init_from and not os.path.isfile(args.init_from):
        raise utils.InputError(f"--init_from {args.init_from!r} is not a file")
    if args.compile is not False and args.compile_scope == "step" and args.grad_accum_steps > 1:
        # The compiled step would hold the center's running sum across its CUDA graphs.
        raise utils.InputError("--compile_scope step does not combine with --grad_accum_steps > 1:"
                               " use --compile_scope modules")
    check_switch_flags(args)
    warn_on_dropped_pixels(args)


def check_schedule_flags(args: argparse.Namespace) -> None:
    """The warm-ups must fit in the run (the reference fails with a bare assertion or a numpy
    error)."""
    if args.epochs < 1:
        raise utils.InputError(f"--epochs must be at least 1 (got {args.epochs})")
    if args.warmup_epochs > args.epochs:
        raise utils.InputError(f"--warmup_epochs ({args.warmup_epochs}) is longer than --epochs "
                               f"({args.epochs}): lower --warmup_epochs")
    if args.warmup_teacher_temp_epochs > args.epochs:
        # The reference fails later, building the schedule with np.ones(negative).
        raise utils.InputError(f"--warmup_teacher_temp_epochs ({args.warmup_teacher_temp_epochs}) "
                               f"is longer than --epochs ({args.epochs}): lower it")
    if args.knn_freq < 1:
        raise utils.InputError(f"--knn_freq must be at least 1 (got {args.knn_freq})")


def warn_on_dropped_pixels(args: argparse.Namespace) -> None:
    """A ViT's patch embedding ignores the pixels past the last whole patch: say how many."""
    if args.arch not in utils.VIT_ARCHS:
        return
    crops = [("global", args.global_crops_size)]
    crops += [("local", args.local_crops_size)] if args.local_crops_number > 0 else []
    for kind, size in crops:
        dropped = size % args.patch_size
        if dropped:
            used = size - dropped
            print(f"Warning: --{kind}_crops_size {size} is not a multiple of --patch_size "
                  f"{args.patch_size}: the ViT ignores the last {dropped} rows and columns of "
                  f"pixels of every {kind} crop (use {used} or {used + args.patch_size}).")


def check_switch_flags(args: argparse.Namespace) -> None:
    """The DINOv2-era switches must fit the architecture and each other."""
    if args.num_register_tokens and args.arch not in utils.VIT_ARCHS:
        raise utils.InputError(f"--num_register_tokens needs a ViT, not {args.arch}")
    dino_objectives.check_objective_args(args)
    dino_sharding.check_sharding_args(args)
    switched = dino_objectives.uses_objectives(args) or args.sharding != "none"
    if args.compile is not False and args.compile_scope == "step" and switched:
        raise utils.InputError("--compile_scope step compiles the v1 DINO step only: use "
                               "--compile_scope modules with KoLeo, iBOT, distillation or FSDP")


def train_dino(args: argparse.Namespace) -> None:
    utils.init_distributed_mode(args, args.dist_timeout_minutes)
    utils.fix_random_seeds(args.seed)
    utils.print_run_header(args)
    device = utils.device_of(args)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.gpu_augment and device.type == "cpu":
        print("Note: --gpu_augment is slower than the PIL workers on the CPU; it pays off on GPUs.")
    torch.backends.cudnn.benchmark = True

    data_loader = build_data_loader(args)
    # Checked at start-up: a bad k-NN folder or a missing package fails now, not after an epoch.
    knn_monitor = eval_knn.KnnMonitor(args.knn_data_path, args.global_crops_size, args) \
        if args.knn_data_path else None
    tensorboard = plot_log.open_tensorboard(args.tensorboard_dir) if args.tensorboard_dir \
        else None
    prepare_crops = CropPreparer(args, device)
    training = build_training(args, device, len(data_loader) // args.grad_accum_steps)

    dino_checkpoint.remove_stale_temporaries(args.output_dir)
    layout = dino_checkpoint.data_layout(len(data_loader.dataset),
                                         data_loader.sampler.samples_per_step)
    start = resume_or_initialise(args, training, layout)
    log_path = os.path.join(args.output_dir, "log.txt")
    utils.truncate_json_log(log_path, start.epoch)

    start_time = time.time()
    print("Starting DINO training !")
    stop_signals = dino_checkpoint.StopSignals(args.dist_timeout_minutes).install()
    checkpoints = dino_checkpoint.Checkpoints(
        args.output_dir, args.saveckp_freq, args.saveckp_iters,
        lambda resume_epoch: checkpoint_state(training, resume_epoch, args), layout, stop_signals)
    for epoch in range(start.epoch, args.epochs):
        progress = start.progress if epoch == start.epoch else None
        begin_epoch(epoch, progress, args, data_loader, prepare_crops)
        stats = train_one_epoch(training, data_loader, prepare_crops, epoch, progress, checkpoints)
        if stats["skipped_images"]:
            print(f"Warning: {stats['skipped_images']} unreadable images were skipped in epoch "
                  f"{epoch}.")
        warn_on_collapse(stats, args.out_dim)
        record = epoch_log_record(stats, epoch)
        if knn_monitor is not None and knn_due(epoch, args.knn_freq, args.epochs):
            record["knn_top1"] = teacher_knn_top1(knn_monitor, training, device)
        # The log line goes first: a resumed run drops lines of epochs it redoes.
        utils.append_json_line(log_path, record)
        if utils.is_main_process():
            plot_log.save_curves(log_path, os.path.join(args.output_dir, "curves.png"),
                                 args.out_dim)
            plot_log.write_tensorboard(tensorboard, record)
        checkpoints.save_epoch_end(epoch)
    stop_signals.uninstall()
    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")


def resume_or_initialise(args: argparse.Namespace, training: DinoTraining,
                         layout: dict) -> dino_checkpoint.ResumePoint:
    """Resume --output_dir's checkpoint.pth if there is one; otherwise start at epoch 0, from
    --init_from's weights if given."""
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    if os.path.isfile(checkpoint_path):
        if args.init_from:
            print(f"Note: resuming {checkpoint_path}; --init_from only applies to a new run.")
        return dino_checkpoint.resume(checkpoint_path, args, layout, **training.checkpointed)
    if args.init_from:
        heads_loaded = dino_checkpoint.initialise_from(
            args.init_from, training.student.module, training.teacher_without_ddp,
            training.dino_loss.center)
        if not heads_loaded and not args.freeze_backbone_epochs:
            print("Note: with fresh heads, --freeze_backbone_epochs N trains them alone for the "
                  "first N epochs, so that their random gradients do not disturb the backbone.")
    return dino_checkpoint.ResumePoint()


def begin_epoch(epoch: int, progress: Optional[dino_checkpoint.EpochProgress],
                args: argparse.Namespace, data_loader: torch.utils.data.DataLoader,
                prepare_crops: CropPreparer) -> None:
    """Point the random streams, the sampler and the crop preparer at the start of `epoch`, or
    at the iteration where a mid-epoch checkpoint left it."""
    iteration = progress.iteration if progress else 0
    if progress:
        dino_checkpoint.restore_random_states(progress.random_states)
    else:
        dino_checkpoint.seed_epoch(args.seed, epoch)
    data_loader.sampler.set_epoch(epoch, iteration * data_loader.sampler.samples_per_step)
    prepare_crops.set_epoch(epoch, iteration * args.grad_accum_steps)


def epoch_log_record(stats: Dict[str, float], epoch: int) -> dict:
    """The reference keys first (train_loss, train_lr, train_wd, epoch), then our diagnostics."""
    reference_names = ("loss", "lr", "wd")
    record = {f"train_{name}": stats[name] for name in reference_names}
    record["epoch"] = epoch
    record.update({f"train_{name}": value for name, value in stats.items()
                   if name not in reference_names})
    return record


def knn_due(epoch: int, knn_freq: int, epochs: int) -> bool:
    """After every knn_freq-th epoch (counting from 1) and after the last one."""
    return (epoch + 1) % knn_freq == 0 or epoch + 1 == epochs


def teacher_knn_top1(knn_monitor: eval_knn.KnnMonitor, training: DinoTraining,
                     device: torch.device) -> Optional[float]:
    """The teacher backbone's k-NN top-1 (rank 0; None elsewhere), printed with its cost."""
    start = time.time()
    top1 = knn_monitor.top1(training.teacher_without_ddp.backbone, device, training.autocast)
    if top1 is not None:
        print(f"k-NN: the teacher's weighted {knn_monitor.k}-NN top-1 is {top1:.2f}% "
              f"({time.time() - start:.1f} s)")
    return top1


def checkpoint_state(training: DinoTraining, resume_epoch: int, args: argparse.Namespace) -> dict:
    """The reference's checkpoint layout (student keys keep DDP's `module.` prefix): student,
    teacher, optimizer, epoch, args, dino_loss, then fp16_scaler and the switches' states;
    "epoch" is the epoch a resumed run starts with (the next one, or the one in progress
    mid-epoch)."""
    objects = dict(training.checkpointed)
    state = {name: objects.pop(name).state_dict() for name in ("student", "teacher", "optimizer")}
    state.update(epoch=resume_epoch, args=args)
    state.update({name: value.state_dict() for name, value in objects.items()})
    return state


def warn_on_collapse(stats: Dict[str, float], out_dim: int) -> None:
    """Point at the usual remedies when the loss or the teacher outputs show collapse."""
    uniform_loss = math.log(out_dim)
    # With KoLeo or iBOT terms, "loss" is their weighted sum and "dino_loss" the DINO part.
    dino_loss = stats.get("dino_loss", stats["loss"])
    if abs(dino_loss - uniform_loss) < 0.01 * uniform_loss:
        print(f"Warning: the loss {dino_loss:.4f} sits at ln(out_dim) = {uniform_loss:.4f}: "
              "the student's outputs are near uniform (collapse?). Try a lower --teacher_temp, "
              "a higher --momentum_teacher or a lower --lr.")
    # Entropy of the batch-mean teacher distribution: ln(number of prototypes in use).
    batch_mean_entropy = uniform_loss - stats["teacher_kl"]
    if batch_mean_entropy - stats["teacher_entropy"] < 0.01:
        print(f"Warning: every teacher output is the same distribution (entropy "
              f"{stats['teacher_entropy']:.3f}, KL to uniform {stats['teacher_kl']:.3f}): the "
              "training has collapsed. Try a lower --teacher_temp or a larger batch.")
    elif batch_mean_entropy < math.log(2):
        print(f"Warning: the teacher puts the whole batch on about "
              f"{math.exp(batch_mean_entropy):.1f} of {out_dim} prototypes (KL to uniform "
              f"{stats['teacher_kl']:.3f}): the training is collapsing onto one dimension. "
              "Try a higher --teacher_temp or a lower --lr.")


# ------------------------------------------------------------------------------------------------
# One epoch
# ------------------------------------------------------------------------------------------------

class PendingStats(NamedTuple):
    """One iteration's numbers, kept on the device until the next progress line."""
    step: int
    lr: float
    wd: float
    values: Dict[str, torch.Tensor]  # scalar tensors: "loss", "teacher_entropy", ...


def train_one_epoch(training: DinoTraining, data_loader: torch.utils.data.DataLoader,
                    prepare_crops: CropPreparer, epoch: int,
                    progress: Optional[dino_checkpoint.EpochProgress] = None,
                    checkpoints: Optional[dino_checkpoint.Checkpoints] = None) -> Dict[str, float]:
    """Train on the epoch's steps (those after `progress`, for a resumed mid-epoch checkpoint;
    `checkpoints` writes one when due); the epoch's averaged stats over all ranks."""
    progress = progress or dino_checkpoint.EpochProgress()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.restore_running_sums(progress.meters)
    header = f"Epoch: [{epoch}/{training.epochs}]"
    pending: List[PendingStats] = []
    skipped = progress.skipped_images
    last_step = training.iters_per_epoch - 1
    steps = utils.StepBatches(data_loader, training.grad_accum_steps)
    for step, micro_batches in enumerate(
            metric_logger.log_every(steps, PRINT_FREQ, header, first=progress.iteration),
            start=progress.iteration):
        it = training.iters_per_epoch * epoch + step
        lr, wd = set_schedules(training.optimizer, training.schedules, it)
        crops = (prepare_crops(batch) for batch, _ in micro_batches)
        pending.append(PendingStats(step, lr, wd, training_step(training, crops, epoch, it)))
        skipped += sum(int(skipped_in_batch.sum()) for _, skipped_in_batch in micro_batches)
        if step % PRINT_FREQ == 0 or step in (progress.iteration, last_step):
            record_pending(metric_logger, pending, epoch)  # log_every prints these steps
        if checkpoints is not None and step < last_step and checkpoints.due(it):
            record_pending(metric_logger, pending, epoch)
            checkpoints.save_mid_epoch(epoch, dino_checkpoint.EpochProgress(
                step + 1, metric_logger.running_sums(), skipped))
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    stats["skipped_images"] = int(utils.all_reduce_sum([skipped])[0])
    return stats


def record_pending(metric_logger: utils.MetricLogger, pending: List[PendingStats],
                   epoch: int) -> None:
    """Read back the queued per-iteration stats in one host sync and feed the meters."""
    if not pending:
        return
    names = list(pending[0].values)
    rows = torch.stack([torch.stack([stats.values[name] for name in names])
                        for stats in pending]).tolist()
    for stats, row in zip(pending, rows):
        values = dict(zip(names, row))
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(values["loss"], epoch, stats.step)
        # The reference's progress line starts with loss, lr, wd.
        metric_logger.update(loss=values.pop("loss"), lr=stats.lr, wd=stats.wd, **values)
    pending.clear()


class NonFiniteLossError(RuntimeError):
    def __init__(self, value: float, epoch: int, step: int):
        super().__init__(f"Loss is {value} at epoch {epoch}, iteration {step}, stopping training "
                         "(the last checkpoint.pth is intact; try float32 with --use_fp16 false "
                         "--use_bf16 false, or a lower --lr)")


# ------------------------------------------------------------------------------------------------
# One training step
# ------------------------------------------------------------------------------------------------

@dataclass
class DinoTraining:
    """Everything a training step touches, built once per run by `build_training`."""
    student: nn.Module              # DDP-wrapped MultiCropWrapper
    teacher: nn.Module              # MultiCropWrapper (DDP-wrapped only with batch norms)
    teacher_without_ddp: nn.Module
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    fp16_scaler: Optional[torch.amp.GradScaler]
    autocast: ContextManager
    schedules: Dict[str, np.ndarray]  # per-iteration "lr", "wd" and teacher "momentum"
    forward_loss: Callable            # `forward_loss`, or its compiled graph
    student_params: List[torch.Tensor]  # with --sharding fsdp: this rank's shards
    teacher_params: List[torch.Tensor]
    clip_grad: float
    freeze_last_layer: int
    epochs: int
    iters_per_epoch: int
    grad_accum_steps: int           # micro-batches per optimizer step
    freeze_backbone_epochs: int
    # What the checkpoint holds, by key: objects with state_dict() and load_state_dict().
    checkpointed: Dict[str, object]
    # KoLeo / iBOT terms (also set with distillation); None: the DINO loss alone, as v1.
    objectives: Optional[dino_objectives.Objectives] = None
    # The frozen teacher of --distill_from, whose outputs replace the EMA teacher's as targets.
    distillation: Optional[dino_distillation.Distillation] = None


def build_training(args: argparse.Namespace, device: torch.device,
                   iters_per_epoch: int) -> DinoTraining:
    """Student, teacher, loss, optimizer, precision and schedules from main_dino's flags."""
    student, teacher, teacher_without_ddp = build_student_teacher(args, device)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs,
                         micro_batches=args.grad_accum_steps, centering=args.centering).to(device)
    optimizer = build_optimizer(args, student, device)
    # Sharded networks compute in FSDP's parameter dtype instead of under autocast.
    dtype = autocast_dtype(args, device) if args.sharding == "none" else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    fp16_scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    schedules = build_schedules(args, iters_per_epoch)
    step_forward = compiled_forward_loss(args.compile_mode) \
        if args.compile and args.compile_scope == "step" else forward_loss
    objectives = dino_objectives.build_objectives(args, device) \
        if dino_objectives.uses_objectives(args) else None
    distillation = dino_distillation.build_distillation(args, device) \
        if args.distill_from else None
    checkpointed = checkpointed_objects(args, student, teacher, optimizer, dino_loss,
                                        fp16_scaler, objectives, distillation)
    print("Loss, optimizer and schedulers ready.")
    return DinoTraining(student, teacher, teacher_without_ddp, dino_loss, optimizer, fp16_scaler,
                        autocast, schedules, step_forward,
                        dino_sharding.local_tensors(list(student.module.parameters())),
                        dino_sharding.local_tensors(list(teacher_without_ddp.parameters())),
                        args.clip_grad, args.freeze_last_layer, args.epochs, iters_per_epoch,
                        args.grad_accum_steps, args.freeze_backbone_epochs, checkpointed,
                        objectives, distillation)


def checkpointed_objects(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
                         optimizer: torch.optim.Optimizer, dino_loss: DINOLoss,
                         fp16_scaler: Optional[torch.amp.GradScaler],
                         objectives: Optional[dino_objectives.Objectives],
                         distillation: Optional[dino_distillation.Distillation]) -> dict:
    """The reference's checkpoint entries, then those of the switches that are on."""
    sharded = args.sharding == "fsdp"
    objects = {"student": student, "teacher": teacher,
               "optimizer": dino_sharding.ShardedOptimizerState(optimizer) if sharded
               else optimizer, "dino_loss": dino_loss}
    if fp16_scaler is not None:
        objects["fp16_scaler"] = fp16_scaler
    if objectives is not None and objectives.ibot_loss is not None:
        objects["ibot_loss"] = objectives.ibot_loss
    if distillation is not None and distillation.warmup_epochs:
        objects["distillation"] = distillation
    return objects


def training_step(training: DinoTraining, micro_batches: Iterable[List[torch.Tensor]],
                  epoch: int, it: int) -> Dict[str, torch.Tensor]:
    """Forward and backward on each micro-batch's crops (one without --grad_accum_steps), then
    one clipped optimizer step and teacher EMA at global iteration `it`.

    The gradients add up to those of the whole step's mean loss, and DDP all-reduces them with
    the last micro-batch only; the DINO loss moves its center once, by the step's mean. Returns
    the step's scalars (loss, teacher entropy and KL to uniform, and the switches' losses: means
    over the micro-batches) on the device, without a host sync.
    """
    accumulation = training.grad_accum_steps
    sums: Dict[str, torch.Tensor] = {}
    for index, crops in enumerate(micro_batches):
        last = index == accumulation - 1
        with nullcontext() if last else training.student.no_sync():
            loss, values = forward_losses(training, crops, epoch, it * accumulation + index)
            backward(loss / accumulation, training.optimizer, training.fp16_scaler,
                     accumulate=index > 0)
        sums = {name: sums[name] + value if sums else value for name, value in values.items()}
    clip_and_step(training.student, training.optimizer, training.fp16_scaler, epoch,
                  training.clip_grad, training.freeze_last_layer, training.freeze_backbone_epochs)
    update_teacher(training.student_params, training.teacher_params,
                   float(training.schedules["momentum"][it]))
    # New tensors: CUDA-graph outputs are overwritten by the next step, and these are read 10
    # steps on.
    return {name: total / accumulation for name, total in sums.items()}


def set_schedules(optimizer: torch.optim.Optimizer, schedules: Dict[str, np.ndarray],
                  it: int) -> Tuple[float, float]:
    """Set lr on every group and wd on group 0 only (group 1 is never decayed)."""
    lr, wd = float(schedules["lr"][it]), float(schedules["wd"][it])
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = wd
    return lr, wd


def forward_loss(student: nn.Module, teacher: nn.Module, dino_loss: DINOLoss,
                 crops: List[torch.Tensor], epoch: int,
                 autocast: ContextManager) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher on the global crops, student on all crops; (loss, teacher diagnostics)."""
    return forward_loss_at(student, teacher, dino_loss, crops, dino_loss.teacher_temps[epoch],
                           autocast)


def forward_loss_at(student: nn.Module, teacher: nn.Module, dino_loss: DINOLoss,
                    crops: List[torch.Tensor], teacher_temp: torch.Tensor,
                    autocast: ContextManager) -> Tuple[torch.Tensor, torch.Tensor]:
    """`forward_loss` at a given teacher temperature (0-d tensor)."""
    with autocast:
        teacher_output = teacher(crops[:2])
        student_output = student(crops)
        return dino_loss(student_output, teacher_output, None, return_diagnostics=True,
                         teacher_temp=teacher_temp)


def compiled_forward_loss(mode: str) -> Callable:
    """`forward_loss` as one compiled graph (teacher, student, loss; AOTAutograd compiles its
    backward too). The epoch enters as a temperature tensor, so epochs do not recompile."""
    compiled = torch.compile(forward_loss_at, dynamic=False, mode=mode)

    def run(student, teacher, dino_loss, crops, epoch, autocast):
        torch.compiler.cudagraph_mark_step_begin()  # a new training step (for CUDA graphs)
        return compiled(student, teacher, dino_loss, crops, dino_loss.teacher_temps[epoch],
                        autocast)
    return run


def forward_losses(training: DinoTraining, crops: List[torch.Tensor], epoch: int,
                   draw: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One micro-batch's loss to minimise and named scalars: the DINO loss (v1), or with the
    DINOv2-era switches that and their terms; `draw` numbers the micro-batch (iBOT's masks)."""
    if training.objectives is not None:
        return forward_dinov2_losses(training, crops, epoch, draw)
    loss, diagnostics = training.forward_loss(training.student, training.teacher,
                                              training.dino_loss, crops, epoch, training.autocast)
    return loss, {"loss": loss.detach(),
                  **dict(zip(training.dino_loss.diagnostic_names, diagnostics))}


def forward_dinov2_losses(training: DinoTraining, crops: List[torch.Tensor], epoch: int,
                          draw: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The DINO loss plus the KoLeo and iBOT terms that are on, against the EMA teacher or the
    distillation teacher; (the loss to minimise, the named scalars).

    With iBOT, the student's global crops are masked and the teacher reads the same crops
    intact. A distillation teacher whose head is still being fitted takes its own step here.
    """
    objectives = training.objectives
    patch_masks = objectives.sample_masks(crops[0], draw)
    teacher_temp = float(training.dino_loss.teacher_temp_schedule[epoch])
    with training.autocast:
        if training.distillation is None:
            teacher_output = training.teacher(crops[:2], patch_masks, mask_inputs=False)
        else:
            teacher_output = training.distillation.targets(crops[:2], patch_masks)
        student_output = training.student(crops, patch_masks)
    dino_loss, diagnostics = training.dino_loss(student_output.dino, teacher_output.dino, epoch,
                                                return_diagnostics=True)
    loss = dino_loss
    values = {"dino_loss": dino_loss.detach()}
    if objectives.koleo_loss_weight:
        koleo_loss = dino_objectives.koleo_loss_per_view(student_output.global_cls)
        loss = loss + objectives.koleo_loss_weight * koleo_loss
        values["koleo_loss"] = koleo_loss.detach()
    if objectives.ibot_loss is not None:
        ibot_loss = objectives.ibot_loss(student_output.ibot, teacher_output.ibot, patch_masks,
                                         teacher_temp)
        loss = loss + objectives.ibot_loss_weight * ibot_loss
        values["ibot_loss"] = ibot_loss.detach()
    if training.distillation is not None and training.distillation.warming_up(epoch):
        values["head_warmup_loss"] = training.distillation.warm_up_head(
            teacher_output.global_cls, teacher_temp)
    return loss, {"loss": loss.detach(), **values, "teacher_entropy": diagnostics[0],
                  "teacher_kl": diagnostics[1]}


def backward(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
             fp16_scaler: Optional[torch.amp.GradScaler], accumulate: bool = False) -> None:
    """Gradients of `loss`, replacing the previous ones (or added to them, to accumulate)."""
    if not accumulate:
        optimizer.zero_grad(set_to_none=True)
    if fp16_scaler is None:
        loss.backward()
    else:
        fp16_scaler.scale(loss).backward()


def clip_and_step(student: nn.Module, optimizer: torch.optim.Optimizer,
                  fp16_scaler: Optional[torch.amp.GradScaler], epoch: int, clip_grad: float,
                  freeze_last_layer: int, freeze_backbone_epochs: int = 0) -> None:
    """Per-parameter clipping, last-layer (and backbone) freezing, then the optimizer (and
    scaler) step."""
    if clip_grad:
        if fp16_scaler is not None:
            fp16_scaler.unscale_(optimizer)
        utils.clip_gradients(student, clip_grad)
    utils.cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    utils.cancel_gradients_backbone(epoch, student, freeze_backbone_epochs)
    if fp16_scaler is None:
        optimizer.step()
    else:
        fp16_scaler.step(optimizer)
        fp16_scaler.update()


@torch.no_grad()
def update_teacher(student_params: List[torch.Tensor], teacher_params: List[torch.Tensor],
                   momentum: float) -> None:
    """teacher = m * teacher + (1 - m) * student, for all parameters at once."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


# ------------------------------------------------------------------------------------------------
# The DINO loss
# ------------------------------------------------------------------------------------------------

class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over view pairs.

    DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021,
    arXiv 2104.14294, Algorithm 1): for each of the 2 global views the teacher gives
    softmax((t - center) / teacher_temp), which every *other* view's student log-softmax
    (temperature student_temp) is trained to match; the center is an EMA (center_momentum) of
    the teacher's batch means, all-reduced over ranks. Views are stacked along the batch in crop
    order: [global 1, global 2, local 1, ...] for the student, the 2 globals for the teacher.

    Example:
        >>> loss_fn = DINOLoss(out_dim=65536, ncrops=10, warmup_teacher_temp=0.04,
        ...                    teacher_temp=0.04, warmup_teacher_temp_epochs=0, nepochs=100)
        >>> loss = loss_fn(student(crops), teacher(crops[:2]), epoch)  # updates loss_fn.center
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, micro_batches: int = 1,
                 centering: str = "centering"):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        # "sinkhorn_knopp" (DINOv2) balances the teacher outputs instead; the center then stays.
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.diagnostic_names = ("teacher_entropy", "teacher_kl")
        # With gradient accumulation the center moves once per optimizer step, by the teacher's
        # mean over all its micro-batches (the sum so far is kept here).
        self.micro_batches = micro_batches
        self.step_sum: Optional[torch.Tensor] = None
        self.step_rows = 0
        self.micro_batches_seen = 0
        # The teacher temperature changes per epoch: a linear warm-up, then constant.
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))
        self.register_buffer("teacher_temps", torch.tensor(self.teacher_temp_schedule,
                                                           dtype=torch.float32), persistent=False)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: Optional[int], return_diagnostics: bool = False,
                teacher_temp: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Loss averaged over all (teacher view, other student view) pairs; updates the center.

        teacher_temp (0-d tensor) replaces the epoch's scheduled temperature: a compiled step
        passes it as an input, so that a new epoch does not recompile. With return_diagnostics,
        also returns [teacher entropy, KL(batch mean || uniform)], named by `diagnostic_names`.
        """
        if teacher_temp is None:
            teacher_temp = self.teacher_temps[epoch]
        # Each student log-softmax is computed once, in float32 even under autocast.
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        teacher_probs = dino_objectives.teacher_probabilities(teacher_output, self.center,
                                                              teacher_temp, self.centering)
        batch = len(teacher_probs) // 2
        student_views = student_logp.view(self.ncrops, batch, -1)
        teacher_views = teacher_probs.view(2, batch, -1)
        # Every student view is paired with both teacher views except its own, so its target is
        # the sum of the teacher views minus the same-view one: two products in all, instead of
        # one per (teacher view, student view) pair.
        paired = (teacher_views.sum(dim=0) * student_views.sum(dim=0)).sum() \
            - (teacher_views * student_views[:2]).sum()
        loss = -paired / ((2 * self.ncrops - 2) * batch)
        if self.centering == "centering":
            self.update_center(teacher_output)
        if return_diagnostics:
            return loss, teacher_diagnostics(teacher_probs)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the step: every micro-batch, every rank."""
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        rows = len(teacher_output)
        if self.micro_batches > 1:
            batch_center, rows = self.add_micro_batch(batch_center, rows)
            if batch_center is None:
                return
        if utils.is_dist_avail_and_initialized():
            dist.all_reduce(batch_center)
        batch_center = batch_center / (rows * utils.get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def add_micro_batch(self, teacher_sum: torch.Tensor,
                        rows: int) -> Tuple[Optional[torch.Tensor], int]:
        """Add one micro-batch's teacher sum: the step's (sum, rows) after its last one, else
        (None, 0)."""
        self.step_sum = teacher_sum if self.step_sum is None else self.step_sum + teacher_sum
        self.step_rows += rows
        self.micro_batches_seen += 1
        if self.micro_batches_seen < self.micro_batches:
            return None, 0
        step_sum, step_rows = self.step_sum, self.step_rows
        self.step_sum, self.step_rows, self.micro_batches_seen = None, 0, 0
        return step_sum, step_rows


@torch.no_grad()
def teacher_diagnostics(teacher_probs: torch.Tensor) -> torch.Tensor:
    """[mean per-sample entropy, KL(batch-mean distribution || uniform)] in nats.

    Collapse shows as the two meeting ln(K) - entropy: all samples get the same distribution.
    """
    entropy = torch.special.entr(teacher_probs).sum(dim=-1).mean()
    batch_mean = teacher_probs.mean(dim=0)
    kl_to_uniform = math.log(teacher_probs.shape[-1]) - torch.special.entr(batch_mean).sum()
    return torch.stack((entropy, kl_to_uniform))


# ------------------------------------------------------------------------------------------------
# Models and their optimisation
# ------------------------------------------------------------------------------------------------

def build_student_teacher(args: argparse.Namespace, device: torch.device
                          ) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """Student (DDP, FSDP-sharded, or DDP's one-process stand-in) and teacher multi-crop
    networks; the teacher starts as the student's copy."""
    vit_options = backbone_options(args)
    student_options = {"skip_dropped_paths": True} if args.efficient_drop_path else {}
    student_backbone, embed_dim = utils.build_backbone(args.arch, args.patch_size,
                                                       args.drop_path_rate, **vit_options,
                                                       **student_options)
    teacher_backbone, _ = utils.build_backbone(args.arch, args.patch_size, 0.0, **vit_options)
    student = multi_crop_network(args, student_backbone, embed_dim, args.norm_last_layer)
    teacher = multi_crop_network(args, teacher_backbone, embed_dim, norm_last_layer=True)
    student, teacher = student.to(device), teacher.to(device)
    if device.type == "cuda" and not args.arch.startswith(("vit", "xcit")):
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    if args.sharding == "fsdp":
        dtype = dino_sharding.compute_dtype(args.use_bf16, args.use_fp16, device)
        print(f"Student and Teacher are built: they are both {args.arch} network, FSDP-sharded "
              f"over {utils.get_world_size()} processes, computing in {dtype or torch.float32}.")
        return dino_sharding.shard_student_teacher(student, teacher, dtype, args.compile)
    if args.compile and args.compile_scope == "modules":
        for wrapper in (student, teacher):
            # Module.compile keeps the state_dict keys (no `_orig_mod.`): checkpoints stay as-is.
            wrapper.backbone.compile(dynamic=False, mode=args.compile_mode)
            wrapper.head.compile(dynamic=False, mode=args.compile_mode)
    student, teacher, teacher_without_ddp = wrap_data_parallel(student, teacher, args.gpu, device)
    print(f"Student and Teacher are built: they are both {args.arch} network.")
    return student, teacher, teacher_without_ddp


def wrap_data_parallel(student: nn.Module, teacher: nn.Module, gpu: int, device: torch.device
                       ) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """(student in DDP or its one-process stand-in, teacher, teacher without DDP), the teacher
    a frozen copy of the student."""
    device_ids = [gpu] if device.type == "cuda" else None
    # SyncBatchNorm runs on CUDA only; CPU processes keep per-process batch statistics.
    if utils.has_batchnorms(student) and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        # SyncBN in the teacher needs a process group through DDP (reference behaviour).
        teacher = nn.parallel.DistributedDataParallel(teacher, device_ids=device_ids)
        teacher_without_ddp = teacher.module
    else:
        teacher_without_ddp = teacher
    if utils.get_world_size() == 1 and teacher is teacher_without_ddp:
        student = utils.SingleProcessWrapper(student)  # one graph when compiled, fewer kernels
    else:
        student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    teacher_without_ddp.load_state_dict(student.module.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher, teacher_without_ddp


def backbone_options(args: argparse.Namespace) -> dict:
    """ViT constructor options of the switches: register tokens, iBOT's mask token."""
    options = {}
    if args.num_register_tokens:
        options["num_register_tokens"] = args.num_register_tokens
    if args.ibot_loss_weight:
        options["use_mask_token"] = True
    return options


def multi_crop_network(args: argparse.Namespace, backbone: nn.Module, embed_dim: int,
                       norm_last_layer: bool) -> nn.Module:
    """The backbone with its DINO head (and iBOT head) in a multi-crop wrapper."""
    head = DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                    norm_last_layer=norm_last_layer, hidden_dim=args.head_hidden_dim)
    if not dino_objectives.uses_objectives(args):
        return utils.MultiCropWrapper(backbone, head, packed=args.packed_forward)
    ibot_head = None
    if args.ibot_loss_weight and args.ibot_separate_head:
        ibot_head = DINOHead(embed_dim, args.ibot_out_dim or args.out_dim,
                             norm_last_layer=norm_last_layer, hidden_dim=args.head_hidden_dim)
    return dino_objectives.MaskedMultiCropWrapper(backbone, head, ibot_head,
                                                  packed=args.packed_forward)


def build_optimizer(args: argparse.Namespace, student: nn.Module,
                    device: torch.device) -> torch.optim.Optimizer:
    params_groups = utils.get_params_groups(student)
    if args.optimizer == "adamw":
        # The fused CUDA kernel does the same AdamW arithmetic in one launch (the foreach one
        # takes the sharded parameters).
        return torch.optim.AdamW(params_groups,
                                 fused=device.type == "cuda" and args.sharding == "none")
    if args.optimizer == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)
    return utils.LARS(params_groups)


def build_schedules(args: argparse.Namespace, niter_per_ep: int) -> Dict[str, np.ndarray]:
    """Per-iteration lr, wd and teacher momentum; lr scaled linearly with the total batch (of
    one optimizer step: micro-batches x --grad_accum_steps x processes)."""
    total_batch = args.batch_size_per_gpu * args.grad_accum_steps * utils.get_world_size()
    return {
        "lr": utils.cosine_scheduler(args.lr * total_batch / 256.0, args.min_lr, args.epochs,
                                     niter_per_ep, warmup_epochs=args.warmup_epochs),
        "wd": utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                                     niter_per_ep),
        "momentum": utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter_per_ep),
    }


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    """bf16 if asked for; fp16 on CUDA when --use_fp16; otherwise None (float32)."""
    if args.use_bf16:
        if device.type == "cpu" and not utils.cpu_has_native_bf16():
            print(f"Warning: this CPU has no native bfloat16 (AVX512-BF16 or AMX; torch reports "
                  f"{torch.backends.cpu.get_cpu_capability()}), so --use_bf16 true will train "
                  "much slower than float32 (bf16 matmuls are emulated): drop it here.")
        return torch.bfloat16
    if args.use_fp16 and device.type == "cuda":
        return torch.float16
    if args.use_fp16:
        print("Note: --use_fp16 needs CUDA; training in float32 on the CPU.")
    return None


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

class DataAugmentationDINO:
    """Two global crops (blur p=1 / p=0.1 + solarize p=0.2) and N local crops (blur p=0.5)."""

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224,
                 local_crops_size: int = 96, uint8_output: bool = False):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(
                brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        # uint8_output leaves ToTensor and Normalize to the training device (CropPreparer):
        # 4x fewer bytes through worker pipes and pinned memory, the same float arithmetic.
        normalize = transforms.PILToTensor() if uint8_output else transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
        ])
        bicubic = transforms.InterpolationMode.BICUBIC

        def global_crop(blur_p: float, solarize_p: float) -> transforms.Compose:
            return transforms.Compose([
                transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale,
                                             interpolation=bicubic),
                flip_and_color_jitter,
                utils.GaussianBlur(blur_p),
                utils.Solarization(solarize_p),
                normalize,
            ])

        self.global_transfo1 = global_crop(blur_p=1.0, solarize_p=0.0)
        self.global_transfo2 = global_crop(blur_p=0.1, solarize_p=0.2)
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_crops_size, scale=local_crops_scale,
                                         interpolation=bicubic),
            flip_and_color_jitter,
            utils.GaussianBlur(p=0.5),
            normalize,
        ])

    def __call__(self, image) -> List[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


def build_data_loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """PIL multi-crop in the workers, or uint8 canvases (or bytes) for the batched augmenter."""
    if args.gpu_decode and not args.gpu_augment:
        raise utils.InputError("--gpu_decode needs --gpu_augment true")
    if args.gpu_augment:
        return gpu_augment.build_canvas_loader(args)
    transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                     args.local_crops_number, args.global_crops_size,
                                     args.local_crops_size, uint8_output=True)
    dataset = utils.ImageFiles(args.data_path, transform, seed=args.seed)
    return utils.build_pretraining_loader(dataset, args)


class CropPreparer:
    """Loader batch -> normalised float32 crops on the device, for either data path.

    With --gpu_augment the batched augmenter draws the crops here, from a random stream that
    depends on (seed, rank, epoch, batch), after decoding the files with --gpu_decode;
    otherwise the PIL workers' uint8 crops are normalised.
    """

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.device = device
        self.augmenter = gpu_augment.build_augmenter(args, device) if args.gpu_augment else None
        self.decode_canvas_size = args.canvas_size if args.gpu_decode else None
        self.mean = torch.tensor(utils.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(utils.IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """The next batch is batch `first_batch` of `epoch` (a resumed epoch starts later)."""
        if self.augmenter is not None:
            self.augmenter.set_epoch(epoch, first_batch)

    def __call__(self, batch: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.decode_canvas_size:
            batch = gpu_augment.decode_to_canvases(batch, self.decode_canvas_size, self.device)
        if self.augmenter is not None:
            return self.augmenter(*batch)
        # The same operations as ToTensor + Normalize, so the numbers are the PIL path's.
        return [crop.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean)
                .div_(self.std) for crop in batch]


if __name__ == "__main__":
    parser = argparse.ArgumentParser("DINO", parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
