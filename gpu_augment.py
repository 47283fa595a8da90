"""DINO multi-crop augmentation in batches on the training device (the optional GPU path).

Workers only decode each image and resize it to a fixed square uint8 "canvas" (so batches
stack), keeping the original width and height. `MultiCropAugmenter` then draws, per sample and
per crop, the same random parameters as main_dino.DataAugmentationDINO (crop boxes in original
pixels, mapped onto the stretched canvas, which undoes the aspect distortion) and applies
crop + flip, colour jitter, grayscale, blur, solarization and normalisation to whole batches.
"""
import argparse
import math
from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import utils

ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's default
CROP_ATTEMPTS = 10
# ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) as factor ranges, in
# torchvision's op order (ids 0..3: brightness, contrast, saturation, hue).
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
JITTER_P = 0.8
GRAYSCALE_P = 0.2
FLIP_P = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
# ITU-R 601-2 luma, as PIL's convert("L").
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# PIL inverts uint8 values >= 128; our values are not rounded to uint8 yet, and
# round(255 * x) >= 128 exactly when x >= 0.5.
SOLARIZE_THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------

class CanvasTransform:
    """PIL RGB image -> (uint8 3xSxS canvas of the whole image, int64 [width, height])."""

    def __init__(self, canvas_size: int = 256):
        if canvas_size < 1:
            raise utils.InputError(f"--canvas_size must be a positive number of pixels, "
                                   f"got {canvas_size}")
        self.canvas_size = canvas_size

    def __call__(self, image: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        width, height = image.size
        canvas = image.resize((self.canvas_size, self.canvas_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(canvas, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return pixels, torch.tensor([width, height], dtype=torch.int64)


def add_gpu_augment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu_augment", type=utils.bool_flag, default=False,
                        help="Workers only decode and resize images to a uint8 canvas; the "
                             "multi-crop augmentation runs in batches on the training device, "
                             "with the same parameter distributions as the PIL path.")
    parser.add_argument("--canvas_size", type=int, default=256,
                        help="Side of the square canvas each image is resized to in the workers "
                             "with --gpu_augment (crops are resampled from it).")


def build_canvas_loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """The pretraining loader of the GPU path: batches of ((canvases, sizes), skipped counts)."""
    dataset = utils.ImageFiles(args.data_path, CanvasTransform(args.canvas_size))
    return utils.build_pretraining_loader(dataset, args)


def build_augmenter(args: argparse.Namespace, device: torch.device) -> "MultiCropAugmenter":
    """The augmenter for main_dino's crop flags, with a random stream of its own per rank."""
    augmenter = MultiCropAugmenter(args.global_crops_scale, args.local_crops_scale,
                                   args.local_crops_number, args.global_crops_size,
                                   args.local_crops_size, seed=args.seed, rank=utils.get_rank())
    return augmenter.to(device)


def stream_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The seed of the random stream of one batch: a well-mixed function of (seed, rank, epoch,
    batch index in the epoch)."""
    return utils.mixed_seed(seed, rank, epoch, batch)


# ------------------------------------------------------------------------------------------------
# Random parameters
# ------------------------------------------------------------------------------------------------

@dataclass
class CropKind:
    """One DataAugmentationDINO view type: `count` crops per image of one size and recipe."""
    size: int
    scale: Tuple[float, float]
    count: int
    blur_p: float
    solarize_p: float


@dataclass
class CropParams:
    """Random parameters of a batch of crops, one row per crop.

    Rows are crop-major: crop c of image b is row c * batch + b.
    """
    boxes: torch.Tensor           # (N, 4) top, left, height, width in original-image pixels
    flip: torch.Tensor            # (N,) bool
    jitter: torch.Tensor          # (N,) bool, colour jitter applied
    jitter_factors: torch.Tensor  # (N, 4) brightness, contrast, saturation, hue
    jitter_order: torch.Tensor    # (N, 4) a permutation of the op ids 0..3
    grayscale: torch.Tensor       # (N,) bool
    blur: torch.Tensor            # (N,) bool
    blur_sigma: torch.Tensor      # (N,)
    solarize: torch.Tensor        # (N,) bool

    @classmethod
    def cat(cls, parts: Sequence["CropParams"]) -> "CropParams":
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def uniform(shape: Tuple[int, ...], low: float, high: float, device: torch.device,
            generator: Optional[torch.Generator]) -> torch.Tensor:
    """U(low, high) as torchvision draws it: low + (high - low) * U(0, 1), in float32."""
    return low + (high - low) * torch.rand(shape, device=device, generator=generator)


def random_below(upper: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A uniform integer in [0, upper) per element (torch.randint with a per-element bound)."""
    draw = torch.rand(upper.shape, device=upper.device, generator=generator)
    return torch.minimum(torch.floor(draw * upper), upper - 1)


def sample_crop_boxes(sizes: torch.Tensor, scale: Sequence[float],
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RandomResizedCrop.get_params for a batch: (N, 4) top, left, height, width.

    sizes holds the original (width, height) per row. Up to 10 attempts per row, the first
    that fits wins; rows where none fits take torchvision's central fallback crop.
    """
    width, height = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    shape, device = (len(sizes), CROP_ATTEMPTS), sizes.device
    target_area = width * height * uniform(shape, scale[0], scale[1], device, generator)
    log_low, log_high = (math.log(r) for r in ASPECT_RATIO_RANGE)
    aspect = torch.exp(uniform(shape, log_low, log_high, device, generator))
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first_fit = fits.int().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    crop_w = crop_w.gather(1, first_fit).squeeze(1)
    crop_h = crop_h.gather(1, first_fit).squeeze(1)
    width, height = width.squeeze(1), height.squeeze(1)

    in_ratio = width / height
    low_ratio, high_ratio = ASPECT_RATIO_RANGE
    fallback_w = torch.where(in_ratio > high_ratio, torch.round(height * high_ratio), width)
    fallback_h = torch.where(in_ratio < low_ratio, torch.round(width / low_ratio), height)
    crop_w = torch.where(found, crop_w, fallback_w)
    crop_h = torch.where(found, crop_h, fallback_h)
    top = torch.where(found, random_below(height - crop_h + 1, generator),
                      torch.floor((height - crop_h) / 2))
    left = torch.where(found, random_below(width - crop_w + 1, generator),
                       torch.floor((width - crop_w) / 2))
    return torch.stack((top, left, crop_h, crop_w), dim=1)


def sample_crop_params(sizes: torch.Tensor, kind: CropKind,
                       generator: Optional[torch.Generator] = None) -> CropParams:
    """Parameters for kind.count crops of every image (rows crop-major)."""
    sizes = sizes.repeat(kind.count, 1)
    n, device = len(sizes), sizes.device

    def happens(p: float) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) < p

    boxes = sample_crop_boxes(sizes, kind.scale, generator)
    factors = torch.stack([uniform((n,), low, high, device, generator)
                           for low, high in JITTER_RANGES], dim=1)
    order = torch.rand((n, 4), device=device, generator=generator).argsort(dim=1)
    return CropParams(
        boxes=boxes, flip=happens(FLIP_P), jitter=happens(JITTER_P), jitter_factors=factors,
        jitter_order=order, grayscale=happens(GRAYSCALE_P), blur=happens(kind.blur_p),
        blur_sigma=uniform((n,), *BLUR_SIGMA_RANGE, device, generator),
        solarize=happens(kind.solarize_p))


# ------------------------------------------------------------------------------------------------
# Batched ops on float images in [0, 1], shape (N, 3, H, W)
# ------------------------------------------------------------------------------------------------

def per_row(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def cubic(distance: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), support 2."""
    a, x = -0.5, distance.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def resampling_weights(start: torch.Tensor, length: torch.Tensor, in_size: int,
                       out_size: int) -> torch.Tensor:
    """(N, out, in) matrices resizing the span [start, start + length) of each row to out.

    PIL's antialiased resampling: the kernel widens by the downscale factor, reads only
    pixels inside the span (as a crop would) and each output's weights sum to 1.
    """
    scale = length / out_size
    widening = scale.clamp_min(1.0)[:, None, None]
    out_pixels = torch.arange(out_size, device=start.device, dtype=torch.float32)
    centres = start[:, None] + (out_pixels + 0.5) * scale[:, None]
    in_centres = torch.arange(in_size, device=start.device, dtype=torch.float32) + 0.5
    weights = cubic((in_centres - centres[:, :, None]) / widening)
    first, end = start.floor()[:, None], (start + length).ceil()[:, None]
    weights = weights * ((in_centres >= first) & (in_centres < end))[:, None, :]
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor,
                  out_size: int) -> torch.Tensor:
    """Bicubic crops (count * B, 3, out, out) of B images, clipped to [0, 1].

    boxes (count * B, 4) are top, left, height, width in image pixels, rows crop-major.
    Each crop is weights_y @ image @ weights_x^T, batched as two matrix products; like PIL,
    the horizontal pass comes first and is clipped before the vertical one.
    """
    batch, channels, height, width = images.shape
    count = len(boxes) // batch
    top, left, box_h, box_w = boxes.unbind(1)
    weights_x = resampling_weights(left, box_w, width, out_size)
    weights_x = torch.where(flip[:, None, None], weights_x.flip(1), weights_x)
    weights_y = resampling_weights(top, box_h, height, out_size)
    # The count crops of an image share the horizontal product: their weights are stacked.
    weights_x = weights_x.view(count, batch, out_size, width).permute(1, 3, 0, 2).reshape(
        batch, width, count * out_size)
    columns = (images.reshape(batch, channels * height, width) @ weights_x).clamp_(0, 1)
    columns = columns.view(batch, channels, height, count, out_size).permute(0, 3, 2, 1, 4)
    columns = columns.reshape(batch, count, height, channels * out_size)
    weights_y = weights_y.view(count, batch, out_size, height).transpose(0, 1)
    crops = (weights_y @ columns).view(batch, count, out_size, channels, out_size)
    crops = crops.permute(1, 0, 3, 2, 4).reshape(count * batch, channels, out_size, out_size)
    return crops.clamp_(0, 1)


def canvas_boxes(boxes: torch.Tensor, sizes: torch.Tensor, canvas_height: int,
                 canvas_width: int) -> torch.Tensor:
    """Boxes in original pixels -> the same boxes on the canvas that stretches the image."""
    scale_x = canvas_width / sizes[:, 0].float()
    scale_y = canvas_height / sizes[:, 1].float()
    return boxes * torch.stack((scale_y, scale_x, scale_y, scale_x), dim=1)


def luma(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * degenerate, clipped, with one factor per row."""
    factor = per_row(factor)
    return (factor * images + (1 - factor) * degenerate).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * per_row(factor)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, luma(images).mean(dim=(2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, luma(images), factor)


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns per row, keeping saturation and value."""
    red, green, blue = images.unbind(1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    # Grey pixels (chroma 0) get hue 0; their output is V whatever the hue.
    safe_chroma = chroma.clamp_min(1e-12)
    # Hue in sixths of a turn.
    hue = torch.where(value == red, (green - blue) / safe_chroma,
                      torch.where(value == green, (blue - red) / safe_chroma + 2,
                                  (red - green) / safe_chroma + 4))
    hue = (hue + 6 * shift.view(-1, 1, 1)).remainder_(6)
    # HSV -> RGB: channel = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + hue) mod 6,
    # with n = 5, 3, 1 for red, green, blue.
    offsets = images.new_tensor((5.0, 3.0, 1.0)).view(1, 3, 1, 1)
    k = (offsets + hue.unsqueeze(1)).remainder_(6)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


# In torchvision's ColorJitter op-id order.
JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, shift_hue)


def blur_matrices(sigma: torch.Tensor, size: int, radius: int) -> torch.Tensor:
    """(N, size, size) matrices applying each row's Gaussian along an axis, edges replicated."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device)
    kernels = torch.exp(-taps.float() ** 2 / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    positions = torch.arange(size, device=sigma.device)
    # Taps falling outside the image read the edge pixel, as PIL's blur does.
    sources = (positions[:, None] + taps).clamp(0, size - 1)
    n = len(sigma)
    matrices = torch.zeros(n, size, size, device=sigma.device)
    return matrices.scatter_add_(2, sources.expand(n, -1, -1),
                                 kernels[:, None, :].expand(n, size, -1))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-row sigma, as two batched matrix products.

    Matrices rather than per-row convolutions: no per-shape kernel selection (e.g.
    cudnn.benchmark) as the number of blurred rows changes from batch to batch.
    """
    height, width = images.shape[2:]
    along_y = blur_matrices(sigma, height, radius)[:, None]
    along_x = blur_matrices(sigma, width, radius).transpose(1, 2)[:, None]
    return along_y @ images @ along_x


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    return luma(images).expand_as(images)


def solarize(images: torch.Tensor) -> torch.Tensor:
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


def update_rows(images: torch.Tensor, rows: torch.Tensor, op: Callable[..., torch.Tensor],
                *row_values: torch.Tensor) -> None:
    """images[rows] = op(images[rows], *row_values[rows]) in place, for a boolean CPU mask.

    The mask lives on the host, so choosing the rows never waits for the device.
    """
    index = rows.nonzero().squeeze(1)
    if len(index) == 0:
        return
    values = [v[index].to(images.device, non_blocking=True) for v in row_values]
    index = index.to(images.device, non_blocking=True)
    images.index_copy_(0, index, op(images.index_select(0, index), *values))


def color_jitter(images: torch.Tensor, applied: torch.Tensor, factors: torch.Tensor,
                 order: torch.Tensor) -> None:
    """ColorJitter in place, each `applied` row running its four ops in its own order."""
    for step in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            update_rows(images, applied & (order[:, step] == op_id), op, factors[:, op_id])


# ------------------------------------------------------------------------------------------------
# The augmenter
# ------------------------------------------------------------------------------------------------

def checked_scale(scale: Sequence[float], flag: str) -> Tuple[float, float]:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise utils.InputError(f"{flag} needs two numbers 0 < min <= max, got {list(scale)}")
    return float(scale[0]), float(scale[1])


class MultiCropAugmenter(nn.Module):
    """Canvas batch -> DataAugmentationDINO's crops [global1, global2, local_1..n], normalised.

    Random parameters are drawn on the CPU (from a generator of its own when seeded, restarted
    for every batch from (seed, rank, epoch, batch index), so that an epoch resumed at any
    batch draws what the uninterrupted one drew), so the rows each op touches are known without
    waiting for the device; pixels stay on the module's device.
    """

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224,
                 local_crops_size: int = 96, seed: Optional[int] = None, rank: int = 0):
        super().__init__()
        global_scale = checked_scale(global_crops_scale, "--global_crops_scale")
        local_scale = checked_scale(local_crops_scale, "--local_crops_scale")
        global1 = CropKind(global_crops_size, global_scale, count=1, blur_p=1.0, solarize_p=0.0)
        global2 = CropKind(global_crops_size, global_scale, count=1, blur_p=0.1, solarize_p=0.2)
        local = CropKind(local_crops_size, local_scale, count=local_crops_number, blur_p=0.5,
                         solarize_p=0.0)
        # Crops of one size are resampled and processed as one batch.
        self.groups = [[global1, global2]] + ([[local]] if local_crops_number > 0 else [])
        self.blur_radius = math.ceil(3 * BLUR_SIGMA_RANGE[1])
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator() if seed is not None else None
        self.set_epoch(0)
        mean, std = (torch.tensor(values).view(1, 3, 1, 1)
                     for values in (utils.IMAGENET_MEAN, utils.IMAGENET_STD))
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """The next batch is batch `first_batch` of `epoch` (unseeded: the global RNG goes on)."""
        self.epoch, self.batch = epoch, first_batch
        self.restart_stream()

    def restart_stream(self) -> None:
        if self.generator is not None:
            self.generator.manual_seed(stream_seed(self.seed, self.rank, self.epoch, self.batch))

    def sample_params(self, sizes: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> List[CropParams]:
        """One CropParams per size group (the global crops, then the local crops), on the CPU."""
        sizes = sizes.cpu()
        return [CropParams.cat([sample_crop_params(sizes, kind, generator) for kind in group])
                for group in self.groups]

    def apply(self, canvases: torch.Tensor, sizes: torch.Tensor,
              params: Sequence[CropParams]) -> List[torch.Tensor]:
        """The crops of canvases (on the module's device) for given CPU parameters."""
        device = self.mean.device
        images = canvases.to(device, non_blocking=True).float().div_(255)
        crops = []
        for group, group_params in zip(self.groups, params):
            count = sum(kind.count for kind in group)
            crops.extend(self.normalize(self.render(images, sizes, group_params, count,
                                                    group[0].size)).chunk(count))
        return crops

    def render(self, images: torch.Tensor, sizes: torch.Tensor, params: CropParams, count: int,
               size: int) -> torch.Tensor:
        """count crops per image, augmented, in [0, 1]: (count * B, 3, size, size)."""
        device = images.device
        boxes = canvas_boxes(params.boxes, sizes.repeat(count, 1), *images.shape[2:])
        views = resized_crops(images, boxes.to(device, non_blocking=True),
                              params.flip.to(device, non_blocking=True), size)
        color_jitter(views, params.jitter, params.jitter_factors, params.jitter_order)
        update_rows(views, params.grayscale, to_grayscale)
        update_rows(views, params.blur, lambda rows, sigma: gaussian_blur(
            rows, sigma, self.blur_radius), params.blur_sigma)
        update_rows(views, params.solarize, solarize)
        return views

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        return views.sub_(self.mean).div_(self.std)

    @torch.no_grad()
    def forward(self, canvases: torch.Tensor, sizes: torch.Tensor) -> List[torch.Tensor]:
        """uint8 canvases (B, 3, H, W) on any device; original (width, height) rows (B, 2)."""
        sizes = sizes.cpu()
        self.restart_stream()
        self.batch += 1
        return self.apply(canvases, sizes, self.sample_params(sizes, self.generator))
