import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import export_onnx
import utils
import vision_transformer as vits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_vit() -> vits.VisionTransformer:
    """A 2-block ViT/8 trained at 64x64 (an 8x8 grid), with a rough position embedding so that
    any error in its interpolation shows in the outputs."""
    torch.manual_seed(0)
    model = vits.VisionTransformer(img_size=[64], patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                   qkv_bias=True)
    with torch.no_grad():
        model.pos_embed.normal_()
    return model.eval()


def run_onnx(path: str, images: torch.Tensor):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def exported_vit(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "vit.onnx")
    model = small_vit()
    export_onnx.export(model, path, with_attention=True)
    return model, path


def test_inputs_and_outputs_are_dynamic(exported_vit):
    graph = onnx.load(exported_vit[1]).graph
    assert [(v.name, dims(v)[:2]) for v in graph.input] == [("images", ["batch", 3])]
    assert dims(graph.input[0])[2:] == ["height", "width"]
    assert [v.name for v in graph.output] == ["features", "attention"]
    assert dims(graph.output[0]) == ["batch", 32]
    assert dims(graph.output[1])[:2] == ["batch", 2]


# (H, W): the training size (embedding kept as is), square and non-square resizing, and a
# non-square image whose grid is still 8x8 (interpolated, with an output the size of its input).
@pytest.mark.parametrize("height,width", [(64, 64), (24, 24), (40, 72), (96, 56), (64, 70)])
def test_onnxruntime_matches_pytorch(exported_vit, height, width):
    model, path = exported_vit
    images = torch.randn(3, 3, height, width)
    features, attention = run_onnx(path, images)
    with torch.no_grad():
        expected_features = model(images).numpy()
        expected_attention = model.get_last_selfattention(images).numpy()
    tokens = (height // 8) * (width // 8) + 1
    assert features.shape == (3, 32) and attention.shape == (3, 2, tokens, tokens)
    assert np.abs(features - expected_features).max() <= 1e-4
    assert np.abs(attention - expected_attention).max() <= 1e-4


def test_the_check_reports_the_differences(exported_vit):
    model, path = exported_vit
    differences = export_onnx.parity(model, path, [(64, 64), (40, 72)], with_attention=True)
    assert len(differences) == 2 and max(differences) <= 1e-4
    with torch.no_grad():
        model.norm.bias.add_(1.0)  # the ONNX file now holds other weights
    try:
        assert min(export_onnx.parity(model, path, [(64, 64), (40, 72)], True)) >= 0.99
    finally:
        with torch.no_grad():
            model.norm.bias.sub_(1.0)


def test_export_leaves_the_model_untouched(tmp_path):
    model = small_vit()
    export_onnx.export(model, str(tmp_path / "plain.onnx"), with_attention=False)
    assert "interpolate_pos_encoding" not in vars(model)
    outputs = run_onnx(str(tmp_path / "plain.onnx"), torch.zeros(1, 3, 16, 24))
    assert len(outputs) == 1 and outputs[0].shape == (1, 32)


def test_convnet_export_and_attention_error(tmp_path):
    model, _ = utils.build_backbone("resnet18")
    model.eval()
    with pytest.raises(utils.InputError, match="--with_attention needs a ViT"):
        export_onnx.export(model, str(tmp_path / "r.onnx"), with_attention=True)
    export_onnx.export(model, str(tmp_path / "r.onnx"), with_attention=False)
    assert max(export_onnx.parity(model, str(tmp_path / "r.onnx"), [(64, 64), (40, 72)],
                                  with_attention=False)) <= 1e-4


@pytest.mark.parametrize("text,size", [("224x224", (224, 224)), ("480X320", (480, 320)),
                                       ("96", (96, 96))])
def test_parse_size(text, size):
    assert export_onnx.parse_size(text) == size


@pytest.mark.parametrize("text", ["224x", "0x224", "ax3", "1x2x3"])
def test_parse_size_rejects(text):
    with pytest.raises(Exception, match="use HxW"):
        export_onnx.parse_size(text)


@pytest.mark.slow
def test_cli_exports_a_checkpoint_and_checks_two_sizes(tmp_path):
    torch.manual_seed(3)
    model = vits.vit_tiny(patch_size=16)
    weights = str(tmp_path / "backbone.pth")
    torch.save(model.state_dict(), weights)
    output = str(tmp_path / "dino_vitt16.onnx")
    run = subprocess.run(
        [sys.executable, "export_onnx.py", "--arch", "vit_tiny", "--patch_size", "16",
         "--pretrained_weights", weights, "--output", output, "--with_attention", "true",
         "--check_sizes", "224x224", "96x160"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "224x224: max |onnxruntime - torch|" in run.stdout
    assert "96x160: max |onnxruntime - torch|" in run.stdout
    assert "ONNX check passed" in run.stdout
    images = torch.randn(2, 3, 48, 80)
    features, attention = run_onnx(output, images)
    with torch.no_grad():
        assert np.abs(features - model.eval()(images).numpy()).max() <= 1e-4
        assert attention.shape == (2, 3, 16, 16)


def test_cli_rejects_a_bad_size():
    run = subprocess.run([sys.executable, "export_onnx.py", "--check_sizes", "224x"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "invalid size '224x': use HxW" in run.stderr


def test_registers_are_exported_and_left_out_of_the_attention(tmp_path):
    torch.manual_seed(1)
    model = vits.VisionTransformer(img_size=[32], patch_size=8, embed_dim=32, depth=2,
                                   num_heads=2, qkv_bias=True, num_register_tokens=2).eval()
    with torch.no_grad():
        model.register_tokens.normal_()
    path = str(tmp_path / "registers.onnx")
    export_onnx.export(model, path, with_attention=True)
    images = torch.randn(2, 3, 40, 24)
    features, attention = run_onnx(path, images)
    with torch.no_grad():
        assert np.abs(features - model(images).numpy()).max() <= 1e-4
        expected = model.get_last_selfattention(images).numpy()
    assert attention.shape == expected.shape == (2, 2, 16, 16)
    assert np.abs(attention - expected).max() <= 1e-4
