"""Everything worth measuring on one GPU, in one command that fits in about 8 minutes.

Tasks run in priority order while the time budget lasts (a task that would not fit is skipped
and listed), each guarded so that one failure (say, CUDA graphs) does not stop the others:
  - training speed on synthetic crops (benchmarks.train_speed): reference-like, fp16, bf16,
    compiled modules, compiled step, CUDA graphs, packed forward, efficient drop path; ViT-S/16
    at batch 64 and 256, ViT-B/16 at 64; images/s, MFU, peak memory, first-iteration
    (compile) time;
  - main_dino.py end to end on a generated folder of JPEGs (PIL workers; GPU augmentation with
    GPU decoding): steady-state s/it, data wait, first iteration (compile), peak memory;
  - augmenter and decoder throughput (benchmarks.augment_speed);
  - the PIL loader alone: main process idle, busy in Python (holding the GIL), training with
    and without a sync per step, without pinning, with more prefetching, with one main thread.
Results go to one JSON (rewritten after every task; --resume skips the tasks a previous run
finished) and one table. Needs only torch, torchvision, numpy, pillow and scikit-image, and no
network. --smoke runs every kind of task at tiny sizes on the CPU in under a minute.

  timeout 540 python -m benchmarks.gpu_suite --output gpu_suite.json
  python -m benchmarks.gpu_suite --output gpu_suite.json --resume   # the tasks left over
  python -m benchmarks.gpu_suite --smoke --output smoke.json
"""
import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torchvision
from PIL import Image
from skimage import data

import main_dino
import utils
from benchmarks import augment_speed, train_speed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina")
# The setting: ViT-S/16, 2x224 + 8x96 crops, out_dim 65536, 500x375 JPEGs.
FULL = dict(arch="vit_small", batch=64, large_batch=256, big_arch="vit_base", out_dim=65536,
            global_size=224, local_size=96, local_number=8, iters=15, warmup=3, split=5,
            images=3200, image_size=(500, 375), workers=12, canvas=512, loader_batches=20)
SMOKE = dict(arch="vit_tiny", batch=4, large_batch=8, big_arch="vit_tiny", out_dim=256,
             global_size=32, local_size=16, local_number=2, iters=2, warmup=1, split=1,
             images=48, image_size=(64, 48), workers=1, canvas=64, loader_batches=3)
STEP_LINE = re.compile(r"Epoch: \[\d+/\d+\]\s+\[\s*(\d+)/(\d+)\].*time: ([\d.]+)\s+"
                       r"data: ([\d.]+)(?:\s+max mem: (\d+))?")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="gpu_suite.json", help="the JSON file")
    parser.add_argument("--budget_s", type=float, default=450,
                        help="time budget in seconds: tasks that would not fit are skipped")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU (CI): every kind of task, < 60 s")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished tasks of --output and run the others")
    parser.add_argument("--table_only", action="store_true",
                        help="only print the table of --output (e.g. after a timeout)")
    parser.add_argument("--work_dir", default="/tmp/dino_gpu_suite",
                        help="where the generated JPEG folder and run outputs go")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default 12, or the CPU count - 2 if lower)")
    return parser


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    estimate_s: float  # on an H200-class GPU, with a warm compile cache where it applies
    run: Callable[["Suite"], List[dict]]


@dataclass
class Suite:
    args: argparse.Namespace
    sizes: dict
    device: torch.device
    report: dict
    started: float = field(default_factory=time.time)

    def remaining_s(self) -> float:
        return self.args.budget_s - (time.time() - self.started)

    def save(self) -> None:
        with open(self.args.output, "w") as output:
            json.dump(self.report, output, indent=1)

    def run(self, task: Task) -> None:
        tasks = self.report["tasks"]
        if task.name in tasks and "rows" in tasks[task.name]:
            return  # finished in the run being resumed
        if not self.args.smoke and task.estimate_s > self.remaining_s():
            tasks[task.name] = {"skipped": f"needs ~{task.estimate_s:.0f} s, "
                                           f"{max(self.remaining_s(), 0):.0f} s left"}
            return
        print(f"== {task.name} ({self.remaining_s():.0f} s left)", flush=True)
        start = time.time()
        try:
            tasks[task.name] = {"rows": task.run(self)}
        except Exception as error:  # one failing task must not stop the suite
            traceback.print_exc()
            tasks[task.name] = {"error": f"{type(error).__name__}: {error}"}
        tasks[task.name]["seconds"] = time.time() - start
        free_device_memory()
        self.save()

    @property
    def folder(self) -> str:
        return jpeg_folder(self.args.work_dir, self.sizes)

    def reference_rate(self, label: str) -> Optional[float]:
        """images/s of a finished reference row (the ratio's denominator)."""
        for task in self.report["tasks"].values():
            for r in task.get("rows", []):
                if r["item"] == label:
                    return r["images_per_s"]
        return None


def free_device_memory() -> None:
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def row(item: str, images_per_s: Optional[float], ms_per_it: Optional[float] = None,
        detail: str = "", raw: Optional[dict] = None) -> dict:
    """One table line; raw keeps every number measured for it."""
    return {"item": item, "images_per_s": images_per_s, "ms_per_it": ms_per_it,
            "detail": detail, "raw": raw or {}}


# ------------------------------------------------------------------------------------------------
# Training speed on synthetic crops
# ------------------------------------------------------------------------------------------------

def train_task(arch_key: str, batch_key: str, configs: List[str]) -> Callable:
    def run(suite: Suite) -> List[dict]:
        s = suite.sizes
        bench = train_speed.get_args_parser().parse_args([
            "--arch", s[arch_key], "--patch_size", "16", "--out_dim", str(s["out_dim"]),
            "--batch_size", str(s[batch_key]), "--global_crops_size", str(s["global_size"]),
            "--local_crops_size", str(s["local_size"]), "--local_crops_number",
            str(s["local_number"]), "--iters", str(s["iters"]), "--warmup_iters", str(s["warmup"]),
            "--split_iters", str(s["split"]), "--configs", *configs])
        _, peak_tflops = train_speed.device_name_and_peak(suite.device, None)
        flops = train_speed.count_flops_per_image(bench, suite.device)
        rows, own_reference = [], None
        for name in configs:
            label = f"{s[arch_key]}/16 b{s[batch_key]} {name}"
            try:
                result = train_speed.benchmark_config(name, bench, suite.device, flops,
                                                      peak_tflops)
            except Exception as error:
                traceback.print_exc()
                rows.append(row(label, None, detail=f"failed: {type(error).__name__}: "
                                                    f"{str(error)[:200]}"))
                free_device_memory()
                continue
            if name == "reference":
                own_reference = result["images_per_s"]
            reference = own_reference or suite.reference_rate(
                f"{s[arch_key]}/16 b{s[batch_key]} reference")
            ratio = result["images_per_s"] / reference if reference else float("nan")
            mfu = f"MFU {100 * result['mfu']:.1f}%, " if result["mfu"] else ""
            rows.append(row(label, result["images_per_s"], 1000 * result["seconds_per_iter"],
                            f"{mfu}x ref {ratio:.2f}, "
                            f"{result['peak_memory_mb'] / 1024:.1f} GB, "
                            f"1st it {result['first_iter_s']:.1f} s", raw=result))
        return rows
    return run


# ------------------------------------------------------------------------------------------------
# main_dino.py end to end on a JPEG folder
# ------------------------------------------------------------------------------------------------

def write_jpeg(job) -> None:
    path, index, size = job
    rng = np.random.default_rng(index)
    photo = Image.fromarray(getattr(data, PHOTOS[index % len(PHOTOS)])()).convert("RGB")
    width, height = size if index % 4 else size[::-1]  # a quarter are portrait
    scale = rng.uniform(0.5, 1.0)
    crop_w, crop_h = int(photo.width * scale), int(photo.height * scale)
    left = rng.integers(0, photo.width - crop_w + 1)
    top = rng.integers(0, photo.height - crop_h + 1)
    image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height),
                                                                        Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.save(path, quality=90)


def jpeg_folder(work_dir: str, sizes: dict) -> str:
    """The generated folder (class sub-folders of JPEGs), written once per work_dir and size."""
    count, size = sizes["images"], sizes["image_size"]
    root = os.path.join(work_dir, f"jpegs_{count}_{size[0]}x{size[1]}")
    done = os.path.join(root, "complete")
    if not os.path.exists(done):
        jobs = []
        for index in range(count):
            folder = os.path.join(root, f"class{index % 10}")
            os.makedirs(folder, exist_ok=True)
            jobs.append((os.path.join(folder, f"{index:05}.jpg"), index, size))
        # Forked before the suite initialises CUDA; the writers only need PIL.
        with multiprocessing.get_context("fork").Pool(max(1, (os.cpu_count() or 2) - 1)) as pool:
            pool.map(write_jpeg, jobs, chunksize=16)
        open(done, "w").close()
    return root


def parse_progress(stdout: str) -> dict:
    """First-iteration time and the last progress line's windowed s/it, data wait, memory."""
    steps = [match.groups() for match in STEP_LINE.finditer(stdout)]
    if not steps:
        raise RuntimeError("no progress line in main_dino's output:\n" + stdout[-2000:])
    first, last = steps[0], steps[-1]
    return {"first_iter_s": float(first[2]), "seconds_per_iter": float(last[2]),
            "data_wait_s": float(last[3]), "peak_memory_mb": float(last[4] or 0),
            "iterations": int(last[1])}


def e2e_task(label: str, flags: List[str]) -> Callable:
    def run(suite: Suite) -> List[dict]:
        s = suite.sizes
        folder = suite.folder
        output_dir = os.path.join(suite.args.work_dir, "run_" + re.sub(r"\W+", "_", label))
        command = [sys.executable, "main_dino.py", "--data_path", folder, "--output_dir",
                   output_dir, "--arch", s["arch"], "--out_dim", str(s["out_dim"]),
                   "--global_crops_size", str(s["global_size"]),
                   "--local_crops_size", str(s["local_size"]),
                   "--local_crops_number", str(s["local_number"]),
                   "--batch_size_per_gpu", str(s["batch"]), "--num_workers", str(s["workers"]),
                   "--canvas_size", str(s["canvas"]), "--epochs", "1", "--warmup_epochs", "0",
                   "--saveckp_freq", "0", *flags]
        if suite.args.smoke:  # fp32 and no compilation on a CPU
            command += ["--compile", "false", "--use_bf16", "false"]
        # A process of its own: not this process group's rendezvous port.
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        start = time.time()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                                timeout=300 if suite.args.smoke else
                                min(240, max(60, suite.remaining_s() + 30)))
        if result.returncode != 0:
            raise RuntimeError(f"main_dino exited {result.returncode}: {result.stderr[-1500:]}")
        stats = parse_progress(result.stdout)
        stats["wall_s"] = time.time() - start
        per_s = s["batch"] / stats["seconds_per_iter"]
        return [row(f"main_dino {label}", per_s, 1000 * stats["seconds_per_iter"],
                    f"data wait {1000 * stats['data_wait_s']:.0f} ms, 1st it "
                    f"{stats['first_iter_s']:.1f} s, {stats['peak_memory_mb'] / 1024:.1f} GB, "
                    f"run {stats['wall_s']:.0f} s", raw={"command": " ".join(command[1:]),
                                                         **stats})]
    return run


# ------------------------------------------------------------------------------------------------
# Augmenter and decoders
# ------------------------------------------------------------------------------------------------

def augment_task(suite: Suite) -> List[dict]:
    s = suite.sizes
    rows = []
    for canvas_size in sorted({s["canvas"], s["canvas"] // 2}, reverse=True):
        args = augment_speed.get_args_parser().parse_args([
            "--device", suite.device.type, "--batch_size", str(s["batch"]),
            "--canvas_size", str(canvas_size), "--global_crops_size", str(s["global_size"]),
            "--local_crops_size", str(s["local_size"]),
            "--local_crops_number", str(s["local_number"]),
            "--pil_images", "20" if not suite.args.smoke else "2",
            "--batches", "10" if not suite.args.smoke else "1"])
        photo = Image.fromarray(data.chelsea())
        eager_s = augment_speed.augmenter_seconds_per_batch(photo, args)
        rows.append(row(f"augmenter canvas {canvas_size}, batch {s['batch']}",
                        s["batch"] / eager_s, 1000 * eager_s, "eager"))
        if suite.device.type == "cuda" and canvas_size == s["canvas"]:
            compiled_s = augment_speed.augmenter_seconds_per_batch(photo, args, True)
            rows.append(row(f"augmenter canvas {canvas_size}, batch {s['batch']}",
                            s["batch"] / compiled_s, 1000 * compiled_s, "compiled"))
        decode_s = augment_speed.device_decode_seconds_per_batch(photo, args)
        rows.append(row(f"decode JPEGs onto canvas {canvas_size} on {suite.device.type}",
                        s["batch"] / decode_s, 1000 * decode_s, "main process, per batch"))
    worker = augment_speed.worker_timings(photo, args)
    for name, key in (("PIL decode", "decode_s"), ("torchvision decode", "torchvision_decode_s"),
                      ("PIL DataAugmentationDINO", "pil_augment_s"),
                      ("canvas (decoded image)", "canvas_s"), ("read file bytes", "read_bytes_s")):
        rows.append(row(f"worker: {name}", 1 / worker[key], None, "one thread, per worker"))
    return rows


# ------------------------------------------------------------------------------------------------
# The PIL loader on its own
# ------------------------------------------------------------------------------------------------

def loader_args(suite: Suite, **changes) -> argparse.Namespace:
    s = suite.sizes
    args = main_dino.get_args_parser().parse_args([
        "--data_path", suite.folder, "--batch_size_per_gpu", str(s["batch"]),
        "--num_workers", str(s["workers"]), "--global_crops_size", str(s["global_size"]),
        "--local_crops_size", str(s["local_size"]), "--local_crops_number",
        str(s["local_number"]), "--arch", s["arch"], "--out_dim", str(s["out_dim"]),
        "--use_bf16", "true" if suite.device.type == "cuda" else "false",
        "--packed_forward", "true", "--epochs", "1", "--warmup_epochs", "0"])
    args.gpu, args.compile = 0, False
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def python_busy(seconds: float) -> None:
    """Hold the GIL for `seconds`, as a main thread busy in Python (kernel launches) does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(200))


def loader_rate(suite: Suite, between: Callable[[List[torch.Tensor]], None],
                pin_memory: bool = True, prefetch_factor: int = 2,
                switch_interval: Optional[float] = None) -> Dict[str, float]:
    """Images/s and mean wait per batch of main_dino's PIL loader over the measured batches;
    switch_interval: how often (s) a thread holding the GIL hands it over (Python's: 0.005)."""
    default_interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval or default_interval)
    try:
        return timed_loader(suite, between, pin_memory, prefetch_factor)
    finally:
        sys.setswitchinterval(default_interval)


def timed_loader(suite: Suite, between: Callable[[List[torch.Tensor]], None], pin_memory: bool,
                 prefetch_factor: int) -> Dict[str, float]:
    args = loader_args(suite)
    dataset = main_dino.build_data_loader(args).dataset
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size_per_gpu, shuffle=True, drop_last=True,
        num_workers=args.num_workers, prefetch_factor=prefetch_factor,
        pin_memory=pin_memory and suite.device.type == "cuda")
    prepare = main_dino.CropPreparer(args, suite.device)
    batches, waited = iter(loader), 0.0
    between(prepare(next(batches)[0]))  # workers started, first batch ready
    count = suite.sizes["loader_batches"]
    start = time.perf_counter()
    for _ in range(count):
        before = time.perf_counter()
        crops = prepare(next(batches)[0])
        waited += time.perf_counter() - before
        between(crops)
    seconds = time.perf_counter() - start
    return {"images_per_s": count * args.batch_size_per_gpu / seconds,
            "wait_ms": 1000 * waited / count}


def loader_task(suite: Suite) -> List[dict]:
    """Where the PIL path loses time on a GPU box: each line changes one thing."""
    training = main_dino.build_training(loader_args(suite), suite.device, 10_000)
    step = {"it": 0}

    def train(crops, sync=False, threads=None):
        if threads:
            torch.set_num_threads(threads)
        main_dino.training_step(training, [crops], 0, step["it"])
        step["it"] += 1
        if sync and suite.device.type == "cuda":
            torch.cuda.synchronize()

    step_s = 0.15 if suite.device.type == "cuda" else 0.02
    threads = torch.get_num_threads()
    variants = [
        ("idle main process", lambda crops: None, {}),
        (f"main busy in Python {1000 * step_s:.0f} ms/batch (holds the GIL)",
         lambda crops: python_busy(step_s), {}),
        ("... and no pin_memory thread", lambda crops: python_busy(step_s),
         {"pin_memory": False}),
        ("... and a 0.5 ms GIL switch interval", lambda crops: python_busy(step_s),
         {"switch_interval": 0.0005}),
        ("main training, no sync (ours)", train, {}),
        ("main training, 0.5 ms GIL switch interval", train, {"switch_interval": 0.0005}),
        ("main training, sync every step (reference)", lambda crops: train(crops, sync=True), {}),
        ("main training, prefetch_factor 4", train, {"prefetch_factor": 4}),
        ("main training, 1 torch thread in main", lambda crops: train(crops, threads=1), {}),
    ]
    rows = []
    for name, between, options in variants:
        result = loader_rate(suite, between, **options)
        torch.set_num_threads(threads)
        rows.append(row(f"PIL loader, {name}", result["images_per_s"], None,
                        f"wait {result['wait_ms']:.0f} ms/batch, {suite.sizes['workers']} "
                        f"workers", raw=result))
    return rows


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------

FAST_FLAGS = ["--use_bf16", "true", "--compile_scope", "step", "--packed_forward", "true"]


def tasks_for(smoke: bool) -> List[Task]:
    """The plan in priority order; --smoke: every kind of task, fp32, nothing compiled (CPU
    compilation takes minutes)."""
    if smoke:
        baseline, fast = ["reference", "fp32", "fp32+packed", "fp32+skipdrop"], "fp32+packed"
        return [Task("train", 0, train_task("arch", "batch", baseline)),
                Task("train large batch", 0, train_task("arch", "large_batch", [fast])),
                Task("e2e PIL", 0, e2e_task("PIL workers", [])),
                Task("e2e GPU augment + decode", 0, e2e_task(
                    "GPU augment + decode", ["--gpu_augment", "true", "--gpu_decode", "true",
                                             "--packed_forward", "true"])),
                Task("augmenter and decoders", 0, augment_task),
                Task("PIL loader", 0, loader_task)]
    baseline, fast = ["reference", "fp16", "bf16"], "bf16+step+packed"
    return [
        Task("train ViT-S b64", 40, train_task("arch", "batch", baseline)),
        Task("train ViT-S b64 compiled", 110, train_task("arch", "batch", [
            "bf16+step+packed", "bf16+step+packed+graphs"])),
        Task("e2e GPU augment + decode, fast flags", 80, e2e_task(
            "GPU augment + decode, bf16 step packed",
            ["--gpu_augment", "true", "--gpu_decode", "true", *FAST_FLAGS])),
        Task("augmenter and decoders", 60, augment_task),
        Task("PIL loader", 70, loader_task),
        Task("e2e PIL, --compile false", 50, e2e_task("PIL workers, --compile false",
                                                      ["--compile", "false"])),
        Task("train ViT-S b256", 90, train_task("arch", "large_batch", ["reference", fast])),
        Task("train ViT-B b64", 90, train_task("big_arch", "batch", ["reference", fast])),
        Task("e2e PIL, defaults", 90, e2e_task("PIL workers, defaults", [])),
        Task("e2e GPU augment, defaults", 80, e2e_task("GPU augment (canvas), defaults",
                                                        ["--gpu_augment", "true"])),
        Task("train ViT-S b64 more", 200, train_task("arch", "batch", [
            "fp16+compile", "bf16+compile", "bf16+packed", "bf16+step+packed+skipdrop"])),
    ]


def print_table(report: dict) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, {report['cpus']} CPUs\n")
    print(f"{'measurement':<62}{'images/s':>10}{'ms/it':>9}  detail")
    for name, task in report["tasks"].items():
        if "rows" not in task:
            print(f"{name:<62}{'':>10}{'':>9}  {task.get('skipped') or task.get('error')}")
            continue
        for r in task["rows"]:
            rate = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
            ms = f"{r['ms_per_it']:.1f}" if r["ms_per_it"] else ""
            print(f"{r['item'][:61]:<62}{rate:>10}{ms:>9}  {r['detail']}")


def main(args: argparse.Namespace) -> None:
    if args.table_only:
        with open(args.output) as saved:
            print_table(json.load(saved))
        return
    sizes = dict(SMOKE if args.smoke else FULL)
    sizes["workers"] = args.workers or min(sizes["workers"], max(1, (os.cpu_count() or 2) - 2))
    os.makedirs(args.work_dir, exist_ok=True)
    report = {"tasks": {}}
    if args.resume and os.path.isfile(args.output):
        with open(args.output) as previous:
            report = json.load(previous)
    jpeg_folder(args.work_dir, sizes)  # before CUDA is initialised: its writers are forked
    init_args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(init_args)
    device = utils.device_of(init_args)
    if args.smoke:
        device = torch.device("cpu")
    elif device.type != "cuda":
        print("Note: no GPU found; use --smoke on a CPU (full sizes would take hours).")
    torch.backends.cudnn.benchmark = True
    report.update(device=train_speed.device_name_and_peak(device, None)[0],
                  torch=torch.__version__, torchvision=torchvision.__version__,
                  cpus=os.cpu_count(), sizes=sizes, smoke=args.smoke, budget_s=args.budget_s)
    suite = Suite(args, sizes, device, report)
    for task in tasks_for(args.smoke):
        suite.run(task)
    report["total_s"] = time.time() - suite.started
    suite.save()
    print_table(report)
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
