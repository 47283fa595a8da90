"""What shows whether a run learns: k-NN during training, curves, TensorBoard, and the CPU
precision check."""
import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

import benchmarks.knn_fashion_mnist as benchmark
import demo
import main_dino
import plot_log
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64",
            "--batch_size_per_gpu", "32", "--warmup_epochs", "1", "--num_workers", "0"]
REFERENCE_LOG = [{"train_loss": 10.9 - epoch, "train_lr": 1e-4 * (epoch + 1),
                  "train_wd": 0.04 + 0.01 * epoch, "epoch": epoch} for epoch in range(3)]


def run_main_dino(data, output_dir, *extra, runner=("main_dino.py",)):
    command = [sys.executable, *runner, "--data_path", str(data), "--output_dir",
               str(output_dir), *TINY_RUN, *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def read_records(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as log_file:
        return [json.loads(line) for line in log_file]


# ------------------------------------------------------------------------------------------------
# k-NN during training
# ------------------------------------------------------------------------------------------------

def test_knn_is_due_every_knn_freq_epochs_and_at_the_last():
    assert [e for e in range(7) if main_dino.knn_due(e, 3, 7)] == [2, 5, 6]
    assert [e for e in range(4) if main_dino.knn_due(e, 1, 4)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_knn_top1_is_logged_on_its_epochs_survives_a_resume_and_is_eval_knns(
        digits_train_val, tmp_path, run_script):
    train = os.path.join(digits_train_val, "train")
    knn = ["--knn_data_path", digits_train_val, "--knn_freq", "3", "--saveckp_freq", "0"]
    first = run_main_dino(train, tmp_path, "--epochs", "2", *knn)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert [("knn_top1" in r) for r in read_records(tmp_path)] == [False, True]
    assert (tmp_path / "curves.png").is_file()

    resumed = run_main_dino(train, tmp_path, "--epochs", "4", *knn)  # resumes at epoch 2
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Found checkpoint at" in resumed.stdout
    records = read_records(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert [("knn_top1" in r) for r in records] == [False, True, True, True]
    assert len(re.findall(r"k-NN: the teacher's weighted 20-NN top-1 is", resumed.stdout)) == 2

    # The last value is eval_knn.py's 20-NN on the final teacher, images at the crop size.
    result = run_script("eval_knn.py", "--data_path", digits_train_val, "--arch", "vit_tiny",
                        "--patch_size", "8", "--resize_size", "32", "--crop_size", "32",
                        "--nb_knn", "20", "--num_workers", "0",
                        "--pretrained_weights", str(tmp_path / "checkpoint.pth"))
    assert result.returncode == 0, result.stderr[-3000:]
    top1 = float(re.search(r"20-NN classifier result: Top1: ([0-9.]+)", result.stdout).group(1))
    assert records[-1]["knn_top1"] == pytest.approx(top1, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layout,message", [
    ("missing", "is not a folder"),
    ("no_classes", "no labelled images in"),
])
def test_bad_knn_folder_fails_at_start_up(digits_train_val, tmp_path, layout, message):
    knn_dir = tmp_path / "knn"
    if layout == "no_classes":
        (knn_dir / "train").mkdir(parents=True)
        (knn_dir / "val").mkdir()
    result = run_main_dino(os.path.join(digits_train_val, "train"), tmp_path / "out",
                           "--epochs", "1", "--knn_data_path", str(knn_dir))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("main_dino.py: error: ")
    assert "Starting DINO training" not in result.stdout


def test_knn_freq_below_one_is_an_error():
    args = main_dino.get_args_parser().parse_args(["--epochs", "10", "--knn_freq", "0"])
    with pytest.raises(utils.InputError, match="--knn_freq must be at least 1"):
        main_dino.check_schedule_flags(args)


# ------------------------------------------------------------------------------------------------
# Curves and TensorBoard
# ------------------------------------------------------------------------------------------------

def write_log(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "w") as log_file:
        log_file.writelines(json.dumps(record) + "\n" for record in records)


def test_plot_log_draws_a_reference_log(tmp_path, capsys):
    write_log(tmp_path, REFERENCE_LOG)
    plot_log.main(plot_log.get_args_parser().parse_args([str(tmp_path), "--out_dim", "65536"]))
    assert f"{tmp_path / 'curves.png'} saved." in capsys.readouterr().out
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100

    figure = plot_log.plot_curves(REFERENCE_LOG, out_dim=65536)
    titles = [ax.get_title() for ax in figure.axes if ax.axison]
    assert titles == ["loss", "learning rate", "weight decay"]
    loss_line, uniform_line = figure.axes[0].get_lines()
    assert list(loss_line.get_xdata()) == [0, 1, 2]
    assert list(loss_line.get_ydata()) == [10.9, 9.9, 8.9]
    assert uniform_line.get_ydata()[0] == pytest.approx(math.log(65536))


def test_plot_log_draws_every_logged_quantity_and_knn_where_measured():
    records = [dict(record, train_teacher_entropy=1.0, train_teacher_kl=2.0,
                    train_skipped_images=0) for record in REFERENCE_LOG]
    records[1]["knn_top1"], records[2]["knn_top1"] = 55.0, 61.5
    figure = plot_log.plot_curves(records, out_dim=256)
    panels = {ax.get_title(): ax for ax in figure.axes if ax.axison}
    assert list(panels) == ["loss", "learning rate", "weight decay", "teacher outputs (nats)",
                            "skipped images", "k-NN top-1 (%)"]
    knn_line = panels["k-NN top-1 (%)"].get_lines()[0]
    assert list(knn_line.get_xdata()) == [1, 2] and list(knn_line.get_ydata()) == [55.0, 61.5]
    entropy, kl, uniform = panels["teacher outputs (nats)"].get_lines()
    assert uniform.get_ydata()[0] == pytest.approx(math.log(256))


def test_plot_log_errors_name_the_problem(tmp_path):
    with pytest.raises(utils.InputError, match="log.txt' is not a file"):
        plot_log.read_log(str(tmp_path / "log.txt"))
    (tmp_path / "log.txt").write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(utils.InputError, match="log.txt:2 is not a JSON line"):
        plot_log.read_log(str(tmp_path / "log.txt"))


@pytest.mark.slow
def test_plot_log_cli_reads_out_dim_from_the_checkpoint(tmp_path, run_script):
    write_log(tmp_path, REFERENCE_LOG)
    args = main_dino.get_args_parser().parse_args(["--out_dim", "512"])
    torch.save({"args": args, "teacher": {"w": torch.zeros(2)}}, tmp_path / "checkpoint.pth")
    assert plot_log.out_dim_of_run(str(tmp_path)) == 512
    result = run_script("plot_log.py", str(tmp_path), "--output", str(tmp_path / "c.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.png").is_file()
    missing = run_script("plot_log.py", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a file" in missing.stderr


def test_missing_tensorboard_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(utils.InputError, match="needs the tensorboard package"):
        plot_log.open_tensorboard("runs")


def test_tensorboard_gets_every_scalar_of_the_log_record(monkeypatch, tmp_path):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            calls.append(("flush",))

    fake_module = types.ModuleType("torch.utils.tensorboard")
    fake_module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_module)
    writer = plot_log.open_tensorboard(str(tmp_path))
    plot_log.write_tensorboard(writer, {"train_loss": 3.5, "train_lr": 1e-4, "epoch": 4,
                                        "knn_top1": 61.0})
    assert calls == [("open", str(tmp_path)), ("train_loss", 3.5, 4), ("train_lr", 1e-4, 4),
                     ("knn_top1", 61.0, 4), ("flush",)]
    plot_log.write_tensorboard(None, {"train_loss": 1.0, "epoch": 0})  # no writer: nothing


NO_TENSORBOARD_RUNNER = """
import argparse, sys
sys.modules["torch.utils.tensorboard"] = None  # as if the package were not installed
import main_dino, utils
parser = argparse.ArgumentParser(parents=[main_dino.get_args_parser()])
utils.run_cli(main_dino.main, parser.parse_args(sys.argv[1:]))
"""


@pytest.mark.slow
def test_tensorboard_dir_without_the_package_fails_at_start_up(digits_train_val, tmp_path):
    result = run_main_dino(os.path.join(digits_train_val, "train"), tmp_path, "--epochs", "1",
                           "--tensorboard_dir", str(tmp_path / "tb"),
                           runner=("-c", NO_TENSORBOARD_RUNNER))
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert "error: --tensorboard_dir needs the tensorboard package" in last_line
    assert "Traceback" not in result.stderr
    assert "Starting DINO training" not in result.stdout


# ------------------------------------------------------------------------------------------------
# Honest precision on CPUs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability,flags,native", [
    ("AVX2", {"avx2", "fma"}, False),
    ("AVX2", {"avx2", "avx512_bf16"}, False),  # torch forced to its AVX2 kernels
    ("AVX512", {"avx512f", "avx512bw"}, False),
    ("AVX512", {"avx512f", "avx512_bf16"}, True),
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, True),
    ("DEFAULT", {"asimd", "bf16"}, True),
    ("DEFAULT", {"asimd"}, False),
    ("SVE256", {"sve", "bf16"}, True),
    ("NO AVX", set(), False),
])
def test_native_bf16_on_cpu_from_the_capability_and_flags(capability, flags, native):
    assert utils.cpu_has_native_bf16(capability, flags) is native


def test_bf16_on_a_cpu_without_it_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    args = main_dino.get_args_parser().parse_args(["--use_bf16", "true"])
    assert main_dino.autocast_dtype(args, torch.device("cpu")) == torch.bfloat16
    out = capsys.readouterr().out
    assert out.count("Warning: this CPU has no native bfloat16") == 1 and "AVX2" in out

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(utils, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert main_dino.autocast_dtype(args, torch.device("cpu")) == torch.bfloat16
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("capability,expected", [("AVX2", "false"), ("AVX512", "true")])
def test_recipes_choose_bf16_only_where_native(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(utils, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    for flags in (benchmark.recipe_flags(full=False), demo.recipe_flags()):
        position = flags.index("--use_bf16")
        assert flags[position + 1] == expected
