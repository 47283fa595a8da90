"""Distillation of a frozen, pretrained teacher into a (smaller) student (--distill_from).

As DINOv2 distils its largest model into smaller ones: the teacher is a pretrained backbone with
its DINO (and iBOT) heads, frozen and never averaged; the student learns its DINO (and iBOT)
targets with the usual multi-crop, and the student's own EMA copy is what main_dino saves as
`teacher`, so every evaluation script reads a distilled checkpoint as any other.

The teacher comes from a main_dino checkpoint (its `teacher` entry: backbone and heads), or from
backbone-only weights (e.g. a reference release). Those get a freshly initialised DINO head,
fitted for --distill_head_warmup_epochs on the frozen features by SwAV's swapped prediction
(Caron et al., arXiv 2006.09882: each global view predicts the other's Sinkhorn-Knopp codes, so
no EMA is needed against collapse), and frozen from then on; it also scores patch tokens.
"""
import argparse
import os
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import dino_objectives
import dino_sharding
import utils
from vision_transformer import DINOHead


def add_distillation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distill_from", default="", type=str,
                        help="Distil this frozen teacher into the student: a main_dino "
                             "checkpoint (its teacher backbone and heads) or backbone weights. "
                             "Empty (default): DINO's own EMA teacher.")
    parser.add_argument("--distill_arch", default=None, type=utils.canonical_arch,
                        help="Architecture of the --distill_from teacher (default: the "
                             "checkpoint's stored --arch).")
    parser.add_argument("--distill_head_warmup_epochs", default=1, type=int,
                        help="With backbone-only --distill_from weights: epochs during which "
                             "the teacher's fresh head is fitted on its frozen features before "
                             "it is frozen too.")


class TeacherWeights(NamedTuple):
    """What a --distill_from file holds, split by part."""
    arch: str
    patch_size: int
    backbone: Dict[str, torch.Tensor]
    head: Dict[str, torch.Tensor]       # empty for backbone-only weights
    ibot_head: Dict[str, torch.Tensor]  # empty when the teacher had no separate iBOT head


def read_teacher_weights(path: str, arch: Optional[str]) -> TeacherWeights:
    """The teacher entry of a main_dino checkpoint, or backbone-only weights, split by part."""
    if not os.path.isfile(path):
        raise utils.InputError(f"--distill_from {path!r} is not a file")
    contents = utils.load_checkpoint_file(path)
    stored = contents.get("args")
    stored = vars(stored) if isinstance(stored, argparse.Namespace) else {}
    state = contents.get("teacher", contents)
    state = {name.replace("module.", "", 1) if name.startswith("module.") else name: value
             for name, value in state.items()}
    parts = {prefix: {name[len(prefix):]: value for name, value in state.items()
                      if name.startswith(prefix)}
             for prefix in ("backbone.", "head.", "ibot_head.")}
    backbone = parts["backbone."] or state
    # A teacher trained with iBOT has a mask token; it never masks here.
    backbone = {name: value for name, value in backbone.items() if name != "mask_token"}
    arch = arch or stored.get("arch")
    if arch is None:
        raise utils.InputError(f"{path!r} holds no main_dino args to read the teacher's "
                               "architecture from: pass --distill_arch")
    patch_size = stored.get("patch_size")
    if patch_size is None:
        patch_embed = backbone.get("patch_embed.proj.weight")
        patch_size = patch_embed.shape[-1] if patch_embed is not None else 16
    return TeacherWeights(arch, patch_size, backbone, parts["head."], parts["ibot_head."])


def load_part(module: nn.Module, state: Dict[str, torch.Tensor], what: str, path: str) -> None:
    """Strict load with a one-line error naming the part and the flags to check."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[1:2] or [str(error)]
        raise utils.InputError(f"the {what} of --distill_from {path!r} does not fit: "
                               f"{first_line[0].strip()} (check --distill_arch and "
                               "--out_dim)") from error


def head_hidden_dim(head_weights: Dict[str, torch.Tensor], default: int) -> int:
    """The hidden width of a saved DINO head (its first layer's rows); `default` for none."""
    first_layer = head_weights.get("mlp.0.weight")
    return default if first_layer is None else first_layer.shape[0]


def build_teacher_network(args: argparse.Namespace, weights: TeacherWeights
                          ) -> dino_objectives.MaskedMultiCropWrapper:
    """The teacher's backbone and heads with the file's weights (a fresh DINO head when the
    file has none); frozen, in eval mode."""
    backbone, embed_dim = utils.build_backbone(weights.arch, weights.patch_size,
                                               **utils.vit_options_of(weights.backbone))
    load_part(backbone, weights.backbone, "backbone", args.distill_from)
    use_bn = any(".running_mean" in name for name in weights.head)
    head = DINOHead(embed_dim, args.out_dim, use_bn=use_bn,
                    hidden_dim=head_hidden_dim(weights.head, args.head_hidden_dim))
    if weights.head:
        load_part(head, weights.head, "DINO head", args.distill_from)
    ibot_head = None
    if weights.ibot_head and args.ibot_loss_weight:
        ibot_out_dim = weights.ibot_head["last_layer.weight_v"].shape[0]
        ibot_head = DINOHead(embed_dim, ibot_out_dim,
                             hidden_dim=head_hidden_dim(weights.ibot_head, args.head_hidden_dim))
        load_part(ibot_head, weights.ibot_head, "iBOT head", args.distill_from)
    network = dino_objectives.MaskedMultiCropWrapper(backbone, head, ibot_head)
    for param in network.parameters():
        param.requires_grad = False
    return network.eval()


def check_teacher_fits_student(args: argparse.Namespace, weights: TeacherWeights,
                               network: dino_objectives.MaskedMultiCropWrapper) -> None:
    """The student predicts the teacher's prototypes, so their numbers must agree."""
    if not args.ibot_loss_weight:
        return
    if weights.arch not in utils.VIT_ARCHS or weights.patch_size != args.patch_size:
        raise utils.InputError("iBOT distillation matches patch tokens: the --distill_from "
                               f"teacher ({weights.arch}/{weights.patch_size}) must be a ViT with "
                               f"the student's --patch_size {args.patch_size}")
    teacher_head = network.head if network.ibot_head is None else network.ibot_head
    teacher_out_dim = teacher_head.last_layer.weight_v.shape[0]
    student_out_dim = (args.ibot_out_dim or args.out_dim) if args.ibot_separate_head \
        else args.out_dim
    if teacher_out_dim != student_out_dim:
        raise utils.InputError(f"the --distill_from teacher scores patches with {teacher_out_dim} "
                               f"prototypes, the student's iBOT head with {student_out_dim}: set "
                               f"--ibot_out_dim {teacher_out_dim}")


class Distillation:
    """The frozen teacher, and the fitting of its fresh head during the first epochs."""

    def __init__(self, teacher: nn.Module, warmup_epochs: int, warmup_lr: float):
        self.teacher = teacher
        self.warmup_epochs = warmup_epochs
        # The prototypes keep unit norm (weight_g stays 1), as SwAV's.
        self.head_params = [param for name, param in self._network().head.named_parameters()
                            if not name.endswith("weight_g")]
        self.head_optimizer = torch.optim.AdamW(self.head_params, lr=warmup_lr,
                                                weight_decay=0.0) if warmup_epochs else None

    def _network(self) -> dino_objectives.MaskedMultiCropWrapper:
        return getattr(self.teacher, "module", self.teacher)

    def warming_up(self, epoch: int) -> bool:
        return epoch < self.warmup_epochs

    def targets(self, global_crops: List[torch.Tensor],
                patch_masks: Optional[dino_objectives.PatchMasks]
                ) -> dino_objectives.MultiCropOutputs:
        """The teacher's outputs on the intact global crops, without autograd."""
        with torch.no_grad():
            return self.teacher(global_crops, patch_masks, mask_inputs=False)

    def warm_up_head(self, global_features: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """One step of swapped prediction for the DINO head on the frozen global features;
        the loss (detached)."""
        for param in self.head_params:
            param.requires_grad = True
        with torch.autocast(global_features.device.type, enabled=False):
            logits = self._network().head(global_features.detach().float())
            loss = swapped_prediction_loss(logits, teacher_temp)
        self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for param in self.head_params:
            param.requires_grad = False
        average_gradients(self.head_params)
        self.head_optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict:
        head = self._network().head
        return {"head": head.state_dict(), "head_optimizer": self.head_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._network().head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])


def swapped_prediction_loss(logits: torch.Tensor, teacher_temp: float,
                            student_temp: float = 0.1) -> torch.Tensor:
    """SwAV: each of the two global views predicts the other's Sinkhorn-Knopp codes."""
    codes = [dino_objectives.sinkhorn_knopp(view.detach() / teacher_temp)
             for view in logits.chunk(2)]
    log_probs = F.log_softmax(logits / student_temp, dim=-1).chunk(2)
    return -0.5 * (torch.sum(codes[0] * log_probs[1], dim=-1).mean()
                   + torch.sum(codes[1] * log_probs[0], dim=-1).mean())


def average_gradients(params) -> None:
    """Mean of each gradient over the ranks, so that every rank's head stays the same."""
    if not utils.is_dist_avail_and_initialized():
        return
    grads = [param.grad for param in params if param.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= utils.get_world_size()
    for grad, mean in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(mean.view_as(grad))


def build_distillation(args: argparse.Namespace, device: torch.device) -> Distillation:
    """The frozen teacher of --distill_from on `device` (FSDP-sharded with --sharding fsdp)."""
    weights = read_teacher_weights(args.distill_from, args.distill_arch)
    network = build_teacher_network(args, weights)
    check_teacher_fits_student(args, weights, network)
    warmup_epochs = 0 if weights.head else args.distill_head_warmup_epochs
    print(f"Distilling from {args.distill_from}: a frozen {weights.arch}/{weights.patch_size} "
          "teacher" + (f", its fresh head fitted for {warmup_epochs} epochs."
                       if warmup_epochs else " with its own heads."))
    network = network.to(device)
    if args.sharding == "fsdp":
        if warmup_epochs:
            raise utils.InputError("--sharding fsdp distils from a teacher with its heads (a "
                                   "main_dino checkpoint); fit the head of backbone-only "
                                   "weights in an unsharded run first")
        dtype = dino_sharding.compute_dtype(args.use_bf16, args.use_fp16, device)
        network = dino_sharding.ShardedNetwork(dino_sharding.shard(network, dtype, False), "")
    warmup_lr = args.lr * args.batch_size_per_gpu * utils.get_world_size() / 256.0
    return Distillation(network, warmup_epochs, warmup_lr)
