"""Export a DINO backbone to ONNX (dynamic batch and image size) and check it with onnxruntime."""
import argparse
import copy
import math
import sys
from typing import List, Sequence, Tuple

import numpy as np
import onnxruntime
import torch
import torch.nn as nn
from onnx import TensorProto
from onnxscript import opset18 as op

import utils
import vision_transformer as vits

OPSET = 18


# ------------------------------------------------------------------------------------------------
# Position-embedding interpolation that exports with a dynamic image size
# ------------------------------------------------------------------------------------------------
# Traced as written, `interpolate_pos_encoding` freezes the example's bicubic scale factors into
# the graph. It is therefore routed through a custom op: in eager mode it runs the model file's own
# function, and in ONNX it becomes a Resize whose scales are computed from the input's height and
# width.

@torch.library.custom_op("dino_export::interpolate_pos_embed", mutates_args=())
def interpolate_pos_embed(pos_embed: torch.Tensor, height: int, width: int,
                          patch_size: int) -> torch.Tensor:
    """vision_transformer.interpolate_pos_embed behind an op that export does not trace into."""
    return vits.interpolate_pos_embed(pos_embed, height, width, patch_size).clone()


@interpolate_pos_embed.register_fake
def _(pos_embed, height, width, patch_size):
    tokens = (height // patch_size) * (width // patch_size) + 1
    return pos_embed.new_empty(1, tokens, pos_embed.shape[-1])


def interpolate_pos_embed_onnx(pos_embed, height, width, patch_size: int):
    """The same interpolation as ONNX ops, the bicubic scales computed from height and width."""
    tokens, dim = pos_embed.shape[1], pos_embed.shape[2]
    side = math.isqrt(tokens - 1)
    rows, cols = op.Div(height, patch_size), op.Div(width, patch_size)
    grid = op.Transpose(op.Reshape(op.Slice(pos_embed, [1], [tokens], [1]), [1, side, side, dim]),
                        perm=[0, 3, 1, 2])
    # The reference keeps the stored embedding for a square image with the stored grid size.
    unchanged = op.And(op.Equal(height, width), op.Equal(rows, side))
    scales = [op.Where(unchanged, 1.0, op.Div(op.Add(op.Cast(count, to=TensorProto.FLOAT), 0.1),
                                              float(side)))
              for count in (rows, cols)]
    # onnxruntime returns its input untouched when the output has the input's shape, whatever the
    # scales: that is a non-square image with the stored grid size. For that case only, edge rows
    # below the grid make the output taller than the input (the row scale is at least
    # 1 + 0.1 / side), and leave the kept rows as they are (bicubic clamps at the border too).
    same_grid = op.Cast(op.And(op.Equal(rows, side), op.Equal(cols, side)), to=TensorProto.INT64)
    extra_rows = op.Unsqueeze(op.Mul(same_grid, 10 * side), [0])
    pads = op.Concat(op.Constant(value_ints=[0] * 6), extra_rows, op.Constant(value_ints=[0]),
                     axis=0)
    padded = op.Pad(grid, pads, mode="edge")
    all_scales = op.Concat(op.Constant(value_floats=[1.0, 1.0]),
                           *[op.Unsqueeze(scale, [0]) for scale in scales], axis=0)
    resized = op.Resize(padded, None, all_scales, None, mode="cubic",
                        coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75,
                        exclude_outside=0)
    resized = op.Slice(resized, [0], op.Unsqueeze(rows, [0]), [2])
    patch_pos = op.Reshape(op.Transpose(resized, perm=[0, 2, 3, 1]), [1, -1, dim])
    return op.Concat(op.Slice(pos_embed, [0], [1], [1]), patch_pos, axis=1)


def use_exportable_pos_encoding(vit: vits.VisionTransformer) -> None:
    """Route this ViT's position-embedding interpolation through the exportable custom op."""
    def interpolate(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return torch.ops.dino_export.interpolate_pos_embed(vit.pos_embed, height, width,
                                                           vit.patch_embed.patch_size)
    vit.interpolate_pos_encoding = interpolate


class ExportedBackbone(nn.Module):
    """The backbone's features and, optionally, its last block's attention (one forward pass)."""

    def __init__(self, backbone: nn.Module, with_attention: bool):
        super().__init__()
        self.backbone = backbone
        self.with_attention = with_attention

    def forward(self, images: torch.Tensor):
        if not self.with_attention:
            return self.backbone(images)
        vit = self.backbone
        tokens = vit.prepare_tokens(images)
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        attention = vit.without_registers(vit.blocks[-1](tokens, return_attention=True),
                                          dims=(2, 3))
        features = vit.head(vit.norm(vit.blocks[-1](tokens))[:, 0])
        return features, attention


# ------------------------------------------------------------------------------------------------
# Export and check
# ------------------------------------------------------------------------------------------------

def export(model: nn.Module, path: str, with_attention: bool) -> None:
    """Write `model` to ONNX with dynamic batch, height and width."""
    is_vit = isinstance(model, vits.VisionTransformer)
    if with_attention and not is_vit:
        raise utils.InputError("--with_attention needs a ViT architecture (vit_tiny, vit_small, "
                               "vit_base)")
    exportable = copy.deepcopy(model)
    if is_vit:
        use_exportable_pos_encoding(exportable)
    wrapper = ExportedBackbone(exportable, with_attention).eval()
    min_side = model.patch_embed.patch_size if is_vit else 32
    # Batch and sizes that no code path special-cases, so that nothing is specialised to them.
    example = torch.randn(2, 3, 3 * min_side, 2 * min_side)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1),
                          2: torch.export.Dim("height", min=min_side),
                          3: torch.export.Dim("width", min=min_side)}}
    output_names = ["features", "attention"] if with_attention else ["features"]
    translations = {torch.ops.dino_export.interpolate_pos_embed.default:
                    interpolate_pos_embed_onnx}
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, dynamic_shapes=dynamic,
                                    input_names=["images"], output_names=output_names,
                                    opset_version=OPSET, custom_translation_table=translations,
                                    verbose=False)
    program.save(path)
    print(f"ONNX model written to {path} (inputs: images [batch, 3, height, width]; outputs: "
          f"{', '.join(output_names)}).")


@torch.no_grad()
def reference_outputs(model: nn.Module, images: torch.Tensor, with_attention: bool
                      ) -> List[torch.Tensor]:
    """What the exported graph must reproduce, from the untouched PyTorch model."""
    outputs = [model(images)]
    if with_attention:
        outputs.append(model.get_last_selfattention(images))
    return outputs


def parity(model: nn.Module, path: str, sizes: Sequence[Tuple[int, int]], with_attention: bool,
           batch: int = 2) -> List[float]:
    """Largest |onnxruntime - PyTorch| over the outputs, for one random batch per (H, W)."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    differences = []
    for height, width in sizes:
        images = torch.randn(batch, 3, height, width, generator=generator)
        expected = reference_outputs(model, images, with_attention)
        outputs = session.run(None, {"images": images.numpy()})
        differences.append(max(float(np.abs(out - ref.numpy()).max())
                               for out, ref in zip(outputs, expected)))
        print(f"{height}x{width}: max |onnxruntime - torch| = {differences[-1]:.3g}")
    return differences


def parse_size(text: str) -> Tuple[int, int]:
    """'HxW' (or one number for a square) as (height, width)."""
    try:
        sides = [int(side) for side in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use HxW, for example 224x224")
    return sides[0], sides[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a DINO backbone to ONNX", add_help=False)
    utils.add_backbone_args(parser, utils.arch_choices())
    parser.add_argument("--output", default="dino_backbone.onnx", type=str,
                        help="Path of the ONNX file to write.")
    parser.add_argument("--with_attention", default=False, type=utils.bool_flag,
                        help="Also output the last block's self-attention (batch, heads, tokens, "
                             "tokens), as used by visualize_attention.py (ViTs only).")
    parser.add_argument("--check_sizes", default=[(224, 224), (320, 240)], type=parse_size,
                        nargs="*", help="Image sizes HxW at which onnxruntime's outputs are "
                                        "compared with PyTorch's (none to skip the check).")
    parser.add_argument("--tolerance", default=1e-4, type=float,
                        help="Largest absolute difference accepted by the check.")
    return parser


def main(args: argparse.Namespace) -> None:
    model, _ = utils.build_frozen_backbone(args.arch, args.patch_size, args.pretrained_weights,
                                           args.checkpoint_key, torch.device("cpu"))
    export(model, args.output, args.with_attention)
    if not args.check_sizes:
        return
    worst = max(parity(model, args.output, args.check_sizes, args.with_attention))
    if not math.isfinite(worst) or worst > args.tolerance:
        sys.exit(f"ONNX check failed: onnxruntime differs from PyTorch by {worst:.3g} "
                 f"(> {args.tolerance:g})")
    print(f"ONNX check passed: onnxruntime matches PyTorch within {args.tolerance:g}.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Export a DINO backbone to ONNX",
                                     parents=[get_args_parser()])
    utils.run_cli(main, parser.parse_args())
