import argparse
import math
import os

import numpy as np
import pytest
import torch

import dino_small_data
import main_dino
import sample_data
import utils


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser("DINO", parents=[main_dino.get_args_parser()])
    return parser.parse_args(list(flags))


def test_demo_sized_settings_match_hand_computed_values():
    # 1,297 digits at 32 px, batch 32, 6 epochs: 40 steps per epoch, 240 steps in all.
    settings = dino_small_data.small_data_settings(1297, 32, 32, epochs=6)
    assert settings["out_dim"] == 256  # 1297 / 8 = 162 -> 128, raised to the floor of 256
    assert settings["momentum_teacher"] == pytest.approx(1 - 0.8 / math.sqrt(240), abs=1e-4)
    assert (settings["patch_size"], settings["global_crops_size"],
            settings["local_crops_size"]) == (8, 32, 16)
    assert settings["global_crops_scale"] == (0.6, 1.0)
    assert (settings["local_crops_scale"], settings["local_crops_number"]) == ((0.25, 0.6), 4)
    assert (settings["warmup_epochs"], settings["warmup_teacher_temp_epochs"]) == (1, 6)
    assert (settings["warmup_teacher_temp"], settings["teacher_temp"]) == (0.04, 0.02)
    assert settings["koleo_loss_weight"] == 0.1
    assert (settings["lr"], settings["weight_decay_end"], settings["drop_path_rate"]) == (
        0.001, 0.1, 0.0)


def test_epochs_follow_the_data_size_and_values_stay_in_their_bounds():
    # 4,000 28-px images at 64 per step: 62 steps per epoch, round(3000 / 62) = 48 epochs.
    settings = dino_small_data.small_data_settings(4000, 28, 64)
    assert (settings["epochs"], settings["warmup_epochs"], settings["out_dim"]) == (48, 4, 512)
    assert (settings["patch_size"], settings["global_crops_size"],
            settings["local_crops_size"]) == (7, 28, 14)
    big = dino_small_data.small_data_settings(1_000_000, 224, 1024)
    assert (big["epochs"], big["out_dim"], big["patch_size"]) == (10, 4096, 16)
    assert big["global_crops_scale"] == (0.4, 1.0)
    assert dino_small_data.small_data_settings(200, 32, 64, epochs=1)["momentum_teacher"] == 0.9
    assert dino_small_data.small_data_settings(100, 32, 1000)["epochs"] == 300


def test_preset_sets_flags_left_at_their_defaults_and_keeps_explicit_ones(digits_folder, capsys):
    args = parse("--data_path", digits_folder, "--small_data", "true", "--epochs", "3",
                 "--out_dim", "100", "--batch_size_per_gpu", "32", "--global_crops_scale",
                 "0.5", "1")
    applied = dino_small_data.apply_small_data_preset(args, main_dino.get_args_parser())
    assert (args.epochs, args.out_dim, args.global_crops_scale) == (3, 100, [0.5, 1.0])
    assert {"epochs", "out_dim", "global_crops_scale"}.isdisjoint(applied)
    steps = 1797 // 32 * 3
    assert args.momentum_teacher == pytest.approx(1 - 0.8 / math.sqrt(steps), abs=1e-4)
    assert (args.patch_size, args.global_crops_size, args.local_crops_size) == (8, 32, 16)
    assert args.local_crops_scale == [0.25, 0.6]
    assert (args.koleo_loss_weight, args.warmup_teacher_temp_epochs, args.lr) == (0.1, 3, 0.001)
    line = capsys.readouterr().out
    assert "--small_data: 1797 images of about 32 px" in line
    assert "--koleo_loss_weight 0.1" in line and "--out_dim" not in line
    assert "--warmup_teacher_temp 0.04" not in line  # already the default: not reported as set


def test_crop_scale_typed_at_its_default_value_is_kept(digits_folder):
    args = parse("--data_path", digits_folder, "--small_data", "true",
                 "--global_crops_scale", "0.4", "1")
    applied = dino_small_data.apply_small_data_preset(args, main_dino.get_args_parser())
    assert args.global_crops_scale == [0.4, 1.0] and "global_crops_scale" not in applied
    assert args.local_crops_scale == [0.25, 0.6]  # left out: the preset's


def test_preset_counts_the_images_of_every_rank(digits_folder, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse("--data_path", digits_folder, "--small_data", "true")
    dino_small_data.apply_small_data_preset(args, main_dino.get_args_parser(),
                                            utils.launched_world_size())
    assert args.epochs == 214  # 1797 // (64 x 2) = 14 steps per epoch; 3000 / 14
    monkeypatch.delenv("RANK")
    alone = parse("--data_path", digits_folder, "--small_data", "true")
    dino_small_data.apply_small_data_preset(alone, main_dino.get_args_parser(),
                                            utils.launched_world_size())
    assert alone.epochs == 107  # 28 steps per epoch


def test_preset_errors_name_the_folder(tmp_path):
    with pytest.raises(utils.InputError, match="contains no images"):
        dino_small_data.apply_small_data_preset(
            parse("--data_path", str(tmp_path), "--small_data", "true"),
            main_dino.get_args_parser())
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(utils.InputError, match="none of the sampled images.*a.png"):
        dino_small_data.apply_small_data_preset(
            parse("--data_path", str(tmp_path), "--small_data", "true"),
            main_dino.get_args_parser())


@pytest.mark.slow
def test_main_dino_trains_with_the_preset_and_saves_its_values(digits_train_val, run_script,
                                                               tmp_path):
    result = run_script("main_dino.py", "--data_path", os.path.join(digits_train_val, "train"),
                        "--output_dir", str(tmp_path), "--small_data", "true", "--arch",
                        "vit_tiny", "--epochs", "1", "--batch_size_per_gpu", "16",
                        "--num_workers", "0", "--local_crops_number", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--small_data: 150 images of about 32 px" in result.stdout
    saved = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)["args"]
    assert (saved.out_dim, saved.patch_size, saved.global_crops_size) == (256, 8, 32)
    assert (saved.koleo_loss_weight, saved.epochs, saved.local_crops_number) == (0.1, 1, 2)
    assert "koleo_loss" in (tmp_path / "log.txt").read_text()


def test_rendered_digits_are_seeded_inked_and_balanced():
    images, labels = sample_data.rendered_digits(300, seed=3)
    again, again_labels = sample_data.rendered_digits(300, seed=3)
    other, _ = sample_data.rendered_digits(300, seed=4)
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert not np.array_equal(images, other)
    assert set(labels.tolist()) == set(range(10)) and np.bincount(labels).min() >= 15
    assert (images.reshape(300, -1).max(axis=1) > 150).all()  # no blank image (glyph-less font)
    assert len(sample_data.digit_fonts()) >= 8
    assert not any("Display" in font or "LastResort" in font
                   for font in sample_data.digit_fonts())
