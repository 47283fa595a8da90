"""Training-speed benchmark: main_dino's own step under several configurations, side by side.

For each configuration it reports images/s, model FLOPs utilisation, peak memory and, from a
second pass with a device sync around every phase, the seconds per iteration spent in data,
teacher forward, student forward + loss, backward, optimizer and EMA. The "reference" config
reproduces how the original implementation spends its time (see reference_like.py), so every
gain is a ratio measured in the same run. Prints a table and writes JSON.

A configuration is "reference" or a precision (fp32, fp16, bf16) followed by options joined
with "+": compile (torch.compile of backbones and heads), step (the forward passes and loss as one
compiled graph), graphs (CUDA graphs: compile mode reduce-overhead), packed (--packed_forward),
skipdrop (--efficient_drop_path), ddp (DDP even in one process, as the reference). "bf16-compile"
is read as "bf16+compile".

Example (one GPU): python -m benchmarks.train_speed --arch vit_small --batch_size 64 \
    --configs reference fp16 bf16 bf16+compile bf16+step+packed+graphs --json speed.json
"""
import argparse
import json
import resource
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

import gpu_augment
import main_dino
import utils
from benchmarks import reference_like

PRECISIONS = ("fp32", "fp16", "bf16")
OPTIONS = ("compile", "step", "graphs", "packed", "skipdrop", "ddp")
# A function returning the next batch of crops on the device.
CropSource = Callable[[], List[torch.Tensor]]
PHASES = ("data", "teacher_forward", "student_forward_loss", "backward", "optimizer", "ema")
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU when --peak_tflops is not given.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "V100": 125.0, "L40": 362.0}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--batch_size", type=int, default=64, help="images per step")
    parser.add_argument("--global_crops_size", type=int, default=224)
    parser.add_argument("--local_crops_size", type=int, default=96)
    parser.add_argument("--local_crops_number", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=["reference", "fp16", "bf16"],
                        type=checked_config, help="see above")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per config")
    parser.add_argument("--warmup_iters", type=int, default=5,
                        help="untimed iterations first (compilation, cudnn autotuning); at "
                             "least 1")
    parser.add_argument("--split_iters", type=int, default=10,
                        help="iterations of the phase-by-phase pass (0 to skip it)")
    parser.add_argument("--data_path", default="",
                        help="image folder for the real data path (PIL augmentation in the "
                             "DataLoader workers, or --gpu_augment); synthetic crops on the "
                             "device when empty")
    parser.add_argument("--num_workers", type=int, default=10)
    gpu_augment.add_gpu_augment_args(parser)
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="device peak for MFU (default: known GPUs' bf16 dense peak)")
    parser.add_argument("--json", default="", help="write the results to this file")
    return parser


def config_parts(name: str) -> Tuple[str, set]:
    """(precision, options) of a configuration name; the reference is fp16 with DDP."""
    if name == "reference":
        return "fp16", {"ddp"}
    precision, *options = name.replace("-", "+").split("+")
    return precision, set(options)


def checked_config(name: str) -> str:
    precision, options = config_parts(name)
    if precision not in PRECISIONS or not options <= set(OPTIONS):
        raise argparse.ArgumentTypeError(
            f"{name!r}: use reference, or one of {PRECISIONS} then +options from {OPTIONS}")
    return name


def main_dino_args(bench: argparse.Namespace, name: str) -> argparse.Namespace:
    """main_dino's defaults with the benchmark's model, crops, precision and options."""
    precision, options = config_parts(name)
    args = main_dino.get_args_parser().parse_args([])
    for option in ("arch", "patch_size", "out_dim", "local_crops_number", "global_crops_size",
                   "local_crops_size", "num_workers", "data_path", "gpu_augment", "canvas_size"):
        setattr(args, option, getattr(bench, option))
    args.batch_size_per_gpu = bench.batch_size
    args.use_fp16, args.use_bf16 = precision == "fp16", precision == "bf16"
    args.compile = bool(options & {"compile", "step"})
    args.compile_scope = "step" if "step" in options else "modules"
    args.compile_mode = "reduce-overhead" if "graphs" in options else "default"
    args.packed_forward, args.efficient_drop_path = "packed" in options, "skipdrop" in options
    args.epochs, args.warmup_epochs = 1, 0
    args.gpu = 0
    return args


def build_config(name: str, bench: argparse.Namespace, device: torch.device,
                 total_iters: int) -> Tuple[main_dino.DinoTraining, argparse.Namespace]:
    """main_dino's own training bundle; the reference config swaps in the reference's parts."""
    args = main_dino_args(bench, name)
    # One "epoch" covers every iteration, so the schedules never run out.
    training = main_dino.build_training(args, device, total_iters)
    if "ddp" in config_parts(name)[1] and isinstance(training.student, utils.SingleProcessWrapper):
        device_ids = [device.index] if device.type == "cuda" else None
        training.student = torch.nn.parallel.DistributedDataParallel(training.student.module,
                                                                     device_ids=device_ids)
    if name == "reference":
        reference_like.use_explicit_attention(training.student)
        reference_like.use_explicit_attention(training.teacher)
        training.optimizer = torch.optim.AdamW(utils.get_params_groups(training.student))
    return training, args


class PhaseTimer:
    """Accumulates wall time per phase, syncing the device around each when enabled."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.seconds: Dict[str, float] = {phase: 0.0 for phase in PHASES}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[phase] += time.perf_counter() - start


def training_step(training: main_dino.DinoTraining, reference: bool, crops: List[torch.Tensor],
                  it: int, timer: PhaseTimer) -> torch.Tensor:
    """main_dino's step, phase by phase; the reference config substitutes the pairwise loss,
    per-parameter clipping with host syncs, a Python-loop EMA and a sync every iteration.
    A compiled step's teacher forward is timed with the student's. Returns [loss, ...] on the
    device."""
    main_dino.set_schedules(training.optimizer, training.schedules, it)
    if training.forward_loss is not main_dino.forward_loss:
        with timer("student_forward_loss"):
            loss, diagnostics = training.forward_loss(
                training.student, training.teacher, training.dino_loss, crops, 0,
                training.autocast)
            values = torch.cat((loss.detach().reshape(1), diagnostics))
    else:
        with timer("teacher_forward"), training.autocast:
            teacher_output = training.teacher(crops[:2])
        with timer("student_forward_loss"), training.autocast:
            student_output = training.student(crops)
            if reference:
                loss = reference_like.dino_loss_pairwise(training.dino_loss, student_output,
                                                         teacher_output, 0)
                values = loss.detach().reshape(1)
            else:
                loss, diagnostics = training.dino_loss(student_output, teacher_output, 0,
                                                       return_diagnostics=True)
                values = torch.cat((loss.detach().reshape(1), diagnostics))
    with timer("backward"):
        main_dino.backward(loss, training.optimizer, training.fp16_scaler)
    with timer("optimizer"):
        clip_grad = training.clip_grad
        if reference:
            reference_like.unscale_and_clip_per_parameter(training.student, training.optimizer,
                                                          training.fp16_scaler, clip_grad)
            clip_grad = 0.0
        main_dino.clip_and_step(training.student, training.optimizer, training.fp16_scaler, 0,
                                clip_grad, training.freeze_last_layer)
    ema = reference_like.update_teacher_per_parameter if reference else main_dino.update_teacher
    with timer("ema"):
        ema(training.student_params, training.teacher_params,
            float(training.schedules["momentum"][it]))
    if reference:
        values.item()  # the reference reads the loss back every iteration
    return values


def crop_source(bench: argparse.Namespace, args: argparse.Namespace,
                device: torch.device) -> CropSource:
    """A function returning the next batch of crops on the device (synthetic or real data)."""
    if not bench.data_path:
        sizes = [bench.global_crops_size] * 2 + [bench.local_crops_size] * bench.local_crops_number
        crops = [torch.randn(bench.batch_size, 3, s, s, device=device) for s in sizes]
        return lambda: crops
    loader = main_dino.build_data_loader(args)
    prepare_crops = main_dino.CropPreparer(args, device)

    def batches():
        while True:
            for crops, _ in loader:
                yield crops

    stream = batches()
    return lambda: prepare_crops(next(stream))


class Timing(NamedTuple):
    seconds: float      # wall-clock
    cpu_seconds: float  # this process's CPU time: time-sharing with other jobs does not count
    last_loss: float


def run_iterations(training: main_dino.DinoTraining, reference: bool, next_crops: CropSource,
                   first_it: int, count: int, timer: PhaseTimer) -> Timing:
    """Times of `count` iterations and the last loss."""
    start, cpu_start = time.perf_counter(), time.process_time()
    values = torch.full((1,), float("nan"))
    for it in range(first_it, first_it + count):
        with timer("data"):
            crops = next_crops()
        values = training_step(training, reference, crops, it, timer)
        if it % main_dino.PRINT_FREQ == 0:
            values.tolist()  # main_dino reads its queued stats back at every progress line
    last_loss = values[0].item()
    return Timing(time.perf_counter() - start, time.process_time() - cpu_start, last_loss)


def count_flops_per_image(bench: argparse.Namespace, device: torch.device) -> float:
    """Model FLOPs of one training step (teacher forward, student forward and backward)."""
    counting = argparse.Namespace(**vars(bench))
    counting.batch_size = 2
    training, _ = build_config("reference", counting, device, total_iters=1)
    sizes = [bench.global_crops_size] * 2 + [bench.local_crops_size] * bench.local_crops_number
    crops = [torch.randn(2, 3, s, s, device=device) for s in sizes]
    with FlopCounterMode(display=False) as counter:
        loss, _ = main_dino.forward_loss(training.student, training.teacher, training.dino_loss,
                                         crops, 0, nullcontext())
        loss.backward()
    return counter.get_total_flops() / 2


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak so far


def pil_images_per_second(bench: argparse.Namespace, count: int = 20) -> float:
    """One worker's rate for DataAugmentationDINO (decode, 2+N crops, PIL ops, to tensors)."""
    from PIL import Image

    transform = main_dino.DataAugmentationDINO(
        (0.4, 1.0), (0.05, 0.4), bench.local_crops_number, bench.global_crops_size,
        bench.local_crops_size)
    if bench.data_path:
        dataset = utils.ImageFiles(bench.data_path, transform)
        items = [dataset.paths[i % len(dataset.paths)] for i in range(count)]
        load = lambda path: Image.open(path).convert("RGB")  # noqa: E731
    else:
        from skimage import data as sample_photos
        photo = Image.fromarray(sample_photos.astronaut()).resize((500, 375))
        items, load = [photo] * count, (lambda image: image)
    start = time.perf_counter()
    for item in items:
        transform(load(item))
    return count / (time.perf_counter() - start)


def benchmark_config(name: str, bench: argparse.Namespace, device: torch.device,
                     flops_per_image: float, peak_tflops: Optional[float]) -> dict:
    total = bench.warmup_iters + bench.iters + bench.split_iters
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    training, args = build_config(name, bench, device, total)
    reference = name == "reference"
    next_crops = crop_source(bench, args, device)
    # The first iteration compiles (with compile options) and autotunes: timed on its own.
    first_iter_s = run_iterations(training, reference, next_crops, 0, 1,
                                  PhaseTimer(device, False)).seconds
    run_iterations(training, reference, next_crops, 1, bench.warmup_iters - 1,
                   PhaseTimer(device, False))
    seconds, cpu_seconds, last_loss = run_iterations(training, reference, next_crops,
                                                     bench.warmup_iters,
                                        bench.iters, PhaseTimer(device, False))
    images_per_s = bench.batch_size * bench.iters / seconds
    split = PhaseTimer(device, True)
    if bench.split_iters:
        run_iterations(training, reference, next_crops, bench.warmup_iters + bench.iters,
                       bench.split_iters, split)
    result = {
        "config": name,
        "images_per_s": images_per_s,
        "images_per_cpu_s": bench.batch_size * bench.iters / cpu_seconds,
        "seconds_per_iter": seconds / bench.iters,
        "mfu": images_per_s * flops_per_image / (peak_tflops * 1e12) if peak_tflops else None,
        "first_iter_s": first_iter_s,
        "peak_memory_mb": peak_memory_mb(device),
        "phase_seconds_per_iter": {phase: seconds / max(bench.split_iters, 1)
                                   for phase, seconds in split.seconds.items()},
        "final_loss": last_loss,
    }
    del training
    torch._dynamo.reset()
    return result


def print_table(results: List[dict]) -> None:
    reference = next((r for r in results if r["config"] == "reference"), None)
    header = (f"{'config':<24}{'img/s':>9}{'x ref':>7}{'img/CPU-s':>10}{'MFU':>7}{'mem MB':>9}"
              f"{'1st it s':>9}  " + "".join(f"{p[:12]:>13}" for p in PHASES))
    print(header)
    for r in results:
        ratio = r["images_per_s"] / reference["images_per_s"] if reference else float("nan")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        phases = "".join(f"{1000 * r['phase_seconds_per_iter'][p]:>11.1f}ms" for p in PHASES)
        print(f"{r['config']:<24}{r['images_per_s']:>9.1f}{ratio:>7.2f}"
              f"{r['images_per_cpu_s']:>10.1f}{mfu:>7}{r['peak_memory_mb']:>9.0f}"
              f"{r['first_iter_s']:>9.1f}  {phases}")


def device_name_and_peak(device: torch.device, peak_tflops: Optional[float]
                         ) -> Tuple[str, Optional[float]]:
    """The device's name and its peak TFLOP/s for MFU (given, or a known GPU's bf16 peak)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name, peak_tflops or next((peak for key, peak in PEAK_TFLOPS.items() if key in name),
                                     None)


def main() -> None:
    bench = get_args_parser().parse_args()
    if bench.warmup_iters < 1:
        raise SystemExit("--warmup_iters must be at least 1")
    init_args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(init_args)
    device = utils.device_of(init_args)
    torch.backends.cudnn.benchmark = True
    device_name, peak_tflops = device_name_and_peak(device, bench.peak_tflops)
    flops_per_image = count_flops_per_image(bench, device)
    print(f"device: {device_name}; {flops_per_image / 1e9:.1f} GFLOP per image per step; "
          f"peak for MFU: {peak_tflops} TFLOP/s")
    results = [benchmark_config(name, bench, device, flops_per_image, peak_tflops)
               for name in bench.configs]
    pil_rate = pil_images_per_second(bench)
    print_table(results)
    print(f"PIL augmentation (DataAugmentationDINO): {pil_rate:.1f} images/s per worker")
    report = {"device": device_name, "torch": torch.__version__, "settings": vars(bench),
              "flops_per_image": flops_per_image, "peak_tflops": peak_tflops,
              "pil_images_per_s_per_worker": pil_rate, "results": results}
    if bench.json:
        with open(bench.json, "w") as out:
            json.dump(report, out, indent=2)
    utils.cleanup_distributed()


if __name__ == "__main__":
    main()
