"""Helpers shared by every DINO script: command line, architectures, distributed set-up,
schedules and optimisation, model wrappers, data, checkpoints and weights, logging, evaluation.
"""
import argparse
import atexit
import builtins
import contextlib
import datetime
import errno
import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import defaultdict, deque
from typing import (Callable, ContextManager, Dict, Iterable, Iterator, List, NamedTuple,
                    Optional, Sequence, Set, Tuple)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image, ImageFilter, ImageOps

import vision_transformer as vits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
REFERENCE_URL_PREFIX = "https://dl.fbaipublicfiles.com/dino/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

class InputError(Exception):
    """A problem with what the user passed (flag, folder, file): reported as one line."""


def run_cli(main: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run a script's main; report an InputError as a one-line message and exit status 2, and
    Ctrl-C as one line and status 130."""
    script = os.path.basename(sys.argv[0])
    try:
        main(args)
    except InputError as error:
        sys.stderr.write(f"{script}: error: {input_error_line(error)}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"{script}: interrupted (Ctrl-C)\n")
        sys.exit(130)
    finally:
        cleanup_distributed()


def input_error_line(error: InputError) -> str:
    """The error's message; for one re-raised from a DataLoader worker (which wraps it in the
    worker's traceback), the worker's own message, so that it reads as with --num_workers 0."""
    message = str(error)
    if "Original Traceback" not in message:
        return message
    last_line = message.strip().splitlines()[-1]
    return last_line.split(f"{InputError.__name__}: ", 1)[-1]


def bool_flag(value: str) -> bool:
    """Parse on/true/1 and off/false/0 (any case) for argparse."""
    lowered = value.lower()
    if lowered in {"on", "true", "1"}:
        return True
    if lowered in {"off", "false", "0"}:
        return False
    raise argparse.ArgumentTypeError(
        f"invalid boolean value {value!r} (use true/false, on/off, 1/0)")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The flags every distributed script shares; `--local-rank` is torch>=2's spelling."""
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="url used to set up distributed training")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Please ignore and do not set this argument.")


def add_backbone_args(parser: argparse.ArgumentParser, arch_names: Sequence[str],
                      default_patch_size: int = 16) -> None:
    """--arch, --patch_size, --pretrained_weights and --checkpoint_key of a pretrained backbone."""
    parser.add_argument("--arch", default="vit_small", type=canonical_arch, choices=arch_names,
                        help="Architecture of the backbone: vit_tiny/small/base/large (deit_* "
                             "are aliases), or where accepted an XCiT hub name or a torchvision "
                             "convnet.")
    parser.add_argument("--patch_size", default=default_patch_size, type=int,
                        help="Patch resolution of the ViT.")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Weights to load: a main_dino checkpoint.pth or a backbone "
                             "state_dict; empty downloads the reference weights for --arch and "
                             "--patch_size; 'random' keeps random weights.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key of the network inside a training checkpoint ("teacher" or '
                             '"student").')


# ------------------------------------------------------------------------------------------------
# Run set-up
# ------------------------------------------------------------------------------------------------

def fix_random_seeds(seed: int = 31) -> None:
    """Seed torch (all devices), numpy and Python's random."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def mixed_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed for a tuple of integers: no two tuples share one the way
    seed + rank would."""
    entropy = [number % 2 ** 64 for number in numbers]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def get_sha() -> str:
    """Git commit, cleanliness and branch of the code being run."""
    cwd = os.path.dirname(os.path.abspath(__file__))

    def git(*command: str) -> str:
        return subprocess.check_output(["git", *command], cwd=cwd,
                                       stderr=subprocess.DEVNULL).decode("ascii").strip()

    sha, diff, branch = "N/A", "clean", "N/A"
    try:
        sha = git("rev-parse", "HEAD")
        # `status` compares file contents (diff-index alone trusts stale index timestamps).
        dirty = git("status", "--porcelain", "--untracked-files=no")
        diff = "has uncommited changes" if dirty else "clean"
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except Exception:
        pass
    return f"sha: {sha}, status: {diff}, branch: {branch}"


def print_run_header(args: argparse.Namespace) -> None:
    print("git:\n  {}\n".format(get_sha()))
    print("\n".join(f"{key}: {value}" for key, value in sorted(vars(args).items())))


# ------------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------------

VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")
# Names of facebookresearch/xcit's hub entry points, listed here so that building the parser
# never needs the network (reference issue #159); they are fetched only when one is trained.
XCIT_ARCHS = tuple(f"xcit_{size}_{depth}_p{patch}"
                   for size, depth in (("nano", 12), ("tiny", 12), ("tiny", 24), ("small", 12),
                                       ("small", 24), ("medium", 24), ("large", 24))
                   for patch in (16, 8))


def torchvision_arch_names() -> List[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_choices() -> List[str]:
    """--arch choices: our ViTs (and deit aliases), XCiT hub names, installed torchvision models."""
    return [*VIT_ARCHS, "xcit", "deit_tiny", "deit_small", *XCIT_ARCHS, *torchvision_arch_names()]


def canonical_arch(name: str) -> str:
    """The architecture name with the reference's deit aliases spelled as ViTs (deit_small ->
    vit_small); the argparse type of every --arch flag."""
    return name.replace("deit", "vit")


def build_backbone(arch: str, patch_size: int = 16, drop_path_rate: float = 0.0,
                   **vit_kwargs) -> Tuple[nn.Module, int]:
    """(backbone with no classifier, its feature width) for a ViT, XCiT or torchvision name.

    vit_kwargs go to the ViT constructor (as the reference hub's kwargs do).
    """
    arch = canonical_arch(arch)
    if arch in VIT_ARCHS:
        model = getattr(vits, arch)(patch_size=patch_size, drop_path_rate=drop_path_rate,
                                    **vit_kwargs)
        return model, model.embed_dim
    if vit_kwargs:
        raise InputError(f"{arch} takes no ViT options ({', '.join(sorted(vit_kwargs))})")
    if arch.startswith("xcit"):
        try:
            model = torch.hub.load("facebookresearch/xcit:main", arch, pretrained=False,
                                   num_classes=0, drop_path_rate=drop_path_rate)
        except OSError as error:  # urllib's URLError and socket errors: GitHub was not reached
            raise InputError(
                f"{arch} is defined in the facebookresearch/xcit repository, which torch.hub "
                f"fetches from GitHub on first use, and that failed ({error}). Connect once (the "
                f"code is then cached under {torch.hub.get_dir()}) or use a ViT.") from error
        return model, model.embed_dim
    if arch in torchvision_arch_names():
        model = torchvision.models.get_model(arch, weights=None)
        if not isinstance(getattr(model, "fc", None), nn.Linear):
            raise InputError(f"torchvision model {arch!r} has no .fc classifier to remove; "
                             "use a ResNet-style convnet or a ViT")
        embed_dim = model.fc.weight.shape[1]
        model.fc = nn.Identity()
        return model, embed_dim
    raise InputError(f"unknown architecture {arch!r}: use one of {', '.join(VIT_ARCHS)}, an "
                     "XCiT hub name or a torchvision model name")


# ------------------------------------------------------------------------------------------------
# Distributed
# ------------------------------------------------------------------------------------------------

def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", ""))
    try:
        hosts = subprocess.check_output(["scontrol", "show", "hostnames", nodelist],
                                        stderr=subprocess.DEVNULL).decode().split()
        return hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def _launcher() -> Optional[str]:
    """"torchrun" or "slurm" from the environment they set; None for a lone process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    return "slurm" if "SLURM_PROCID" in env else None


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE, Slurm's SLURM_NTASKS); 1
    for a lone process. Readable before the process group exists."""
    launcher = _launcher()
    if launcher == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("SLURM_NTASKS", 1)) if launcher == "slurm" else 1


def _read_launch_environment(args: argparse.Namespace) -> None:
    """Set args.rank, args.world_size and args.gpu from torchrun, Slurm, or a lone process."""
    env = os.environ
    launcher = _launcher()
    if launcher == "torchrun":
        args.rank = int(env["RANK"])
        args.world_size = int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", 0))
    elif launcher == "slurm":
        args.rank = int(env["SLURM_PROCID"])
        args.world_size = int(env.get("SLURM_NTASKS", getattr(args, "world_size", 1)))
        gpus = max(torch.cuda.device_count(), 1)
        args.gpu = int(env.get("SLURM_LOCALID", args.rank % gpus))
        if args.dist_url == "env://":
            env.setdefault("MASTER_ADDR", _first_slurm_host())
            env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
    else:
        print("Will run the code on one GPU." if torch.cuda.is_available()
              else "Will run the code on the CPU (one process, gloo backend).")
        args.rank, args.gpu, args.world_size = 0, 0, 1
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed_mode(args: argparse.Namespace,
                          timeout_minutes: Optional[float] = None) -> None:
    """Initialise the process group (nccl on GPUs, gloo on CPU) and silence non-master prints.

    timeout_minutes bounds every wait on another process (torch's default, 30 min, if None).
    """
    _read_launch_environment(args)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(args.gpu)
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
    dist.init_process_group(backend=backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank, timeout=timeout)
    print(f"| distributed init (rank {args.rank}): {args.dist_url}", flush=True)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def cleanup_distributed() -> None:
    """Destroy the process group so that the process exits (reference issue #185)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def setup_for_distributed(is_master: bool) -> None:
    """Only the master prints, unless print(..., force=True)."""
    builtin_print = getattr(builtins.print, "_dino_original", builtins.print)

    def rank_aware_print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    rank_aware_print._dino_original = builtin_print
    builtins.print = rank_aware_print


def device_of(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda", args.gpu) if torch.cuda.is_available() else torch.device("cpu")


def cpu_flags() -> Set[str]:
    """The CPU's feature flags as the Linux kernel lists them (x86 `flags`, Arm `Features`);
    empty where /proc/cpuinfo does not exist."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(capability: Optional[str] = None,
                        flags: Optional[Set[str]] = None) -> bool:
    """Whether bfloat16 matmuls run natively on this CPU: AVX512-BF16 or AMX under torch's
    AVX512 kernels, or Arm's BF16. Elsewhere (AVX2, say) bf16 is emulated and many times slower
    than float32. Defaults: torch's CPU capability and cpu_flags()."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    flags = cpu_flags() if flags is None else flags
    if "AVX512" in capability:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    if capability.startswith("SVE") or "asimd" in flags:
        return "bf16" in flags
    return False


def fast_bf16_available() -> bool:
    """bf16 autocast pays off here: a CUDA GPU that supports it, or a CPU where it is native."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Sums of `values` over all ranks, in float64 (on the GPU under nccl, which needs it)."""
    if not is_dist_avail_and_initialized():
        return [float(value) for value in values]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


# ------------------------------------------------------------------------------------------------
# Schedules and optimisation
# ------------------------------------------------------------------------------------------------

def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """Per-iteration values: linear warm-up (endpoints included), then a half cosine."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 \
        else np.array([])
    steps = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * steps / len(steps)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def get_params_groups(model: nn.Module) -> List[dict]:
    """[regularised, not regularised (biases and 1-D tensors, weight_decay 0)]."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio; 1-D parameters get neither decay nor it."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 eta: float = 0.001, weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim != 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm = torch.norm(param)
                    update_norm = torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm,
                                        torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                param.add_(mu, alpha=-group["lr"])


def clip_gradients(model: nn.Module, clip: float) -> List[torch.Tensor]:
    """Clip each parameter's gradient to norm `clip` on its own (not a global norm).

    Done with foreach kernels and no host sync; returns the pre-clipping norms. FSDP-sharded
    gradients (DTensors) are clipped by the norms of the whole parameters, on the local shards.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    if hasattr(grads[0], "to_local"):  # DTensor, without importing torch.distributed.tensor
        grads = [grad.to_local() for grad in grads]
        # Whole-parameter norms from every rank's shard, in one all-reduce.
        squares = torch.stack(torch._foreach_norm(grads)).square()
        dist.all_reduce(squares)
        norms = list(squares.sqrt().unbind())
    else:
        norms = torch._foreach_norm(grads)
    coefs = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    # A coefficient of exactly 1 leaves a gradient bit-identical, as the reference's `if coef < 1`.
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
    return norms


def cancel_gradients_backbone(epoch: int, model: nn.Module, freeze_backbone_epochs: int) -> None:
    """Drop the backbone's gradients during the first `freeze_backbone_epochs` epochs, so that
    only the heads train (and, with the teacher equal to the student, the teacher's backbone
    stays put too)."""
    if epoch >= freeze_backbone_epochs:
        return
    for name, param in model.named_parameters():
        if name.removeprefix("module.").startswith("backbone."):
            param.grad = None


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the head's last-layer gradients during the first `freeze_last_layer` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


# ------------------------------------------------------------------------------------------------
# Model wrappers
# ------------------------------------------------------------------------------------------------

class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of same-resolution crops, then the head once on all.

    packed: one backbone pass for all resolutions (`VisionTransformer.forward_packed`), same
    outputs up to float rounding.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False):
        super().__init__()
        if packed and not hasattr(backbone, "forward_packed"):
            raise InputError(f"--packed_forward needs one of our ViTs ({', '.join(VIT_ARCHS)}), "
                             f"not {type(backbone).__name__}")
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head
        self.packed = packed

    def forward(self, x) -> torch.Tensor:
        crops = x if isinstance(x, (list, tuple)) else [x]
        return self.head(self.backbone_features(crops))

    def backbone_features(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone outputs of all crops, concatenated in crop order."""
        batches = [torch.cat(list(same_size)) for _, same_size in
                   itertools.groupby(crops, key=lambda crop: crop.shape[-1])]
        if self.packed:
            return self.backbone(batches)
        features = []
        for batch in batches:
            output = self.backbone(batch)
            features.append(output[0] if isinstance(output, tuple) else output)
        return torch.cat(features)


class SingleProcessWrapper(nn.Module):
    """DDP's stand-in for a one-process run: the same `module.` state_dict keys and gradients,
    without DDP's gradient buckets and their copy and all-reduce kernels."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self) -> ContextManager:
        """As DDP's (gradient accumulation): nothing to skip in one process."""
        return contextlib.nullcontext()


def has_batchnorms(model: nn.Module) -> bool:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(module, bn_types) for module in model.modules())


# ------------------------------------------------------------------------------------------------
# Augmentations used by DataAugmentationDINO
# ------------------------------------------------------------------------------------------------

class GaussianBlur:
    """PIL Gaussian blur with probability p and a radius drawn uniformly from [min, max]."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:
            return img
        radius = random.uniform(self.radius_min, self.radius_max)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class Solarization:
    """PIL solarization (threshold 128) with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def find_images(root: str) -> List[str]:
    """All image files under `root`, recursively and sorted; a clear error if there are none."""
    if not os.path.isdir(root):
        raise InputError(f"data folder {root!r} does not exist or is not a directory")
    paths = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(root, followlinks=True)
        for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise InputError(f"data folder {root!r} contains no images "
                         f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return paths


class SampleKey(NamedTuple):
    """What the pretraining sampler yields: an image index and the epoch it is drawn in."""
    index: int
    epoch: int


# Pillow's modes for 16-bit grayscale (a 16-bit PNG opens as one of them); "I" is 32-bit but
# is what older Pillows give for 16-bit PNGs.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_rgb(path: str) -> Image.Image:
    """The image as 8-bit RGB; 16-bit grayscale is scaled to 8 bits (PIL's convert("RGB")
    clips it at 255, which turns it almost white)."""
    with Image.open(path) as img:
        if img.mode not in SIXTEEN_BIT_MODES:
            return img.convert("RGB")
        pixels = np.asarray(img, dtype=np.int64).clip(0, 65535)
    # 65535 / 257 = 255: the full 16-bit range onto the full 8-bit range, rounded.
    return Image.fromarray(((pixels + 128) // 257).astype(np.uint8), mode="L").convert("RGB")


@contextlib.contextmanager
def seeded_randomness(seed: int) -> Iterator[None]:
    """Python's random and torch's CPU generator seeded with `seed` inside the block, and
    restored after it, so that the caller's random streams do not move."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class ImageFiles(torch.utils.data.Dataset):
    """Every image under a folder (class sub-folders or none); labels are not used.

    An unreadable image is replaced by the next readable one, so that one bad file never stops
    an epoch. Items are (transform(loader(path)), 1 if the requested file was unreadable else 0),
    so that summing them counts each bad file once; the loader raises OSError or ValueError on
    unreadable files, and transform None leaves its output as it is. Given a seed and a SampleKey,
    the transform's random draws are a function of (seed, epoch, index) alone: the same whichever
    worker, or the main process, loads the image, and after a resume.
    """

    def __init__(self, root: str, transform: Optional[Callable], max_skips: int = 50,
                 seed: Optional[int] = None, loader: Callable[[str], object] = open_rgb):
        self.paths = find_images(root)
        self.transform = transform
        self.max_skips = max_skips
        self.seed = seed
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (key, None)
        attempts = min(self.max_skips, len(self.paths))
        for attempt in range(attempts):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                image = self.loader(path)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                warnings.warn(f"skipping unreadable image {path}: {error}")
                continue
            if self.transform is None:
                return image, int(attempt > 0)
            if self.seed is None or epoch is None:
                return self.transform(image), int(attempt > 0)
            with seeded_randomness(mixed_seed(self.seed, epoch, index)):
                return self.transform(image), int(attempt > 0)
        raise InputError(f"{attempts} consecutive images from {self.paths[index]!r} on could not "
                         "be read: is the data folder corrupt?")


class ResumableSampler(torch.utils.data.DistributedSampler):
    """This rank's shuffled share of the images as SampleKeys, in whole steps, from any point.

    The order is DistributedSampler's (seed 0, reshuffled by epoch). Only whole steps of
    `samples_per_step` are yielded (the loader drops partial batches anyway), and `set_epoch`
    can start part-way in: a resumed run skips the samples it consumed without loading them.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, samples_per_step: int):
        super().__init__(dataset, shuffle=True)
        self.samples_per_step = samples_per_step
        self.first_sample = 0

    def set_epoch(self, epoch: int, first_sample: int = 0) -> None:
        super().set_epoch(epoch)
        self.first_sample = first_sample

    def __len__(self) -> int:
        whole_steps = self.num_samples // self.samples_per_step * self.samples_per_step
        return max(whole_steps - self.first_sample, 0)

    def __iter__(self) -> Iterator[SampleKey]:
        indices = list(super().__iter__())
        end = self.first_sample + len(self)
        return iter([SampleKey(index, self.epoch) for index in indices[self.first_sample:end]])


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C, SIGTERM and SIGUSR1/2 to the main process, which stops
    at the end of the iteration; otherwise a signal sent to the whole process group (Ctrl-C,
    Slurm) kills the workers and the iteration with them."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def kill_daemon_children() -> None:
    """At exit, end the DataLoader workers that an exception on its way out kept alive: they
    ignore SIGTERM, so multiprocessing's own exit handler (terminate, then join) would wait
    for them forever. Registered after it, this handler runs first."""
    # torch's SIGCHLD handler would report each of them as a failed worker.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# ------------------------------------------------------------------------------------------------
# Checkpoints and weights
# ------------------------------------------------------------------------------------------------

def save_on_master(obj, path: str) -> None:
    """torch.save on rank 0, atomically: a kill mid-write never leaves a corrupt file, and a
    failed write (a full disk) removes its partial file, keeps the previous `path` intact and
    is an InputError naming the path and the cause."""
    if not is_main_process():
        return
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        # Through a Python file object, so that the OSError (and its errno) of a failed write
        # reaches us: torch's own file writer reports only "file write failed".
        with open(tmp_path, "wb") as tmp_file:
            torch.save(obj, tmp_file)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as error:
        failure = write_error(path, error)
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise failure from error


def write_error(path: str, error: BaseException) -> InputError:
    """A one-line InputError for a failed write of `path`, naming the cause."""
    cause = write_failure_cause(path, error)
    advice = "choose another --output_dir"
    if cause in DISK_FULL_CAUSES:
        advice = f"free some space, or {advice}"
    return InputError(f"cannot write {path!r}: {cause} ({advice})")


DISK_FULL_CAUSES = (os.strerror(errno.ENOSPC).lower(), os.strerror(errno.EDQUOT).lower())


def write_failure_cause(path: str, error: BaseException) -> str:
    """"no space left on device", "permission denied", ... from the OSError behind `error`, even
    when torch wraps it in a RuntimeError that does not say; else the error's first line."""
    link = error
    while link is not None:
        if isinstance(link, OSError) and link.errno:
            return os.strerror(link.errno).lower()
        link = link.__cause__ or link.__context__
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder) and shutil.disk_usage(folder).free < 2 ** 20:
        return DISK_FULL_CAUSES[0]
    return (str(error).splitlines() or [type(error).__name__])[0]


def load_checkpoint_file(path: str, mmap: bool = False) -> dict:
    """torch.load a DINO checkpoint on CPU; the pickled argparse.Namespace is allow-listed.

    A file torch cannot read is an InputError naming it as truncated or corrupt. mmap=True maps
    the tensors instead of reading them (cheap when only `args` is needed).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for a file it cannot read
        if "Unsupported global" not in str(error):
            raise InputError(f"cannot read checkpoint {path!r}: the file is truncated or corrupt "
                             f"({unreadable_checkpoint_cause(error)}); delete it or replace it "
                             "with a good copy") from error
    # A trusted local file holding objects beyond tensors and Namespace (e.g. numpy scalars).
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def unreadable_checkpoint_cause(error: Exception) -> str:
    """torch.load's reason in a few words, without its advice to load with weights_only=False
    (which cannot help with a damaged file)."""
    message = str(error)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def restart_from_checkpoint(ckp_path: str, run_variables: Optional[dict] = None, **kwargs) -> None:
    """Load every named object's state from `ckp_path` if it exists; fill `run_variables`."""
    if not os.path.isfile(ckp_path):
        return
    print(f"Found checkpoint at {ckp_path}")
    checkpoint = load_checkpoint_file(ckp_path)
    restore_objects(checkpoint, ckp_path, **kwargs)
    if run_variables is not None:
        for name in run_variables:
            if name in checkpoint:
                run_variables[name] = checkpoint[name]


def restore_objects(checkpoint: dict, ckp_path: str, **kwargs) -> None:
    """load_state_dict of each named object from checkpoint[name], as the reference does
    (non-strict for modules); a shape mismatch is a one-line InputError."""
    for key, value in kwargs.items():
        if value is None:
            continue
        if key not in checkpoint:
            print(f"=> key '{key}' not found in checkpoint: '{ckp_path}'")
            continue
        try:
            msg = value.load_state_dict(checkpoint[key], strict=False)
            print(f"=> loaded '{key}' from checkpoint '{ckp_path}' with msg {msg}")
        except TypeError:
            try:
                value.load_state_dict(checkpoint[key])
                print(f"=> loaded '{key}' from checkpoint: '{ckp_path}'")
            except ValueError:
                print(f"=> failed to load '{key}' from checkpoint: '{ckp_path}'")
        except RuntimeError as error:
            mismatches = [line.strip() for line in str(error).splitlines()
                          if line.strip().startswith("size mismatch")]
            raise InputError(f"'{key}' in {ckp_path!r} does not fit the model built from the "
                             f"flags ({len(mismatches)} tensors differ, e.g. "
                             f"{(mismatches or [str(error)])[0]}): resume with the flags of the "
                             "run that wrote it, or use another --output_dir") from error


# Stem of each reference release: its folder is `<stem>_pretrain/`, holding the backbone
# `<stem>_pretrain.pth` and the linear-probe weights `<stem>_linearweights.pth`.
_REFERENCE_RELEASES = {
    ("vit_small", 16): "dino_deitsmall16",
    ("vit_small", 8): "dino_deitsmall8",
    ("vit_base", 16): "dino_vitbase16",
    ("vit_base", 8): "dino_vitbase8",
    ("resnet50", None): "dino_resnet50",
    **{(arch, None): f"dino_{arch}" for arch in (
        "xcit_small_12_p16", "xcit_small_12_p8", "xcit_medium_24_p16", "xcit_medium_24_p8")},
}
# The figures of the paper use a separate 300-epoch ViT-S/8 run.
_VISUALISATION_RELEASES = {("vit_small", 8): "dino_deitsmall8_300ep"}


def reference_weights_url(arch: str, patch_size: int, kind: str = "pretrain",
                          visualisation: bool = False) -> Optional[str]:
    """URL of the reference release for (arch, patch), or None when there is none.

    kind is "pretrain" (backbone) or "linear" (eval_linear weights); visualisation picks the
    300-epoch ViT-S/8 backbone that the reference's figures use. XCiT releases have no linear
    weights in the reference code.
    """
    stem = None
    if kind == "pretrain" and visualisation:
        stem = _VISUALISATION_RELEASES.get((arch, patch_size))
    stem = stem or _REFERENCE_RELEASES.get((arch, patch_size)) or \
        _REFERENCE_RELEASES.get((arch, None))
    if stem is None or (kind == "linear" and arch.startswith("xcit")):
        return None
    suffix = "pretrain" if kind == "pretrain" else "linearweights"
    return f"{REFERENCE_URL_PREFIX}{stem}_pretrain/{stem}_{suffix}.pth"


def download_state_dict(url: str) -> dict:
    """Fetch a state_dict through torch.hub's cache; a clear error when offline."""
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu")
    except Exception as error:
        raise InputError(f"could not download reference weights from {url} ({error}); use a "
                         "local weights file instead (--pretrained_weights FILE in the scripts)") \
            from error


def _strip_wrapper_prefixes(state_dict: dict) -> dict:
    # A substring replace, as the reference: `module.` (DDP) then `backbone.` (MultiCropWrapper).
    return {key.replace("module.", "").replace("backbone.", ""): value
            for key, value in state_dict.items()}


def load_pretrained_weights(model: nn.Module, pretrained_weights: str,
                            checkpoint_key: Optional[str], model_name: str, patch_size: int,
                            visualisation: bool = False) -> None:
    """Load backbone weights from a file, from the reference release, or keep random weights.

    A file is loaded non-strictly (head keys of training checkpoints are ignored) but must fit:
    a shape mismatch or no backbone key matched is an InputError. An empty path downloads the
    reference weights; the word "random" keeps the random initialisation.
    """
    if pretrained_weights == "random":
        print(f"Using random weights for {model_name} "
              "(asked for with --pretrained_weights random).")
        return
    if pretrained_weights:
        load_backbone_state_dict(model, read_backbone_weights(pretrained_weights, checkpoint_key),
                                 pretrained_weights)
        return
    url = reference_weights_url(model_name, patch_size, visualisation=visualisation)
    if url is None:
        raise InputError(f"no reference weights exist for {model_name} with patch {patch_size}: "
                         "pass --pretrained_weights FILE, or 'random' for random weights")
    print("Since no pretrained weights have been provided, we load the reference pretrained "
          f"DINO weights from {url}.")
    model.load_state_dict(download_state_dict(url), strict=(model_name != "resnet50"))


def read_backbone_weights(path: str, checkpoint_key: Optional[str]) -> dict:
    """A weights file's state_dict (a training checkpoint's `checkpoint_key` entry when it has
    one) with the `module.` and `backbone.` prefixes stripped."""
    if not os.path.isfile(path):
        raise InputError(f"--pretrained_weights {path!r} is not a file")
    state_dict = load_checkpoint_file(path)
    if checkpoint_key is not None and checkpoint_key in state_dict:
        print(f"Take key {checkpoint_key} in provided checkpoint dict")
        state_dict = state_dict[checkpoint_key]
    return _strip_wrapper_prefixes(state_dict)


def vit_options_of(state_dict: dict) -> dict:
    """The ViT constructor options that weights need beyond the reference's: their number of
    register tokens, read from the shape of `register_tokens` (1, N, D)."""
    registers = state_dict.get("register_tokens")
    return {} if registers is None else {"num_register_tokens": registers.shape[1]}


def load_backbone_state_dict(model: nn.Module, state_dict: dict, source: str) -> None:
    """Non-strict load that still fails loudly on shape mismatches or on no key matching."""
    model_keys = model.state_dict()
    matched = [key for key in model_keys if key in state_dict]
    if not matched:
        raise InputError(f"no key of {source!r} matches the model's backbone (it has e.g. "
                         f"{list(state_dict)[:3]}, the model expects e.g. {list(model_keys)[:3]}): "
                         "wrong file or wrong --checkpoint_key?")
    for key in matched:
        if state_dict[key].shape != model_keys[key].shape:
            raise InputError(f"{source!r} does not fit the model: {key} has shape "
                             f"{tuple(state_dict[key].shape)}, the model expects "
                             f"{tuple(model_keys[key].shape)} (check --arch and --patch_size)")
    msg = model.load_state_dict(state_dict, strict=False)
    print(f"Pretrained weights found at {source} and loaded with msg: {msg}")
    if msg.missing_keys:
        warnings.warn(f"{len(msg.missing_keys)} backbone keys were not in {source} and keep "
                      f"random values: {msg.missing_keys[:5]}")


def build_pretrained_backbone(arch: str, patch_size: int, pretrained_weights: str,
                              checkpoint_key: Optional[str], visualisation: bool = False
                              ) -> Tuple[nn.Module, int]:
    """(backbone with weights from a file, the reference release or "random", its width).

    A ViT gets the register tokens that the weights file holds (none otherwise).
    """
    if pretrained_weights in ("", "random"):
        model, embed_dim = build_backbone(arch, patch_size)
        print(f"Model {arch} {patch_size}x{patch_size} built.")
        load_pretrained_weights(model, pretrained_weights, checkpoint_key, canonical_arch(arch),
                                patch_size, visualisation=visualisation)
        return model, embed_dim
    state_dict = read_backbone_weights(pretrained_weights, checkpoint_key)
    vit_options = vit_options_of(state_dict)
    model, embed_dim = build_backbone(arch, patch_size, **vit_options)
    registers = vit_options.get("num_register_tokens", 0)
    print(f"Model {arch} {patch_size}x{patch_size} built"
          + (f" with {registers} register tokens." if registers else "."))
    load_backbone_state_dict(model, state_dict, pretrained_weights)
    return model, embed_dim


def build_frozen_backbone(arch: str, patch_size: int, pretrained_weights: str,
                          checkpoint_key: Optional[str], device: torch.device,
                          visualisation: bool = False) -> Tuple[nn.Module, int]:
    """(pretrained backbone in eval mode with frozen weights on `device`, its feature width)."""
    model, embed_dim = build_pretrained_backbone(arch, patch_size, pretrained_weights,
                                                 checkpoint_key, visualisation)
    for param in model.parameters():
        param.requires_grad = False
    return model.to(device).eval(), embed_dim


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------

class SmoothedValue:
    """A series of values, reported as the median of a window and the global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """All-reduce count and total (the window stays local)."""
        count, self.total = all_reduce_sum([self.count, self.total])
        self.count = int(count)

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named SmoothedValues and a progress line with ETA every `print_freq` iterations."""

    def __init__(self, delimiter: str = "\t"):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(value)

    def __getattr__(self, attr: str):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def running_sums(self) -> Dict[str, Tuple[float, int]]:
        """{name: (total, count)}: what the global averages are made of (for a checkpoint)."""
        return {name: (meter.total, meter.count) for name, meter in self.meters.items()}

    def restore_running_sums(self, sums: Dict[str, Tuple[float, int]]) -> None:
        """Continue the global averages from running_sums() (the windows start empty)."""
        for name, (total, count) in sums.items():
            self.meters[name].total, self.meters[name].count = total, count

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  first: int = 0) -> Iterator:
        """Yield the items, printing progress; `first` numbers them from a later item (a
        resumed epoch), out of first + len(iterable)."""
        total = first + len(iterable)
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.6f}")
        data_time = SmoothedValue(fmt="{avg:.6f}")
        width = len(str(total))
        fields = [header, f"[{{0:>{width}}}/{total}]", "eta: {eta}", "{meters}",
                  "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            fields.append("max mem: {memory:.0f}")
        line = self.delimiter.join(fields)
        for i, obj in enumerate(iterable, start=first):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == first or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                memory = torch.cuda.max_memory_allocated() / 2 ** 20 \
                    if torch.cuda.is_available() else 0
                print(line.format(i, eta=eta, meters=str(self), time=str(iter_time),
                                  data=str(data_time), memory=memory))
            end = time.time()
        total_time = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(total - first, 1):.6f} s / it)")


def append_json_line(path: str, record: dict) -> None:
    """Append one JSON object as a line of a log file (rank 0 only).

    A failed write (a full disk) is cut off again, so that the log never keeps half a line,
    and is an InputError naming the file and the cause.
    """
    if not is_main_process():
        return
    with open(path, "a") as log_file:
        length = log_file.tell()
        try:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        except OSError as error:
            log_file.truncate(length)
            raise write_error(path, error) from error


def truncate_json_log(path: str, first_epoch_to_drop: int) -> None:
    """Drop log lines of epochs a resumed run will redo, so the log holds each epoch once.

    A torn last line (a run killed, or a disk full, during the append) is dropped with a
    warning; any other line that is not JSON is an InputError.
    """
    if not is_main_process() or not os.path.isfile(path):
        return
    with open(path) as log_file:
        lines = [line for line in log_file if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise InputError(f"line {number} of {path!r} is not JSON ({error}): repair or "
                                 "delete the line") from error
            print(f"Warning: dropping the torn last line of {path} (a run stopped while "
                  f"writing it): {line.strip()[:80]!r}")
    # A torn last line has no record, so zip leaves it out.
    kept = [line for line, record in zip(lines, records)
            if record.get("epoch", -1) < first_epoch_to_drop]
    if len(kept) != len(lines):
        tmp_path = f"{path}.tmp{os.getpid()}"
        with open(tmp_path, "w") as log_file:
            log_file.writelines(kept)
        os.replace(tmp_path, path)


# ------------------------------------------------------------------------------------------------
# Pretraining loader (shared by main_dino's PIL path and gpu_augment's canvas path)
# ------------------------------------------------------------------------------------------------

def build_pretraining_loader(dataset: torch.utils.data.Dataset, args: argparse.Namespace,
                             collate_fn: Optional[Callable] = None
                             ) -> torch.utils.data.DataLoader:
    """Shuffled per-rank batches of `args.batch_size_per_gpu`, in whole optimizer steps of
    --grad_accum_steps batches; resumable part-way through an epoch (ResumableSampler)."""
    # main_dino's flag; other scripts' namespaces (and older ones) have no accumulation.
    batches_per_step = getattr(args, "grad_accum_steps", 1)
    sampler = ResumableSampler(dataset, args.batch_size_per_gpu * batches_per_step)
    # The workers' base seeds come from a generator of the loader's own, so that creating an
    # iterator never moves the global random stream (the step's dropout draws).
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
        persistent_workers=args.num_workers > 0, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed), collate_fn=collate_fn)
    if args.num_workers > 0:
        atexit.unregister(kill_daemon_children)
        atexit.register(kill_daemon_children)
    if len(loader) == 0:
        per_step = f"{args.batch_size_per_gpu} per process" if batches_per_step == 1 else \
            f"{args.batch_size_per_gpu} x {batches_per_step} (--grad_accum_steps) per process"
        raise InputError(
            f"{len(dataset)} images in {args.data_path!r} do not fill one batch of "
            f"{per_step} x {get_world_size()} processes: lower --batch_size_per_gpu")
    print(f"Data loaded: there are {len(dataset)} images.")
    return loader


class StepBatches:
    """A loader's batches grouped `per_step` at a time: the micro-batches of each optimizer
    step (lists of one batch without gradient accumulation)."""

    def __init__(self, loader: Iterable, per_step: int):
        self.loader, self.per_step = loader, per_step

    def __len__(self) -> int:
        return len(self.loader) // self.per_step

    def __iter__(self) -> Iterator[list]:
        step = []
        for batch in self.loader:
            step.append(batch)
            if len(step) == self.per_step:
                yield step
                step = []


# ------------------------------------------------------------------------------------------------
# Evaluation helpers (eval_knn.py, eval_linear.py)
# ------------------------------------------------------------------------------------------------

def add_eval_backbone_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the frozen backbone and of its eval-time image sizes (eval_knn, eval_linear)."""
    add_backbone_args(parser, arch_choices())
    parser.add_argument("--resize_size", default=256, type=int,
                        help="Shorter side the eval images are resized to (bicubic) before the "
                             "center crop; lower it together with --crop_size for small images.")
    parser.add_argument("--crop_size", default=224, type=int,
                        help="Side of the eval center crop.")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of every random draw, the same on all ranks, so that "
                             "'--pretrained_weights random' is one network, run after run.")


def add_eval_data_args(parser: argparse.ArgumentParser) -> None:
    """--data_path (train/ and val/ class folders) and --num_workers of the eval scripts."""
    parser.add_argument("--data_path", default="/path/to/imagenet/", type=str,
                        help="Folder holding train/ and val/ image folders (one sub-folder per "
                             "class).")
    parser.add_argument("--num_workers", default=10, type=int,
                        help="Data loading workers per process.")


def eval_loader(dataset: torch.utils.data.Dataset, args: argparse.Namespace,
                sampler: Optional[torch.utils.data.Sampler] = None
                ) -> torch.utils.data.DataLoader:
    """Batches of --batch_size_per_gpu with --num_workers workers, every image kept."""
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), drop_last=False)


def eval_transform(resize_size: int = 256, crop_size: int = 224) -> Callable:
    """Resize (bicubic) -> CenterCrop -> ToTensor -> ImageNet normalisation."""
    transforms = torchvision.transforms
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def image_folder(data_path: str, split: str, transform: Callable,
                 dataset_class: type = torchvision.datasets.ImageFolder):
    """`dataset_class` on `data_path/split`; a missing or empty folder is an InputError."""
    root = os.path.join(data_path, split)
    layout_hint = "--data_path must hold train/ and val/ folders with one sub-folder per class"
    if not os.path.isdir(root):
        raise InputError(f"{root!r} is not a folder: {layout_hint}")
    try:
        return dataset_class(root, transform=transform)
    except FileNotFoundError as error:
        raise InputError(f"no labelled images in {root!r} ({error}): {layout_hint}") from error


def check_same_classes(train_set, val_set) -> None:
    """Labels are folder indices, so train and val must list the same class folders."""
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise InputError(f"train and val class folders differ (only in train: {only_train[:5]}, "
                         f"only in val: {only_val[:5]}): give both the same class sub-folders")


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)
             ) -> List[torch.Tensor]:
    """Top-k accuracies in percent."""
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.reshape(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0) * 100.0 / target.size(0) for k in topk]

