"""DINO multi-crop augmentation in batches on the training device (the optional GPU path).

Workers only decode each image and place it on a fixed square uint8 "canvas" (so batches stack):
at its own size in the top-left corner, shrunk (aspect kept) only when it does not fit, with its
original width and height. With --gpu_decode they do not even decode: they read the files'
bytes, and JPEGs are decoded on the training device. `MultiCropAugmenter` then draws, on the
device and in one call, per sample and per crop the same random parameters as
main_dino.DataAugmentationDINO (crop boxes in original pixels, mapped onto the canvas) and
applies crop + flip, colour jitter, grayscale, blur, solarization and normalisation to whole
batches with static shapes and no host sync (so the pixel work can be compiled into few kernels).
"""
import argparse
import io
import math
import warnings
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
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
# Uniform draws per crop, in columns: area and log-aspect of each crop attempt, top, left
# (BOX_DRAWS in all), then flip, jitter, 4 jitter factors, 4 op-order keys, grayscale, blur,
# blur sigma, solarize.
BOX_DRAWS = 2 * CROP_ATTEMPTS + 2
DRAWS_PER_CROP = BOX_DRAWS + 14
JPEG_START = [0xFF, 0xD8]


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------

def fitted_size(width: int, height: int, canvas_size: int) -> Tuple[int, int]:
    """An image's (width, height) on the canvas: its own, or shrunk to fit (aspect kept)."""
    scale = min(1.0, canvas_size / width, canvas_size / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class CanvasTransform:
    """PIL RGB image -> (uint8 3xSxS canvas with the image at its top-left, int64 geometry
    [width, height, width on the canvas, height on the canvas])."""

    def __init__(self, canvas_size: int = 512):
        if canvas_size < 1:
            raise utils.InputError(f"--canvas_size must be a positive number of pixels, "
                                   f"got {canvas_size}")
        self.canvas_size = canvas_size

    def __call__(self, image: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        width, height = image.size
        fit_width, fit_height = fitted_size(width, height, self.canvas_size)
        if (fit_width, fit_height) != (width, height):
            image = image.resize((fit_width, fit_height), Image.Resampling.BICUBIC)
        canvas = torch.zeros(3, self.canvas_size, self.canvas_size, dtype=torch.uint8)
        canvas[:, :fit_height, :fit_width] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return canvas, torch.tensor([width, height, fit_width, fit_height], dtype=torch.int64)


def read_image_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, once PIL has read its header (so that non-images are
    skipped in the worker, as on the PIL path)."""
    Image.open(path).close()  # parses the header: raises on files that are no image
    with open(path, "rb") as file:
        return torch.frombuffer(bytearray(file.read()), dtype=torch.uint8)


def collate_encoded(batch: Sequence[Tuple[torch.Tensor, int]]
                    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """(list of the files' bytes, skipped counts): encoded files differ in length."""
    return [data for data, _ in batch], torch.tensor([skipped for _, skipped in batch])


def add_gpu_augment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu_augment", type=utils.bool_flag, default=False,
                        help="Workers only decode images onto a uint8 canvas; the multi-crop "
                             "augmentation runs in batches on the training device, with the same "
                             "parameter distributions as the PIL path.")
    parser.add_argument("--canvas_size", type=int, default=512,
                        help="Side of the square canvas of --gpu_augment: images larger than it "
                             "are shrunk to fit (crops are resampled from it), smaller ones keep "
                             "their pixels.")
    parser.add_argument("--gpu_decode", type=utils.bool_flag, default=False,
                        help="With --gpu_augment: workers only read the files; JPEGs are decoded "
                             "on the training device (torchvision's nvJPEG decoder on CUDA), "
                             "other formats by PIL in the main process.")


def build_canvas_loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """The pretraining loader of the GPU path: batches of (canvases, geometry) or, with
    --gpu_decode, of the files' bytes; then the skipped counts."""
    if args.gpu_decode:
        dataset = utils.ImageFiles(args.data_path, None, loader=read_image_bytes)
        return utils.build_pretraining_loader(dataset, args, collate_fn=collate_encoded)
    dataset = utils.ImageFiles(args.data_path, CanvasTransform(args.canvas_size))
    return utils.build_pretraining_loader(dataset, args)


def build_augmenter(args: argparse.Namespace, device: torch.device) -> "MultiCropAugmenter":
    """The augmenter for main_dino's crop flags, with a random stream of its own per rank;
    its pixel work is compiled with --compile on CUDA."""
    return MultiCropAugmenter(args.global_crops_scale, args.local_crops_scale,
                              args.local_crops_number, args.global_crops_size,
                              args.local_crops_size, seed=args.seed, rank=utils.get_rank(),
                              compile_pixels=bool(args.compile) and device.type == "cuda",
                              device=device)


def stream_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The seed of the random stream of one batch: a well-mixed function of (seed, rank, epoch,
    batch index in the epoch)."""
    return utils.mixed_seed(seed, rank, epoch, batch)


# ------------------------------------------------------------------------------------------------
# Decoding on the device (--gpu_decode)
# ------------------------------------------------------------------------------------------------

def decode_with_pil(data: torch.Tensor) -> torch.Tensor:
    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        pixels = np.array(image.convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1)


def decode_jpeg(data: Sequence[torch.Tensor], device: torch.device
                ) -> List[Optional[torch.Tensor]]:
    """RGB images of JPEG files by torchvision on `device` (None for files it cannot read)."""
    try:
        return torchvision.io.decode_jpeg(list(data), mode=torchvision.io.ImageReadMode.RGB,
                                          device=device)
    except RuntimeError:  # one unreadable file fails the call: decode them one by one
        return [None] if len(data) == 1 else [decode_jpeg([one], device)[0] for one in data]


def decode_images(encoded: Sequence[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """uint8 (3, H, W) images on `device`: the JPEGs by torchvision on the device in one call,
    other formats (and JPEGs it rejects) by PIL on the host. An image no decoder reads is
    replaced by another of the batch, with a warning."""
    jpeg_rows = [row for row, data in enumerate(encoded) if data[:2].tolist() == JPEG_START]
    images: List[Optional[torch.Tensor]] = [None] * len(encoded)
    if jpeg_rows:
        for row, image in zip(jpeg_rows, decode_jpeg([encoded[row] for row in jpeg_rows],
                                                     device)):
            images[row] = image
    for row, data in enumerate(encoded):
        if images[row] is None:
            try:
                images[row] = decode_with_pil(data).to(device)
            except (OSError, ValueError) as error:
                warnings.warn(f"an image of the batch could not be decoded ({error}); "
                              "another image of the batch replaces it")
    readable = [image for image in images if image is not None]
    if not readable:
        raise utils.InputError("no image of a batch could be decoded: is the data corrupt?")
    return [image if image is not None else readable[0] for image in images]


def decode_to_canvases(encoded: Sequence[torch.Tensor], canvas_size: int,
                       device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The files' bytes -> (uint8 canvases (B, 3, S, S) on `device`, geometry (B, 4) on the
    host), laid out as CanvasTransform's."""
    images = decode_images(encoded, device)
    canvases = torch.zeros(len(images), 3, canvas_size, canvas_size, dtype=torch.uint8,
                           device=device)
    geometry = []
    for canvas, image in zip(canvases, images):
        height, width = image.shape[1:]
        fit_width, fit_height = fitted_size(width, height, canvas_size)
        if (fit_width, fit_height) != (width, height):
            image = F.interpolate(image[None].float(), size=(fit_height, fit_width),
                                  mode="bicubic", antialias=True)[0].round_().clamp_(0, 255)
        canvas[:, :fit_height, :fit_width] = image
        geometry.append([width, height, fit_width, fit_height])
    geometry = torch.tensor(geometry, dtype=torch.int64)
    return canvases, geometry.pin_memory() if device.type == "cuda" else geometry


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

    def to(self, device: torch.device) -> "CropParams":
        return CropParams(**{f.name: getattr(self, f.name).to(device, non_blocking=True)
                             for f in fields(self)})


def uniform(draws: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """U(low, high) from U(0, 1) draws, as torchvision computes it: low + (high - low) * u."""
    return low + (high - low) * draws


def random_below(upper: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """A uniform integer in [0, upper) per element, from U(0, 1) draws."""
    return torch.minimum(torch.floor(draws * upper), upper - 1)


def sample_crop_boxes(sizes: torch.Tensor, scale: Sequence[float],
                      generator: Optional[torch.Generator] = None,
                      draws: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RandomResizedCrop.get_params for a batch: (N, 4) top, left, height, width.

    sizes holds the original (width, height) per row; draws (N, BOX_DRAWS) uniforms, drawn
    here when not given. Up to 10 attempts per row, the first that fits wins; rows where none
    fits take torchvision's central fallback crop.
    """
    if draws is None:
        draws = torch.rand((len(sizes), BOX_DRAWS), generator=generator, device=sizes.device)
    width, height = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    target_area = width * height * uniform(draws[:, :CROP_ATTEMPTS], *scale)
    log_low, log_high = (math.log(r) for r in ASPECT_RATIO_RANGE)
    aspect = torch.exp(uniform(draws[:, CROP_ATTEMPTS:2 * CROP_ATTEMPTS], log_low, log_high))
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
    top = torch.where(found, random_below(height - crop_h + 1, draws[:, BOX_DRAWS - 2]),
                      torch.floor((height - crop_h) / 2))
    left = torch.where(found, random_below(width - crop_w + 1, draws[:, BOX_DRAWS - 1]),
                       torch.floor((width - crop_w) / 2))
    return torch.stack((top, left, crop_h, crop_w), dim=1)


def sample_crop_params(sizes: torch.Tensor, kind: CropKind, draws: torch.Tensor) -> CropParams:
    """Parameters for kind.count crops of every image (rows crop-major) from (N, DRAWS_PER_CROP)
    uniforms."""
    sizes = sizes.repeat(kind.count, 1)
    columns = draws[:, BOX_DRAWS:].unbind(1)
    factors = torch.stack([uniform(columns[2 + op], low, high)
                           for op, (low, high) in enumerate(JITTER_RANGES)], dim=1)
    return CropParams(
        boxes=sample_crop_boxes(sizes, kind.scale, draws=draws[:, :BOX_DRAWS]),
        flip=columns[0] < FLIP_P, jitter=columns[1] < JITTER_P, jitter_factors=factors,
        jitter_order=draws[:, BOX_DRAWS + 6:BOX_DRAWS + 10].argsort(dim=1),
        grayscale=columns[10] < GRAYSCALE_P, blur=columns[11] < kind.blur_p,
        blur_sigma=uniform(columns[12], *BLUR_SIGMA_RANGE), solarize=columns[13] < kind.solarize_p)


# ------------------------------------------------------------------------------------------------
# Batched ops on float images in [0, 1], shape (N, 3, H, W): every row is computed (static
# shapes, no host sync) and rows an op does not apply to keep their values exactly.
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


def canvas_boxes(boxes: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """Boxes in original pixels -> the same boxes on the canvas (geometry rows: width, height,
    width and height on the canvas)."""
    scale_x = geometry[:, 2].float() / geometry[:, 0].float()
    scale_y = geometry[:, 3].float() / geometry[:, 1].float()
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
HUE = 3


def color_jitter(images: torch.Tensor, applied: torch.Tensor, factors: torch.Tensor,
                 order: torch.Tensor) -> torch.Tensor:
    """ColorJitter, each `applied` row running its four ops in its own order.

    Brightness, contrast and saturation are one blend with a per-row degenerate image (black,
    mean grey, grey); rows not applied blend with factor 1, which leaves them exactly as they
    are. Hue, the one non-linear op, is computed for every row and kept where it is due.
    """
    identity = factors.new_tensor((1.0, 1.0, 1.0, 0.0))
    factors = torch.where(applied[:, None], factors, identity)
    for step in range(4):
        op = order[:, step]
        grey = luma(images)
        degenerate = torch.where(per_row(op == 1), grey.mean(dim=(2, 3), keepdim=True),
                                 torch.where(per_row(op == 2), grey, 0.0))
        factor = torch.where(op == HUE, 1.0, factors.gather(1, op[:, None]).squeeze(1))
        blended = blend(images, degenerate, factor)
        hued = shift_hue(images, factors[:, HUE])
        images = torch.where(per_row((op == HUE) & applied), hued, blended)
    return images


def blur_matrices(sigma: torch.Tensor, blurred: torch.Tensor, size: int,
                  radius: int) -> torch.Tensor:
    """(N, size, size) matrices applying each row's Gaussian along an axis, edges replicated;
    the identity for rows not blurred."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device)
    kernels = torch.exp(-taps.float() ** 2 / (2 * sigma[:, None] ** 2))
    kernels = torch.where(blurred[:, None], kernels / kernels.sum(dim=1, keepdim=True),
                          (taps == 0).float())
    positions = torch.arange(size, device=sigma.device)
    # Taps falling outside the image read the edge pixel, as PIL's blur does.
    sources = (positions[:, None] + taps).clamp(0, size - 1)
    n = len(sigma)
    matrices = torch.zeros(n, size, size, device=sigma.device)
    return matrices.scatter_add_(2, sources.expand(n, -1, -1),
                                 kernels[:, None, :].expand(n, size, -1))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int,
                  blurred: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Separable Gaussian blur with a per-row sigma (rows where `blurred` is False keep their
    values), as two batched matrix products: no per-shape kernel selection as convolutions
    with a per-row kernel would need."""
    if blurred is None:
        blurred = torch.ones_like(sigma, dtype=torch.bool)
    height, width = images.shape[2:]
    along_y = blur_matrices(sigma, blurred, height, radius)[:, None]
    along_x = blur_matrices(sigma, blurred, width, radius).transpose(1, 2)[:, None]
    return along_y @ images @ along_x


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    return luma(images).expand_as(images)


def solarize(images: torch.Tensor) -> torch.Tensor:
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


def render_views(images: torch.Tensor, boxes: torch.Tensor, params: CropParams, size: int,
                 blur_radius: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The augmented, normalised crops (N, 3, size, size) of `images` for boxes on the canvas."""
    views = resized_crops(images, boxes, params.flip, size)
    views = color_jitter(views, params.jitter, params.jitter_factors, params.jitter_order)
    views = torch.where(per_row(params.grayscale), to_grayscale(views), views)
    views = gaussian_blur(views, params.blur_sigma, blur_radius, params.blur)
    views = torch.where(per_row(params.solarize), solarize(views), views)
    return (views - mean) / std


# ------------------------------------------------------------------------------------------------
# The augmenter
# ------------------------------------------------------------------------------------------------

def checked_scale(scale: Sequence[float], flag: str) -> Tuple[float, float]:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise utils.InputError(f"{flag} needs two numbers 0 < min <= max, got {list(scale)}")
    return float(scale[0]), float(scale[1])


class MultiCropAugmenter(nn.Module):
    """Canvas batch -> DataAugmentationDINO's crops [global1, global2, local_1..n], normalised.

    Random parameters are drawn on the module's device, in one call per batch, from a generator
    of its own when seeded, restarted for every batch from (seed, rank, epoch, batch index), so
    that an epoch resumed at any batch draws what the uninterrupted one drew (on a given device
    type). compile_pixels compiles the pixel work (`render_views`) once per crop size.
    """

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224,
                 local_crops_size: int = 96, seed: Optional[int] = None, rank: int = 0,
                 compile_pixels: bool = False, device: Optional[torch.device] = None):
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
        mean, std = (torch.tensor(values, device=device).view(1, 3, 1, 1)
                     for values in (utils.IMAGENET_MEAN, utils.IMAGENET_STD))
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.render = torch.compile(render_views, dynamic=False) if compile_pixels \
            else render_views
        self.seed, self.rank = seed, rank
        self.generator: Optional[torch.Generator] = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """The next batch is batch `first_batch` of `epoch` (unseeded: the global RNG goes on)."""
        self.epoch, self.batch = epoch, first_batch

    def batch_generator(self) -> Optional[torch.Generator]:
        """The seeded stream of the next batch, on the module's device (None when unseeded)."""
        if self.seed is None:
            return None
        if self.generator is None or self.generator.device != self.mean.device:
            self.generator = torch.Generator(self.mean.device)
        self.generator.manual_seed(stream_seed(self.seed, self.rank, self.epoch, self.batch))
        return self.generator

    def sample_params(self, sizes: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> List[CropParams]:
        """One CropParams per size group (the global crops, then the local crops), drawn in one
        call on the generator's device (unseeded: the module's); sizes rows start with the
        original width and height."""
        device = generator.device if generator is not None else self.mean.device
        sizes = sizes[:, :2].to(device, non_blocking=True)
        kinds = [kind for group in self.groups for kind in group]
        rows = [len(sizes) * kind.count for kind in kinds]
        draws = torch.rand((sum(rows), DRAWS_PER_CROP), generator=generator, device=device)
        params = iter([sample_crop_params(sizes, kind, kind_draws)
                       for kind, kind_draws in zip(kinds, draws.split(rows))])
        return [CropParams.cat([next(params) for _ in group]) for group in self.groups]

    def apply(self, canvases: torch.Tensor, geometry: torch.Tensor,
              params: Sequence[CropParams]) -> List[torch.Tensor]:
        """The crops of canvases for given parameters, on the module's device."""
        device = self.mean.device
        images = canvases.to(device, non_blocking=True).float().div_(255)
        geometry = geometry.to(device, non_blocking=True)
        crops = []
        for group, group_params in zip(self.groups, params):
            count = sum(kind.count for kind in group)
            group_params = group_params.to(device)
            boxes = canvas_boxes(group_params.boxes, geometry.repeat(count, 1))
            views = self.render(images, boxes, group_params, group[0].size, self.blur_radius,
                                self.mean, self.std)
            crops.extend(views.chunk(count))
        return crops

    @torch.no_grad()
    def forward(self, canvases: torch.Tensor, geometry: torch.Tensor) -> List[torch.Tensor]:
        """uint8 canvases (B, 3, H, W); geometry rows (B, 4) as CanvasTransform's."""
        return self.apply(canvases, geometry, self.next_params(geometry))

    def next_params(self, geometry: torch.Tensor) -> List[CropParams]:
        """The parameters of the next batch of the epoch, from its own seeded stream."""
        params = self.sample_params(geometry, self.batch_generator())
        self.batch += 1
        return params
