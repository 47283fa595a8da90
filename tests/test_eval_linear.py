import json
import re
from types import SimpleNamespace

import pytest
import torch

import eval_linear
import utils
import vision_transformer as vits

# Two block outputs of shape (batch 1, [CLS] + 2 patch tokens, dim 2).
SHALLOW = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
DEEP = torch.tensor([[[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]])


def test_cls_tokens_are_concatenated_shallow_to_deep():
    features = eval_linear.vit_linear_features([SHALLOW, DEEP], avgpool=False)
    assert features.tolist() == [[1.0, 2.0, 10.0, 20.0]]


def test_avgpool_interleaves_cls_and_mean_patch_token():
    # [CLS] = (10, 20), mean patch token = ((30 + 50) / 2, (40 + 60) / 2) = (40, 50).
    features = eval_linear.vit_linear_features([DEEP], avgpool=True)
    assert features.tolist() == [[10.0, 40.0, 20.0, 50.0]]


def test_vit_features_have_the_classifier_input_width():
    model = vits.vit_tiny(patch_size=8).eval()
    images = torch.randn(2, 3, 32, 32)
    for n_last_blocks, avgpool in ((4, False), (1, True), (1, False)):
        features = eval_linear.frozen_features(model, images, n_last_blocks, avgpool)
        width = eval_linear.linear_input_dim(model, 192, n_last_blocks, avgpool)
        assert features.shape == (2, width) == (2, 192 * (n_last_blocks + int(avgpool)))


def test_avgpool_needs_a_single_block():
    with pytest.raises(utils.InputError, match="--n_last_blocks 1"):
        eval_linear.linear_input_dim(vits.vit_tiny(), 192, 4, True)


def test_num_labels_defaults_to_the_classes_found():
    assert eval_linear.resolve_num_labels(None, ["a", "b", "c"]) == 3
    assert eval_linear.resolve_num_labels(5, ["a", "b", "c"]) == 5
    with pytest.raises(utils.InputError, match="--num_labels 2 is less than the 3 class folders"):
        eval_linear.resolve_num_labels(2, ["a", "b", "c"])


def test_linear_checkpoint_loads_and_a_wrong_width_is_rejected(tmp_path):
    source = eval_linear.LinearClassifier(8, 3)
    path = str(tmp_path / "linear.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = SimpleNamespace(module=eval_linear.LinearClassifier(8, 3))
    eval_linear.load_linear_weights(target, path, "vit_tiny", 8)
    assert torch.equal(target.module.linear.weight, source.linear.weight)
    too_wide = SimpleNamespace(module=eval_linear.LinearClassifier(16, 3))
    with pytest.raises(utils.InputError, match=r"linear.weight is \(3, 8\), expected \(3, 16\)"):
        eval_linear.load_linear_weights(too_wide, path, "vit_tiny", 8)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

SMALL_IMAGES = ["--arch", "vit_tiny", "--patch_size", "8", "--resize_size", "32",
                "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "16"]


@pytest.mark.slow
def test_linear_run_logs_checkpoints_resumes_and_evaluates(run_script, digits_train_val,
                                                           tiny_dino_checkpoint, tmp_path):
    output_dir = tmp_path / "not" / "yet" / "there"
    common = ["eval_linear.py", "--data_path", digits_train_val, *SMALL_IMAGES,
              "--pretrained_weights", tiny_dino_checkpoint, "--output_dir", str(output_dir)]
    first = run_script(*common, "--epochs", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    log = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    assert [list(record) for record in log] == [
        ["train_lr", "train_loss", "epoch", "test_loss", "test_acc1", "test_acc5"]]
    assert log[0]["epoch"] == 0
    assert log[0]["train_lr"] == pytest.approx(0.001 * 16 / 256)
    checkpoint = torch.load(output_dir / "checkpoint.pth.tar", weights_only=False)
    assert set(checkpoint) == {"epoch", "state_dict", "optimizer", "scheduler", "best_acc"}
    assert checkpoint["epoch"] == 1 and checkpoint["best_acc"] == log[0]["test_acc1"]
    assert list(checkpoint["state_dict"]) == ["module.linear.weight", "module.linear.bias"]
    assert checkpoint["state_dict"]["module.linear.weight"].shape == (10, 4 * 192)
    assert f"Top-1 test accuracy: {log[0]['test_acc1']:.1f}" in first.stdout

    second = run_script(*common, "--epochs", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"Found checkpoint at {output_dir / 'checkpoint.pth.tar'}" in second.stdout
    assert "Epoch: [0]" not in second.stdout and "Epoch: [1]" in second.stdout
    log = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1]
    assert torch.load(output_dir / "checkpoint.pth.tar", weights_only=False)["epoch"] == 2

    evaluated = run_script(*common, "--evaluate", str(output_dir / "checkpoint.pth.tar"))
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    accuracy = re.search(r"Accuracy of the network on the 50 test images: ([0-9.]+)%",
                         evaluated.stdout)
    assert accuracy and accuracy.group(1) == f"{log[-1]['test_acc1']:.1f}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing val folder", "backbone of another patch size",
                                  "linear weights of another width"])
def test_linear_bad_inputs_are_clear_errors(case, run_script, digits_train_val,
                                            tiny_dino_checkpoint, tmp_path):
    args = ["eval_linear.py", "--data_path", digits_train_val, *SMALL_IMAGES,
            "--pretrained_weights", tiny_dino_checkpoint, "--output_dir", str(tmp_path)]
    if case == "missing val folder":
        args[2], expected = str(tmp_path), f"{tmp_path / 'val'!s}' is not a folder"
    elif case == "backbone of another patch size":
        args[args.index("--patch_size") + 1] = "16"
        expected = "does not fit the model: pos_embed"
    else:
        wrong = {"state_dict": {"module.linear.weight": torch.zeros(10, 192),
                                "module.linear.bias": torch.zeros(10)}}
        torch.save(wrong, tmp_path / "wrong.pth")
        args += ["--evaluate", str(tmp_path / "wrong.pth")]
        expected = "linear.weight is (10, 192), expected (10, 768)"
    result = run_script(*args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
