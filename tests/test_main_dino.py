import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import main_dino
import utils
import vision_transformer as vits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RUN = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "256",
            "--batch_size_per_gpu", "32", "--warmup_epochs", "1", "--num_workers", "0",
            "--lr", "0.001"]


def hand_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """The DINO loss written out with float64 numpy, pair by pair."""
    student, teacher, center = (t.double().numpy() for t in (student, teacher, center))
    batch = teacher.shape[0] // 2

    def log_softmax(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    log_p = log_softmax(student / student_temp)
    q = np.exp(log_softmax((teacher - center) / teacher_temp))
    rows = [slice(crop * batch, (crop + 1) * batch) for crop in range(ncrops)]
    terms = [np.mean(np.sum(-q[rows[t]] * log_p[rows[s]], axis=1))
             for t in range(2) for s in range(ncrops) if s != t]
    assert len(terms) == 2 * ncrops - 2
    return sum(terms) / len(terms)


def test_dino_loss_matches_hand_computation_and_updates_center():
    torch.manual_seed(0)
    ncrops, batch, dim = 5, 3, 11
    loss_fn = main_dino.DINOLoss(dim, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                 warmup_teacher_temp_epochs=3, nepochs=10)
    loss_fn.center.copy_(torch.randn(1, dim) * 0.1)
    student = torch.randn(ncrops * batch, dim)
    teacher = torch.randn(2 * batch, dim)
    center_before = loss_fn.center.clone()
    loss = loss_fn(student, teacher, epoch=1)
    expected = hand_dino_loss(student, teacher, center_before, ncrops, 0.1, 0.055)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    expected_center = 0.9 * center_before + 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)
    assert list(loss_fn.state_dict()) == ["center"]
    assert loss_fn.teacher_temp_schedule[0] == pytest.approx(0.04)
    assert loss_fn.teacher_temp_schedule[2:].tolist() == pytest.approx([0.07] * 8)


@pytest.mark.parametrize("ncrops", [2, 10])
def test_dino_loss_value_gradient_and_center_match_the_pairwise_formula(ncrops):
    """The per-view form (one product on the summed teacher views) against the pair-by-pair
    formula in float64, with the student gradient written out by hand."""
    torch.manual_seed(1)
    batch, dim, student_temp, teacher_temp = 4, 300, 0.1, 0.04
    loss_fn = main_dino.DINOLoss(dim, ncrops, teacher_temp, teacher_temp, 0, 2)
    loss_fn.center.copy_(torch.randn(1, dim))
    student = (torch.randn(ncrops * batch, dim) * 3).requires_grad_()
    teacher = torch.randn(2 * batch, dim) * 3
    center_before = loss_fn.center.clone()
    loss = loss_fn(student, teacher, epoch=1)
    loss.backward()
    expected = hand_dino_loss(student.detach(), teacher, center_before, ncrops, student_temp,
                              teacher_temp)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # d/dz of -sum_k target_k log_softmax(z / T)_k is (softmax(z / T) * sum(target) - target) / T.
    z, t = student.detach().double().numpy(), (teacher - center_before).double().numpy()
    q = np.exp(t / teacher_temp - t.max(axis=1, keepdims=True) / teacher_temp)
    q /= q.sum(axis=1, keepdims=True)
    p = np.exp(z / student_temp - z.max(axis=1, keepdims=True) / student_temp)
    p /= p.sum(axis=1, keepdims=True)
    q_views = q.reshape(2, batch, dim)
    targets = np.stack([q_views.sum(axis=0) - (q_views[v] if v < 2 else 0)
                        for v in range(ncrops)]).reshape(ncrops * batch, dim)
    gradient = (p * targets.sum(axis=1, keepdims=True) - targets) / student_temp
    gradient /= (2 * ncrops - 2) * batch
    np.testing.assert_allclose(student.grad.double().numpy(), gradient, rtol=2e-5, atol=1e-8)
    expected_center = 0.9 * center_before + 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_dino_loss_gradient_flows_to_student_only():
    student = torch.randn(4 * 2, 6, requires_grad=True)
    teacher = torch.randn(2 * 2, 6, requires_grad=True)
    loss_fn = main_dino.DINOLoss(6, 4, 0.04, 0.04, 0, 1)
    loss_fn(student, teacher, 0).backward()
    assert student.grad is not None and teacher.grad is None


def test_teacher_diagnostics_detect_collapse():
    uniform = torch.full((8, 16), 1 / 16)
    entropy, kl = main_dino.teacher_diagnostics(uniform).tolist()
    assert entropy == pytest.approx(math.log(16)) and kl == pytest.approx(0, abs=1e-6)
    one_hot = torch.nn.functional.one_hot(torch.arange(8) % 16, 16).float()
    entropy, kl = main_dino.teacher_diagnostics(one_hot).tolist()
    assert entropy == pytest.approx(0, abs=1e-6) and kl == pytest.approx(math.log(16) - math.log(8))


def test_warn_on_collapse(capsys):
    uniform = math.log(256)
    main_dino.warn_on_collapse({"loss": uniform, "teacher_entropy": 1.0, "teacher_kl": 1.0}, 256)
    assert "sits at ln(out_dim)" in capsys.readouterr().out
    main_dino.warn_on_collapse({"loss": 2.0, "teacher_entropy": 0.0, "teacher_kl": uniform}, 256)
    out = capsys.readouterr().out
    assert "every teacher output is the same" in out and "ln(out_dim)" not in out
    main_dino.warn_on_collapse({"loss": 0.2, "teacher_entropy": 0.1,
                                "teacher_kl": uniform - 0.26}, 256)
    assert "about 1.3 of 256 prototypes" in capsys.readouterr().out
    main_dino.warn_on_collapse({"loss": 2.0, "teacher_entropy": 0.5, "teacher_kl": 2.0}, 256)
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------------
# The method's rules
# ------------------------------------------------------------------------------------------------

def tiny_args(*flags):
    args = main_dino.get_args_parser().parse_args([*TINY_RUN, "--epochs", "4", *flags])
    args.gpu, args.compile = 0, False
    return args


@pytest.mark.parametrize("world_size", [1, 3])
def test_peak_lr_is_scaled_by_the_total_batch_over_256(monkeypatch, world_size):
    monkeypatch.setattr(utils, "get_world_size", lambda: world_size)
    args = tiny_args("--lr", "0.0008", "--batch_size_per_gpu", "32", "--warmup_epochs", "1",
                     "--min_lr", "1e-6")
    schedules = main_dino.build_schedules(args, niter_per_ep=5)
    peak = 0.0008 * 32 * world_size / 256
    assert schedules["lr"].max() == pytest.approx(peak)
    assert schedules["lr"][4] == pytest.approx(peak)  # the end of the warm-up
    assert schedules["lr"][0] == 0 and schedules["lr"][-1] > 1e-6
    assert len(schedules["lr"]) == len(schedules["wd"]) == len(schedules["momentum"]) == 20
    assert schedules["momentum"][0] == pytest.approx(0.996)
    assert schedules["wd"][0] == pytest.approx(0.04)


def test_weight_decay_reaches_group_0_only_and_it_holds_the_tokens():
    model = utils.MultiCropWrapper(vits.vit_tiny(patch_size=8), vits.DINOHead(192, 16))
    groups = utils.get_params_groups(model)
    optimizer = torch.optim.AdamW(groups)
    lr, wd = main_dino.set_schedules(optimizer, {"lr": np.array([0.1, 0.2]),
                                                 "wd": np.array([0.3, 0.4])}, it=1)
    assert (lr, wd) == (0.2, 0.4)
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.2]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.4, 0.0]
    decayed = {id(p) for p in groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert {"backbone.cls_token", "backbone.pos_embed", "head.mlp.0.weight"} <= names
    assert not any(name.endswith(".bias") or "norm" in name for name in names)
    assert "head.last_layer.weight_g" not in names  # frozen by norm_last_layer


def test_teacher_starts_as_the_students_copy_without_gradients_or_drop_path(
        single_process_group):
    args = tiny_args("--drop_path_rate", "0.2")
    student, teacher, teacher_without_ddp = main_dino.build_student_teacher(
        args, torch.device("cpu"))
    assert teacher is teacher_without_ddp  # no batch norm: the teacher is not DDP-wrapped
    student_state = student.module.state_dict()
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, student_state[name]), name
    assert not any(param.requires_grad for param in teacher.parameters())
    assert all(isinstance(block.drop_path, torch.nn.Identity)
               for block in teacher.backbone.blocks)
    assert isinstance(student.module.backbone.blocks[-1].drop_path, vits.DropPath)
    assert student.module.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_one_process_student_keeps_the_ddp_checkpoint_keys(single_process_group):
    args = tiny_args()
    student, _, _ = main_dino.build_student_teacher(args, torch.device("cpu"))
    assert isinstance(student, utils.SingleProcessWrapper)  # no gradient buckets to copy
    ddp_keys = list(torch.nn.parallel.DistributedDataParallel(student.module).state_dict())
    assert list(student.state_dict()) == ddp_keys and ddp_keys[0].startswith("module.backbone.")
    crops = [torch.randn(2, 3, 32, 32)] * 2
    torch.manual_seed(1)  # the same drop-path draws in both passes
    with student.no_sync():
        student(crops).square().sum().backward()
    grads = [p.grad.clone() for p in student.parameters() if p.requires_grad]
    student.zero_grad()
    torch.manual_seed(1)
    torch.nn.parallel.DistributedDataParallel(student.module)(crops).square().sum().backward()
    ddp_grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(grads, ddp_grads))  # bitwise DDP's gradients


def test_speed_flags_keep_the_checkpoint_keys(single_process_group):
    default, _, _ = main_dino.build_student_teacher(tiny_args(), torch.device("cpu"))
    fast, teacher, _ = main_dino.build_student_teacher(
        tiny_args("--packed_forward", "true", "--efficient_drop_path", "true"),
        torch.device("cpu"))
    assert list(fast.state_dict()) == list(default.state_dict())
    assert fast.module.packed and teacher.packed
    assert fast.module.backbone.blocks[-1].drop_path.skip_dropped
    with pytest.raises(utils.InputError, match="takes no ViT options"):
        main_dino.build_student_teacher(tiny_args("--arch", "resnet18", "--efficient_drop_path",
                                                  "true"), torch.device("cpu"))


def test_teacher_sees_only_the_two_global_crops():
    seen = {}

    def recorder(name, dim=8):
        def forward(crops):
            seen[name] = [tuple(crop.shape) for crop in crops]
            return torch.randn(sum(len(crop) for crop in crops), dim, requires_grad=True)
        return forward

    crops = [torch.zeros(2, 3, 32, 32)] * 2 + [torch.zeros(2, 3, 16, 16)] * 3
    loss_fn = main_dino.DINOLoss(8, 5, 0.04, 0.04, 0, 1)
    main_dino.forward_loss(recorder("student"), recorder("teacher"), loss_fn, crops, 0,
                           torch.autocast("cpu", enabled=False))
    assert seen["teacher"] == [(2, 3, 32, 32)] * 2
    assert seen["student"] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3


def test_gpu_augment_crops_follow_the_epoch_not_the_call_count():
    args = tiny_args("--gpu_augment", "true")
    canvases = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    batch = (canvases, torch.tensor([[64, 48, 48, 36], [48, 64, 36, 48]]))
    run = main_dino.CropPreparer(args, torch.device("cpu"))
    run.set_epoch(0)
    epoch0 = run(batch)
    run.set_epoch(1)
    epoch1 = run(batch)
    assert not torch.equal(epoch0[0], epoch1[0])
    resumed = main_dino.CropPreparer(args, torch.device("cpu"))
    resumed.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(resumed(batch), epoch1))


def test_update_teacher_is_the_ema_formula():
    torch.manual_seed(0)
    student = [torch.randn(3, 4), torch.randn(5)]
    teacher = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.99 * t + 0.01 * s for t, s in zip(teacher, student)]
    main_dino.update_teacher(student, teacher, 0.99)
    for got, want in zip(teacher, expected):
        torch.testing.assert_close(got, want)


def test_non_finite_loss_names_epoch_and_iteration():
    logger = utils.MetricLogger()
    def values(loss):
        return {"loss": torch.tensor(loss), "teacher_entropy": torch.tensor(2.0)}

    pending = [main_dino.PendingStats(0, 0.1, 0.04, values(1.0)),
               main_dino.PendingStats(1, 0.1, 0.04, values(float("nan")))]
    with pytest.raises(main_dino.NonFiniteLossError, match="Loss is nan at epoch 4, iteration 1"):
        main_dino.record_pending(logger, pending, epoch=4)


def test_augmentation_crops_sizes_dtype_and_normalisation():
    transform = main_dino.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 3, global_crops_size=64,
                                               local_crops_size=24)
    photo = Image.fromarray(np.random.RandomState(0).randint(0, 256, (80, 120, 3), dtype=np.uint8))
    crops = transform(photo)
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 24, 24)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    mean = torch.tensor(utils.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(utils.IMAGENET_STD)[:, None, None]
    for crop in crops:
        pixels = crop * std + mean  # back to [0, 1]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    black = transform(Image.new("RGB", (50, 50)))[0]  # black stays black through every op
    torch.testing.assert_close(black, (-mean / std).expand(3, 64, 64))


def test_default_flags_match_the_reference():
    args = main_dino.get_args_parser().parse_args([])
    expected = dict(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True,
                    momentum_teacher=0.996, use_bn_in_head=False, warmup_teacher_temp=0.04,
                    teacher_temp=0.04, warmup_teacher_temp_epochs=0, use_fp16=True,
                    weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64,
                    epochs=100, freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-6,
                    optimizer="adamw", drop_path_rate=0.1, global_crops_scale=(0.4, 1.0),
                    local_crops_number=8, local_crops_scale=(0.05, 0.4),
                    data_path="/path/to/imagenet/train/", output_dir=".", saveckp_freq=20, seed=0,
                    num_workers=10, dist_url="env://", local_rank=0, global_crops_size=224,
                    local_crops_size=96, use_bf16=False)
    assert {k: getattr(args, k) for k in expected} == expected


def test_bf16_autocast_forward_on_cpu_keeps_loss_float32():
    torch.manual_seed(0)
    backbone = vits.vit_tiny(patch_size=8)
    student = utils.MultiCropWrapper(backbone, vits.DINOHead(192, 32, hidden_dim=64))
    loss_fn = main_dino.DINOLoss(32, 3, 0.04, 0.04, 0, 1)
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    loss, diagnostics = main_dino.forward_loss(student, student, loss_fn, crops, 0, autocast)
    assert loss.dtype == torch.float32 and diagnostics.dtype == torch.float32
    fp32_loss = main_dino.DINOLoss(32, 3, 0.04, 0.04, 0, 1)
    reference_loss, _ = main_dino.forward_loss(student, student, fp32_loss, crops, 0,
                                               torch.autocast("cpu", enabled=False))
    assert loss.item() == pytest.approx(reference_loss.item(), rel=0.05)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

def run_main_dino(data, output_dir, *extra, launcher=(), check=True):
    command = [sys.executable, *launcher, "main_dino.py", "--data_path", str(data),
               "--output_dir", str(output_dir), *TINY_RUN, *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """255 digits and one corrupt PNG: 256 files, 8 full batches of 32 so every file is read."""
    from sample_data import write_digits_folder

    root = write_digits_folder(str(tmp_path_factory.mktemp("small")), size=32, limit=255)
    with open(os.path.join(root, "0", "corrupt.png"), "wb") as corrupt:
        corrupt.write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return root


@pytest.fixture(scope="module")
def two_epoch_run(small_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run")
    result = run_main_dino(small_folder, output_dir, "--epochs", "2")
    return output_dir, result


@pytest.mark.slow
def test_two_epochs_write_reference_files_and_keys(two_epoch_run):
    output_dir, result = two_epoch_run
    assert sorted(os.listdir(output_dir)) == ["checkpoint.pth", "checkpoint0000.pth",
                                              "curves.png", "log.txt"]
    checkpoint = utils.load_checkpoint_file(str(output_dir / "checkpoint.pth"))
    assert list(checkpoint) == ["student", "teacher", "optimizer", "epoch", "args", "dino_loss"]
    assert checkpoint["epoch"] == 2
    assert utils.load_checkpoint_file(str(output_dir / "checkpoint0000.pth"))["epoch"] == 1
    assert checkpoint["args"].arch == "vit_tiny" and checkpoint["args"].epochs == 2
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in checkpoint["student"])
    assert all(k.startswith(("backbone.", "head.")) for k in checkpoint["teacher"])
    assert "module.head.last_layer.weight_g" in checkpoint["student"]
    assert tuple(checkpoint["teacher"]["head.last_layer.weight_v"].shape) == (256, 256)
    assert tuple(checkpoint["dino_loss"]["center"].shape) == (1, 256)
    assert len(checkpoint["optimizer"]["param_groups"]) == 2
    backbone = {k[len("backbone."):]: v for k, v in checkpoint["teacher"].items()
                if k.startswith("backbone.")}
    vits.vit_tiny(patch_size=8).load_state_dict(backbone, strict=True)
    assert not torch.equal(checkpoint["teacher"]["backbone.pos_embed"],
                           checkpoint["student"]["module.backbone.pos_embed"])

    with open(output_dir / "log.txt") as log_file:
        records = [json.loads(line) for line in log_file]
    assert [r["epoch"] for r in records] == [0, 1]
    assert list(records[0])[:4] == ["train_loss", "train_lr", "train_wd", "epoch"]
    assert all(math.isfinite(r["train_loss"]) and 0 < r["train_loss"] for r in records)
    assert all(r["train_skipped_images"] == 1 for r in records)  # the corrupt PNG, once per epoch
    assert "skipping unreadable image" in result.stderr and "corrupt.png" in result.stderr
    assert "Data loaded: there are 256 images." in result.stdout
    assert "Epoch: [1/2]  [7/8]  eta: " in result.stdout
    assert "Training time" in result.stdout


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(small_folder, tmp_path):
    command = [sys.executable, "main_dino.py", "--data_path", str(small_folder),
               "--output_dir", str(tmp_path), *TINY_RUN, "--epochs", "4", "--saveckp_freq", "0"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint_path = tmp_path / "checkpoint.pth"
    deadline = time.time() + 300
    while not checkpoint_path.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint_path.exists()
    killed_at = utils.load_checkpoint_file(str(checkpoint_path))["epoch"]
    assert killed_at < 4, "the run finished before it could be killed"

    result = run_main_dino(small_folder, tmp_path, "--epochs", "4", "--saveckp_freq", "0")
    assert f"Found checkpoint at {checkpoint_path}" in result.stdout
    assert f"Epoch: [{killed_at}/4]" in result.stdout
    assert f"Epoch: [{killed_at - 1}/4]" not in result.stdout
    assert utils.load_checkpoint_file(str(checkpoint_path))["epoch"] == 4
    with open(tmp_path / "log.txt") as log_file:
        assert [json.loads(line)["epoch"] for line in log_file] == [0, 1, 2, 3]
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


@pytest.mark.slow
def test_torchrun_two_cpu_processes(small_folder, tmp_path):
    result = run_main_dino(small_folder, tmp_path, "--epochs", "1", "--batch_size_per_gpu", "16",
                           launcher=("-m", "torch.distributed.run", "--nproc_per_node=2"))
    assert "| distributed init (rank 0): env://" in result.stdout
    assert "Epoch: [0/1]  [7/8]" in result.stdout  # 256 images / (16 per process x 2)
    with open(tmp_path / "log.txt") as log_file:
        records = [json.loads(line) for line in log_file]
    assert len(records) == 1 and math.isfinite(records[0]["train_loss"])
    assert utils.load_checkpoint_file(str(tmp_path / "checkpoint.pth"))["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("setup,message", [
    ("missing", "does not exist"),
    ("empty", "contains no images"),
    ("too_few", "do not fill one batch"),
])
def test_bad_data_folder_gives_one_line_error(tmp_path, setup, message):
    data = tmp_path / "data"
    if setup != "missing":
        (data / "class").mkdir(parents=True)
    if setup == "too_few":
        Image.new("RGB", (32, 32)).save(data / "class" / "only.png")
    result = run_main_dino(data, tmp_path / "out", "--epochs", "1", check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("main_dino.py: error: ")
    assert "Traceback" not in result.stderr


def test_gpu_decode_needs_gpu_augment():
    with pytest.raises(utils.InputError, match="--gpu_decode needs --gpu_augment true"):
        main_dino.build_data_loader(tiny_args("--gpu_decode", "true"))


def test_warmup_longer_than_the_run_is_a_clear_error():
    args = main_dino.get_args_parser().parse_args(["--epochs", "5"])  # default warmup: 10
    message = r"--warmup_epochs \(10\) is longer than --epochs \(5\)"
    with pytest.raises(utils.InputError, match=message):
        main_dino.check_schedule_flags(args)
    main_dino.check_schedule_flags(main_dino.get_args_parser().parse_args(["--epochs", "10"]))


@pytest.mark.slow
def test_bad_flag_value_is_rejected(tmp_path):
    result = run_main_dino(tmp_path, tmp_path, "--use_fp16", "maybe", check=False)
    assert result.returncode == 2 and "invalid boolean value 'maybe'" in result.stderr


NAN_LOSS_RUNNER = """
import argparse, sys
import main_dino, utils
original = main_dino.DINOLoss.forward
def nan_forward(self, *args, **kwargs):
    loss, diagnostics = original(self, *args, **kwargs)
    return loss * float("nan"), diagnostics
main_dino.DINOLoss.forward = nan_forward
parser = argparse.ArgumentParser(parents=[main_dino.get_args_parser()])
utils.run_cli(main_dino.main, parser.parse_args(sys.argv[1:]))
"""


@pytest.mark.slow
def test_non_finite_loss_stops_with_exit_code_1(small_folder, tmp_path):
    command = [sys.executable, "-c", NAN_LOSS_RUNNER, "--data_path", str(small_folder),
               "--output_dir", str(tmp_path), *TINY_RUN, "--epochs", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Loss is nan at epoch 0, iteration 0, stopping training" in result.stdout
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.slow
@pytest.mark.parametrize("gpu_decode", ["false", "true"])
def test_gpu_augment_path_trains(small_folder, tmp_path, gpu_decode):
    run_main_dino(small_folder, tmp_path, "--epochs", "1", "--gpu_augment", "true",
                  "--canvas_size", "48", "--gpu_decode", gpu_decode)
    with open(tmp_path / "log.txt") as log_file:
        record = json.loads(log_file.readline())
    assert math.isfinite(record["train_loss"]) and record["train_skipped_images"] == 1
    assert utils.load_checkpoint_file(str(tmp_path / "checkpoint.pth"))["args"].gpu_augment


@pytest.mark.slow
def test_convnet_with_batchnorm_trains_on_cpu(small_folder, tmp_path):
    run_main_dino(small_folder, tmp_path, "--epochs", "1", "--arch", "resnet18",
                  "--out_dim", "64", "--use_bn_in_head", "true")
    checkpoint = utils.load_checkpoint_file(str(tmp_path / "checkpoint.pth"))
    teacher_keys = set(checkpoint["teacher"])
    assert {"backbone.bn1.running_mean", "head.mlp.1.running_var"} <= teacher_keys
    assert {f"module.{key}" for key in teacher_keys} == set(checkpoint["student"])
    with open(tmp_path / "log.txt") as log_file:
        assert math.isfinite(json.loads(log_file.readline())["train_loss"])
