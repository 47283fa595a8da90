"""Reference-like variants of main_dino's training-step pieces, kept only as a speed baseline.

They reproduce how the original implementation spends its time (explicit softmax attention,
each student log-softmax computed once per pair, a host sync per parameter when clipping, a
Python loop for the EMA, a loss read-back and device sync every iteration), with the same
arithmetic, so a benchmark can measure our fast paths against them side by side.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import vision_transformer as vits


def use_explicit_attention(model: nn.Module) -> None:
    """Route every attention layer through the explicit softmax path."""
    for module in model.modules():
        if isinstance(module, vits.Attention):
            module.fused_attn = False


def dino_loss_pairwise(dino_loss, student_output: torch.Tensor, teacher_output: torch.Tensor,
                       epoch: int) -> torch.Tensor:
    """DINO loss recomputing the student log-softmax for every (teacher, student) view pair."""
    student_chunks = (student_output / dino_loss.student_temp).chunk(dino_loss.ncrops)
    temp = dino_loss.teacher_temp_schedule[epoch]
    teacher_chunks = F.softmax((teacher_output - dino_loss.center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_terms = 0, 0
    for iq, q in enumerate(teacher_chunks):
        for v in range(len(student_chunks)):
            if v == iq:
                continue
            total_loss += torch.sum(-q * F.log_softmax(student_chunks[v], dim=-1), dim=-1).mean()
            n_terms += 1
    dino_loss.update_center(teacher_output)
    return total_loss / n_terms


def clip_gradients_per_parameter(model: nn.Module, clip: float) -> List[float]:
    """Per-parameter clipping with a host sync per parameter (the `if clip_coef < 1` test)."""
    norms = []
    for param in model.parameters():
        if param.grad is None:
            continue
        norm = param.grad.data.norm(2)
        norms.append(norm.item())
        clip_coef = clip / (norm + 1e-6)
        if clip_coef < 1:
            param.grad.data.mul_(clip_coef)
    return norms


def unscale_and_clip_per_parameter(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   fp16_scaler: Optional[torch.amp.GradScaler],
                                   clip: float) -> None:
    """The reference's clipping step: unscale (with fp16), then clip with a sync per parameter."""
    if fp16_scaler is not None:
        fp16_scaler.unscale_(optimizer)
    clip_gradients_per_parameter(model, clip)


@torch.no_grad()
def update_teacher_per_parameter(student_params: List[torch.Tensor],
                                 teacher_params: List[torch.Tensor], momentum: float) -> None:
    """The EMA as a Python loop over the parameters, two kernels each."""
    for student_param, teacher_param in zip(student_params, teacher_params):
        teacher_param.mul_(momentum).add_((1 - momentum) * student_param.detach())
