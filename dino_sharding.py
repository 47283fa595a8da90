"""FSDP2 sharding of main_dino's ViTs (--sharding fsdp), with checkpoints in the v1 layout.

Every transformer block, then the whole multi-crop network, goes through
`torch.distributed.fsdp.fully_shard`: each rank keeps 1/world of every parameter (float32), the
blocks' parameters are all-gathered in the compute dtype just before they are used, and
gradients are reduce-scattered in float32. Student and teacher are sharded alike, so the teacher
EMA runs on the local shards. Checkpoints hold whole tensors, gathered from every rank, under
the keys of the unsharded run (`module.` for the student), so eval_knn.py, hubconf.py, the
reference code and an unsharded run all load them; a sharded run resumes from either kind.
"""
import argparse
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

import utils

SHARDINGS = ("none", "fsdp")


def add_sharding_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sharding", default="none", choices=SHARDINGS,
                        help="'fsdp' shards student and teacher over the processes (FSDP2, one "
                             "unit per transformer block; ViTs only) instead of replicating the "
                             "student with DDP. Compute runs in bf16 with --use_bf16 true or, on "
                             "CUDA, --use_fp16 true, otherwise in float32; gradients are "
                             "reduced in float32.")


def check_sharding_args(args: argparse.Namespace) -> None:
    if args.sharding != "fsdp":
        return
    if args.arch not in utils.VIT_ARCHS:
        raise utils.InputError(f"--sharding fsdp shards transformer blocks: use a ViT, not "
                               f"{args.arch}")
    if args.optimizer == "lars":
        raise utils.InputError("--sharding fsdp supports --optimizer adamw or sgd (LARS needs "
                               "whole-parameter norms at every step)")


def compute_dtype(use_bf16: bool, use_fp16: bool, device: torch.device) -> Optional[torch.dtype]:
    """The dtype FSDP computes in: bf16 when mixed precision is asked for (FSDP2 keeps fp16's
    loss scaling out, so --use_fp16 also means bf16 here), else None (float32)."""
    if use_bf16 or (use_fp16 and device.type == "cuda"):
        return torch.bfloat16
    return None


def shard(network: nn.Module, param_dtype: Optional[torch.dtype], compile_blocks: bool
          ) -> nn.Module:
    """fully_shard every block of `network.backbone`, then the whole network (heads included).

    With compile_blocks, each block's attention and MLP are compiled: they carry no FSDP hooks,
    so the compiled graphs never contain the all-gathers, and the state_dict keys stay. Every
    module then loads whole tensors too (a checkpoint, --init_from), split over the ranks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in network.backbone.blocks:
        fully_shard(block, mp_policy=policy)
        if compile_blocks:
            block.attn.compile(dynamic=False)
            block.mlp.compile(dynamic=False)
    fully_shard(network, mp_policy=policy)
    for module in network.modules():
        module.register_load_state_dict_pre_hook(_shard_whole_tensors)
    return network


def shard_student_teacher(student: nn.Module, teacher: nn.Module,
                          param_dtype: Optional[torch.dtype], compile_blocks: bool
                          ) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """main_dino's (student, teacher, teacher_without_ddp), sharded alike; the teacher is a
    frozen copy of the student."""
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    student = shard(student, param_dtype, compile_blocks)
    teacher = shard(teacher, param_dtype, compile_blocks)
    return (ShardedNetwork(student, key_prefix="module."),
            ShardedNetwork(teacher, key_prefix=""), teacher)


def _shard_whole_tensors(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: whole tensors for the module's own sharded parameters are
    split over the ranks as the parameters are (collective: every rank loads alike)."""
    for name, param in module.named_parameters(recurse=False):
        key = prefix + name
        if key in state_dict and not hasattr(state_dict[key], "device_mesh"):
            state_dict[key] = shard_like(state_dict[key], param)


class ShardedNetwork(nn.Module):
    """An FSDP-sharded network whose state_dict holds whole tensors on the CPU under
    `key_prefix` (DDP's `module.` for the student, none for the teacher).

    state_dict() and load_state_dict() are collective: every rank must call them.
    """

    def __init__(self, module: nn.Module, key_prefix: str):
        super().__init__()
        self.module = module
        self.key_prefix = key_prefix

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """As DDP's: gradients accumulate on each rank, reduced after the context."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def state_dict(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        return {self.key_prefix + name: whole_tensor(value)
                for name, value in self.module.state_dict().items()}

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True):
        own = {name[len(self.key_prefix):]: value for name, value in state_dict.items()
               if name.startswith(self.key_prefix)}
        return self.module.load_state_dict(own, strict=strict)


class ShardedOptimizerState:
    """The checkpoint side of an optimizer over sharded parameters: torch's usual index-keyed
    state_dict with whole tensors (so an unsharded run resumes from it, and the reverse)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def _params(self) -> List[torch.Tensor]:
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def state_dict(self) -> Dict[str, Any]:
        state = self.optimizer.state_dict()
        return {"state": {index: {name: whole_tensor(value) for name, value in entry.items()}
                          for index, entry in state["state"].items()},
                "param_groups": state["param_groups"]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        params = self._params()
        state = {index: {name: shard_like(value, params[index])
                         if _same_shape(value, params[index]) else value
                         for name, value in entry.items()}
                 for index, entry in state_dict["state"].items()}
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": state_dict["param_groups"]})


def _same_shape(value: Any, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and hasattr(param, "to_local") and value.shape == param.shape


def whole_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered from every rank (collective), on the CPU; other tensors as they are."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor().cpu()
    return value


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) split over the ranks as the DTensor `like` is."""
    if not hasattr(like, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)


def local_tensors(params: List[torch.Tensor]) -> List[torch.Tensor]:
    """Each rank's shard of sharded parameters (views that alias them); others as they are."""
    return [param.to_local() if hasattr(param, "to_local") else param for param in params]
