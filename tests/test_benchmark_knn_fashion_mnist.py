import gzip
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_knn
import sample_data


def write_idx(path, array):
    """idx layout: two zero bytes, type 0x08 (unsigned byte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as idx_file:
        idx_file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def digits_as_fashion_mnist(tmp_path_factory):
    """scikit-learn's digits at 28x28 in Fashion-MNIST's four idx files (130 train, 40 test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((28, 28)))
        for image in digits.images[:170]])
    folder = tmp_path_factory.mktemp("fashion_like")
    for split, (start, stop) in {"train": (0, 130), "val": (130, 170)}.items():
        images_name, labels_name = sample_data.FASHION_MNIST_FILES[split]
        write_idx(folder / images_name, images[start:stop])
        write_idx(folder / labels_name, digits.target[start:stop])
    return str(folder), images, digits.target[:170]


def test_idx_files_read_back(digits_as_fashion_mnist):
    folder, images, labels = digits_as_fashion_mnist
    split_images, split_labels = sample_data.load_fashion_mnist(folder, "val", 25)
    assert split_images.shape == (25, 28, 28)
    assert np.array_equal(split_images, images[130:155])
    assert split_labels.tolist() == labels[130:155].tolist()


def test_missing_or_wrong_idx_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*dataset-fashion"):
        sample_data.load_fashion_mnist(str(tmp_path), "train")
    with gzip.open(tmp_path / "not_idx.gz", "wb") as not_idx:
        not_idx.write(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not_idx.gz is not an idx file"):
        sample_data.read_idx(str(tmp_path / "not_idx.gz"))


def test_class_folders_hold_every_image_under_its_label(tmp_path):
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    sample_data.write_class_folders(images, np.array([2, 0, 2]), str(tmp_path))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*.png")) == \
        ["0/00001.png", "2/00000.png", "2/00002.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "2" / "00002.png")), images[2])


@pytest.mark.slow
def test_tiny_benchmark_runs_end_to_end(digits_as_fashion_mnist, run_script, tmp_path):
    folder, images, labels = digits_as_fashion_mnist
    result = run_script(
        "-m", "benchmarks.knn_fashion_mnist", "--fashion_dir", folder,
        "--output_dir", str(tmp_path),
        "--train_size", "120", "--val_size", "40", "--patch_size", "14", "--image_size", "28",
        "--nb_knn", "5", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0",
        "--batch_size_per_gpu", "40",
        "--local_crops_number", "2", "--out_dim", "64", "--use_bf16", "false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    line = re.search(r"DINO teacher: ([0-9.]+)%  random init: ([0-9.]+)%  raw pixels: ([0-9.]+)%",
                     result.stdout)
    assert line, result.stdout[-2000:]
    assert len(list((tmp_path / "data" / "train").glob("*/*.png"))) == 120
    assert (tmp_path / "pretrain" / "checkpoint.pth").is_file()

    pixels = F.normalize(torch.tensor(images.reshape(170, -1), dtype=torch.float), dim=1)
    targets = torch.tensor(labels)
    expected = eval_knn.knn_classifier(pixels[:120], targets[:120], pixels[130:], targets[130:],
                                       [5], 0.07, 10)[5][0]
    assert line.group(3) == f"{expected:.2f}"
    with open(tmp_path / "results.json") as results_file:
        results = json.load(results_file)
    assert results["top1"]["raw pixels"] == pytest.approx(expected, abs=0.005)
    assert results["sizes"] == {"train": 120, "val": 40}
    assert results["main_dino_flags"][:2] == ["--small_data", "true"]  # the preset's recipe
    assert results["main_dino_flags"][-2:] == ["--use_bf16", "false"]
    assert [epoch for epoch, _ in results["knn_curve"]] == [0]  # the last epoch (20-NN)
    assert 0 <= results["knn_curve"][0][1] <= 100


@pytest.mark.slow
def test_full_gpu_mode_smoke_runs_on_the_cpu(digits_as_fashion_mnist, run_script, tmp_path):
    """--full's recipe (crops drawn by the batched augmenter) on a few images, on the CPU."""
    folder, _, _ = digits_as_fashion_mnist
    result = run_script(
        "-m", "benchmarks.knn_fashion_mnist", "--full", "--fashion_dir", folder,
        "--output_dir", str(tmp_path), "--train_size", "120", "--val_size", "40",
        "--patch_size", "14", "--image_size", "28", "--nb_knn", "5", "--num_workers", "0",
        "--epochs", "2", "--warmup_epochs", "0", "--batch_size_per_gpu", "40",
        "--local_crops_number", "2", "--out_dim", "64", "--knn_freq", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    with open(tmp_path / "results.json") as results_file:
        results = json.load(results_file)
    assert "--gpu_augment" in results["main_dino_flags"]
    assert [epoch for epoch, _ in results["knn_curve"]] == [0, 1]


def test_default_recipe_trains_and_evaluates_on_21_px_images_of_3_by_3_patches(monkeypatch,
                                                                              tmp_path):
    from benchmarks import knn_fashion_mnist

    args = knn_fashion_mnist.get_args_parser().parse_args(["--output_dir", str(tmp_path)])
    commands = []
    monkeypatch.setattr(knn_fashion_mnist, "run_script",
                        lambda command, log_path: commands.append(command))
    knn_fashion_mnist.pretrain(args, "data", knn_fashion_mnist.recipe_flags(full=False))
    pretrain_command = commands[0]
    assert pretrain_command[pretrain_command.index("--global_crops_size") + 1] == "21"
    assert pretrain_command[pretrain_command.index("--patch_size") + 1] == "7"
    assert pretrain_command[pretrain_command.index("--epochs") + 1] == "12"
    eval_command = knn_fashion_mnist.eval_knn_command(args, "data", [])
    assert [eval_command[eval_command.index(flag) + 1]
            for flag in ("--resize_size", "--crop_size", "--patch_size")] == ["21", "21", "7"]


def test_image_size_off_the_patch_grid_is_refused(tmp_path, run_script):
    result = run_script("-m", "benchmarks.knn_fashion_mnist", "--output_dir", str(tmp_path),
                        "--patch_size", "14")
    assert result.returncode != 0
    assert "--image_size 21 is not a multiple of --patch_size 14" in result.stderr
    assert not (tmp_path / "data").exists()


def test_rendered_digits_dataset_writes_seeded_train_and_val_folders(tmp_path):
    from benchmarks import knn_fashion_mnist

    args = knn_fashion_mnist.get_args_parser().parse_args(
        ["--dataset", "rendered_digits", "--train_size", "60", "--val_size", "20"])
    sizes = knn_fashion_mnist.prepare_data(args, str(tmp_path / "data"), str(tmp_path / "pixels"))
    assert sizes == {"train": 60, "val": 20}
    train_images, _ = sample_data.rendered_digits(60, seed=0)
    val_images, val_labels = sample_data.rendered_digits(20, seed=1)
    first_val = sorted((tmp_path / "data" / "val" / str(val_labels[0])).glob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first_val)), val_images[0])
    assert len(list((tmp_path / "data" / "train").glob("*/*.png"))) == 60
    assert not np.array_equal(train_images[:20], val_images)  # two different draws
