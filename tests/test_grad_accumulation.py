"""--grad_accum_steps: K micro-batches of B/K give the update of one batch of B.

The step is compared with SGD, whose update is linear in the gradient: AdamW divides each
gradient by its own magnitude, so float32 rounding of near-zero gradients (summed in another
order) moves those weights by up to ~lr whatever the accumulation.
"""
import pytest
import torch

import main_dino
import utils


def training_for(batch_size, accumulation, optimizer="sgd"):
    args = main_dino.get_args_parser().parse_args([
        "--arch", "vit_tiny", "--patch_size", "8", "--out_dim", "64", "--local_crops_number", "2",
        "--batch_size_per_gpu", str(batch_size), "--grad_accum_steps", str(accumulation),
        "--drop_path_rate", "0", "--epochs", "2", "--warmup_epochs", "0", "--lr", "20",
        "--optimizer", optimizer, "--momentum_teacher", "0.99", "--freeze_last_layer", "0",
        "--use_fp16", "false"])
    args.gpu, args.compile = 0, False
    torch.manual_seed(0)
    return main_dino.build_training(args, torch.device("cpu"), iters_per_epoch=4)


def step_crops(batch):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(2)] + \
           [torch.randn(batch, 3, 8, 8, generator=generator) for _ in range(2)]


def micro_batches(crops, count):
    return [list(parts) for parts in zip(*(crop.chunk(count) for crop in crops))]


def test_accumulated_micro_batches_give_the_big_batch_update(single_process_group):
    crops = step_crops(8)
    results = []
    for batch, accumulation in ((8, 1), (2, 4)):
        training = training_for(batch, accumulation)
        values = []
        for it in range(2):  # the second step sees the moved center and teacher
            main_dino.set_schedules(training.optimizer, training.schedules, it)
            values.append(main_dino.training_step(training, micro_batches(crops, accumulation),
                                                  0, it))
        results.append((training, values))
    (whole, whole_values), (accumulated, accumulated_values) = results
    for got, want in zip(accumulated_values, whole_values):
        assert got["loss"].item() == pytest.approx(want["loss"].item(), abs=1e-6)
        assert got["teacher_entropy"].item() == pytest.approx(want["teacher_entropy"].item(),
                                                              abs=1e-6)
    for model in ("student", "teacher"):
        want = getattr(whole, model).state_dict()
        for name, value in getattr(accumulated, model).state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(accumulated.dino_loss.center, whole.dino_loss.center,
                               rtol=0, atol=1e-6)
    assert accumulated.dino_loss.micro_batches_seen == 0  # the center moved once per step
    fresh = training_for(8, 1).student.state_dict()
    moved = [(fresh[name] - value).abs().max()
             for name, value in whole.student.state_dict().items()]
    assert max(moved) > 1e-3  # the steps really moved the weights


def test_adamw_gets_the_same_gradients(single_process_group):
    crops = step_crops(8)
    gradients = []
    for batch, accumulation in ((8, 1), (2, 4)):
        training = training_for(batch, accumulation, optimizer="adamw")
        main_dino.set_schedules(training.optimizer, training.schedules, 0)
        training.optimizer.step = lambda: None  # keep the gradients of the step's end
        main_dino.training_step(training, micro_batches(crops, accumulation), 0, 0)
        gradients.append([p.grad for p in training.student.parameters() if p.grad is not None])
    for got, want in zip(*gradients):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item())


def test_ddp_syncs_the_gradients_of_the_last_micro_batch_only(single_process_group,
                                                              monkeypatch):
    training = training_for(2, 3)
    calls = []
    original = training.student.no_sync

    def counting_no_sync():
        calls.append(1)
        return original()

    monkeypatch.setattr(training.student, "no_sync", counting_no_sync)
    main_dino.training_step(training, micro_batches(step_crops(6), 3), 0, 1)
    assert len(calls) == 2


def test_lr_is_scaled_by_the_effective_batch(monkeypatch):
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    args = main_dino.get_args_parser().parse_args(
        ["--lr", "0.0008", "--batch_size_per_gpu", "16", "--grad_accum_steps", "4",
         "--epochs", "2", "--warmup_epochs", "1"])
    schedules = main_dino.build_schedules(args, niter_per_ep=3)
    assert schedules["lr"].max() == pytest.approx(0.0008 * 16 * 4 * 2 / 256)


def test_step_batches_group_the_loader_batches():
    steps = utils.StepBatches(list(range(6)), per_step=3)
    assert len(steps) == 2 and list(steps) == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.slow
def test_a_run_with_accumulation_equals_the_big_batch_run(tmp_path):
    from sample_data import write_digits_folder
    from benchmarks import resume_check

    data = write_digits_folder(str(tmp_path / "data"), size=32, limit=48)
    checkpoints = []
    for batch, accumulation in ((8, 1), (4, 2)):
        output_dir = tmp_path / f"accumulate{accumulation}"
        flags = ["--data_path", data, "--output_dir", str(output_dir), *resume_check.TINY_RUN,
                 "--epochs", "1", "--warmup_epochs", "0", "--optimizer", "sgd", "--lr", "20",
                 "--drop_path_rate", "0", "--batch_size_per_gpu", str(batch),
                 "--grad_accum_steps", str(accumulation)]
        run = resume_check.run_stopping(flags)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "Epoch: [0/1]  [5/6]" in run.stdout  # 48 images, 8 per optimizer step
        checkpoints.append(utils.load_checkpoint_file(str(output_dir / "checkpoint.pth")))
    whole, accumulated = checkpoints
    for key in ("student", "teacher", "dino_loss"):
        for name, value in whole[key].items():
            torch.testing.assert_close(accumulated[key][name], value, rtol=0, atol=1e-6,
                                       msg=f"{key} {name}")
