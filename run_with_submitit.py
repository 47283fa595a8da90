"""Launch main_dino through submitit on Slurm (or on this machine with --cluster local).

A job preempted or reaching its time limit requeues itself and resumes from checkpoint.pth.
"""
import argparse
import getpass
import os
import uuid
from pathlib import Path
from typing import List, Optional

import submitit

import main_dino
import utils

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
REFERENCE_SHARED_ROOT = "/checkpoint"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("Submitit for DINO", parents=[main_dino.get_args_parser()])
    parser.add_argument("--ngpus", default=8, type=int,
                        help="Number of gpus to request on each node (one task per gpu)")
    parser.add_argument("--nodes", default=2, type=int, help="Number of nodes to request")
    parser.add_argument("--timeout", default=2800, type=int, help="Duration of the job, in minutes")
    parser.add_argument("--partition", default="learnfair", type=str,
                        help="Partition where to submit")
    parser.add_argument("--use_volta32", action="store_true",
                        help="Request 32G V100 GPUs (Slurm constraint volta32gb)")
    parser.add_argument("--comment", default="", type=str,
                        help="Comment to pass to scheduler, e.g. priority message")
    parser.add_argument("--shared_folder", default=None, type=str,
                        help="Folder that every node can read and write: it holds the rendezvous "
                             "file, and the outputs when --output_dir is ''. Default: "
                             f"{REFERENCE_SHARED_ROOT}/$USER/experiments when "
                             f"{REFERENCE_SHARED_ROOT} exists.")
    parser.add_argument("--account", default=None, type=str, help="Slurm account to charge")
    parser.add_argument("--qos", default=None, type=str, help="Slurm quality of service")
    parser.add_argument("--constraint", default=None, type=str,
                        help="Slurm node constraint (combined with --use_volta32 by '&')")
    parser.add_argument("--mem_gb", default=None, type=int,
                        help="Memory per node in GB (default: 40 x ngpus)")
    parser.add_argument("--cpus_per_task", default=10, type=int, help="CPUs per task (per gpu)")
    parser.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                        help="submitit executor; default: Slurm when it is installed, otherwise "
                             "this machine (which needs --nodes 1)")
    return parser.parse_args(argv)


def resolve_shared_folder(shared_folder: Optional[str]) -> Path:
    """The shared folder (created if needed), or the reference's /checkpoint/$USER/experiments."""
    if shared_folder:
        folder = Path(shared_folder)
    elif os.path.isdir(REFERENCE_SHARED_ROOT):
        folder = Path(REFERENCE_SHARED_ROOT) / getpass.getuser() / "experiments"
    else:
        raise utils.InputError(f"no shared folder: {REFERENCE_SHARED_ROOT} does not exist here, so "
                               "pass --shared_folder DIR, a folder that every node can read and "
                               "write (it holds the rendezvous file)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise utils.InputError(
            f"cannot create the shared folder {str(folder)!r}: {error}") from error
    return folder.resolve()


def new_rendezvous_file(shared_folder: str) -> Path:
    """A fresh path for init_process_group's file:// rendezvous (the file must not exist yet)."""
    return Path(shared_folder) / f"{uuid.uuid4().hex}_init"


def executor_parameters(args: argparse.Namespace) -> dict:
    """submitit parameters: the reference's resources plus the optional Slurm extras."""
    params = {
        "mem_gb": args.mem_gb or 40 * args.ngpus,
        "gpus_per_node": args.ngpus,
        "tasks_per_node": args.ngpus,
        "cpus_per_task": args.cpus_per_task,
        "nodes": args.nodes,
        "timeout_min": args.timeout,
        "name": "dino",
        "slurm_partition": args.partition,
        "slurm_signal_delay_s": 120,
    }
    constraints = (["volta32gb"] if args.use_volta32 else []) + \
        ([args.constraint] if args.constraint else [])
    if constraints:
        params["slurm_constraint"] = "&".join(constraints)
    optional = {"slurm_comment": args.comment, "slurm_account": args.account,
                "slurm_qos": args.qos}
    params.update({name: value for name, value in optional.items() if value})
    return params


def build_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=args.output_dir, cluster=args.cluster,
                                     slurm_max_num_timeout=30)
    if executor.cluster != "slurm" and args.nodes > 1:
        raise utils.InputError(f"the {executor.cluster} executor runs on this machine only (Slurm "
                               "was not found or not chosen): pass --nodes 1")
    executor.update_parameters(**executor_parameters(args))
    return executor


class Trainer:
    """What each task runs: main_dino with submitit's rank; requeues itself when interrupted."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self) -> None:
        self._setup_task_environment()
        try:
            main_dino.main(self.args)
        finally:
            utils.cleanup_distributed()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or timeout: the same run, with a fresh rendezvous."""
        self.args.dist_url = new_rendezvous_file(self.args.shared_folder).as_uri()
        print("Requeuing ", self.args)
        return submitit.helpers.DelayedSubmission(type(self)(self.args))

    def _setup_task_environment(self) -> None:
        job_env = submitit.JobEnvironment()
        self.args.output_dir = self.args.output_dir.replace("%j", str(job_env.job_id))
        # init_distributed_mode reads torchrun's variables first, so they override any SLURM_*.
        os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                          LOCAL_RANK=str(job_env.local_rank))
        print(f"Process group: {job_env.num_tasks} tasks, rank: {job_env.global_rank}")


def make_repo_importable_in_jobs() -> None:
    """Jobs unpickle Trainer and import main_dino: put this folder on their PYTHONPATH."""
    paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    if REPO_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO_DIR, *paths])


def submit(args: argparse.Namespace) -> submitit.Job:
    """Submit one training job; return the submitit job."""
    args.shared_folder = str(resolve_shared_folder(args.shared_folder))
    if args.output_dir == "":
        args.output_dir = os.path.join(args.shared_folder, "%j")
    args.output_dir = os.path.abspath(args.output_dir)
    executor = build_executor(args)
    args.dist_url = new_rendezvous_file(args.shared_folder).as_uri()
    make_repo_importable_in_jobs()
    job = executor.submit(Trainer(args))
    print(f"Submitted job_id: {job.job_id}")
    output_dir = args.output_dir.replace("%j", str(job.job_id))
    print(f"Logs and checkpoints will be saved at: {output_dir}")
    return job


def main(args: argparse.Namespace) -> None:
    submit(args)


if __name__ == "__main__":
    utils.run_cli(main, parse_args())
