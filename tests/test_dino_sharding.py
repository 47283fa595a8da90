"""--sharding fsdp: two CPU processes (gloo) train as one unsharded process does.

One two-process session (spawned once for the module) trains a tiny ViT with FSDP2 for three
steps with iBOT (masks of different sizes on the two ranks), register tokens and Sinkhorn-Knopp,
writes a v1-layout checkpoint, resumes it into freshly sharded networks and takes a fourth
step; it also runs Sinkhorn-Knopp and the iBOT centre on split batches. The test process
repeats everything unsharded on the whole batch and compares.
"""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dino_objectives
import main_dino
import utils
import vision_transformer as vits

BATCH = 4  # per rank; the unsharded run takes both ranks' images
# SGD with every gradient clipped: AdamW would turn float rounding in the near-zero gradients of
# the first steps into updates of +-lr, while here each update is the gradient's direction, so
# the runs agree to float rounding and whole-parameter clipping norms are exercised.
FLAGS = ["--arch", "vit_tiny", "--patch_size", "8", "--out_dim", "32", "--local_crops_number", "2",
         "--epochs", "2", "--warmup_epochs", "1", "--optimizer", "sgd", "--lr", "5",
         "--clip_grad", "0.001", "--drop_path_rate", "0", "--num_register_tokens", "2",
         "--ibot_loss_weight", "1", "--ibot_out_dim", "24", "--centering", "centering"]


def training_args(world_size: int, *extra: str):
    args = main_dino.get_args_parser().parse_args(
        [*FLAGS, "--batch_size_per_gpu", str(BATCH * 2 // world_size), *extra])
    args.gpu, args.compile = 0, False
    return args


def all_crops(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    return ([torch.randn(2 * BATCH, 3, 32, 32, generator=generator) for _ in range(2)]
            + [torch.randn(2 * BATCH, 3, 16, 16, generator=generator) for _ in range(2)])


def all_masks(step: int) -> np.ndarray:
    """Masks of the 2 x 8 global crops (crop 1's images, then crop 2's); rank 0's images get
    more masked patches than rank 1's, so the iBOT centre must weigh the ranks by tokens."""
    rng = np.random.default_rng(step)
    masks = rng.random((2, 2 * BATCH, 16)) < np.where(np.arange(2 * BATCH) < BATCH, 0.6, 0.2)[
        None, :, None]
    return masks.reshape(4 * BATCH, 16)


def rank_rows(rank: int, world_size: int):
    """Which of the whole batch's images a rank holds (per crop)."""
    share = 2 * BATCH // world_size
    return slice(rank * share, (rank + 1) * share)


def use_fixed_masks(training, rank: int, world_size: int) -> None:
    def sampler(images, grid, draw, device):
        rows = rank_rows(rank, world_size)
        masks = all_masks(draw).reshape(2, 2 * BATCH, 16)[:, rows].reshape(images, 16)
        return dino_objectives.patch_masks_of(masks, device)
    if training.objectives is not None:
        training.objectives.mask_sampler = sampler


def train_steps(training, rank: int, world_size: int, steps) -> None:
    rows = rank_rows(rank, world_size)
    for it in steps:
        main_dino.set_schedules(training.optimizer, training.schedules, it)
        main_dino.training_step(training, [[crop[rows] for crop in all_crops(it)]], 0, it)


def build(world_size: int, rank: int, *extra: str):
    args = training_args(world_size, *extra)
    utils.fix_random_seeds(0)
    training = main_dino.build_training(args, torch.device("cpu"), iters_per_epoch=4)
    use_fixed_masks(training, rank, world_size)
    return args, training


def sharded_worker(rank: int, store: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    args, training = build(2, rank, "--sharding", "fsdp")
    train_steps(training, rank, 2, range(3))
    utils.save_on_master(main_dino.checkpoint_state(training, 0, args), f"{folder}/three.pth")
    args, resumed = build(2, rank, "--sharding", "fsdp")
    utils.restart_from_checkpoint(f"{folder}/three.pth", **resumed.checkpointed)
    train_steps(resumed, rank, 2, [3])
    utils.save_on_master(main_dino.checkpoint_state(resumed, 0, args), f"{folder}/four.pth")
    torch.manual_seed(0)
    scores = torch.randn(2 * BATCH, 6) / 0.04
    probs = dino_objectives.sinkhorn_knopp(scores[rank_rows(rank, 2)])
    torch.save(probs, f"{folder}/sinkhorn{rank}.pth")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(sharded_worker, args=(str(folder / "store"), str(folder)), nprocs=2)
    return folder


def assert_states_close(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def assert_checkpoints_close(got: dict, want: dict) -> None:
    for part in ("student", "teacher", "dino_loss", "ibot_loss"):
        assert_states_close(got[part], want[part])
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    for index, state in want["optimizer"]["state"].items():
        assert_states_close(got["optimizer"]["state"][index], state)


@pytest.mark.slow
def test_sharded_steps_equal_unsharded_steps_and_resume_either_way(sharded_run,
                                                                   single_process_group):
    args, training = build(1, 0)
    initial = {name: value.clone() for name, value in training.student.state_dict().items()}
    train_steps(training, 0, 1, range(3))
    moved = max((value - initial[name]).abs().max().item()
                for name, value in training.student.state_dict().items())
    assert moved > 1e-3
    sharded = utils.load_checkpoint_file(str(sharded_run / "three.pth"))
    assert list(sharded) == ["student", "teacher", "optimizer", "epoch", "args", "dino_loss",
                             "ibot_loss"]
    assert_checkpoints_close(sharded, main_dino.checkpoint_state(training, 0, args))
    assert sharded["args"].sharding == "fsdp"

    # The unsharded run resumes from the sharded checkpoint; both then take step 3.
    args, resumed = build(1, 0)
    utils.restart_from_checkpoint(str(sharded_run / "three.pth"), **resumed.checkpointed)
    train_steps(resumed, 0, 1, [3])
    fourth = utils.load_checkpoint_file(str(sharded_run / "four.pth"))
    assert_checkpoints_close(fourth, main_dino.checkpoint_state(resumed, 0, args))
    assert not torch.equal(fourth["teacher"]["backbone.pos_embed"],
                           sharded["teacher"]["backbone.pos_embed"])


@pytest.mark.slow
def test_sharded_checkpoint_loads_as_a_reference_backbone(sharded_run):
    teacher = utils.load_checkpoint_file(str(sharded_run / "four.pth"))["teacher"]
    backbone = {name[len("backbone."):]: value for name, value in teacher.items()
                if name.startswith("backbone.") and name != "backbone.mask_token"}
    vits.vit_tiny(patch_size=8, num_register_tokens=2).load_state_dict(backbone, strict=True)


@pytest.mark.slow
def test_sinkhorn_knopp_balances_over_both_ranks(sharded_run):
    torch.manual_seed(0)
    whole = dino_objectives.sinkhorn_knopp(torch.randn(2 * BATCH, 6) / 0.04)
    for rank in range(2):
        torch.testing.assert_close(torch.load(sharded_run / f"sinkhorn{rank}.pth"),
                                   whole[rank_rows(rank, 2)])
