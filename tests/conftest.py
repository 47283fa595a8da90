import os
import subprocess
import sys

import pytest
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """scikit-learn's digits as a class-folder image tree of 32x32 RGB PNGs (1797 images)."""
    from sample_data import write_digits_folder

    return write_digits_folder(str(tmp_path_factory.mktemp("digits")), size=32)


@pytest.fixture(scope="session")
def digits_train_val(tmp_path_factory):
    """`root/train` (150 images) and `root/val` (50 images, 5 per class) of 32x32 digits."""
    from sample_data import write_digits_folder

    root = tmp_path_factory.mktemp("digits_train_val")
    write_digits_folder(str(root / "train"), size=32, limit=200)
    moved = {}
    for image in sorted((root / "train").glob("*/*.png")):
        label = image.parent.name
        if moved.get(label, 0) < 5:
            (root / "val" / label).mkdir(parents=True, exist_ok=True)
            image.rename(root / "val" / label / image.name)
            moved[label] = moved.get(label, 0) + 1
    return str(root)


@pytest.fixture(scope="session")
def tiny_dino_checkpoint(digits_train_val, tmp_path_factory):
    """checkpoint.pth of a 1-epoch main_dino run (vit_tiny/8, 32px crops) on the digits."""
    output_dir = tmp_path_factory.mktemp("tiny_dino")
    result = run_repo_script(
        "main_dino.py", "--data_path", os.path.join(digits_train_val, "train"),
        "--output_dir", str(output_dir), "--arch", "vit_tiny", "--patch_size", "8",
        "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
        "--out_dim", "256", "--epochs", "1", "--batch_size_per_gpu", "32", "--warmup_epochs", "0",
        "--num_workers", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    return str(output_dir / "checkpoint.pth")


def run_repo_script(*args: str) -> subprocess.CompletedProcess:
    """`python <script> args...` from the repo root, output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="session")
def run_script():
    return run_repo_script


@pytest.fixture
def single_process_group(tmp_path):
    """A one-process gloo group (what DDP and the all-reduces need), destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
