import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion
from skimage import data

import attention_maps
import utils
import visualize_attention
from sample_data import write_digits_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "visualize_attention.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def read_rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def dino_checkpoint(tmp_path_factory):
    """checkpoint.pth of a one-iteration main_dino run (ViT-T/8) on 8 digits."""
    root = tmp_path_factory.mktemp("dino")
    write_digits_folder(str(root / "digits"), size=32, limit=8)
    subprocess.run(
        [sys.executable, "main_dino.py", "--data_path", str(root / "digits"),
         "--output_dir", str(root / "out"), "--arch", "vit_tiny", "--patch_size", "8",
         "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
         "--out_dim", "256", "--epochs", "1", "--batch_size_per_gpu", "8",
         "--warmup_epochs", "0", "--num_workers", "0"],
        cwd=REPO, check=True, capture_output=True, timeout=300)
    return str(root / "out" / "checkpoint.pth")


@pytest.mark.slow
def test_default_photo_gives_every_figure_at_the_cropped_size(tmp_path):
    result = run_script("--arch", "vit_tiny", "--patch_size", "16", "--pretrained_weights",
                        "random", "--image_size", "60", "100", "--threshold", "0.6",
                        "--output_dir", str(tmp_path / "figures"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "figures"
    expected = ["img.png", "attn-heads.png"] + [f"attn-head{j}.png" for j in range(3)] + \
        [f"mask_th0.6_head{j}.png" for j in range(3)]
    assert sorted(os.listdir(out)) == sorted(expected)
    for name in expected:
        if name != "attn-heads.png":  # 60x100 cropped to multiples of 16
            assert Image.open(out / name).size == (96, 48), name
    overview = Image.open(out / "attn-heads.png").size
    assert overview[0] > 5 * 96 and overview[1] > 48  # input, 3 heads and the mean side by side
    # img.png is the min-max rescaled network input made from scikit-image's bundled photo.
    img = attention_maps.image_to_tensor(Image.fromarray(data.chelsea()), 16, [60, 100])
    np.testing.assert_allclose(read_rgb(out / "img.png"), visualize_attention.to_display(img),
                               atol=1 / 255 + 1e-6)


@pytest.mark.slow
def test_main_dino_checkpoint_loads_with_the_teacher_key_and_masks_match(tmp_path, capsys,
                                                                         dino_checkpoint):
    photo_path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo_path)
    visualize_attention.main(visualize_attention.get_args_parser().parse_args(
        ["--arch", "vit_tiny", "--patch_size", "8", "--pretrained_weights", dino_checkpoint,
         "--checkpoint_key", "teacher", "--image_path", str(photo_path), "--image_size", "64",
         "--threshold", "0.5", "--output_dir", str(tmp_path / "figures")]))
    stdout = capsys.readouterr().out
    assert "Take key teacher in provided checkpoint dict" in stdout
    assert "missing_keys=[]" in stdout

    model, _ = utils.build_frozen_backbone("vit_tiny", 8, dino_checkpoint, "teacher",
                                           torch.device("cpu"), visualisation=True)
    teacher = utils.load_checkpoint_file(dino_checkpoint)["teacher"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, teacher["backbone." + key]), key
    img = attention_maps.image_to_tensor(Image.open(photo_path).convert("RGB"), 8, [64])
    maps = attention_maps.cls_attention(model, img[None], 8)[0]
    masks = attention_maps.upsample_patches(
        visualize_attention.threshold_masks(maps, 0.5)[None], 8)[0].numpy() > 0.5
    image = read_rgb(tmp_path / "figures" / "img.png")
    for head, mask in enumerate(masks):
        overlay = read_rgb(tmp_path / "figures" / f"mask_th0.5_head{head}.png")
        assert overlay.shape == image.shape == (64, 64, 3)
        # Two pixels away from the drawn contours (which also run along the image border).
        inside = binary_erosion(mask, iterations=2, border_value=0)
        outside = ~binary_dilation(mask, iterations=2)
        assert inside.any() and outside.any()
        red = 0.5 * image + 0.5 * np.array([1.0, 0.0, 0.0])
        np.testing.assert_allclose(overlay[inside], red[inside], atol=3 / 255)
        np.testing.assert_allclose(overlay[outside], image[outside], atol=3 / 255)


def test_no_weights_missing_image_and_bad_threshold_are_input_errors(tmp_path):
    parser = visualize_attention.get_args_parser()
    with pytest.raises(utils.InputError, match="no reference weights exist for vit_tiny.*'random'"):
        visualize_attention.main(parser.parse_args(["--arch", "vit_tiny", "--patch_size", "16",
                                                    "--output_dir", str(tmp_path)]))
    base = ["--arch", "vit_tiny", "--pretrained_weights", "random", "--output_dir", str(tmp_path)]
    with pytest.raises(utils.InputError, match="cannot read image"):
        visualize_attention.main(parser.parse_args(base + ["--image_path", "nope.jpg"]))
    with pytest.raises(utils.InputError, match="--threshold"):
        visualize_attention.main(parser.parse_args(base + ["--threshold", "1.5"]))
    assert os.listdir(tmp_path) == []


def test_reference_flags_and_defaults():
    args = visualize_attention.get_args_parser().parse_args([])
    assert (args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key) == \
        ("vit_small", 8, "", "teacher")
    assert (args.image_path, tuple(args.image_size), args.output_dir, args.threshold) == \
        (None, (480, 480), ".", None)


def test_default_weights_are_the_300_epoch_vit_s8_and_offline_is_a_clear_error(tmp_path,
                                                                              monkeypatch):
    requested = []

    def offline_download(url):
        requested.append(url)
        raise utils.InputError(f"could not download reference weights from {url}")

    monkeypatch.setattr(utils, "download_state_dict", offline_download)
    args = visualize_attention.get_args_parser().parse_args(["--output_dir", str(tmp_path)])
    with pytest.raises(utils.InputError, match="could not download"):
        visualize_attention.main(args)
    assert requested == ["https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/"
                         "dino_deitsmall8_300ep_pretrain.pth"]
    assert os.listdir(tmp_path) == []
