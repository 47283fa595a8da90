import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import utils
import vision_transformer as vits


@pytest.mark.parametrize("text,value", [("on", True), ("TRUE", True), ("1", True),
                                        ("off", False), ("False", False), ("0", False)])
def test_bool_flag_spellings(text, value):
    assert utils.bool_flag(text) is value


def test_bool_flag_bad_value_is_an_argparse_error(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--use_fp16", type=utils.bool_flag)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--use_fp16", "maybe"])
    assert exit_info.value.code == 2
    assert "invalid boolean value 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["--local_rank=3", "--local-rank=3"])
def test_both_local_rank_spellings_parse(spelling):
    parser = argparse.ArgumentParser()
    utils.add_distributed_args(parser)
    assert parser.parse_args([spelling]).local_rank == 3


def test_cosine_scheduler_warmup_and_end():
    base, final, epochs, niter, warmup = 0.5, 0.01, 10, 7, 2
    schedule = utils.cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup,
                                      start_warmup_value=0.1)
    assert len(schedule) == epochs * niter
    assert schedule[0] == pytest.approx(0.1)
    assert schedule[warmup * niter - 1] == pytest.approx(base)  # warm-up endpoint included
    assert schedule[warmup * niter] == pytest.approx(base)  # cosine starts at base
    cosine_len = (epochs - warmup) * niter
    last_angle = math.pi * (cosine_len - 1) / cosine_len
    expected_last = final + 0.5 * (base - final) * (1 + math.cos(last_angle))
    assert schedule[-1] == pytest.approx(expected_last)
    assert schedule[-1] > final
    no_warmup = utils.cosine_scheduler(0.04, 0.4, 3, 5)
    assert no_warmup[0] == pytest.approx(0.04) and np.all(np.diff(no_warmup) > 0)


def test_clip_gradients_is_per_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    scales = (10, 0.1, 5, 0.01)
    grads = [torch.randn_like(p) * scale for p, scale in zip(model.parameters(), scales)]
    for param, grad in zip(model.parameters(), grads):
        param.grad = grad.clone()
    norms = utils.clip_gradients(model, 1.0)
    for param, grad, norm in zip(model.parameters(), grads, norms):
        n = grad.norm().item()
        assert norm.item() == pytest.approx(n, rel=1e-6)
        coef = 1.0 / (n + 1e-6)
        expected = grad * coef if coef < 1 else grad
        torch.testing.assert_close(param.grad, expected)
        if coef >= 1:
            assert torch.equal(param.grad, grad)


def test_lars_step_matches_hand_computation():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0, -1.0]))
    optimizer = utils.LARS([{"params": [weight]}, {"params": [bias]}], lr=0.1, weight_decay=0.5,
                           momentum=0.9, eta=0.001)
    weight.grad = torch.tensor([[1.0, 2.0]])
    bias.grad = torch.tensor([0.5, 0.5])
    optimizer.step()
    update = torch.tensor([[1.0 + 1.5, 2.0 + 2.0]])  # grad + wd * p
    trust = 0.001 * 5.0 / update.norm()
    torch.testing.assert_close(weight.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    # 1-D parameters: plain momentum SGD
    torch.testing.assert_close(bias.detach(), torch.tensor([0.95, -1.05]))
    weight.grad = torch.tensor([[1.0, 2.0]])
    bias.grad = torch.tensor([0.5, 0.5])
    optimizer.step()
    torch.testing.assert_close(bias.detach(), torch.tensor([0.95 - 0.1 * (0.9 * 0.5 + 0.5),
                                                            -1.05 - 0.1 * (0.9 * 0.5 + 0.5)]))


def test_params_groups_split_biases_and_1d_and_skip_frozen():
    model = utils.MultiCropWrapper(vits.vit_tiny(), vits.DINOHead(192, 16, hidden_dim=32))
    regularized, not_regularized = utils.get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    reg_names = {names[id(p)] for p in regularized["params"]}
    not_reg_names = {names[id(p)] for p in not_regularized["params"]}
    assert not_regularized["weight_decay"] == 0.0
    assert {"backbone.cls_token", "backbone.pos_embed", "head.last_layer.weight_v"} <= reg_names
    assert {"backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias"} <= not_reg_names
    assert "head.last_layer.weight_g" not in reg_names | not_reg_names


def test_cancel_gradients_last_layer_only_during_frozen_epochs():
    head = vits.DINOHead(8, 4, hidden_dim=16, norm_last_layer=False)
    head(torch.randn(3, 8)).sum().backward()
    utils.cancel_gradients_last_layer(1, head, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is not None
    utils.cancel_gradients_last_layer(0, head, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None


class RecordingBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))


def test_multicrop_wrapper_groups_consecutive_resolutions_and_runs_head_once():
    backbone = RecordingBackbone()
    head_calls = []
    head = nn.Identity()
    head.register_forward_hook(lambda module, inputs, output: head_calls.append(inputs[0].shape))
    wrapper = utils.MultiCropWrapper(backbone, head)
    assert isinstance(wrapper.backbone.fc, nn.Identity)
    crops = [torch.full((2, 3, 8, 8), float(i)) for i in range(2)]
    crops += [torch.full((2, 3, 4, 4), float(i)) for i in range(2, 5)]
    out = wrapper(crops)
    assert backbone.calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert head_calls == [torch.Size([10, 3])]
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # crop order kept
    assert wrapper(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


def test_slurm_environment_without_submitit(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    args = argparse.Namespace(dist_url="env://")
    utils._read_launch_environment(args)
    assert (args.rank, args.world_size, args.gpu) == (5, 8, 1)


def test_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = argparse.Namespace(dist_url="env://", local_rank=0)
    utils._read_launch_environment(args)
    assert (args.rank, args.world_size, args.gpu) == (3, 4, 1)


def test_lone_process_gets_a_free_port(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(dist_url="env://")
    utils._read_launch_environment(args)
    assert (args.rank, args.world_size) == (0, 1)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def test_save_on_master_is_atomic_and_restart_restores(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = str(tmp_path / "checkpoint.pth")
    utils.save_on_master({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "epoch": 7, "args": argparse.Namespace(lr=0.1)}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    fresh = nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    run_variables = {"epoch": 0}
    utils.restart_from_checkpoint(path, run_variables, model=fresh, optimizer=fresh_optimizer,
                                  missing=nn.Linear(1, 1))
    assert run_variables["epoch"] == 7
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    assert utils.load_checkpoint_file(path)["args"].lr == 0.1


def test_restart_without_checkpoint_is_a_no_op(tmp_path):
    run_variables = {"epoch": 0}
    utils.restart_from_checkpoint(str(tmp_path / "none.pth"), run_variables, model=nn.Linear(1, 1))
    assert run_variables == {"epoch": 0}


def _training_checkpoint(tmp_path, arch="vit_tiny", patch=16):
    backbone = vits.__dict__[arch](patch_size=patch)
    student = utils.MultiCropWrapper(backbone, vits.DINOHead(backbone.embed_dim, 8, hidden_dim=16))
    state = {"student": {f"module.{k}": v for k, v in student.state_dict().items()},
             "teacher": student.state_dict(), "epoch": 1}
    path = str(tmp_path / "checkpoint.pth")
    torch.save(state, path)
    return path, backbone


def test_load_pretrained_weights_from_training_checkpoint(tmp_path, capsys):
    path, trained = _training_checkpoint(tmp_path)
    for key in ("teacher", "student"):
        model = vits.vit_tiny(patch_size=16)
        utils.load_pretrained_weights(model, path, key, "vit_tiny", 16)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     trained.state_dict().values()))
    assert "Take key student in provided checkpoint dict" in capsys.readouterr().out


def test_load_pretrained_weights_errors(tmp_path):
    path, _ = _training_checkpoint(tmp_path)
    with pytest.raises(utils.InputError, match="does not fit the model: pos_embed"):
        utils.load_pretrained_weights(vits.vit_tiny(patch_size=8), path, "teacher", "vit_tiny", 8)
    with pytest.raises(utils.InputError, match="is not a file"):
        utils.load_pretrained_weights(vits.vit_tiny(), str(tmp_path / "nope.pth"), "teacher",
                                      "vit_tiny", 16)
    other = str(tmp_path / "other.pth")
    torch.save({"model": {"layer.weight": torch.zeros(2)}}, other)
    with pytest.raises(utils.InputError, match="no key of"):
        utils.load_pretrained_weights(vits.vit_tiny(), other, "teacher", "vit_tiny", 16)
    with pytest.raises(utils.InputError, match="no reference weights exist for vit_tiny"):
        utils.load_pretrained_weights(vits.vit_tiny(), "", "teacher", "vit_tiny", 16)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(utils.InputError, match="cannot read checkpoint"):
        utils.load_pretrained_weights(vits.vit_tiny(), str(garbage), "teacher", "vit_tiny", 16)


def test_random_weights_only_when_asked(capsys):
    model = vits.vit_tiny()
    before = model.pos_embed.clone()
    utils.load_pretrained_weights(model, "random", "teacher", "vit_tiny", 16)
    assert torch.equal(model.pos_embed, before)
    assert "random weights" in capsys.readouterr().out


def test_reference_urls():
    prefix = utils.REFERENCE_URL_PREFIX
    assert utils.reference_weights_url("vit_small", 16) == \
        prefix + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    assert utils.reference_weights_url("vit_small", 8, visualisation=True).endswith(
        "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth")
    assert utils.reference_weights_url("vit_base", 8, kind="linear") == \
        prefix + "dino_vitbase8_pretrain/dino_vitbase8_linearweights.pth"
    assert utils.reference_weights_url("resnet50", 16).endswith("dino_resnet50_pretrain.pth")
    assert utils.reference_weights_url("xcit_small_12_p8", 8).endswith(
        "dino_xcit_small_12_p8_pretrain/dino_xcit_small_12_p8_pretrain.pth")
    assert utils.reference_weights_url("vit_tiny", 16) is None


def test_build_backbone_torchvision_and_errors():
    model, dim = utils.build_backbone("resnet18")
    assert dim == 512 and isinstance(model.fc, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert utils.build_backbone("deit_tiny", 16)[1] == 192
    with pytest.raises(utils.InputError, match="unknown architecture"):
        utils.build_backbone("vit_giant")
    choices = utils.arch_choices()
    assert {"vit_small", "xcit_small_12_p16", "resnet50", "deit_small"} <= set(choices)


def test_accuracy_percentages():
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.2, 0.5, 0.3]])
    target = torch.tensor([1, 1, 0, 2])
    top1, top2 = utils.accuracy(output, target, topk=(1, 2))
    assert top1.item() == pytest.approx(25.0) and top2.item() == pytest.approx(75.0)


def test_metric_logger_line_format(capsys):
    logger = utils.MetricLogger(delimiter="  ")
    for step in logger.log_every(range(12), 10, "Epoch: [0/100]"):
        logger.update(loss=float(step), lr=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # steps 0, 10, 11 and the total
    assert lines[1].startswith("Epoch: [0/100]  [10/12]  eta: 0:00:00  "
                               "loss: 5.000000 (5.000000)  lr: 0.500000 (0.500000)  time: ")
    assert "  data: " in lines[1]
    assert lines[3].startswith("Epoch: [0/100] Total time: 0:00:00 (")
    assert lines[3].endswith(" s / it)")


def test_smoothed_value_median_window_and_global_average():
    value = utils.SmoothedValue(window_size=3)
    for v in (1.0, 100.0, 2.0, 3.0):
        value.update(v)
    assert value.median == 3.0 and value.global_avg == pytest.approx(26.5)
    assert str(value) == "3.000000 (26.500000)"


def test_json_log_append_and_truncate(tmp_path):
    path = str(tmp_path / "log.txt")
    for epoch in range(4):
        utils.append_json_line(path, {"train_loss": 1.0, "epoch": epoch})
    utils.truncate_json_log(path, 2)
    with open(path) as log_file:
        assert [json.loads(line)["epoch"] for line in log_file] == [0, 1]


def test_find_images_errors(tmp_path):
    with pytest.raises(utils.InputError, match="does not exist"):
        utils.find_images(str(tmp_path / "missing"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(utils.InputError, match="contains no images"):
        utils.find_images(str(tmp_path / "empty"))


def test_pretrained_backbone_gets_the_register_tokens_of_its_weights(tmp_path):
    trained = vits.vit_tiny(patch_size=8, num_register_tokens=2)
    backbone_file, checkpoint_file = tmp_path / "backbone.pth", tmp_path / "checkpoint.pth"
    torch.save(trained.state_dict(), backbone_file)
    torch.save({"teacher": {"backbone." + k: v for k, v in trained.state_dict().items()},
                "student": {"module.backbone." + k: v for k, v in trained.state_dict().items()}},
               checkpoint_file)
    for path in (backbone_file, checkpoint_file):
        model, _ = utils.build_pretrained_backbone("vit_tiny", 8, str(path), "teacher")
        assert model.num_register_tokens == 2
        for key, value in trained.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    model, _ = utils.build_pretrained_backbone("vit_tiny", 8, "random", "teacher")
    assert model.num_register_tokens == 0 and len(model.state_dict()) == 150
