"""torch.hub entry points: the reference DINO backbones, and backbones of main_dino checkpoints.

    torch.hub.load("<this repo dir>", "dino_vits16", source="local")          # reference weights
    torch.hub.load("<this repo dir>", "dino_vitb8", source="local", pretrained=False)
    torch.hub.load("<this repo dir>", "dino_from_checkpoint", source="local",
                   checkpoint="output/checkpoint.pth")

Every entry point returns the backbone only (no DINO head, no classifier).
"""
import argparse
import os
from typing import Optional

import torch.nn as nn

import utils
import vision_transformer as vits

dependencies = ["torch", "torchvision"]

if not hasattr(utils, "load_pretrained_weights"):
    # torch.hub imports this file's siblings by plain name, so a caller's own `utils` wins.
    raise ImportError(f"the module 'utils' already imported from {getattr(utils, '__file__', '?')} "
                      "is not DINO's utils.py: load the DINO hub model before importing your own "
                      "'utils', or rename it")


def _load_reference_weights(model: nn.Module, arch: str, patch_size: int) -> None:
    url = utils.reference_weights_url(arch, patch_size)
    # The released ResNet-50 file has no `fc` keys; every other release matches exactly.
    model.load_state_dict(utils.download_state_dict(url), strict=(arch != "resnet50"))


def _vit(arch: str, patch_size: int, pretrained: bool, **kwargs) -> vits.VisionTransformer:
    """A ViT backbone; kwargs go to its constructor, as in the reference hub."""
    model, _ = utils.build_backbone(arch, patch_size, **kwargs)
    if pretrained:
        _load_reference_weights(model, arch, patch_size)
    return model


def _drop_path_rate_only(entry: str, kwargs: dict) -> float:
    drop_path_rate = kwargs.pop("drop_path_rate", 0.0)
    if kwargs:
        raise TypeError(f"{entry}() takes pretrained and drop_path_rate, not {sorted(kwargs)}")
    return drop_path_rate


def _xcit(arch: str, pretrained: bool, **kwargs) -> nn.Module:
    """An XCiT backbone; its code comes from facebookresearch/xcit through torch.hub (network)."""
    drop_path_rate = _drop_path_rate_only(f"dino_{arch}", kwargs)
    model, _ = utils.build_backbone(arch, drop_path_rate=drop_path_rate)
    if pretrained:
        _load_reference_weights(model, arch, patch_size=16)
    return model


def dino_vits16(pretrained: bool = True, **kwargs) -> vits.VisionTransformer:
    """ViT-S/16 (21M parameters, 384-d [CLS] features), 74.5% k-NN / 77.0% linear on ImageNet."""
    return _vit("vit_small", 16, pretrained, **kwargs)


def dino_vits8(pretrained: bool = True, **kwargs) -> vits.VisionTransformer:
    """ViT-S/8 (21M parameters, 384-d), 78.3% k-NN / 79.7% linear on ImageNet."""
    return _vit("vit_small", 8, pretrained, **kwargs)


def dino_vitb16(pretrained: bool = True, **kwargs) -> vits.VisionTransformer:
    """ViT-B/16 (85M parameters, 768-d), 76.1% k-NN / 78.2% linear on ImageNet."""
    return _vit("vit_base", 16, pretrained, **kwargs)


def dino_vitb8(pretrained: bool = True, **kwargs) -> vits.VisionTransformer:
    """ViT-B/8 (85M parameters, 768-d), 77.4% k-NN / 80.1% linear on ImageNet."""
    return _vit("vit_base", 8, pretrained, **kwargs)


def dino_resnet50(pretrained: bool = True, **kwargs) -> nn.Module:
    """ResNet-50 with `fc` removed (23M parameters, 2048-d), 67.5% k-NN / 75.3% linear."""
    _drop_path_rate_only("dino_resnet50", kwargs)
    model, _ = utils.build_backbone("resnet50")
    if pretrained:
        _load_reference_weights(model, "resnet50", patch_size=16)
    return model


def dino_xcit_small_12_p16(pretrained: bool = True, **kwargs) -> nn.Module:
    """XCiT-S12/16, 76.0% k-NN / 77.8% linear on ImageNet (code fetched from GitHub)."""
    return _xcit("xcit_small_12_p16", pretrained, **kwargs)


def dino_xcit_small_12_p8(pretrained: bool = True, **kwargs) -> nn.Module:
    """XCiT-S12/8, 77.1% k-NN / 79.2% linear on ImageNet (code fetched from GitHub)."""
    return _xcit("xcit_small_12_p8", pretrained, **kwargs)


def dino_xcit_medium_24_p16(pretrained: bool = True, **kwargs) -> nn.Module:
    """XCiT-M24/16, 76.4% k-NN / 78.8% linear on ImageNet (code fetched from GitHub)."""
    return _xcit("xcit_medium_24_p16", pretrained, **kwargs)


def dino_xcit_medium_24_p8(pretrained: bool = True, **kwargs) -> nn.Module:
    """XCiT-M24/8, 77.9% k-NN / 80.3% linear on ImageNet (code fetched from GitHub)."""
    return _xcit("xcit_medium_24_p8", pretrained, **kwargs)


def dino_from_checkpoint(checkpoint: str, arch: Optional[str] = None,
                         patch_size: Optional[int] = None,
                         checkpoint_key: str = "teacher") -> nn.Module:
    """The teacher (or student) backbone of a main_dino checkpoint.

    arch and patch_size default to the values stored in the checkpoint's `args`; a backbone-only
    file (no `args`) needs arch, and patch_size when it is not 16.
    """
    if not os.path.isfile(checkpoint):
        raise utils.InputError(f"checkpoint {checkpoint!r} is not a file")
    contents = utils.load_checkpoint_file(checkpoint)
    stored_args = _training_args(contents)
    if stored_args and checkpoint_key not in contents:
        raise utils.InputError(f"{checkpoint!r} has no {checkpoint_key!r} entry: use "
                               f"checkpoint_key='teacher' or 'student'")
    arch = arch or stored_args.get("arch")
    if arch is None:
        raise utils.InputError(f"{checkpoint!r} holds no main_dino args to read the architecture "
                               "from: pass arch= (and patch_size=)")
    patch_size = patch_size or stored_args.get("patch_size", 16)
    model, _ = utils.build_pretrained_backbone(arch, patch_size, checkpoint, checkpoint_key)
    return model


def _training_args(contents: dict) -> dict:
    """main_dino's stored args as a dict ({} for a backbone-only state_dict)."""
    stored = contents.get("args")
    if isinstance(stored, argparse.Namespace):
        return vars(stored)
    return dict(stored) if isinstance(stored, dict) else {}
