import copy
import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit

import main_dino
import run_with_submitit
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--arch", "vit_tiny", "--patch_size", "16", "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64",
            "--epochs", "1", "--batch_size_per_gpu", "32", "--warmup_epochs", "0",
            "--num_workers", "0", "--saveckp_freq", "0"]


def test_parser_inherits_every_main_dino_flag_and_adds_the_reference_ones():
    args = run_with_submitit.parse_args([])
    for action in main_dino.get_args_parser()._actions:
        assert getattr(args, action.dest) == action.default, action.dest
    assert (args.ngpus, args.nodes, args.timeout, args.partition, args.use_volta32,
            args.comment) == (8, 2, 2800, "learnfair", False, "")
    assert run_with_submitit.parse_args(["--arch", "vit_base", "--nodes", "4"]).nodes == 4


def test_executor_parameters_match_the_reference_and_add_slurm_extras():
    args = run_with_submitit.parse_args([])
    assert run_with_submitit.executor_parameters(args) == {
        "mem_gb": 320, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 10, "nodes": 2,
        "timeout_min": 2800, "name": "dino", "slurm_partition": "learnfair",
        "slurm_signal_delay_s": 120}
    args = run_with_submitit.parse_args(
        ["--ngpus", "4", "--use_volta32", "--constraint", "ib", "--comment", "deadline",
         "--account", "vision", "--qos", "high", "--mem_gb", "100", "--cpus_per_task", "6"])
    params = run_with_submitit.executor_parameters(args)
    assert params["mem_gb"] == 100 and params["cpus_per_task"] == 6
    assert params["tasks_per_node"] == params["gpus_per_node"] == 4
    assert {key: params[key] for key in ("slurm_constraint", "slurm_comment", "slurm_account",
                                         "slurm_qos")} == {
        "slurm_constraint": "volta32gb&ib", "slurm_comment": "deadline",
        "slurm_account": "vision", "slurm_qos": "high"}


def test_shared_folder_flag_default_and_error(tmp_path, monkeypatch):
    flag = run_with_submitit.resolve_shared_folder(str(tmp_path / "a" / "shared"))
    assert flag == (tmp_path / "a" / "shared").resolve() and flag.is_dir()
    monkeypatch.setattr(run_with_submitit, "REFERENCE_SHARED_ROOT", str(tmp_path))
    default = run_with_submitit.resolve_shared_folder(None)
    assert default == tmp_path.resolve() / getpass.getuser() / "experiments" and default.is_dir()
    monkeypatch.setattr(run_with_submitit, "REFERENCE_SHARED_ROOT", str(tmp_path / "missing"))
    with pytest.raises(utils.InputError, match="pass --shared_folder DIR"):
        run_with_submitit.resolve_shared_folder(None)


def test_rendezvous_files_are_fresh(tmp_path):
    first = run_with_submitit.new_rendezvous_file(str(tmp_path))
    second = run_with_submitit.new_rendezvous_file(str(tmp_path))
    assert first.parent == second.parent == tmp_path and first != second
    assert first.name.endswith("_init") and not first.exists()


def test_local_executor_needs_one_node(tmp_path):
    args = run_with_submitit.parse_args(["--cluster", "local", "--output_dir", str(tmp_path)])
    with pytest.raises(utils.InputError, match="pass --nodes 1"):
        run_with_submitit.build_executor(args)


@pytest.mark.skipif(os.path.isdir("/checkpoint"), reason="the reference's default folder exists")
def test_cli_without_a_shared_folder_is_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, "run_with_submitit.py", "--nodes", "1",
                          "--output_dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "run_with_submitit.py: error: no shared folder: /checkpoint does not exist here, so pass "
        "--shared_folder DIR, a folder that every node can read and write (it holds the "
        "rendezvous file)"]


def fake_slurm(bin_dir: Path, job_id: int) -> None:
    """`srun` and an `sbatch` that keeps a copy of the batch script and reports `job_id`."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" "{bin_dir}/batch_script.sh"\necho "Submitted batch job {job_id}"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)


def test_cli_submits_to_slurm_with_the_requested_resources(tmp_path):
    fake_slurm(tmp_path / "bin", 4242)
    shared = tmp_path / "shared"
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(
        [sys.executable, "run_with_submitit.py", "--shared_folder", str(shared), "--output_dir", "",
         "--use_volta32", "--constraint", "ib", "--account", "vision", "--qos", "high",
         "--comment", "icml deadline", "--data_path", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-2:] == [
        "Submitted job_id: 4242",
        f"Logs and checkpoints will be saved at: {shared.resolve() / '4242'}"]
    script = (tmp_path / "bin" / "batch_script.sh").read_text()
    for line in ["--account=vision", "--qos=high", "--constraint='volta32gb&ib'",
                 "--comment='icml deadline'", "--mem=320GB", "--nodes=2", "--ntasks-per-node=8",
                 "--gpus-per-node=8", "--cpus-per-task=10", "--partition=learnfair",
                 "--time=2800", "--signal=USR2@120", "--job-name=dino"]:
        assert f"#SBATCH {line}\n" in script, line
    submitted = submitit.helpers.DelayedSubmission.load(shared / "4242" / "4242_submitted.pkl")
    job_args = submitted.function.args
    assert job_args.output_dir == str(shared.resolve() / "%j")
    assert job_args.dist_url.startswith(shared.resolve().as_uri() + "/")
    assert job_args.dist_url.endswith("_init")


# ------------------------------------------------------------------------------------------------
# A real job on this machine through submitit's local executor
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_job(tmp_path_factory):
    """(args as submitted, finished job): one epoch on the CPU in two processes (tasks), with
    `--output_dir ''` so that the job id names the output folder."""
    from sample_data import write_digits_folder

    root = tmp_path_factory.mktemp("submitit")
    data = write_digits_folder(str(root / "data"), size=32, limit=64)
    args = run_with_submitit.parse_args(
        ["--cluster", "local", "--nodes", "1", "--ngpus", "2", "--shared_folder",
         str(root / "shared"), "--output_dir", "", "--data_path", data, *TINY_RUN])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored afterwards
        job = run_with_submitit.submit(args)
        job.results()
        yield args, job


@pytest.mark.slow
def test_local_job_trains_and_writes_its_checkpoint(local_job):
    args, job = local_job
    output_dir = Path(args.shared_folder) / str(job.job_id)
    checkpoint = utils.load_checkpoint_file(str(output_dir / "checkpoint.pth"))
    assert checkpoint["epoch"] == 1
    assert checkpoint["args"].output_dir == str(output_dir)
    assert checkpoint["args"].world_size == 2 and checkpoint["args"].rank == 0
    assert checkpoint["args"].dist_url == args.dist_url
    assert args.dist_url.startswith(Path(args.shared_folder).as_uri())
    assert [json.loads(line)["epoch"] for line in open(output_dir / "log.txt")] == [0]
    for rank, task in enumerate(job.task(i) for i in range(2)):
        assert f"Process group: 2 tasks, rank: {rank}" in task.stdout()
        assert f"| distributed init (rank {rank}): {args.dist_url}" in task.stdout()


@pytest.mark.slow
def test_requeue_hook_resubmits_a_run_that_resumes(local_job):
    args, job = local_job
    output_dir = str(Path(args.shared_folder) / str(job.job_id))
    # The hook runs inside the task, where %j has already been replaced by the job id.
    task_args = copy.deepcopy(args)
    task_args.output_dir = output_dir
    resubmission = run_with_submitit.Trainer(task_args).checkpoint()
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    trainer = resubmission.function
    assert isinstance(trainer, run_with_submitit.Trainer) and resubmission.args == ()
    assert trainer.args.dist_url != args.dist_url
    assert trainer.args.dist_url.startswith(Path(args.shared_folder).as_uri() + "/")
    # Run it (in one process, to save time) as if the job had been stopped after epoch 0 of 2.
    trainer.args.epochs = 2
    executor = submitit.AutoExecutor(folder=output_dir, cluster="local")
    executor.update_parameters(timeout_min=30)
    rerun = executor.submit(trainer)
    rerun.result()
    log = rerun.stdout()
    assert f"Found checkpoint at {output_dir}/checkpoint.pth" in log
    assert "Epoch: [1/2]" in log and "Epoch: [0/2]" not in log
    assert f"| distributed init (rank 0): {trainer.args.dist_url}" in log
    assert utils.load_checkpoint_file(os.path.join(output_dir, "checkpoint.pth"))["epoch"] == 2
    with open(os.path.join(output_dir, "log.txt")) as log_file:
        assert [json.loads(line)["epoch"] for line in log_file] == [0, 1]
