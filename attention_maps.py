"""What visualize_attention.py and video_generation.py share: the inference device, image
preprocessing and the last block's attention of the [CLS] token over the patches.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

import utils
import vision_transformer as vits


def inference_device() -> torch.device:
    """The GPU when there is one, else the CPU (no distributed set-up, as the reference)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_rgb(path: str) -> Image.Image:
    """Read an image file as RGB; a clear error when it is missing or not an image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise utils.InputError(f"cannot read image {path!r}: {error}") from error


def image_to_tensor(image: Image.Image, patch_size: int,
                    size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Resize (one value: shorter side, two: height width), normalise with ImageNet statistics,
    and crop top-left to a multiple of the patch size: (3, H, W).
    """
    steps = []
    if size:
        if len(size) > 2 or min(size) <= 0:
            raise utils.InputError(f"image size {list(size)}: give one positive value (the "
                                   "shorter side) or two (height width)")
        steps.append(transforms.Resize(list(size)))
    steps += [transforms.ToTensor(), transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)]
    tensor = transforms.Compose(steps)(image)
    height = tensor.shape[1] - tensor.shape[1] % patch_size
    width = tensor.shape[2] - tensor.shape[2] % patch_size
    if height == 0 or width == 0:
        raise utils.InputError(f"a {tensor.shape[1]}x{tensor.shape[2]} image holds no whole "
                               f"{patch_size}x{patch_size} patch: use a larger image size")
    return tensor[:, :height, :width]


@torch.no_grad()
def cls_attention(model: vits.VisionTransformer, images: torch.Tensor, patch_size: int
                  ) -> torch.Tensor:
    """Last block's attention probabilities of the [CLS] query over the patch keys, laid out on
    the patch grid: (B, heads, H/p, W/p).
    """
    batch, _, height, width = images.shape
    attentions = model.get_last_selfattention(images)
    heads = attentions.shape[1]
    # clone() so that the (B, heads, T, T) tensor is freed instead of kept alive by a view.
    return attentions[:, :, 0, 1:].reshape(batch, heads, height // patch_size,
                                           width // patch_size).clone()


def upsample_patches(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Nearest-neighbour upsampling of (B, C, h, w) patch-grid maps to pixels (B, C, h*p, w*p)."""
    return F.interpolate(maps.float(), scale_factor=patch_size, mode="nearest")

