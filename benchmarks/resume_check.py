"""Does a stopped and resumed main_dino run end where the uninterrupted one ends, on this device?

Trains a tiny ViT on 48 digits three ways: uninterrupted; killed (SIGKILL) at --kill_at and
resumed; stopped by SIGTERM at --term_at and resumed, all with --saveckp_iters 4. Prints, for
each resumed run, the largest difference of its final weights and center to the uninterrupted
run's (0: bit-identical) and whether log.txt is the same. main_dino flags after `--` are passed
on, to check other paths (CUDA is used when present; the tests cover the CPU in float32).

Example: python -m benchmarks.resume_check -- --use_fp16 true --grad_accum_steps 2
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import List

import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16",
            "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "64",
            "--batch_size_per_gpu", "8", "--warmup_epochs", "1", "--lr", "0.001", "--epochs", "2",
            "--num_workers", "2", "--saveckp_iters", "4", "--compile", "false"]

# main_dino, with a signal sent at the end of global iteration $STOP_AT ($STOP_HOW: a signal to
# this process, or "group:SIGINT" to its whole process group, as Ctrl-C in a terminal).
STOPPING_RUNNER = """
import argparse, os, signal, sys
import main_dino, utils
stop_at, how = int(os.environ["STOP_AT"]), os.environ["STOP_HOW"]
original = main_dino.training_step
def training_step(training, micro_batches, epoch, it):
    values = original(training, micro_batches, epoch, it)
    if it == stop_at:
        if how.startswith("group:"):
            os.killpg(0, getattr(signal, how[len("group:"):]))
        else:
            os.kill(os.getpid(), getattr(signal, how))
    return values
main_dino.training_step = training_step
parser = argparse.ArgumentParser(parents=[main_dino.get_args_parser()])
utils.run_cli(main_dino.main, parser.parse_args(sys.argv[1:]))
"""


def run_stopping(flags: List[str], stop_at: int = -1,
                 how: str = "SIGKILL") -> subprocess.CompletedProcess:
    """main_dino.py with `flags`, sent signal `how` after global iteration `stop_at`."""
    env = {**os.environ, "STOP_AT": str(stop_at), "STOP_HOW": how}
    return subprocess.run([sys.executable, "-c", STOPPING_RUNNER, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=1200, env=env,
                          start_new_session=True)


def largest_difference(output_dir: str, reference_dir: str) -> float:
    got = utils.load_checkpoint_file(os.path.join(output_dir, "checkpoint.pth"))
    want = utils.load_checkpoint_file(os.path.join(reference_dir, "checkpoint.pth"))
    return max((got[key][name].double() - value.double()).abs().max().item()
               for key in ("student", "teacher", "dino_loss") for name, value in want[key].items())


def same_log(output_dir: str, reference_dir: str) -> bool:
    def read(folder):
        with open(os.path.join(folder, "log.txt")) as log_file:
            return log_file.read()
    return read(output_dir) == read(reference_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill_at", type=int, default=5, help="global iteration (of 12)")
    parser.add_argument("--term_at", type=int, default=7, help="global iteration (of 12)")
    parser.add_argument("--json", default="", help="write the results to this file")
    own, main_dino_flags = sys.argv[1:], []
    if "--" in own:
        own, main_dino_flags = own[:own.index("--")], own[own.index("--") + 1:]
    bench = parser.parse_args(own)

    from sample_data import write_digits_folder

    root = tempfile.mkdtemp(prefix="resume_check_")
    data = write_digits_folder(os.path.join(root, "data"), size=32, limit=48)

    def flags(name):
        return ["--data_path", data, "--output_dir", os.path.join(root, name), *TINY_RUN,
                *main_dino_flags]

    results = {"flags": main_dino_flags}
    runs = [("uninterrupted", -1, "SIGKILL"), ("killed", bench.kill_at, "SIGKILL"),
            ("sigterm", bench.term_at, "SIGTERM")]
    for name, stop_at, how in runs:
        stopped = run_stopping(flags(name), stop_at, how)
        resumed = run_stopping(flags(name)) if stop_at >= 0 else stopped
        if resumed.returncode != 0:
            sys.exit(f"{name}: exit status {resumed.returncode}\n{resumed.stderr[-3000:]}")
        if stop_at >= 0:
            folder, reference = os.path.join(root, name), os.path.join(root, "uninterrupted")
            results[name] = {"stopped_status": stopped.returncode,
                             "largest_difference": largest_difference(folder, reference),
                             "same_log": same_log(folder, reference)}
            print(name, results[name])
    if bench.json:
        with open(bench.json, "w") as json_file:
            json.dump(results, json_file, indent=2)


if __name__ == "__main__":
    main()
