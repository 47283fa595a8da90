"""--distill_from: a frozen teacher that is never updated, and the fitting of a fresh head."""
import pytest
import torch

import dino_distillation
import main_dino
import utils


def distill_args(teacher_path: str, *flags: str):
    args = main_dino.get_args_parser().parse_args(
        ["--arch", "vit_tiny", "--patch_size", "8", "--out_dim", "256", "--local_crops_number",
         "2", "--batch_size_per_gpu", "4", "--epochs", "2", "--warmup_epochs", "1",
         "--distill_from", teacher_path, *flags])
    args.gpu, args.compile = 0, False
    return args


def train_steps(training, steps, iters_per_epoch=2):
    values = []
    for it in steps:
        generator = torch.Generator().manual_seed(it)
        crops = ([torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
                 + [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)])
        main_dino.set_schedules(training.optimizer, training.schedules, it)
        values.append(main_dino.training_step(training, [crops], it // iters_per_epoch, it))
    return values


def cloned(module):
    return {name: value.clone() for name, value in module.state_dict().items()}


def assert_same(state, module, prefix=""):
    for name, value in module.state_dict().items():
        if name.startswith(prefix):
            assert torch.equal(value, state[name]), name


def backbone_only_file(checkpoint: str, folder) -> str:
    teacher = utils.load_checkpoint_file(checkpoint)["teacher"]
    path = str(folder / "backbone.pth")
    torch.save({name[len("backbone."):]: value for name, value in teacher.items()
                if name.startswith("backbone.")}, path)
    return path


def test_teacher_with_heads_is_bit_identical_after_steps(tiny_dino_checkpoint,
                                                         single_process_group):
    args = distill_args(tiny_dino_checkpoint, "--ibot_loss_weight", "1",
                        "--koleo_loss_weight", "0.1")
    training = main_dino.build_training(args, torch.device("cpu"), iters_per_epoch=2)
    teacher = training.distillation.teacher
    source = utils.load_checkpoint_file(tiny_dino_checkpoint)["teacher"]
    assert_same(source, teacher)  # backbone and DINO head of the checkpoint's teacher
    assert not any(param.requires_grad for param in teacher.parameters())
    frozen, ema = cloned(teacher), cloned(training.teacher)
    values = train_steps(training, range(4))
    assert_same(frozen, teacher)
    assert not torch.equal(ema["backbone.pos_embed"], training.teacher.state_dict()[
        "backbone.pos_embed"])  # the student's own EMA copy moves
    assert {"loss", "dino_loss", "koleo_loss", "ibot_loss", "teacher_entropy",
            "teacher_kl"} <= set(values[-1])
    assert all(torch.isfinite(value).all() for step in values for value in step.values())
    assert list(training.checkpointed) == ["student", "teacher", "optimizer", "dino_loss",
                                           "ibot_loss"]


def test_teacher_head_width_is_read_from_the_file(tmp_path, single_process_group):
    """A teacher trained with --head_hidden_dim 96 loads whatever the student's head width."""
    teacher_args = distill_args("", "--head_hidden_dim", "96", "--ibot_loss_weight", "1")
    teacher_args.distill_from = ""
    _, teacher, _ = main_dino.build_student_teacher(teacher_args, torch.device("cpu"))
    path = str(tmp_path / "teacher.pth")
    torch.save({"teacher": teacher.state_dict(), "args": teacher_args}, path)
    args = distill_args(path, "--ibot_loss_weight", "1")
    training = main_dino.build_training(args, torch.device("cpu"), iters_per_epoch=2)
    assert training.distillation.teacher.head.mlp[0].weight.shape == (96, 192)
    assert training.distillation.teacher.ibot_head.mlp[0].weight.shape == (96, 192)
    assert training.student.module.head.mlp[0].weight.shape == (2048, 192)
    assert_same(teacher.state_dict(), training.distillation.teacher)


def test_backbone_only_teacher_fits_its_head_then_freezes(tiny_dino_checkpoint, tmp_path,
                                                          single_process_group):
    path = backbone_only_file(tiny_dino_checkpoint, tmp_path)
    args = distill_args(path, "--distill_arch", "vit_tiny", "--distill_head_warmup_epochs", "1")
    training = main_dino.build_training(args, torch.device("cpu"), iters_per_epoch=2)
    teacher = training.distillation.teacher
    start = cloned(teacher)
    values = train_steps(training, range(2))  # epoch 0: the head is fitted
    assert all("head_warmup_loss" in step for step in values)
    assert_same(start, teacher, prefix="backbone.")
    assert not torch.equal(start["head.mlp.0.weight"], teacher.state_dict()["head.mlp.0.weight"])
    assert torch.equal(start["head.last_layer.weight_g"],
                       teacher.state_dict()["head.last_layer.weight_g"])
    fitted = cloned(teacher)
    values = train_steps(training, range(2, 4))  # epoch 1: frozen
    assert not any("head_warmup_loss" in step for step in values)
    assert_same(fitted, teacher)
    state = training.checkpointed["distillation"].state_dict()
    assert torch.equal(state["head"]["mlp.0.weight"], fitted["head.mlp.0.weight"])


@pytest.mark.parametrize("flags,message", [
    (["--out_dim", "128"], "DINO head of --distill_from .* does not fit: size mismatch"),
    (["--ibot_loss_weight", "1", "--patch_size", "16"],
     "must be a ViT with the student's --patch_size 16"),
    (["--ibot_loss_weight", "1", "--ibot_out_dim", "64"], "set --ibot_out_dim 256"),
])
def test_teacher_that_does_not_fit_is_a_clear_error(tiny_dino_checkpoint, flags, message):
    args = distill_args(tiny_dino_checkpoint, *flags)
    with pytest.raises(utils.InputError, match=message):
        dino_distillation.build_distillation(args, torch.device("cpu"))


def test_backbone_only_teacher_needs_its_arch(tiny_dino_checkpoint, tmp_path):
    args = distill_args(backbone_only_file(tiny_dino_checkpoint, tmp_path))
    with pytest.raises(utils.InputError, match="pass --distill_arch"):
        dino_distillation.build_distillation(args, torch.device("cpu"))
    with pytest.raises(utils.InputError, match="is not a file"):
        dino_distillation.build_distillation(distill_args(str(tmp_path / "nope.pth")),
                                             torch.device("cpu"))
