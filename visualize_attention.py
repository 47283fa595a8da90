"""Self-attention maps of the [CLS] token in the last block of a DINO ViT, for one image.

Writes img.png, attn-head{j}.png, the overview attn-heads.png and, with --threshold t,
mask_th{t}_head{j}.png: per head the smallest set of patches holding a fraction t of the mass.
"""
import argparse
import math
import os
from typing import Sequence, Tuple

import matplotlib.image
import numpy as np
import torch
import torchvision
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Polygon
from PIL import Image
from skimage.measure import find_contours

import attention_maps
import utils

MASK_COLOR = (1.0, 0.0, 0.0)  # the reference's colour for a single mask
DPI = 100


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Visualize Self-Attention maps")
    utils.add_backbone_args(parser, utils.VIT_ARCHS, default_patch_size=8)
    parser.add_argument("--image_path", default=None, type=str,
                        help="Path of the image to load. Default: a photo bundled with "
                             "scikit-image (no download).")
    parser.add_argument("--image_size", default=(480, 480), type=int, nargs="+",
                        help="Resize image: two values give height width, one the shorter side.")
    parser.add_argument("--output_dir", default=".", help="Path where to save visualizations.")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Also save masks keeping this fraction of each head's attention "
                             "mass (e.g. 0.6).")
    return parser


def default_photo() -> Image.Image:
    """scikit-image's bundled photo of Chelsea the cat: one clear object, no network needed."""
    from skimage import data

    return Image.fromarray(data.chelsea())


def threshold_masks(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per head (dim 0): the smallest set of top patches holding `threshold` of its mass."""
    heads = attentions.shape[0]
    values, order = torch.sort(attentions.reshape(heads, -1), dim=1)
    cumulative = torch.cumsum(values / values.sum(dim=1, keepdim=True), dim=1)
    masks = torch.zeros_like(cumulative, dtype=torch.bool)
    masks.scatter_(1, order, cumulative > 1 - threshold)
    return masks.reshape(attentions.shape)


def to_display(image: torch.Tensor) -> np.ndarray:
    """Min-max rescale a normalised (3, H, W) image to an (H, W, 3) array in [0, 1], as img.png."""
    image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-12)
    return image.permute(1, 2, 0).numpy()


def pixel_sized_figure(height: int, width: int) -> Tuple[Figure, Axes]:
    """A borderless figure whose single axes covers exactly height x width saved pixels."""
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, frameon=False)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    return fig, ax


def save_mask_overlay(image: np.ndarray, mask: np.ndarray, path: str) -> None:
    """The mask blended at alpha 0.5 over the image, outlined by its contours."""
    height, width = mask.shape
    blended = image.copy()
    blended[mask] = 0.5 * image[mask] + 0.5 * np.asarray(MASK_COLOR)
    fig, ax = pixel_sized_figure(height, width)
    ax.imshow(blended, interpolation="nearest")
    # Padding closes the contours of masks that touch the border.
    for contour in find_contours(np.pad(mask, 1).astype(float), 0.5):
        ax.add_patch(Polygon(np.fliplr(contour) - 1, fill=False, edgecolor=MASK_COLOR,
                             linewidth=1))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    fig.savefig(path, dpi=DPI)


def save_overview(image: np.ndarray, attentions: np.ndarray, path: str) -> None:
    """One figure: the input, every head's attention and their mean (at most two rows)."""
    panels = [("input", image)] + [(f"head {j}", attention) for j, attention in
                                   enumerate(attentions)] + [("mean", attentions.mean(axis=0))]
    columns = len(panels) if len(panels) <= 5 else math.ceil(len(panels) / 2)
    rows = math.ceil(len(panels) / columns)
    aspect = image.shape[0] / image.shape[1]
    fig = Figure(figsize=(2.5 * columns, (2.5 * aspect + 0.4) * rows), dpi=DPI)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (title, picture) in zip(axes.flat, panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def save_attention_rows(rows: Sequence[Tuple[str, np.ndarray, np.ndarray]], path: str) -> None:
    """One figure, one row per (name, display image, per-head pixel maps): the input, every
    head's attention and their mean."""
    columns = 2 + max(len(maps) for _, _, maps in rows)
    fig = Figure(figsize=(1.7 * columns, 1.8 * len(rows)), dpi=DPI)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for row_axes, (name, image, maps) in zip(axes, rows):
        panels = [(name, image)] + [(f"head {j}", attention) for j, attention in
                                    enumerate(maps)] + [("mean", maps.mean(axis=0))]
        for ax in row_axes:
            ax.set_axis_off()
        for ax, (title, picture) in zip(row_axes, panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def main(args: argparse.Namespace) -> None:
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise utils.InputError(f"--threshold {args.threshold}: use a fraction in (0, 1]")
    image = attention_maps.open_rgb(args.image_path) if args.image_path else default_photo()
    img = attention_maps.image_to_tensor(image, args.patch_size, args.image_size)
    device = attention_maps.inference_device()
    model, _ = utils.build_frozen_backbone(args.arch, args.patch_size, args.pretrained_weights,
                                           args.checkpoint_key, device, visualisation=True)
    patch_maps = attention_maps.cls_attention(model, img[None].to(device), args.patch_size)[0]
    patch_maps = patch_maps.float().cpu()
    pixel_maps = attention_maps.upsample_patches(patch_maps[None], args.patch_size)[0].numpy()

    os.makedirs(args.output_dir, exist_ok=True)
    torchvision.utils.save_image(img, os.path.join(args.output_dir, "img.png"),
                                 normalize=True, scale_each=True)
    for j, attention in enumerate(pixel_maps):
        fname = os.path.join(args.output_dir, f"attn-head{j}.png")
        matplotlib.image.imsave(fname, attention, format="png")
        print(f"{fname} saved.")
    display_image = to_display(img)
    fname = os.path.join(args.output_dir, "attn-heads.png")
    save_overview(display_image, pixel_maps, fname)
    print(f"{fname} saved.")
    if args.threshold is None:
        return
    masks = threshold_masks(patch_maps, args.threshold)
    pixel_masks = attention_maps.upsample_patches(masks[None], args.patch_size)[0].numpy() > 0.5
    for j, mask in enumerate(pixel_masks):
        fname = os.path.join(args.output_dir, f"mask_th{args.threshold}_head{j}.png")
        save_mask_overlay(display_image, mask, fname)
        print(f"{fname} saved.")


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser().parse_args())
