"""The batched multi-crop augmenter against the PIL path (main_dino.DataAugmentationDINO).

Parameter distributions are compared with the PIL pipeline's own settings and with
torchvision's samplers; the ops are compared with PIL/torchvision on real photos.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from skimage import data
from torchvision import transforms

import gpu_augment as ga
import main_dino
import utils

BICUBIC = transforms.InterpolationMode.BICUBIC
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is faster and immune to oversubscribed shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())  # 512 x 512


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(data.chelsea())  # 451 wide x 300 high


@pytest.fixture(scope="module")
def pil_path() -> main_dino.DataAugmentationDINO:
    return main_dino.DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 4, 48, 24)


def leaf_steps(transform) -> list:
    """Every step of a PIL pipeline in order (RandomApply listed before its contents)."""
    if isinstance(transform, transforms.Compose):
        return [step for t in transform.transforms for step in leaf_steps(t)]
    if isinstance(transform, transforms.RandomApply):
        return [transform] + [step for t in transform.transforms for step in leaf_steps(t)]
    return [transform]


def only_step(transform, kind):
    steps = [step for step in leaf_steps(transform) if isinstance(step, kind)]
    assert len(steps) == 1, f"expected one {kind.__name__} in the PIL pipeline"
    return steps[0]


def as_float(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255


def grey_levels(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ((ours - reference) * 255).abs().flatten()


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate((a, b))
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_uniform(samples: np.ndarray, low: float, high: float) -> float:
    """One-sample KS statistic against U(low, high)."""
    samples = np.sort(samples)
    cdf = np.clip((samples - low) / (high - low), 0, 1)
    n = len(samples)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


def identity_params(n: int, box, **changes) -> ga.CropParams:
    """n crops of one box with every random op off; `changes` replaces fields."""
    params = ga.CropParams(
        boxes=torch.tensor([box], dtype=torch.float32).repeat(n, 1),
        flip=torch.zeros(n, dtype=torch.bool), jitter=torch.zeros(n, dtype=torch.bool),
        jitter_factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
        jitter_order=torch.arange(4).repeat(n, 1), grayscale=torch.zeros(n, dtype=torch.bool),
        blur=torch.zeros(n, dtype=torch.bool), blur_sigma=torch.ones(n),
        solarize=torch.zeros(n, dtype=torch.bool))
    for name, value in changes.items():
        setattr(params, name, value)
    return params


# ------------------------------------------------------------------------------------------------
# Worker transform, outputs, API
# ------------------------------------------------------------------------------------------------

def test_canvas_keeps_the_pixels_of_an_image_that_fits_and_shrinks_a_larger_one(chelsea):
    canvas, geometry = ga.CanvasTransform(512)(chelsea)
    assert canvas.dtype == torch.uint8 and canvas.shape == (3, 512, 512)
    assert geometry.tolist() == [451, 300, 451, 300]
    assert torch.equal(canvas[:, :300, :451].permute(1, 2, 0), torch.from_numpy(np.array(chelsea)))
    assert not canvas[:, 300:].any() and not canvas[:, :, 451:].any()
    canvas, geometry = ga.CanvasTransform(64)(chelsea)  # aspect kept: 64 x 43
    assert geometry.tolist() == [451, 300, 64, 43]
    expected = np.array(chelsea.resize((64, 43), Image.Resampling.BICUBIC))
    assert torch.equal(canvas[:, :43].permute(1, 2, 0), torch.from_numpy(expected))
    assert not canvas[:, 43:].any()
    with pytest.raises(utils.InputError, match="canvas_size"):
        ga.CanvasTransform(0)


def test_output_list_matches_the_pil_path_layout(chelsea, pil_path):
    canvas, size = ga.CanvasTransform(96)(chelsea)
    augmenter = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 4, 48, 24, seed=0)
    crops = augmenter(canvas[None].repeat(6, 1, 1, 1), size[None].repeat(6, 1))
    reference = pil_path(chelsea)
    assert [c.shape[1:] for c in crops] == [r.shape for r in reference]
    assert len(crops) == 6 and all(c.shape[0] == 6 for c in crops)
    assert all(c.dtype == torch.float32 and c.device.type == "cpu" for c in crops)
    mean, std = torch.tensor(utils.IMAGENET_MEAN), torch.tensor(utils.IMAGENET_STD)
    low, high = (-mean / std).view(3, 1, 1), ((1 - mean) / std).view(3, 1, 1)
    for crop in crops:
        assert torch.all(crop >= low - 1e-5) and torch.all(crop <= high + 1e-5)
        assert crop.std() > 0.1  # an image, not a constant
    # The crops of one image differ (independent parameters per crop and per image).
    assert not torch.allclose(crops[2][0], crops[3][0])
    assert not torch.allclose(crops[0][0], crops[0][1])


def test_seeded_augmenters_repeat_and_no_locals_gives_two_crops(chelsea):
    canvas, size = ga.CanvasTransform(64)(chelsea)
    canvases, sizes = canvas[None].repeat(3, 1, 1, 1), size[None].repeat(3, 1)
    first = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 2, 32, 16, seed=5)(canvases, sizes)
    again = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 2, 32, 16, seed=5)(canvases, sizes)
    other = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 2, 32, 16, seed=6)(canvases, sizes)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    no_locals = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 0, 32, 16, seed=0)
    assert [c.shape for c in no_locals(canvases, sizes)] == [(3, 3, 32, 32)] * 2


def test_each_batch_draws_its_own_stream_and_a_resumed_epoch_repeats_it():
    sizes = torch.tensor([[120, 80], [64, 64], [50, 90]])

    def two_batches(augmenter, epoch, first_batch=0):
        augmenter.set_epoch(epoch, first_batch)
        return [augmenter.next_params(sizes)[0].boxes for _ in range(2)]

    run = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 2, 32, 16, seed=0, rank=1)
    epoch0, epoch1 = two_batches(run, 0), two_batches(run, 1)
    assert not torch.equal(epoch0[0], epoch0[1])  # batches of one epoch differ
    assert not torch.equal(epoch0[0], epoch1[0])  # batch k of two epochs differs
    resumed = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 2, 32, 16, seed=0, rank=1)
    resumed.next_params(sizes)  # a different history before the resume
    assert all(torch.equal(a, b) for a, b in zip(two_batches(resumed, 1), epoch1))
    assert torch.equal(two_batches(resumed, 1, first_batch=1)[0], epoch1[1])  # mid-epoch
    other_rank = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 2, 32, 16, seed=1, rank=0)
    assert not torch.equal(two_batches(other_rank, 0)[0], epoch0[0])  # not seed + rank


@pytest.mark.parametrize("scale", [(0.5,), (0.4, 1.0, 2.0), (0.8, 0.4), (0.0, 1.0)])
def test_bad_scale_is_an_input_error(scale):
    with pytest.raises(utils.InputError, match="--local_crops_scale"):
        ga.MultiCropAugmenter(GLOBAL_SCALE, scale, 2)


def test_flags_loader_and_augmenter_work_together(tmp_path, single_process_group):
    parser = argparse.ArgumentParser()
    ga.add_gpu_augment_args(parser)
    assert vars(parser.parse_args([])) == {"gpu_augment": False, "canvas_size": 512,
                                           "gpu_decode": False}
    flags = parser.parse_args(["--gpu_augment", "true", "--canvas_size", "40"])
    image_sizes = [(60, 30), (20, 50), (33, 33), (90, 70), (45, 45)]
    for i, (w, h) in enumerate(image_sizes):
        Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    args = argparse.Namespace(
        data_path=str(tmp_path), batch_size_per_gpu=2, num_workers=0, seed=3,
        global_crops_scale=GLOBAL_SCALE, local_crops_scale=LOCAL_SCALE, local_crops_number=3,
        global_crops_size=32, local_crops_size=16, compile=False, **vars(flags))
    loader = ga.build_canvas_loader(args)
    assert len(loader) == 2  # 5 images, batches of 2, the last partial one dropped
    (canvases, geometry), skipped = next(iter(loader))
    assert canvases.shape == (2, 3, 40, 40) and canvases.dtype == torch.uint8
    for canvas, (width, height, fit_width, fit_height) in zip(canvases, geometry.tolist()):
        assert (fit_width, fit_height) == ga.fitted_size(width, height, 40)
        # each canvas holds its own image, black around it
        image = canvas[:, :fit_height, :fit_width]
        assert image.unique().tolist() == [40 * image_sizes.index((width, height))]
        assert canvas.sum() == image.sum()
    assert skipped.tolist() == [0, 0]
    crops = ga.build_augmenter(args, torch.device("cpu"))(canvases, geometry)
    assert [tuple(c.shape) for c in crops] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3
    args.batch_size_per_gpu = 6
    with pytest.raises(utils.InputError, match="lower --batch_size_per_gpu"):
        ga.build_canvas_loader(args)


def test_gpu_decode_workers_read_bytes_and_the_decoded_canvases_match(
        tmp_path, chelsea, astronaut, single_process_group):
    """--gpu_decode on the CPU (the fallback of decoding on the device): JPEGs decoded by
    torchvision, other formats by PIL, a file no decoder reads replaced with a warning."""
    chelsea.save(tmp_path / "a.jpg", quality=95)
    astronaut.save(tmp_path / "b.png")
    (tmp_path / "c.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:2000])  # body cut off
    (tmp_path / "d.jpg").write_bytes(b"not an image")  # skipped in the worker
    args = argparse.Namespace(
        data_path=str(tmp_path), batch_size_per_gpu=3, num_workers=0, gpu_decode=True,
        canvas_size=256, seed=0)
    dataset = ga.build_canvas_loader(args).dataset
    encoded, skipped = ga.collate_encoded([dataset[i] for i in range(4)])
    assert [data.dtype for data in encoded] == [torch.uint8] * 4
    assert skipped.tolist() == [0, 0, 0, 1]
    assert bytes(encoded[0].numpy()) == (tmp_path / "a.jpg").read_bytes()
    with pytest.warns(UserWarning, match="could not be decoded"):
        canvases, geometry = ga.decode_to_canvases(encoded[:3], 256, torch.device("cpu"))
    assert canvases.shape == (3, 3, 256, 256) and canvases.dtype == torch.uint8
    assert geometry.tolist() == [[451, 300, 256, 170], [512, 512, 256, 256], [451, 300, 256, 170]]
    for row, photo in ((0, Image.open(tmp_path / "a.jpg")), (1, astronaut)):
        expected, _ = ga.CanvasTransform(256)(photo.convert("RGB"))
        difference = (canvases[row].float() - expected.float()).abs()
        # torch's antialiased bicubic shrink against PIL's (and two JPEG decoders)
        assert difference.mean() < 1.0 and difference.quantile(0.99) < 6
    assert torch.equal(canvases[2], canvases[0])  # the unreadable JPEG's replacement


# ------------------------------------------------------------------------------------------------
# Parameter distributions
# ------------------------------------------------------------------------------------------------

def box_statistics(boxes: np.ndarray, width: int, height: int) -> dict:
    top, left, box_h, box_w = boxes.astype(np.float64).T
    return {"area": box_h * box_w / (width * height), "log_aspect": np.log(box_w / box_h),
            "centre_x": (left + box_w / 2) / width, "centre_y": (top + box_h / 2) / height}


@pytest.mark.parametrize("scale", [GLOBAL_SCALE, LOCAL_SCALE])
@pytest.mark.parametrize("width,height", [(500, 375), (300, 451), (40, 40)])
def test_crop_boxes_follow_torchvision_random_resized_crop(scale, width, height):
    n = 4000
    torch.manual_seed(0)
    theirs = np.array([transforms.RandomResizedCrop.get_params(
        torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3]) for _ in range(n)], float)
    ours = ga.sample_crop_boxes(torch.tensor([[width, height]]).repeat(n, 1), scale,
                                torch.Generator().manual_seed(1)).numpy()
    top, left, box_h, box_w = ours.T
    assert np.all(ours == np.round(ours))
    assert np.all((top >= 0) & (left >= 0) & (box_h >= 1) & (box_w >= 1))
    assert np.all((top + box_h <= height) & (left + box_w <= width))
    ours_stats = box_statistics(ours, width, height)
    their_stats = box_statistics(theirs, width, height)
    for name in ours_stats:
        # 0.045 is the two-sample KS bound for p = 0.001 at n = m = 4000.
        assert ks_statistic(ours_stats[name], their_stats[name]) < 0.045, name


def test_crop_box_statistic_tells_global_from_local_boxes():
    sizes = torch.tensor([[500, 375]]).repeat(4000, 1)
    global_area = box_statistics(ga.sample_crop_boxes(sizes, GLOBAL_SCALE).numpy(), 500, 375)
    local_area = box_statistics(ga.sample_crop_boxes(sizes, LOCAL_SCALE).numpy(), 500, 375)
    assert ks_statistic(global_area["area"], local_area["area"]) > 0.9


def test_crop_boxes_take_the_central_fallback_per_row():
    # 1000x100 and 100x1000 cannot hold 40% of their area at aspect 3/4..4/3: central crop.
    sizes = torch.tensor([[1000, 100], [100, 1000], [200, 150]]).repeat(50, 1)
    boxes = ga.sample_crop_boxes(sizes, GLOBAL_SCALE, torch.Generator().manual_seed(0))
    for (width, height), box in zip(sizes.tolist(), boxes.tolist()):
        expected = transforms.RandomResizedCrop.get_params(
            torch.empty(1, height, width), list(GLOBAL_SCALE), [3 / 4, 4 / 3])
        if width == 200:
            assert box[2] <= 150 and box[3] <= 200 and box[2] * box[3] >= 0.4 * 200 * 150 - 300
        else:
            assert box == list(expected)
    assert boxes[0].tolist() == [0, 433, 100, 133] and boxes[1].tolist() == [433, 0, 133, 100]


@pytest.fixture(scope="module")
def sampled():
    """Parameters for 20000 images (2 global + 4 local crops each)."""
    augmenter = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 4, 48, 24)
    sizes = torch.tensor([[500, 375]]).repeat(20000, 1)
    global_params, local_params = augmenter.sample_params(sizes, torch.Generator().manual_seed(0))
    first, second = (ga.CropParams(**{name: value[rows]
                                      for name, value in vars(global_params).items()})
                     for rows in (slice(0, 20000), slice(20000, 40000)))
    return {"global1": first, "global2": second, "local": local_params}


def pil_settings(pil_path, kind: str) -> dict:
    """The PIL path's own probabilities and ranges for one crop kind."""
    transform = {"global1": pil_path.global_transfo1, "global2": pil_path.global_transfo2,
                 "local": pil_path.local_transfo}[kind]
    jitter = only_step(transform, transforms.ColorJitter)
    apply_jitter = [step for step in leaf_steps(transform)
                    if isinstance(step, transforms.RandomApply) and jitter in step.transforms]
    blur = only_step(transform, utils.GaussianBlur)
    solarize = [step for step in leaf_steps(transform) if isinstance(step, utils.Solarization)]
    return {
        "flip": only_step(transform, transforms.RandomHorizontalFlip).p,
        "jitter": apply_jitter[0].p,
        "factor_ranges": [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue],
        "grayscale": only_step(transform, transforms.RandomGrayscale).p,
        "blur": blur.prob, "sigma_range": (blur.radius_min, blur.radius_max),
        "solarize": solarize[0].p if solarize else 0.0,
    }


@pytest.mark.parametrize("kind", ["global1", "global2", "local"])
def test_probabilities_match_the_pil_path(sampled, pil_path, kind):
    params, expected = sampled[kind], pil_settings(pil_path, kind)
    assert expected["blur"] == {"global1": 1.0, "global2": 0.1, "local": 0.5}[kind]
    assert expected["solarize"] == {"global1": 0.0, "global2": 0.2, "local": 0.0}[kind]
    for name in ("flip", "jitter", "grayscale", "blur", "solarize"):
        rate = getattr(params, name).float().mean().item()
        assert abs(rate - expected[name]) < 0.015, (name, rate, expected[name])
    if expected["solarize"] == 0.0:
        assert not params.solarize.any()
    if expected["blur"] == 1.0:
        assert params.blur.all()


@pytest.mark.parametrize("kind", ["global1", "local"])
def test_jitter_factors_and_blur_sigma_are_uniform_on_the_pil_ranges(sampled, pil_path, kind):
    params, expected = sampled[kind], pil_settings(pil_path, kind)
    columns = list(params.jitter_factors.T.numpy()) + [params.blur_sigma.numpy()]
    ranges = [tuple(r) for r in expected["factor_ranges"]] + [expected["sigma_range"]]
    assert ranges[:3] == [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2)]
    for values, (low, high) in zip(columns, ranges):
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
        # 1.95 / sqrt(n): the one-sample KS bound for p = 0.001.
        assert ks_uniform(values, low, high) < 1.95 / math.sqrt(len(values))


def test_jitter_order_is_a_uniform_random_permutation(sampled):
    order = sampled["local"].jitter_order
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand_as(order))
    for step in range(4):
        counts = torch.bincount(order[:, step], minlength=4).float() / len(order)
        assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.01)
    # All 24 orders occur about equally often.
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    frequencies = torch.unique(codes, return_counts=True)[1].float() / len(order)
    assert len(frequencies) == 24 and torch.allclose(frequencies, torch.full((24,), 1 / 24),
                                                     atol=0.006)


def test_augmented_crops_have_the_pil_path_pixel_statistics(chelsea, pil_path):
    """Per-crop mean, contrast and grey fraction over 400 images of both pipelines."""
    n = 400
    random.seed(0)
    torch.manual_seed(0)
    reference = [pil_path(chelsea) for _ in range(n)]
    canvas, size = ga.CanvasTransform(128)(chelsea)
    augmenter = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 4, 48, 24, seed=0)
    ours = [augmenter(canvas[None].repeat(100, 1, 1, 1), size[None].repeat(100, 1))
            for _ in range(n // 100)]
    mean = torch.tensor(utils.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(utils.IMAGENET_STD).view(3, 1, 1)
    for crop_index in (0, 1, 2):
        theirs = torch.stack([crops[crop_index] for crops in reference]) * std + mean
        mine = torch.cat([crops[crop_index] for crops in ours]) * std + mean
        for statistic in (lambda x: x.mean(dim=(1, 2, 3)), lambda x: x.std(dim=(1, 2, 3))):
            # 0.14 is the two-sample KS bound for p = 0.001 at n = m = 400.
            assert ks_statistic(statistic(mine).numpy(), statistic(theirs).numpy()) < 0.14
        grey_rate = [((x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) < 1e-3).float().mean().item()
                     for x in (mine, theirs)]
        assert abs(grey_rate[0] - 0.2) < 0.07 and abs(grey_rate[1] - 0.2) < 0.07


# ------------------------------------------------------------------------------------------------
# Ops against PIL / torchvision on real photos
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("box", [(100, 150, 200, 180), (0, 0, 512, 512), (50, 60, 400, 300)])
@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_matches_torchvision_bicubic_on_pil(astronaut, box, flip):
    image = as_float(astronaut)  # a canvas of the image's own size: no canvas resampling
    ours = ga.resized_crops(image, torch.tensor([box], dtype=torch.float32),
                            torch.tensor([flip]), 224)
    reference = TF.resized_crop(astronaut, *box, [224, 224], BICUBIC)
    reference = as_float(TF.hflip(reference) if flip else reference)
    # Up- and downscaling (antialiased) alike, up to PIL's rounding to uint8.
    error = grey_levels(ours, reference)
    assert error.mean() < 0.35 and error.max() < 3


def test_resized_crop_clips_overshoot_like_pil():
    board = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = Image.fromarray(np.stack([board] * 3, axis=-1))
    ours = ga.resized_crops(as_float(image), torch.tensor([[1.0, 1.0, 6.0, 6.0]]),
                            torch.tensor([False]), 48)
    reference = as_float(TF.resized_crop(image, 1, 1, 6, 6, [48, 48], BICUBIC))
    assert grey_levels(ours, reference).max() < 1.5


def test_resized_crops_rows_are_crop_major(astronaut, chelsea):
    """Two images, two crops each: row c * batch + b is crop c of image b."""
    images = [astronaut, chelsea.resize((512, 512))]
    boxes = [(10, 20, 300, 250), (200, 100, 120, 160), (0, 0, 512, 512), (300, 300, 200, 100)]
    flips = [False, True, True, False]
    crops = ga.resized_crops(torch.cat([as_float(image) for image in images]),
                             torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips), 64)
    for row, (box, flip) in enumerate(zip(boxes, flips)):
        reference = TF.resized_crop(images[row % 2], *box, [64, 64], BICUBIC)
        reference = as_float(TF.hflip(reference) if flip else reference)
        assert grey_levels(crops[row:row + 1], reference).max() < 1.5


def test_canvas_crops_read_the_box_of_the_original_image(chelsea):
    """A box in original pixels, read from the canvas of a 451x300 photo (shrunk at 256)."""
    box = (40, 60, 200, 180)
    reference = as_float(TF.resized_crop(chelsea, *box, [96, 96], BICUBIC))
    errors = {}
    for canvas_size in (256, 512):
        canvas, size = ga.CanvasTransform(canvas_size)(chelsea)
        augmenter = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 0, 96, 96)
        params = [identity_params(2, box)]
        crop = augmenter.apply(canvas[None], size[None], params)[0]
        crop = crop * torch.tensor(utils.IMAGENET_STD).view(3, 1, 1) + torch.tensor(
            utils.IMAGENET_MEAN).view(3, 1, 1)
        errors[canvas_size] = grey_levels(crop, reference).mean()
    # Shrunk to 256 x 170 the photo loses detail; at 512 the canvas holds its own pixels.
    assert errors[256] < 1.5 and errors[512] < 0.35
    # The same box read from a canvas that stretches the image reads a different region.
    wrong = ga.resized_crops(as_float(chelsea.resize((256, 256))),
                             torch.tensor([box], dtype=torch.float32), torch.tensor([False]), 96)
    assert grey_levels(wrong, reference).mean() > 10


def test_grayscale_matches_pil_convert_l(astronaut):
    ours = ga.to_grayscale(as_float(astronaut))
    reference = as_float(astronaut.convert("L").convert("RGB"))
    assert grey_levels(ours, reference).max() <= 0.5 + 1e-3


def test_solarize_matches_pil_solarize(astronaut):
    ours = ga.solarize(as_float(astronaut))
    assert grey_levels(ours, as_float(ImageOps.solarize(astronaut))).max() < 1e-3
    ramp = torch.arange(256.0).view(1, 1, 1, 256).expand(1, 3, 1, 256) / 255
    levels = torch.arange(256.0)
    expected = torch.where(levels >= 128, 255 - levels, levels)
    assert torch.allclose(ga.solarize(ramp)[0, 0, 0] * 255, expected, atol=1e-3)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_blur_matches_pil_gaussian_blur(astronaut, sigma):
    ours = ga.gaussian_blur(as_float(astronaut), torch.tensor([sigma]), radius=6)
    error = grey_levels(ours, as_float(astronaut.filter(ImageFilter.GaussianBlur(sigma))))
    assert error.mean() < 0.7 and error.quantile(0.99) < 2.5
    # Blur strength matters: the sharpest and the widest kernels differ from each other.
    if sigma == 2.0:
        sharp = ga.gaussian_blur(as_float(astronaut), torch.tensor([0.5]), radius=6)
        assert grey_levels(sharp, ours).mean() > 3


def test_blur_uses_each_rows_own_sigma(astronaut):
    image = as_float(astronaut.resize((128, 128)))
    both = ga.gaussian_blur(image.repeat(2, 1, 1, 1), torch.tensor([0.5, 2.0]), radius=6)
    for row, sigma in enumerate((0.5, 2.0)):
        alone = ga.gaussian_blur(image, torch.tensor([sigma]), radius=6)
        assert torch.allclose(both[row:row + 1], alone, atol=1e-6)


@pytest.mark.parametrize("op_id,factor", [(0, 1.3), (0, 0.6), (1, 1.4), (1, 0.6), (2, 1.2),
                                          (2, 0.8), (3, 0.1), (3, -0.07)])
def test_jitter_ops_match_torchvision(astronaut, op_id, factor):
    torchvision_op = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                      TF.adjust_hue)[op_id]
    image = as_float(astronaut)
    ours = ga.JITTER_OPS[op_id](image.clone(), torch.tensor([factor]))
    # On float tensors torchvision's formulas are the same up to its 0.2989 red weight.
    assert grey_levels(ours, torchvision_op(image, factor)).max() < 0.1
    # On PIL images every step rounds to uint8, and hue goes through 8-bit HSV.
    error = grey_levels(ours, as_float(torchvision_op(astronaut, factor)))
    assert error.mean() < 0.6 and error.quantile(0.99) < (6 if op_id == 3 else 1.5)


def test_jitter_runs_each_rows_ops_in_its_own_order(astronaut):
    image = as_float(astronaut.resize((64, 64)))
    factors = torch.tensor([1.4, 0.6, 1.2, 0.1])
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
    applied = torch.tensor([True, True, True, False])
    rows = ga.color_jitter(image.repeat(4, 1, 1, 1), applied, factors.repeat(4, 1),
                           torch.cat((orders, orders[:1])))
    torchvision_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                       TF.adjust_hue)
    for row, order in enumerate(orders.tolist()):
        expected = image
        for op_id in order:
            expected = torchvision_ops[op_id](expected, factors[op_id].item())
        assert (rows[row:row + 1] - expected).abs().max() < 1e-3
    assert not torch.allclose(rows[0], rows[1], atol=1e-2)
    assert torch.equal(rows[3:], image)


def test_whole_recipe_matches_pil_steps_in_order(astronaut):
    """Crop + flip, jitter, grayscale, blur, solarize, normalise vs the PIL steps for one row."""
    box, factors, order = (60, 90, 300, 280), [1.2, 0.7, 1.1, 0.05], [3, 1, 0, 2]
    params = identity_params(
        2, box, flip=torch.tensor([True, False]), jitter=torch.tensor([True, False]),
        jitter_factors=torch.tensor([factors, factors]),
        jitter_order=torch.tensor([order, order]), blur=torch.tensor([True, False]),
        blur_sigma=torch.tensor([1.5, 1.5]), solarize=torch.tensor([True, False]),
        grayscale=torch.tensor([False, True]))
    augmenter = ga.MultiCropAugmenter(GLOBAL_SCALE, LOCAL_SCALE, 0, 96, 96)
    canvas, size = ga.CanvasTransform(512)(astronaut)
    first, second = augmenter.apply(canvas[None], size[None], [params])
    pil_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = TF.hflip(TF.resized_crop(astronaut, *box, [96, 96], BICUBIC))
    for op_id in order:
        expected = pil_ops[op_id](expected, factors[op_id])
    expected = ImageOps.solarize(expected.filter(ImageFilter.GaussianBlur(1.5)))
    expected_gray = TF.resized_crop(astronaut, *box, [96, 96], BICUBIC).convert("L").convert("RGB")
    normalize = transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)
    for ours, reference in ((first, expected), (second, expected_gray)):
        reference = normalize(TF.to_tensor(reference))[None]
        error = (ours - reference).abs() * 0.225 * 255  # about grey levels
        # PIL rounds to uint8 after every step (and hue to 8-bit HSV): errors add up.
        assert error.mean() < 2.5 and error.flatten().quantile(0.99) < 8


@pytest.mark.slow
def test_speed_benchmark_script_writes_its_table_and_json(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.augment_speed", "--device", "cpu", "--batch_size", "2",
         "--canvas_size", "64", "--global_crops_size", "32", "--local_crops_size", "16",
         "--local_crops_number", "2", "--pil_images", "2", "--batches", "1",
         "--output", str(output)],
        cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PIL worker: decode + augment" in result.stdout
    results = json.loads(output.read_text())
    assert results["crops"] == "2x32+2x16" and results["batch_size"] == 2
    assert results["augmenter_crops_per_s"] == pytest.approx(
        4 * results["augmenter_images_per_s"])
    assert all(results[key] > 0 for key in (
        "decode_s", "pil_augment_s", "canvas_s", "pil_worker_images_per_s",
        "canvas_worker_images_per_s", "augmenter_batch_s"))
