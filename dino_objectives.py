"""DINOv2-era training objectives for main_dino.py, each off by default.

- KoLeo (Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019), as DINOv2
  (Oquab et al., arXiv 2304.07193) applies it: on the student's L2-normalised [CLS] features,
  per global view and per rank, minus the mean log distance to the nearest neighbour.
- iBOT's masked-patch loss (Zhou et al., arXiv 2111.07832): block-wise masks on the student's
  global crops; each masked patch token predicts the teacher's distribution for the same,
  unmasked token, with a centre of its own.
- Sinkhorn-Knopp centring (SwAV, Caron et al., arXiv 2006.09882; DINOv2): 3 normalisations of
  the teacher's exp(logits / temperature) over the prototypes (across all ranks) and the samples.
"""
import argparse
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import utils

CENTERINGS = ("centering", "sinkhorn_knopp")


def add_objective_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the DINOv2-era objectives; their defaults leave DINO (v1) unchanged."""
    parser.add_argument("--koleo_loss_weight", default=0.0, type=float,
                        help="Weight of the KoLeo regulariser on the student's [CLS] features of "
                             "the global crops (DINOv2: 0.1; 0 disables it).")
    parser.add_argument("--ibot_loss_weight", default=0.0, type=float,
                        help="Weight of iBOT's masked-patch loss (DINOv2: 1.0; 0 disables it). "
                             "ViTs only.")
    parser.add_argument("--ibot_mask_ratio", default=(0.1, 0.5), type=float, nargs=2,
                        metavar=("MIN", "MAX"),
                        help="Range of the fraction of patches masked in a masked global crop.")
    parser.add_argument("--ibot_mask_probability", default=0.5, type=float,
                        help="Fraction of the global crops that get a mask.")
    parser.add_argument("--ibot_out_dim", default=None, type=int,
                        help="Prototypes of the separate iBOT head (default: --out_dim).")
    parser.add_argument("--ibot_separate_head", default=True, type=utils.bool_flag,
                        help="Score patch tokens with an iBOT head of their own (true) or with "
                             "the DINO head (false).")
    parser.add_argument("--centering", default="centering", choices=CENTERINGS,
                        help="How teacher outputs become targets: DINO's EMA centre "
                             "('centering') or 3 Sinkhorn-Knopp iterations ('sinkhorn_knopp').")


def check_objective_args(args: argparse.Namespace) -> None:
    """Reject settings the objectives cannot run with, in one line each."""
    low, high = args.ibot_mask_ratio
    if not 0 <= low <= high <= 1:
        raise utils.InputError(f"--ibot_mask_ratio {low} {high}: give MIN <= MAX within [0, 1]")
    if not 0 <= args.ibot_mask_probability <= 1:
        raise utils.InputError(f"--ibot_mask_probability {args.ibot_mask_probability} is not "
                               "within [0, 1]")
    if args.koleo_loss_weight and args.batch_size_per_gpu < 2:
        raise utils.InputError("--koleo_loss_weight needs a nearest neighbour: use "
                               "--batch_size_per_gpu 2 or more")
    if not args.ibot_loss_weight:
        return
    if args.arch not in utils.VIT_ARCHS:
        raise utils.InputError(f"--ibot_loss_weight masks patch tokens: use a ViT, not "
                               f"{args.arch}")
    if args.use_bn_in_head:
        raise utils.InputError("--ibot_loss_weight does not support --use_bn_in_head true "
                               "(a batch-norm head would mix patch and image statistics)")
    if not args.ibot_separate_head and args.ibot_out_dim not in (None, args.out_dim):
        raise utils.InputError("--ibot_separate_head false scores patches with the DINO head: "
                               "--ibot_out_dim must be left out or equal --out_dim")


def uses_objectives(args: argparse.Namespace) -> bool:
    """Whether the run needs the multi-output forward (KoLeo, iBOT or distillation)."""
    return bool(args.koleo_loss_weight or args.ibot_loss_weight
                or getattr(args, "distill_from", ""))


@dataclass
class Objectives:
    """The terms added to the DINO loss, as main_dino's training step uses them."""
    koleo_loss_weight: float
    ibot_loss_weight: float
    ibot_loss: Optional["IBOTPatchLoss"]   # None without iBOT
    mask_sampler: Optional["MaskSampler"]
    patch_size: int

    def sample_masks(self, first_global_crops: torch.Tensor, draw: int
                     ) -> Optional["PatchMasks"]:
        """Masks for the student's global crops (both views: 2 x batch images), or None; `draw`
        numbers the micro-batch in the run."""
        if self.mask_sampler is None:
            return None
        height, width = first_global_crops.shape[-2:]
        grid = (height // self.patch_size, width // self.patch_size)
        return self.mask_sampler(2 * len(first_global_crops), grid, draw,
                                 first_global_crops.device)


def build_objectives(args: argparse.Namespace, device: torch.device) -> Objectives:
    ibot = args.ibot_loss_weight > 0
    ibot_out_dim = (args.ibot_out_dim or args.out_dim) if args.ibot_separate_head \
        else args.out_dim
    return Objectives(
        args.koleo_loss_weight, args.ibot_loss_weight,
        IBOTPatchLoss(ibot_out_dim, centering=args.centering,
                      micro_batches=args.grad_accum_steps).to(device) if ibot else None,
        MaskSampler(args.ibot_mask_ratio, args.ibot_mask_probability, args.seed) if ibot else None,
        args.patch_size)


# ------------------------------------------------------------------------------------------------
# Teacher targets: centring or Sinkhorn-Knopp
# ------------------------------------------------------------------------------------------------

def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor,
                          temperature: Union[float, torch.Tensor], centering: str
                          ) -> torch.Tensor:
    """Target distributions (rows) from teacher logits, in float32 and without gradient."""
    logits = teacher_logits.detach().float()
    if centering == "sinkhorn_knopp":
        return sinkhorn_knopp(logits / temperature)
    return F.softmax((logits - center) / temperature, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """exp(scores) alternately rescaled so that every prototype (column) holds the same mass
    over the batch of all ranks and every sample (row) sums to 1; (B, K) float32.

    DINOv2's normalisations by the total mass, by K and by the global batch size only rescale
    the whole matrix before a rescaling of rows or columns, so they cancel and are left out.
    The iterations run on logarithms: scores spanning more than ~170 (logits of 3.5 at
    temperature 0.04 with --norm_last_layer false) would underflow exp() in float32.
    """
    log_q = scores.float()
    for _ in range(iterations):
        log_q = log_q - _column_logsumexp_over_ranks(log_q)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return torch.exp(log_q)


def _column_logsumexp_over_ranks(log_q: torch.Tensor) -> torch.Tensor:
    """log(sum over every rank's rows of exp(log_q)), per column: (1, K)."""
    if len(log_q):
        peak = log_q.amax(dim=0, keepdim=True)
    else:  # a rank without rows (no masked token) still joins the all-reduces
        peak = log_q.new_full((1, log_q.shape[1]), -math.inf)
    if utils.is_dist_avail_and_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    mass = torch.exp(log_q - peak).sum(dim=0, keepdim=True)
    if utils.is_dist_avail_and_initialized():
        dist.all_reduce(mass)
    return peak + torch.log(mass)


# ------------------------------------------------------------------------------------------------
# KoLeo
# ------------------------------------------------------------------------------------------------

def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean_i log(distance of L2-normalised row i to its nearest other row), in float32."""
    with torch.autocast(features.device.type, enabled=False):
        points = F.normalize(features.float(), dim=-1, eps=eps)
        with torch.no_grad():
            similarity = points @ points.T
            # Below every cosine, so that a row is never its own neighbour (ties included).
            similarity.fill_diagonal_(-2.0)
            neighbour = similarity.argmax(dim=1)
        distance = (points - points[neighbour]).norm(dim=-1)
        return -torch.log(distance + eps).mean()


def koleo_loss_per_view(global_features: torch.Tensor, views: int = 2) -> torch.Tensor:
    """KoLeo of each global view's batch, summed over the views (as DINOv2)."""
    return sum(koleo_loss(view) for view in global_features.chunk(views))


# ------------------------------------------------------------------------------------------------
# iBOT: block-wise masks and the masked-patch loss
# ------------------------------------------------------------------------------------------------

class PatchMasks(NamedTuple):
    """Masks of the global crops' patches, and what the loss needs, on the training device."""
    masks: torch.Tensor    # (images, patches) bool, True = masked
    indices: torch.Tensor  # (M,) flat indices of the masked tokens in (images * patches)
    weights: torch.Tensor  # (M,) 1 / (masked tokens of the token's image)


def block_mask(rng: np.random.Generator, height: int, width: int, target: int,
               min_block: int = 4, max_block: Optional[int] = None,
               min_aspect: float = 0.3) -> np.ndarray:
    """A (height, width) bool mask of about `target` patches made of random rectangles.

    BEiT/iBOT/DINOv2 block-wise masking: rectangles of area in [min_block, what is left] and
    aspect ratio in [min_aspect, 1 / min_aspect] (log-uniform), each at most `max_block`
    patches (default half the grid), added until the target is reached or no rectangle fits.
    """
    mask = np.zeros((height, width), dtype=bool)
    max_block = max_block or height * width // 2
    count = 0
    while count < target:
        added = _add_block(rng, mask, min(target - count, max_block), min_block, min_aspect)
        if added == 0:
            break
        count += added
    return mask


def _add_block(rng: np.random.Generator, mask: np.ndarray, budget: int, min_block: int,
               min_aspect: float) -> int:
    """Mask one random rectangle adding 1..budget new patches (10 tries); the number added."""
    height, width = mask.shape
    log_aspect = math.log(min_aspect)
    for _ in range(10):
        # A budget below min_block draws from [budget, min_block], as Python's uniform would.
        area = rng.uniform(*sorted((min_block, budget)))
        aspect = math.exp(rng.uniform(log_aspect, -log_aspect))
        rows = int(round(math.sqrt(area * aspect)))
        cols = int(round(math.sqrt(area / aspect)))
        if rows >= height or cols >= width:
            continue
        top = int(rng.integers(0, height - rows + 1))
        left = int(rng.integers(0, width - cols + 1))
        block = mask[top:top + rows, left:left + cols]
        added = rows * cols - int(block.sum())
        if 0 < added <= budget:
            block[...] = True
            return added
    return 0


class MaskSampler:
    """Block-wise masks for a batch of global crops, as DINOv2 draws them per batch.

    int(images * probability) crops are masked, the i-th with a patch fraction drawn from the
    i-th of equal slices of [ratio_min, ratio_max]; then the crops are shuffled. The draw
    depends only on (seed, rank, micro-batch number), so a resumed run masks exactly the same
    patches.
    """

    def __init__(self, ratio: Sequence[float], probability: float, seed: int):
        self.ratio_min, self.ratio_max = ratio
        self.probability = probability
        self.seed = seed

    def __call__(self, images: int, grid: Tuple[int, int], draw: int, device: torch.device
                 ) -> PatchMasks:
        rng = np.random.default_rng((self.seed, utils.get_rank(), draw))
        patches = grid[0] * grid[1]
        masked_images = int(images * self.probability)
        bounds = np.linspace(self.ratio_min, self.ratio_max, masked_images + 1)
        masks = np.zeros((images, patches), dtype=bool)
        for i in range(masked_images):
            target = int(patches * rng.uniform(bounds[i], bounds[i + 1]))
            masks[i] = block_mask(rng, grid[0], grid[1], target).reshape(-1)
        return patch_masks_of(masks[rng.permutation(images)], device)


def patch_masks_of(masks: np.ndarray, device: torch.device) -> PatchMasks:
    """PatchMasks of (images, patches) bool masks, computed on the host (no device sync)."""
    counts = masks.sum(axis=1)
    indices = np.flatnonzero(masks)
    weights = 1.0 / counts[indices // masks.shape[1]]
    return PatchMasks(torch.from_numpy(masks).to(device, non_blocking=True),
                      torch.from_numpy(indices).to(device, non_blocking=True),
                      torch.from_numpy(weights).float().to(device, non_blocking=True))


class IBOTPatchLoss(nn.Module):
    """Cross-entropy of the masked patch tokens: student vs the teacher's centred, sharpened
    distribution for the same token; the centre (buffer `center`) is an EMA of the teacher's
    masked-token logits over all ranks (unused with Sinkhorn-Knopp).

    Each image's masked tokens are averaged, then the images are averaged (unmasked images
    count as zero), as DINOv2 does. With gradient accumulation the centre moves once per
    optimizer step, as DINOLoss's.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "centering", micro_batches: int = 1):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.micro_batches = micro_batches
        self.step_totals: List[torch.Tensor] = []  # [logit sums..., count] of the step so far

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                patch_masks: PatchMasks, teacher_temp: float) -> torch.Tensor:
        """Logits (M, K) of the M masked tokens, in `patch_masks.indices` order."""
        targets = teacher_probabilities(teacher_logits, self.center, teacher_temp,
                                        self.centering)
        student_logp = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        token_losses = torch.sum(-targets * student_logp, dim=-1)
        loss = (token_losses * patch_masks.weights).sum() / len(patch_masks.masks)
        if self.centering == "centering":
            self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA towards the mean over every rank's masked tokens (ranks may hold different
        numbers of them); no change when no token was masked anywhere."""
        logits = teacher_logits.float()
        count = logits.new_full((1, 1), float(len(logits)))
        self.step_totals.append(torch.cat((logits.sum(dim=0, keepdim=True), count), dim=1))
        if len(self.step_totals) < self.micro_batches:
            return
        totals = torch.stack(self.step_totals).sum(dim=0)
        self.step_totals = []
        if utils.is_dist_avail_and_initialized():
            dist.all_reduce(totals)
        batch_center = totals[:, :-1] / totals[:, -1:].clamp_min(1.0)
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(totals[:, -1:] > 0, updated, self.center))


# ------------------------------------------------------------------------------------------------
# The multi-crop network that feeds them
# ------------------------------------------------------------------------------------------------

class MultiCropOutputs(NamedTuple):
    dino: torch.Tensor            # DINO-head logits of every crop, in crop order
    global_cls: torch.Tensor      # backbone features of the global crops (KoLeo)
    ibot: Optional[torch.Tensor]  # patch-head logits of the masked tokens (iBOT), or None


class MaskedMultiCropWrapper(utils.MultiCropWrapper):
    """MultiCropWrapper that also returns the global crops' features and, given patch masks,
    the patch-head logits of the masked tokens.

    The student replaces the masked patches of its global crops by the mask token
    (mask_inputs=True); the teacher sees them intact and is only read at the masked positions.
    An iBOT head of its own adds the keys `ibot_head.*` beside `backbone.*` and `head.*`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module,
                 ibot_head: Optional[nn.Module] = None, packed: bool = False):
        super().__init__(backbone, head, packed)
        self.ibot_head = ibot_head

    def forward(self, crops: List[torch.Tensor], patch_masks: Optional[PatchMasks] = None,
                mask_inputs: bool = True) -> MultiCropOutputs:
        global_crops = torch.cat(crops[:2])
        patch_logits = None
        if patch_masks is None:
            global_cls = self.backbone_features([global_crops])
        else:
            masks = patch_masks.masks if mask_inputs else None
            global_cls, patch_tokens = self.backbone.forward_features(global_crops, masks)
            masked_tokens = patch_tokens.flatten(0, 1).index_select(0, patch_masks.indices)
            patch_head = self.head if self.ibot_head is None else self.ibot_head
            patch_logits = patch_head(masked_tokens)
        features = [global_cls]
        if len(crops) > 2:
            features.append(self.backbone_features(crops[2:]))
        # A copy, not a view of the token sequence: FSDP warns about views among its outputs.
        return MultiCropOutputs(self.head(torch.cat(features)), global_cls.contiguous(),
                                patch_logits)
