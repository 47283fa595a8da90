"""main_dino's DINOv2-era switches: off by default (v1 numbers unchanged), and each one in a
tiny end-to-end run with finite losses, its log keys and a checkpoint the other scripts read."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import hubconf
import main_dino
import utils
import vision_transformer as vits
from benchmarks import switch_speed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "256",
            "--batch_size_per_gpu", "32", "--warmup_epochs", "1", "--num_workers", "0",
            "--lr", "0.001", "--epochs", "1"]
V1_KEYS = ["student", "teacher", "optimizer", "epoch", "args", "dino_loss"]


def v1_args(*flags: str):
    args = main_dino.get_args_parser().parse_args(
        ["--arch", "vit_tiny", "--patch_size", "8", "--out_dim", "64", "--local_crops_number",
         "2", "--batch_size_per_gpu", "4", "--epochs", "2", "--warmup_epochs", "1", "--lr",
         "0.01", *flags])
    args.gpu, args.compile = 0, False
    return args


def test_defaults_train_exactly_as_before_the_switches(single_process_group):
    """Three steps of the default configuration give the numbers the code gave before the
    switches existed (recorded with that code, same seeds)."""
    utils.fix_random_seeds(0)
    training = main_dino.build_training(v1_args(), torch.device("cpu"), iters_per_epoch=3)
    assert training.objectives is None and training.distillation is None
    assert type(training.student.module) is utils.MultiCropWrapper
    assert list(training.checkpointed) == ["student", "teacher", "optimizer", "dino_loss"]
    assert len(training.teacher.backbone.state_dict()) == 150
    generator = torch.Generator().manual_seed(1)
    values = []
    for it in range(3):
        crops = ([torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
                 + [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)])
        main_dino.set_schedules(training.optimizer, training.schedules, it)
        step = main_dino.training_step(training, [crops], epoch=0 if it < 2 else 1, it=it)
        assert list(step) == ["loss", "teacher_entropy", "teacher_kl"]
        values.append([value.item() for value in step.values()])
    expected = [[3.9251346588, 3.3487370014, 0.5404262543],
                [3.9957463741, 3.4266664982, 0.4245960712],
                [4.0688643456, 3.5080840588, 0.373749733]]
    # Float rounding only (other thread counts reorder sums): the KL is a small difference.
    for got, want in zip(values, expected):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    teacher_sum = sum(param.double().sum().item() for param in training.teacher.parameters())
    assert teacher_sum == pytest.approx(4893.462837710116, rel=1e-8)
    assert training.dino_loss.center.double().sum().item() == pytest.approx(
        -0.14724357763770968, rel=1e-6)


def test_collapse_warning_reads_the_dino_part_of_a_summed_loss(capsys):
    uniform = math.log(256)
    healthy = {"teacher_entropy": 1.0, "teacher_kl": 1.0}
    main_dino.warn_on_collapse({"loss": uniform + 2.0, "dino_loss": uniform, **healthy}, 256)
    assert "the loss 5.5452 sits at ln(out_dim)" in capsys.readouterr().out
    main_dino.warn_on_collapse({"loss": uniform, "dino_loss": 2.0, **healthy}, 256)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("flags,message", [
    (["--num_register_tokens", "2", "--arch", "resnet18"], "needs a ViT, not resnet18"),
    (["--ibot_loss_weight", "1", "--arch", "resnet18"], "use a ViT, not resnet18"),
    (["--ibot_loss_weight", "1", "--use_bn_in_head", "true"], "--use_bn_in_head"),
    (["--ibot_loss_weight", "1", "--ibot_separate_head", "false", "--ibot_out_dim", "32"],
     "--ibot_out_dim must be left out or equal --out_dim"),
    (["--ibot_mask_ratio", "0.5", "0.1"], "give MIN <= MAX within"),
    (["--ibot_mask_probability", "1.5"], "is not within"),
    (["--koleo_loss_weight", "0.1", "--batch_size_per_gpu", "1"], "--batch_size_per_gpu 2"),
    (["--sharding", "fsdp", "--arch", "resnet18"], "use a ViT, not resnet18"),
    (["--sharding", "fsdp", "--optimizer", "lars"], "adamw or sgd"),
    (["--head_hidden_dim", "0"], "--head_hidden_dim must be positive"),
    (["--distill_head_warmup_epochs", "-1"], "must be 0 or more"),
    (["--num_register_tokens", "-2"], "must be 0 or more"),
    (["--koleo_loss_weight", "-0.1"], "must be 0 or more"),
    (["--koleo_loss_weight", "0.1", "--compile", "true", "--compile_scope", "step"],
     "compiles the v1 DINO step only"),
    (["--grad_accum_steps", "2", "--compile", "true", "--compile_scope", "step"],
     "does not combine with --grad_accum_steps > 1"),
])
def test_switch_flags_that_cannot_run_are_one_line_errors(flags, message):
    args = main_dino.get_args_parser().parse_args(["--warmup_epochs", "0", *flags])
    with pytest.raises(utils.InputError, match=message):
        main_dino.check_flags(args)


def test_head_hidden_dim_sets_both_heads_width_and_defaults_to_the_reference(
        single_process_group):
    default, _, _ = main_dino.build_student_teacher(v1_args(), torch.device("cpu"))
    assert default.module.head.mlp[0].weight.shape == (2048, 192)
    args = v1_args("--head_hidden_dim", "96", "--ibot_loss_weight", "1")
    student, teacher, _ = main_dino.build_student_teacher(args, torch.device("cpu"))
    for network in (student.module, teacher):
        widths = [(layer.in_features, layer.out_features) for head in (network.head,
                  network.ibot_head) for layer in head.mlp if isinstance(layer, torch.nn.Linear)]
        assert widths == [(192, 96), (96, 96), (96, 256)] * 2


def test_packed_forward_gives_the_switches_the_same_outputs(single_process_group):
    """KoLeo's multi-output wrapper with --packed_forward: one backbone pass for all crops, the
    same DINO logits and global [CLS] features as one pass per resolution."""
    outputs = []
    for packed in ("false", "true"):
        utils.fix_random_seeds(0)
        args = v1_args("--koleo_loss_weight", "0.1", "--packed_forward", packed)
        student, _, _ = main_dino.build_student_teacher(args, torch.device("cpu"))
        assert student.module.packed is (packed == "true")
        generator = torch.Generator().manual_seed(1)
        crops = ([torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
                 + [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)])
        outputs.append(student(crops))
    assert outputs[1].dino.shape == (16, 64) and outputs[1].global_cls.shape == (8, 192)
    torch.testing.assert_close(outputs[1].dino, outputs[0].dino, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs[1].global_cls, outputs[0].global_cls, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits64(tmp_path_factory):
    """64 digits: two iterations of 32 images per epoch."""
    from sample_data import write_digits_folder

    return write_digits_folder(str(tmp_path_factory.mktemp("digits64")), size=32, limit=64)


def run_main_dino(data, output_dir, *flags, launcher=()):
    command = [sys.executable, *launcher, "main_dino.py", "--data_path", str(data),
               "--output_dir", str(output_dir), *TINY_RUN, *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(output_dir, "log.txt")) as log_file:
        record = json.loads(log_file.readline())
    return utils.load_checkpoint_file(os.path.join(output_dir, "checkpoint.pth")), record


def backbone_of(teacher: dict) -> dict:
    return {name[len("backbone."):]: value for name, value in teacher.items()
            if name.startswith("backbone.")}


def assert_finite_with_keys(record: dict, *names: str) -> None:
    keys = ("train_loss", "train_teacher_entropy", "train_teacher_kl") + names
    for key in keys:
        assert math.isfinite(record[key]), key


@pytest.mark.slow
def test_register_tokens_and_koleo_end_to_end(digits64, tmp_path):
    checkpoint, record = run_main_dino(digits64, tmp_path, "--num_register_tokens", "2",
                                       "--koleo_loss_weight", "0.1")
    assert_finite_with_keys(record, "train_dino_loss", "train_koleo_loss")
    assert record["train_loss"] == pytest.approx(
        record["train_dino_loss"] + 0.1 * record["train_koleo_loss"], rel=1e-4)
    assert list(checkpoint) == V1_KEYS
    assert tuple(checkpoint["teacher"]["backbone.register_tokens"].shape) == (1, 2, 192)
    model = vits.vit_tiny(patch_size=8, num_register_tokens=2)
    model.load_state_dict(backbone_of(checkpoint["teacher"]), strict=True)
    assert not any(name.startswith("ibot_head.") for name in checkpoint["teacher"])
    hub_model = hubconf.dino_from_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert hub_model.num_register_tokens == 2
    assert hub_model.get_last_selfattention(torch.randn(1, 3, 32, 32)).shape == (1, 3, 17, 17)


@pytest.mark.slow
def test_ibot_with_its_own_head_end_to_end(digits64, tmp_path):
    checkpoint, record = run_main_dino(digits64, tmp_path, "--ibot_loss_weight", "1",
                                       "--ibot_out_dim", "128")
    assert_finite_with_keys(record, "train_dino_loss", "train_ibot_loss")
    assert list(checkpoint) == V1_KEYS + ["ibot_loss"]
    assert tuple(checkpoint["ibot_loss"]["center"].shape) == (1, 128)
    assert checkpoint["ibot_loss"]["center"].abs().sum() > 0
    assert tuple(checkpoint["teacher"]["ibot_head.last_layer.weight_v"].shape) == (128, 256)
    assert "module.backbone.mask_token" in checkpoint["student"]
    # Evaluation reads the backbone and ignores the heads and the mask token.
    model, _ = utils.build_pretrained_backbone("vit_tiny", 8, str(tmp_path / "checkpoint.pth"),
                                               "teacher")
    assert len(model.state_dict()) == 150


@pytest.mark.slow
def test_ibot_on_the_dino_head_with_sinkhorn_knopp_end_to_end(digits64, tmp_path):
    checkpoint, record = run_main_dino(digits64, tmp_path, "--ibot_loss_weight", "0.5",
                                       "--ibot_separate_head", "false", "--centering",
                                       "sinkhorn_knopp")
    assert_finite_with_keys(record, "train_dino_loss", "train_ibot_loss")
    assert not any(name.startswith("ibot_head.") for name in checkpoint["teacher"])
    # Sinkhorn-Knopp balances the targets itself: neither centre moves.
    assert torch.equal(checkpoint["dino_loss"]["center"], torch.zeros(1, 256))
    assert torch.equal(checkpoint["ibot_loss"]["center"], torch.zeros(1, 256))


@pytest.mark.slow
def test_distillation_end_to_end(digits64, tmp_path, tiny_dino_checkpoint):
    checkpoint, record = run_main_dino(digits64, tmp_path, "--distill_from", tiny_dino_checkpoint)
    assert_finite_with_keys(record, "train_dino_loss")
    assert list(checkpoint) == V1_KEYS
    # The saved teacher is the student's EMA copy, in the v1 layout.
    assert {name.replace("module.", "", 1) for name in checkpoint["student"]} == set(
        checkpoint["teacher"])
    source = utils.load_checkpoint_file(tiny_dino_checkpoint)["teacher"]
    assert not torch.equal(checkpoint["teacher"]["backbone.pos_embed"],
                           source["backbone.pos_embed"])


@pytest.mark.slow
def test_fsdp_under_torchrun_end_to_end(digits64, tmp_path):
    checkpoint, record = run_main_dino(
        digits64, tmp_path, "--sharding", "fsdp", "--batch_size_per_gpu", "8",
        "--grad_accum_steps", "2", "--koleo_loss_weight", "0.1",
        launcher=("-m", "torch.distributed.run", "--nproc_per_node=2"))
    assert_finite_with_keys(record, "train_koleo_loss")
    assert list(checkpoint) == V1_KEYS
    assert all(name.startswith("module.") for name in checkpoint["student"])
    vits.vit_tiny(patch_size=8).load_state_dict(backbone_of(checkpoint["teacher"]), strict=True)
    assert len(checkpoint["optimizer"]["param_groups"]) == 2


@pytest.mark.slow
def test_switch_speed_benchmark_runs(tmp_path):
    output = tmp_path / "speed.json"
    command = [sys.executable, "-m", "benchmarks.switch_speed", "--patch_size", "8", "--out_dim",
               "64", "--batch_size", "2", "--global_crops_size", "16", "--local_crops_size", "8",
               "--local_crops_number", "1", "--iters", "1", "--warmup_iters", "0", "--switches",
               "v1", "dinov2-all", "distill", "--config", "narrow-head=--head_hidden_dim 32 "
               "--koleo_loss_weight 0.1", "--json", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output) as results:
        seconds = json.load(results)["seconds_per_iter"]
    assert list(seconds) == ["v1", "dinov2-all", "distill", "narrow-head"]
    assert all(value > 0 for value in seconds.values())


def test_switch_speed_config_applies_flags_given_at_their_default():
    bench = argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=64, batch_size=2,
                               global_crops_size=16, local_crops_size=8, local_crops_number=1,
                               precision="fp32", compile=False)
    args = switch_speed.switch_args(bench, ["--patch_size", "16", "--head_hidden_dim", "32"])
    assert (args.patch_size, args.head_hidden_dim, args.out_dim) == (16, 32, 64)
