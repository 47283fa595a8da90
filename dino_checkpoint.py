"""main_dino's checkpoints, so that a run loses nothing: resume mid-epoch exactly, stop cleanly
on a signal, survive full disks, start from other weights.

- Every random draw of a run is a function of the seed and where the run stands: each epoch
  reseeds torch, numpy and Python's `random` from (seed, epoch), each image's augmentation is
  seeded from (seed, epoch, index) (utils.ImageFiles), the GPU augmenter from (seed, rank,
  epoch, batch). A mid-epoch checkpoint adds the iteration and the random states reached, so a
  resumed run repeats the uninterrupted one bit for bit.
- Checkpoints are written through a temporary file that replaces the old one only when
  complete; a failed write leaves no partial file and stops every rank with one line.
- SIGTERM, SIGUSR1/2 (Slurm, submitit) and Ctrl-C stop the run at the next iteration boundary,
  after a checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import os
import random
import signal
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import utils

# Extra key of mid-epoch checkpoints (the end-of-epoch ones keep the reference's keys).
MID_EPOCH_KEY = "mid_epoch"
# Flags that decide the shapes in a checkpoint: resuming with others cannot work.
MODEL_FLAGS = ("arch", "patch_size", "out_dim", "use_bn_in_head", "num_register_tokens")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# Exit statuses after a clean stop follow the shell's 128 + signal number.
SIGNAL_EXIT_BASE = 128


# ------------------------------------------------------------------------------------------------
# The output folder
# ------------------------------------------------------------------------------------------------

def prepare_output_dir(output_dir: str) -> None:
    """Create --output_dir and write a file there, so that an unwritable folder (or a full disk)
    is a one-line error before any training, not after the first epoch."""
    probe = os.path.join(output_dir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "wb") as probe_file:
            probe_file.write(b"\0" * 4096)
            probe_file.flush()
            os.fsync(probe_file.fileno())
        os.remove(probe)
    except OSError as error:
        raise utils.InputError(f"--output_dir {output_dir!r} is not writable: "
                               f"{utils.write_failure_cause(probe, error)}") from error


def remove_stale_temporaries(output_dir: str) -> None:
    """Delete the temporary files of checkpoints and log.txt that a killed run left (rank 0)."""
    if not utils.is_main_process():
        return
    patterns = ("checkpoint*.pth.tmp*", "log.txt.tmp*", ".write_test.*")
    stale = sorted(path for pattern in patterns
                   for path in glob.glob(os.path.join(glob.escape(output_dir), pattern)))
    for path in stale:
        os.remove(path)
    if stale:
        print(f"Removed {len(stale)} temporary files left by an interrupted run: "
              f"{', '.join(os.path.basename(path) for path in stale)}")


def save_checkpoint(state: dict, path: str) -> None:
    """utils.save_on_master, with its failure raised on every rank: a full disk stops all
    processes with the same line instead of leaving the others waiting for rank 0."""
    failure = None
    try:
        utils.save_on_master(state, path)
    except utils.InputError as error:
        failure = str(error)
    if utils.get_world_size() > 1:
        shared = [failure]
        dist.broadcast_object_list(shared, src=0)
        failure = shared[0]
    if failure:
        raise utils.InputError(f"{failure}; the previous checkpoint is intact")


# ------------------------------------------------------------------------------------------------
# Random states and where an epoch stands
# ------------------------------------------------------------------------------------------------

def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed torch (all devices), numpy and Python's random for `epoch`: an epoch's draws do
    not depend on how the run got there (resumed or not). The same on every rank, as --seed."""
    utils.fix_random_seeds(utils.mixed_seed(seed, epoch) % 2 ** 32)


def random_states() -> dict:
    """This process's random states: torch CPU (and the CUDA device's), numpy, Python; only
    tensors and plain values, so that the checkpoint loads with weights_only=True."""
    numpy_state = np.random.get_state(legacy=False)
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {**numpy_state, "state": {
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": numpy_state["state"]["pos"]}}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {
        "key": numpy_state["state"]["key"].numpy().astype(np.uint32),
        "pos": numpy_state["state"]["pos"]}})
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


@dataclass
class EpochProgress:
    """Where one rank stands in an epoch: iterations done, its running sums of the logged
    values ({name: (total, count)}), unreadable images met, and its random states."""
    iteration: int = 0
    meters: Dict[str, Tuple[float, int]] = field(default_factory=dict)
    skipped_images: int = 0
    random_states: Optional[dict] = None


@dataclass
class ResumePoint:
    """Where a run starts: an epoch, and the progress in it for a mid-epoch checkpoint."""
    epoch: int = 0
    progress: Optional[EpochProgress] = None


def data_layout(dataset_size: int, images_per_step: int) -> dict:
    """What must not change for a mid-epoch resume to continue the epoch's batches exactly."""
    return {"images": dataset_size, "world_size": utils.get_world_size(),
            "images_per_step_per_process": images_per_step}


# ------------------------------------------------------------------------------------------------
# Stopping on a signal
# ------------------------------------------------------------------------------------------------

def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class TrainingStopped(Exception):
    """The run stopped on a signal (to this process, or None: to another rank) after saving a
    checkpoint."""

    def __init__(self, signum: Optional[int], previous_handler, where: str):
        name = signal_name(signum) if signum is not None else "a signal to another process"
        super().__init__(f"Stopped by {name} {where}; checkpoint.pth holds the run: run the "
                         "same command again to resume it.")
        self.exit_status = SIGNAL_EXIT_BASE + (signum or signal.SIGTERM)
        self.signum, self.previous_handler = signum, previous_handler

    def pass_on(self) -> None:
        """Give the signal to the handler it had before ours: submitit's requeue."""
        handler = self.previous_handler
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signum, None)


class StopSignals:
    """Once installed, SIGTERM, SIGUSR1/2 and Ctrl-C ask the run to stop at the next iteration
    boundary (a second one stops at once). All ranks learn of a request in the same iteration.
    """

    def __init__(self, timeout_minutes: Optional[float] = None):
        self.timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
        self.signum: Optional[int] = None  # the signal this process received
        self.stopping = False  # whether the ranks agreed to stop
        self.previous: Dict[int, object] = {}
        self.group = None
        self.flag: Optional[torch.Tensor] = None
        self.work = None

    def install(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self.handle)
            except ValueError:  # not the main thread: signals keep their handlers
                break
        if utils.get_world_size() > 1:
            # A CPU group of its own, so that agreeing never waits for the GPU or the training's
            # collectives.
            self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        return self

    def uninstall(self) -> None:
        """Wait for the last exchange between ranks and give the signals their old handlers."""
        if self.work is not None:
            self.work.wait()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(SIGNAL_EXIT_BASE + signum)
        self.signum = signum
        if utils.is_main_process():
            # Straight to the file descriptor: print() is not safe inside a signal handler (it
            # may interrupt another print to the same buffered stream).
            os.write(2, f"{signal_name(signum)} received: saving a checkpoint at the end of this "
                        "iteration, then stopping (send it again to stop at once).\n".encode())

    def requested(self) -> bool:
        """Whether any rank was asked to stop: the same answer on every rank (call it at the same
        points on all). The ranks exchange their flags in the background, so a request is seen
        one call after it arrives."""
        if self.group is None:
            self.stopping = self.signum is not None
            return self.stopping
        if self.work is not None:
            self.work.wait()
            self.stopping = bool(self.flag.item())
        self.flag = torch.tensor([int(self.signum is not None)])
        self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group,
                                    async_op=True)
        return self.stopping

    def stop(self, where: str) -> TrainingStopped:
        return TrainingStopped(self.signum, self.previous.get(self.signum), where)


# ------------------------------------------------------------------------------------------------
# When and what main_dino saves
# ------------------------------------------------------------------------------------------------

class Checkpoints:
    """checkpoint.pth after every epoch (checkpointNNNN.pth first, every `saveckp_freq`
    epochs, so that a kill can never skip one), and mid-epoch every `saveckp_iters` iterations
    or when a stop signal arrives, with the extras an exact resume needs."""

    def __init__(self, output_dir: str, saveckp_freq: int, saveckp_iters: int,
                 state_of: Callable[[int], dict], layout: dict, stop: StopSignals):
        self.output_dir, self.path = output_dir, os.path.join(output_dir, "checkpoint.pth")
        self.saveckp_freq, self.saveckp_iters = saveckp_freq, saveckp_iters
        self.state_of, self.layout, self.stop = state_of, layout, stop

    def due(self, it: int) -> bool:
        """At the boundary after global iteration `it`: is a mid-epoch checkpoint due? Call it
        at every boundary on every rank (it agrees on stop requests)."""
        stopping = self.stop.requested()
        return stopping or bool(self.saveckp_iters and (it + 1) % self.saveckp_iters == 0)

    def save_mid_epoch(self, epoch: int, progress: EpochProgress) -> None:
        """checkpoint.pth of the epoch in progress; then stop if a signal asked for it."""
        progress.random_states = random_states()
        ranks = [dataclasses.asdict(progress)]
        if utils.get_world_size() > 1:
            ranks = [None] * utils.get_world_size()
            dist.all_gather_object(ranks, dataclasses.asdict(progress))
        state = self.state_of(epoch)
        state[MID_EPOCH_KEY] = {"layout": self.layout, "ranks": ranks}
        save_checkpoint(state, self.path)
        if self.stop.stopping:
            raise self.stop.stop(f"at epoch {epoch}, iteration {progress.iteration}")

    def save_epoch_end(self, epoch: int) -> None:
        """The reference's checkpoints after `epoch`; then stop if a signal asked for it."""
        state = self.state_of(epoch + 1)
        if self.saveckp_freq and epoch % self.saveckp_freq == 0:
            save_checkpoint(state, os.path.join(self.output_dir, f"checkpoint{epoch:04}.pth"))
        save_checkpoint(state, self.path)
        if self.stop.requested():
            raise self.stop.stop(f"after epoch {epoch}")


# ------------------------------------------------------------------------------------------------
# Resuming, or starting from other weights
# ------------------------------------------------------------------------------------------------

def resume(path: str, args: argparse.Namespace, layout: dict, **objects) -> ResumePoint:
    """Load the run's checkpoint.pth into `objects` (as utils.restart_from_checkpoint) and say
    where to start: after its epoch, or inside it for a mid-epoch checkpoint."""
    print(f"Found checkpoint at {path}")
    checkpoint = utils.load_checkpoint_file(path)
    check_same_model_flags(checkpoint.get("args"), args, path)
    utils.restore_objects(checkpoint, path, **objects)
    point = ResumePoint(epoch=int(checkpoint.get("epoch", 0)))
    mid_epoch = checkpoint.get(MID_EPOCH_KEY)
    if mid_epoch is None:
        return point
    iteration = mid_epoch["ranks"][0]["iteration"]
    if mid_epoch["layout"] != layout:
        print(f"Warning: {path} was saved at iteration {iteration} of epoch {point.epoch} with "
              f"{mid_epoch['layout']}, but this run has {layout}: epoch {point.epoch} restarts "
              "from its first iteration.")
        return point
    point.progress = EpochProgress(**mid_epoch["ranks"][utils.get_rank()])
    print(f"Resuming epoch {point.epoch} at iteration {iteration}.")
    return point


def check_same_model_flags(saved_args: Optional[argparse.Namespace], args: argparse.Namespace,
                           path: str) -> None:
    """The flags that shape the networks must be the checkpoint's: name both sets if not."""
    if saved_args is None:
        return
    differing = [name for name in MODEL_FLAGS
                 if hasattr(saved_args, name) and getattr(saved_args, name) != getattr(args, name)]
    if differing:
        def flags(namespace):
            return " ".join(f"--{name} {getattr(namespace, name)}" for name in differing)
        raise utils.InputError(f"{path} was written by a run with {flags(saved_args)}, but this "
                               f"run has {flags(args)}: resume it with its own flags, or choose "
                               "another --output_dir")


def initialise_from(path: str, student: nn.Module, teacher: nn.Module,
                    center: torch.Tensor) -> bool:
    """--init_from: weights for a new run, into the student and teacher MultiCropWrappers.

    From a main_dino checkpoint (or the reference's full checkpoints): student and teacher,
    heads and center too when they fit. From a backbone file (a reference release, a
    state_dict, with or without `module.`/`backbone.` prefixes): both backbones, fresh heads.
    Returns whether the heads were loaded.
    """
    if not os.path.isfile(path):
        raise utils.InputError(f"--init_from {path!r} is not a file")
    checkpoint = utils.load_checkpoint_file(path)
    if "student" in checkpoint and "teacher" in checkpoint:
        sources = [(student, strip_ddp(checkpoint["student"])), (teacher, checkpoint["teacher"])]
    else:
        for key in ("teacher", "model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
        sources = [(student, checkpoint), (teacher, checkpoint)]
    heads_fit = all(fits(wrapper.head, head_part(state)) for wrapper, state in sources)
    for wrapper, state in sources:
        backbone = utils._strip_wrapper_prefixes(
            {key: value for key, value in strip_ddp(state).items() if not key.startswith("head.")})
        utils.load_backbone_state_dict(wrapper.backbone, backbone, path)
        if heads_fit:
            wrapper.head.load_state_dict(head_part(state))
    saved_center = checkpoint.get("dino_loss", {}).get("center")
    if heads_fit and saved_center is not None and saved_center.shape == center.shape:
        center.copy_(saved_center)
    print(f"Initialised from {path}: " + ("backbones, heads and center." if heads_fit else
                                          "backbones; the heads start from random weights."))
    return heads_fit


def strip_ddp(state: dict) -> dict:
    return {key.removeprefix("module."): value for key, value in state.items()}


def head_part(state: dict) -> dict:
    return {key[len("head."):]: value for key, value in strip_ddp(state).items()
            if key.startswith("head.")}


def fits(module: nn.Module, state: dict) -> bool:
    """Whether `state` holds exactly the module's keys with the module's shapes."""
    own = module.state_dict()
    return bool(state) and state.keys() == own.keys() and all(
        state[key].shape == own[key].shape for key in own)


# ------------------------------------------------------------------------------------------------
# A lost process
# ------------------------------------------------------------------------------------------------

# What gloo and nccl say when a peer froze (a timeout) or died (a closed connection).
PEER_FAILURE_SIGNS = ("timed out waiting", "collective operation timeout",
                      "connection closed by peer", "connection reset by peer")


def lost_process_message(error: BaseException, timeout_minutes: float) -> Optional[str]:
    """One line for a collective that failed because another process froze or died, or None
    for any other error."""
    if utils.get_world_size() == 1:
        return None
    text = str(error).lower()
    if not any(sign in text for sign in PEER_FAILURE_SIGNS):
        return None
    return (f"rank {utils.get_rank()}: another process did not answer within "
            f"--dist_timeout_minutes {timeout_minutes:g} or closed its connection (frozen, killed "
            f"or out of memory?); stopping. ({str(error).strip().splitlines()[0][:200]})")

